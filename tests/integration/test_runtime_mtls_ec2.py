"""runtime_mtls with backend ec2: against the emulator as far as the API goes, and its programs run here.

The emulator accepts SendCommand and runs nothing, so there every row is ``unknown`` and a violation
(fail closed). What the instances would run (the server's shell lines, the handshake client) is run
on this host instead, as the SSM agent would (root shell, the workload through ``setpriv``), on
127.0.0.1 with certificates from ``_pki``: the only way to execute those programs here.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest
import yaml
from conftest import ROOT, ansible_env, run_module
from test_runtime_ec2 import _world

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils import report
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

PEM_BODY = re.compile(r"-----BEGIN [A-Z ]+-----\s*[A-Za-z0-9+/]{16}")
COMMENTS = ("drguard mtls server", "drguard mtls probes", "drguard mtls stop")
ROTATION_CASES = ("old_ca_leaf_during_overlap", "after_ca_rotation", "old_ca_leaf_after_retirement",
                  "rotated_out_leaf")


def _text(command: dict) -> str:
    """A command's parameters with every base64 word decoded (what the instance would read)."""
    raw = json.dumps(command["Parameters"])
    out = [raw]
    for word in re.findall(r"[A-Za-z0-9+/=]{40,}", raw):
        try:
            out.append(base64.b64decode(word).decode())
        except ValueError:
            continue
    return "\n".join(out)


def test_on_the_emulator_commands_go_to_the_right_instances_without_keys_and_every_row_is_unknown(aws_env, aws,
                                                                                                monkeypatch):
    ssm, sm = aws("ssm"), aws("secretsmanager")
    # The emulator lists every instance under each command: which instances a command was sent to is read
    # where it is sent (the real run_command still runs).
    calls, real = [], _runtime_ec2.run_command

    def spy(client, instance_ids, commands, **kw):
        calls.append((kw.get("comment"), list(instance_ids)))
        return real(client, instance_ids, commands, **kw)

    monkeypatch.setattr(_runtime_ec2, "run_command", spy)
    drill_id, raw, _ = _world(aws, "mtlsec2", role=False)
    runtime = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not runtime.failed, runtime.get("msg")
    ids = {u["tier"]: u["instance_id"] for u in runtime["units"]}
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    try:
        res = run_module("runtime_mtls", {"drill_id": drill_id, "backend": "ec2", "boundary": raw,
                                          "command_timeout": 5})
        assert not res.failed, res.get("msg")
        # the netns case list where it applies: the allowed pair, then the refusals the instances can make
        assert [(r["case"], r["src"], r["dst"], r["address"], r["expected"]) for r in res["rows"]] == [
            ("allowed", "app", "db", "%s:5432" % runtime["units"][1]["address"], "allow"),
            ("no_client_certificate", "app", "db", "%s:5432" % runtime["units"][1]["address"], "deny"),
            ("another_drill_ca", "app", "db", "%s:5432" % runtime["units"][1]["address"], "deny"),
            ("identity_not_allowed:db", "db", "db", "127.0.0.1:5432", "deny"),
            # the rotation cases: the old CA's leaf (kept on app) during the overlap and after retirement, then
            # the db tier's rotated-out leaf (kept on db) over loopback
            ("old_ca_leaf_during_overlap", "app", "db", "%s:5432" % runtime["units"][1]["address"], "allow"),
            ("after_ca_rotation", "app", "db", "%s:5432" % runtime["units"][1]["address"], "allow"),
            ("old_ca_leaf_after_retirement", "app", "db", "%s:5432" % runtime["units"][1]["address"], "deny"),
            ("rotated_out_leaf", "db", "db", "127.0.0.1:5432", "deny")]
        # nothing ran: every row unknown, each a violation, none judged
        assert {r["observed"] for r in res["rows"]} == {"unknown"}
        assert res["violations"] == res["rows"] and res["unexpected"] == [] and res["handshakes"] == []
        assert all(r["reason"].startswith("no result (SSM command ") and "readiness line" in r["reason"]
                   for r in res["rows"])
        assert res["servers"][0]["tier"] == "db" and res["servers"][0]["instance_id"] == ids["db"]
        assert res["servers"][0]["serial"] is None
        # both rotations were driven and neither is proven: no instance confirmed a step (fail closed)
        car, rot = res["ca_rotation"], res["rotation"]
        assert car["rotated"] is False and rot["rotated"] is False
        assert car["reason"].startswith("not proven: the mTLS server of tier db did not confirm it listened; step "
                                        "ca_overlap_trust on app: SSM command "), car["reason"]
        assert "without confirming the certificate" in car["reason"]
        assert {(s["step"], s["confirmed"]) for s in car["steps"]} == {
            ("ca_overlap_trust", False), ("ca_new_leaves", False), ("ca_retire_old", False)}
        assert {s["tier"] for s in car["steps"]} == set(ids)
        assert rot["reason"].startswith("not proven: step held_connection on app: SSM command ") and \
            "the held connection's result did not come back" in rot["reason"], rot["reason"]
        assert (rot["dropped_connections"], rot["failed_handshakes"]) == (None, None)
        assert [s["step"] for s in rot["steps"]] == ["held_connection", "leaf_new", "leaf_revoke_old",
                                                     "leaf_revoke_old", "leaf_revoke_old", "held_connection_result"]
        # the runtime's CA key is in no secret (it was never stored): provable, so reported destroyed; the
        # phase's own CA (in the controller's tmpfs PKI) is destroyed when the phase ends
        assert car["old_ca_key_destroyed"] is True and car["new_ca_key_destroyed"] is True
        assert res["pki_destroyed"] == "/dev/shm/drguard-%s-mtls" % drill_id
        assert not os.path.lexists(res["pki_destroyed"])
        assert {o["case"] for o in res["omitted"]} == {"expired", "wrong_eku", "ca_true", "outside_trust_domain"}
        # every tier's secret holds the phase's CA (with its CRL) and a leaf of it, its drill's tags kept
        stored = {t: json.loads(sm.get_secret_value(SecretId="drguard/%s/runtime/%s" % (drill_id, t))["SecretString"])
                  for t in ids}
        for tier, bundle in stored.items():
            name = "drguard/%s/runtime/%s" % (drill_id, tier)
            ca_pem = bundle["ca_bundle"]
            assert ca_pem.count("BEGIN CERTIFICATE") == 1 and "BEGIN X509 CRL" in ca_pem
            new_ca = _pki.x509.load_pem_x509_certificate(ca_pem.encode())
            leaf = _pki.x509.load_pem_x509_certificate(bundle["cert"].encode())
            assert _pki.serial_hex(new_ca) == car["new_ca"] != car["old_ca"]
            assert _pki.check_leaf(leaf, [new_ca], drill_id, purpose="server") == (tier, None)
            tags = {t["Key"]: t["Value"] for t in sm.describe_secret(SecretId=name)["Tags"]}
            assert tags["drguard:drill-id"] == drill_id
        assert res["leaves"]["db"]["serial"] == rot["new_serial"] != rot["old_serial"]
        assert res["leaves"]["db"]["spiffe_id"] == _pki.spiffe_id(drill_id, "db")
        assert res["ca"]["serial"] == _pki.serial_hex(_pki.x509.load_pem_x509_certificate(
            stored["db"]["ca_bundle"].encode()))
        assert not PEM_BODY.search(json.dumps(res)) and "PRIVATE KEY" not in json.dumps(res)
        # the report reads it unchanged: the section, its rows and the rotation that did not happen
        section = report.mtls_section(res)
        assert section["probes"] == res["rows"] and section["violations"] == 8 and section["unexpected"] == 0
        assert section["ca"]["serial"] == res["ca"]["serial"]
        text = report.render_markdown({"drill_id": drill_id, "outcome": "halted", "started_at": "", "finished_at": "",
                                       "seconds": 0, "phases": [], "mtls": section})
        assert "| another_drill_ca | app | db | deny | unknown | no result (SSM command " in text
        assert "rotated False, dropped connections None" in text

        sent = [c for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before
                and c.get("Comment", "").startswith("drguard mtls")]
        where = {}
        for comment, instance_ids in calls:
            where.setdefault(comment, []).extend(instance_ids)
        assert sorted(c["Comment"] for c in sent) == sorted(c for c, i in calls for _ in i
                                                            if c.startswith("drguard mtls"))
        # the server on db only; the cases from app (the pair and three rotation cases) and db (its own identity
        # and its rotated-out leaf over loopback); every tier fetches its bundle in each of the 3 CA steps and the
        # revocation, db also its new leaf; the held connection started and read on app; db and app stopped
        assert sorted(where["drguard mtls server"]) == [ids["db"]]
        assert sorted(where["drguard mtls probes"]) == sorted([ids["app"]] * 4 + [ids["db"]] * 2)
        assert sorted(where["drguard mtls rotation"]) == sorted(list(ids.values()) * 4 + [ids["db"]])
        assert sorted(where["drguard mtls held connection"]) == [ids["app"]] * 2
        assert sorted(where["drguard mtls stop"]) == sorted([ids["db"], ids["app"]])
        # a rotation step names the tier's own secret only; the instance fetches it with its own role
        for c in sent:
            if c["Comment"] == "drguard mtls rotation":
                text = _text(c)
                assert len(set(re.findall(r"--secret-id (\S+)", text))) == 1, text[:300]
        for c in sent:
            text = _text(c)
            assert not PEM_BODY.search(text), c["Comment"]
            for bundle in stored.values():
                body = "".join(bundle["key"].strip().splitlines()[1:-1])
                assert body[:40] not in text.replace("\\n", "") and body[-40:] not in text, c["Comment"]
        # the server lives for a bounded time and the stop ends it and removes its directory
        server = _text(next(c for c in sent if c["Comment"] == "drguard mtls server"))
        assert "setsid timeout -s TERM -k 5 %d setpriv --reuid=65534" % (_mtls_ec2.ROUNDS * 5 + 60) in server
        stop = _text(next(c for c in sent if c["Comment"] == "drguard mtls stop"))
        assert "kill -TERM" in stop and "kill -KILL" in stop and "rm -rf /run/drguard/mtls" in stop
    finally:
        run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


def test_a_tier_without_an_instance_gets_unknown_rows_without_any_command(aws_env, aws):
    ssm, ec2 = aws("ssm"), aws("ec2")
    drill_id, raw, _ = _world(aws, "mtlsgone", role=False)
    runtime = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    try:
        ec2.terminate_instances(InstanceIds=[runtime["units"][1]["instance_id"]])  # db: the server's tier
        before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
        res = run_module("runtime_mtls", {"drill_id": drill_id, "backend": "ec2", "boundary": raw,
                                          "command_timeout": 5})
        assert not res.failed, res.get("msg")
        assert {r["reason"] for r in res["rows"]} == {"no result (no instance for this tier)"}
        assert len(res["violations"]) == len(res["rows"]) == 8
        sent = [c["Comment"] for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before]
        # no command to db, which has no instance: its steps are unconfirmed without one
        assert "drguard mtls server" not in sent and sent.count("drguard mtls probes") == 4
        assert {s["reason"] for s in res["ca_rotation"]["steps"] if s["tier"] == "db"} == {"no instance for this tier"}
        assert res["ca_rotation"]["rotated"] is False and res["rotation"]["rotated"] is False
    finally:
        run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


@pytest.mark.parametrize(("args", "message"), [
    ({"inject_allow": [{"from": "validation", "to": "db", "ports": [5432]}]},
     "runtime_mtls: inject_allow is not supported with backend ec2"),
    ({"command_timeout": 1}, "runtime_mtls: command_timeout 1.0 is outside 5-600 seconds"),
])
def test_bad_input_on_ec2_fails_before_any_command(aws_env, aws, args, message):
    ssm = aws("ssm")
    before = len(ssm.list_commands()["Commands"])
    res = run_module("runtime_mtls", dict({"drill_id": "t-mtlsbad-0123456789", "backend": "ec2",
                                           "boundary": {"production_cidrs": ["10.0.0.0/16"], "tiers": ["db"],
                                                        "egress": []}}, **args))
    assert res.failed and res["msg"].startswith(message), res["msg"]
    assert len(ssm.list_commands()["Commands"]) == before


def test_netns_still_needs_its_output_dir_and_ttl():
    res = run_module("runtime_mtls", {"drill_id": "t-mtlsnet-0123456789", "boundary": {}})
    assert res.failed and res["msg"] == "backend is netns but all of the following are missing: output_dir, ttl_minutes"


def test_the_phase_on_ec2_alerts_and_halts_on_unknown_rows(aws_env, aws, tmp_path):
    drill_id, raw, _ = _world(aws, "mtlsphase", role=False)
    runtime = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not runtime.failed, runtime.get("msg")
    alerts = tmp_path / "alerts.jsonl"
    play = [{"hosts": "localhost", "gather_facts": False,
             "module_defaults": {"group/drguard.sandbox.aws": {"region": "us-east-1"}},
             "vars": {"_drill_args": {"runtime": {"backend": "ec2"}, "ttl_minutes": 60,
                                      "mtls": {"leaf_lifetime": 900, "inject_allow": []}},
                      "drill_ctx": {"drill_id": drill_id, "output_dir": str(tmp_path)},
                      "_drill_live_boundary": raw,
                      "sandbox_runtime__output": {"prefix": "drguard-%s-" % drill_id, "collector": None},
                      "_drill_alert_sink": {"path": str(alerts)}},
             "tasks": [{"ansible.builtin.include_tasks": str(ROOT / "playbooks" / "phases" / "mtls.yml")}]}]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play))
    try:
        proc = subprocess.run(["ansible-playbook", str(path)], env=ansible_env(aws_env), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert "8 mTLS probe(s) observed otherwise than expected (allowed, no_client_certificate, another_drill_ca, " \
               "identity_not_allowed:db, %s)" % ", ".join(ROTATION_CASES) in proc.stdout, proc.stdout[-3000:]
        sent = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert [a["type"] for a in sent] == ["drguard.boundary.violated"]
        assert sent[0]["data"]["layer"] == "mtls"
        assert {v["observed"] for v in sent[0]["data"]["violations"]} == {"unknown"}
        assert "PRIVATE KEY" not in proc.stdout and not PEM_BODY.search(proc.stdout)
    finally:
        run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


# ---------------------------------------------------------------- the programs, run here as the agent would

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bundle(root: str, tier: str, ca, drill_id: str) -> str:
    leaf = _pki.issue_leaf(ca, drill_id, tier)
    path = os.path.join(root, "tls-" + tier)
    os.mkdir(path, 0o700)
    os.chown(path, 65534, 65534)
    for name, data in (("ca.pem", _pki.cert_pem(ca.cert)), ("cert.pem", _pki.cert_pem(leaf.cert)),
                       ("key.pem", _pki.key_pem(leaf.key))):
        fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fchown(fd, 65534, 65534)
        os.close(fd)
    return path


def _shell(lines: list) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0 or not all(os.path.exists(p) for p in (
    "/usr/bin/setpriv", "/usr/bin/python3", "/usr/bin/openssl", "/usr/bin/timeout", "/usr/bin/setsid")),
    reason="runs the instances' programs as the SSM agent would: root, setpriv, /usr/bin/python3 and openssl")
def test_the_generated_server_and_client_really_handshake_refuse_and_log_here():
    drill_id = "t-mtlsprog-0123456789"
    boundary = parse_boundary({"production_cidrs": ["10.0.0.0/16"], "tiers": ["app", "db"], "egress": [],
                               "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp",
                                               "ports": [_free_port()]}]})
    port = boundary.tier_rules[0].ports[0].start
    units = [{"tier": "app", "instance_id": "i-app", "address": "127.0.0.1"},
             {"tier": "db", "instance_id": "i-db", "address": "127.0.0.1"}]
    root = tempfile.mkdtemp(prefix="drguard-mtls-ec2-test-")
    os.chmod(root, 0o711)  # noqa: S103 - the workload uid reaches its own bundle directory below, nothing else
    server_dir = os.path.join(root, "server")
    try:
        ca = _pki.new_ca(drill_id, 3600)
        tls = {t: _bundle(root, t, ca, drill_id) for t in ("app", "db")}
        start = _shell(_mtls_ec2.server_commands(drill_id, "db", [port], boundary.tier_rules, lifetime=60,
                                                 tls_dir=tls["db"], server_dir=server_dir, address="127.0.0.1"))
        assert start.returncode == 0, start.stderr
        serial = _mtls_ec2.parse_ready(start.stdout, "db")
        with open(os.path.join(tls["db"], "cert.pem"), "rb") as handle:
            assert serial == _pki.serial_hex(_pki.x509.load_pem_x509_certificate(handle.read()))
        with open(os.path.join(server_dir, "server.pid"), encoding="ascii") as handle:
            pid = int(handle.read())
        # the server runs as the workload uid, not as root
        with open("/proc/%d/task/%d/children" % (pid, pid), encoding="ascii") as handle:
            child = handle.read().split()
        assert child, "timeout has no child"
        with open("/proc/%s/status" % child[0], encoding="ascii") as handle:
            assert re.search(r"^Uid:\s+65534\s", handle.read(), re.M)

        cases = _mtls_ec2.plan_cases(drill_id, boundary, units)
        clients = {}
        for runner in ("app", "db"):
            mine = [c for c in cases if c["runs_on"] == runner]
            line = _runtime_ec2.unprivileged_command(
                _mtls_ec2.CLIENT_SOURCE, _mtls_ec2.client_spec(drill_id, mine, timeout=5, tls_dir=tls[runner]))
            proc = _shell([line])
            clients[runner] = {"rows": _mtls_ec2.parse_client(proc.stdout, len(mine)), "error": proc.stderr[-300:]}
            assert clients[runner]["rows"] is not None, proc.stderr
        stop = _shell(_mtls_ec2.stop_commands(server_dir=server_dir))
        assert stop.returncode == 0, stop.stderr
        events = _mtls_ec2.parse_events(stop.stdout)
        # stopped and its directory removed: nothing stays running
        assert not os.path.exists("/proc/%d" % pid) and not os.path.exists(server_dir)

        rows = _mtls_ec2.build_rows(cases, {"db": {"ready": serial, "events": events}}, clients)
        assert [(r["case"], r["observed"], r["reason"]) for r in rows] == [
            ("allowed", "allow", "round_trip"),
            ("no_client_certificate", "deny", "no_client_certificate"),
            ("another_drill_ca", "deny", "unknown_ca"),
            ("identity_not_allowed:db", "deny", "identity_not_allowed")]
        assert all(r["reason"] == r["expected_reason"] for r in rows)
        assert rows[0]["peer_id"] == _pki.spiffe_id(drill_id, "app") and rows[0]["server_serial"] == serial
        assert rows[3]["peer_id"] == _pki.spiffe_id(drill_id, "db")
        # the server's log: one event per handshake, accepted or refused, with its reason
        assert [(e["accepted"], e["reason"]) for e in events] == [
            (True, "allowed"), (False, "no_client_certificate"), (False, "unknown_ca"),
            (False, "identity_not_allowed")]
        # the minted foreign CA and key stayed in the client's scratch directory, which is gone
        assert not [n for n in os.listdir("/tmp") if n.startswith("drguard-mtls-") and os.stat(
            os.path.join("/tmp", n)).st_uid == 65534]
    finally:
        pid_file = os.path.join(server_dir, "server.pid")
        if os.path.exists(pid_file):
            with open(pid_file, encoding="ascii") as handle:
                try:
                    os.kill(int(handle.read()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the rotations, every instance program run here

_RUN = "/run/drguard/"
_B64_WORD = re.compile(r"[A-Za-z0-9+/=]{40,}")
_FAKE_AWS = r'''#!/usr/bin/python3 -I
import json, sys
args = sys.argv[1:]
name = args[args.index("--secret-id") + 1]
with open(%r, encoding="utf-8") as handle:
    print(json.load(handle)[name])
'''


class _LocalInstances:
    """SSM Run Command as the agent would run it, on this host: each instance is a directory standing in for its
    root (``/run/drguard/...`` of the commands lives under it, also inside their base64 payloads), the server
    listens on 127.0.0.1 instead of every address, and ``aws secretsmanager get-secret-value`` reads the
    controller's secrets (what the instance's own role would fetch). ``sent`` keeps every command as sent."""

    def __init__(self, roots: dict, env: dict):
        self.roots, self.env, self.results, self.sent = roots, env, {}, []

    def _local(self, text: str, root: str) -> str:
        def word(match):
            try:
                plain = base64.b64decode(match.group(0), validate=True).decode()
            except ValueError:
                return match.group(0)
            if _RUN not in plain and '"address": "0.0.0.0"' not in plain:
                return match.group(0)
            plain = plain.replace(_RUN, root + _RUN).replace('"address": "0.0.0.0"', '"address": "127.0.0.1"')
            return base64.b64encode(plain.encode()).decode()
        return _B64_WORD.sub(word, text).replace(" " + _RUN, " " + root + _RUN)

    def send_command(self, InstanceIds, Parameters, Comment, **kw):  # noqa: N803 - boto3's names
        cid = "c-%d" % len(self.sent)
        self.sent.append({"CommandId": cid, "InstanceIds": InstanceIds, "Comment": Comment, "Parameters": Parameters})
        for iid in InstanceIds:
            script = self._local("\n".join(Parameters["commands"]), self.roots[iid])
            proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=self.env)
            self.results[(cid, iid)] = {"Status": "Success" if proc.returncode == 0 else "Failed",
                                        "ResponseCode": proc.returncode, "StandardOutputContent": proc.stdout,
                                        "StandardErrorContent": proc.stderr}
        return {"Command": {"CommandId": cid}}

    def get_command_invocation(self, CommandId, InstanceId):  # noqa: N803
        return self.results[(CommandId, InstanceId)]


class _LocalSecrets:
    """The drill's secret store for the test: values by name, mirrored into a root-only file the fake ``aws``
    command reads."""

    class meta:  # noqa: N801 - boto3's client.meta
        region_name = "eu-west-1"

    def __init__(self, path: str, values: dict, stale=()):
        self.path, self.values, self.puts, self.stale = path, dict(values), [], set(stale)
        self.first = dict(values)
        self._write()

    def _write(self):
        # a stale secret: its instance keeps reading the first value, whatever was put (a lost update)
        seen = {k: (self.first[k] if k in self.stale else v) for k, v in self.values.items()}
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(seen, handle)

    def get_secret_value(self, SecretId):  # noqa: N803
        return {"SecretString": self.values[SecretId]}

    def put_secret_value(self, SecretId, SecretString):  # noqa: N803
        assert SecretId in self.values, "the phase puts only into the runtime's secrets"
        self.values[SecretId] = SecretString
        self.puts.append(SecretId)
        self._write()


def _instance_bundle(root: str, ca, drill_id: str, tier: str) -> dict:
    leaf = _pki.issue_leaf(ca, drill_id, tier)
    bundle = {"ca_bundle": _pki.cert_pem(ca.cert).decode(), "cert": _pki.cert_pem(leaf.cert).decode(),
              "key": _pki.key_pem(leaf.key).decode()}
    tls = root + _runtime_ec2.CERT_DIR
    os.makedirs(os.path.dirname(tls), mode=0o755)
    os.mkdir(tls, 0o700)
    os.chown(tls, 65534, 65534)
    for name, key in (("ca.pem", "ca_bundle"), ("cert.pem", "cert"), ("key.pem", "key")):
        fd = os.open(os.path.join(tls, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, bundle[key].encode())
        os.fchown(fd, 65534, 65534)
        os.close(fd)
    return bundle


def _serial(pem: str) -> str:
    return _pki.serial_hex(_pki.x509.load_pem_x509_certificate(pem.encode()))


def _processes_of(root: str) -> list:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                if root.encode() in handle.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _remove_world(tmp: str, drill_id: str) -> None:
    """Whatever a rotation test left: the instances' processes, the phase's PKI, the instances' roots."""
    for pid in _processes_of(tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _mtls_ec2._mtls_drill.destroy(drill_id)  # noqa: SLF001
    shutil.rmtree(tmp, ignore_errors=True)


def _rotation_world(tmp: str, drill_id: str, stale=()):
    port = _free_port()
    boundary = parse_boundary({"production_cidrs": ["10.0.0.0/16"], "tiers": ["app", "db"], "egress": [],
                               "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [port]}]})
    tiers = _runtime_ec2.runtime_tiers(boundary)
    units = [{"tier": t, "instance_id": "i-" + t, "address": "127.0.0.1"} for t in tiers]
    roots = {}
    for t in tiers:
        roots["i-" + t] = os.path.join(tmp, "i-" + t)
        os.mkdir(roots["i-" + t], 0o755)
    ca = _pki.new_ca(drill_id, 3600)
    bundles = {t: _instance_bundle(roots["i-" + t], ca, drill_id, t) for t in tiers}
    control = os.path.join(tmp, "control")
    os.mkdir(control, 0o700)
    bindir = os.path.join(tmp, "bin")
    os.mkdir(bindir, 0o755)
    secrets_file = os.path.join(control, "secrets.json")
    with open(os.path.join(bindir, "aws"), "w", encoding="utf-8") as handle:
        handle.write(_FAKE_AWS % secrets_file)
    os.chmod(os.path.join(bindir, "aws"), 0o700)
    sm = _LocalSecrets(secrets_file, {_runtime_ec2.certificate_secret_name(drill_id, t): json.dumps(b)
                                      for t, b in bundles.items()},
                       stale=[_runtime_ec2.certificate_secret_name(drill_id, t) for t in stale])
    ssm = _LocalInstances(roots, {"PATH": bindir + ":/usr/bin:/bin"})
    return boundary, units, roots, ca, bundles, sm, ssm


ROOT_TOOLS = pytest.mark.skipif(os.geteuid() != 0 or not all(os.path.exists(p) for p in (
    "/usr/bin/setpriv", "/usr/bin/python3", "/usr/bin/openssl", "/usr/bin/timeout", "/usr/bin/setsid",
    "/usr/bin/sha256sum", "/dev/shm")), reason="runs the instances' programs as the SSM agent would: root, setpriv, "
                                              "/usr/bin/python3, openssl and a /dev/shm for the controller's PKI")


@ROOT_TOOLS
def test_the_rotations_run_on_the_instances_programs_here_and_prove_what_the_netns_phase_proves():
    drill_id = "t-mtlsrot-%s" % os.urandom(5).hex()
    tmp = tempfile.mkdtemp(prefix="drguard-mtls-rot-test-")
    os.chmod(tmp, 0o711)  # noqa: S103 - the workload uid reaches its instance's bundle directory, nothing else
    try:
        boundary, units, roots, ca, bundles, sm, ssm = _rotation_world(tmp, drill_id)
        res = _mtls_ec2.run(ssm, sm, drill_id, boundary, units, timeout=5, command_timeout=60, leaf_lifetime=600,
                            poll=0.05)
        rows = {r["case"]: r for r in res["rows"]}
        assert [(r["case"], r["observed"], r["reason"]) for r in res["rows"]] == [
            ("allowed", "allow", "round_trip"),
            ("no_client_certificate", "deny", "no_client_certificate"),
            ("another_drill_ca", "deny", "unknown_ca"),
            ("identity_not_allowed:db", "deny", "identity_not_allowed"),
            ("old_ca_leaf_during_overlap", "allow", "round_trip"),
            ("after_ca_rotation", "allow", "round_trip"),
            ("old_ca_leaf_after_retirement", "deny", "unknown_ca"),
            ("rotated_out_leaf", "deny", "revoked")], [(r["case"], r["reason"]) for r in res["rows"]]
        assert res["violations"] == [] and res["unexpected"] == []
        car, rot = res["ca_rotation"], res["rotation"]
        assert car["rotated"] is True and "reason" not in car, car.get("reason")
        assert car["old_ca"] == _pki.serial_hex(ca.cert) and car["new_ca"] not in (None, car["old_ca"])
        assert car["old_ca_key_destroyed"] is True and car["new_ca_key_destroyed"] is True
        assert all(s["confirmed"] for s in car["steps"])
        assert [s["step"] for s in car["steps"]] == ["ca_overlap_trust"] * 3 + ["ca_new_leaves"] * 3 + [
            "ca_retire_old"] * 3
        # the old CA's leaf presented during the overlap is the app tier's runtime leaf, kept on its instance
        assert rows["old_ca_leaf_during_overlap"]["serial"] == _serial(bundles["app"]["cert"])
        assert rows["old_ca_leaf_after_retirement"]["serial"] is None  # refused by OpenSSL before our code
        final = {t: json.loads(sm.values[_runtime_ec2.certificate_secret_name(drill_id, t)]) for t in bundles}
        assert rows["after_ca_rotation"]["server_serial"] == car["new_server_serial"] != _serial(bundles["db"]["cert"])
        # the leaf rotation with the held connection: never dropped, no failed handshake, old then new serial
        assert rot["rotated"] is True and "reason" not in rot, rot.get("reason")
        assert (rot["dropped_connections"], rot["failed_handshakes"]) == (0, 0)
        assert rot["held_round_trips"] >= 2 and rot["held_serial"] == rot["old_serial"] == car["new_server_serial"]
        assert rot["new_serials"] == [rot["old_serial"], rot["new_serial"]]
        assert rot["new_serial"] == _serial(final["db"]["cert"]) and rot["pair"].startswith("app->db:")
        # the rotated-out leaf: the db tier's leaf before the rotation, kept on its instance, refused as revoked
        assert (rows["rotated_out_leaf"]["src"], rows["rotated_out_leaf"]["address"].split(":")[0]) == (
            "db", "127.0.0.1")
        # every tier's secret ends with the phase's CA and its CRL, and a leaf of that CA
        for tier, bundle in final.items():
            assert bundle["ca_bundle"].count("BEGIN CERTIFICATE") == 1 and "BEGIN X509 CRL" in bundle["ca_bundle"]
            assert _serial(bundle["ca_bundle"]) == car["new_ca"] == res["ca"]["serial"]
            assert res["leaves"][tier]["serial"] == _serial(bundle["cert"])
        # no key in any command, the controller's PKI destroyed, nothing left running or kept on an instance
        for command in ssm.sent:
            text = _text(command)
            assert "PRIVATE KEY" not in text and not PEM_BODY.search(text), command["Comment"]
        assert not PEM_BODY.search(json.dumps(res)) and "PRIVATE KEY" not in json.dumps(res)
        assert res["pki_destroyed"] and not os.path.lexists(res["pki_destroyed"])
        assert _processes_of(tmp) == []
        for root in roots.values():
            assert not os.path.lexists(root + _mtls_ec2.SERVER_DIR) and not os.path.lexists(root + _mtls_ec2.SOAK_DIR)
            assert sorted(os.listdir(root + _runtime_ec2.CERT_DIR)) == ["ca.pem", "cert.pem", "key.pem"]
        # the reloads and the handshakes in the result: every refusal is one of the cases', none during the soak
        refused = [h["reason"] for h in res["handshakes"] if not h["accepted"]]
        assert sorted(refused) == sorted(["no_client_certificate", "unknown_ca", "identity_not_allowed",
                                          "unknown_ca", "revoked"])
    finally:
        _remove_world(tmp, drill_id)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="the phase's PKI lives on /dev/shm")
def test_teardown_on_ec2_destroys_the_phases_pki_a_killed_phase_left(aws_env):
    drill_id = "t-mtlskill-%s" % os.urandom(5).hex()
    root = _mtls_ec2._mtls_drill.root_dir(drill_id)  # noqa: SLF001
    store = _pki.Store(drill_id, os.path.join(root, "pki"))
    try:
        store.present(["app"], 3600)  # what the phase holds while it runs: the CA key among it
        key = next(n for n in os.listdir(store.dir) if n.startswith("ca-") and n.endswith(".key"))
        assert os.path.exists(os.path.join(store.dir, key))
        out = run_module("drill_teardown", {"drill_id": drill_id, "runtime_backend": "ec2"})
        assert not out.failed, out.get("msg")
        assert out["steps"]["runtime"]["pki_destroyed"] == root and not os.path.lexists(root)
        # nothing left: the step has nothing to do for ec2 the second time
        again = run_module("drill_teardown", {"drill_id": drill_id, "runtime_backend": "ec2"})
        assert not again.failed and not (again["steps"].get("runtime") or {}).get("pki_destroyed")
    finally:
        _mtls_ec2._mtls_drill.destroy(drill_id)  # noqa: SLF001


@ROOT_TOOLS
def test_a_tier_that_keeps_fetching_its_old_bundle_leaves_both_rotations_unproven_here():
    drill_id = "t-mtlsstale-%s" % os.urandom(5).hex()
    tmp = tempfile.mkdtemp(prefix="drguard-mtls-rot-test-")
    os.chmod(tmp, 0o711)  # noqa: S103 - the workload uid reaches its instance's bundle directory, nothing else
    try:
        boundary, units, _roots, _ca, _bundles, sm, ssm = _rotation_world(tmp, drill_id, stale=["db"])
        res = _mtls_ec2.run(ssm, sm, drill_id, boundary, units, timeout=5, command_timeout=60, leaf_lifetime=600,
                            poll=0.05)
        car, rot = res["ca_rotation"], res["rotation"]
        # the db instance fetched, the server reloaded, but what it holds is not what was put: never confirmed;
        # app, with a leaf of the new CA, cannot hold a connection to a db that still trusts only the old one
        assert {(s["step"], s["tier"]) for s in car["steps"] + rot["steps"] if not s["confirmed"]} == {
            ("ca_overlap_trust", "db"), ("ca_new_leaves", "db"), ("ca_retire_old", "db"), ("held_connection", "app"),
            ("leaf_new", "db"), ("leaf_revoke_old", "db")}
        assert rot["dropped_connections"] == 1
        assert car["rotated"] is False and car["reason"].startswith(
            "not proven: step ca_overlap_trust on db: SSM command c-"), car["reason"]
        assert "without confirming the CA bundle" in car["reason"]
        assert "step ca_new_leaves on db: SSM command " in car["reason"] and \
            "without confirming the certificate" in car["reason"]
        assert rot["rotated"] is False and "step leaf_new on db: SSM command " in rot["reason"]
        assert "no new handshake during the rotation presented the new serial %s" % rot["new_serial"] in rot["reason"]
        # what really happened shows in the rows too: db kept its old CA and leaf, so app, which trusts only the
        # new CA, gets no round trip with its new leaf after the CA rotation
        rows = {r["case"]: r for r in res["rows"]}
        assert rows["after_ca_rotation"]["observed"] == "deny" and rows["after_ca_rotation"] in res["violations"]
        assert _processes_of(tmp) == [] and not os.path.lexists(_mtls_ec2._mtls_drill.root_dir(drill_id))  # noqa: SLF001
    finally:
        _remove_world(tmp, drill_id)
