#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: verify_artifacts
short_description: Gate a backup set - verify its signed manifest and every artifact byte by byte
version_added: 0.1.0
description:
  - Verifies a backup set against its signed manifest (a DSSE envelope carrying an in-toto
    Statement v1, see C(docs/manifest.md)) before anything is restored.
  - "Manifest checks come first and stop before any artifact byte is read: envelope and
    Statement schema (strict JSON, duplicate keys and unknown predicate fields refused),
    signatures against the O(trust_policy) (each distinct key counts once toward the
    threshold), expiry, rollback against the O(trusted_state), and staleness (O(max_age))."
  - Then artifact names (absolute, C(..), backslash, NUL and other unsafe names are refused),
    then every artifact in parallel (O(workers)). S3 objects are read by the version id
    pinned in the manifest; a newer version or a delete marker on top of it changes nothing.
    Each object is reconciled with HeadObject (size, version, whole-object ChecksumSHA256,
    Object Lock mode and retention) and, in O(mode=full), its bytes are streamed through
    SHA-256 in 1 MiB chunks, never reading more than one byte past the signed size.
  - In O(strict) mode every object under O(source) that the manifest does not list is a failure.
  - The task fails when anything fails; the result (also of a failed task) lists every failure
    with one reason from the closed vocabulary of C(docs/manifest.md), ready to be handed
    as-is to M(drguard.sandbox.quarantine_artifact).
  - The trusted state is updated only after a fully successful verification, atomically,
    and never in check mode. Check mode otherwise verifies fully. With O(update_trusted_state=false)
    it is only read (rollback protection); the caller then records the accepted manifest with
    M(drguard.sandbox.trusted_state), for example with other credentials.
  - V(verified) is true only when everything succeeded, the trusted-state update included;
    a task that fails never reports V(verified=true).
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  manifest:
    description:
      - The signed manifest (DSSE envelope) - a local path or C(s3://bucket/key),
        optionally with C(?versionId=) to pin the manifest's own version.
    type: str
    required: true
  source:
    description:
      - Where the backup set's artifacts are - a local directory or C(s3://bucket/prefix/)
        (the prefix ends with C(/)). An artifact named C(n) is C(<source>/n) or the key C(<prefix>n).
    type: str
    required: true
  trust_policy:
    description:
      - 'Path to the trust policy JSON:
        C({"threshold": N, "keys": [{"public_key": "<PEM>"} | {"kms_key_id": "<arn or id>"}]}).'
      - KMS public keys are fetched once each with GetPublicKey.
    type: path
    required: true
  trusted_state:
    description:
      - Rollback protection state - a local path or C(s3://bucket/key). Missing means nothing was
        accepted yet. Per backup set, the highest sequence accepted and the SHA-256 of that manifest.
        Missing directories above a local path are created with mode 0700.
      - Without it, rollback and equivocation are not detected.
    type: str
  update_trusted_state:
    description:
      - Record the manifest in O(trusted_state) after a fully successful verification. A failed
        update fails the task with V(verified=false).
      - V(false) only reads the state, for a session that may not write it (a drill's read-only
        credentials); record the accepted manifest afterwards with M(drguard.sandbox.trusted_state).
    type: bool
    default: true
  expected_backup_set:
    description:
      - The backup set the caller means to verify. A manifest for another backup set is
        C(manifest_malformed), reported before any artifact is read.
      - Unset, any backup set the trust policy's keys signed is accepted.
    type: str
  max_age:
    description:
      - Maximum age in seconds of the backup (the manifest's C(created_at)); older is C(stale_backup).
      - Unset, the age is not checked.
    type: int
  max_clock_skew:
    description:
      - Seconds the manifest's C(created_at) may lie in the future (clock differences between the
        producer and this host). Further ahead is C(manifest_malformed), since a backup from the future
        would pass O(max_age) and report an RPO of 0.
    type: int
    default: 300
  require_object_lock:
    description:
      - Object Lock required on S3 artifacts. C(compliance) requires mode COMPLIANCE, C(governance)
        accepts GOVERNANCE or COMPLIANCE, C(none) does not check. Retention must not have expired.
      - Ignored for a local O(source).
    type: str
    choices: [compliance, governance, none]
    default: compliance
  strict:
    description:
      - Objects in O(source) that the manifest does not list are failures (C(unlisted_artifact)).
        The manifest and the trusted state themselves are exempt when they live there.
    type: bool
    default: true
  mode:
    description:
      - C(full) streams every byte through SHA-256. C(metadata) checks signatures, sizes, store
        checksums and locks without downloading any object body; it proves content only where the
        store has a whole-object SHA-256 checksum.
    type: str
    choices: [full, metadata]
    default: full
  workers:
    description:
      - Threads that read and hash at once - artifacts are verified in parallel, up to this many.
        With at least two workers for each artifact of a local O(source), each artifact is also read
        ahead by a thread of its own while it is hashed. Default is the number of CPUs.
    type: int
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
notes:
  - Failure entries have exactly the keys C(name), C(reason), C(detail), C(source), C(version_id),
    C(observed_sha256), C(observed_size). Local sources are absolute, normalized paths.
  - C(name) is null for manifest-level failures, whose C(source) is the manifest's location.
    An C(unsafe_name) failure names the artifact and gives the manifest's location as C(source),
    since the name itself is what is wrong.
  - An artifact whose manifest entry has C(version_id=null) (signed from a local copy) is read at its
    current version; the version actually read is returned in C(source) and C(version_id).
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Verify the backup set before restoring it (fails the task on any failure)
  drguard.sandbox.verify_artifacts:
    manifest: s3://backups-prod/manifests/orders-db-42.dsse.json
    source: s3://backups-prod/orders-db/42/
    trust_policy: /etc/drguard/trust-policy.json
    trusted_state: s3://drguard-state/trusted-state.json
    max_age: 86400
    require_object_lock: compliance
  register: verify

- name: Verify, keep going on failure, and quarantine what failed
  drguard.sandbox.verify_artifacts:
    manifest: "{{ drill_backup.manifest }}"
    source: "{{ drill_backup.source }}"
    trust_policy: "{{ drill_backup.trust_policy }}"
    trusted_state: "{{ drill_backup.trusted_state }}"
    workers: 8
  register: verify
  failed_when: false

- name: Verify read-only in the drill's session; the controller records the accepted manifest
  drguard.sandbox.verify_artifacts:
    manifest: "{{ drill_backup.manifest }}"
    source: "{{ drill_backup.source }}"
    trust_policy: "{{ drill_backup.trust_policy }}"
    trusted_state: "{{ drill_backup.trusted_state }}"
    update_trusted_state: false
    expected_backup_set: orders-db
  register: verify

- name: Quarantine every failing artifact
  drguard.sandbox.quarantine_artifact:
    failures: "{{ verify.failures }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    quarantine: "{{ drill_quarantine }}"
  when: not verify.verified

- name: Cheap pre-check of a local backup set (no object body read)
  drguard.sandbox.verify_artifacts:
    manifest: /mnt/backups/orders-db/42/manifest.dsse.json
    source: /mnt/backups/orders-db/42
    trust_policy: /etc/drguard/trust-policy.json
    mode: metadata
"""

RETURN = r"""
verified:
  description:
    - True only when the manifest and every artifact verified and, when asked, the trusted state
      was updated. The one field to gate a restore on; false whenever the task failed.
  returned: always
  type: bool
failures:
  description:
    - One entry per failure, with C(reason) from the closed vocabulary (manifest_malformed,
      signature_invalid, untrusted_key, threshold_not_met, manifest_expired, rollback,
      stale_backup, unsafe_name, artifact_missing, unlisted_artifact, size_mismatch,
      digest_mismatch, metadata_mismatch, not_immutable).
  returned: always
  type: list
  elements: dict
  sample:
    - name: files.tar
      reason: digest_mismatch
      detail: SHA-256 1f2e..., signed 9a8b...
      source: s3://backups-prod/orders-db/42/files.tar?versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY
      version_id: 3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY
      observed_sha256: 1f2e...
      observed_size: 10240
artifacts:
  description:
    - One entry per artifact of the manifest - C(name), C(verified), C(sha256) and C(size) as signed,
      C(seconds), C(reason) (null when verified), C(source) (exact location, with C(?versionId=)
      on S3) and C(version_id), and the signed C(kind) and C(expect) (null when not declared), which
      M(drguard.sandbox.restore_artifacts) passes on to M(drguard.sandbox.validate_restore).
      Empty when a manifest-level check failed.
  returned: always
  type: list
  elements: dict
  sample:
    - name: orders.sqlite
      verified: true
      sha256: 9a8b...
      size: 20480
      seconds: 0.012
      reason: null
      source: s3://backups-prod/orders-db/42/orders.sqlite?versionId=Lk0p...
      version_id: Lk0p...
manifest:
  description:
    - The manifest - C(location) (exact, with C(?versionId=) on S3), C(sha256) of the envelope bytes,
      C(payload_sha256), C(backup_set), C(sequence), C(created_at), C(expires_at), C(tier) and the
      C(keyids) whose signatures verified. Fields not established before a failure are null.
  returned: always
  type: dict
  sample:
    location: s3://backups-prod/manifests/orders-db-42.dsse.json?versionId=abc
    sha256: 5e1c...
    payload_sha256: 77aa...
    backup_set: orders-db
    sequence: 42
    created_at: "2026-11-28T01:00:00Z"
    expires_at: "2026-12-05T01:00:00Z"
    tier: tier-1
    keyids: [b1c2...]
bytes_hashed:
  description: Artifact bytes streamed through SHA-256.
  returned: always
  type: int
trusted_state_updated:
  description:
    - Whether the trusted state was written (only after full success, never in check mode, never
      with O(update_trusted_state=false)).
  returned: always
  type: bool
"""

import traceback

from ansible.module_utils import basic
from ansible.module_utils.basic import env_fallback
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._verify import EarlyRun
from ansible_collections.drguard.sandbox.plugins.module_utils._verify import Verifier
from ansible_collections.drguard.sandbox.plugins.module_utils._verify import VerifyError

ARGUMENT_SPEC = dict(
    manifest=dict(type="str", required=True),
    source=dict(type="str", required=True),
    trust_policy=dict(type="path", required=True),
    trusted_state=dict(type="str"),
    update_trusted_state=dict(type="bool", default=True),
    expected_backup_set=dict(type="str"),
    max_age=dict(type="int"),
    max_clock_skew=dict(type="int", default=mf.DEFAULT_CLOCK_SKEW),
    require_object_lock=dict(type="str", choices=["compliance", "governance", "none"], default="compliance"),
    strict=dict(type="bool", default=True),
    mode=dict(type="str", choices=["full", "metadata"], default="full"),
    workers=dict(type="int"),
)


def aws_options() -> dict:
    """amazon.aws' common module options (its ``aws_argument_spec()``), ``access_key`` censored.

    A copy, because amazon.aws defines them next to its boto3 imports: a local backup set is
    verified by a plain AnsibleModule that accepts, validates and censors exactly what
    AnsibleAWSModule would, without importing the AWS SDK (most of the module's start-up).
    ``access_key`` is ``no_log`` as ``_aws.hide_session_credentials`` makes it for the AWS module.
    tests/unit/test_verify_artifacts_options.py keeps the copy equal to amazon.aws'.
    """
    return dict(
        access_key=dict(aliases=["aws_access_key_id", "aws_access_key"],
                        fallback=(env_fallback, ["AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY"]), no_log=True),
        secret_key=dict(aliases=["aws_secret_access_key", "aws_secret_key"],
                        fallback=(env_fallback, ["AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY"]), no_log=True),
        session_token=dict(aliases=["aws_session_token"], fallback=(env_fallback, ["AWS_SESSION_TOKEN"]),
                           no_log=True),
        profile=dict(aliases=["aws_profile"], fallback=(env_fallback, ["AWS_PROFILE", "AWS_DEFAULT_PROFILE"])),
        endpoint_url=dict(aliases=["aws_endpoint_url"], fallback=(env_fallback, ["AWS_URL"])),
        validate_certs=dict(type="bool", default=True),
        aws_ca_bundle=dict(type="path", fallback=(env_fallback, ["AWS_CA_BUNDLE"])),
        aws_config=dict(type="dict"),
        debug_botocore_endpoint_logs=dict(type="bool", default=False,
                                          fallback=(env_fallback, ["ANSIBLE_DEBUG_BOTOCORE_LOGS"])),
        region=dict(aliases=["aws_region"], fallback=(env_fallback, ["AWS_REGION", "AWS_DEFAULT_REGION"])),
    )


def _early_run():
    """A local backup set's read-only verification, run before the module object exists (None if none).

    Such a set never needs the AWS SDK: the module that adopts the run is a plain AnsibleModule
    (see :func:`_new_module`), so boto3, botocore and amazon.aws are never imported. An option
    that the copy of amazon.aws' options does not know (a newer amazon.aws?) gives no early run:
    AnsibleAWSModule then accepts or refuses it.
    """
    try:
        raw = basic._load_params()  # the raw arguments, the documented way for dynamic modules
    except Exception:  # noqa: BLE001 - AnsibleModule reports unreadable arguments itself
        return None
    if not isinstance(raw, dict) or not mf.HAS_CRYPTOGRAPHY:
        return None
    spec = dict(aws_options(), **ARGUMENT_SPEC)
    known = set(spec) | {alias for option in spec.values() for alias in option.get("aliases", ())}
    if any(name not in known and not name.startswith("_ansible_") for name in raw):
        return None
    return EarlyRun.start(raw, ARGUMENT_SPEC)


def _new_module(local: bool):
    """The module object: a plain AnsibleModule for an adopted local run, else AnsibleAWSModule."""
    if local:
        spec = aws_options()
        spec.update(ARGUMENT_SPEC)
        return basic.AnsibleModule(argument_spec=spec, supports_check_mode=True)
    from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials  # noqa: PLC0415

    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    return module


def main():
    early = _early_run()
    module = _new_module(local=early is not None)
    if early is not None and not early.matches(module.params):
        early = None
        module = _new_module(local=False)
    if not mf.HAS_CRYPTOGRAPHY:
        module.fail_json(msg="verify_artifacts needs the Python library cryptography: %s"
                         % mf.CRYPTOGRAPHY_IMPORT_ERROR)
    # A local run made no AWS call: its (empty) list of actions, as AnsibleAWSModule would report it.
    extra = {"resource_actions": []} if early is not None and module.params["debug_botocore_endpoint_logs"] else {}

    def client(service, **kwargs):
        from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client  # noqa: PLC0415
        return aws_client(module, service, **kwargs)
    if early is not None:
        verifier = early.adopt(client, warn=module.warn, check_mode=module.check_mode)
    else:
        verifier = Verifier(module.params, client, warn=module.warn, check_mode=module.check_mode)
    try:
        if early is None:
            msg = verifier.run()
        elif early.error is not None:
            raise early.error
        else:
            msg = verifier.finish()
        module.exit_json(msg=msg, **extra, **verifier.result)
    except VerifyError as exc:
        if exc.aws_error is not None and hasattr(module, "fail_json_aws"):
            module.fail_json_aws(exc.aws_error, msg=str(exc), **verifier.result)
        module.fail_json(msg=str(exc), **extra, **verifier.result)
    except Exception as exc:  # noqa: BLE001 - fail closed with the structured result, never a bare traceback
        verifier.result["verified"] = False
        module.fail_json(msg="Verification could not be completed (%s: %s); nothing was accepted"
                         % (type(exc).__name__, exc), exception=traceback.format_exc(), **extra, **verifier.result)


if __name__ == "__main__":
    main()
