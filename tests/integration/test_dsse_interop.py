"""DSSE interoperability with securesystemslib (the in-toto / TUF reference implementation).

Both directions, for every scheme we support: envelopes signed by securesystemslib (its own
keyid convention, or no keyid at all) verify with ``verify_artifacts``; envelopes made by
``sign_manifest`` verify with securesystemslib's DSSE verifier.
"""

from __future__ import annotations

import json

import pytest
from securesystemslib import dsse
from securesystemslib import exceptions as sslib_exceptions
from securesystemslib import signer as sslib_signer
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from helpers_artifacts import artifacts_for
from helpers_artifacts import generate_key
from helpers_artifacts import make_statement
from helpers_artifacts import sample_files
from helpers_artifacts import unique
from helpers_artifacts import write_local_set
from helpers_artifacts import write_trust_policy


KINDS = ["ed25519", "ecdsa", "rsa"]
SSLIB_SCHEME = {"ed25519": "ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "rsassa-pss-sha256"}


def _sslib_signer(key):
    """securesystemslib's own signer for ``key``, with securesystemslib's own keyid."""
    public = sslib_signer.SSlibKey.from_crypto(key.public_key, scheme=SSLIB_SCHEME[key.kind])
    return sslib_signer.CryptoSigner(key.private_key, public)


def _sslib_envelope(statement: dict, signers: list, blank_keyid: bool = False) -> bytes:
    envelope = dsse.Envelope(payload=mf.encode_statement(statement), payload_type=mf.PAYLOAD_TYPE, signatures={})
    for signer in signers:
        envelope.sign(signer)
    doc = envelope.to_dict()
    if blank_keyid:
        for sig in doc["signatures"]:
            sig["keyid"] = ""
    return json.dumps(doc).encode()


def _local_world(tmp_path):
    files = sample_files(unique())
    root = write_local_set(str(tmp_path / "set"), files)
    return root, files


def _verify(module_runner, tmp_path, root, envelope: bytes, keys: list, threshold: int = 1):
    path = tmp_path / "manifest.dsse.json"
    path.write_bytes(envelope)
    policy = write_trust_policy(str(tmp_path / "trust.json"), keys, threshold)
    return module_runner("verify_artifacts", {"manifest": str(path), "source": root, "trust_policy": policy})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blank_keyid", [False, True], ids=["sslib-keyid", "empty-keyid"])
def test_securesystemslib_envelope_verifies(module_runner, tmp_path, kind, blank_keyid):
    root, files = _local_world(tmp_path)
    key = generate_key(kind)
    signer = _sslib_signer(key)
    assert signer.public_key.keyid != key.keyid  # another tool's keyid convention, not ours
    statement = make_statement("orders-db", 7, artifacts_for(files))
    res = _verify(module_runner, tmp_path, root, _sslib_envelope(statement, [signer], blank_keyid), [key])
    assert res.get("verified") is True, res
    assert res["failures"] == []


@pytest.mark.parametrize("kind", KINDS)
def test_securesystemslib_envelope_with_a_flipped_payload_is_refused(module_runner, tmp_path, kind):
    root, files = _local_world(tmp_path)
    key = generate_key(kind)
    statement = make_statement("orders-db", 7, artifacts_for(files))
    doc = json.loads(_sslib_envelope(statement, [_sslib_signer(key)]))
    other = make_statement("orders-db", 8, artifacts_for(files))  # same signature, another payload
    doc["payload"] = mf.b64(mf.encode_statement(other))
    res = _verify(module_runner, tmp_path, root, json.dumps(doc).encode(), [key])
    assert res.get("verified") is False
    assert [f["reason"] for f in res["failures"]] == ["untrusted_key"]


def test_one_key_under_two_keyid_conventions_counts_once(module_runner, tmp_path):
    """Our signature and securesystemslib's, by the same key: one distinct key, threshold 2 not met."""
    root, files = _local_world(tmp_path)
    key = generate_key("ed25519")
    statement = make_statement("orders-db", 7, artifacts_for(files))
    doc = json.loads(_sslib_envelope(statement, [_sslib_signer(key)]))
    payload = mf.encode_statement(statement)
    doc["signatures"].append({"keyid": key.keyid, "sig": mf.b64(key.sign(mf.pae(mf.PAYLOAD_TYPE, payload)))})
    res = _verify(module_runner, tmp_path, root, json.dumps(doc).encode(), [key, generate_key("ecdsa")], threshold=2)
    assert res.get("verified") is False
    assert [f["reason"] for f in res["failures"]] == ["threshold_not_met"]


def test_two_keys_signing_through_securesystemslib_meet_threshold_two(module_runner, tmp_path):
    root, files = _local_world(tmp_path)
    keys = [generate_key("ecdsa"), generate_key("rsa")]
    statement = make_statement("orders-db", 7, artifacts_for(files))
    envelope = _sslib_envelope(statement, [_sslib_signer(k) for k in keys], blank_keyid=True)
    res = _verify(module_runner, tmp_path, root, envelope, keys, threshold=2)
    assert res.get("verified") is True, res


@pytest.mark.parametrize("kind", KINDS)
def test_sign_manifest_envelope_verifies_with_securesystemslib(module_runner, tmp_path, kind):
    root, _files = _local_world(tmp_path)
    key = generate_key(kind)
    dest = tmp_path / "out" / "manifest.dsse.json"
    signed = module_runner("sign_manifest", {"source": root, "dest": str(dest), "backup_set": "orders-db",
                                             "sequence": 1, "ttl": 3600,
                                             "private_key_path": key.write_private(str(tmp_path / "k.pem"))})
    assert not signed.failed, signed
    envelope = dsse.Envelope.from_dict(json.loads(dest.read_bytes()))
    # Their verifier matches signatures to keys by keyid: give it our keyid for the key.
    public = sslib_signer.SSlibKey.from_crypto(key.public_key, keyid=key.keyid, scheme=SSLIB_SCHEME[kind])
    accepted = envelope.verify([public], 1)
    assert list(accepted) == [key.keyid]
    assert json.loads(envelope.payload)["predicate"]["backup_set"] == "orders-db"
    # And the same check refuses a key that did not sign.
    stranger = generate_key(kind)
    other = sslib_signer.SSlibKey.from_crypto(stranger.public_key, keyid=key.keyid, scheme=SSLIB_SCHEME[kind])
    with pytest.raises(sslib_exceptions.VerificationError, match="Found: 0, Expected 1"):
        envelope.verify([other], 1)
