"""sign_manifest: round trips for every key type (sign, verify, tamper, verify again), local and S3,
KMS keys in the emulator, co-signing, idempotence, check mode and no key material in results."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from helpers_artifacts import create_kms_key
from helpers_artifacts import create_locked_bucket
from helpers_artifacts import generate_key
from helpers_artifacts import KmsKey
from helpers_artifacts import sample_files
from helpers_artifacts import throttle_first_calls
from helpers_artifacts import unique
from helpers_artifacts import upload_set
from helpers_artifacts import write_local_set
from helpers_artifacts import write_trust_policy

CREATED = "2026-11-28T01:00:00Z"


def _envelope(path):
    with open(path, "rb") as handle:
        data = handle.read()
    env = mf.parse_envelope(data)
    return env, mf.parse_statement(env.payload), data


def _flip(path, offset=60):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x80]))


@pytest.fixture
def local_set(tmp_path):
    files = sample_files(unique())
    root = write_local_set(str(tmp_path / "set"), files)
    return root, files


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_local_round_trip_every_key_type(module_runner, tmp_path, local_set, kind):
    root, files = local_set
    key = generate_key(kind)
    key_path = key.write_private(str(tmp_path / "key.pem"))
    dest = str(tmp_path / "out" / "manifest.dsse.json")
    signed = module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "orders-db",
                                             "sequence": 42, "ttl": 3600, "tier": "tier-1",
                                             "private_key_path": key_path, "workers": 3})
    assert not signed.failed, signed
    assert signed["changed"] is True and signed["keyid"] == key.keyid and signed["keyids"] == [key.keyid]
    assert signed["artifacts"] == 3 and signed["dest"] == dest
    assert signed["scheme"] == {"ed25519": mf.SCHEME_ED25519, "ecdsa": mf.SCHEME_ECDSA, "rsa": mf.SCHEME_RSA_PSS}[kind]
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
    env, statement, data = _envelope(dest)
    assert signed["payload_sha256"] == hashlib.sha256(env.payload).hexdigest()
    assert signed["manifest_sha256"] == hashlib.sha256(data).hexdigest()
    assert {n: (a.sha256, a.size, a.kind, a.version_id) for n, a in statement.artifacts.items()} == {
        n: (hashlib.sha256(b).hexdigest(), len(b), {"orders.sqlite": "sqlite", "files.tar": "tar"}.get(n, "raw"), None)
        for n, b in files.items()}
    assert statement.tier == "tier-1" and statement.sequence == 42

    policy = write_trust_policy(str(tmp_path / "trust.json"), [key])
    args = {"manifest": dest, "source": root, "trust_policy": policy}
    assert module_runner("verify_artifacts", args)["verified"] is True
    _flip(os.path.join(root, "files.tar"))
    again = module_runner("verify_artifacts", args)
    assert [(f["name"], f["reason"]) for f in again["failures"]] == [("files.tar", "digest_mismatch")]


def test_check_mode_writes_nothing_and_idempotence(module_runner, tmp_path, local_set):
    root, _files = local_set
    key = generate_key("ecdsa")  # ECDSA signatures are randomized: idempotence must not depend on bytes
    key_path = key.write_private(str(tmp_path / "key.pem"))
    dest = str(tmp_path / "m.dsse.json")
    args = {"source": root, "dest": dest, "backup_set": "orders-db", "sequence": 1, "created_at": CREATED,
            "expires_at": "2099-01-01T00:00:00Z", "private_key_path": key_path}
    checked = module_runner("sign_manifest", args, check_mode=True)
    assert checked["changed"] is True and not os.path.exists(dest)
    assert checked["keyid"] == key.keyid and checked["manifest_sha256"] is None
    first = module_runner("sign_manifest", args)
    assert first["changed"] is True
    before = Path(dest).read_bytes()
    second = module_runner("sign_manifest", args)
    assert second["changed"] is False and Path(dest).read_bytes() == before
    assert second["manifest_sha256"] == first["manifest_sha256"]
    assert module_runner("sign_manifest", args, check_mode=True)["changed"] is False
    bumped = module_runner("sign_manifest", dict(args, sequence=2))
    assert bumped["changed"] is True and _envelope(dest)[1].sequence == 2


def test_encrypted_key_and_no_key_material_in_results(module_runner, tmp_path, local_set):
    root, _files = local_set
    key = generate_key("rsa")
    passphrase = "s3cret-" + unique()
    key_path = key.write_private(str(tmp_path / "key.pem"), passphrase)
    dest = str(tmp_path / "m.dsse.json")
    args = {"source": root, "dest": dest, "backup_set": "orders-db", "sequence": 1, "ttl": 60,
            "private_key_path": key_path}
    wrong = module_runner("sign_manifest", dict(args, private_key_passphrase="wrong-" + passphrase))
    assert wrong.failed and "passphrase" in wrong["msg"]
    none = module_runner("sign_manifest", args)
    assert none.failed and "encrypted" in none["msg"]
    ok = module_runner("sign_manifest", dict(args, private_key_passphrase=passphrase))
    assert not ok.failed, ok
    pem_body = key.private_pem().decode().splitlines()[1]
    for result in (wrong, none, ok):
        text = json.dumps(result)
        assert passphrase not in text and pem_body not in text


def test_kinds_override_and_dest_inside_source_is_skipped(module_runner, tmp_path, local_set):
    root, _files = local_set
    key_path = generate_key().write_private(str(tmp_path / "key.pem"))
    dest = os.path.join(root, "manifest.dsse.json")
    result = module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "b", "sequence": 1,
                                             "ttl": 60, "private_key_path": key_path,
                                             "kinds": {"files.tar": "raw", "logs/*": "tar"}})
    assert result["artifacts"] == 3
    kinds = {n: a.kind for n, a in _envelope(dest)[1].artifacts.items()}
    assert kinds == {"orders.sqlite": "sqlite", "files.tar": "raw", "logs/app.log": "tar"}
    again = module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "b", "sequence": 2,
                                            "ttl": 60, "private_key_path": key_path})
    assert again["artifacts"] == 3  # the previous manifest in the directory is not an artifact


@pytest.mark.parametrize("args, words", [
    ({"ttl": None}, "expires_at or ttl"),
    ({"expires_at": "2020-01-01T00:00:00Z", "ttl": None, "created_at": CREATED}, "not after"),
    ({"backup_set": "../evil"}, "backup_set"),
    ({"kinds": {"x": "zip"}}, "kinds"),
    ({"created_at": "yesterday"}, "RFC 3339"),
])
def test_bad_input_fails_before_signing(module_runner, tmp_path, local_set, args, words):
    root, _files = local_set
    key_path = generate_key().write_private(str(tmp_path / "key.pem"))
    dest = str(tmp_path / "m.json")
    base = {"source": root, "dest": dest, "backup_set": "b", "sequence": 1, "ttl": 60, "private_key_path": key_path}
    base.update(args)
    result = module_runner("sign_manifest", {k: v for k, v in base.items() if v is not None})
    assert result.failed and words in result["msg"], result["msg"]
    assert not os.path.exists(dest)


def test_unsupported_keys_and_escaping_symlinks_are_refused(module_runner, tmp_path, local_set):
    root, _files = local_set
    for kind in ("ecdsa-p384", "rsa-1024"):
        key_path = generate_key(kind).write_private(str(tmp_path / (kind + ".pem")))
        result = module_runner("sign_manifest", {"source": root, "dest": str(tmp_path / "m.json"), "backup_set": "b",
                                                 "sequence": 1, "ttl": 60, "private_key_path": key_path})
        assert result.failed and ("P-256" in result["msg"] or "2048" in result["msg"])
    outside = tmp_path / "secret.txt"
    outside.write_text("outside")
    os.symlink(str(outside), os.path.join(root, "link.txt"))
    key_path = generate_key().write_private(str(tmp_path / "k.pem"))
    result = module_runner("sign_manifest", {"source": root, "dest": str(tmp_path / "m.json"), "backup_set": "b",
                                             "sequence": 1, "ttl": 60, "private_key_path": key_path})
    assert result.failed and "outside the source" in result["msg"]


def test_cosign_threshold_two(module_runner, tmp_path, local_set):
    root, _files = local_set
    first, second = generate_key("ed25519"), generate_key("rsa")
    p1 = first.write_private(str(tmp_path / "k1.pem"))
    p2 = second.write_private(str(tmp_path / "k2.pem"))
    dest = str(tmp_path / "m.dsse.json")
    module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "orders-db", "sequence": 3,
                                    "ttl": 3600, "private_key_path": p1})
    payload = _envelope(dest)[0].payload
    policy = write_trust_policy(str(tmp_path / "trust.json"), [first, second], threshold=2)
    verify = {"manifest": dest, "source": root, "trust_policy": policy}
    one = module_runner("verify_artifacts", verify)
    assert [f["reason"] for f in one["failures"]] == ["threshold_not_met"]

    cosign = {"source": root, "envelope": dest, "dest": dest, "private_key_path": p2, "sequence": 3}
    co = module_runner("sign_manifest", cosign)
    assert not co.failed, co
    assert co["changed"] is True and co["keyids"] == [first.keyid, second.keyid] and co["keyid"] == second.keyid
    env = _envelope(dest)[0]
    assert env.payload == payload  # signed unchanged
    assert module_runner("verify_artifacts", verify)["verified"] is True
    assert module_runner("sign_manifest", cosign)["changed"] is False

    wrong_seq = module_runner("sign_manifest", dict(cosign, sequence=4))
    assert wrong_seq.failed and "sequence" in wrong_seq["msg"]
    mixed = module_runner("sign_manifest", dict(cosign, ttl=60))
    assert mixed.failed and "ttl" in mixed["msg"]
    _flip(os.path.join(root, "orders.sqlite"), 200)
    third = generate_key("ecdsa").write_private(str(tmp_path / "k3.pem"))
    refused = module_runner("sign_manifest", dict(cosign, private_key_path=third))
    assert refused.failed and "no longer matches" in refused["msg"] and "orders.sqlite" in refused["msg"]


def test_s3_source_pins_versions_and_s3_dest(module_runner, tmp_path, aws):
    s3 = aws("s3")
    bucket = create_locked_bucket(s3)
    prefix = unique("orders") + "/"
    files = sample_files(unique())
    versions = upload_set(s3, bucket, prefix, files)
    key = generate_key("ecdsa")
    key_path = key.write_private(str(tmp_path / "key.pem"))
    dest = "s3://%s/manifests/%s.dsse.json" % (bucket, prefix.strip("/"))
    signed = module_runner("sign_manifest", {"source": "s3://%s/%s" % (bucket, prefix), "dest": dest,
                                             "backup_set": "orders-db", "sequence": 9, "ttl": 3600,
                                             "private_key_path": key_path, "workers": 4})
    assert not signed.failed, signed
    assert signed["version_id"]
    obj = s3.get_object(Bucket=bucket, Key="manifests/%s.dsse.json" % prefix.strip("/"),
                        VersionId=signed["version_id"])
    statement = mf.parse_statement(mf.parse_envelope(obj["Body"].read()).payload)
    assert {n: a.version_id for n, a in statement.artifacts.items()} == versions
    policy = write_trust_policy(str(tmp_path / "trust.json"), [key])
    result = module_runner("verify_artifacts", {"manifest": dest, "source": "s3://%s/%s" % (bucket, prefix),
                                                "trust_policy": policy})
    assert result["verified"] is True, result["failures"]
    # an overwrite after signing does not change what the manifest vouches for
    s3.put_object(Bucket=bucket, Key=prefix + "files.tar", Body=b"overwrite", ChecksumAlgorithm="SHA256")
    assert module_runner("verify_artifacts", {"manifest": dest, "source": "s3://%s/%s" % (bucket, prefix),
                                              "trust_policy": policy, "strict": False})["verified"] is True


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256"])
def test_kms_round_trip(module_runner, tmp_path, local_set, aws, spec):
    root, _files = local_set
    kms = aws("kms")
    kms_id = create_kms_key(kms, spec)["KeyId"]
    dest = str(tmp_path / "m.dsse.json")
    signed = module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "orders-db", "sequence": 1,
                                             "ttl": 3600, "kms_key_id": kms_id})
    assert not signed.failed, signed
    assert signed["keyid"] == KmsKey(kms, kms_id).keyid
    # trust policy by KMS key id (GetPublicKey) and by the exported PEM both verify
    policy = write_trust_policy(str(tmp_path / "trust.json"), [kms_id])
    args = {"manifest": dest, "source": root, "trust_policy": policy}
    assert module_runner("verify_artifacts", args)["verified"] is True
    env = _envelope(dest)[0]
    pub = KmsKey(kms, kms_id).public_key
    assert mf.verify_raw(pub, mf.pae(env.payload_type, env.payload), env.signatures[0].sig)
    _flip(os.path.join(root, "orders.sqlite"), 300)
    assert [f["reason"] for f in module_runner("verify_artifacts", args)["failures"]] == ["digest_mismatch"]


def test_tampered_envelope_payload_is_signature_invalid(module_runner, tmp_path, local_set):
    root, _files = local_set
    key = generate_key()
    dest = str(tmp_path / "m.dsse.json")
    module_runner("sign_manifest", {"source": root, "dest": dest, "backup_set": "b", "sequence": 1, "ttl": 600,
                                    "private_key_path": key.write_private(str(tmp_path / "k.pem"))})
    doc = json.loads(Path(dest).read_text())
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["predicate"]["sequence"] = 1000
    doc["payload"] = base64.b64encode(mf.encode_statement(statement)).decode()
    with open(dest, "w") as handle:
        json.dump(doc, handle)
    policy = write_trust_policy(str(tmp_path / "trust.json"), [key])
    result = module_runner("verify_artifacts", {"manifest": dest, "source": root, "trust_policy": policy})
    assert [(f["name"], f["reason"]) for f in result["failures"]] == [(None, "signature_invalid")]


def test_s3_cosign_hashes_the_pinned_versions(module_runner, tmp_path, aws):
    s3 = aws("s3")
    bucket = create_locked_bucket(s3)
    prefix = unique("orders") + "/"
    files = sample_files(unique())
    upload_set(s3, bucket, prefix, files)
    first, second = generate_key("ecdsa"), generate_key("ed25519")
    source = "s3://%s/%s" % (bucket, prefix)
    dest = "s3://%s/manifests/%s.dsse.json" % (bucket, prefix.strip("/"))
    signed = module_runner("sign_manifest", {"source": source, "dest": dest, "backup_set": "orders-db",
                                             "sequence": 5, "ttl": 3600,
                                             "private_key_path": first.write_private(str(tmp_path / "a.pem"))})
    assert not signed.failed, signed
    # A newer version lands after the first signature: the backup is still the pinned version.
    s3.put_object(Bucket=bucket, Key=prefix + "files.tar", Body=b"newer", ChecksumAlgorithm="SHA256")
    cosign = {"source": source, "envelope": dest, "dest": dest,
              "private_key_path": second.write_private(str(tmp_path / "b.pem"))}
    co = module_runner("sign_manifest", cosign)
    assert not co.failed, co
    assert co["changed"] is True and co["keyids"] == [first.keyid, second.keyid]
    assert co["version_id"] and co["version_id"] != signed["version_id"]
    again = module_runner("sign_manifest", cosign)
    assert again["changed"] is False and again["version_id"] == co["version_id"]
    policy = write_trust_policy(str(tmp_path / "trust.json"), [first, second], threshold=2)
    result = module_runner("verify_artifacts", {"manifest": dest, "source": source, "trust_policy": policy})
    assert result["verified"] is True, result["failures"]
    assert sorted(result["manifest"]["keyids"]) == sorted([first.keyid, second.keyid])


@pytest.fixture
def fast_backoff(monkeypatch):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
    monkeypatch.setattr(_aws, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(_aws, "RETRY_MAX_DELAY", 0.02)


def test_throttled_s3_calls_are_retried(module_runner, tmp_path, aws, fast_backoff):
    s3 = aws("s3")
    bucket = create_locked_bucket(s3)
    prefix = unique("orders") + "/"
    upload_set(s3, bucket, prefix, sample_files(unique()))
    key_path = generate_key("ed25519").write_private(str(tmp_path / "key.pem"))
    dest = "s3://%s/manifests/%s.dsse.json" % (bucket, prefix.strip("/"))
    with throttle_first_calls(bucket) as throttled:
        signed = module_runner("sign_manifest", {"source": "s3://%s/%s" % (bucket, prefix), "dest": dest,
                                                 "backup_set": "orders-db", "sequence": 3, "ttl": 3600,
                                                 "private_key_path": key_path, "workers": 2})
    assert not signed.failed, signed["msg"]
    assert sorted(throttled) == ["GetObject", "HeadObject", "ListObjectsV2", "PutObject"]
    assert signed["changed"] is True and signed["version_id"] and signed["artifacts"] == 3
