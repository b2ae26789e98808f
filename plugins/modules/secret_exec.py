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
"""

import os
import re
import selectors
import signal
import subprocess
import tempfile
import time

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

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
# The only controller variables a child sees: search path, locale, time zone, terminal,
# temp directory and user name. Everything else (VAULT_TOKEN, SSH_AUTH_SOCK, PYTHONPATH,
# AWS_*, ...) could be a credential or a way to one.
ALLOWED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME")
ALLOWED_ENV_PREFIXES = ("LC_",)
# What the child always gets: its own empty HOME (so no ~/.aws, ~/.netrc, ~/.config of the
# controller) and an AWS SDK that finds no shared files and never asks instance metadata.
FIXED_ENV = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
             "AWS_CONFIG_FILE": os.devnull}
RESERVED_ENV = frozenset(FIXED_ENV) | {"HOME", SECRETS_DIR_ENV}
# Controller credential variables: pass_aws_credentials never hands on a value equal to one.
CONTROLLER_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                             "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "EC2_ACCESS_KEY",
                             "EC2_SECRET_KEY", "EC2_SECURITY_TOKEN")
MAX_OUTPUT_BYTES = 1024 * 1024  # per stream; the rest is read and dropped
DRAIN_SECONDS = 2.0  # after the command exited or was killed, how long its pipes may stay open
TRUNCATED_MARK = "\n[output truncated at %d bytes]" % MAX_OUTPUT_BYTES


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


def drill_session(module):
    """``{access_key, secret_key, session_token}`` given explicitly to the module, or None.

    Credentials from the controller's environment (amazon.aws' fallbacks), a profile or the
    shared files are not the drill's session and are never handed to a child.
    """
    p = module.params
    if p.get("profile") or not p.get("access_key") or not p.get("secret_key"):
        return None
    controller = {os.environ[name] for name in CONTROLLER_CREDENTIAL_ENV if os.environ.get(name)}
    if p["access_key"] in controller or p["secret_key"] in controller:
        return None
    return {"AWS_ACCESS_KEY_ID": p["access_key"], "AWS_SECRET_ACCESS_KEY": p["secret_key"],
            "AWS_SESSION_TOKEN": p.get("session_token")}


def child_environment(module, injected: dict, home: str) -> tuple:
    """``(env, credential values)``: the allow-listed controller variables, the fixed ones, the injected ones."""
    env = {k: v for k, v in os.environ.items() if k in ALLOWED_ENV or k.startswith(ALLOWED_ENV_PREFIXES)}
    env.update(FIXED_ENV)
    env["HOME"] = home
    extra_values = []
    if module.params["pass_aws_credentials"]:
        session = drill_session(module)
        for name, value in (session or {}).items():
            if value:
                env[name] = value
                extra_values.append(value)
        if module.region:
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = module.region
    env.update(injected)
    return env, extra_values


def _exited(proc) -> bool:
    """True when the command has ended; it is left unreaped (a zombie) so its pid, the group id, stays ours."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc) -> None:
    """SIGKILL what is left of the command's process group, then reap the command."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.poll()


def run(argv, env, cwd, timeout, limit=MAX_OUTPUT_BYTES):
    """Run ``argv``; returns ``(rc, out, err, seconds, timed_out, dropped_out, dropped_err, lingering)``.

    Reading is bounded in time and size: each stream keeps its first ``limit`` bytes (the
    rest is read and dropped, so the command never blocks on a full pipe); after the
    command exits or is killed at ``timeout``, its pipes get ``DRAIN_SECONDS`` to close -
    a process that escaped the group (``setsid``) and still holds them is not waited for
    (``lingering``). What is left of the process group after the command is killed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    dropped = {out_fd: 0, err_fd: 0}
    timed_out, stop_at = False, None
    deadline = start + timeout
    selector = selectors.DefaultSelector()
    try:
        for fd in kept:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if stop_at is None and _exited(proc):
                _kill_group(proc)
                stop_at = now + DRAIN_SECONDS
            elif stop_at is None and now >= deadline:
                _kill_group(proc)
                timed_out, stop_at = True, now + DRAIN_SECONDS
            if stop_at is not None and now >= stop_at:
                break
            wait = min(0.25, max(0.0, (stop_at or deadline) - now))
            for key, _events in selector.select(timeout=wait):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                room = max(0, limit - len(kept[key.fd]))
                kept[key.fd] += chunk[:room]
                dropped[key.fd] += len(chunk) - min(room, len(chunk))
        lingering = bool(selector.get_map())
    finally:
        selector.close()
        proc.stdout.close()
        proc.stderr.close()
    # Both pipes closed but the command may run on: it gets the rest of its time, then the group dies.
    while not _exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    timed_out = timed_out or not _exited(proc)
    _kill_group(proc)
    proc.wait(timeout=DRAIN_SECONDS * 5)
    return (proc.returncode, kept[out_fd].decode("utf-8", "replace"), kept[err_fd].decode("utf-8", "replace"),
            time.monotonic() - start, timed_out, dropped[out_fd], dropped[err_fd], lingering)


def bounded_redacted(text: str, dropped: int, hide: list) -> str:
    """``text`` redacted; when the stream was cut, also without a tail that could hold part of a secret."""
    text = sec.redact(text, hide)
    if dropped:
        # A secret's encoding cut in two at the limit is not recognised by redact(): drop
        # more than the longest encoding of any value from the end.
        longest = max((len(v.encode("utf-8", "surrogatepass")) for v in hide if v), default=0)
        text = text[:max(0, len(text) - (8 * longest + 256))] + TRUNCATED_MARK
    return text


def tmpfs_private_dir(kind: str, drill_id: str) -> str:
    """A fresh 0700 directory ``drguard-<kind>-<drill_id>-*`` on the tmpfs root (fails when it is no tmpfs)."""
    sec.require_tmpfs(os.path.join(sec.TMPFS_ROOT, "x"))
    directory = tempfile.mkdtemp(prefix="drguard-%s-%s-" % (kind, drill_id), dir=sec.TMPFS_ROOT)
    os.chmod(directory, 0o700)
    return directory


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
        if not ENV_NAME_RE.match(var) or var in RESERVED_ENV:
            module.fail_json(msg="env_secrets key %r is not a usable environment variable name (%s are set by the "
                                 "module)" % (var, ", ".join(sorted(RESERVED_ENV))))
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
    if p["pass_aws_credentials"] and drill_session(module) is None:
        module.fail_json(msg="pass_aws_credentials needs the drill's session as explicit access_key and secret_key "
                             "(and session_token) arguments, not the controller's environment, profile or files; "
                             "pass drill_aws_session or set pass_aws_credentials to false")
    if module.check_mode:
        module.exit_json(changed=False, skipped=True, argv=p["argv"], msg="command not run in check mode")

    values = read_secrets(module, set(p["env_secrets"].values()) | set(p["file_secrets"].values()))
    for value in values.values():
        module.no_log_values.add(value)
    injected = {var: values[name] for var, name in p["env_secrets"].items()}
    secrets_dir = home = None
    try:
        try:
            home = tmpfs_private_dir("home", p["drill_id"])
        except (sec.SecretError, OSError) as exc:
            module.fail_json(msg="cannot create the command's private HOME on a tmpfs: %s" % exc)
        if p["file_secrets"]:
            try:
                secrets_dir = tmpfs_private_dir("exec", p["drill_id"])
                for filename, name in p["file_secrets"].items():
                    sec.write_secret_file(secrets_dir, filename, values[name])
            except (sec.SecretError, OSError) as exc:
                module.fail_json(msg="cannot write secret files to a tmpfs: %s" % exc)
            injected[SECRETS_DIR_ENV] = secrets_dir
        env, extra = child_environment(module, injected, home)
        for value in extra:
            module.no_log_values.add(value)
        try:
            rc, out, err, seconds, timed_out, cut_out, cut_err, lingering = run(
                p["argv"], env, p["chdir"], p["timeout"])
        except OSError as exc:
            module.fail_json(msg="cannot run %s: %s" % (p["argv"][0], exc.strerror), argv=p["argv"])
    finally:
        for directory in (secrets_dir, home):
            if directory:
                sec.wipe_dir(directory)
    if lingering:
        module.warn("a process started by %s outside its process group still held the output open %d seconds "
                    "after the command ended; the rest of its output was not read" % (p["argv"][0], DRAIN_SECONDS))
    hide = list(values.values()) + extra
    result = dict(changed=False, argv=p["argv"], rc=rc, stdout=bounded_redacted(out, cut_out, hide),
                  stderr=bounded_redacted(err, cut_err, hide), stdout_truncated=bool(cut_out),
                  stderr_truncated=bool(cut_err), seconds=round(seconds, 3))
    if timed_out:
        module.fail_json(msg="command %s did not finish within %d seconds and was killed" % (p["argv"][0],
                                                                                           p["timeout"]), **result)
    if rc != 0:
        module.fail_json(msg="command %s exited with rc %d" % (p["argv"][0], rc), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
