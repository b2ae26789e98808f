#!/usr/bin/python
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_teardown
short_description: Tear one drill down in one step - revoke, secrets, local data, backup mount, sweep
version_added: 0.1.0
description:
  - The guaranteed teardown of one drill, in one module run (the C(drguard.sandbox.teardown) role calls it). The steps
    run in this order, each whatever happened to the one before; a failed step is recorded in RV(steps) and the module
    fails at the end naming every failed step.
  - C(revoke) - with O(revoke_credentials), denies every session of the drill role issued so far (as
    M(drguard.sandbox.mint_credentials) with C(state=revoked)). Revocation comes first so that nothing can use the
    drill's identity while the rest goes.
  - C(runtime) - with O(runtime_backend=netns), removes the drill's sandbox runtime (every process, namespace, veth and
    nft table named C(drg-<short id>-), found from the drill id) and proves that nothing of it remains
    (docs/runtime.md); with O(output_dir), its C(runtime/state.json) is marked absent. Then the drill's PKI
    directory (C(/dev/shm/drguard-<drill_id>-mtls) - CA keys, leaves, every tier's delivered identity) is overwritten,
    removed and proven gone (docs/mtls.md); the step returns its path as C(pki_destroyed). The C(ec2) backend's
    instances are tagged resources, which the sweep deletes; with O(runtime_backend=ec2) the step destroys that PKI
    directory only when a killed mtls phase left it (and returns C(pki_destroyed)), else it does nothing.
  - C(secrets) - with O(secret_store), removes the drill's secrets from it (as M(drguard.sandbox.drill_secrets) with
    C(state=absent)).
  - C(local_data) - removes O(remove_paths) (files, directory trees; a symlink is removed, never followed).
  - C(backup_mount) - when O(backup_source) is a local directory, withdraws its read-only mount at O(backup_path) (as
    M(drguard.sandbox.backup_access) with C(state=absent)). An C(s3://) source needs nothing here - its read-only
    policy lives on the drill role, revoked first and deleted by the sweep.
  - C(sweep) - deletes every resource of the drill that proves, read again, that it is the drill's, and looks again
    (as M(drguard.sandbox.sweep) with O(drill_id)); fails when anything remains or a service could not be listed.
  - "One process for the whole teardown: each Ansible module task costs about half a second of start-up alone."
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description: The drill to tear down.
    type: str
    required: true
  revoke_credentials:
    description: Revoke every session of the drill role first.
    type: bool
    default: true
  secret_store:
    description: Where the drill kept its secrets; unset when it has none.
    type: str
    choices: [secretsmanager, tmpfs]
  tmpfs_dir:
    description: Directory of the tmpfs store (default C(/dev/shm/drguard-<drill_id>)).
    type: path
  remove_paths:
    description: Absolute paths of local files or directories the drill wrote (for example restored data).
    type: list
    elements: path
    default: []
  backup_source:
    description: The backup set the drill read - a local directory (its mount is withdrawn) or C(s3://...).
    type: str
  backup_path:
    description: The read-only mount point of a local backup set; removed with the mount.
    type: path
  runtime_backend:
    description: The drill's sandbox runtime backend; V(none) (or unset) when no runtime ran.
    type: str
    choices: [netns, ec2, none]
  output_dir:
    description: The drill's output directory (where C(runtime/state.json) lives).
    type: path
  timeout:
    description: Seconds the sweep may take, retrying dependency errors.
    type: int
    default: 300
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Tear the drill down
  drguard.sandbox.drill_teardown:
    drill_id: "{{ drill_ctx.drill_id }}"
    secret_store: secretsmanager
    backup_source: s3://backups/orders/
    remove_paths: ["{{ drill_ctx.output_dir }}/restore"]
  register: teardown_result
"""

RETURN = r"""
steps:
  description: Per step (V(revoke), V(runtime), V(secrets), V(local_data), V(backup_mount), V(sweep)) its
    C(status) (V(ok), V(skipped) or V(failed)), C(seconds), C(error) when it failed, and what it did.
  returned: always
  type: dict
  sample:
    revoke: {status: ok, seconds: 0.21, changed: true, role_name: drguard-dr-20261129050000-a1b2c3}
    runtime: {status: ok, seconds: 0.4, changed: true, prefix: drg-5bca86-, removed: [drg-5bca86-app]}
    secrets: {status: ok, seconds: 0.3, changed: true, store: secretsmanager, secrets: [orders-db]}
    local_data: {status: ok, seconds: 0.01, changed: true, removed: [/srv/drill-runs/dr-1/restore]}
    backup_mount: {status: skipped, seconds: 0.0}
    sweep: {status: ok, seconds: 1.02}
sweep:
  description: The sweep's full result (as M(drguard.sandbox.sweep) returns it); empty when it could not start.
  returned: always
  type: dict
deleted:
  description: Number of resources the sweep deleted.
  returned: always
  type: int
remaining:
  description: Number of the drill's resources still there after the sweep; null when the sweep could not count.
  returned: always
  type: int
remaining_resources:
  description: The resources still there, each with a C(reason).
  returned: always
  type: list
  elements: dict
seconds:
  description: Wall-clock seconds of the whole teardown.
  returned: always
  type: float
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._teardown import Teardown
from ansible_collections.drguard.sandbox.plugins.module_utils._teardown import TeardownError

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    revoke_credentials=dict(type="bool", default=True),
    secret_store=dict(type="str", choices=["secretsmanager", "tmpfs"]),
    tmpfs_dir=dict(type="path"),
    remove_paths=dict(type="list", elements="path", default=[]),
    backup_source=dict(type="str"),
    backup_path=dict(type="path"),
    runtime_backend=dict(type="str", choices=["netns", "ec2", "none"]),
    output_dir=dict(type="path"),
    timeout=dict(type="int", default=300),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    teardown = Teardown(module.params, client=lambda service, **kw: aws_client(module, service, **kw),
                        run_command=module.run_command, region=module.region, check_mode=module.check_mode,
                        hide=module.no_log_values.add, warn=module.warn)
    try:
        result, failure = teardown.run()
    except TeardownError as exc:
        module.fail_json(msg=str(exc))
    if failure:
        module.fail_json(msg=failure, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
