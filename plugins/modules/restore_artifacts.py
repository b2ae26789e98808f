#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: restore_artifacts
short_description: Restore verified backup artifacts into the sandbox, re-checking every byte
version_added: 0.1.0
description:
  - Copies the artifacts that M(drguard.sandbox.verify_artifacts) verified into a
    private restore directory, reading S3 objects by their pinned version id and local
    files from the read-only mount.
  - Every byte is hashed again while it is written; a file whose SHA-256 or size differs
    from what was verified is discarded and the task fails. Nothing half-written survives
    (temporary file, then rename).
  - Run it with the drill's minted credentials, which can only read the backups.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  artifacts:
    description:
      - The C(artifacts) list returned by M(drguard.sandbox.verify_artifacts); each entry
        needs C(name), C(verified), C(sha256), C(size), C(source) and C(version_id).
      - An entry that is not verified is refused.
    type: list
    elements: dict
    required: true
  dest:
    description:
      - Restore directory. It, its missing parents and every directory inside it are created with mode 0700
        whatever the umask; restored files are 0400.
      - An existing O(dest) must be a real directory (a symlink is refused, never followed or chmodded) owned by the
        user running the drill; group and other permission bits on it are removed.
    type: path
    required: true
  workers:
    description: Parallel downloads.
    type: int
    default: 4
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Restore the verified backup set with the drill's credentials
  drguard.sandbox.restore_artifacts:
    artifacts: "{{ verify.artifacts }}"
    dest: "{{ drill_output_dir }}/restore"
    access_key: "{{ drill_aws_session.access_key_id }}"
    secret_key: "{{ drill_aws_session.secret_access_key }}"
    session_token: "{{ drill_aws_session.session_token }}"
  register: restored
"""

RETURN = r"""
restored:
  description:
    - One entry per artifact written - C(name), C(path), C(sha256), C(size), and the manifest's C(kind) and
      C(expect) when the input entry carries them (for M(drguard.sandbox.validate_restore)).
  returned: success
  type: list
  elements: dict
  sample: [{name: orders.sqlite, path: /drill-runs/dr-1/restore/orders.sqlite, sha256: "9f8...", size: 20480}]
bytes_restored:
  description: Bytes written.
  returned: success
  type: int
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import restore
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import RestoreError

ARGUMENT_SPEC = dict(
    artifacts=dict(type="list", elements="dict", required=True),
    dest=dict(type="path", required=True),
    workers=dict(type="int", default=4),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    p = module.params
    try:
        result = restore(p["artifacts"], p["dest"], workers=p["workers"], check_mode=module.check_mode,
                         client=lambda service: aws_client(module, service))
    except RestoreError as exc:
        module.fail_json(msg=str(exc))
    except botocore.exceptions.BotoCoreError as exc:
        module.fail_json_aws(exc, msg="Restore failed")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
