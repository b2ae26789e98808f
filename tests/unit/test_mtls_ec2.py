"""The mtls phase on the ec2 runtime, without AWS: the case plan, the commands, reading the outputs, the rows."""

from __future__ import annotations

import base64
import json
import re

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

DRILL = "t-unit-0123456789"
BOUNDARY = parse_boundary({
    "production_cidrs": ["10.0.0.0/16"],
    "tiers": ["app", "db", "cache"],
    "egress": [],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]},
                   {"from": "app", "to": "cache", "protocol": "tcp", "ports": ["6379-6380"]},
                   {"from": "db", "to": "db", "protocol": "tcp", "ports": [7000]}],
})
UNITS = [{"tier": "app", "instance_id": "i-app", "address": "10.20.0.10"},
         {"tier": "db", "instance_id": "i-db", "address": "10.20.0.20"},
         {"tier": "cache", "instance_id": "i-cache", "address": "10.20.1.30"},
         {"tier": "validation", "instance_id": "i-val", "address": "10.20.1.40"}]
# The keys of a netns mtls row (_mtls_drill.Phase.probe): the report and the phase read these.
# A PEM block with a body (the programs name the markers, but carry no certificate or key).
PEM_BODY = re.compile(r"-----BEGIN [A-Z ]+-----\s*[A-Za-z0-9+/]{16}")
ROW_KEYS = {"src", "dst", "address", "layer", "case", "expected", "observed", "reason", "expected_reason",
            "latency_ms", "peer_id", "serial", "server_serial"}


def _decoded(line: str) -> str:
    """Every base64 word of a shell line decoded, so a test can read what travels inside."""
    out = [line]
    for word in re.findall(r"[A-Za-z0-9+/=]{40,}", line):
        try:
            out.append(base64.b64decode(word).decode())
        except ValueError:
            continue
    return "\n".join(out)


def test_plan_every_allowed_pair_then_the_refusals_against_the_first():
    cases = _mtls_ec2.plan_cases(DRILL, BOUNDARY, UNITS)
    got = [(c["case"], c["src"], c["dst"], c["port"], c["runs_on"], c["address"], c["identity"], c["expected"],
            c["expected_reason"]) for c in cases]
    assert got == [
        ("allowed", "app", "db", 5432, "app", "10.20.0.20", "own", "allow", "round_trip"),
        ("allowed", "app", "cache", 6379, "app", "10.20.1.30", "own", "allow", "round_trip"),
        ("allowed", "app", "cache", 6380, "app", "10.20.1.30", "own", "allow", "round_trip"),
        ("allowed", "db", "db", 7000, "db", "10.20.0.20", "own", "allow", "round_trip"),
        ("no_client_certificate", "app", "db", 5432, "app", "10.20.0.20", "none", "deny", "no_client_certificate"),
        ("another_drill_ca", "app", "db", 5432, "app", "10.20.0.20", "foreign", "deny", "unknown_ca"),
        # db may not reach itself on 5432: its own identity, from its own instance over loopback
        ("identity_not_allowed:db", "db", "db", 5432, "db", "127.0.0.1", "own", "deny", "identity_not_allowed"),
    ]
    foreign = cases[5]["foreign_uri"]
    assert foreign.startswith("spiffe://dr-other-") and foreign.endswith(".drguard.internal/tier/app")
    assert DRILL not in foreign


def test_plan_has_no_identity_case_when_the_destination_may_reach_itself():
    boundary = parse_boundary({"production_cidrs": ["10.0.0.0/16"], "tiers": ["db"], "egress": [],
                               "tier_rules": [{"from": "db", "to": "db", "protocol": "tcp", "ports": [5432]}]})
    assert [c["case"] for c in _mtls_ec2.plan_cases(DRILL, boundary, UNITS)] == [
        "allowed", "no_client_certificate", "another_drill_ca"]


def test_servers_on_every_tcp_rule_destination_with_both_ends_of_a_range():
    assert _mtls_ec2.server_ports(BOUNDARY) == {"db": [5432, 7000], "cache": [6379, 6380]}


def test_omitted_cases_say_why_and_are_exactly_the_netns_cases_that_need_a_probe_certificate():
    omitted = {o["case"]: o["reason"] for o in _mtls_ec2.omitted_cases()}
    # the rotation cases run on ec2 now; only the certificates made for a probe alone would need a key to travel
    assert set(omitted) == {"expired", "outside_trust_domain", "wrong_eku", "ca_true"}
    assert "only a tier's own bundle travels to an instance" in omitted["expired"]


def test_server_command_runs_unprivileged_in_the_background_with_a_lifetime_and_no_key_material():
    lines = _mtls_ec2.server_commands(DRILL, "db", [5432, 7000], BOUNDARY.tier_rules, lifetime=240)
    start = next(line for line in lines if line.startswith("setsid "))
    assert start.startswith("setsid timeout -s TERM -k 5 240 " + _runtime_ec2.UNPRIVILEGED + " /usr/bin/python3 -I -S")
    assert start.endswith("< /dev/null &")
    text = "\n".join(_decoded(line) for line in lines)
    config = json.loads(next(w for w in text.splitlines() if w.startswith("{")))
    assert config["identity"] == ["/run/drguard/tls/cert.pem", "/run/drguard/tls/key.pem"]
    assert config["trust"] == "/run/drguard/tls/ca.pem" and config["ports"] == [5432, 7000]
    assert config["rules"][0] == {"from": "app", "to": "db", "ports": [[5432, 5432]]}
    assert not PEM_BODY.search(text)
    assert "echo \"drguard-mtls-ready db $(grep" in lines[-1]


def test_client_and_stop_commands_carry_no_key_material():
    cases = _mtls_ec2.plan_cases(DRILL, BOUNDARY, UNITS)
    text = "\n".join(_decoded(line) for line in _mtls_ec2.client_commands(DRILL, cases, timeout=5)
                     + _mtls_ec2.stop_commands())
    assert not PEM_BODY.search(text) and "PRIVATE KEY" not in text
    assert _runtime_ec2.UNPRIVILEGED in text and "/run/drguard/tls" in text
    assert _mtls_ec2.stop_commands()[-1] == "rm -rf /run/drguard/mtls"


def test_parse_ready_needs_the_tier_and_a_serial():
    assert _mtls_ec2.parse_ready("x\ndrguard-mtls-ready db serial 0A1B\n", "db") == "0A1B"
    assert _mtls_ec2.parse_ready("drguard-mtls-ready app serial 0A1B\n", "db") is None
    assert _mtls_ec2.parse_ready("drguard-mtls-ready db \n", "db") is None
    assert _mtls_ec2.parse_ready("", "db") is None


def test_parse_client_wants_exactly_one_dict_per_case():
    assert _mtls_ec2.parse_client('noise\n[{"ok": true}, {"ok": false}]\n', 2) == [{"ok": True}, {"ok": False}]
    assert _mtls_ec2.parse_client('[{"ok": true}]', 2) is None
    assert _mtls_ec2.parse_client('[{"ok": true}, {"ok": fal', 2) is None  # cut output
    assert _mtls_ec2.parse_client('[1, 2]', 2) is None
    assert _mtls_ec2.parse_client("", 0) is None


def test_parse_events_needs_the_marked_line_whole():
    assert _mtls_ec2.parse_events('drguard-mtls-events [{"port": 1}]\n') == [{"port": 1}]
    assert _mtls_ec2.parse_events("drguard-mtls-events []") == []
    assert _mtls_ec2.parse_events('drguard-mtls-events [{"port": 1}') is None
    assert _mtls_ec2.parse_events("drguard-mtls-events null") is None  # no events file on the instance
    assert _mtls_ec2.parse_events("") is None


def _cases():
    return [c for c in _mtls_ec2.plan_cases(DRILL, BOUNDARY, UNITS) if c["dst"] == "db" and c["port"] == 5432]


def _answers():
    clients = {"app": {"rows": [
        {"ok": True, "reason": "round_trip", "handshake_ms": 3.0, "server_serial": "D1",
         "local": ["10.20.0.10", 40001]},
        {"ok": False, "reason": "closed_by_peer", "server_serial": "D1", "local": ["10.20.0.10", 40002]},
        {"ok": False, "reason": "unknown_ca", "server_serial": "D1", "local": ["10.20.0.10", 40003]}]},
        "db": {"rows": [{"ok": False, "reason": "closed_by_peer", "server_serial": "D1",
                         "local": ["127.0.0.1", 40004]}]}}
    events = [
        {"port": 5432, "peer_address": "10.20.0.10", "peer_port": 40003, "reason": "unknown_ca", "peer_id": None,
         "serial": None},
        {"port": 5432, "peer_address": "10.20.0.10", "peer_port": 40002, "reason": "no_client_certificate",
         "peer_id": None, "serial": None},
        {"port": 5432, "peer_address": "10.20.0.10", "peer_port": 40001, "reason": "allowed",
         "peer_id": "spiffe://x/tier/app", "serial": "A1"},
        {"port": 5432, "peer_address": "127.0.0.1", "peer_port": 40004, "reason": "identity_not_allowed",
         "peer_id": "spiffe://x/tier/db", "serial": "D1"}]
    return clients, {"db": {"ready": "D1", "events": events}}


def test_rows_take_the_servers_reason_matched_by_address_and_port_not_by_order():
    clients, servers = _answers()
    rows = _mtls_ec2.build_rows(_cases(), servers, clients)
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [(r["case"], r["observed"], r["reason"], r["peer_id"], r["serial"]) for r in rows] == [
        ("allowed", "allow", "round_trip", "spiffe://x/tier/app", "A1"),
        ("no_client_certificate", "deny", "no_client_certificate", None, None),
        ("another_drill_ca", "deny", "unknown_ca", None, None),
        ("identity_not_allowed:db", "deny", "identity_not_allowed", "spiffe://x/tier/db", "D1")]
    assert rows[0]["address"] == "10.20.0.20:5432" and rows[3]["address"] == "127.0.0.1:5432"
    assert all(r["layer"] == "mtls" for r in rows) and rows[0]["latency_ms"] == 3.0


def test_a_refusal_without_its_server_event_keeps_the_clients_reason_and_is_unexpected():
    clients, servers = _answers()
    servers["db"]["events"] = servers["db"]["events"][:1] + servers["db"]["events"][2:]  # the 40002 event lost
    row = _mtls_ec2.build_rows(_cases(), servers, clients)[1]
    assert (row["observed"], row["reason"], row["expected_reason"]) == ("deny", "closed_by_peer",
                                                                       "no_client_certificate")


def test_every_row_is_unknown_without_a_server_a_client_result_or_the_servers_events():
    clients, servers = _answers()
    for broken_servers, broken_clients, why in (
            ({"db": {"ready": None, "error": "SSM command c-1 on i-db ended Success without the server's readiness "
                                             "line"}}, clients, "without the server's readiness line"),
            (servers, {"app": {"rows": None, "error": "SSM command c-2 on i-app ended TimedOut"}, "db": clients["db"]},
             "ended TimedOut"),
            ({"db": {"ready": "D1", "events": None, "events_error": "no handshake events"}}, clients,
             "no handshake events"),
            ({}, clients, "no mTLS server for this tier")):
        rows = _mtls_ec2.build_rows(_cases(), broken_servers, broken_clients)
        touched = rows if why != "ended TimedOut" else rows[:3]
        assert {r["observed"] for r in touched} == {"unknown"}, why
        assert all(why in r["reason"] and r["reason"].startswith("no result (") for r in touched), why
        assert all(r["peer_id"] is None and r["serial"] is None for r in touched)


def test_the_instance_programs_parse_as_the_amis_python_3_9():
    import ast

    for source in (_mtls_ec2.SERVER_SOURCE, _mtls_ec2.CLIENT_SOURCE, _mtls_ec2._COLLECT_SOURCE):  # noqa: SLF001
        ast.parse(source, feature_version=(3, 9))


def test_the_servers_events_are_read_beyond_the_default_2000_character_cut():
    events = "drguard-mtls-events " + json.dumps([{"port": 5432, "peer_port": n} for n in range(200)])
    assert _runtime_ec2.OUTPUT_LIMIT < len(events) < _mtls_ec2.SSM_OUTPUT_LIMIT

    class Finished:  # SSM's answer for a command that ended with a long output
        def send_command(self, **kw):
            return {"Command": {"CommandId": "c-1"}}

        def get_command_invocation(self, **kw):
            return {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": events}

    res = _mtls_ec2._command(Finished(), "i-1", ["true"], timeout=5, comment="t", sleep=lambda s: None)  # noqa: SLF001
    assert _mtls_ec2.parse_events(res["stdout"]) == [{"port": 5432, "peer_port": n} for n in range(200)]
    short = _runtime_ec2.run_command(Finished(), ["i-1"], ["true"], timeout=5, sleep=lambda s: None)[0]
    assert _mtls_ec2.parse_events(short["stdout"]) is None  # cut: never read as a partial list


# ---------------------------------------------------------------- rotation: the steps' outputs, the verdicts

def test_parse_reloaded_needs_the_tier_ok_and_a_serial():
    assert _mtls_ec2.parse_reloaded("x\ndrguard-mtls-reloaded db ok true serial 0A1B\n", "db") == (True, "0A1B")
    assert _mtls_ec2.parse_reloaded("drguard-mtls-reloaded db ok false serial 0A1B", "db") == (False, "0A1B")
    assert _mtls_ec2.parse_reloaded("drguard-mtls-reloaded app ok true serial 0A1B", "db") is None
    assert _mtls_ec2.parse_reloaded("drguard-mtls-reloaded db ok true serial", "db") is None
    assert _mtls_ec2.parse_reloaded("", "db") is None


def test_parse_trust_wants_a_whole_sha256():
    sha = "ab" * 32
    assert _mtls_ec2.parse_trust("delivered x\ndrguard-mtls-trust %s\n" % sha) == sha
    assert _mtls_ec2.parse_trust("drguard-mtls-trust %s" % sha[:-2]) is None  # cut
    assert _mtls_ec2.parse_trust("drguard-mtls-trust ") is None  # sha256sum found no file
    assert _mtls_ec2.parse_trust("") is None


def _soak(**over):
    out = {"held": {"serial": "L1", "round_trips": 9, "failures": [], "local": ["10.20.0.10", 40100]},
           "new": {"handshakes": 9, "failures": [], "serials": ["L1", "L2"]}, "started": 1000.0, "ended": 1010.0}
    out.update(over)
    return out


def test_parse_soak_and_its_holding_line():
    assert _mtls_ec2.parse_soak_holding("drguard-mtls-soak holding serial 0A1B\n") == "0A1B"
    assert _mtls_ec2.parse_soak_holding("drguard-mtls-soak holding \n") is None
    assert _mtls_ec2.parse_soak("drguard-mtls-soak-result " + json.dumps(_soak())) == _soak()
    assert _mtls_ec2.parse_soak("drguard-mtls-soak-result " + json.dumps(_soak())[:-5]) is None  # cut
    assert _mtls_ec2.parse_soak("drguard-mtls-soak-result ") is None  # the soak printed nothing
    assert _mtls_ec2.parse_soak("drguard-mtls-soak-result " + json.dumps({"held": {}})) is None
    assert _mtls_ec2.parse_soak("") is None


def _steps(*unconfirmed):
    return [{"step": s, "tier": "db", "instance_id": "i-db", "confirmed": s not in unconfirmed,
             "reason": "confirmed by the instance" if s not in unconfirmed else "SSM command c-1 on i-db ended Failed"}
            for s in ("held_connection", "leaf_new", "leaf_revoke_old", "held_connection_result")]


def _event(accepted, stamp, reason="allowed"):
    return {"accepted": accepted, "reason": reason, "time": stamp, "peer_address": "10.20.0.10"}


def test_leaf_rotation_is_proven_only_with_every_step_the_held_result_the_events_and_the_new_serial():
    events = [_event(False, "1970-01-01T00:16:30.000000Z", "no_client_certificate"),  # 990: before the soak
              _event(True, "1970-01-01T00:16:45.000000Z"), _event(False, "1970-01-01T00:17:00.000000Z", "revoked")]
    ok = _mtls_ec2.judge_leaf_rotation(_soak(), events[:2], old_serial="L1", new_serial="L2", steps=_steps())
    assert (ok["rotated"], ok["dropped_connections"], ok["failed_handshakes"], ok["new_serials"]) == (
        True, 0, 0, ["L1", "L2"]) and "reason" not in ok
    # a refusal logged by the server after the soak ended is not the rotation's (the rotated-out case)
    assert _mtls_ec2.judge_leaf_rotation(_soak(), events, old_serial="L1", new_serial="L2",
                                         steps=_steps())["failed_handshakes"] == 0
    during = events[:2] + [_event(False, "1970-01-01T00:16:45.500000Z", "unknown_ca")]
    bad = _mtls_ec2.judge_leaf_rotation(_soak(), during, old_serial="L1", new_serial="L2", steps=_steps())
    assert bad["failed_handshakes"] == 1  # the playbook fails the phase on it
    # a stale serial: the new handshakes never showed the issued one
    stale = _mtls_ec2.judge_leaf_rotation(_soak(new={"handshakes": 9, "failures": [], "serials": ["L1"]}), events,
                                          old_serial="L1", new_serial="L2", steps=_steps())
    assert stale["rotated"] is False
    assert stale["reason"] == "not proven: no new handshake during the rotation presented the new serial L2"
    # nothing came back from the held connection: nothing counted as 0
    lost = _mtls_ec2.judge_leaf_rotation(None, events, old_serial="L1", new_serial="L2", steps=_steps())
    assert (lost["rotated"], lost["dropped_connections"], lost["failed_handshakes"]) == (False, None, None)
    assert "the held connection's result did not come back" in lost["reason"]
    blind = _mtls_ec2.judge_leaf_rotation(_soak(), None, old_serial="L1", new_serial="L2", steps=_steps())
    assert (blind["rotated"], blind["failed_handshakes"]) == (False, None)
    assert blind["reason"] == "not proven: the server's handshake events did not come back"
    step = _mtls_ec2.judge_leaf_rotation(_soak(), events, old_serial="L1", new_serial="L2",
                                         steps=_steps("leaf_new"))
    assert step["rotated"] is False and step["reason"] == (
        "not proven: step leaf_new on db: SSM command c-1 on i-db ended Failed")
    dropped = _mtls_ec2.judge_leaf_rotation(_soak(held={"serial": "L1", "round_trips": 3,
                                                        "failures": ["closed_by_peer"], "local": [None, None]}),
                                            events, old_serial="L1", new_serial="L2", steps=_steps())
    assert dropped["dropped_connections"] == 1


class _Scripted:
    """SSM whose every command ends Success with the given output; Secrets Manager that keeps what is put."""

    def __init__(self, stdout):
        self.stdout, self.sent, self.puts = stdout, [], {}
        self.meta = type("meta", (), {"region_name": "eu-west-1"})

    def send_command(self, **kw):
        self.sent.append(kw)
        return {"Command": {"CommandId": "c-%d" % len(self.sent)}}

    def get_command_invocation(self, **kw):
        return {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": self.stdout}

    def put_secret_value(self, SecretId, SecretString):  # noqa: N803
        self.puts[SecretId] = SecretString


def _step(stdout, expect):
    import hashlib

    bundle = {"ca_bundle": "CA PEM\n", "cert": "CERT PEM\n", "key": "KEY PEM\n"}
    fake = _Scripted(stdout % {"cert": hashlib.sha256(b"CERT PEM\n").hexdigest(),
                               "ca": hashlib.sha256(b"CA PEM\n").hexdigest()})
    rot = _mtls_ec2.Rotation(fake, fake, DRILL, BOUNDARY, UNITS, ready={"db": "D1"}, timeout=5, command_timeout=5,
                             lifetime=130, kw={"sleep": lambda s: None})
    got = rot.deliver("leaf_new", {"db": bundle}, keep={"db": "rotated"}, expect=expect)
    return got[0], fake


def test_a_rotation_step_is_confirmed_only_by_the_certificate_the_ca_bundle_and_the_issued_serial():
    good = "delivered %(cert)s\ndrguard-mtls-trust %(ca)s\ndrguard-mtls-reloaded db ok true serial D2\n"
    step, fake = _step(good, {"db": "D2"})
    assert step["confirmed"] is True and step["instance_id"] == "i-db"
    # the bundle went into the tier's secret; the command names the secret and carries no key
    assert list(fake.puts) == ["drguard/%s/runtime/db" % DRILL] and json.loads(fake.puts[
        "drguard/%s/runtime/db" % DRILL])["key"] == "KEY PEM\n"
    text = "\n".join(_decoded(line) for line in fake.sent[0]["Parameters"]["commands"])
    assert "KEY PEM" not in text and "--secret-id drguard/%s/runtime/db" % DRILL in text
    assert fake.sent[0]["InstanceIds"] == ["i-db"] and "/run/drguard/tls/keep-rotated" in text
    # a server that reloaded but still presents the old (stale) serial: not confirmed
    stale, _ = _step(good.replace("serial D2", "serial D1"), {"db": "D2"})
    assert (stale["confirmed"], stale["reason"]) == (False, "the server reloaded with serial D1, not the issued D2")
    failed, _ = _step(good.replace("ok true", "ok false"), {"db": "D2"})
    assert failed["confirmed"] is False and failed["reason"].endswith("without the server's reload")
    other_ca, _ = _step(good.replace("%(ca)s", "0" * 64), {"db": "D2"})
    assert other_ca["confirmed"] is False and other_ca["reason"].endswith("without confirming the CA bundle")
    other_cert, _ = _step(good.replace("delivered %(cert)s", "delivered " + "0" * 64), {"db": "D2"})
    assert other_cert["confirmed"] is False and other_cert["reason"].endswith("without confirming the certificate")


def test_rotation_commands_carry_only_names_paths_and_programs():
    lines = (_mtls_ec2.refetch_commands("drguard/%s/runtime/db" % DRILL, "eu-west-1", "db", keep="ca0", reload=True)
             + _mtls_ec2.soak_start_commands(_mtls_ec2.soak_spec(DRILL, "10.20.0.20", 5432, "db", timeout=5,
                                                                 max_seconds=100), lifetime=110)
             + _mtls_ec2.soak_stop_commands())
    text = "\n".join(_decoded(line) for line in lines)
    assert not PEM_BODY.search(text) and "PRIVATE KEY" not in text
    assert lines[0] == "set -eu" and "cp -p /run/drguard/tls/cert.pem /run/drguard/tls/key.pem " \
                                     "/run/drguard/tls/keep-ca0/" in lines
    start = next(line for line in lines if "setsid timeout" in line)
    assert "setsid timeout -s TERM -k 5 110 " + _runtime_ec2.UNPRIVILEGED in start and start.endswith("&")
    # what a later step needs is removed by the stop: the held connection and every kept leaf
    stop = _mtls_ec2.stop_commands()
    assert "rm -rf /run/drguard/tls/keep-*" in stop and "rm -rf /run/drguard/mtls-soak" in stop


def test_a_keep_label_is_a_plain_word():
    import pytest

    for bad in ("", "../x", "a b", "A", "x" * 17):
        with pytest.raises(ValueError, match="keep label"):
            _mtls_ec2.keep_lines(bad)


def test_the_rotation_programs_parse_as_the_amis_python_3_9():
    import ast

    for source in (_mtls_ec2.SOAK_SOURCE, _mtls_ec2._RELOAD_SOURCE):  # noqa: SLF001
        ast.parse(source, feature_version=(3, 9))
