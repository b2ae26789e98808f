#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: trusted_state
short_description: Record a verified manifest in the trusted state (rollback protection)
version_added: 0.1.0
description:
  - Records that a backup set's manifest was accepted - its O(sequence) and SHA-256 - in the
    trusted state that M(drguard.sandbox.verify_artifacts) checks for rollback and equivocation
    (format in C(docs/manifest.md)).
  - Meant for the controller after a fully passed verification that did not write the state itself
    (C(verify_artifacts) with C(update_trusted_state=false), run with a drill's read-only credentials);
    the controller's own credentials write it.
  - Compare-and-set. The sequence never goes down, so a lower O(sequence) than the recorded one fails
    (C(rollback)); the same sequence with another manifest fails (C(rollback), equivocation); the same
    manifest again changes nothing.
  - A local file is replaced atomically under an exclusive lock on its directory after a re-read; an S3
    object is written with a conditional PutObject (C(If-Match) on the ETag read, C(If-None-Match) for a
    new object), re-read and re-checked on conflict, so concurrent writers never lose each other's entries.
  - Check mode reads the state and reports whether it would be written.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  trusted_state:
    description:
      - The trusted state - a local path or C(s3://bucket/key) (no C(?versionId=)). Created when missing;
        missing directories above a local path are created with mode 0700.
    type: str
    required: true
  backup_set:
    description:
      - The backup set (the manifest's C(backup_set); C(verify_artifacts) returns it as C(manifest.backup_set)).
    type: str
    required: true
  sequence:
    description:
      - The accepted manifest's sequence (C(manifest.sequence)).
    type: int
    required: true
  manifest_sha256:
    description:
      - Lowercase hex SHA-256 of the accepted manifest's envelope bytes (C(manifest.sha256)).
    type: str
    required: true
  payload_sha256:
    description:
      - Lowercase hex SHA-256 of its signed Statement (C(manifest.payload_sha256)). With it, the same Statement
        with another set of signatures (a co-signature added later) is not equivocation.
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: drguard.sandbox.verify_artifacts
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Verify read-only with the drill's session
  drguard.sandbox.verify_artifacts:
    manifest: "{{ drill_backup.manifest }}"
    source: "{{ drill_backup.source }}"
    trust_policy: "{{ drill_backup.trust_policy }}"
    trusted_state: "{{ drill_backup.trusted_state }}"
    update_trusted_state: false
  register: verify

- name: Record the accepted manifest (controller credentials)
  drguard.sandbox.trusted_state:
    trusted_state: "{{ drill_backup.trusted_state }}"
    backup_set: "{{ verify.manifest.backup_set }}"
    sequence: "{{ verify.manifest.sequence }}"
    manifest_sha256: "{{ verify.manifest.sha256 }}"
    payload_sha256: "{{ verify.manifest.payload_sha256 }}"
  when: verify.verified
"""

RETURN = r"""
entry:
  description: The entry recorded for O(backup_set) (or that would be, in check mode).
  returned: success
  type: dict
  sample:
    sequence: 42
    manifest_sha256: 5e1c...
    payload_sha256: 77aa...
    accepted_at: "2026-11-29T05:00:00Z"
previous:
  description: The entry O(backup_set) had before, null when it had none.
  returned: always
  type: dict
reason:
  description: C(rollback) when the state holds a higher sequence or another manifest of the same sequence.
  returned: failure
  type: str
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._trusted_state import StateError
from ansible_collections.drguard.sandbox.plugins.module_utils._trusted_state import record_accepted

ARGUMENT_SPEC = dict(
    trusted_state=dict(type="str", required=True),
    backup_set=dict(type="str", required=True),
    sequence=dict(type="int", required=True),
    manifest_sha256=dict(type="str", required=True),
    payload_sha256=dict(type="str"),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    s3 = []

    def client():
        if not s3:
            s3.append(aws_client(module, "s3"))
        return s3[0]

    result = {"changed": False, "previous": None}
    try:
        record_accepted(module.params, client, check_mode=module.check_mode, result=result)
    except StateError as exc:
        if exc.reason:
            module.fail_json(msg=str(exc), reason=exc.reason, **result)
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
