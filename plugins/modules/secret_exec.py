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
  - Secrets never go on the command line, into facts or onto a disk. The child does not inherit the
    controller's AWS credential variables (C(AWS_ACCESS_KEY_ID), C(AWS_PROFILE), ...).
  - C(stdout) and C(stderr) come back with every secret value - and its base64, base32, hex, URL-encoded and
    JSON-escaped forms, and each string field of a JSON secret - replaced by C(********).
  - Fails when the command exits non-zero or runs longer than O(timeout). Running a validation does not
    change anything, so C(changed) is always false; in check mode the command is not run.
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
  pass_aws_credentials:
    description:
      - Give the command the module's own AWS credentials (normally the drill's minted ones) as
        C(AWS_ACCESS_KEY_ID), C(AWS_SECRET_ACCESS_KEY), C(AWS_SESSION_TOKEN) and C(AWS_REGION). They are
        masked in the output like secrets.
    type: bool
    default: false
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers
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
seconds:
  description: Wall-clock run time of the command.
  returned: when the command ran
  type: float
argv:
  description: The command run.
  returned: always
  type: list
  elements: str
"""

import os
import re
import signal
import subprocess
import tempfile
import time

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.botocore import get_aws_connection_info
from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    argv=dict(type="list", elements="str", required=True),
    env_secrets=dict(type="dict", default={}),
    file_secrets=dict(type="dict", default={}),
    drill_id=dict(type="str", required=True),
    store=dict(type="str", default="secretsmanager", choices=["secretsmanager", "tmpfs"]),
    tmpfs_dir=dict(type="path"),
    chdir=dict(type="path"),
    timeout=dict(type="int", default=600),
    pass_aws_credentials=dict(type="bool", default=False, no_log=False),
)

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRETS_DIR_ENV = "DRGUARD_SECRETS_DIR"
# Controller identity the child must not inherit (it would be a pivot).
SCRUB_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "EC2_ACCESS_KEY", "EC2_SECRET_KEY", "EC2_SECURITY_TOKEN",
             "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
             "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN")


def read_secrets(module, names: set) -> dict:
    """``{name: value}`` from the drill's store; a missing secret is a failure."""
    p = module.params
    values = {}
    if p["store"] == "tmpfs":
        directory = os.path.abspath(p["tmpfs_dir"] or os.path.join(sec.TMPFS_ROOT, "drguard-" + p["drill_id"]))
        try:
            # Same checks as the writer: a tmpfs, our own 0700 directory, not a symlink.
            if names and not sec.ensure_private_dir(directory, create=False) and not os.path.isdir(directory):
                raise sec.SecretError("the tmpfs store %s does not exist; create it with drill_secrets first"
                                      % directory)
            for name in sorted(names):
                values[name] = sec.read_secret_file(directory, name)
        except sec.SecretError as exc:
            module.fail_json(msg="cannot read the drill's secrets: %s" % exc)
        return values
    client = module.client("secretsmanager", retry_decorator=AWSRetry.jittered_backoff())
    for name in sorted(names):
        secret_id = "drguard/%s/%s" % (p["drill_id"], name)
        try:
            response = client.get_secret_value(SecretId=secret_id)
        except is_boto3_error_code("ResourceNotFoundException"):
            module.fail_json(msg="secret %s does not exist; create it with drill_secrets first" % secret_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:  # pylint: disable=duplicate-except
            module.fail_json_aws(e, msg="Cannot read secret %s" % secret_id)
        if "SecretString" not in response:
            module.fail_json(msg="secret %s is binary; only string secrets can be injected" % secret_id)
        values[name] = response["SecretString"]
    return values


def child_environment(module, injected: dict) -> tuple:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    extra_values = []
    if module.params["pass_aws_credentials"]:
        region, _endpoint, conn = get_aws_connection_info(module)
        for name, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                          ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                          ("AWS_SESSION_TOKEN", "aws_session_token")):
            if conn.get(key):
                env[name] = conn[key]
                if name != "AWS_ACCESS_KEY_ID":
                    extra_values.append(conn[key])
        if region:
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    env.update(injected)
    return env, extra_values


def run(argv, env, cwd, timeout):
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        timed_out = True
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), \
        time.monotonic() - start, timed_out


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    p = module.params
    try:
        validate_drill_id(p["drill_id"])
    except DrillError as exc:
        module.fail_json(msg=str(exc))
    if not p["argv"]:
        module.fail_json(msg="argv is empty; give the command to run as a list")
    if p["timeout"] <= 0:
        module.fail_json(msg="timeout must be a positive number of seconds, got %d" % p["timeout"])
    for var, name in p["env_secrets"].items():
        if not ENV_NAME_RE.match(var) or var == SECRETS_DIR_ENV:
            module.fail_json(msg="env_secrets key %r is not a usable environment variable name" % var)
        if not isinstance(name, str) or not sec.NAME_RE.match(name):
            module.fail_json(msg="env_secrets[%s] names secret %r, which is not a valid secret name" % (var, name))
    for filename, name in p["file_secrets"].items():
        if not sec.NAME_RE.match(filename):
            module.fail_json(msg="file_secrets key %r is not a plain file name (letters, digits, '.', '_', '-')"
                                 % filename)
        if not isinstance(name, str) or not sec.NAME_RE.match(name):
            module.fail_json(msg="file_secrets[%s] names secret %r, which is not a valid secret name"
                                 % (filename, name))
    if p["chdir"] and not os.path.isdir(p["chdir"]):
        module.fail_json(msg="chdir %s is not a directory" % p["chdir"])
    if module.check_mode:
        module.exit_json(changed=False, skipped=True, argv=p["argv"], msg="command not run in check mode")

    values = read_secrets(module, set(p["env_secrets"].values()) | set(p["file_secrets"].values()))
    for value in values.values():
        module.no_log_values.add(value)
    injected = {var: values[name] for var, name in p["env_secrets"].items()}
    secrets_dir = None
    try:
        if p["file_secrets"]:
            try:
                sec.require_tmpfs(os.path.join(sec.TMPFS_ROOT, "x"))
                secrets_dir = tempfile.mkdtemp(prefix="drguard-exec-", dir=sec.TMPFS_ROOT)
                os.chmod(secrets_dir, 0o700)
                for filename, name in p["file_secrets"].items():
                    sec.write_secret_file(secrets_dir, filename, values[name])
            except (sec.SecretError, OSError) as exc:
                module.fail_json(msg="cannot write secret files to a tmpfs: %s" % exc)
            injected[SECRETS_DIR_ENV] = secrets_dir
        env, extra = child_environment(module, injected)
        for value in extra:
            module.no_log_values.add(value)
        try:
            rc, out, err, seconds, timed_out = run(p["argv"], env, p["chdir"], p["timeout"])
        except OSError as exc:
            module.fail_json(msg="cannot run %s: %s" % (p["argv"][0], exc.strerror), argv=p["argv"])
    finally:
        if secrets_dir:
            sec.wipe_dir(secrets_dir)
    hide = list(values.values()) + extra
    result = dict(changed=False, argv=p["argv"], rc=rc, stdout=sec.redact(out, hide), stderr=sec.redact(err, hide),
                  seconds=round(seconds, 3))
    if timed_out:
        module.fail_json(msg="command %s did not finish within %d seconds and was killed" % (p["argv"][0],
                                                                                           p["timeout"]), **result)
    if rc != 0:
        module.fail_json(msg="command %s exited with rc %d" % (p["argv"][0], rc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
