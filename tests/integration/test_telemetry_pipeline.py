"""The telemetry pipeline in the embedded world: the collector runs unprivileged in the telemetry
namespace on the declared telemetry destination, senders run unprivileged in the tiers (through the
router and its ruleset) and in the control-plane namespace (where the drill sends from).

Root only (``ip netns``, nftables), skipped with the reason otherwise. Each test builds the world
of a drill id of its own and destroys its prefix even when it fails. Traffic only ever goes
between namespaces these tests create.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy as nft_policy
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry as tel
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import SYSTEM_PYTHON

pytestmark = needs_root_and("ip", "nft", "setpriv", files=(SYSTEM_PYTHON,))

BOUNDARY = {
    "sandbox_cidr": "10.214.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]},
               {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
    "ingress": [],
    "tiers": ["app", "db"],
    "tier_rules": [],
}


def leftovers(prefix):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in listed.splitlines() if line.startswith(prefix))


def channel_of(plan):
    """The drill's telemetry channel (its CA and leaves on /dev/shm), made for ``plan``."""
    channel = tel.Channel(plan["drill_id"])
    channel.ensure(plan, 600)
    return channel


@pytest.fixture
def world(tmp_path):
    """The embedded world of a fresh drill, ruled by the translator's ruleset, with its telemetry channel;
    always destroyed (the PKI overwritten and removed too)."""
    boundary = parse_boundary(BOUNDARY)
    plan = runtime.full_plan(boundary, f"dr-telemetry-{uuid.uuid4().hex[:12]}")
    assert leftovers(plan["prefix"]) == []
    try:
        netns.create(plan)
        netns.apply_ruleset(plan["router"]["ns"], nft_policy.router_ruleset(boundary, plan, plan["table"]))
        channel_of(plan)
        yield plan
    finally:
        netns.destroy(plan["prefix"])
        _mtls_drill.destroy(plan["drill_id"])
        assert leftovers(plan["prefix"]) == [], f"left behind under {plan['prefix']}"
        assert not os.path.lexists(_mtls_drill.root_dir(plan["drill_id"]))


def start_collector(plan, out_dir, port=None):
    """Spawn the collector unprivileged on the plan's telemetry destination, its credentials as files of its
    private mount; returns (pid, output path)."""
    where = plan["world"]["telemetry"]
    ns = plan["world"]["neighbours"]["telemetry"]["ns"]
    out, err = out_dir / "telemetry.jsonl", out_dir / "collector.err"
    argv = tel.collector_argv(SYSTEM_PYTHON, where["address"], port or where["port"], drill_id=plan["drill_id"],
                              tiers=list(plan["tiers"]))
    pid = netns.spawn(ns, argv, stdout_path=str(out), stderr_path=str(err),
                      files=tel.Channel(plan["drill_id"]).collector_files())
    deadline = time.monotonic() + 10
    while "listening" not in err.read_text():
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    return pid, out


def stop_collector(pid):
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def send_from(ns, plan, events_text, connect_timeout=5, port=None):
    where = plan["world"]["telemetry"]
    argv = tel.sender_argv(SYSTEM_PYTHON, where["address"], port or where["port"], drill_id=plan["drill_id"],
                           connect_timeout=connect_timeout)
    return netns.run_in(ns, argv, input_text=events_text, timeout=60,
                        files=tel.Channel(plan["drill_id"]).sender_files(ns))


def events(sender, count, kind="drguard.probe.result"):
    return [tel.cloud_event(kind, f"/drguard/test/{sender}", sender, {"n": i}) for i in range(count)]


def proc_status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def test_four_senders_of_200_events_from_tiers_and_control_plane_are_all_counted(world, tmp_path):
    plan = world
    out_dir = tmp_path / "run"
    out_dir.mkdir(mode=0o700)
    pid, out = start_collector(plan, out_dir)
    status = proc_status(pid)
    assert status["Uid"][:2] == ["65534", "65534"] and status["CapEff"] == ["0000000000000000"]
    assert status["NoNewPrivs"] == ["1"]
    senders = [("app-1", plan["tiers"]["app"]["ns"]), ("app-2", plan["tiers"]["app"]["ns"]),
               ("db", plan["tiers"]["db"]["ns"]), ("drill", plan["world"]["neighbours"]["control_plane"]["ns"])]
    batches = {name: events(name, 200, "drguard.phase.finished" if name == "drill" else "drguard.probe.result")
               for name, _ in senders}
    with ThreadPoolExecutor(len(senders)) as pool:
        results = list(pool.map(lambda s: send_from(s[1], plan, tel.encode_events(batches[s[0]])), senders))
    for (name, _), res in zip(senders, results, strict=True):
        assert res.returncode == 0, (name, res.stderr)
        assert json.loads(res.stdout) == {"sent": 200, "acknowledged": 200}
    assert stop_collector(pid) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert tel.summarise(str(out)) == {
        "events": 800, "by_type": {"drguard.probe.result": 600, "drguard.phase.finished": 200},
        "rejected": 0, "rejected_reasons": {}, "refused": 0, "refused_reasons": {}, "corrupt": 0,
        "corrupt_lines": []}
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(e["id"] for batch in batches.values() for e in batch)


def test_invalid_events_from_a_tier_are_counted_as_rejected_and_the_sender_fails(world, tmp_path):
    plan = world
    pid, out = start_collector(plan, tmp_path)
    good = events("app", 3)
    text = (tel.encode_events(good[:2]) + "not json\n"
            + json.dumps({**good[2], "type": "drguard.telemetry.rejected"}) + "\n"
            + json.dumps({k: v for k, v in good[2].items() if k != "time"}) + "\n"
            + tel.encode_events(good[2:]))
    res = send_from(plan["tiers"]["app"]["ns"], plan, text)
    assert res.returncode == 1
    assert json.loads(res.stdout) == {"sent": 6, "acknowledged": 3, "rejected": [
        {"event": 3, "reason": "not_json"}, {"event": 4, "reason": "type_reserved"},
        {"event": 5, "reason": "missing_attribute:time"}]}
    assert res.stderr.startswith("telemetry sender: 3 of 6 event(s) not acknowledged")
    assert stop_collector(pid) == 0
    got = tel.summarise(str(out))
    assert (got["events"], got["rejected"], got["corrupt"]) == (3, 3, 0)
    assert got["rejected_reasons"] == {"not_json": 1, "type_reserved": 1, "missing_attribute:time": 1}


def test_a_killed_collector_makes_the_sender_fail_non_zero(world, tmp_path):
    plan = world
    pid, out = start_collector(plan, tmp_path)
    assert send_from(plan["tiers"]["app"]["ns"], plan, tel.encode_events(events("app", 5))).returncode == 0
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    started = time.monotonic()
    res = send_from(plan["tiers"]["app"]["ns"], plan, tel.encode_events(events("app", 5)), connect_timeout=1)
    assert time.monotonic() - started < 10
    assert res.returncode == 1
    where = plan["world"]["telemetry"]
    assert f"cannot connect to the collector at {where['address']}:{where['port']} within 1s" in res.stderr
    assert res.stderr.count("\n") == 1
    assert tel.summarise(str(out))["events"] == 5  # what was acknowledged before the kill is in the file


def test_the_collector_cannot_be_reached_on_the_telemetry_address_from_a_tier_outside_the_declared_port(
        world, tmp_path):
    # A collector listening on an undeclared port of the telemetry address: the router drops the tier's
    # connection, so the sender fails; from the control plane (outside the router) it connects.
    plan = world
    pid, _ = start_collector(plan, tmp_path, port=4318)
    text = tel.encode_events(events("app", 1))
    blocked = send_from(plan["tiers"]["app"]["ns"], plan, text, connect_timeout=1.5, port=4318)
    assert blocked.returncode == 1 and "cannot connect to the collector" in blocked.stderr
    reached = send_from(plan["world"]["neighbours"]["control_plane"]["ns"], plan, text, connect_timeout=1.5, port=4318)
    assert reached.returncode == 0, reached.stderr
    assert stop_collector(pid) == 0


def test_drill_telemetry_sends_phase_events_from_the_control_plane_and_fails_without_a_collector(world, tmp_path):
    plan = world
    drill_id = plan["drill_id"]
    where = plan["world"]["telemetry"]
    args = {"drill_id": drill_id, "namespace": plan["world"]["neighbours"]["control_plane"]["ns"],
            "address": where["address"], "port": where["port"], "connect_timeout": 1.0,
            "events": [{"type": "drguard.phase.finished", "subject": "network", "data": {"seconds": 1.5}},
                       {"type": "drguard.phase.finished", "subject": "runtime", "data": {"seconds": 0.8}}]}
    res = run_module("drill_telemetry", args)
    assert res.get("failed") is True and res["sent"] == 2 and res["acknowledged"] == 0
    assert f"at {where['address']}:{where['port']}: cannot connect to the collector" in res["msg"]
    pid, out = start_collector(plan, tmp_path)
    res = run_module("drill_telemetry", args)
    assert not res.get("failed"), res
    assert res["changed"] is True and (res["sent"], res["acknowledged"]) == (2, 2)
    assert stop_collector(pid) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in written] == [e["id"] for e in res["events"]]
    assert {e["source"] for e in written} == {f"/drguard/drill/{drill_id}"}
    assert tel.summarise(str(out))["by_type"] == {"drguard.phase.finished": 2}


# ---------------------------------------------------------------- mTLS: who may send


def refusals(out):
    return [json.loads(x)["data"] for x in out.read_text().splitlines()
            if json.loads(x)["type"] == tel.REFUSED_TYPE]


def test_a_tier_holding_another_drills_credentials_is_refused_and_nothing_of_it_lands(world, tmp_path):
    plan = world
    other = runtime.full_plan(parse_boundary(BOUNDARY), f"dr-telemetry-{uuid.uuid4().hex[:12]}")
    pid, out = start_collector(plan, tmp_path)
    try:
        stolen = channel_of(other)  # a whole channel of another drill: its leaves, its CA
        where = plan["world"]["telemetry"]
        app = plan["tiers"]["app"]["ns"]
        # The other drill's tier leaf, presented from this drill's app tier (same tier name, another CA).
        stolen_files = dict(stolen.sender_files(other["tiers"]["app"]["ns"]),
                            **{"trust.pem": tel.Channel(plan["drill_id"]).sender_files(app)["trust.pem"]})
        argv = tel.sender_argv(SYSTEM_PYTHON, where["address"], where["port"], drill_id=plan["drill_id"])
        res = netns.run_in(app, argv, input_text=tel.encode_events(events("STOLEN", 3)), files=stolen_files)
        assert res.returncode == 1 and json.loads(res.stdout)["acknowledged"] == 0
        assert "the collector refused this sender (unknown_ca)" in res.stderr
        # The drill's own app tier right after: accepted, its events land with its identity.
        ok = tel.deliver(app, events("app", 2), where["address"], where["port"], drill_id=plan["drill_id"],
                         python=SYSTEM_PYTHON)
        assert ok == {"sent": 2, "acknowledged": 2}
    finally:
        _mtls_drill.destroy(other["drill_id"])
    assert stop_collector(pid) == 0
    assert "STOLEN" not in out.read_text()
    assert [(r["reason"], r["peer_address"]) for r in refusals(out)] == [
        ("unknown_ca", plan["tiers"]["app"]["address"])]
    got = tel.summarise(str(out))
    assert (got["events"], got["refused_reasons"]) == (2, {"unknown_ca": 1})
    assert {json.loads(x).get("receivedfrom") for x in out.read_text().splitlines()} - {None} == {
        f"spiffe://{plan['drill_id']}.drguard.internal/tier/app"}


def test_a_sender_without_a_certificate_is_refused_and_the_collectors_keys_are_never_on_argv_or_env(world, tmp_path):
    plan = world
    pid, out = start_collector(plan, tmp_path)
    where = plan["world"]["telemetry"]
    # The collector: TLS 1.3, its key only in the read-only file of its private mount.
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmdline = fh.read()
    with open(f"/proc/{pid}/environ", "rb") as fh:
        environ = fh.read()
    assert b"PRIVATE KEY" not in cmdline + environ and b"/run/drguard/in/identity.pem" in cmdline
    channel_dir = tel.Channel(plan["drill_id"]).dir
    assert all(stat.S_IMODE(os.stat(os.path.join(channel_dir, n)).st_mode) == 0o600 for n in os.listdir(channel_dir))
    code = ("import socket, ssl\n"
            "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False\n"
            "ctx.load_verify_locations('/run/drguard/in/trust.pem')\n"
            "s = ctx.wrap_socket(socket.create_connection((%r, %d), timeout=5))\n"
            "print(s.version(), flush=True)\n"
            "s.sendall(%r)\n"
            "try:\n    print(s.recv(100))\nexcept OSError as exc:\n    print(type(exc).__name__)\n"
            % (where["address"], where["port"], tel.encode_events(events("NO-CERT", 1)).encode()))
    trust_only = {"trust.pem": tel.Channel(plan["drill_id"]).sender_files(plan["tiers"]["db"]["ns"])["trust.pem"]}
    res = netns.run_in(plan["tiers"]["db"]["ns"], [SYSTEM_PYTHON, "-I", "-S", "-c", code], files=trust_only)
    assert res.stdout.splitlines()[0] == "TLSv1.3", res.stderr
    assert res.stdout.splitlines()[1] != "b'ok\\n'", res.stdout
    assert stop_collector(pid) == 0
    assert "NO-CERT" not in out.read_text()
    assert refusals(out) == [{"reason": "no_client_certificate", "peer_address": plan["tiers"]["db"]["address"],
                              "peer_id": None, "serial": None}]
    assert tel.summarise(str(out))["events"] == 0


def test_the_runtime_makes_the_ca_the_mtls_phase_reuses_and_the_collector_keeps_its_bundle_after_ca_rotation(
        tmp_path):
    """The runtime makes the drill's CA and the telemetry channel before the collector starts; the mtls
    phase's store reuses that CA; after its CA rotation (the old CA retired, its key destroyed) the drill
    still delivers to the collector, which keeps the bundle it started with: a leaf of the new CA is not a
    telemetry credential and is refused. Removing the runtime destroys the PKI."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
    from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable

    boundary = parse_boundary(BOUNDARY)
    drill_id = f"dr-telemetry-{uuid.uuid4().hex[:12]}"
    out = str(tmp_path / "out")
    root = _mtls_drill.root_dir(drill_id)
    try:
        built = runtime.up(boundary, drill_id, out, python_executable(), pki_ttl=900)
        plan = runtime.full_plan(boundary, drill_id)
        store = _pki.Store(drill_id, os.path.join(root, "pki"))
        (ca1,) = store.state()["cas"]
        channel = tel.Channel(drill_id)
        assert channel.read()["ca"] == ca1
        assert sorted(channel.read()["senders"].values()) == ["control-plane.pem", "tier-app.pem", "tier-db.pem",
                                                              "tier-validation.pem"]
        not_after = store.ca_cert(ca1).not_valid_after_utc - store.ca_cert(ca1).not_valid_before_utc
        assert 900 <= not_after.total_seconds() <= 900 + _pki.BACKDATE + 5  # valid for pki_ttl
        # The mtls phase: the same CA, leaves issued; then its CA rotation with retirement.
        assert store.present(["app", "db"], 900) == ["issue leaf app", "issue leaf db", "issue leaf validation"]
        store.rotate(["app", "db"], 900, ca=True)
        store.retire()
        (ca2,) = store.state()["cas"]
        assert ca2 != ca1 and not os.path.lexists(os.path.join(store.dir, f"ca-{ca1}.key"))
        where, cp = built["collector"], plan["world"]["neighbours"]["control_plane"]["ns"]
        assert tel.deliver(cp, events("drill", 3), where["address"], where["port"], drill_id=drill_id,
                           python=SYSTEM_PYTHON) == {"sent": 3, "acknowledged": 3}
        app = plan["tiers"]["app"]["ns"]
        new_ca_leaf = dict(channel.sender_files(app), **{"identity.pem": {"source": store.tier_file("app"),
                                                                          "mode": 0o400}})
        argv = tel.sender_argv(SYSTEM_PYTHON, where["address"], where["port"], drill_id=drill_id)
        res = netns.run_in(app, argv, input_text=tel.encode_events(events("app", 1)), files=new_ca_leaf)
        assert res.returncode == 1 and "the collector refused this sender (unknown_ca)" in res.stderr
        runtime.down(drill_id, out)
        assert not os.path.lexists(root)
        got = tel.summarise(where["path"])
        assert (got["events"], got["by_type"], got["refused_reasons"]) == (
            3, {"drguard.probe.result": 3}, {"unknown_ca": 1})
    finally:
        netns.destroy(runtime.prefix_of(drill_id))
        _mtls_drill.destroy(drill_id)
    assert leftovers(runtime.prefix_of(drill_id)) == [] and not os.path.lexists(root)
