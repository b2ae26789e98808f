"""_pki: the certificate profile (each extension, criticality included), name constraints (ours and
OpenSSL's), URI SAN edge cases, half-life renewal, the tmpfs store, rotation and destruction."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ansible_collections.drguard.sandbox.plugins.module_utils import _pki

ROOT = Path(__file__).resolve().parents[2]
DRILL = "dr-unit-pki"
DOMAIN = "dr-unit-pki.drguard.internal"
NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return _pki.new_ca(DRILL, 3600, now=NOW)


@pytest.fixture
def shm_dir():
    path = os.path.join("/dev/shm", "drguard-unit-%s" % uuid.uuid4().hex[:8])  # noqa: S108
    try:
        yield path
    finally:
        _pki.destroy(path)


def custom_leaf(ca, sans, *, ca_flag=False, eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
                digital_signature=True, not_after=None, not_before=None):
    """A leaf signed by ``ca`` with whatever SANs and flags a test needs (never issued by _pki)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or NOW - datetime.timedelta(minutes=1))
               .not_valid_after(not_after or NOW + datetime.timedelta(minutes=15))
               .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature, False, False, False, False, False, False, False, False),
                              critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return key, builder.sign(ca.key, hashes.SHA256())


def uri(value):
    return x509.UniformResourceIdentifier(value)


# ---------------------------------------------------------------- the profile

def test_ca_profile_each_extension_exactly_as_specified(ca):
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - NOW == datetime.timedelta(seconds=3600)
    exts = {e.oid: e for e in cert.extensions}
    basic = exts[x509.oid.ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical is True and basic.value.ca is True and basic.value.path_length == 0
    usage = exts[x509.oid.ExtensionOID.KEY_USAGE]
    assert usage.critical is True
    assert (usage.value.key_cert_sign, usage.value.crl_sign, usage.value.digital_signature) == (True, True, False)
    nc = exts[x509.oid.ExtensionOID.NAME_CONSTRAINTS]
    assert nc.critical is True
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(DOMAIN)]
    assert set(nc.value.excluded_subtrees) == {x509.DNSName(""), x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                                               x509.IPAddress(ipaddress.ip_network("::/0"))}
    assert set(exts) == {x509.oid.ExtensionOID.BASIC_CONSTRAINTS, x509.oid.ExtensionOID.KEY_USAGE,
                         x509.oid.ExtensionOID.NAME_CONSTRAINTS, x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER}


def test_leaf_profile_each_extension_exactly_as_specified(ca):
    leaf = _pki.issue_leaf(ca, DRILL, "app", now=NOW)
    cert = leaf.cert
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == x509.Name([])
    assert cert.not_valid_after_utc - NOW == datetime.timedelta(minutes=15)
    exts = {e.oid: e for e in cert.extensions}
    san = exts[x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert san.critical is True  # an empty subject needs a critical SAN (RFC 5280 4.1.2.6)
    assert list(san.value) == [x509.UniformResourceIdentifier("spiffe://%s/tier/app" % DOMAIN)]
    usage = exts[x509.oid.ExtensionOID.KEY_USAGE]
    assert usage.critical is True and usage.value.digital_signature is True
    assert (usage.value.key_cert_sign, usage.value.crl_sign, usage.value.key_encipherment) == (False, False, False)
    eku = exts[x509.oid.ExtensionOID.EXTENDED_KEY_USAGE]
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = exts[x509.oid.ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical is True and basic.value.ca is False and basic.value.path_length is None
    assert set(exts) == {x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, x509.oid.ExtensionOID.KEY_USAGE,
                         x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
                         x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    cert.verify_directly_issued_by(ca.cert)
    assert _pki.check_leaf(cert, [ca.cert], DRILL, now=NOW) == ("app", None)
    assert _pki.check_leaf(cert, [ca.cert], DRILL, now=NOW, purpose="server") == ("app", None)


def test_leaf_never_outlives_its_ca():
    short = _pki.new_ca(DRILL, 120, now=NOW)
    leaf = _pki.issue_leaf(short, DRILL, "db", 900, now=NOW)
    assert leaf.cert.not_valid_after_utc == short.cert.not_valid_after_utc


@pytest.mark.parametrize("lifetime", [900, 20])
def test_needs_renewal_from_half_life_on(ca, lifetime):
    # Half of leaf_lifetime after the issue: the 60 s back-dating is no part of the lifetime.
    cert = _pki.issue_leaf(ca, DRILL, "db", lifetime, now=NOW).cert
    half = NOW + datetime.timedelta(seconds=lifetime / 2)
    assert _pki.renewal_time(cert) == half
    assert _pki.needs_renewal(cert, half - datetime.timedelta(seconds=1)) is False
    assert _pki.needs_renewal(cert, half) is True


def test_a_leaf_may_be_as_short_as_20_seconds_not_shorter(ca):
    leaf = _pki.issue_leaf(ca, DRILL, "db", 20, now=NOW)
    assert leaf.cert.not_valid_after_utc == NOW + datetime.timedelta(seconds=20)
    with pytest.raises(_pki.PkiError) as err:
        _pki.issue_leaf(ca, DRILL, "db", 19, now=NOW)
    assert err.value.detail == {"field": "leaf_lifetime"}


@pytest.mark.parametrize(("value", "field"), [("Bad_Tier", "tier"), ("a/b", "tier"), ("", "tier")])
def test_bad_tier_names_are_refused(ca, value, field):
    with pytest.raises(_pki.PkiError) as err:
        _pki.issue_leaf(ca, DRILL, value, now=NOW)
    assert err.value.detail == {"field": field}


def test_no_leaf_from_a_ca_about_to_expire():
    short = _pki.new_ca(DRILL, 120, now=NOW)
    with pytest.raises(_pki.PkiError) as err:
        _pki.issue_leaf(short, DRILL, "db", 900, now=NOW + datetime.timedelta(seconds=100))
    assert err.value.detail == {"field": "ca"} and "rotate the CA" in err.value.msg


def test_bad_drill_id_and_ttl_are_refused():
    with pytest.raises(_pki.PkiError) as err:
        _pki.new_ca("Bad Drill", 3600)
    assert err.value.detail == {"field": "drill_id"}
    with pytest.raises(_pki.PkiError) as err:
        _pki.new_ca(DRILL, 10)
    assert err.value.detail == {"field": "ttl"}


# ---------------------------------------------------------------- our verifier: URI SAN edge cases

@pytest.mark.parametrize(("sans", "reason"), [
    ([uri("spiffe://%s/tier/app" % DOMAIN), uri("spiffe://%s/tier/db" % DOMAIN)], "san_not_one_uri"),
    ([uri("spiffe://%s/tier/app" % DOMAIN), x509.DNSName("app.example")], "san_not_one_uri"),
    ([x509.DNSName("app.example")], "san_not_one_uri"),
    ([], "san_not_one_uri"),
    ([uri("spiffe://%s/tier/app\x00.evil" % DOMAIN)], "san_nul_byte"),
    ([uri("spiffe://other-drill.drguard.internal/tier/app")], "outside_trust_domain"),
    ([uri("spiffe://%s/tier/a/b" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/svc/app" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/App" % DOMAIN)], "bad_identity_path"),
    ([uri("spiffe://%s/tier/app" % DOMAIN.upper())], "outside_trust_domain"),
    ([uri("SPIFFE://%s/tier/app" % DOMAIN)], "not_spiffe"),
    ([uri("https://%s/tier/app" % DOMAIN)], "not_spiffe"),
])
def test_uri_san_edge_cases_are_refused_with_their_reason(ca, sans, reason):
    _key, cert = custom_leaf(ca, sans)
    assert _pki.check_leaf(cert, [ca.cert], DRILL, now=NOW) == (None, reason)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"ca_flag": True}, "ca_certificate"),
    ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, "wrong_purpose"),
    ({"eku": ()}, "wrong_purpose"),
    ({"digital_signature": False}, "wrong_key_usage"),
    ({"not_after": NOW - datetime.timedelta(seconds=1)}, "expired"),
    ({"not_before": NOW + datetime.timedelta(minutes=5)}, "not_yet_valid"),
])
def test_leaf_profile_violations_are_refused(ca, kwargs, reason):
    _key, cert = custom_leaf(ca, [uri("spiffe://%s/tier/app" % DOMAIN)], **kwargs)
    assert _pki.check_leaf(cert, [ca.cert], DRILL, now=NOW) == (None, reason)


def test_a_leaf_of_another_drills_ca_is_unknown(ca):
    other = _pki.new_ca("dr-other-drill", 3600, now=NOW)
    cert = _pki.issue_leaf(other, "dr-other-drill", "app", now=NOW).cert
    assert _pki.check_leaf(cert, [ca.cert], DRILL, now=NOW) == (None, "unknown_ca")


def test_name_constraint_enforced_by_our_verifier(ca):
    # Signed by this drill's CA, valid identity shape for *another* drill: only the CA's name
    # constraint (permitted URI host = this drill's trust domain) stands in the way.
    _key, cert = custom_leaf(ca, [uri("spiffe://dr-other-drill.drguard.internal/tier/app")])
    assert _pki.check_leaf(cert, [ca.cert], "dr-other-drill", now=NOW) == (None, "name_constraint_violation")


def _handshake(ca, server_leaf, client_pem_path, tmp):
    """One TLS 1.3 handshake on loopback with plain ssl contexts; the server's verification error or None."""
    ca_path, srv_path = os.path.join(tmp, "ca.pem"), os.path.join(tmp, "srv.pem")
    with open(ca_path, "wb") as handle:
        handle.write(_pki.cert_pem(ca.cert))
    with open(srv_path, "wb") as handle:
        handle.write(_pki.cert_pem(server_leaf.cert) + _pki.key_pem(server_leaf.key))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(ca_path)
    sctx.load_cert_chain(srv_path)
    listener = socket.create_server(("127.0.0.1", 0))
    result = {}

    def serve():
        conn, _ = listener.accept()
        try:
            with sctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
            result["error"] = None
        except ssl.SSLCertVerificationError as exc:
            result["error"] = exc.verify_code
        except OSError as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.load_verify_locations(ca_path)
    cctx.load_cert_chain(client_pem_path)
    try:
        with cctx.wrap_socket(socket.create_connection(listener.getsockname())) as tls:
            tls.recv(2)
    except OSError:
        pass
    thread.join(10)
    listener.close()
    return result["error"]


def test_name_constraint_enforced_by_openssl_too(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = _pki.new_ca(DRILL, 3600, now=now)
    server = _pki.issue_leaf(ca, DRILL, "db", now=now)
    good = _pki.issue_leaf(ca, DRILL, "app", now=now)
    key, outside = custom_leaf(ca, [uri("spiffe://dr-other-drill.drguard.internal/tier/app")],
                               not_before=now - datetime.timedelta(minutes=1),
                               not_after=now + datetime.timedelta(minutes=15))
    for name, cert, k in (("good.pem", good.cert, good.key), ("outside.pem", outside, key)):
        (tmp_path / name).write_bytes(_pki.cert_pem(cert) + _pki.key_pem(k))
    assert _handshake(ca, server, str(tmp_path / "good.pem"), str(tmp_path)) is None
    assert _handshake(ca, server, str(tmp_path / "outside.pem"), str(tmp_path)) == 47  # permitted subtree violation


# ---------------------------------------------------------------- the store

def test_store_refuses_a_directory_not_on_tmpfs(tmp_path):
    store = _pki.Store(DRILL, str(tmp_path / "pki"))
    if _pki._secrets.mount_fstype(str(tmp_path)) == "tmpfs":
        pytest.skip("tmp_path is itself on a tmpfs here")
    with pytest.raises(_pki.PkiError) as err:
        store.present(["app"], 3600)
    assert err.value.detail == {"field": "dir"}
    assert not os.path.exists(tmp_path / "pki")


def test_store_present_writes_private_files_and_results_carry_no_key(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    actions = store.present(["app", "db"], 3600)
    assert actions == ["create CA", "issue leaf app", "issue leaf db", "issue leaf validation"]
    assert stat.S_IMODE(os.lstat(store.dir).st_mode) == 0o700
    names = sorted(os.listdir(store.dir))
    assert [n for n in names if not n.startswith("ca-")] == ["state.json", "tier-app.pem", "tier-db.pem",
                                                             "tier-validation.pem", "trust.pem"]
    for name in names:
        assert stat.S_IMODE(os.lstat(os.path.join(store.dir, name)).st_mode) == 0o600, name
    summary = store.summary()
    text = repr(summary)
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    keys = []
    for tier in ("app", "db", "validation"):
        with open(store.tier_file(tier), "rb") as handle:
            body = handle.read()
        key = serialization.load_pem_private_key(body, None)
        keys.append(key.private_numbers().private_value)
    assert not any(("%x" % k) in text or str(k) in text for k in keys)
    assert sorted(summary["leaves"]) == ["app", "db", "validation"]
    assert summary["leaves"]["app"]["spiffe_id"] == "spiffe://%s/tier/app" % DOMAIN
    assert summary["ca"]["serial"] == store.state()["cas"][0]
    # Idempotent: nothing to do while every leaf is before its half-life.
    assert store.present(["app", "db"], 3600) == []


def test_store_renews_leaves_at_half_life(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    store.present(["app"], 3600)
    before = store.state()["leaves"]
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=450)
    assert store.present(["app"], 3600, now=later) == ["renew leaf app", "renew leaf validation"]
    after = store.state()["leaves"]
    assert {t: v["serial"] for t, v in after.items()}.keys() == before.keys()
    assert all(after[t]["serial"] != before[t]["serial"] for t in before)


def test_rotation_keeps_old_leaves_trusted_until_retired_then_revokes_them(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    store.present(["app"], 3600)
    old = {t: v["serial"] for t, v in store.state()["leaves"].items()}
    store.rotate(["app"], 3600)
    state = store.state()
    assert sorted(s["serial"] for s in state["superseded"]) == sorted(old.values())
    assert _crl_serials(store) == set()
    store.retire()
    assert store.state()["superseded"] == []
    assert _crl_serials(store) == set(old.values())


def test_ca_rotation_overlap_bundle_then_new_ca_only_and_old_key_destroyed(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    store.present(["app"], 3600)
    old_ca = store.state()["cas"][0]
    store.rotate(["app"], 3600, ca=True)
    state = store.state()
    assert len(state["cas"]) == 2 and state["cas"][0] == old_ca and state["retiring"] == [old_ca]
    assert _trust_subjects(store) == 2
    assert all(v["ca"] == state["cas"][1] for v in state["leaves"].values())
    store.retire()
    state = store.state()
    assert state["cas"] != [old_ca] and len(state["cas"]) == 1
    assert _trust_subjects(store) == 1
    assert not os.path.exists(os.path.join(store.dir, "ca-%s.key" % old_ca))


def test_destroy_removes_everything(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    store.present(["app"], 3600)
    assert _pki.destroy(store.dir) is True
    assert not os.path.exists(store.dir)
    assert _pki.destroy(store.dir) is False


def test_store_of_another_drill_is_refused(shm_dir):
    _pki.Store(DRILL, os.path.join(shm_dir, "pki")).present(["app"], 3600)
    with pytest.raises(_pki.PkiError) as err:
        _pki.Store("dr-other-drill", os.path.join(shm_dir, "pki")).present(["app"], 3600)
    assert "belongs to drill" in err.value.msg


def _trust_blocks(store, kind):
    with open(store.trust_file(), "rb") as handle:
        text = handle.read()
    marker = b"-----BEGIN %s-----" % kind
    return [marker + part.split(b"-----END", 1)[0] + b"-----END %s-----\n" % kind for part in text.split(marker)[1:]]


def _trust_subjects(store):
    return len(_trust_blocks(store, b"CERTIFICATE"))


def _crl_serials(store):
    serials = set()
    for block in _trust_blocks(store, b"X509 CRL"):
        crl = x509.load_pem_x509_crl(block)
        serials |= {"%X" % r.serial_number for r in crl}
    return serials


# ---------------------------------------------------------------- the module

def _run(args, check_mode=False):
    from conftest import run_module
    return run_module("drill_pki", args, check_mode=check_mode)


def test_module_present_rotated_retired_absent_never_returns_key_material(shm_dir):
    args = {"drill_id": DRILL, "dir": os.path.join(shm_dir, "pki"), "tiers": ["app", "db"]}
    planned = _run(args, check_mode=True)
    assert planned["changed"] is True and planned["actions"][0] == "create CA"
    assert not os.path.exists(args["dir"])
    first = _run(args)
    assert first["changed"] is True and sorted(first["leaves"]) == ["app", "db", "validation"]
    assert first["trust_domain"] == DOMAIN
    again = _run(args)
    assert again["changed"] is False and again["leaves"] == first["leaves"]
    rotated = _run(dict(args, state="rotated"))
    assert all(rotated["leaves"][t]["serial"] != first["leaves"][t]["serial"] for t in first["leaves"])
    assert sorted(rotated["superseded"]) == sorted(v["serial"] for v in first["leaves"].values())
    retired = _run(dict(args, state="retired"))
    assert retired["superseded"] == [] and sorted(retired["revoked"]) == sorted(rotated["superseded"])
    ca_rotated = _run(dict(args, state="rotated", ca=True))
    assert len(ca_rotated["trusted_cas"]) == 2 and ca_rotated["ca"] != first["ca"]
    ca_retired = _run(dict(args, state="retired"))
    assert ca_retired["trusted_cas"] == [ca_rotated["ca"]]
    # Key material: no PEM marker and no private scalar in any result.
    json_text = repr([planned, first, again, rotated, retired, ca_rotated, ca_retired])
    forms = []
    for name in os.listdir(args["dir"]):
        if name.endswith(".key") or name.startswith("tier-"):
            forms += _key_forms(os.path.join(args["dir"], name))
    assert "BEGIN" not in json_text and "PRIVATE" not in json_text
    assert [f for f in forms if f in json_text or f.upper() in json_text] == []
    gone = _run(dict(args, state="absent"))
    assert gone["changed"] is True and not os.path.exists(args["dir"])
    assert _run(dict(args, state="absent"))["changed"] is False


def test_module_refuses_ca_rotation_outside_state_rotated(shm_dir):
    res = _run({"drill_id": DRILL, "dir": os.path.join(shm_dir, "pki"), "ca": True})
    assert res["failed"] is True and res["field"] == "ca"
    assert not os.path.exists(os.path.join(shm_dir, "pki"))


def test_module_delivers_one_tiers_identity_only(shm_dir):
    os.makedirs(shm_dir, mode=0o700)
    dest = os.path.join(shm_dir, "app-identity")
    res = _run({"drill_id": DRILL, "dir": os.path.join(shm_dir, "pki"),
                "deliver": [{"tier": "app", "path": dest}]})
    assert res["delivered"]["app"] == {"identity": os.path.join(dest, "identity.pem"),
                                       "trust": os.path.join(dest, "trust.pem")}
    assert sorted(os.listdir(dest)) == ["identity.pem", "trust.pem"]
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700
    with open(os.path.join(dest, "identity.pem"), "rb") as handle:
        delivered = x509.load_pem_x509_certificate(handle.read())
    assert _pki.serial_hex(delivered) == res["leaves"]["app"]["serial"]
    with open(os.path.join(dest, "trust.pem"), "rb") as handle:
        assert b"PRIVATE KEY" not in handle.read()
    assert res["changed"] is True and res["actions"][-1] == "deliver app to %s" % dest
    again = _run({"drill_id": DRILL, "dir": os.path.join(shm_dir, "pki"), "deliver": [{"tier": "app", "path": dest}]})
    assert again["changed"] is False and again["actions"] == []
    bad = _run({"drill_id": DRILL, "dir": os.path.join(shm_dir, "pki"),
                "deliver": [{"tier": "nope", "path": dest}]})
    assert bad["failed"] is True and bad["field"] == "deliver"


def test_no_key_material_in_ansible_output_at_vvvv(shm_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ansible_env
    pki_dir = os.path.join(shm_dir, "pki")
    playbook = tmp_path / "pki.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - drguard.sandbox.drill_pki: {{drill_id: {DRILL}, dir: {pki_dir}, tiers: [app, db]}}
    - drguard.sandbox.drill_pki: {{drill_id: {DRILL}, dir: {pki_dir}, tiers: [app, db], state: rotated, ca: true}}
""")
    ansible = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    out = subprocess.run([ansible, "-vvvv", str(playbook)], capture_output=True, cwd=str(ROOT),
                         text=True, env=ansible_env(), timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "serial" in text  # the results were printed
    secrets = []
    for name in os.listdir(pki_dir):
        if name.endswith(".key") or name.startswith("tier-"):
            secrets += _key_forms(os.path.join(pki_dir, name))
    assert len(secrets) >= 5 * 4  # two CAs' keys and three leaves' keys at least
    assert "PRIVATE KEY" not in text
    assert [s for s in secrets if s in text] == []


def _key_forms(path):
    """The ways a file's private key could leak: its scalar in hex and decimal, its DER in hex and base64,
    and each PEM line after the first (the first is the PKCS#8 header, the same for every P-256 key)."""
    import base64
    with open(path, "rb") as handle:
        pem = b"-----BEGIN PRIVATE KEY-----" + handle.read().split(b"-----BEGIN PRIVATE KEY-----", 1)[1]
    key = serialization.load_pem_private_key(pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    scalar = key.private_numbers().private_value
    body = pem.decode().split("-----")[2].split()
    return ["%x" % scalar, str(scalar), der.hex(), base64.b64encode(der).decode()[48:]] + body[1:]


def test_a_tier_named_trust_or_state_does_not_clobber_the_stores_files(shm_dir):
    store = _pki.Store(DRILL, os.path.join(shm_dir, "pki"))
    store.present(["trust", "state"], 3600)
    assert store.state()["drill_id"] == DRILL
    assert _trust_subjects(store) == 1 and _crl_serials(store) == set()
    assert _pki.serial_hex(store.leaf_cert("trust")) == store.state()["leaves"]["trust"]["serial"]
