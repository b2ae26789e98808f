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
    its size, its kind (C(sqlite), C(tar) or C(raw), from magic bytes unless given in O(kinds); a tar
    compressed with gzip, bzip2 or xz is C(tar), any other compressed stream C(raw))
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
  expect:
    description:
      - "What M(drguard.sandbox.validate_restore) must find in an artifact once restored, recorded in
        the signed manifest - a mapping of artifact name or shell glob (exact names win over globs) to
        C({tables: {<table>: <minimum rows>}})."
      - Only for artifacts of kind C(sqlite); any other key, another kind, a negative count or a name or
        glob that matches no artifact is refused before anything is signed.
      - Must not be given with O(envelope) (the first signer fixed it).
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
        O(created_at), O(expires_at), O(ttl), O(tier), O(kinds) and O(expect) must not be given then.
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
  - drguard maintainers (!UNKNOWN)
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
    expect:
      orders.sqlite:
        tables: {orders: 1000, customers: 1}
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

import traceback

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._sign import SignError
from ansible_collections.drguard.sandbox.plugins.module_utils._sign import Signer

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
    expect=dict(type="dict"),
    private_key_path=dict(type="path", no_log=False),
    private_key_passphrase=dict(type="str", no_log=True),
    kms_key_id=dict(type="str", no_log=False),
    envelope=dict(type="str"),
    workers=dict(type="int"),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True,
                              mutually_exclusive=[("private_key_path", "kms_key_id"), ("expires_at", "ttl")],
                              required_one_of=[("private_key_path", "kms_key_id")])
    if not mf.HAS_CRYPTOGRAPHY:
        module.fail_json(msg="sign_manifest needs the Python library cryptography: %s" % mf.CRYPTOGRAPHY_IMPORT_ERROR)
    signer = Signer(module.params, lambda service, **kwargs: aws_client(module, service, **kwargs),
                    check_mode=module.check_mode)
    try:
        changed, result = signer.run()
        module.exit_json(changed=changed, **result)
    except SignError as exc:
        module.fail_json(msg="Cannot sign the manifest: %s." % str(exc).rstrip("."))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="Cannot sign the manifest: an AWS call failed")
    except Exception as exc:  # noqa: BLE001 - a message, never a bare traceback; nothing was written
        module.fail_json(msg="Cannot sign the manifest: %s: %s; nothing was written" % (type(exc).__name__, exc),
                         exception=traceback.format_exc())


if __name__ == "__main__":
    main()
