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
            ("identity_not_allowed:db", "db", "db", "127.0.0.1:5432", "deny")]
        # nothing ran: every row unknown, each a violation, none judged
        assert {r["observed"] for r in res["rows"]} == {"unknown"}
        assert res["violations"] == res["rows"] and res["unexpected"] == [] and res["handshakes"] == []
        assert all(r["reason"].startswith("no result (SSM command ") and "readiness line" in r["reason"]
                   for r in res["rows"])
        assert res["servers"][0]["tier"] == "db" and res["servers"][0]["instance_id"] == ids["db"]
        assert res["servers"][0]["serial"] is None
        # rotation not driven on ec2: reported not proven, never a pass
        assert res["rotation"]["rotated"] is False and "not proven" in res["rotation"]["reason"]
        assert res["ca_rotation"]["rotated"] is False and res["ca_rotation"]["old_ca_key_destroyed"] is None
        assert {o["case"] for o in res["omitted"]} >= {"expired", "wrong_eku", "ca_true", "outside_trust_domain"}
        # the report's CA and leaves are the stored bundles' public parts; no key in the result
        stored = {t: json.loads(sm.get_secret_value(SecretId="drguard/%s/runtime/%s" % (drill_id, t))["SecretString"])
                  for t in ids}
        assert res["leaves"]["db"]["spiffe_id"] == _pki.spiffe_id(drill_id, "db")
        assert res["ca"]["serial"] == _pki.serial_hex(_pki.x509.load_pem_x509_certificate(
            stored["db"]["ca_bundle"].encode()))
        assert not PEM_BODY.search(json.dumps(res)) and "PRIVATE KEY" not in json.dumps(res)
        # the report reads it unchanged: the section, its rows and the rotation that did not happen
        section = report.mtls_section(res)
        assert section["probes"] == res["rows"] and section["violations"] == 4 and section["unexpected"] == 0
        assert section["ca"]["serial"] == res["ca"]["serial"]
        text = report.render_markdown({"drill_id": drill_id, "outcome": "halted", "started_at": "", "finished_at": "",
                                       "seconds": 0, "phases": [], "mtls": section})
        assert "| another_drill_ca | app | db | deny | unknown | no result (SSM command " in text
        assert "rotated False, dropped connections None" in text

        sent = [c for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before
                and c.get("Comment") in COMMENTS]
        assert sorted(c["Comment"] for c in sent) == sorted(COMMENTS + ("drguard mtls probes",))
        where = {}
        for comment, instance_ids in calls:
            where.setdefault(comment, []).extend(instance_ids)
        # the server on db only; the cases from app (the pair) and db (its own identity over loopback); db stopped
        assert sorted(where["drguard mtls server"]) == [ids["db"]]
        assert sorted(where["drguard mtls probes"]) == sorted([ids["app"], ids["db"]])
        assert sorted(where["drguard mtls stop"]) == [ids["db"]]
        for c in sent:
            text = _text(c)
            assert not PEM_BODY.search(text), c["Comment"]
            for bundle in stored.values():
                body = "".join(bundle["key"].strip().splitlines()[1:-1])
                assert body[:40] not in text.replace("\\n", "") and body[-40:] not in text, c["Comment"]
        # the server lives for a bounded time and the stop ends it and removes its directory
        server = _text(next(c for c in sent if c["Comment"] == "drguard mtls server"))
        assert "setsid timeout -s TERM -k 5 75 setpriv --reuid=65534" in server
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
        assert len(res["violations"]) == len(res["rows"]) == 4
        sent = [c["Comment"] for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before]
        assert sent == ["drguard mtls probes"]  # only app, which has an instance, ran its cases
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
        assert "4 mTLS probe(s) observed otherwise than expected (allowed, no_client_certificate, another_drill_ca, " \
               "identity_not_allowed:db)" in proc.stdout, proc.stdout[-3000:]
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
