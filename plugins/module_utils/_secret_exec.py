# Copyright: drguard maintainers
# Apache License 2.0
"""Running a validation command with a drill's secrets: the backend of ``secret_exec`` (private).

The child gets an allow-listed environment, its own empty 0700 ``HOME`` on a tmpfs, the
secrets as environment variables and/or 0600 files in a fresh 0700 tmpfs directory, and
nothing of the controller's credentials. Its output is bounded in size and time and comes
back with every form of every secret redacted (docs/identity.md). Every failure raises
:class:`~._secrets.SecretError`.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import tempfile
import time

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = None

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import SecretError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

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
# Inside a namespace (docs/runtime.md): the workload's read-only files, its scratch as HOME, a fixed PATH.
INSIDE_DIR = "/run/drguard/in"  # _netns.WORKLOAD_IN
INSIDE_HOME = "/run/drguard/work"  # _netns.WORKLOAD_SCRATCH
INSIDE_PATH = "/usr/local/bin:/usr/bin:/bin"
INSIDE_HOME_BYTES = 16 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024  # per stream; the rest is read and dropped
DRAIN_SECONDS = 2.0  # after the command exited or was killed, how long its pipes may stay open
TRUNCATED_MARK = "\n[output truncated at %d bytes]" % MAX_OUTPUT_BYTES
_AWS_ERRORS = (ClientError, BotoCoreError) if ClientError else ()
# Empty only without botocore, when AnsibleAWSModule has failed before any call (pylint cannot tell).
# pylint: disable=catching-non-exception,bad-exception-cause


def _ignore(_value):
    return None


def check_params(params: dict) -> None:
    """Raise :class:`SecretError` for bad input, before anything is read or run."""
    p = params
    try:
        validate_drill_id(p["drill_id"])
    except DrillError as exc:
        raise SecretError(str(exc)) from None
    if not p["argv"]:
        raise SecretError("argv is empty; give the command to run as a list")
    if p["timeout"] <= 0:
        raise SecretError("timeout must be a positive number of seconds, got %d" % p["timeout"])
    for var, name in p["env_secrets"].items():
        if not ENV_NAME_RE.match(var) or var in RESERVED_ENV:
            raise SecretError("env_secrets key %r is not a usable environment variable name (%s are set by the "
                              "module)" % (var, ", ".join(sorted(RESERVED_ENV))))
        if not isinstance(name, str) or not sec.NAME_RE.match(name):
            raise SecretError("env_secrets[%s] names secret %r, which is not a valid secret name" % (var, name))
    for filename, name in p["file_secrets"].items():
        if not sec.NAME_RE.match(filename):
            raise SecretError("file_secrets key %r is not a plain file name (letters, digits, '.', '_', '-')"
                              % filename)
        if not isinstance(name, str) or not sec.NAME_RE.match(name):
            raise SecretError("file_secrets[%s] names secret %r, which is not a valid secret name" % (filename, name))
    if p["chdir"] and not os.path.isdir(p["chdir"]):
        raise SecretError("chdir %s is not a directory" % p["chdir"])
    for var, value in (p.get("env") or {}).items():
        if not ENV_NAME_RE.match(var) or var in RESERVED_ENV or var in p["env_secrets"]:
            raise SecretError("env key %r is not a usable environment variable name (%s are set by the module, and "
                              "env_secrets names cannot be repeated)" % (var, ", ".join(sorted(RESERVED_ENV))))
        if not isinstance(value, str):
            raise SecretError("env[%s] must be a string" % var)
    if p.get("namespace"):
        if p["chdir"]:
            raise SecretError("chdir cannot be used with namespace: inside, the command runs in %s, where its files "
                              "and file secrets are; drop chdir" % INSIDE_DIR)
        taken = set(p["file_secrets"])
        for filename, path in (p.get("files") or {}).items():
            if not sec.NAME_RE.match(filename) or filename in taken:
                raise SecretError("files key %r is not a plain file name (letters, digits, '.', '_', '-') or is also "
                                  "a file_secrets name" % filename)
            if not isinstance(path, str) or not os.path.isabs(path) or not os.path.isfile(path):
                raise SecretError("files[%s] %s is not an existing file given by its absolute path" % (filename, path))
    elif p.get("files"):
        raise SecretError("files are copied into a namespace: pass namespace, or use chdir on the controller")
    if p["pass_aws_credentials"] and drill_session(p) is None:
        raise SecretError("pass_aws_credentials needs the drill's session as explicit access_key and secret_key "
                          "(and session_token) arguments, not the controller's environment, profile or files; "
                          "pass drill_aws_session or set pass_aws_credentials to false")


def drill_session(params: dict):
    """``{AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN}`` given explicitly as options, or None.

    Credentials from the controller's environment (amazon.aws' fallbacks), a profile or the
    shared files are not the drill's session and are never handed to a child.
    """
    p = params
    if p.get("profile") or not p.get("access_key") or not p.get("secret_key"):
        return None
    controller = {os.environ[name] for name in CONTROLLER_CREDENTIAL_ENV if os.environ.get(name)}
    if p["access_key"] in controller or p["secret_key"] in controller:
        return None
    return {"AWS_ACCESS_KEY_ID": p["access_key"], "AWS_SECRET_ACCESS_KEY": p["secret_key"],
            "AWS_SESSION_TOKEN": p.get("session_token")}


def read_secrets(params: dict, names: set, client=None) -> dict:
    """``{name: value}`` from the drill's store; a missing secret raises :class:`SecretError`.

    ``client(service)`` returns a retrying client (Secrets Manager store only).
    """
    p = params
    values = {}
    if p["store"] == "tmpfs":
        directory = os.path.abspath(p["tmpfs_dir"] or sec.default_tmpfs_dir(p["drill_id"]))
        try:
            if names:
                # Same checks as the writer: a tmpfs, our own 0700 directory, not a symlink.
                sec.require_tmpfs(directory)
                if check_private_dir(directory) is None:
                    raise SecretError("the tmpfs store %s does not exist; create it with drill_secrets first"
                                      % directory)
                ensure_private_dir(directory)
            for name in sorted(names):
                values[name] = sec.read_secret_file(directory, name)
        except (SecretError, OSError) as exc:
            raise SecretError("cannot read the drill's secrets: %s" % exc) from None
        return values
    sm = client("secretsmanager") if names else None
    for name in sorted(names):
        secret_id = sec.secret_prefix(p["drill_id"]) + name
        try:
            response = sm.get_secret_value(SecretId=secret_id)
        except _AWS_ERRORS as e:
            if is_not_found(e):
                raise SecretError("secret %s does not exist; create it with drill_secrets first" % secret_id) from None
            raise SecretError("Cannot read secret %s" % secret_id, exception=e) from e
        if "SecretString" not in response:
            raise SecretError("secret %s is binary; only string secrets can be injected" % secret_id)
        values[name] = response["SecretString"]
    return values


def _finish_environment(env: dict, params: dict, injected: dict, region) -> tuple:
    """Add the drill's session (when asked) and the injected secrets to ``env``; ``(env, credential values)``."""
    extra_values = []
    if params["pass_aws_credentials"]:
        for name, value in (drill_session(params) or {}).items():
            if value:
                env[name] = value
                extra_values.append(value)
        if region:
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    env.update(injected)
    return env, extra_values


def child_environment(params: dict, injected: dict, home: str, region=None) -> tuple:
    """``(env, credential values)``: the allow-listed controller variables, the fixed ones, the injected ones."""
    env = {k: v for k, v in os.environ.items() if k in ALLOWED_ENV or k.startswith(ALLOWED_ENV_PREFIXES)}
    env.update(FIXED_ENV)
    env["HOME"] = home
    return _finish_environment(env, params, injected, region)


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


def run(argv, env, cwd, timeout, limit=MAX_OUTPUT_BYTES, *, pass_fds=()):
    """Run ``argv``; returns ``(rc, out, err, seconds, timed_out, dropped_out, dropped_err, lingering)``.

    Reading is bounded in time and size: each stream keeps its first ``limit`` bytes (the
    rest is read and dropped, so the command never blocks on a full pipe); after the
    command exits or is killed at ``timeout``, its pipes get ``DRAIN_SECONDS`` to close -
    a process that escaped the group (``setsid``) and still holds them is not waited for
    (``lingering``). What is left of the process group after the command is killed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, pass_fds=pass_fds)
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
    # mkdtemp's 0700 is cut by the umask: tightened to exactly 0700, through a descriptor.
    ensure_private_dir(directory)
    return directory


def inside_environment(params: dict, injected: dict, region=None) -> tuple:
    """``(env, credential values)`` of a command run inside a namespace: nothing of the controller's
    environment, a fixed ``PATH``, ``HOME`` on the workload's scratch, the fixed AWS variables, ``env``,
    the injected secrets and (when asked) the drill's session."""
    env = {"PATH": INSIDE_PATH, "LANG": "C.UTF-8", "HOME": INSIDE_HOME}
    env.update(FIXED_ENV)
    env.update(params.get("env") or {})
    return _finish_environment(env, params, injected, region)


def execute_inside(params: dict, values: dict, injected: dict, *, region=None, hide=None):
    """Run the command inside ``namespace`` (``_netns``): unprivileged under a uid of its own, its files
    and file secrets on a tmpfs of its own mount namespace (:data:`INSIDE_DIR`, 0400 / 0600, its own uid's),
    never on a disk or argv. Returns :func:`run`'s tuple and the credential values to hide."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415
    p = params
    files = {name: {"source": os.path.abspath(path), "mode": 0o400} for name, path in (p.get("files") or {}).items()}
    for filename, name in p["file_secrets"].items():
        files[filename] = {"data": values[name], "mode": 0o600}
    if p["file_secrets"]:
        injected = dict(injected, **{SECRETS_DIR_ENV: INSIDE_DIR})
    env, extra = inside_environment(p, injected, region)
    for value in extra:
        hide(value)
    try:
        command, clean, spec_fd = _netns.workload_command(
            p["namespace"], p["argv"], files=files, scratch=INSIDE_HOME_BYTES,
            uid=_netns.workload_uid() if os.geteuid() == 0 else None, env=env)
    except _netns.NetnsError as exc:
        raise SecretError("cannot run %s inside %s: %s" % (p["argv"][0], p["namespace"], exc.msg)) from None
    try:
        outcome = run(command, clean, "/", p["timeout"], pass_fds=() if spec_fd is None else (spec_fd,))
    except OSError as exc:
        raise SecretError("cannot run %s inside %s: %s" % (p["argv"][0], p["namespace"], exc.strerror),
                          argv=p["argv"]) from None
    finally:
        if spec_fd is not None:
            os.close(spec_fd)
    return outcome, extra


def execute(params: dict, client=None, *, region=None, hide=None, warn=None) -> dict:
    """Read the secrets, run the command with them, and return the module's result.

    ``client(service)`` returns a retrying client; ``hide(value)`` marks a value as secret
    in the module's output (every secret and credential is hidden as soon as it is read);
    ``warn(msg)`` reports a warning. Raises :class:`SecretError` - with the command's
    redacted result as ``kwargs`` when it failed or timed out. The private ``HOME`` and
    secrets directory are wiped whatever happens.
    """
    p = params
    hide = hide or _ignore
    warn = warn or _ignore
    values = read_secrets(p, set(p["env_secrets"].values()) | set(p["file_secrets"].values()), client)
    for value in values.values():
        hide(value)
    injected = {var: values[name] for var, name in p["env_secrets"].items()}
    if p.get("namespace"):
        outcome, extra = execute_inside(p, values, injected, region=region, hide=hide)
        return _finish(p, values, extra, warn, outcome)
    injected.update(p.get("env") or {})
    secrets_dir = home = None
    try:
        try:
            home = tmpfs_private_dir("home", p["drill_id"])
        except (SecretError, OSError) as exc:
            raise SecretError("cannot create the command's private HOME on a tmpfs: %s" % exc) from None
        if p["file_secrets"]:
            try:
                secrets_dir = tmpfs_private_dir("exec", p["drill_id"])
                for filename, name in p["file_secrets"].items():
                    sec.write_secret_file(secrets_dir, filename, values[name])
            except (SecretError, OSError) as exc:
                raise SecretError("cannot write secret files to a tmpfs: %s" % exc) from None
            injected[SECRETS_DIR_ENV] = secrets_dir
        env, extra = child_environment(p, injected, home, region)
        for value in extra:
            hide(value)
        try:
            outcome = run(p["argv"], env, p["chdir"], p["timeout"])
        except OSError as exc:
            raise SecretError("cannot run %s: %s" % (p["argv"][0], exc.strerror), argv=p["argv"]) from None
    finally:
        for directory in (secrets_dir, home):
            if directory:
                sec.wipe_dir(directory)
    return _finish(p, values, extra, warn, outcome)


def _finish(p, values, extra, warn, outcome):
    """The module's result from :func:`run`'s ``outcome``: outputs redacted; a timeout or non-zero exit raises."""
    rc, out, err, seconds, timed_out, cut_out, cut_err, lingering = outcome
    if lingering:
        warn("a process started by %s outside its process group still held the output open %d seconds after the "
             "command ended; the rest of its output was not read" % (p["argv"][0], DRAIN_SECONDS))
    hidden = list(values.values()) + extra
    result = dict(changed=False, argv=p["argv"], rc=rc, stdout=bounded_redacted(out, cut_out, hidden),
                  stderr=bounded_redacted(err, cut_err, hidden), stdout_truncated=bool(cut_out),
                  stderr_truncated=bool(cut_err), seconds=round(seconds, 3))
    if p.get("namespace"):
        result["inside"] = p["namespace"]
    if timed_out:
        raise SecretError("command %s did not finish within %d seconds and was killed" % (p["argv"][0], p["timeout"]),
                          **result)
    if rc != 0:
        raise SecretError("command %s exited with rc %d" % (p["argv"][0], rc), **result)
    return result
