"""mTLS between real network namespaces: the db tier's echo server and probes from the app tier, both
unprivileged (``_netns.spawn`` / ``run_in``: uid 65534, no capabilities), with the drill's PKI.

Root only. Each test builds app / db / validation namespaces under a prefix of its own, with a router
ruleset that lets app reach db on 5432 only (the tier rule app -> db tcp 5432), and destroys them,
its PKI and the delivered identities even when it fails.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from netns_kit import needs_root_and

pytestmark = needs_root_and("ip", "nft", "setpriv")

TIERS = ("app", "db", "validation")
PORT = 5432
RULES = [{"from": "app", "to": "db", "protocol": "tcp", "ports": [PORT]}]
UID = netns.UNPRIVILEGED_UID
GID = netns.UNPRIVILEGED_GID


def make_plan(prefix):
    tiers = {}
    for i, name in enumerate(TIERS, start=1):
        tiers[name] = {"ns": f"{prefix}{name}", "veth_host": f"{prefix}{i}r", "veth_peer": f"{prefix}{i}t",
                       "subnet": f"10.251.{i}.0/24", "address": f"10.251.{i}.2", "gateway": f"10.251.{i}.1"}
    return {"router": {"ns": f"{prefix}router"}, "tiers": tiers}


def ruleset(table):
    return f"""
table inet {table} {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ip saddr 10.251.1.0/24 ip daddr 10.251.2.2 tcp dport {PORT} accept
    }}
}}
"""


class World:
    """The namespaces, the drill's PKI, per-tier deliveries and the db server of one test."""

    def __init__(self):
        self.prefix = f"drg-m{uuid.uuid4().hex[:5]}-"
        self.drill_id = "dr-mtls-%s" % uuid.uuid4().hex[:8]
        self.root = os.path.join("/dev/shm", "drguard-it-%s" % uuid.uuid4().hex[:8])  # noqa: S108
        os.mkdir(self.root, 0o711)  # traversable by the workloads; each delivery directory is their own 0700
        self.store = _pki.Store(self.drill_id, os.path.join(self.root, "pki"))
        self.plan = make_plan(self.prefix)
        self.pid = None
        self.events = os.path.join(self.root, "db-events.jsonl")
        self.stderr = os.path.join(self.root, "db-stderr.txt")

    def build(self):
        netns.create(self.plan)
        netns.apply_ruleset(self.plan["router"]["ns"], ruleset(self.prefix + "router"))
        self.store.present(["app", "db"], 3600)
        for tier in TIERS:
            self.deliver(tier)

    def tier_dir(self, tier):
        return os.path.join(self.root, "tier-" + tier)

    def deliver(self, tier, parts=("trust", "identity")):
        return self.store.deliver(tier, self.tier_dir(tier), uid=UID, gid=GID, parts=parts)

    def identity(self, tier):
        return os.path.join(self.tier_dir(tier), "identity.pem")

    def trust(self, tier="app"):
        return os.path.join(self.tier_dir(tier), "trust.pem")

    def ns(self, tier):
        return self.plan["tiers"][tier]["ns"]

    def start_db(self):
        config = _mtls.server_config(drill_id=self.drill_id, tier="db", address=self.plan["tiers"]["db"]["address"],
                                     ports=[PORT], tier_rules=RULES, identity=self.identity("db"),
                                     trust=self.trust("db"))
        self.pid = _mtls.start_server(self.ns("db"), config, events_path=self.events, stderr_path=self.stderr)

    def reload_db(self):
        before = len(_mtls.read_events(self.events, _mtls.RELOAD_TYPE))
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = _mtls.read_events(self.events, _mtls.RELOAD_TYPE)
            if len(events) > before:
                assert events[-1]["data"]["ok"] is True, events[-1]
                return events[-1]["data"]["serial"]
            time.sleep(0.02)
        raise AssertionError("the db server did not reload")

    def config(self, identity, **kwargs):
        return _mtls.client_config(drill_id=self.drill_id, address=self.plan["tiers"]["db"]["address"], port=PORT,
                                   expect_tier="db", identity=identity, trust=self.trust("app"), **kwargs)

    def probe(self, identity, src="app"):
        return _mtls.probe(self.ns(src), self.config(identity))[0]

    def handshakes(self, count):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = _mtls.read_events(self.events)
            if len(events) >= count:
                return events
            time.sleep(0.02)
        return _mtls.read_events(self.events)

    def put(self, name, cert, key):
        """An odd identity (never issued by the drill's store) where the app workload can read it."""
        directory = os.path.join(self.root, "odd")
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
            os.chown(directory, UID, GID)
        path = os.path.join(directory, name)
        _pki.write_private(path, _pki.cert_pem(cert) + _pki.key_pem(key), uid=UID, gid=GID)
        return path

    def close(self):
        try:
            netns.destroy(self.prefix)
        finally:
            _pki.destroy(self.root)


@pytest.fixture
def world():
    w = World()
    try:
        w.build()
        w.start_db()
        yield w
    finally:
        w.close()
        assert not os.path.exists(w.root)


def _odd_leaf(world, sans_uri, *, ca_flag=False, eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
              not_before=None, not_after=None):
    """(cert, key): a leaf signed by the drill's CA with one thing wrong (never issued by _pki)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = world.store.issuing_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    # A cA-true "leaf" as an attacker would make it: a subject and a key identifier, so that OpenSSL's
    # strict checks let it through and only our own reading of BasicConstraints stands in the way.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app-ca")]) if ca_flag else x509.Name([])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(minutes=1))
            .not_valid_after(not_after or now + datetime.timedelta(minutes=15))
            .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sans_uri)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if ca_flag:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def test_workloads_are_unprivileged_and_keys_private(world):
    info = os.lstat(world.tier_dir("app"))
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (UID, 0o700)
    assert stat.S_IMODE(os.lstat(world.identity("app")).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(world.store.dir).st_mode) == 0o700
    status = open(f"/proc/{world.pid}/status").read()  # noqa: SIM115
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(UID)] * 4
    assert next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1] == "0" * 16
    # The app's workload cannot read the CA key (every tier runs as uid 65534, so tiers are not separated
    # from each other's delivered identity by file permissions: docs/mtls.md, "Limits").
    proc = netns.run_in(world.ns("app"), [_mtls._python(None), "-I", "-S", "-c",
                                          "import sys\nfor p in sys.argv[1:]:\n try:\n  open(p,'rb')\n  print('read')\n"
                                          " except PermissionError:\n  print('denied')",
                                          os.path.join(world.store.dir, "ca-%s.key" % world.store.state()["cas"][0]),
                                          world.store.tier_file("db")], env={})
    assert proc.stdout.split() == ["denied", "denied"]


def test_allowed_pair_succeeds_with_a_round_trip(world):
    row = world.probe(world.identity("app"))
    assert (row["ok"], row["reason"]) == (True, "round_trip")
    assert row["server_id"] == "spiffe://%s.drguard.internal/tier/db" % world.drill_id
    assert row["server_serial"] == world.store.state()["leaves"]["db"]["serial"]
    event = world.handshakes(1)[0]["data"]
    assert (event["peer_tier"], event["accepted"], event["reason"]) == ("app", True, "allowed")
    assert event["serial"] == world.store.state()["leaves"]["app"]["serial"]
    assert event["peer_address"] == world.plan["tiers"]["app"]["address"]


def test_refusals_are_recorded_with_their_reason(world):
    other = _pki.new_ca("dr-other-drill", 3600)
    other_leaf = _pki.issue_leaf(other, "dr-other-drill", "app")
    now = datetime.datetime.now(datetime.timezone.utc)
    domain = world.drill_id + ".drguard.internal"
    cases = [
        ("no client certificate", None, "no_client_certificate"),
        ("another drill's CA", world.put("other.pem", other_leaf.cert, other_leaf.key), "unknown_ca"),
        ("expired", world.put("expired.pem", *_odd_leaf(
            world, f"spiffe://{domain}/tier/app", not_before=now - datetime.timedelta(minutes=30),
            not_after=now - datetime.timedelta(minutes=1))), "expired"),
        ("identity tier_rules does not allow", world.identity("validation"), "identity_not_allowed"),
        ("outside the trust domain, signed by the drill CA", world.put("outside.pem", *_odd_leaf(
            world, "spiffe://dr-other-drill.drguard.internal/tier/app")), "name_constraint_violation"),
        ("wrong EKU", world.put("eku.pem", *_odd_leaf(
            world, f"spiffe://{domain}/tier/app", eku=(ExtendedKeyUsageOID.SERVER_AUTH,))), "wrong_purpose"),
        ("cA true", world.put("ca-true.pem", *_odd_leaf(world, f"spiffe://{domain}/tier/app", ca_flag=True)),
         "ca_certificate"),
    ]
    for what, identity, _reason in cases:
        row = world.probe(identity)
        assert row["ok"] is False, (what, row)
    events = world.handshakes(len(cases))
    got = [(e["data"]["accepted"], e["data"]["reason"]) for e in events]
    assert got == [(False, reason) for _what, _identity, reason in cases], got
    # The refused identity is named in its event.
    assert events[3]["data"]["peer_id"] == f"spiffe://{domain}/tier/validation"


def test_leaf_rotation_keeps_open_connections_and_new_handshakes_present_the_new_serial(world):
    old_app = world.put("old-app.pem", world.store.leaf_cert("app"), _load_key(world.store.tier_file("app")))
    old_db = world.store.state()["leaves"]["db"]["serial"]
    soak_out = os.path.join(world.root, "soak.json")
    config = world.config(world.identity("app"), mode="soak", duration=4.0, interval=0.02)
    pid = netns.spawn(world.ns("app"), _mtls.client_argv(config), env={}, stdout_path=soak_out)
    time.sleep(1.0)
    world.store.rotate(["app", "db"], 3600)
    world.deliver("db")
    world.deliver("app")
    new_db = world.reload_db()
    assert new_db == world.store.state()["leaves"]["db"]["serial"] != old_db
    world.store.retire()
    world.deliver("db", parts=("trust",))
    world.deliver("app", parts=("trust",))
    world.reload_db()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and _zombie(pid) is False:
        time.sleep(0.1)
    with open(soak_out, encoding="utf-8") as handle:
        soak = json.loads(handle.read().strip().splitlines()[-1])
    assert soak["held"]["failures"] == [] and soak["held"]["round_trips"] > 10
    assert soak["held"]["serial"] == old_db  # the connection opened before kept working
    assert soak["new"]["failures"] == []
    assert soak["new"]["serials"] == [old_db, new_db]
    refused = [e for e in _mtls.read_events(world.events) if not e["data"]["accepted"]]
    assert refused == []  # zero failed handshakes
    # The rotated-out leaf is refused now.
    row = world.probe(old_app)
    assert row["ok"] is False
    assert _mtls.read_events(world.events)[-1]["data"]["reason"] == "revoked"


def test_ca_rotation_overlap_then_new_ca_only_refuses_old_leaves(world):
    old_app = world.put("old-app.pem", world.store.leaf_cert("app"), _load_key(world.store.tier_file("app")))
    old_ca = world.store.state()["cas"][0]
    world.store.rotate(["app", "db"], 3600, ca=True)
    for tier in TIERS:  # the overlap bundle everywhere first
        world.deliver(tier, parts=("trust",))
    world.reload_db()
    for tier in TIERS:
        world.deliver(tier, parts=("identity",))
    world.reload_db()
    new_ca = world.store.state()["cas"][-1]
    assert new_ca != old_ca
    row = world.probe(world.identity("app"))
    assert row["ok"] is True and row["server_serial"] == world.store.state()["leaves"]["db"]["serial"]
    assert world.probe(old_app)["ok"] is True  # overlap: a leaf of the old CA still accepted
    world.store.retire()
    for tier in TIERS:
        world.deliver(tier, parts=("trust",))
    world.reload_db()
    assert world.probe(world.identity("app"))["ok"] is True
    assert world.probe(old_app)["ok"] is False
    last = _mtls.read_events(world.events)[-1]["data"]
    assert (last["accepted"], last["reason"]) == (False, "unknown_ca")
    assert not os.path.exists(os.path.join(world.store.dir, "ca-%s.key" % old_ca))


def _load_key(path):
    with open(path, "rb") as handle:
        return serialization.load_pem_private_key(handle.read(), None)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
