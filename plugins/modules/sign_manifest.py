#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sign_manifest
short_description: Hash a backup set and sign its manifest (DSSE envelope, in-toto Statement v1)
version_added: 0.1.0
description:
  - Producer side of the artifact gate. Run it in the backup job right after the artifacts are
    stored. It hashes every artifact of the backup set in parallel (streaming SHA-256), records
    its size, its kind (C(sqlite), C(tar) or C(raw), from magic bytes unless given in O(kinds))
    and, for S3, the version id it read, and signs the manifest that
    M(drguard.sandbox.verify_artifacts) checks before any restore. See C(docs/manifest.md).
  - "Schemes by key type: Ed25519; ECDSA P-256 with SHA-256 (DER signature); RSA (>= 2048 bits)
    PSS with MGF1-SHA-256 and salt length = digest length. Keys come from a PEM file or
    from AWS KMS (asymmetric SIGN_VERIFY keys: ECC_NIST_P256 or RSA_2048 and larger)."
  - Signing from an S3 prefix pins each object's current version id, so a later overwrite cannot
    change what the manifest vouches for. Signing from a local directory records C(version_id=null).
  - With O(envelope), adds this key's signature to an existing envelope (threshold signing). The
    backup set is hashed again and must match the envelope's statement exactly, and the payload is
    signed unchanged. Idempotent when this key already signed.
  - The local O(dest) is written atomically with mode 0644; an unchanged manifest is not rewritten.
    Key material is never logged or returned.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  source:
    description:
      - The backup set - a local directory (every regular file below it, names relative with C(/))
        or C(s3://bucket/prefix/) (every object under the prefix, names are the key suffixes).
      - The manifest itself is skipped when O(dest) lies inside O(source).
    type: str
    required: true
  dest:
    description:
      - Where the envelope is written - a local path or C(s3://bucket/key). May equal O(envelope).
    type: str
    required: true
  backup_set:
    description:
      - Name of the backup set, 1-128 letters, digits and the characters C(._:@+-), starting with a
        letter or digit.
      - Required unless O(envelope) is given, in which case it must match the envelope's.
    type: str
  sequence:
    description:
      - Monotonic sequence number of this backup of O(backup_set) (rollback protection).
        Required unless O(envelope) is given, in which case it must match the envelope's.
    type: int
  created_at:
    description:
      - RFC 3339 creation time of the backup. Default is now.
    type: str
  expires_at:
    description:
      - RFC 3339 time after which the manifest is refused (C(manifest_expired)). Give this or O(ttl).
    type: str
  ttl:
    description:
      - Seconds from O(created_at) after which the manifest expires. Give this or O(expires_at).
    type: int
  tier:
    description:
      - Free-form tier label recorded in the manifest (for example C(tier-1)).
    type: str
  kinds:
    description:
      - Artifact kinds that override detection from magic bytes - a mapping of artifact name or
        shell glob (for example C(*.db)) to C(sqlite), C(tar) or C(raw). Exact names win over globs.
    type: dict
  private_key_path:
    description:
      - PEM private key file (PKCS#8 or traditional; Ed25519, EC P-256 or RSA >= 2048).
        Mutually exclusive with O(kms_key_id).
    type: path
  private_key_passphrase:
    description:
      - Passphrase of an encrypted O(private_key_path).
    type: str
  kms_key_id:
    description:
      - AWS KMS key id, ARN or alias of an asymmetric SIGN_VERIFY key (ECC_NIST_P256 or RSA_2048+).
        The message is signed as RAW up to 4096 bytes and as its SHA-256 DIGEST beyond.
    type: str
  envelope:
    description:
      - An existing envelope (local path or C(s3://bucket/key)) to add this key's signature to.
        O(created_at), O(expires_at), O(ttl), O(tier) and O(kinds) must not be given then.
    type: str
  workers:
    description:
      - Artifacts hashed in parallel. Default is the number of CPUs.
    type: int
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers
"""

EXAMPLES = r"""
# In the backup job, right after the artifacts were uploaded to the Object Lock bucket:
- name: Sign the manifest of tonight's backup with the producer key from KMS
  drguard.sandbox.sign_manifest:
    source: s3://backups-prod/orders-db/42/
    dest: s3://backups-prod/manifests/orders-db-42.dsse.json
    backup_set: orders-db
    sequence: 42
    ttl: 604800            # refuse the manifest after 7 days
    tier: tier-1
    kms_key_id: alias/drguard-backup-signer
  register: signed

- name: Second signature for a threshold-2 trust policy (re-hashes, must match exactly)
  drguard.sandbox.sign_manifest:
    source: s3://backups-prod/orders-db/42/
    envelope: s3://backups-prod/manifests/orders-db-42.dsse.json
    dest: s3://backups-prod/manifests/orders-db-42.dsse.json
    kms_key_id: alias/drguard-release-officer

- name: Sign a local backup set with a key file
  drguard.sandbox.sign_manifest:
    source: /var/backups/orders-db/42
    dest: /var/backups/orders-db/42.dsse.json
    backup_set: orders-db
    sequence: 42
    created_at: "2026-11-28T01:00:00Z"
    expires_at: "2026-12-05T01:00:00Z"
    kinds:
      "*.dump": raw
    private_key_path: /etc/drguard/signing-key.pem
    private_key_passphrase: "{{ vault_signing_key_passphrase }}"
  no_log: false   # the passphrase option is already no_log
"""

RETURN = r"""
keyid:
  description: Keyid (hex SHA-256 of the DER SubjectPublicKeyInfo) of the key used.
  returned: always
  type: str
  sample: 3f1a0c...
keyids:
  description: Keyids of every signature in the written envelope.
  returned: always
  type: list
  elements: str
scheme:
  description: Signature scheme used (ed25519, ecdsa-p256-sha256 or rsa-pss-sha256).
  returned: always
  type: str
artifacts:
  description: Number of artifacts in the manifest.
  returned: always
  type: int
  sample: 2
payload_sha256:
  description: SHA-256 of the signed Statement bytes.
  returned: always
  type: str
manifest_sha256:
  description: SHA-256 of the envelope bytes written (null in check mode, where nothing is signed).
  returned: always
  type: str
dest:
  description: Where the envelope was written (as given).
  returned: always
  type: str
version_id:
  description: S3 version id of the envelope written to an S3 O(dest) (null otherwise).
  returned: always
  type: str
backup_set:
  description: The backup set signed.
  returned: always
  type: str
sequence:
  description: Its sequence.
  returned: always
  type: int
created_at:
  description: The manifest's creation time.
  returned: always
  type: str
expires_at:
  description: The manifest's expiry.
  returned: always
  type: str
"""

import fnmatch
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow

ARGUMENT_SPEC = dict(
    source=dict(type="str", required=True),
    dest=dict(type="str", required=True),
    backup_set=dict(type="str"),
    sequence=dict(type="int"),
    created_at=dict(type="str"),
    expires_at=dict(type="str"),
    ttl=dict(type="int"),
    tier=dict(type="str"),
    kinds=dict(type="dict"),
    private_key_path=dict(type="path", no_log=False),
    private_key_passphrase=dict(type="str", no_log=True),
    kms_key_id=dict(type="str", no_log=False),
    envelope=dict(type="str"),
    workers=dict(type="int"),
)

MAX_KEY_FILE = 1024 * 1024
MAX_ENVELOPE = 64 * 1024 * 1024


class SignError(Exception):
    pass


class Signer:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        for key in ("source", "dest", "envelope"):
            if self.p[key] and not art.is_s3(self.p[key]):
                self.p[key] = os.path.expanduser(self.p[key])
        self.workers = self.p["workers"] or os.cpu_count() or 1
        self._s3 = None

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = self.module.client("s3", retry_decorator=AWSRetry.jittered_backoff(),
                                          config={"max_pool_connections": max(10, self.workers + 2)})
        return self._s3

    # ------------------------------------------------------------------ inputs
    def validate(self):
        p = self.p
        if self.workers < 1:
            raise SignError("workers must be at least 1")
        if p["envelope"]:
            given = [k for k in ("created_at", "expires_at", "ttl", "tier", "kinds") if p[k] is not None]
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
            kms = self.module.client("kms", retry_decorator=AWSRetry.jittered_backoff(), **extra)
            return mf.KmsSigner(kms, p["kms_key_id"])
        try:
            with open(p["private_key_path"], "rb") as handle:
                pem = handle.read(MAX_KEY_FILE)
        except OSError as exc:
            raise SignError("cannot read private_key_path %s: %s" % (p["private_key_path"], exc.strerror)) from None
        return mf.LocalSigner(pem, p["private_key_passphrase"])

    def read_doc(self, location: str, what: str, missing_ok: bool = False):
        if art.is_s3(location):
            loc = art.parse_s3(location, what)
            kwargs = {"Bucket": loc.bucket, "Key": loc.key}
            if loc.version_id:
                kwargs["VersionId"] = loc.version_id
            try:
                return self.s3.get_object(**kwargs)["Body"].read(MAX_ENVELOPE + 1)
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
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
    def kind_for(self, name: str, detected: str) -> str:
        kinds = self.p["kinds"] or {}
        if name in kinds:
            return kinds[name]
        for pattern, kind in kinds.items():
            if fnmatch.fnmatchcase(name, pattern):
                return kind
        return detected

    def hash_source(self, pinned: dict | None = None) -> list:
        """Hash every artifact of the source; ``pinned`` (name -> S3 version id) when co-signing."""
        p = self.p
        pinned = pinned or {}
        skip = [x for x in (p["dest"], p["envelope"]) if x]
        if art.is_s3(p["source"]):
            loc = art.parse_prefix(p["source"], "source")
            skip_keys = set()
            for item in skip:
                if art.is_s3(item):
                    other = art.parse_s3(item)
                    if other.bucket == loc.bucket:
                        skip_keys.add(other.key)
            names = [k[len(loc.key):] for k, _size in art.s3_keys(self.s3, loc.bucket, loc.key) if k not in skip_keys]
            for name in names:
                problem = mf.unsafe_name_problem(name)
                if problem:
                    raise SignError("object %r under %s cannot be signed: %s" % (name, p["source"], problem))

            def one(name):
                return art.hash_s3(self.s3, loc.bucket, loc.key, name, pinned.get(name))
        else:
            names = art.local_names(p["source"], [x for x in skip if not art.is_s3(x)])

            def one(name):
                return art.hash_local(p["source"], name)
        if not names:
            raise SignError("source %s holds no artifact; nothing to sign" % p["source"])
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            artifacts = list(pool.map(one, names))
        for item in artifacts:
            item.kind = self.kind_for(item.name, item.kind)
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
            if art.is_s3(dest):
                loc = art.parse_s3(dest, "dest")
                version = self.s3.head_object(Bucket=loc.bucket, Key=loc.key).get("VersionId")
                return False, (None if version in (None, "null") else version)
            return False, None
        if self.module.check_mode:
            return True, None
        if art.is_s3(dest):
            loc = art.parse_s3(dest, "dest")
            if loc.version_id:
                raise SignError("dest %s must not carry a versionId" % dest)
            resp = self.s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType="application/json",
                                      ChecksumAlgorithm="SHA256")
            version = resp.get("VersionId")
            return True, (None if version in (None, "null") else version)
        atomic_write(dest, data, mode=0o644)
        return True, None

    def run(self):
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
            if self.module.check_mode:
                result["keyids"] = envelope.keyids + [signer.keyid]
                self.module.exit_json(changed=True, **result)
            envelope.signatures.append(mf.Signature(signer.keyid, signer.sign(mf.pae(envelope.payload_type,
                                                                                       envelope.payload))))
            data = envelope.to_bytes()
        else:
            data = unchanged_bytes
        changed, version = self.write(data)
        result.update(manifest_sha256=mf.sha256_hex(data), version_id=version, keyids=envelope.keyids)
        self.module.exit_json(changed=changed, **result)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True,
                              mutually_exclusive=[("private_key_path", "kms_key_id"), ("expires_at", "ttl")],
                              required_one_of=[("private_key_path", "kms_key_id")])
    if not mf.HAS_CRYPTOGRAPHY:
        module.fail_json(msg="sign_manifest needs the Python library cryptography: %s" % mf.CRYPTOGRAPHY_IMPORT_ERROR)
    try:
        Signer(module).run()
    except SignError as exc:
        module.fail_json(msg="Cannot sign the manifest: %s." % str(exc).rstrip("."))
    except (mf.PolicyError, art.SourceError) as exc:
        module.fail_json(msg="Cannot sign the manifest: %s." % str(exc).rstrip("."))
    except OSError as exc:
        module.fail_json(msg="Cannot sign the manifest: %s: %s." % (exc.filename or "a file", exc.strerror))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="Cannot sign the manifest: an AWS call failed")
    except Exception as exc:  # noqa: BLE001 - a message, never a bare traceback; nothing was written
        module.fail_json(msg="Cannot sign the manifest: %s: %s; nothing was written" % (type(exc).__name__, exc),
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
