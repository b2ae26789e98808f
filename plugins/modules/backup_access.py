#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: backup_access
short_description: Expose a backup set to the drill strictly read-only (S3 IAM policy or read-only bind mount)
version_added: 0.1.0
description:
  - "S3 (O(source) C(s3://bucket/prefix/)): puts the inline policy O(policy_name) on the drill's
    IAM role O(role_name). It allows C(s3:GetObject), C(s3:GetObjectVersion), C(s3:GetObjectTagging),
    C(s3:GetObjectVersionTagging), C(s3:GetObjectRetention), C(s3:GetObjectLegalHold),
    C(s3:GetObjectAttributes) and C(s3:GetObjectVersionAttributes) on C(arn:aws:s3:::bucket/prefix/*),
    C(s3:ListBucket) and C(s3:ListBucketVersions) on the bucket with an C(s3:prefix) condition,
    and C(s3:GetBucketVersioning), C(s3:GetBucketObjectLockConfiguration), C(s3:GetBucketLocation);
    it explicitly denies C(s3:PutObject*), C(s3:DeleteObject*), C(s3:PutObjectRetention),
    C(s3:PutObjectLegalHold), C(s3:BypassGovernanceRetention), C(s3:RestoreObject),
    C(s3:PutBucket*), C(s3:DeleteBucket*), lifecycle, replication and encryption changes on the
    bucket and all its objects. The policy is read back after writing and must match."
  - "Local (O(source) an absolute directory): bind-mounts it at O(path) and remounts it
    C(ro,nosuid,nodev,noexec); success is reported only after creating a file in the mount
    failed with EROFS. Needs root or CAP_SYS_ADMIN; without it the module fails closed and says so."
  - O(state=absent) removes the inline policy (the role itself is removed by teardown), or
    unmounts O(path) and removes the empty mount point. Both are idempotent.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: partial
    details:
      - For an S3 source the diff shows the read-only policy before and after. A local mount has no diff.
  platform:
    platforms: posix
options:
  state:
    description: Expose the backups (V(present)) or withdraw the access (V(absent)).
    type: str
    choices: [present, absent]
    default: present
  source:
    description:
      - The backup set, C(s3://bucket/prefix/) (or C(s3://bucket) for the whole bucket) or an absolute local
        directory.
      - An S3 prefix names a folder and must end with C(/) - C(s3://bucket/orders) is refused, because
        C(orders*) would also reach C(orders-payroll/).
    type: str
    required: true
  role_name:
    description: The drill's IAM role (S3 only), for example C(drguard-<drill_id>).
    type: str
  policy_name:
    description: Name of the inline policy (S3 only).
    type: str
    default: drguard-backup-readonly
  path:
    description: The mount point (local only); created 0700 when missing.
    type: path
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Let the drill role read s3://backups/orders/ and nothing else
  drguard.sandbox.backup_access:
    source: s3://backups/orders/
    role_name: drguard-dr-20261129050000-a1b2c3

- name: Mount a local backup directory read-only
  drguard.sandbox.backup_access:
    source: /srv/backups/orders
    path: /var/lib/drguard/dr-20261129050000-a1b2c3/backup

- name: Withdraw the mount
  drguard.sandbox.backup_access:
    state: absent
    source: /srv/backups/orders
    path: /var/lib/drguard/dr-20261129050000-a1b2c3/backup
"""

RETURN = r"""
backup_mount:
  description: How the drill reads the backups (present only).
  returned: state=present
  type: dict
  sample: {kind: s3, source: "s3://backups/orders/", read_only: true}
policy:
  description: The inline policy document (S3 only).
  returned: state=present and source is on S3
  type: dict
mount:
  description: The mount as the kernel reports it (local only; empty in check mode).
  returned: state=present and source is local
  type: dict
  sample: {mount_point: /var/lib/drguard/dr-1/backup, options: [ro, nosuid, nodev, noexec, relatime]}
diff:
  description: The read-only policy before and after (V({}) where there is none).
  returned: diff mode and source is on S3
  type: dict
  contains:
    before:
      description: The inline policy as it was.
      type: dict
    after:
      description: The inline policy as it is now (or would be, in check mode).
      type: dict
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import AccessError
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import POLICY_NAME
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import backup_access

ARGUMENT_SPEC = dict(
    state=dict(type="str", choices=["present", "absent"], default="present"),
    source=dict(type="str", required=True),
    role_name=dict(type="str"),
    policy_name=dict(type="str", default=POLICY_NAME),
    path=dict(type="path"),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        result = backup_access(module.params, iam=lambda: aws_client(module, "iam"), run_command=module.run_command,
                               check_mode=module.check_mode, diff=module._diff)
    except AccessError as exc:
        if exc.exception is not None:
            module.fail_json_aws(exc.exception, msg=exc.message, **exc.kwargs)
        module.fail_json(msg=exc.message, **exc.kwargs)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Could not manage the read-only backup policy")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
