#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: secret_exec
short_description: Run a validation command with the drill's secrets injected at runtime
version_added: 0.1.0
description:
  - Reads the named secrets from the drill's store (Secrets Manager with the credentials given as module
    arguments - normally the drill's minted credentials - or the drill's tmpfs store), then runs O(argv)
    (no shell) with them injected as environment variables (O(env_secrets)) and/or as 0600 files in a fresh
    0700 directory on a tmpfs (O(file_secrets)), whose path is in C(DRGUARD_SECRETS_DIR). The directory is
    wiped and removed after the command, whatever happened.
  - Secrets never go on the command line, into facts or onto a disk. The child starts with an allow-listed
    environment - C(PATH), C(LANG), C(LANGUAGE), C(LC_*), C(TZ), C(TERM), C(TMPDIR), C(USER), C(LOGNAME) of
    the controller and nothing else (no C(VAULT_TOKEN), no C(AWS_*)) - plus its own empty 0700 C(HOME) on a
    tmpfs (removed afterwards), C(AWS_EC2_METADATA_DISABLED=true) and C(AWS_SHARED_CREDENTIALS_FILE) /
    C(AWS_CONFIG_FILE) set to C(/dev/null), so no AWS SDK finds the controller's credentials.
  - C(stdout) and C(stderr) come back with every secret value - and its encodings (see docs/identity.md) -
    replaced by C(********). Each stream keeps its first 1 MiB; the rest is read and dropped.
  - Fails when the command exits non-zero or runs longer than O(timeout). After the command ended or was
    killed, its output is read for at most 2 more seconds (a process that left the command's process group
    and holds the pipes is not waited for). Running a validation does not change anything, so C(changed)
    is always false; in check mode the command is not run.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  argv:
    description:
      - The command and its arguments (no shell).
    type: list
    elements: str
    required: true
  env_secrets:
    description:
      - Environment variable name -> secret name in the drill's store.
    type: dict
    default: {}
  file_secrets:
    description:
      - File name -> secret name in the drill's store; the file is written into C(DRGUARD_SECRETS_DIR).
    type: dict
    default: {}
  drill_id:
    description:
      - The drill's id; Secrets Manager names are C(drguard/<drill_id>/<name>).
    type: str
    required: true
  store:
    description:
      - The drill's secret store.
    type: str
    default: secretsmanager
    choices: [secretsmanager, tmpfs]
  tmpfs_dir:
    description:
      - Directory of the tmpfs store. Default C(/dev/shm/drguard-<drill_id>).
    type: path
  chdir:
    description:
      - Working directory of the command.
    type: path
  timeout:
    description:
      - Seconds after which the command (its whole process group) is killed and the task fails.
    type: int
    default: 600
  namespace:
    description:
      - Run the command inside this namespace of the drill's netns runtime (a tier, C(drg-<short>-<tier>))
        instead of on the controller. See C(docs/runtime.md), "Restore and validation inside".
      - It runs unprivileged under a uid of its own (no capabilities, no_new_privs), with none of the
        controller's environment - only C(PATH=/usr/local/bin:/usr/bin:/bin), C(LANG=C.UTF-8), C(HOME) on its
        own writable scratch, the fixed AWS variables above, O(env), the injected secrets and (with
        O(pass_aws_credentials)) the drill's session.
      - O(files) and the O(file_secrets) are placed on a tmpfs of the workload's own mount namespace,
        C(/run/drguard/in) (read-only; files 0444, secrets 0600, owned by the workload), which is its
        working directory and its C(DRGUARD_SECRETS_DIR). Nothing of it is on a disk, on the command line
        or visible on the host, and it vanishes with the command.
      - O(chdir) cannot be combined with it.
    type: str
  files:
    description:
      - File name -> absolute path of a file on the controller, copied read-only into the command's
        directory (only with O(namespace)). For example the validation script and, without a db service,
        the restored database.
    type: dict
    default: {}
  env:
    description:
      - Plain (not secret) environment variables for the command, for example C(DRGUARD_DB_ADDRESS).
    type: dict
    default: {}
  pass_aws_credentials:
    description:
      - Give the command the drill's session - the credentials passed explicitly as O(access_key),
        O(secret_key) and O(session_token) - as C(AWS_ACCESS_KEY_ID), C(AWS_SECRET_ACCESS_KEY),
        C(AWS_SESSION_TOKEN) and C(AWS_REGION). They are masked in the output like secrets.
      - Without explicit credentials (or with a O(profile), or with values equal to the controller's
        environment credentials) the module fails before running anything.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Validate the restored database with the drill's synthetic login
  drguard.sandbox.secret_exec:
    drill_id: "{{ drill_ctx.drill_id }}"
    argv: [/opt/checks/orders-db-check, --host, "{{ restored_db_host }}"]
    env_secrets:
      ORDERS_DB: orders-db
    file_secrets:
      api-token: payments-api
    access_key: "{{ drill_aws_session.access_key_id }}"
    secret_key: "{{ drill_aws_session.secret_access_key }}"
    session_token: "{{ drill_aws_session.session_token }}"
  no_log: false   # the result carries no secret: outputs are masked
"""

RETURN = r"""
rc:
  description: Exit code of the command.
  returned: when the command ran
  type: int
stdout:
  description: Standard output, secrets masked.
  returned: when the command ran
  type: str
stderr:
  description: Standard error, secrets masked.
  returned: when the command ran
  type: str
stdout_truncated:
  description: Whether standard output was longer than 1 MiB and cut.
  returned: when the command ran
  type: bool
stderr_truncated:
  description: Whether standard error was longer than 1 MiB and cut.
  returned: when the command ran
  type: bool
seconds:
  description: Wall-clock run time of the command.
  returned: when the command ran
  type: float
argv:
  description: The command run.
  returned: always
  type: list
  elements: str
inside:
  description: The namespace the command ran in.
  returned: with O(namespace), when the command ran
  type: str
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials
from ansible_collections.drguard.sandbox.plugins.module_utils._secret_exec import check_params
from ansible_collections.drguard.sandbox.plugins.module_utils._secret_exec import execute
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import SecretError

ARGUMENT_SPEC = dict(
    argv=dict(type="list", elements="str", required=True),
    env_secrets=dict(type="dict", default={}, no_log=False),  # names of secrets, not values
    file_secrets=dict(type="dict", default={}, no_log=False),  # names of secrets, not values
    drill_id=dict(type="str", required=True),
    store=dict(type="str", default="secretsmanager", choices=["secretsmanager", "tmpfs"]),
    tmpfs_dir=dict(type="path"),
    chdir=dict(type="path"),
    timeout=dict(type="int", default=600),
    pass_aws_credentials=dict(type="bool", default=False, no_log=False),
    namespace=dict(type="str"),
    files=dict(type="dict", default={}),
    env=dict(type="dict", default={}),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    p = module.params
    try:
        check_params(p)
        if module.check_mode:
            result = dict(changed=False, skipped=True, argv=p["argv"], msg="command not run in check mode")
        else:
            result = execute(p, lambda service: aws_client(module, service), region=module.region,
                             hide=module.no_log_values.add, warn=module.warn)
    except SecretError as exc:
        if exc.exception is not None:
            module.fail_json_aws(exc.exception, msg=exc.message, **exc.kwargs)
        module.fail_json(msg=exc.message, **exc.kwargs)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
