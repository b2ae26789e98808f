# Copyright: drguard maintainers
# Apache License 2.0
"""The artifact gate's producer side: :class:`Signer`, the backend of ``sign_manifest`` (private).

Hashes every artifact of a backup set in parallel (local directory or ``s3://bucket/prefix/``,
S3 objects pinned by the version read), builds the in-toto Statement and signs its DSSE
envelope with a local key or AWS KMS, or adds a signature to an existing envelope
(docs/manifest.md). Every failure raises :class:`SignError`; boto errors pass through.
"""

from __future__ import annotations

import fnmatch
import io
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

try:
    import botocore
except ImportError:
    pass  # reported by the modules (AnsibleAWSModule)

from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import COMPRESSIONS
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import sniff
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_prefix
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow

MAX_KEY_FILE = 1024 * 1024
MAX_ENVELOPE = 64 * 1024 * 1024
# Enough of a compressed artifact to decode its first tar header: a whole bzip2 block
# (at most 900 kB of input) decodes before its first byte comes out.
SNIFF_COMPRESSED = 1024 * 1024


class SignError(Exception):
    """The manifest cannot be signed; the message says what was wrong and what to do. Nothing was written."""


class Signer:
    """Hash a backup set and sign its manifest (the options of ``sign_manifest``).

    ``client(service, **kwargs)`` returns a client that retries transient errors
    (``_aws.aws_client`` bound to the module). Local locations in ``params`` are
    expanded (``~``) in place.
    """

    def __init__(self, params: dict, client, *, check_mode: bool = False):
        self.p = params
        self._client = client
        self.check_mode = check_mode
        for key in ("source", "dest", "envelope"):
            if self.p[key] and not is_s3(self.p[key]):
                self.p[key] = os.path.expanduser(self.p[key])
        self.workers = self.p["workers"] or os.cpu_count() or 1
        self._s3 = None

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = self._client("s3", config={"max_pool_connections": max(10, self.workers + 2)})
        return self._s3

    # ------------------------------------------------------------------ inputs
    def validate(self):
        p = self.p
        if self.workers < 1:
            raise SignError("workers must be at least 1")
        if p["envelope"]:
            given = [k for k in ("created_at", "expires_at", "ttl", "tier", "kinds", "expect")
                     if p.get(k) is not None]
            if given:
                raise SignError("%s cannot be given with envelope: the first signer fixed them" % ", ".join(given))
            return
        missing = [k for k in ("backup_set", "sequence") if p[k] is None]
        if missing:
            raise SignError("%s required to sign a new manifest" % " and ".join(missing)
                            + (" is" if len(missing) == 1 else " are"))
        try:
            mf.validate_backup_set(p["backup_set"])
        except ValueError as exc:
            raise SignError(str(exc)) from None
        if p["sequence"] < 0:
            raise SignError("sequence must be a non-negative integer")
        if (p["expires_at"] is None) == (p["ttl"] is None):
            raise SignError("give exactly one of expires_at or ttl so that the manifest expires")
        if p["ttl"] is not None and p["ttl"] <= 0:
            raise SignError("ttl must be a positive number of seconds")
        for name, kind in (p["kinds"] or {}).items():
            if kind not in mf.KINDS:
                raise SignError("kinds[%r] is %r; use one of %s" % (name, kind, ", ".join(mf.KINDS)))

    def times(self):
        p = self.p
        try:
            created = parse_time(p["created_at"]) if p["created_at"] else utcnow()
            expires = parse_time(p["expires_at"]) if p["expires_at"] else created + timedelta(seconds=p["ttl"])
        except DrillError as exc:
            raise SignError(str(exc)) from None
        if expires <= created:
            raise SignError("expires_at %s is not after created_at %s" % (format_time(expires), format_time(created)))
        return format_time(created), format_time(expires)

    def load_signer(self):
        p = self.p
        if p["kms_key_id"]:
            region = mf.kms_region(p["kms_key_id"])
            extra = {"region": region} if region else {}
            kms = self._client("kms", **extra)
            return mf.KmsSigner(kms, p["kms_key_id"])
        try:
            with open(p["private_key_path"], "rb") as handle:
                pem = handle.read(MAX_KEY_FILE)
        except OSError as exc:
            raise SignError("cannot read private_key_path %s: %s" % (p["private_key_path"], exc.strerror)) from None
        return mf.LocalSigner(pem, p["private_key_passphrase"])

    def read_doc(self, location: str, what: str, missing_ok: bool = False):
        if is_s3(location):
            loc = parse_s3(location, what)
            kwargs = {"Bucket": loc.bucket, "Key": loc.key}
            if loc.version_id:
                kwargs["VersionId"] = loc.version_id
            try:
                return self.s3.get_object(**kwargs)["Body"].read(MAX_ENVELOPE + 1)
            except botocore.exceptions.ClientError as exc:
                code = error_code(exc)
                if missing_ok and code in ("NoSuchKey", "404"):
                    return None
                raise SignError("cannot read the %s %s: %s" % (what, location, code or exc)) from None
        try:
            with open(location, "rb") as handle:
                return handle.read(MAX_ENVELOPE + 1)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise SignError("the %s %s does not exist" % (what, location)) from None
        except OSError as exc:
            raise SignError("cannot read the %s %s: %s" % (what, location, exc.strerror)) from None

    # ------------------------------------------------------------------ hashing
    @staticmethod
    def _pattern_for(name: str, mapping: dict):
        """The key of ``mapping`` that applies to ``name``: the exact name, else the first matching glob."""
        if name in mapping:
            return name
        return next((pattern for pattern in mapping if fnmatch.fnmatchcase(name, pattern)), None)

    def kind_for(self, name: str, detected: str) -> str:
        kinds = self.p["kinds"] or {}
        pattern = self._pattern_for(name, kinds)
        return detected if pattern is None else kinds[pattern]

    def content_kind(self, item, read_head) -> str:
        """``tar`` for a tar inside gzip, bzip2 or xz (the hashing saw only raw bytes), else the kind detected."""
        if item.kind != "raw":
            return item.kind
        head = read_head(item.name, 6)
        if not head.startswith(tuple(COMPRESSIONS.values())):
            return item.kind
        kind, _compression = sniff(io.BytesIO(read_head(item.name, SNIFF_COMPRESSED)))
        return "tar" if kind == "tar" else item.kind

    def apply_expectations(self, artifacts: list) -> None:
        """Attach ``expect`` (name or glob -> expectation) to the artifacts; a bad or unmatched one is refused."""
        expect = self.p.get("expect") or {}
        used = set()
        for item in artifacts:
            pattern = self._pattern_for(item.name, expect)
            if pattern is None:
                continue
            problem = mf.expect_problem(expect[pattern], item.kind)
            if problem:
                raise SignError("expect[%r] cannot apply to %s: %s" % (pattern, item.name, problem))
            item.expect = expect[pattern]
            used.add(pattern)
        unused = [pattern for pattern in expect if pattern not in used]
        if unused:
            raise SignError("expect[%r] matches no artifact of the source; check the name" % unused[0])

    def hash_source(self, pinned: dict | None = None) -> list:
        """Hash every artifact of the source; ``pinned`` (name -> S3 version id) when co-signing."""
        p = self.p
        pinned = pinned or {}
        skip = [x for x in (p["dest"], p["envelope"]) if x]
        if is_s3(p["source"]):
            loc = parse_prefix(p["source"], "source")
            skip_keys = set()
            for item in skip:
                if is_s3(item):
                    other = parse_s3(item)
                    if other.bucket == loc.bucket:
                        skip_keys.add(other.key)
            names = [k[len(loc.key):] for k, _size in art.s3_keys(self.s3, loc.bucket, loc.key) if k not in skip_keys]
            for name in names:
                problem = mf.unsafe_name_problem(name)
                if problem:
                    raise SignError("object %r under %s cannot be signed: %s" % (name, p["source"], problem))

            def one(name):
                return art.hash_s3(self.s3, loc.bucket, loc.key, name, pinned.get(name))

            def read_head(name, size):
                _resp, chunks = art.s3_get_chunks(self.s3, loc.bucket, loc.key + name, versions[name], size - 1)
                return b"".join(chunks)[:size]
        else:
            names = art.local_names(p["source"], [x for x in skip if not is_s3(x)])

            def one(name):
                return art.hash_local(p["source"], name)

            def read_head(name, size):
                with open(os.path.join(p["source"], *name.split("/")), "rb") as handle:
                    return handle.read(size)
        if not names:
            raise SignError("source %s holds no artifact; nothing to sign" % p["source"])
        kinds = p["kinds"] or {}

        def kind_of(item):
            # Co-signers keep the envelope's kinds, and a kind given in kinds is not sniffed.
            if p["envelope"] or self._pattern_for(item.name, kinds) is not None:
                return item.kind
            return self.content_kind(item, read_head)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            artifacts = list(pool.map(one, names))
            versions = {a.name: a.version_id for a in artifacts}
            detected = list(pool.map(kind_of, artifacts))
        for item, kind in zip(artifacts, detected, strict=True):
            item.kind = self.kind_for(item.name, kind)
        if not p["envelope"]:
            self.apply_expectations(artifacts)
        return artifacts

    # ------------------------------------------------------------------ signing
    def new_envelope(self, signer, artifacts):
        created, expires = self.times()
        statement = mf.build_statement(self.p["backup_set"], self.p["sequence"], created, expires, artifacts,
                                       tier=self.p["tier"])
        payload = mf.encode_statement(statement)
        envelope = mf.Envelope(mf.PAYLOAD_TYPE, payload, [])
        # Idempotence: an existing dest with this very payload, already signed by this key, stays.
        existing = self.read_doc(self.p["dest"], "existing dest", missing_ok=True)
        if existing is not None:
            try:
                old = mf.parse_envelope(existing)
            except mf.ManifestError:
                old = None
            if old and old.payload == payload and self.signed_by(old, signer):
                return old, existing, mf.parse_statement(payload)
        return envelope, None, mf.parse_statement(payload)

    @staticmethod
    def signed_by(envelope, signer) -> bool:
        message = mf.pae(envelope.payload_type, envelope.payload)
        return any(s.keyid == signer.keyid and mf.verify_raw(signer.public_key, message, s.sig)
                   for s in envelope.signatures)

    def load_envelope(self):
        data = self.read_doc(self.p["envelope"], "envelope")
        try:
            envelope = mf.parse_envelope(data)
            statement = mf.parse_statement(envelope.payload)
        except mf.ManifestError as exc:
            raise SignError("the envelope %s cannot be co-signed: %s" % (self.p["envelope"], exc.detail)) from None
        return envelope, statement, data

    def cosign_envelope(self, signer, artifacts, envelope, statement, data):
        for key in ("backup_set", "sequence"):
            if self.p[key] is not None and self.p[key] != getattr(statement, key):
                raise SignError("%s is %r but the envelope is for %r" % (key, self.p[key], getattr(statement, key)))
        if statement.expires <= utcnow():
            raise SignError("the envelope expired at %s; sign a new manifest instead" % statement.expires_at)
        hashed = {a.name: a for a in artifacts}
        differences = []
        for name in sorted(set(hashed) | set(statement.artifacts)):
            want, got = statement.artifacts.get(name), hashed.get(name)
            if want is None or got is None:
                differences.append("%s is %s" % (name, "not in the envelope" if want is None else "missing"))
            elif (want.sha256, want.size, want.version_id) != (got.sha256, got.size, got.version_id):
                differences.append("%s differs (sha256/size/version)" % name)
        if differences:
            raise SignError("the backup set no longer matches the envelope's payload: %s; refusing to co-sign"
                            % "; ".join(differences[:10]))
        mine = [s for s in envelope.signatures if s.keyid == signer.keyid]
        if mine:
            if not self.signed_by(envelope, signer):
                raise SignError("the envelope has a signature for keyid %s that does not verify with this key"
                                % signer.keyid)
            return envelope, data, statement
        return envelope, None, statement

    def write(self, data: bytes):
        """Write ``data`` to dest unless it already holds exactly these bytes; (changed, version id)."""
        dest = self.p["dest"]
        current = self.read_doc(dest, "dest", missing_ok=True)
        if current == data:
            if is_s3(dest):
                loc = parse_s3(dest, "dest")
                version = self.s3.head_object(Bucket=loc.bucket, Key=loc.key).get("VersionId")
                return False, (None if version in (None, "null") else version)
            return False, None
        if self.check_mode:
            return True, None
        if is_s3(dest):
            loc = parse_s3(dest, "dest")
            if loc.version_id:
                raise SignError("dest %s must not carry a versionId" % dest)
            resp = self.s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType="application/json",
                                      ChecksumAlgorithm="SHA256")
            version = resp.get("VersionId")
            return True, (None if version in (None, "null") else version)
        atomic_write(dest, data, mode=0o644)
        return True, None

    def run(self):
        """Sign; ``(changed, result)``. Every failure is a :class:`SignError`; boto errors pass through."""
        try:
            return self._run()
        except (mf.PolicyError, LocationError) as exc:
            raise SignError(str(exc)) from None
        except OSError as exc:
            raise SignError("%s: %s" % (exc.filename or "a file", exc.strerror)) from None

    def _run(self):
        self.validate()
        signer = self.load_signer()
        if self.p["envelope"]:
            envelope, statement, data = self.load_envelope()
            # Co-signers hash exactly the versions the envelope pins (a newer version is not the backup).
            artifacts = self.hash_source({n: a.version_id for n, a in statement.artifacts.items()})
            envelope, unchanged_bytes, statement = self.cosign_envelope(signer, artifacts, envelope, statement, data)
        else:
            artifacts = self.hash_source()
            envelope, unchanged_bytes, statement = self.new_envelope(signer, artifacts)
        result = {"keyid": signer.keyid, "scheme": signer.scheme, "artifacts": len(statement.artifacts),
                  "payload_sha256": mf.sha256_hex(envelope.payload), "dest": self.p["dest"],
                  "backup_set": statement.backup_set, "sequence": statement.sequence,
                  "created_at": statement.created_at, "expires_at": statement.expires_at,
                  "manifest_sha256": None, "version_id": None, "keyids": envelope.keyids}
        if unchanged_bytes is None:
            if self.check_mode:
                result["keyids"] = envelope.keyids + [signer.keyid]
                return True, result
            envelope.signatures.append(mf.Signature(signer.keyid, signer.sign(mf.pae(envelope.payload_type,
                                                                                     envelope.payload))))
            data = envelope.to_bytes()
        else:
            data = unchanged_bytes
        changed, version = self.write(data)
        result.update(manifest_sha256=mf.sha256_hex(data), version_id=version, keyids=envelope.keyids)
        return changed, result
