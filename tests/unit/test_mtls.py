"""_mtls: authorisation by identity (the DER reading the server and probe programs use), URI SAN edge
cases, tier_rules per port, TLS reasons, and the echo server program on loopback (no root needed)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry

DRILL = "dr-unit-mtls"
DOMAIN = DRILL + ".drguard.internal"
NOW = datetime.datetime.now(datetime.timezone.utc)
RULES = [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432, "6000-6010"]},
         {"from": "validation", "to": "db", "protocol": "udp", "ports": [5432]}]

from test_pki import custom_leaf  # noqa: E402 - one builder of odd certificates for both files


@pytest.fixture(scope="module")
def ca():
    return _pki.new_ca(DRILL, 3600, now=NOW)


def uri(value):
    return x509.UniformResourceIdentifier(value)


def test_allowed_identity_on_a_declared_port(ca):
    cert = _pki.issue_leaf(ca, DRILL, "app", now=NOW).cert
    assert _mtls.authorise(cert, RULES, "db", 5432, drill_id=DRILL) == (True, "app", "allowed")
    assert _mtls.authorise(cert, RULES, "db", 6010, drill_id=DRILL) == (True, "app", "allowed")


@pytest.mark.parametrize(("tier", "local", "port"), [
    ("app", "db", 5433),        # undeclared port
    ("db", "app", 5432),        # reverse direction
    ("validation", "db", 5432),  # only a udp rule: TLS is tcp
    ("app", "app", 5432),
])
def test_valid_identity_not_allowed_by_tier_rules(ca, tier, local, port):
    cert = _pki.issue_leaf(ca, DRILL, tier, now=NOW).cert
    assert _mtls.authorise(cert, RULES, local, port, drill_id=DRILL) == (False, tier, "identity_not_allowed")


def test_tier_rule_objects_from_a_parsed_boundary(ca):
    from ansible_collections.drguard.sandbox.plugins.module_utils import boundary
    parsed = boundary.parse_boundary({"production_cidrs": ["10.0.0.0/16"], "tiers": ["app", "db"],
                                      "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp",
                                                      "ports": ["5432-5433"]}]})
    assert _mtls.normalise_rules(parsed.tier_rules) == [{"from": "app", "to": "db", "ports": [[5432, 5433]]}]
    cert = _pki.issue_leaf(ca, DRILL, "app", now=NOW).cert
    assert _mtls.authorise(cert, parsed.tier_rules, "db", 5433, drill_id=DRILL)[0] is True


@pytest.mark.parametrize(("sans", "reason"), [
    ([uri("spiffe://%s/tier/app" % DOMAIN), uri("spiffe://%s/tier/db" % DOMAIN)], "san_not_one_uri"),
    ([uri("spiffe://%s/tier/app" % DOMAIN), x509.DNSName("app.example")], "san_not_one_uri"),
    ([x509.DNSName("app.example"), uri("spiffe://%s/tier/app" % DOMAIN)], "san_not_one_uri"),
    ([], "san_not_one_uri"),
    ([uri("spiffe://%s/tier/app\x00.evil" % DOMAIN)], "san_nul_byte"),
    ([uri("spiffe://%s/tier/app\x00" % DOMAIN)], "san_nul_byte"),
    ([uri("spiffe://other-drill.drguard.internal/tier/app")], "outside_trust_domain"),
    ([uri("spiffe://%s.evil/tier/app" % DOMAIN)], "outside_trust_domain"),
    ([uri("spiffe://%s/tier/a/b" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/app/" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/App" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/app\n" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/app" % DOMAIN.upper())], "outside_trust_domain"),
    ([uri("SPIFFE://%s/tier/app" % DOMAIN)], "not_spiffe"),
])
def test_uri_san_edge_cases_read_from_der(ca, sans, reason):
    _key, cert = custom_leaf(ca, sans)
    allowed, tier, got = _mtls.authorise(cert, RULES, "db", 5432, drill_id=DRILL)
    assert (allowed, tier, got) == (False, None, reason)


@pytest.mark.parametrize(("kwargs", "purpose", "reason"), [
    ({"ca_flag": True}, "client", "ca_certificate"),
    ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, "client", "wrong_purpose"),
    ({"eku": (ExtendedKeyUsageOID.CLIENT_AUTH,)}, "server", "wrong_purpose"),
    ({"eku": ()}, "client", "wrong_purpose"),
    ({"digital_signature": False}, "client", "wrong_key_usage"),
])
def test_profile_violations_read_from_der(ca, kwargs, purpose, reason):
    _key, cert = custom_leaf(ca, [uri("spiffe://%s/tier/app" % DOMAIN)], **kwargs)
    assert _mtls.authorise(cert, RULES, "db", 5432, drill_id=DRILL, purpose=purpose) == (False, None, reason)


def test_der_reader_agrees_with_cryptography(ca):
    cert = _pki.issue_leaf(ca, DRILL, "db", now=NOW).cert
    facts = _mtls.peer_facts(cert)
    assert facts["serial"] == _pki.serial_hex(cert)
    assert facts["ca"] is False and facts["digital_signature"] is True
    assert facts["eku"] == [_mtls._CHECKS["SERVER_AUTH"], _mtls._CHECKS["CLIENT_AUTH"]]
    assert facts["sans"] == [(0x86, b"spiffe://%s/tier/db" % DOMAIN.encode())]
    assert _mtls.authorise(b"\x30\x03\x02\x01", RULES, "db", 5432, drill_id=DRILL) == (False, None,
                                                                                         "certificate_malformed")


# ---------------------------------------------------------------- the programs on loopback

@pytest.fixture
def pki():
    directory = os.path.join("/dev/shm", "drguard-unit-mtls-%s" % uuid.uuid4().hex[:8])  # noqa: S108
    store = _pki.Store(DRILL, directory)
    store.present(["app", "db", "web"], 3600)
    try:
        yield store
    finally:
        _pki.destroy(directory)


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(pki, tmp_path):
    port = _free_port()
    config = _mtls.server_config(drill_id=DRILL, tier="db", address="127.0.0.1", ports=[port], tier_rules=RULES[:1],
                                 identity=pki.tier_file("db"), trust=pki.trust_file())
    config["ports"] = [port]
    config["rules"] = [{"from": "app", "to": "db", "ports": [[port, port]]}]
    events = tmp_path / "events.jsonl"
    with open(events, "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(_mtls.server_argv(config), stdout=out, stderr=err)
    deadline = time.monotonic() + 10
    while b"listening" not in (tmp_path / "err").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield {"port": port, "events": str(events), "proc": proc}
    finally:
        proc.terminate()
        proc.wait(10)


def _probe(pki, port, identity, expect="db"):
    config = _mtls.client_config(drill_id=DRILL, address="127.0.0.1", port=port, expect_tier=expect,
                                 identity=identity, trust=pki.trust_file())
    out = subprocess.run(_mtls.client_argv(config), capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)[0]


def _wait_events(path, count):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = _mtls.read_events(path)
        if len(events) >= count:
            return events
        time.sleep(0.02)
    return _mtls.read_events(path)


def test_server_program_allows_by_identity_and_logs_every_handshake(pki, server):
    ok = _probe(pki, server["port"], pki.tier_file("app"))
    assert (ok["ok"], ok["reason"], ok["server_id"]) == (True, "round_trip", "spiffe://%s/tier/db" % DOMAIN)
    refused = _probe(pki, server["port"], pki.tier_file("web"))
    assert (refused["ok"], refused["reason"]) == (False, "closed_by_peer")
    none = _probe(pki, server["port"], None)
    # TLS 1.3: the client's handshake completes; the refusal arrives on the first read.
    assert (none["ok"], none["reason"]) == (False, "no_client_certificate")
    events = _wait_events(server["events"], 3)
    rows = [(e["data"]["peer_tier"], e["data"]["accepted"], e["data"]["reason"]) for e in events]
    assert rows == [("app", True, "allowed"), ("web", False, "identity_not_allowed"),
                    (None, False, "no_client_certificate")]
    assert all(e["type"] == "drguard.tls.handshake" and e["specversion"] == "1.0" for e in events)
    # Valid CloudEvents for the drill's collector, exactly as it judges them.
    assert [_telemetry.validate_event(e) for e in events] == [None, None, None]
    assert events[0]["data"]["serial"] == pki.state()["leaves"]["app"]["serial"]
    assert events[0]["data"]["latency_ms"] > 0


def test_probe_refuses_a_server_with_the_wrong_identity(pki, server):
    row = _probe(pki, server["port"], pki.tier_file("app"), expect="app")
    assert (row["ok"], row["reason"]) == (False, "server_identity_mismatch")


def test_sighup_reload_presents_the_new_leaf(pki, server):
    before = _probe(pki, server["port"], pki.tier_file("app"))["server_serial"]
    pki.rotate(["db"], 3600)
    os.kill(server["proc"].pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not _mtls.read_events(server["events"], _mtls.RELOAD_TYPE) and time.monotonic() < deadline:
        time.sleep(0.02)
    reload_event = _mtls.read_events(server["events"], _mtls.RELOAD_TYPE)[0]
    new = pki.state()["leaves"]["db"]["serial"]
    assert reload_event["data"] == {"local_tier": "db", "ok": True, "serial": new}
    after = _probe(pki, server["port"], pki.tier_file("app"))["server_serial"]
    assert before != after == new


def test_no_key_material_in_the_server_argv(pki):
    config = _mtls.server_config(drill_id=DRILL, tier="db", address="127.0.0.1", ports=[1], tier_rules=RULES,
                                 identity=pki.tier_file("db"), trust=pki.trust_file())
    assert "PRIVATE KEY" not in json.dumps(_mtls.server_argv(config))
