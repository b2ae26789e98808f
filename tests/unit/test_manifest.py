"""Unit tests of the manifest core (no emulator): PAE, keyids, strict JSON, schema, names,
signature schemes, threshold counting, trust policy, rollback, freshness, store checksums;
the gate's backends (Verifier, Signer, record_accepted) used without any module."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
from datetime import datetime
from datetime import timedelta
from datetime import UTC
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding  # noqa: E402
from helpers_artifacts import artifacts_for  # noqa: E402
from helpers_artifacts import generate_key  # noqa: E402
from helpers_artifacts import make_statement  # noqa: E402
from helpers_artifacts import sample_files  # noqa: E402
from helpers_artifacts import sign_payload  # noqa: E402
from helpers_artifacts import sign_statement  # noqa: E402
from helpers_artifacts import write_local_set  # noqa: E402
from helpers_artifacts import write_trust_policy  # noqa: E402

NOW = datetime(2026, 11, 29, 5, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys():
    return {k: generate_key(k) for k in ("ed25519", "ecdsa", "rsa")}


def policy(keys_, threshold=1):
    pems = [{"public_key": k.public_pem} for k in keys_]
    return mf.load_trust_policy(json.dumps({"threshold": threshold, "keys": pems}).encode())


def statement_bytes(**kwargs):
    files = {"a.bin": b"alpha", "dir/b.bin": b"bravo"}
    st = make_statement(kwargs.pop("backup_set", "orders-db"), kwargs.pop("sequence", 5), artifacts_for(files),
                        **kwargs)
    return mf.encode_statement(st)


# ----------------------------------------------------------------------------- encoding

def test_pae_matches_the_dsse_spec_vector():
    assert mf.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_bytes_not_characters():
    assert mf.pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_keyid_is_sha256_of_der_spki(keys):
    for key in keys.values():
        der = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert mf.keyid_for(key.public_key) == hashlib.sha256(der).hexdigest()
        assert mf.keyid_for(key.public_key) == key.keyid and len(key.keyid) == 64


@pytest.mark.parametrize("text, words", [
    (b'{"a": 1, "a": 2}', "duplicate"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b"\xff\xfe{}", "UTF-8"),
    ("\ufeff{}".encode(), "byte order mark"),
    (b"{", "not valid JSON"),
])
def test_loads_strict_refuses(text, words):
    with pytest.raises(ValueError, match=words):
        mf.loads_strict(text)


def test_statement_encoding_is_canonical():
    assert statement_bytes(created_at="2026-01-01T00:00:00Z", expires_at="2026-02-01T00:00:00Z") == \
        statement_bytes(created_at="2026-01-01T00:00:00Z", expires_at="2026-02-01T00:00:00Z")
    assert b" " not in statement_bytes()


# ----------------------------------------------------------------------------- envelope

@pytest.mark.parametrize("doc", [
    [],
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30="},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": []},
    {"payloadType": "text/plain", "payload": "e30=", "signatures": [{"keyid": "", "sig": "AA=="}]},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "not base64!", "signatures": [{"keyid": "", "sig": "AA=="}]},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"keyid": 1, "sig": "AA=="}]},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"keyid": "", "sig": "AA==", "x": 1}]},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"keyid": ""}]},
    {"payloadType": mf.PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"sig": "AA=="}], "extra": 1},
])
def test_parse_envelope_malformed(doc):
    with pytest.raises(mf.ManifestError) as err:
        mf.parse_envelope(json.dumps(doc).encode())
    assert err.value.reason == "manifest_malformed"


def test_envelope_round_trip_and_urlsafe_base64(keys):
    payload = b"\xfb\xff payload"
    env = mf.parse_envelope(sign_payload(payload, [keys["ed25519"]]))
    assert env.payload == payload and env.keyids == [keys["ed25519"].keyid]
    doc = json.loads(env.to_bytes())
    doc["payload"] = base64.urlsafe_b64encode(payload).decode()
    assert mf.parse_envelope(json.dumps(doc).encode()).payload == payload


# ----------------------------------------------------------------------------- statement schema

def _mutate(fn):
    st = json.loads(statement_bytes())
    fn(st)
    return mf.encode_statement(st)


def test_parse_statement_valid():
    st = mf.parse_statement(statement_bytes(tier="tier-9"))
    assert st.backup_set == "orders-db" and st.sequence == 5 and st.tier == "tier-9"
    assert list(st.artifacts) == ["a.bin", "dir/b.bin"]
    assert st.artifacts["a.bin"].sha256 == hashlib.sha256(b"alpha").hexdigest()
    assert mf.parse_statement(statement_bytes(tier=None)).tier is None


@pytest.mark.parametrize("mutation, words", [
    (lambda s: s["predicate"].update(extra=1), "unknown predicate field"),
    (lambda s: s.update(extra=1), "exactly the keys"),
    (lambda s: s["predicate"].pop("expires_at"), "missing"),
    (lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"), "_type"),
    (lambda s: s.update(predicateType="https://slsa.dev/provenance/v1"), "predicateType"),
    (lambda s: s["predicate"]["artifacts"].pop("a.bin"), "disagree"),
    (lambda s: s["subject"].pop(0), "disagree"),
    (lambda s: s["subject"].append(dict(s["subject"][0])), "twice"),
    (lambda s: s["subject"][0]["digest"].update(sha512="00"), "digest"),
    (lambda s: s["subject"][0]["digest"].update(sha256="ABC"), "digest"),
    (lambda s: s["predicate"].update(sequence=True), "sequence"),
    (lambda s: s["predicate"].update(sequence=-1), "sequence"),
    (lambda s: s["predicate"].update(sequence="5"), "sequence"),
    (lambda s: s["predicate"].update(created_at="2026-01-01T00:00:00"), "created_at"),
    (lambda s: s["predicate"].update(expires_at="2000-01-01T00:00:00Z"), "not after"),
    (lambda s: s["predicate"].update(backup_set=""), "backup_set"),
    (lambda s: s["predicate"]["artifacts"]["a.bin"].update(kind="zip"), "kind"),
    (lambda s: s["predicate"]["artifacts"]["a.bin"].update(size=-1), "size"),
    (lambda s: s["predicate"]["artifacts"]["a.bin"].update(version_id=""), "version_id"),
    (lambda s: s["predicate"]["artifacts"]["a.bin"].update(mode="0644"), "exactly"),
    (lambda s: s.update(subject=[]), "subject"),
])
def test_parse_statement_malformed(mutation, words):
    with pytest.raises(mf.ManifestError, match=words) as err:
        mf.parse_statement(_mutate(mutation))
    assert err.value.reason == "manifest_malformed"


def _sqlite_expect(expect, kind="sqlite"):
    def mutation(s):
        s["predicate"]["artifacts"]["a.bin"].update(kind=kind, expect=expect)
    return mutation


def test_parse_statement_sqlite_expectation_is_optional_and_read():
    st = mf.parse_statement(_mutate(_sqlite_expect({"tables": {"orders": 1, "audit": 0}})))
    assert st.artifacts["a.bin"].expect == {"tables": {"orders": 1, "audit": 0}}
    assert st.artifacts["dir/b.bin"].expect is None
    # An artifact without one encodes exactly as before the field existed (signatures stay valid).
    assert b"expect" not in statement_bytes()


@pytest.mark.parametrize("mutation, detail", [
    (_sqlite_expect({"tables": {"t": 1}}, kind="raw"), "expect is only for kind sqlite, not raw"),
    (_sqlite_expect({"tables": {"t": 1}}, kind="tar"), "expect is only for kind sqlite, not tar"),
    (_sqlite_expect({"tables": {"t": 1}, "views": {}}), "expect has unknown field(s) views; only tables"),
    (_sqlite_expect({"rows": 3}), "expect has unknown field(s) rows; only tables"),
    (_sqlite_expect({}), "expect must be a non-empty object"),
    (_sqlite_expect(None), "expect must be a non-empty object"),
    (_sqlite_expect({"tables": {}}), "expect.tables must be a non-empty object of table name to minimum row count"),
    (_sqlite_expect({"tables": ["t"]}), "expect.tables must be a non-empty object of table name to minimum row count"),
    (_sqlite_expect({"tables": {"t": -1}}), "expect.tables['t'] must be an integer >= 0"),
    (_sqlite_expect({"tables": {"t": True}}), "expect.tables['t'] must be an integer >= 0"),
    (_sqlite_expect({"tables": {"t": 1.5}}), "expect.tables['t'] must be an integer >= 0"),
    (_sqlite_expect({"tables": {"": 1}}), "expect.tables has a table name that is empty"),
])
def test_parse_statement_malformed_expectation(mutation, detail):
    with pytest.raises(mf.ManifestError) as err:
        mf.parse_statement(_mutate(mutation))
    assert err.value.reason == "manifest_malformed"
    assert err.value.detail.startswith("predicate.artifacts['a.bin'].%s" % detail), err.value.detail


def test_parse_statement_duplicate_key():
    payload = statement_bytes().replace(b'"sequence":5', b'"sequence":5,"sequence":6')
    with pytest.raises(mf.ManifestError, match="duplicate"):
        mf.parse_statement(payload)


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("name, problem", [
    ("../x", "the name contains a '..' segment"),
    ("/abs", "the name is absolute"),
    ("a\\b", "the name contains a backslash"),
    ("a\x00b", "the name contains a NUL byte"),
    ("a/../b", "the name contains a '..' segment"),
    ("./a", "the name contains an empty or '.' segment"),
    ("a//b", "the name contains an empty or '.' segment"),
    ("a/", "the name contains an empty or '.' segment"),
    ("", "the name is empty"),
    ("a\nb", "the name contains a control or format character"),
    ("C:x", "the name starts with a drive letter"),
    ("x" * 1025, "the name is longer than 1024 bytes"),
    ("a\u200bb", "the name contains a control or format character"),
])
def test_unsafe_names(name, problem):
    assert mf.unsafe_name_problem(name) == problem


@pytest.mark.parametrize("name", ["a", "dir/sub/file.tar", "name with spaces.db", "ünïcode.txt", "a..b", ".hidden"])
def test_safe_names(name):
    assert mf.unsafe_name_problem(name) is None


# ----------------------------------------------------------------------------- schemes

@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_each_scheme_signs_and_verifies(keys, kind):
    key = keys[kind]
    signer = mf.LocalSigner(key.private_pem())
    sig = signer.sign(b"message")
    assert mf.verify_raw(key.public_key, b"message", sig)
    assert not mf.verify_raw(key.public_key, b"messagf", sig)
    assert not mf.verify_raw(key.public_key, b"message", sig[:-1] + bytes([sig[-1] ^ 1]))


def test_rsa_pss_salt_length_is_digest_length_and_any_salt_verifies(keys):
    key = keys["rsa"]
    sig = mf.LocalSigner(key.private_pem()).sign(b"m")
    strict = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    key.public_key.verify(sig, b"m", strict, hashes.SHA256())  # raises if the salt were not 32 bytes
    max_salt = key.private_key.sign(b"m", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                      salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
    assert mf.verify_raw(key.public_key, b"m", max_salt)  # as moto's KMS signs


def test_wrong_schemes_do_not_verify(keys):
    assert not mf.verify_raw(keys["rsa"].public_key, b"m", keys["rsa"].sign_pkcs1v15(b"m"))
    assert not mf.verify_raw(keys["ecdsa"].public_key, b"m", keys["ed25519"].sign(b"m"))
    assert not mf.verify_raw(keys["ed25519"].public_key, b"m", keys["ecdsa"].sign(b"m"))


@pytest.mark.parametrize("kind, words", [("ecdsa-p384", "P-256"), ("rsa-1024", "2048")])
def test_unsupported_keys(kind, words):
    key = generate_key(kind)
    with pytest.raises(mf.PolicyError, match=words):
        mf.load_trust_policy(json.dumps({"threshold": 1, "keys": [{"public_key": key.public_pem}]}).encode())
    with pytest.raises(mf.PolicyError, match=words):
        mf.LocalSigner(key.private_pem())


def test_local_signer_errors_do_not_leak_the_key(keys):
    pem = keys["ecdsa"].private_pem("pw")
    for passphrase in (None, "Zq9-not-the-passphrase"):
        with pytest.raises(mf.PolicyError) as err:
            mf.LocalSigner(pem, passphrase)
        assert "BEGIN" not in str(err.value) and "Zq9" not in str(err.value)
    with pytest.raises(mf.PolicyError):
        mf.LocalSigner(b"garbage")


# ----------------------------------------------------------------------------- trust policy and threshold

@pytest.mark.parametrize("doc, message", [
    ({"threshold": 0, "keys": [{"kms_key_id": "k"}]}, "trust policy threshold must be an integer >= 1"),
    ({"threshold": True, "keys": [{"kms_key_id": "k"}]}, "trust policy threshold must be an integer >= 1"),
    ({"threshold": 1, "keys": []}, "trust policy keys must be a non-empty list"),
    ({"threshold": 1, "keys": [{"public_key": "nope"}]},
     "trust policy keys[0]: public_key is not a PEM SubjectPublicKeyInfo public key"),
    ({"threshold": 1, "keys": [{"public_key": "x", "kms_key_id": "k"}]},
     "trust policy keys[0] must be exactly one of {public_key: PEM} or {kms_key_id: id}"),
    ({"threshold": 1, "keys": [{"kms_key_id": ""}]}, "trust policy keys[0].kms_key_id must be a non-empty string"),
    ({"threshold": 1, "keys": [{"kms_key_id": "k"}], "extra": 1},
     "the trust policy must be an object with exactly 'threshold' and 'keys'"),
])
def test_trust_policy_errors(doc, message):
    with pytest.raises(mf.PolicyError) as err:
        mf.load_trust_policy(json.dumps(doc).encode(), kms_factory=lambda region: None)
    assert str(err.value) == message


def test_trust_policy_counts_a_key_listed_twice_once(keys):
    pol = policy([keys["ed25519"], keys["ed25519"]], threshold=2)
    assert pol.entries == 2 and len(pol.keys) == 1


def _envelope(payload, signers, **kwargs):
    return mf.parse_envelope(sign_payload(payload, signers, **kwargs))


def test_threshold_counts_distinct_keyids(keys):
    payload = statement_bytes()
    both = policy([keys["ed25519"], keys["rsa"]], threshold=2)
    assert sorted(mf.verify_signatures(_envelope(payload, [keys["ed25519"], keys["rsa"]]), both)) == \
        sorted([keys["ed25519"].keyid, keys["rsa"].keyid])
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(_envelope(payload, [keys["ed25519"], keys["ed25519"]]), both)
    assert err.value.reason == "threshold_not_met"


def test_untrusted_and_invalid(keys):
    payload = statement_bytes()
    pol = policy([keys["ed25519"]])
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(_envelope(payload, [keys["ecdsa"]]), pol)
    assert err.value.reason == "untrusted_key"
    # an untrusted extra signature is ignored
    assert mf.verify_signatures(_envelope(payload, [keys["ecdsa"], keys["ed25519"]]), pol) == [keys["ed25519"].keyid]
    # a trusted keyid whose signature does not verify fails, even alongside a good one
    bad = _envelope(payload, [keys["ed25519"], keys["ed25519"]],
                    signatures=[keys["ed25519"].sign(mf.pae(mf.PAYLOAD_TYPE, payload)), b"\x00" * 64])
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(bad, pol)
    assert err.value.reason == "signature_invalid"


def test_signature_without_keyid_is_matched_against_trusted_keys(keys):
    payload = statement_bytes()
    env = _envelope(payload, [keys["ecdsa"]], keyids=[""])
    assert mf.verify_signatures(env, policy([keys["ed25519"], keys["ecdsa"]])) == [keys["ecdsa"].keyid]
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(env, policy([keys["ed25519"]]))
    assert err.value.reason == "untrusted_key"


def test_one_key_signing_twice_with_and_without_keyid_counts_once(keys):
    """A signature without keyid that verifies under an already counted key adds nothing."""
    payload = statement_bytes()
    both = policy([keys["ed25519"], keys["ecdsa"]], threshold=2)
    for keyids in ([keys["ed25519"].keyid, ""], ["", keys["ed25519"].keyid], ["", ""]):
        env = _envelope(payload, [keys["ed25519"], keys["ed25519"]], keyids=keyids)
        with pytest.raises(mf.ManifestError) as err:
            mf.verify_signatures(env, both)
        assert err.value.reason == "threshold_not_met", keyids
        assert str(err.value) == "1 distinct trusted key(s) signed (%s); the trust policy requires 2" \
            % keys["ed25519"].keyid
    ok = _envelope(payload, [keys["ed25519"], keys["ecdsa"]], keyids=["", ""])
    assert mf.verify_signatures(ok, both) == [keys["ed25519"].keyid, keys["ecdsa"].keyid]


def test_signature_with_an_unknown_keyid_is_tried_against_trusted_keys(keys):
    """keyid is an unauthenticated hint: a wrong hint neither hides nor adds a trusted key."""
    payload = statement_bytes()
    hint = "0" * 64
    env = _envelope(payload, [keys["ecdsa"]], keyids=[hint])
    assert mf.verify_signatures(env, policy([keys["ed25519"], keys["ecdsa"]])) == [keys["ecdsa"].keyid]
    twice = _envelope(payload, [keys["ecdsa"], keys["ecdsa"]], keyids=[keys["ecdsa"].keyid, hint])
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(twice, policy([keys["ed25519"], keys["ecdsa"]], threshold=2))
    assert err.value.reason == "threshold_not_met"
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(env, policy([keys["ed25519"]]))
    assert err.value.reason == "untrusted_key"
    assert str(err.value) == "signed only by keys outside the trust policy: %s" % hint


def test_signature_covers_the_payload_type(keys):
    payload = statement_bytes()
    sig = keys["ed25519"].sign(mf.pae("text/plain", payload))
    env = _envelope(payload, [keys["ed25519"]], signatures=[sig])
    with pytest.raises(mf.ManifestError) as err:
        mf.verify_signatures(env, policy([keys["ed25519"]]))
    assert err.value.reason == "signature_invalid"


# ----------------------------------------------------------------------------- rollback and time

def _statement(sequence=5, created=None, expires=None):
    return mf.parse_statement(statement_bytes(sequence=sequence, created_at=created or NOW - timedelta(hours=1),
                                              expires_at=expires or NOW + timedelta(days=1)))


def test_rollback_rules():
    st = _statement(5)
    state = {"orders-db": {"sequence": 5, "manifest_sha256": "a" * 64, "payload_sha256": "b" * 64}}
    assert mf.check_rollback({}, st, "c" * 64, "d" * 64) is None
    assert mf.check_rollback(state, st, "a" * 64, "x" * 64) is None          # same manifest
    assert mf.check_rollback(state, st, "c" * 64, "b" * 64) is None          # same statement, more signatures
    assert mf.check_rollback(state, st, "c" * 64, "d" * 64).reason == "rollback"  # equivocation
    assert mf.check_rollback(state, _statement(4), "a" * 64, "b" * 64).reason == "rollback"
    assert mf.check_rollback(state, _statement(6), "c" * 64, "d" * 64) is None
    legacy = {"orders-db": {"sequence": 5, "manifest_sha256": "a" * 64}}
    assert mf.check_rollback(legacy, st, "c" * 64, "b" * 64).reason == "rollback"


@pytest.mark.parametrize("data, message", [
    (b"[]", "the trusted state is not a JSON object"),
    (b'{"x": {"sequence": "1", "manifest_sha256": "' + b"a" * 64 + b'"}}',
     "trusted state entry 'x' must have an integer sequence and a manifest_sha256"),
    (b'{"x": {"sequence": 1, "manifest_sha256": "short"}}',
     "trusted state entry 'x' must have an integer sequence and a manifest_sha256"),
    (b"{", "the trusted state is not valid JSON"),
])
def test_trusted_state_validation(data, message):
    with pytest.raises(mf.PolicyError) as err:
        mf.parse_trusted_state(data)
    assert str(err.value).startswith(message), str(err.value)


def test_times():
    assert mf.check_times(_statement(), NOW, None) == []
    expired = _statement(created=NOW - timedelta(days=2), expires=NOW - timedelta(seconds=1))
    assert [e.reason for e in mf.check_times(expired, NOW, None)] == ["manifest_expired"]
    assert [e.reason for e in mf.check_times(expired, NOW, 3600)] == ["manifest_expired", "stale_backup"]
    assert mf.check_times(_statement(), NOW, 3601) == []
    assert [e.reason for e in mf.check_times(_statement(), NOW, 3599)] == ["stale_backup"]


def test_created_in_the_future_beyond_clock_skew_is_malformed():
    """A manifest from the future would pass max_age and report RPO 0: refused beyond the skew."""
    future = _statement(created=NOW + timedelta(seconds=301), expires=NOW + timedelta(days=1))
    problems = mf.check_times(future, NOW, 3600)
    assert [e.reason for e in problems] == ["manifest_malformed"]
    assert problems[0].detail == ("created_at %s is 301 s in the future, beyond the allowed clock skew of 300 s; "
                                  "check the producer's clock" % future.created_at)
    assert [e.reason for e in mf.check_times(future, NOW, None)] == ["manifest_malformed"]
    assert [e.reason for e in mf.check_times(future, NOW, None, max_clock_skew=400)] == []
    within = _statement(created=NOW + timedelta(seconds=300), expires=NOW + timedelta(days=1))
    assert mf.check_times(within, NOW, 3600) == []


def test_a_signed_statement_round_trips_through_the_helpers(keys):
    files = sample_files("u")
    data = sign_statement(make_statement("s", 1, artifacts_for(files)), [keys["ecdsa"]])
    env = mf.parse_envelope(data)
    assert mf.verify_signatures(env, policy([keys["ecdsa"]])) == [keys["ecdsa"].keyid]
    kinds = {n: a.kind for n, a in mf.parse_statement(env.payload).artifacts.items()}
    assert kinds == {"orders.sqlite": "sqlite", "files.tar": "tar", "logs/app.log": "raw"}


# ----------------------------------------------------------------------------- store checksums and streaming

def _b64(hexdigest):
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def test_whole_object_sha256_rules():
    digest = hashlib.sha256(b"x").hexdigest()
    assert art.whole_object_sha256({"ChecksumSHA256": _b64(digest)}) == digest
    assert art.whole_object_sha256({"ChecksumSHA256": _b64(digest), "ChecksumType": "FULL_OBJECT",
                                    "ETag": '"abc-3"'}) == digest
    assert art.whole_object_sha256({"ChecksumSHA256": _b64(digest) + "-3"}) is None
    assert art.whole_object_sha256({"ChecksumSHA256": _b64(digest), "ChecksumType": "COMPOSITE"}) is None
    assert art.whole_object_sha256({"ChecksumSHA256": _b64(digest), "ETag": '"abc-2"'}) is None
    assert art.whole_object_sha256({}) is None
    assert art.whole_object_sha256({"ChecksumSHA256": "!!"}).startswith("unparseable")


def test_hash_chunks_stops_one_byte_past_the_limit():
    chunks = iter([b"a" * 10] * 1000)
    hashed = art.hash_chunks(chunks, limit=25)
    assert hashed.over_limit and hashed.size == 26 and hashed.sha256 is None
    assert next(chunks) == b"a" * 10  # the rest was never consumed
    exact = art.hash_chunks(iter([b"abc", b"de"]), limit=5)
    assert not exact.over_limit and exact.size == 5 and exact.sha256 == hashlib.sha256(b"abcde").hexdigest()


def test_file_chunks_reads_at_most_size_plus_one():
    class Counting(io.BytesIO):
        read_total = 0

        def read(self, n=-1):
            out = super().read(n)
            Counting.read_total += len(out)
            return out

    handle = Counting(b"z" * (5 * 1024 * 1024))
    hashed = art.hash_chunks(art.file_chunks(handle, 100), 100)
    assert hashed.over_limit and Counting.read_total == 101


@pytest.mark.parametrize("head, kind", [(b"SQLite format 3\x00rest", "sqlite"),
                                        (b"\x00" * 257 + b"ustar\x0000", "tar"),
                                        (b"\x1f\x8b\x08", "raw"), (b"", "raw")])
def test_detect_kind(head, kind):
    assert art.detect_kind(head) == kind


@pytest.mark.parametrize("key_id, region", [
    ("arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", "eu-west-3"),
    ("arn:aws:kms:us-east-1:111122223333:alias/signer", "us-east-1"),
    ("1234abcd-12ab-34cd-56ef-1234567890ab", None),
    ("alias/signer", None),
])
def test_kms_region(key_id, region):
    assert mf.kms_region(key_id) == region



# ----------------------------------------------------------------------------- backends without a module

def _no_client(service, **kwargs):
    raise AssertionError("no AWS client is needed here, %s was asked for" % service)


def _verify_params(**kwargs):
    params = {"manifest": None, "source": None, "trust_policy": None, "trusted_state": None,
              "update_trusted_state": True, "expected_backup_set": None, "max_age": None,
              "max_clock_skew": mf.DEFAULT_CLOCK_SKEW, "require_object_lock": "compliance", "strict": True,
              "mode": "full", "workers": 2}
    params.update(kwargs)
    return params


@pytest.fixture
def local_gate(tmp_path, keys):
    files = sample_files("backend")
    root = write_local_set(str(tmp_path / "set"), files)
    manifest = tmp_path / "manifest.dsse.json"
    manifest.write_bytes(sign_statement(make_statement("orders-db", 7, artifacts_for(files)), [keys["ed25519"]]))
    trust = write_trust_policy(str(tmp_path / "trust.json"), [keys["ed25519"]])
    return _verify_params(manifest=str(manifest), source=root, trust_policy=trust,
                          trusted_state=str(tmp_path / "state" / "trusted.json"))


def test_verifier_backend_verifies_and_records_without_a_module(local_gate):
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import Verifier
    verifier = Verifier(local_gate, _no_client, warn=pytest.fail)
    msg = verifier.run()
    assert msg.startswith("Backup set orders-db sequence 7 verified: 3 artifact(s)")
    assert verifier.result["verified"] is True and verifier.result["trusted_state_updated"] is True
    assert json.loads(Path(local_gate["trusted_state"]).read_text())["orders-db"]["sequence"] == 7


def test_verifier_backend_raises_one_error_with_the_result(local_gate):
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import Verifier
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import VerifyError
    with open(Path(local_gate["source"]) / "files.tar", "r+b") as handle:
        handle.write(b"X")
    verifier = Verifier(local_gate, _no_client, warn=pytest.fail)
    with pytest.raises(VerifyError) as err:
        verifier.run()
    assert err.value.aws_error is None and "digest_mismatch" in str(err.value)
    assert [f["reason"] for f in verifier.result["failures"]] == ["digest_mismatch"]
    assert verifier.result["verified"] is False and not Path(local_gate["trusted_state"]).exists()
    with pytest.raises(VerifyError, match="^workers must be at least 1$"):
        Verifier(dict(local_gate, workers=-1), _no_client, warn=pytest.fail).run()


def test_verifier_backend_asks_for_the_kms_client_of_the_key_region(local_gate):
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import Verifier
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import VerifyError
    from botocore.exceptions import ClientError
    arn = "arn:aws:kms:eu-west-3:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    Path(local_gate["trust_policy"]).write_text(json.dumps({"threshold": 1, "keys": [{"kms_key_id": arn}]}))
    asked = []

    class DeniedKms:
        def get_public_key(self, **kwargs):
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GetPublicKey")

    def client(service, **kwargs):
        asked.append((service, kwargs))
        return DeniedKms()

    with pytest.raises(VerifyError) as err:
        Verifier(local_gate, client, warn=pytest.fail).run()
    assert asked == [("kms", {"region": "eu-west-3"})]
    assert str(err.value) == "Could not fetch a KMS public key of the trust policy"
    assert isinstance(err.value.aws_error, ClientError)


def _sign_params(**kwargs):
    params = {"source": None, "dest": None, "backup_set": "orders-db", "sequence": 1, "created_at": None,
              "expires_at": None, "ttl": 3600, "tier": None, "kinds": None, "private_key_path": None,
              "private_key_passphrase": None, "kms_key_id": None, "envelope": None, "workers": 2, "expect": None}
    params.update(kwargs)
    return params


def _signed_predicate(dest) -> dict:
    envelope = mf.parse_envelope(Path(dest).read_bytes())
    return json.loads(envelope.payload)["predicate"]["artifacts"]


def test_signer_detects_compressed_tars_by_content_and_records_sqlite_expectations(tmp_path, keys):
    import bz2
    import gzip
    import lzma

    from ansible_collections.drguard.sandbox.plugins.module_utils._sign import Signer
    from helpers_artifacts import tar_bytes
    tar = tar_bytes()
    files = {"orders.sqlite": sample_files("x")["orders.sqlite"], "files.tgz": gzip.compress(tar),
             "files.tar.bz2": bz2.compress(tar), "files.bin": lzma.compress(tar),
             "dump.sql.gz": gzip.compress(b"COPY orders FROM stdin;\n"), "plain.tar": tar}
    root = write_local_set(str(tmp_path / "set"), files)
    dest = tmp_path / "out.dsse.json"
    key_path = keys["ed25519"].write_private(str(tmp_path / "key.pem"))
    params = _sign_params(source=root, dest=str(dest), private_key_path=key_path,
                          expect={"*.sqlite": {"tables": {"orders": 10}}})
    Signer(params, _no_client).run()
    entries = _signed_predicate(dest)
    assert {n: e["kind"] for n, e in entries.items()} == {
        "orders.sqlite": "sqlite", "files.tgz": "tar", "files.tar.bz2": "tar", "files.bin": "tar",
        "dump.sql.gz": "raw", "plain.tar": "tar"}
    assert entries["orders.sqlite"]["expect"] == {"tables": {"orders": 10}}
    assert [n for n, e in entries.items() if "expect" in e] == ["orders.sqlite"]


@pytest.mark.parametrize("expect, message", [
    ({"files.tar": {"tables": {"t": 1}}}, "expect['files.tar'] cannot apply to files.tar: expect is only for kind "
                                          "sqlite, not tar"),
    ({"orders.sqlite": {"tables": {"t": 1}, "views": {}}},
     "expect['orders.sqlite'] cannot apply to orders.sqlite: expect has unknown field(s) views; only tables"),
    ({"*.db": {"tables": {"t": 1}}}, "expect['*.db'] matches no artifact of the source; check the name"),
])
def test_signer_refuses_a_bad_expectation_before_signing(tmp_path, keys, expect, message):
    from ansible_collections.drguard.sandbox.plugins.module_utils._sign import SignError
    from ansible_collections.drguard.sandbox.plugins.module_utils._sign import Signer
    root = write_local_set(str(tmp_path / "set"), sample_files("e"))
    dest = tmp_path / "out.dsse.json"
    key_path = keys["ed25519"].write_private(str(tmp_path / "key.pem"))
    with pytest.raises(SignError) as err:
        Signer(_sign_params(source=root, dest=str(dest), private_key_path=key_path, expect=expect), _no_client).run()
    assert str(err.value) == message
    assert not dest.exists()


def test_signer_backend_without_a_module(tmp_path, keys):
    from ansible_collections.drguard.sandbox.plugins.module_utils._sign import SignError
    from ansible_collections.drguard.sandbox.plugins.module_utils._sign import Signer
    root = write_local_set(str(tmp_path / "set"), sample_files("signer"))
    key_path = keys["ecdsa"].write_private(str(tmp_path / "key.pem"))
    dest = tmp_path / "out.dsse.json"
    # One created_at for every run: with none, each run signs "now", and two runs a second apart
    # sign different payloads (not idempotent by design; the test flaked on that).
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    params = _sign_params(source=root, dest=str(dest), private_key_path=key_path, created_at=created)
    changed, result = Signer(dict(params), _no_client, check_mode=True).run()
    assert changed is True and result["keyids"] == [keys["ecdsa"].keyid] and not dest.exists()
    changed, result = Signer(dict(params), _no_client).run()
    assert changed is True and result["manifest_sha256"] == mf.sha256_hex(dest.read_bytes())
    assert Signer(dict(params), _no_client).run()[0] is False
    with pytest.raises(SignError, match="give exactly one of expires_at or ttl"):
        Signer(dict(params, ttl=None), _no_client).run()
    with pytest.raises(SignError, match="resolves outside the source directory"):
        (Path(root) / "escape").symlink_to(key_path)
        Signer(dict(params), _no_client).run()
    with pytest.raises(SignError, match="^cannot read private_key_path %s: No such file or directory$"
                       % (tmp_path / "missing.pem")):
        Signer(dict(params, private_key_path=str(tmp_path / "missing.pem")), _no_client).run()


def test_record_accepted_backend_raises_state_error_with_reason(tmp_path):
    from ansible_collections.drguard.sandbox.plugins.module_utils._trusted_state import record_accepted
    from ansible_collections.drguard.sandbox.plugins.module_utils._trusted_state import StateError
    location = tmp_path / "state.json"
    params = {"trusted_state": str(location), "backup_set": "orders-db", "sequence": 5,
              "manifest_sha256": "a" * 64, "payload_sha256": None}
    result = record_accepted(params, _no_client, check_mode=True, result={})
    assert result["changed"] is True and result["previous"] is None and not location.exists()
    assert record_accepted(params, _no_client, check_mode=False, result={})["changed"] is True
    lower = {}
    with pytest.raises(StateError) as err:
        record_accepted(dict(params, sequence=4), _no_client, check_mode=False, result=lower)
    assert err.value.reason == "rollback" and str(err.value).startswith("Refusing to record orders-db sequence 4")
    assert lower["previous"]["sequence"] == 5 and lower["changed"] is False
    with pytest.raises(StateError) as err:
        record_accepted(dict(params, trusted_state="s3://Bad_Bucket/x"), _no_client, check_mode=False, result={})
    assert err.value.reason is None and str(err.value).startswith("Trusted_state 's3://Bad_Bucket/x'")
