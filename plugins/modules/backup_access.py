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
    C(s3:GetObjectAttributes) and C(s3:GetObjectVersionAttributes) on C(arn:aws:s3:::bucket/prefix*),
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
    support: none
  platform:
    platforms: posix
options:
  state:
    description: Expose the backups (V(present)) or withdraw the access (V(absent)).
    type: str
    choices: [present, absent]
    default: present
  source:
    description: The backup set, C(s3://bucket/prefix/) or an absolute local directory.
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
  - drguard maintainers
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
"""

import json
import os

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import AccessError
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import can_mount
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import mount_entry
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import MOUNT_OPTIONS
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import parse_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import POLICY_NAME
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import readonly_policy
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import same_directory
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import write_probe

ARGUMENT_SPEC = dict(
    state=dict(type="str", choices=["present", "absent"], default="present"),
    source=dict(type="str", required=True),
    role_name=dict(type="str"),
    policy_name=dict(type="str", default=POLICY_NAME),
    path=dict(type="path"),
)

NEED_PRIVILEGE = ("mounting the backup read-only needs root or CAP_SYS_ADMIN; run the play as root "
                  "(become: true) or give the controller container CAP_SYS_ADMIN, or use an S3 backup source")


# ------------------------------------------------------------------------------- S3
def s3_access(module, bucket, prefix):
    p = module.params
    if not p["role_name"]:
        module.fail_json(msg="role_name is required for an S3 backup source: the drill's IAM role "
                             "(drguard-<drill_id>, created by mint_credentials)")
    iam = module.client("iam", retry_decorator=AWSRetry.jittered_backoff())
    role, name = p["role_name"], p["policy_name"]
    try:
        current = iam.get_role_policy(RoleName=role, PolicyName=name, aws_retry=True)["PolicyDocument"]
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) != "NoSuchEntity":
            module.fail_json_aws(exc, msg="Could not read inline policy %s of role %s" % (name, role))
        current = None
        if p["state"] == "present":
            try:
                iam.get_role(RoleName=role, aws_retry=True)
            except botocore.exceptions.ClientError as exc2:
                if error_code(exc2) == "NoSuchEntity":
                    module.fail_json(msg="IAM role %s does not exist; create the drill's role first "
                                         "(mint_credentials creates drguard-<drill_id>)" % role)
                module.fail_json_aws(exc2, msg="Could not read IAM role %s" % role)
    if isinstance(current, str):
        current = json.loads(current)

    if p["state"] == "absent":
        if current is None:
            module.exit_json(changed=False)
        if not module.check_mode:
            try:
                iam.delete_role_policy(RoleName=role, PolicyName=name, aws_retry=True)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "NoSuchEntity":
                    module.fail_json_aws(exc, msg="Could not delete inline policy %s of role %s" % (name, role))
        module.exit_json(changed=True)

    wanted = readonly_policy(bucket, prefix)
    fact = {"kind": "s3", "source": "s3://%s/%s" % (bucket, prefix), "read_only": True}
    if current == wanted:
        module.exit_json(changed=False, backup_mount=fact, policy=wanted)
    if module.check_mode:
        module.exit_json(changed=True, backup_mount=fact, policy=wanted)
    try:
        iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps(wanted), aws_retry=True)
        stored = iam.get_role_policy(RoleName=role, PolicyName=name, aws_retry=True)["PolicyDocument"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Could not put the read-only backup policy on role %s" % role)
    if isinstance(stored, str):
        stored = json.loads(stored)
    if stored != wanted:
        module.fail_json(msg="the read-only policy read back from role %s differs from what was written; "
                             "the backup is not proven read-only" % role, policy=stored)
    module.exit_json(changed=True, backup_mount=fact, policy=wanted)


# ---------------------------------------------------------------------------- local
def _run(module, argv, what):
    rc, out, err = module.run_command(argv)
    if rc != 0:
        text = (err or out).strip()
        if "permission denied" in text.lower() or "must be superuser" in text.lower():
            raise AccessError(NEED_PRIVILEGE)
        raise AccessError("%s failed (rc=%d): %s" % (what, rc, text or "no output"))


def local_present(module, source, path):
    if not os.path.isdir(source):
        raise AccessError("backup source %s is not a directory" % source)
    source = os.path.realpath(source)
    entry = mount_entry(path) if os.path.isdir(path) else None
    changed = False
    if entry is not None:
        if not same_directory(path, source):
            raise AccessError("%s already has another filesystem mounted (%s); refusing to stack the backup "
                              "on it" % (path, entry["source"]))
        if "ro" in entry["options"] and write_probe(path) is None:
            return False, entry
        if not can_mount():
            raise AccessError(NEED_PRIVILEGE)
        if module.check_mode:
            return True, {}
        _run(module, ["mount", "-o", MOUNT_OPTIONS, path], "remounting %s read-only" % path)
        changed = True
    else:
        if not can_mount():
            raise AccessError(NEED_PRIVILEGE)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path) or os.listdir(path)):
            raise AccessError("mount point %s exists and is not an empty directory; choose a new or empty "
                              "directory" % path)
        if (os.path.realpath(path) + os.sep).startswith(source + os.sep):
            raise AccessError("mount point %s is inside the backup source %s" % (path, source))
        if module.check_mode:
            return True, {}
        os.makedirs(path, mode=0o700, exist_ok=True)
        _run(module, ["mount", "--bind", source, path], "bind-mounting %s at %s" % (source, path))
        changed = True
        try:
            _run(module, ["mount", "-o", MOUNT_OPTIONS, path], "remounting %s read-only" % path)
        except AccessError:
            module.run_command(["umount", path])
            raise
    entry = mount_entry(path)
    problem = write_probe(path)
    if entry is None or "ro" not in entry["options"] or problem:
        module.run_command(["umount", path])
        raise AccessError("the bind mount at %s is not read-only (%s); it was unmounted"
                          % (path, problem or "the kernel does not report it 'ro'"))
    return changed, entry


def local_absent(module, path):
    changed = False
    for _ in range(16):  # stacked mounts at the same point, each removed in turn
        if not os.path.isdir(path) or mount_entry(path) is None:
            break
        changed = True
        if module.check_mode:
            return True
        if not can_mount():
            raise AccessError(NEED_PRIVILEGE.replace("mounting", "unmounting"))
        _run(module, ["umount", path], "unmounting %s" % path)
    else:
        raise AccessError("%s is still mounted after 16 unmounts; inspect it by hand" % path)
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path) or os.listdir(path):
            raise AccessError("%s is not an empty directory after unmounting; refusing to delete its contents"
                              % path)
        if not module.check_mode:
            os.rmdir(path)
        changed = True
    return changed


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    source = p["source"]
    try:
        if source.startswith("s3://"):
            bucket, prefix = parse_s3(source)
            s3_access(module, bucket, prefix)
        if not os.path.isabs(source):
            raise AccessError("source %r must be s3://bucket/prefix/ or an absolute directory" % source)
        if not p["path"] or not os.path.isabs(p["path"]):
            raise AccessError("path (an absolute mount point) is required for a local backup source")
        # Resolve symlinks in the parents (mountinfo reports real paths); the mount point
        # itself is never followed.
        path = os.path.normpath(p["path"])
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if p["state"] == "absent":
            module.exit_json(changed=local_absent(module, path))
        changed, entry = local_present(module, os.path.normpath(source), path)
    except AccessError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="local backup mount failed: %s" % exc)
    module.exit_json(changed=changed, mount=entry,
                     backup_mount={"kind": "local", "source": path, "read_only": True})


if __name__ == "__main__":
    main()
