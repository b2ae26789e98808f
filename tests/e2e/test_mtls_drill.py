"""mTLS inside a real drill (docs/mtls.md, "In the drill"), end to end on the netns runtime.

* A drill as ``make drill`` runs it, at ``-vvvv`` with an Ansible log file: the report's ``mtls``
  section holds every handshake probe as expected (each refusal with its reason), the forced leaf
  rotation with ``dropped_connections: 0`` and no failed handshake, the CA rotation with the old
  CA's leaf refused (``unknown_ca``); the refusal of an identity ``tier_rules`` does not allow is in
  the drill's telemetry; the PKI is gone after teardown.
* The CA and leaf private keys never appear anywhere: a watcher of this test (root, no production
  code) copies every private key from the drill's PKI and probe directories while the drill runs
  (the first CA, the rotated-to CA, every leaf generation); stdout, stderr, the log file, every file
  under the output root, the Ansible temp directories and /dev/shm are searched for each key's PEM
  body and private scalar in every form ``test_secret_leaks.Scan`` knows.
* A disallowed identity accepted by a tier halts the drill: with ``drill_mtls.inject_allow`` the
  db tier's server also accepts the validation tier's identity, which ``tier_rules`` does not
  allow; the probe observes allow where deny was expected, the drill alerts
  ``drguard.boundary.violated`` (layer mtls) and halts in phase ``mtls`` before any backup is read.

Root only (namespaces and nftables), like the runtime itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from drillkit import remaining, run_drill, runtime_remaining
from test_secret_leaks import ANSIBLE_TMP_DIRS, SHM, Scan

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ip", "nft", "setpriv")),
                       reason="the netns runtime needs root and ip, nft and setpriv on PATH"),
    pytest.mark.xdist_group("mtls_drill"),
]

REFUSALS = {"no_client_certificate": "no_client_certificate", "another_drill_ca": "unknown_ca",
            "expired": "expired", "identity_not_allowed:validation": "identity_not_allowed",
            "outside_trust_domain": "name_constraint_violation", "wrong_eku": "wrong_purpose",
            "ca_true": "ca_certificate", "rotated_out_leaf": "revoked", "old_ca_leaf_after_retirement": "unknown_ca"}
ALLOWED = ("allowed", "old_ca_leaf_during_overlap", "after_ca_rotation")
_PEM = re.compile(rb"-----BEGIN PRIVATE KEY-----\n(.+?)-----END PRIVATE KEY-----", re.S)


class KeyWatcher(threading.Thread):
    """Copies every private key that appears under the drill's mTLS directory while the drill runs."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.keys, self.stop = root, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for path in self._paths():
                try:
                    blob = path.read_bytes()
                except OSError:
                    continue
                for body in _PEM.findall(blob):
                    flat = b"".join(body.split()).decode()
                    if flat in {k["pem"] for k in self.keys.values()}:
                        continue
                    try:
                        key = serialization.load_pem_private_key(b"-----BEGIN PRIVATE KEY-----\n" + body
                                                                 + b"-----END PRIVATE KEY-----\n", None)
                    except ValueError:  # caught half-written: read again on the next pass
                        continue
                    kind = ("CA" if path.parent.name == "pki" and path.suffix == ".key"
                            else "leaf %s" % path.relative_to(self.root))
                    label = "%s key #%d" % (kind, len(self.keys) + 1)
                    self.keys[label] = {"pem": flat, "scalar": "%064x" % key.private_numbers().private_value}
            time.sleep(0.002)

    def _paths(self) -> list:
        # The drill removes the directory at teardown, possibly in the middle of a walk: what vanished is
        # simply not there any more (the test asserts on the keys collected, so a watcher that saw nothing fails it).
        try:
            return list(self.root.rglob("*.key")) + list(self.root.rglob("*.pem"))
        except OSError:
            return []


@pytest.fixture(scope="module")
def mtls_drill(world, tmp_path_factory):
    out_root = tmp_path_factory.mktemp("mtls-runs")
    log = out_root / "ansible.log"
    watchers = []

    def start():  # the drill id is chosen by run_drill: watch every new mTLS directory on the tmpfs
        before = {p.name for p in SHM.glob("drguard-*-mtls")}
        stop = threading.Event()

        def spot():
            while not stop.is_set():
                for p in SHM.glob("drguard-*-mtls"):
                    if p.name not in before and all(w.root != p for w in watchers):
                        watcher = KeyWatcher(p)
                        watchers.append(watcher)
                        watcher.start()
                time.sleep(0.005)
        spotter = threading.Thread(target=spot, daemon=True)
        spotter.start()
        return stop

    stop = start()
    try:
        run = run_drill(world, out_root, args=("-vvvv",), env_extra={"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
                                                                      "ANSIBLE_LOG_PATH": str(log)})
    finally:
        stop.set()
        for w in watchers:
            w.stop.set()
            w.join(5)
    mine = [w for w in watchers if w.root.name == "drguard-%s-mtls" % run.drill_id]
    return {"run": run, "log": log, "out_root": out_root, "keys": mine[0].keys if mine else {}}


def test_report_shows_every_handshake_as_expected_and_both_rotations(mtls_drill):
    run = mtls_drill["run"]
    assert run.rc == 0, run.stdout[-3000:]
    report = run.report
    assert report["outcome"] == "passed"
    assert [p["name"] for p in report["phases"]][:5] == ["network", "prove", "runtime", "probes", "mtls"]
    m = report["mtls"]
    rows = {r["case"]: r for r in m["probes"]}
    assert set(rows) == set(REFUSALS) | set(ALLOWED)
    assert all(r["layer"] == "mtls" and r["src"] == "app" and r["dst"] == "db" for r in m["probes"])
    for case, reason in REFUSALS.items():
        assert (rows[case]["expected"], rows[case]["observed"], rows[case]["reason"]) == ("deny", "deny", reason), case
    for case in ALLOWED:
        assert (rows[case]["observed"], rows[case]["reason"]) == ("allow", "round_trip"), case
    assert m["violations"] == 0 and m["unexpected"] == 0
    rotation = m["rotation"]
    assert rotation["rotated"] is True and rotation["dropped_connections"] == 0
    assert rotation["failed_handshakes"] == 0 and rotation["held_round_trips"] > 5
    assert rotation["new_serials"] == [rotation["old_serial"], rotation["new_serial"]]
    assert m["ca_rotation"]["rotated"] is True and m["ca_rotation"]["old_ca_key_destroyed"] is True
    assert rows["after_ca_rotation"]["server_serial"] == m["ca_rotation"]["new_server_serial"]
    assert m["ca"]["serial"] == m["ca_rotation"]["new_ca"] and len(m["ca"]["sha256"]) == 64
    assert m["counts"]["refused"] == len(REFUSALS)
    assert m["counts"]["handshakes"] == len(m["handshakes"]) == m["counts"]["accepted"] + m["counts"]["refused"]
    assert "## mTLS between the tiers" in (run.output_dir / "drill-report.md").read_text()
    # The db service of phase validate, over mTLS too: the app tier's command was accepted by identity.
    services = m["service_handshakes"]
    assert services and m["service_counts"]["accepted"] >= 1
    assert {(h["local_tier"], h["peer_tier"]) for h in services if h["accepted"]} == {("db", "app")}
    assert "Tier services (the db service): %d handshake(s)" % len(services) in \
        (run.output_dir / "drill-report.md").read_text()


def test_refused_identity_is_in_the_telemetry_and_the_pki_is_gone(mtls_drill):
    run = mtls_drill["run"]
    report = run.report
    events = [json.loads(line) for line in (run.output_dir / "telemetry.jsonl").read_text().splitlines()]
    handshakes = [e for e in events if e["type"] == "drguard.tls.handshake"]
    # Phase validate's db service speaks mTLS too: its handshakes (the user's command) reach the collector
    # beside the mtls phase's, which the report's mtls section counts.
    served = {json.loads(line)["id"] for line in (run.output_dir / "runtime" / "db-service-events.jsonl")
              .read_text().splitlines() if line.strip()}
    by_service = [e["data"] for e in handshakes if e["id"] in served]
    assert by_service and all(h["accepted"] and h["peer_tier"] == "app" and h["local_tier"] == "db"
                              for h in by_service)
    assert len(handshakes) - len(by_service) == report["mtls"]["counts"]["handshakes"]
    refused = [e["data"] for e in handshakes if e["data"]["reason"] == "identity_not_allowed"]
    assert len(refused) == 1 and refused[0]["accepted"] is False
    assert refused[0]["peer_id"] == "spiffe://%s.drguard.internal/tier/validation" % run.drill_id
    assert refused[0]["local_tier"] == "db" and refused[0]["port"] == 5432
    assert report["telemetry"]["by_type"]["drguard.tls.handshake"] == len(handshakes)
    steps = report["teardown"]["steps"]["runtime"]
    assert steps["pki_destroyed"] == str(SHM / ("drguard-%s-mtls" % run.drill_id))
    assert not (SHM / ("drguard-%s-mtls" % run.drill_id)).exists()
    left = runtime_remaining(run.drill_id)
    assert not any(left.values()), left


def test_ca_and_leaf_private_keys_never_leak(mtls_drill):
    run, keys = mtls_drill["run"], mtls_drill["keys"]
    assert run.rc == 0
    # The watcher saw the first and the rotated-to CA, and several generations of every tier's leaf.
    assert sum(1 for label in keys if label.startswith("CA")) == 2, sorted(keys)
    for tier in ("app", "db", "validation"):
        mine = [label for label in keys if "tier-%s.pem" % tier in label or "tier-%s/identity.pem" % tier in label]
        assert len(mine) >= 3, sorted(keys)
    canaries = {}
    for label, key in keys.items():
        canaries[label + " PEM body"] = key["pem"]
        canaries[label + " scalar"] = key["scalar"]
    # Self-check: a key's PEM, as a careless task would print it (JSON-escaped, line-wrapped), is found.
    planted = Scan(canaries)
    label = sorted(keys)[0]
    pem = "-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n" % "\n".join(
        keys[label]["pem"][i:i + 64] for i in range(0, len(keys[label]["pem"]), 64))
    planted.data("planted", json.dumps({"msg": pem}).encode())
    assert any(label + " PEM body" in hit for hit in planted.hits), planted.hits
    scan = Scan(canaries)
    scan.data("stdout", run.stdout.encode())
    scan.data("stderr", run.stderr.encode())
    scan.tree(mtls_drill["out_root"])
    for tmp in ANSIBLE_TMP_DIRS:
        if tmp.exists():
            scan.tree(tmp, strict=False)
    scan.tree(SHM, strict=False)
    assert mtls_drill["log"].stat().st_size > 0 and scan.sources > 10
    assert scan.hits == [], "private keys leaked (%d hit(s)):\n%s" % (len(scan.hits), "\n".join(scan.hits))


def test_a_disallowed_identity_accepted_halts_the_drill(world, tmp_path):
    run = run_drill(world, tmp_path, extra={"drill_mtls": {"inject_allow": [
        {"from": "validation", "to": "db", "ports": [5432]}]}})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "mtls", report["error"]
    assert [p["name"] for p in report["phases"]] == ["network", "prove", "runtime", "probes", "mtls", "teardown"]
    assert report["artifacts"] is None
    alerts = [json.loads(line) for line in (run.output_dir / "alerts.jsonl").read_text().splitlines()]
    assert [a["type"] for a in alerts] == ["drguard.boundary.violated"]
    violations = alerts[0]["data"]["violations"]
    assert alerts[0]["data"]["layer"] == "mtls"
    assert [(v["case"], v["expected"], v["observed"]) for v in violations] == [
        ("identity_not_allowed:validation", "deny", "allow")]
    assert violations[0]["peer_id"] == "spiffe://%s.drguard.internal/tier/validation" % run.drill_id
    assert report["mtls"]["violations"] == 1
    assert report["teardown"]["remaining"] == 0
    assert remaining(world.emu, run.drill_id) == []
    assert not (SHM / ("drguard-%s-mtls" % run.drill_id)).exists()
    left = runtime_remaining(run.drill_id)
    assert not any(left.values()), left
