"""Test helpers for backup sets, signing keys and manifests (docs/manifest.md).

Import from any test (``tests/`` is on ``sys.path`` through conftest)::

    from helpers_artifacts import generate_key, sample_files, write_local_set, sign_statement, ...

Keys: :func:`generate_key` (``ed25519``, ``ecdsa``, ``rsa``), :func:`create_kms_key` (moto).
Backup sets: :func:`sample_files`, :func:`write_local_set`, :func:`create_locked_bucket`,
:func:`upload_set`. Manifests: :func:`artifacts_for`, :func:`make_statement`,
:func:`sign_payload` / :func:`sign_statement` (any payload, for hostile cases too),
:func:`write_trust_policy`, :func:`unique`. Faults: :func:`throttle_first_calls`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import sqlite3
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime
from datetime import timedelta
from datetime import UTC

from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._artifacts import detect_kind
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import rsa
from faults import throttle

KEY_KINDS = ("ed25519", "ecdsa", "rsa")


def unique(prefix: str = "t") -> str:
    """A name no other test uses (tests share one emulator per worker)."""
    return "%s-%s" % (prefix, secrets.token_hex(5))


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- keys

@dataclass
class KeyPair:
    kind: str
    private_key: object

    @property
    def public_key(self):
        return self.private_key.public_key()

    @property
    def public_pem(self) -> str:
        return self.public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def keyid(self) -> str:
        return mf.keyid_for(self.public_key)

    def private_pem(self, passphrase: str | None = None) -> bytes:
        enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
               else serialization.NoEncryption())
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    def write_private(self, path: str, passphrase: str | None = None) -> str:
        with open(path, "wb") as handle:
            handle.write(self.private_pem(passphrase))
        os.chmod(path, 0o600)
        return path

    def sign(self, message: bytes) -> bytes:
        """A correct signature under this key's scheme (as sign_manifest makes it)."""
        return mf.LocalSigner(self.private_pem()).sign(message)

    def sign_pkcs1v15(self, message: bytes) -> bytes:
        """RSA PKCS#1 v1.5 SHA-256 (the wrong scheme for our RSA keys, which are PSS)."""
        return self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def generate_key(kind: str = "ed25519", bits: int = 2048) -> KeyPair:
    """A fresh key: ``ed25519``, ``ecdsa`` (P-256), ``rsa`` (``bits``), ``ecdsa-p384`` or ``rsa-1024`` (unsupported)."""
    if kind == "ed25519":
        return KeyPair(kind, ed25519.Ed25519PrivateKey.generate())
    if kind == "ecdsa":
        return KeyPair(kind, ec.generate_private_key(ec.SECP256R1()))
    if kind == "ecdsa-p384":
        return KeyPair(kind, ec.generate_private_key(ec.SECP384R1()))
    if kind == "rsa":
        return KeyPair(kind, rsa.generate_private_key(public_exponent=65537, key_size=bits))
    if kind == "rsa-1024":
        return KeyPair(kind, rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505 - to prove it is refused
    raise ValueError("unknown key kind %r" % kind)


def create_kms_key(kms, spec: str = "ECC_NIST_P256") -> dict:
    """An asymmetric SIGN_VERIFY KMS key (moto): ``{"KeyId", "Arn"}``."""
    meta = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec=spec, Description=unique("drguard-test"))["KeyMetadata"]
    return {"KeyId": meta["KeyId"], "Arn": meta["Arn"]}


class KmsKey:
    """A KMS key usable like a KeyPair in :func:`sign_payload` and :func:`write_trust_policy`."""

    def __init__(self, kms, key_id: str):
        self._signer = mf.KmsSigner(kms, key_id)
        self.key_id = key_id
        self.keyid = self._signer.keyid
        self.public_key = self._signer.public_key

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)


# --------------------------------------------------------------------------- backup sets

def sqlite_bytes(rows: int = 50, tag: str = "") -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "db.sqlite")
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount INTEGER)")
        con.executemany("INSERT INTO orders (customer, amount) VALUES (?, ?)",
                        [("c%s-%d" % (tag, i), i * 7) for i in range(rows)])
        con.commit()
        con.close()
        with open(path, "rb") as handle:
            return handle.read()


def tar_bytes(files: dict | None = None) -> bytes:
    files = files or {"config/app.yml": b"listen: 8443\n", "uploads/a.txt": b"invoice\n" * 100}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = 1764288000
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def sample_files(tag: str = "") -> dict:
    """A small backup set: a SQLite database, a tar archive, a nested raw file."""
    return {"orders.sqlite": sqlite_bytes(tag=tag), "files.tar": tar_bytes(),
            "logs/app.log": ("log line %s\n" % tag).encode() * 300}


def write_local_set(root: str, files: dict) -> str:
    """Write ``files`` (name -> bytes) under ``root``; returns ``root``."""
    for name, body in files.items():
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(body)
    return root


def create_locked_bucket(s3, name: str | None = None, mode: str | None = "COMPLIANCE", days: int = 1) -> str:
    """A versioned bucket with Object Lock enabled and (unless ``mode`` is None) a default retention."""
    name = name or unique("drguard-bk")
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    if mode:
        s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}}})
    return name


def create_versioned_bucket(s3, name: str | None = None) -> str:
    """A versioned bucket without Object Lock."""
    name = name or unique("drguard-bk")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def upload_set(s3, bucket: str, prefix: str, files: dict, **put_kwargs) -> dict:
    """PutObject every file (with a SHA-256 checksum); returns name -> version id."""
    versions = {}
    for name, body in files.items():
        kwargs = {"ChecksumAlgorithm": "SHA256"}
        kwargs.update(put_kwargs)
        resp = s3.put_object(Bucket=bucket, Key=prefix + name, Body=body, **kwargs)
        versions[name] = resp.get("VersionId")
    return versions


# --------------------------------------------------------------------------- manifests

def artifacts_for(files: dict, versions: dict | None = None) -> list:
    """Manifest entries (:class:`Artifact`) describing ``files`` as they are."""
    versions = versions or {}
    return [mf.Artifact(name, hashlib.sha256(body).hexdigest(), len(body), detect_kind(body[:512]),
                        versions.get(name)) for name, body in files.items()]


def make_statement(backup_set: str, sequence: int, artifacts: list, *, created_at: datetime | str | None = None,
                   expires_at: datetime | str | None = None, tier: str | None = "tier-1") -> dict:
    """A valid Statement dict (created a minute ago, expiring in a day unless given)."""
    now = datetime.now(UTC)
    created = created_at or now - timedelta(minutes=1)
    expires = expires_at or now + timedelta(days=1)
    created = created if isinstance(created, str) else rfc3339(created)
    expires = expires if isinstance(expires, str) else rfc3339(expires)
    return mf.build_statement(backup_set, sequence, created, expires, artifacts, tier=tier)


def sign_payload(payload: bytes, keys: list, *, keyids: list | None = None, payload_type: str = mf.PAYLOAD_TYPE,
                 signatures: list | None = None) -> bytes:
    """Envelope bytes for any payload, signed by ``keys`` (KeyPair / KmsKey / anything with sign+keyid).

    ``keyids`` overrides the keyid written for each signature; ``signatures`` (raw bytes)
    overrides the signature values (for hostile cases).
    """
    message = mf.pae(payload_type, payload)
    sigs = []
    for i, key in enumerate(keys):
        sig = signatures[i] if signatures else key.sign(message)
        sigs.append(mf.Signature(keyids[i] if keyids else key.keyid, sig))
    return mf.Envelope(payload_type, payload, sigs).to_bytes()


def sign_statement(statement: dict, keys: list, **kwargs) -> bytes:
    return sign_payload(mf.encode_statement(statement), keys, **kwargs)


def write_trust_policy(path: str, keys: list, threshold: int = 1) -> str:
    """Trust policy JSON listing ``keys`` (KeyPair -> public_key PEM, KmsKey or str -> kms_key_id)."""
    entries = []
    for key in keys:
        if isinstance(key, KeyPair):
            entries.append({"public_key": key.public_pem})
        elif isinstance(key, KmsKey):
            entries.append({"kms_key_id": key.key_id})
        else:
            entries.append({"kms_key_id": str(key)})
    with open(path, "w") as handle:
        json.dump({"threshold": threshold, "keys": entries}, handle, indent=2)
    return path


# --------------------------------------------------------------------------- faults

S3_OPERATIONS = ("ListObjectsV2", "HeadObject", "GetObject", "PutObject")


def throttle_first_calls(bucket: str, operations=S3_OPERATIONS):
    """The first call of each of ``operations`` on ``bucket`` answers ``SlowDown`` (503), above
    botocore's own retries. Yields ``{operation: calls}``: the operations throttled."""
    return throttle(*operations, code="SlowDown", status=503, match=lambda params: params.get("Bucket") == bucket)
