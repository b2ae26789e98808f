# Copyright: drguard maintainers
# Apache License 2.0
"""Signed backup manifests, v1 (docs/manifest.md): DSSE envelope + in-toto Statement v1.

Everything here is pure Python on top of ``cryptography``; the only AWS call is KMS
(``GetPublicKey`` once per key, ``Sign``), made through a client the caller passes in.

* :func:`pae` - the DSSE pre-authentication encoding every signature covers.
* :func:`keyid_for` - lowercase hex SHA-256 of the public key's DER SubjectPublicKeyInfo.
* :func:`loads_strict` - JSON with duplicate keys, NaN/Infinity and non-UTF-8 refused.
* :func:`parse_envelope` / :func:`parse_statement` - schema checks (fail closed).
* :class:`LocalSigner` / :class:`KmsSigner` - Ed25519, ECDSA P-256 SHA-256 (DER) and
  RSA >= 2048 PSS MGF1-SHA-256 (salt length = digest length, as AWS KMS signs).
* :func:`load_trust_policy` and :func:`verify_signatures` - each distinct keyid counts once.
* :func:`check_rollback` / :func:`rollback_problem`, :func:`check_times`, :func:`check_backup_set`,
  :func:`unsafe_name_problem`; :func:`state_entry` (written by ``_trusted_state``).

Failures carry one reason from the closed vocabulary of docs/manifest.md (:data:`REASONS`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime

from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric import rsa
    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - reported by the modules
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR = _exc

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:drguard:backup-set:v1"
KINDS = ("sqlite", "tar", "raw")

REASONS = (
    "manifest_malformed", "signature_invalid", "untrusted_key", "threshold_not_met",
    "manifest_expired", "rollback", "stale_backup", "unsafe_name", "artifact_missing",
    "unlisted_artifact", "size_mismatch", "digest_mismatch", "metadata_mismatch", "not_immutable",
)

SCHEME_ED25519 = "ed25519"
SCHEME_ECDSA = "ecdsa-p256-sha256"
SCHEME_RSA_PSS = "rsa-pss-sha256"
RSA_MIN_BITS = 2048

# AWS KMS signs at most 4096 bytes as RAW; longer messages are signed as their digest.
KMS_RAW_LIMIT = 4096
KMS_ALGORITHMS = {SCHEME_ECDSA: "ECDSA_SHA_256", SCHEME_RSA_PSS: "RSASSA_PSS_SHA_256"}

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BACKUP_SET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_ENVELOPE_KEYS = {"payloadType", "payload", "signatures"}
_SIGNATURE_KEYS = {"keyid", "sig"}
_STATEMENT_KEYS = {"_type", "subject", "predicateType", "predicate"}
_SUBJECT_KEYS = {"name", "digest"}
_PREDICATE_REQUIRED = {"backup_set", "sequence", "created_at", "expires_at", "artifacts"}
_PREDICATE_KEYS = _PREDICATE_REQUIRED | {"tier"}
_ARTIFACT_KEYS = {"size", "kind", "version_id"}
_ARTIFACT_OPTIONAL = {"expect"}
_EXPECT_KEYS = {"tables"}
MAX_TABLE_NAME = 1024
MAX_NAME_BYTES = 1024  # the S3 key limit; a longer name cannot be stored anywhere we read


class ManifestError(ValueError):
    """A manifest-level verification failure with one reason from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise AssertionError("unknown reason %r" % reason)
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PolicyError(ValueError):
    """Bad configuration (trust policy, key, trusted state): the message says what to fix."""


# --------------------------------------------------------------------------- encoding

def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of ``payload`` (what every signature covers)."""
    ptype = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reject_constant(value):
    raise ValueError("%s is not valid JSON" % value)


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate JSON key %r" % key)
        out[key] = value
    return out


def loads_strict(data, what: str = "document"):
    """Parse JSON bytes strictly: UTF-8 only, no duplicate keys, no NaN/Infinity.

    Raises ``ValueError`` with a one-sentence message.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("%s is not UTF-8" % what) from None
    else:
        text = data
    if text.startswith("\ufeff"):
        raise ValueError("%s starts with a byte order mark" % what)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ValueError("%s is not valid JSON: %s" % (what, exc)) from None


def _b64decode(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ManifestError("manifest_malformed", "%s is not a non-empty base64 string" % what)
    try:
        if "-" in value or "_" in value:  # DSSE allows URL-safe base64 too
            return base64.b64decode(value.encode("ascii"), altchars=b"-_", validate=True)
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ManifestError("manifest_malformed", "%s is not valid base64" % what) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- envelope

@dataclass
class Signature:
    keyid: str
    sig: bytes


@dataclass
class Envelope:
    payload_type: str
    payload: bytes
    signatures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"payloadType": self.payload_type, "payload": b64(self.payload),
                "signatures": [{"keyid": s.keyid, "sig": b64(s.sig)} for s in self.signatures]}

    def to_bytes(self) -> bytes:
        """The envelope file's bytes (stable for a given payload and signature list)."""
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @property
    def keyids(self) -> list:
        seen = []
        for s in self.signatures:
            if s.keyid not in seen:
                seen.append(s.keyid)
        return seen


def parse_envelope(data: bytes) -> Envelope:
    """Parse a DSSE envelope; anything but the documented shape is ``manifest_malformed``."""
    try:
        doc = loads_strict(data, "the envelope")
    except ValueError as exc:
        raise ManifestError("manifest_malformed", str(exc)) from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest_malformed", "the envelope is not a JSON object")
    missing = sorted(_ENVELOPE_KEYS - set(doc))
    unknown = sorted(set(doc) - _ENVELOPE_KEYS)
    if missing or unknown:
        raise ManifestError("manifest_malformed", "the envelope is not DSSE: missing %s, unknown %s"
                            % (missing or "none", unknown or "none"))
    if doc["payloadType"] != PAYLOAD_TYPE:
        raise ManifestError("manifest_malformed", "payloadType is %r, expected %r"
                            % (doc["payloadType"], PAYLOAD_TYPE))
    payload = _b64decode(doc["payload"], "payload")
    sigs = doc["signatures"]
    if not isinstance(sigs, list) or not sigs:
        raise ManifestError("manifest_malformed", "the envelope has no signatures")
    out = []
    for i, item in enumerate(sigs):
        if not isinstance(item, dict) or not set(item) <= _SIGNATURE_KEYS or "sig" not in item:
            raise ManifestError("manifest_malformed",
                                "signatures[%d] must be an object with 'sig' and optionally 'keyid'" % i)
        keyid = item.get("keyid", "")
        if not isinstance(keyid, str):
            raise ManifestError("manifest_malformed", "signatures[%d].keyid is not a string" % i)
        out.append(Signature(keyid.lower(), _b64decode(item["sig"], "signatures[%d].sig" % i)))
    return Envelope(doc["payloadType"], payload, out)


# --------------------------------------------------------------------------- statement

@dataclass
class Artifact:
    name: str
    sha256: str
    size: int
    kind: str = "raw"
    version_id: str | None = None
    expect: dict | None = None  # what validation must find (sqlite only): {"tables": {name: min rows}}

    def predicate_entry(self) -> dict:
        entry = {"size": self.size, "kind": self.kind, "version_id": self.version_id}
        if self.expect is not None:
            entry["expect"] = self.expect
        return entry


@dataclass
class Statement:
    backup_set: str
    sequence: int
    created_at: str
    expires_at: str
    tier: str | None
    artifacts: dict  # name -> Artifact, in subject order

    @property
    def created(self) -> datetime:
        return parse_time(self.created_at)

    @property
    def expires(self) -> datetime:
        return parse_time(self.expires_at)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_backup_set(value) -> str:
    if not isinstance(value, str) or not _BACKUP_SET_RE.match(value):
        raise ValueError("backup_set %r is not valid: use 1-128 letters, digits and . _ : @ + -, "
                         "starting with a letter or digit" % (value,))
    return value


def build_statement(backup_set: str, sequence: int, created_at: str, expires_at: str,
                    artifacts: list, *, tier: str | None = None) -> dict:
    """The in-toto Statement v1 (as a dict) for ``artifacts`` (list of :class:`Artifact`)."""
    predicate = {"backup_set": backup_set, "sequence": sequence, "created_at": created_at,
                 "expires_at": expires_at,
                 "artifacts": {a.name: a.predicate_entry() for a in artifacts}}
    if tier is not None:
        predicate["tier"] = tier
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": a.name, "digest": {"sha256": a.sha256}} for a in artifacts],
            "predicateType": PREDICATE_TYPE,
            "predicate": predicate}


def encode_statement(statement: dict) -> bytes:
    """Canonical bytes of a Statement (sorted keys, no whitespace, ASCII)."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _malformed(detail: str) -> ManifestError:
    return ManifestError("manifest_malformed", detail)


def parse_statement(payload: bytes) -> Statement:
    """Validate the Statement and its predicate strictly; any deviation is ``manifest_malformed``."""
    try:
        doc = loads_strict(payload, "the statement")
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    if not isinstance(doc, dict):
        raise _malformed("the statement is not a JSON object")
    if set(doc) != _STATEMENT_KEYS:
        raise _malformed("the statement must have exactly the keys %s; it has %s"
                         % (sorted(_STATEMENT_KEYS), sorted(doc)))
    if doc["_type"] != STATEMENT_TYPE:
        raise _malformed("_type is %r, expected %r" % (doc["_type"], STATEMENT_TYPE))
    if doc["predicateType"] != PREDICATE_TYPE:
        raise _malformed("predicateType is %r, expected %r" % (doc["predicateType"], PREDICATE_TYPE))
    subject, pred = doc["subject"], doc["predicate"]
    if not isinstance(subject, list) or not subject:
        raise _malformed("subject must be a non-empty list")
    if not isinstance(pred, dict):
        raise _malformed("predicate is not an object")
    unknown = sorted(set(pred) - _PREDICATE_KEYS)
    if unknown:
        raise _malformed("unknown predicate field(s) %s" % ", ".join(unknown))
    missing = sorted(_PREDICATE_REQUIRED - set(pred))
    if missing:
        raise _malformed("predicate field(s) %s missing" % ", ".join(missing))
    try:
        validate_backup_set(pred["backup_set"])
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    if not _is_int(pred["sequence"]) or pred["sequence"] < 0:
        raise _malformed("sequence must be a non-negative integer")
    tier = pred.get("tier")
    if tier is not None and not isinstance(tier, str):
        raise _malformed("tier must be a string")
    for key in ("created_at", "expires_at"):
        try:
            parse_time(pred[key])
        except DrillError as exc:
            raise _malformed("%s: %s" % (key, exc)) from None
    if parse_time(pred["expires_at"]) <= parse_time(pred["created_at"]):
        raise _malformed("expires_at is not after created_at")

    digests = {}
    for i, item in enumerate(subject):
        if not isinstance(item, dict) or set(item) != _SUBJECT_KEYS:
            raise _malformed("subject[%d] must have exactly 'name' and 'digest'" % i)
        name, digest = item["name"], item["digest"]
        if not isinstance(name, str):
            raise _malformed("subject[%d].name is not a string" % i)
        if not isinstance(digest, dict) or set(digest) != {"sha256"} or not isinstance(digest["sha256"], str) \
                or not _HEX64.match(digest["sha256"]):
            raise _malformed("subject[%d].digest must be exactly {sha256: <64 lowercase hex>}" % i)
        if name in digests:
            raise _malformed("subject name %r is listed twice" % name)
        digests[name] = digest["sha256"]

    entries = pred["artifacts"]
    if not isinstance(entries, dict):
        raise _malformed("predicate.artifacts is not an object")
    only_subject = sorted(set(digests) - set(entries))
    only_artifacts = sorted(set(entries) - set(digests))
    if only_subject or only_artifacts:
        raise _malformed("subject and predicate.artifacts disagree: subject only %s, artifacts only %s"
                         % (only_subject or "none", only_artifacts or "none"))
    artifacts = {}
    for name, sha in digests.items():
        entry = entries[name]
        where = "predicate.artifacts[%r]" % name
        if not isinstance(entry, dict) or not _ARTIFACT_KEYS <= set(entry) <= _ARTIFACT_KEYS | _ARTIFACT_OPTIONAL:
            raise _malformed("%s must have exactly %s, and optionally %s"
                             % (where, sorted(_ARTIFACT_KEYS), sorted(_ARTIFACT_OPTIONAL)))
        if not _is_int(entry["size"]) or entry["size"] < 0:
            raise _malformed("%s.size must be a non-negative integer" % where)
        if entry["kind"] not in KINDS:
            raise _malformed("%s.kind must be one of %s" % (where, ", ".join(KINDS)))
        vid = entry["version_id"]
        if vid is not None and (not isinstance(vid, str) or not vid):
            raise _malformed("%s.version_id must be a non-empty string or null" % where)
        problem = expect_problem(entry["expect"], entry["kind"]) if "expect" in entry else None
        if problem:
            raise _malformed("%s.%s" % (where, problem))
        artifacts[name] = Artifact(name, sha, entry["size"], entry["kind"], vid, entry.get("expect"))
    return Statement(pred["backup_set"], pred["sequence"], pred["created_at"], pred["expires_at"],
                     tier, artifacts)


def expect_problem(expect, kind: str) -> str | None:
    """Why ``expect`` is not a valid artifact expectation for an artifact of ``kind``, or None.

    ``{"tables": {"<table>": <minimum rows, int >= 0>, ...}}``, for kind ``sqlite`` only;
    any other key is refused, like every unknown field of the manifest.
    """
    if not isinstance(expect, dict) or not expect:
        return "expect must be a non-empty object"
    unknown = sorted(set(expect) - _EXPECT_KEYS)
    if unknown:
        return "expect has unknown field(s) %s; only %s" % (", ".join(unknown), ", ".join(sorted(_EXPECT_KEYS)))
    if kind != "sqlite":
        return "expect is only for kind sqlite, not %s" % kind
    tables = expect["tables"]
    if not isinstance(tables, dict) or not tables:
        return "expect.tables must be a non-empty object of table name to minimum row count"
    for table, least in tables.items():
        if not table or len(table) > MAX_TABLE_NAME or "\x00" in table:
            return "expect.tables has a table name that is empty, longer than %d characters or holds a NUL" \
                % MAX_TABLE_NAME
        if not _is_int(least) or least < 0:
            return "expect.tables[%r] must be an integer >= 0" % table
    return None


# --------------------------------------------------------------------------- names

def unsafe_name_problem(name) -> str | None:
    """Why ``name`` is unsafe as a relative path / key suffix, or None when it is safe."""
    if not isinstance(name, str) or not name:
        return "the name is empty"
    if "\x00" in name:
        return "the name contains a NUL byte"
    if "\\" in name:
        return "the name contains a backslash"
    if name.startswith("/"):
        return "the name is absolute"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        return "the name contains a control or format character"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return "the name is longer than %d bytes" % MAX_NAME_BYTES
    parts = name.split("/")
    if ".." in parts:
        return "the name contains a '..' segment"
    if any(p in ("", ".") for p in parts):
        return "the name contains an empty or '.' segment"
    if re.match(r"^[A-Za-z]:", name):
        return "the name starts with a drive letter"
    return None


# --------------------------------------------------------------------------- keys

def _spki_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def keyid_for(public_key) -> str:
    """Lowercase hex SHA-256 of the public key's DER SubjectPublicKeyInfo."""
    return sha256_hex(_spki_der(public_key))


def scheme_for(public_key) -> str:
    """The signature scheme for a supported key, else raise PolicyError."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return SCHEME_ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise PolicyError("EC key on curve %s is not supported; use P-256" % public_key.curve.name)
        return SCHEME_ECDSA
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < RSA_MIN_BITS:
            raise PolicyError("RSA key of %d bits is too small; use at least %d"
                              % (public_key.key_size, RSA_MIN_BITS))
        return SCHEME_RSA_PSS
    raise PolicyError("key type %s is not supported; use Ed25519, ECDSA P-256 or RSA >= 2048"
                      % type(public_key).__name__)


def verify_raw(public_key, message: bytes, sig: bytes) -> bool:
    """True when ``sig`` is a valid signature of ``message`` under the key's one scheme.

    RSA-PSS accepts any valid salt length (``PSS.AUTO``): the salt length is not a
    security parameter for verification, and signers differ (AWS KMS uses the digest
    length, others the maximum).
    """
    scheme = scheme_for(public_key)
    try:
        if scheme == SCHEME_ED25519:
            public_key.verify(sig, message)
        elif scheme == SCHEME_ECDSA:
            public_key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(sig, message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                        salt_length=padding.PSS.AUTO), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def load_public_pem(pem) -> object:
    data = pem.encode("utf-8") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise PolicyError("public_key is not a PEM SubjectPublicKeyInfo public key") from None
    scheme_for(key)
    return key


class LocalSigner:
    """Signs with a private key file (PEM, optionally encrypted). Never exposes the key."""

    def __init__(self, pem: bytes, passphrase: str | None = None):
        try:
            self._key = serialization.load_pem_private_key(
                pem, password=passphrase.encode("utf-8") if passphrase else None)
        except TypeError:
            raise PolicyError("the private key is encrypted and no passphrase (or one for an unencrypted "
                              "key) was given") from None
        except (ValueError, UnsupportedAlgorithm):
            raise PolicyError("the private key could not be loaded: it is not a PEM private key "
                              "or the passphrase is wrong") from None
        self.public_key = self._key.public_key()
        self.scheme = scheme_for(self.public_key)
        self.keyid = keyid_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        if self.scheme == SCHEME_ED25519:
            return self._key.sign(message)
        if self.scheme == SCHEME_ECDSA:
            return self._key.sign(message, ec.ECDSA(hashes.SHA256()))
        # Salt length = digest length, exactly as AWS KMS RSASSA_PSS_SHA_256 signs.
        return self._key.sign(message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                   salt_length=padding.PSS.DIGEST_LENGTH), hashes.SHA256())


def kms_region(key_id: str) -> str | None:
    """The region named by a KMS key or alias ARN (``arn:aws:kms:<region>:...``), else None."""
    parts = key_id.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[2] == "kms" and parts[3]:
        return parts[3]
    return None


def kms_public_key(kms, key_id: str):
    """Fetch and check a KMS key's public key (one GetPublicKey call)."""
    resp = kms.get_public_key(KeyId=key_id)
    if resp.get("KeyUsage") not in (None, "SIGN_VERIFY"):
        raise PolicyError("KMS key %s has KeyUsage %s; a SIGN_VERIFY key is needed" % (key_id, resp.get("KeyUsage")))
    try:
        key = serialization.load_der_public_key(resp["PublicKey"])
    except (ValueError, UnsupportedAlgorithm):
        raise PolicyError("KMS key %s returned a public key that cannot be parsed" % key_id) from None
    scheme = scheme_for(key)
    if scheme not in KMS_ALGORITHMS:
        raise PolicyError("KMS key %s is %s, which is not supported in KMS; use ECC_NIST_P256 or RSA_2048+"
                          % (key_id, resp.get("KeySpec") or resp.get("CustomerMasterKeySpec")))
    algorithms = resp.get("SigningAlgorithms")
    if algorithms is not None and KMS_ALGORITHMS[scheme] not in algorithms:
        raise PolicyError("KMS key %s does not offer %s" % (key_id, KMS_ALGORITHMS[scheme]))
    return key


class KmsSigner:
    """Signs in AWS KMS; the public key is fetched once with GetPublicKey."""

    def __init__(self, kms, key_id: str):
        self._kms = kms
        self.key_id = key_id
        self.public_key = kms_public_key(kms, key_id)
        self.scheme = scheme_for(self.public_key)
        self.keyid = keyid_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        algorithm = KMS_ALGORITHMS[self.scheme]
        if len(message) <= KMS_RAW_LIMIT:
            resp = self._kms.sign(KeyId=self.key_id, Message=message, MessageType="RAW",
                                  SigningAlgorithm=algorithm)
        else:
            resp = self._kms.sign(KeyId=self.key_id, Message=hashlib.sha256(message).digest(),
                                  MessageType="DIGEST", SigningAlgorithm=algorithm)
        sig = resp["Signature"]
        # Fail closed: never publish a signature that does not verify under the key's public key.
        if not verify_raw(self.public_key, message, sig):
            raise PolicyError("KMS key %s returned a signature that does not verify with its public key"
                              % self.key_id)
        return sig


# --------------------------------------------------------------------------- trust policy

@dataclass
class TrustedKey:
    keyid: str
    public_key: object
    label: str


@dataclass
class TrustPolicy:
    threshold: int
    keys: dict  # keyid -> TrustedKey (distinct keyids only)
    entries: int  # keys listed in the file (a key listed twice counts once)


def load_trust_policy(data: bytes, kms_factory=None) -> TrustPolicy:
    """Parse a trust policy ``{"threshold": N, "keys": [{"public_key": PEM} | {"kms_key_id": id}]}``.

    ``kms_factory(region)`` returns a KMS client for ``region`` (None: the default region;
    a key ARN names its own region); it is called only when a KMS key is listed, and each
    distinct ``kms_key_id`` costs exactly one GetPublicKey call.
    """
    try:
        doc = loads_strict(data, "the trust policy")
    except ValueError as exc:
        raise PolicyError(str(exc)) from None
    if not isinstance(doc, dict) or set(doc) != {"threshold", "keys"}:
        raise PolicyError("the trust policy must be an object with exactly 'threshold' and 'keys'")
    threshold, entries = doc["threshold"], doc["keys"]
    if not _is_int(threshold) or threshold < 1:
        raise PolicyError("trust policy threshold must be an integer >= 1")
    if not isinstance(entries, list) or not entries:
        raise PolicyError("trust policy keys must be a non-empty list")
    keys, clients, fetched = {}, {}, {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1 or not set(entry) <= {"public_key", "kms_key_id"}:
            raise PolicyError("trust policy keys[%d] must be exactly one of {public_key: PEM} or "
                              "{kms_key_id: id}" % i)
        if "public_key" in entry:
            if not isinstance(entry["public_key"], str):
                raise PolicyError("trust policy keys[%d].public_key must be a PEM string" % i)
            try:
                key = load_public_pem(entry["public_key"])
            except PolicyError as exc:
                raise PolicyError("trust policy keys[%d]: %s" % (i, exc)) from None
            label = "keys[%d]" % i
        else:
            key_id = entry["kms_key_id"]
            if not isinstance(key_id, str) or not key_id:
                raise PolicyError("trust policy keys[%d].kms_key_id must be a non-empty string" % i)
            if key_id not in fetched:
                region = kms_region(key_id)
                if region not in clients:
                    if kms_factory is None:
                        raise PolicyError("trust policy lists a KMS key but no KMS client is available")
                    clients[region] = kms_factory(region)
                fetched[key_id] = kms_public_key(clients[region], key_id)
            key = fetched[key_id]
            label = "kms:%s" % key_id
        keyid = keyid_for(key)
        keys.setdefault(keyid, TrustedKey(keyid, key, label))
    return TrustPolicy(threshold, keys, len(entries))


def verify_signatures(envelope: Envelope, policy: TrustPolicy) -> list:
    """Check the envelope's signatures against ``policy``; return the trusted keyids that verified.

    A signature naming a trusted keyid that does not verify is ``signature_invalid`` (even
    when others would meet the threshold). keyid is an unauthenticated hint: a signature
    whose keyid is empty or not in the policy is tried against every trusted key and
    counts for the key it verifies under. Signatures that verify under no trusted key are
    ignored; if nothing else signed, ``untrusted_key``. The threshold counts distinct
    verifying keys: a key that verified several signatures counts once.
    """
    message = pae(envelope.payload_type, envelope.payload)
    verified, untrusted = [], []
    for i, sig in enumerate(envelope.signatures):
        trusted = policy.keys.get(sig.keyid) if sig.keyid else None
        if trusted is not None:
            if not verify_raw(trusted.public_key, message, sig.sig):
                raise ManifestError("signature_invalid", "signature %d by trusted key %s (%s) does not verify "
                                    "over the payload" % (i, sig.keyid, scheme_for(trusted.public_key)))
            keyid = trusted.keyid
        else:
            # A signature verifies under at most one of the distinct keys; never count it twice.
            keyid = next((k.keyid for k in policy.keys.values() if verify_raw(k.public_key, message, sig.sig)),
                         None)
            if keyid is None:
                untrusted.append(sig.keyid or "(no keyid)")
                continue
        if keyid not in verified:
            verified.append(keyid)
    if not verified:
        raise ManifestError("untrusted_key", "signed only by keys outside the trust policy: %s"
                            % ", ".join(untrusted))
    if len(verified) < policy.threshold:
        raise ManifestError("threshold_not_met", "%d distinct trusted key(s) signed (%s); the trust policy "
                            "requires %d" % (len(verified), ", ".join(verified), policy.threshold))
    return verified


# --------------------------------------------------------------------------- time and rollback

DEFAULT_CLOCK_SKEW = 300


def check_times(statement: Statement, now: datetime, max_age: int | None,
                max_clock_skew: int = DEFAULT_CLOCK_SKEW) -> list:
    """``manifest_expired``, future ``created_at`` and ``stale_backup`` findings (a list of ManifestError).

    A ``created_at`` more than ``max_clock_skew`` seconds ahead of ``now`` is
    ``manifest_malformed``: a backup cannot have been made in the future, and such a
    manifest would otherwise pass ``max_age`` and report an RPO of 0.
    """
    out = []
    if statement.expires <= now:
        out.append(ManifestError("manifest_expired", "the manifest expired at %s (now %s)"
                                 % (statement.expires_at, format_time(now))))
    ahead = (statement.created - now).total_seconds()
    if ahead > max_clock_skew:
        out.append(ManifestError("manifest_malformed", "created_at %s is %d s in the future, beyond the allowed "
                                 "clock skew of %d s; check the producer's clock"
                                 % (statement.created_at, int(ahead), max_clock_skew)))
        return out
    if max_age is not None:
        age = (now - statement.created).total_seconds()
        if age > max_age:
            out.append(ManifestError("stale_backup", "the backup was created at %s, %d s ago, older than "
                                     "max_age %d s" % (statement.created_at, int(age), max_age)))
    return out


def parse_trusted_state(data: bytes | None) -> dict:
    """Validate trusted state JSON; ``None`` (no state yet) is an empty state."""
    if data is None:
        return {}
    try:
        doc = loads_strict(data, "the trusted state")
    except ValueError as exc:
        raise PolicyError("%s; restore it from a backup rather than deleting it" % exc) from None
    if not isinstance(doc, dict):
        raise PolicyError("the trusted state is not a JSON object")
    for name, entry in doc.items():
        if not isinstance(entry, dict) or not _is_int(entry.get("sequence")) \
                or not isinstance(entry.get("manifest_sha256"), str) or not _HEX64.match(entry["manifest_sha256"]):
            raise PolicyError("trusted state entry %r must have an integer sequence and a manifest_sha256" % name)
    return doc


def check_backup_set(statement: Statement, expected: str | None):
    """A ``manifest_malformed`` ManifestError when the manifest is for another backup set than ``expected``."""
    if expected is None or statement.backup_set == expected:
        return None
    return ManifestError("manifest_malformed", "the manifest is for backup set %r, but backup set %r is expected"
                         % (statement.backup_set, expected))


def rollback_problem(state: dict, backup_set: str, sequence: int, manifest_sha256: str,
                     payload_sha256: str | None):
    """A ``rollback`` ManifestError, or None when ``sequence`` is not older than the trusted state.

    Equal sequence is accepted only for the same manifest: the same envelope bytes, or
    the same signed statement with a different set of signatures (a co-signature
    added later is not equivocation).
    """
    entry = state.get(backup_set)
    if entry is None:
        return None
    trusted_seq = entry["sequence"]
    if sequence < trusted_seq:
        return ManifestError("rollback", "sequence %d of %s is lower than the trusted sequence %d"
                             % (sequence, backup_set, trusted_seq))
    if sequence == trusted_seq and entry["manifest_sha256"] != manifest_sha256 \
            and (payload_sha256 is None or entry.get("payload_sha256") != payload_sha256):
        return ManifestError("rollback", "sequence %d of %s was already accepted with a different manifest "
                             "(sha256 %s): equivocation" % (sequence, backup_set, entry["manifest_sha256"]))
    return None


def check_rollback(state: dict, statement: Statement, manifest_sha256: str, payload_sha256: str):
    """:func:`rollback_problem` for a parsed Statement."""
    return rollback_problem(state, statement.backup_set, statement.sequence, manifest_sha256, payload_sha256)


def state_entry(sequence: int, manifest_sha256: str, payload_sha256: str | None, now: datetime) -> dict:
    """One backup set's trusted-state entry (the format of docs/manifest.md)."""
    entry = {"sequence": sequence, "manifest_sha256": manifest_sha256, "accepted_at": format_time(now)}
    if payload_sha256 is not None:
        entry["payload_sha256"] = payload_sha256
    return entry
