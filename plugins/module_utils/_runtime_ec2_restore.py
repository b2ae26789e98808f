# Copyright: drguard maintainers
# Apache License 2.0
"""Restore and validation on the ec2 runtime's validation instance, through SSM Run Command (docs/runtime.md).

The controller never handles the backup's bytes here: it sends shell lines (``AWS-RunShellScript``)
to the validation tier's instance, which

1. fetches the drill's session from the secret store *by name* with its own instance role
   (``drguard/<drill id>/runtime/session``, which only that instance may read: the runtime role's
   per-tier statements) into a 0400 file of uid 65534 on a tmpfs, removed when the command ends;
2. runs, unprivileged (uid 65534, no capability, no_new_privs, an empty environment), a small
   standard-library driver (:data:`DRIVER_SOURCE`) that reads each verified artifact by its pinned
   version from the regional S3 endpoint (``_s3_relay``'s SigV4 client; on AWS through the VPC's
   S3 gateway endpoint) into a size-capped tmpfs and prints one JSON line per artifact: its size
   and SHA-256;
3. for the validation, runs ``_workloads``' validators over the restored files, unprivileged, and
   prints their JSON results.

The programs and requests travel gzip-compressed and base64-encoded in the command (no secret
value ever does: AWS keeps a command's parameters in its history). The controller compares every
printed size and digest with what was verified; a difference, a missing or unreadable line, a
status other than ``Success`` or no answer in time is a failure (fail closed). The emulator runs no
command: there every restore ends with "no result".
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shlex
import stat


from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_relay
from ansible_collections.drguard.sandbox.plugins.module_utils import _workloads
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_EXPIRES_AT
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags

ROOT = "/run/drguard"  # a tmpfs on the instance (systemd's /run)
BIN = ROOT + "/bin"  # the programs: root's, 0444
SESSION_DIR = ROOT + "/session"  # 0700, uid 65534: the session file for the length of one command
SESSION_FILE = SESSION_DIR + "/session.json"
RESTORE_DIR = ROOT + "/restore"  # a tmpfs of its own (size-capped), uid 65534, 0700: the restored artifacts
WORK_DIR = ROOT + "/work"  # a tmpfs of its own (size-capped), uid 65534, 0700: the validators' extractions
DRIVER = "drguard_ec2.py"
PYTHON = "/usr/bin/python3"
WORKLOAD_ENV = ("PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HOME=%s" % RESTORE_DIR)
OUTPUT_LIMIT = 24000  # what GetCommandInvocation returns of stdout at most
MAX_COMMAND_CHARS = 48 * 1024  # the whole ``commands`` parameter of one SendCommand, well under SSM's 64 KB
BATCH_ITEMS = 100  # artifacts per command (their result lines must fit OUTPUT_LIMIT)
RESTORE_SLACK = 16 * 1024 * 1024  # the restore tmpfs' room for directories and pages beyond the bytes
COMMAND_TIMEOUT = 900

# The driver on the instance: standard library only, beside s3_relay.py / workloads.py in BIN.
DRIVER_SOURCE = r'''
import hashlib, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _path(root, rel):
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError("unsafe artifact name")
    return os.path.join(root, *parts)


def _get(relay, request, item, session, dest):
    target = _path(dest, item["rel"])
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    conn, resp = relay._open(request, item, session)
    try:
        if resp.status != 200:
            raise ValueError("S3 answered %d %s" % (resp.status, relay._error_code(resp.read(4096))))
        want, seen, digest = int(item["size"]), 0, hashlib.sha256()
        part = target + ".drguard-part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                while seen <= want:
                    chunk = resp.read(min(1 << 20, want + 1 - seen))
                    if not chunk:
                        break
                    digest.update(chunk)
                    seen += len(chunk)
                    handle.write(chunk)
            if seen != want or digest.hexdigest() != item["sha256"]:
                os.unlink(part)  # never left where the validators look; the controller judges the figures
            else:
                os.chmod(part, 0o400)
                os.replace(part, target)
        except BaseException:
            if os.path.lexists(part):
                os.unlink(part)
            raise
    finally:
        conn.close()
    return {"size": seen, "sha256": digest.hexdigest()}


def restore(session_path, dest):
    import s3_relay
    request = json.load(sys.stdin)
    with open(session_path, encoding="utf-8") as handle:
        session = json.load(handle)
    for index, item in enumerate(request["artifacts"]):
        line = {"i": index}
        try:
            line.update(_get(s3_relay, request, item, session, dest))
        except Exception as exc:
            line["error"] = ("%s: %s" % (type(exc).__name__, exc))[:300]
        print(json.dumps(line), flush=True)
        if "error" in line:
            return 1
    print(json.dumps({"done": True}), flush=True)
    return 0


def validate(dest, scratch):
    import workloads
    request = json.load(sys.stdin)
    try:
        restored = [dict(e, path=_path(dest, e["rel"])) for e in request["restored"]]
        outcome = workloads.validate(restored, request["min_rows"], workloads.Caps(**request["caps"]),
                                     extract=request["extract"], scratch=scratch)
    except (ValueError, workloads.RestoreError) as exc:
        print(json.dumps({"error": str(exc)[:300]}))
        return 2
    for result in outcome.results:
        result.pop("extracted_to", None)
    print(json.dumps({"valid": outcome.valid, "results": outcome.results}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["restore"] and len(sys.argv) == 4:
        sys.exit(restore(sys.argv[2], sys.argv[3]))
    if sys.argv[1:2] == ["validate"] and len(sys.argv) == 4:
        sys.exit(validate(sys.argv[2], sys.argv[3]))
    sys.stderr.write("usage: restore <session file> <dest> | validate <dest> <scratch>\n")
    sys.exit(64)
'''


class Ec2RestoreError(RestoreError):
    """The restore or validation on the ec2 runtime failed; the message says what and what to do."""


# ---------------------------------------------------------------- names, the session secret


def checked_target(drill_id, command_timeout: int) -> str:
    """The drill id a module's ec2 backend works on, checked with its ``command_timeout`` (30 to 3600 s),
    before any AWS call; :class:`RestoreError` names what is wrong."""
    from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id  # noqa: PLC0415
    if not drill_id:
        raise RestoreError("drill_id is required with backend ec2: it names the runtime's validation instance")
    if not 30 <= command_timeout <= 3600:
        raise RestoreError("command_timeout %d must be between 30 and 3600 seconds" % command_timeout)
    try:
        return validate_drill_id(drill_id)
    except ValueError as exc:
        raise RestoreError(str(exc)) from None


def session_secret_name(drill_id: str) -> str:
    """``drguard/<drill id>/runtime/session``: the drill's session for the validation instance (deleted at teardown)."""
    return _runtime_ec2.runtime_secret_prefix(drill_id) + _runtime_ec2.SESSION_SECRET


def validation_instance(ec2, drill_id: str) -> dict:
    """The validation tier's one running instance (``{instance_id, tags}``), or :class:`Ec2RestoreError`."""
    name = _runtime_ec2.instance_name(drill_id, _runtime_ec2.VALIDATION_TIER)
    found = [i for i in _runtime_ec2._instances(ec2, drill_id, ("running",))  # pylint: disable=protected-access
             if boto3_tag_list_to_ansible_dict(i.get("Tags")).get("Name") == name]
    if len(found) != 1:
        raise Ec2RestoreError("drill %s has %d running instances named %s where there must be one; start the ec2 "
                              "runtime (sandbox_runtime backend ec2) first" % (drill_id, len(found), name))
    return {"instance_id": found[0]["InstanceId"], "tags": boto3_tag_list_to_ansible_dict(found[0].get("Tags"))}


def put_session(sm, drill_id: str, session: dict, tags: dict, *, check_mode: bool = False) -> str:
    """Store the drill's session (key, secret, token, expiry) as the drill's session secret, tagged as the drill's.

    An existing secret of that name must carry the drill's tag (else refused, never overwritten).
    Returns the secret's name: the only thing about it that travels to the instance.
    """
    name = session_secret_name(drill_id)
    text = json.dumps({k: v for k, v in session.items() if v})
    meta = _runtime_ec2.drill_secret(sm, drill_id, name)
    if check_mode:
        return name
    if meta is not None and meta.get("DeletedDate"):  # scheduled for deletion: its name is taken until restored
        sm.restore_secret(SecretId=name)
    if meta is None:
        sm.create_secret(Name=name, SecretString=text, Tags=ansible_dict_to_boto3_tag_list(tags),
                         Description="drguard drill %s: the drill's session for the validation instance" % drill_id)
    else:
        sm.put_secret_value(SecretId=name, SecretString=text)
    return name


# ---------------------------------------------------------------- the shell lines (pure)


def _packed(text) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return base64.b64encode(gzip.compress(data, 9, mtime=0)).decode("ascii")


def _install(name: str, source, directory: str = BIN) -> str:
    path = "%s/%s" % (directory, name)
    return "echo %s | base64 -d | gzip -dc > %s.tmp && chmod 0444 %s.tmp && mv -f %s.tmp %s" % (
        _packed(source), path, path, path, path)


def _unprivileged(argv: list, env: tuple = ()) -> str:
    return "%s %s %s" % (_runtime_ec2.UNPRIVILEGED, " ".join(shlex.quote(e) for e in env),
                         " ".join(shlex.quote(a) for a in argv))


def _tmpfs(path: str, size: int) -> list:
    """Lines giving ``path`` a fresh tmpfs of ``size`` bytes owned by uid 65534 (0700), whatever was there."""
    return ["if mountpoint -q %s; then umount %s; fi" % (path, path),
            "rm -rf %s" % path,
            "install -d -m 0700 %s" % path,
            "mount -t tmpfs -o size=%d,mode=0700,uid=65534,gid=65534,nosuid,nodev,noexec drguard %s" % (size, path)]


def _request_line(request: dict, argv: list) -> str:
    return "echo %s | base64 -d | gzip -dc | %s" % (_packed(json.dumps(request, sort_keys=True)),
                                                    _unprivileged([PYTHON, "-I", "-S"] + argv))


def restore_commands(secret: str, region: str, request: dict, *, fresh: bool, size: int) -> list:
    """The shell lines of one restore command (``request``: :func:`restore_request`); ``fresh``: a new restore dir.

    Only the session secret's *name* is in them; the session lands in a 0400 file of uid 65534,
    removed when the command ends, whatever it does.
    """
    lines = ["set -eu", "umask 077",
             "install -d -m 0711 %s" % ROOT,
             "install -d -m 0755 %s" % BIN,
             _install("s3_relay.py", _s3_relay.program()),
             _install(DRIVER, DRIVER_SOURCE)]
    if fresh:
        lines += _tmpfs(RESTORE_DIR, size)
    lines += ["test -d %s" % RESTORE_DIR,
              "rm -rf %s" % SESSION_DIR,
              "install -d -m 0700 -o 65534 -g 65534 %s" % SESSION_DIR,
              "trap 'rm -f %s' EXIT" % SESSION_FILE,
              _runtime_ec2.fetch_secret_line(secret, region, SESSION_FILE),
              "chown 65534:65534 %s" % SESSION_FILE, "chmod 0400 %s" % SESSION_FILE,
              "cd %s" % RESTORE_DIR,
              _request_line(request, ["%s/%s" % (BIN, DRIVER), "restore", SESSION_FILE, RESTORE_DIR])]
    return lines


def validate_commands(request: dict, scratch: int) -> list:
    """The shell lines of one validation command over the restored files (``request``: :func:`validate_request`)."""
    lines = ["set -eu", "umask 077",
             "install -d -m 0711 %s" % ROOT,
             "install -d -m 0755 %s" % BIN,
             "test -d %s" % RESTORE_DIR,
             _install("workloads.py", _workloads.program()),
             _install(DRIVER, DRIVER_SOURCE)]
    return lines + _tmpfs(WORK_DIR, scratch) + [
        "cd %s" % RESTORE_DIR,
        _request_line(request, ["%s/%s" % (BIN, DRIVER), "validate", RESTORE_DIR, WORK_DIR])]


COMMAND_OUT = ROOT + "/command.out"  # root's: the user's command's output, of which the tail is printed
COMMAND_MARK = "drguard-command-exit "
COMMAND_TAIL = 4000
SCRIPT_DIR = ROOT + "/command"  # root's, 0755: the user's script handed in (0444)
MAX_SCRIPT = 16 * 1024


def script_of(path: str) -> tuple:
    """``(name, bytes)`` of the user's script on the controller: a regular file (no symlink) of at most 16 KiB."""
    name = os.path.basename(path or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise Ec2RestoreError("script %r needs a plain file name (letters, digits, '.', '_', '-') to be handed to the "
                              "validation instance; rename it" % (path,))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Ec2RestoreError("script %s cannot be read (%s); pass a readable file" % (path, exc.strerror)) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise Ec2RestoreError("script %s is not a regular file; pass the script itself" % path)
        data = handle.read(MAX_SCRIPT + 1)
    if len(data) > MAX_SCRIPT:
        raise Ec2RestoreError("script %s is larger than %d bytes, too large to travel in an SSM command; install it "
                              "on the instance's image instead" % (path, MAX_SCRIPT))
    return name, data


def user_commands(argv: list, script: tuple | None = None) -> list:
    """The user's validation command, unprivileged, in the restore directory, with an environment of its own only.

    ``script`` (:func:`script_of`) is handed in first as ``/run/drguard/command/<name>`` (0444,
    root's). Its output goes to a file and only its tail is printed, then the exit mark
    (:data:`COMMAND_MARK`) as the last line: no mark, no result (an agent that ran nothing prints none).
    """
    lines = ["set -u", "umask 077",
             "test -d %s || { echo 'nothing was restored on this instance' >&2; exit 3; }" % RESTORE_DIR]
    if script is not None:
        lines += ["rm -rf %s" % SCRIPT_DIR, "install -d -m 0755 %s" % SCRIPT_DIR,
                  _install(script[0], script[1], SCRIPT_DIR) + " || exit 3"]
    return lines + [
        "cd %s" % RESTORE_DIR,
        "rm -f %s" % COMMAND_OUT,
        "%s > %s 2>&1 < /dev/null; rc=$?" % (_unprivileged(list(argv), WORKLOAD_ENV), COMMAND_OUT),
        "tail -c %d %s; rm -f %s" % (COMMAND_TAIL, COMMAND_OUT, COMMAND_OUT),
        "echo; echo %s$rc" % COMMAND_MARK]


def parse_user_output(res: dict) -> tuple:
    """``(rc, output)`` of the user's command from one command's result; no exit mark is :class:`Ec2RestoreError`."""
    text = (res.get("stdout") or "").rstrip("\n")
    body, _sep, last = text.rpartition("\n")
    if res.get("status") not in ("Success", "Failed") or not last.startswith(COMMAND_MARK) \
            or not last[len(COMMAND_MARK):].isdigit():
        raise Ec2RestoreError("no result: the validation command on the validation instance did not report its exit "
                              "code (%s); look at the command in the SSM console" % _where(res))
    return int(last[len(COMMAND_MARK):]), body[:-1] if body.endswith("\n") else body


def commands_size(lines: list) -> int:
    """Characters of the ``commands`` parameter as SSM counts them (JSON)."""
    return len(json.dumps({"commands": lines}))


# ---------------------------------------------------------------- requests and their answers (pure)


def _rel(name) -> str:
    from ansible_collections.drguard.sandbox.plugins.module_utils._restore import safe_relative  # noqa: PLC0415
    return safe_relative(name).replace("\\", "/")


def checked_artifacts(artifacts: list) -> list:
    """Each verified entry as ``{name, rel, bucket, key, version_id, size, sha256, kind?, expect?}``; bad input
    (not verified, no digest, an unsafe name, a local source) is refused with one sentence, naming the artifact."""
    if not artifacts:
        raise Ec2RestoreError("artifacts is empty: nothing was verified, so nothing can be restored")
    out, seen = [], set()
    for entry in artifacts:
        name = entry.get("name")
        if not entry.get("verified"):
            raise Ec2RestoreError("artifact %r was not verified; refusing to restore it" % (name,))
        if not entry.get("sha256") or entry.get("size") is None or not entry.get("source"):
            raise Ec2RestoreError("artifact %r lacks sha256, size or source" % (name,))
        if not is_s3(str(entry["source"])):
            raise Ec2RestoreError("artifact %r comes from the local source %s, which the ec2 runtime's validation "
                                  "instance cannot read; restore from S3 or choose drill_runtime.backend netns"
                                  % (name, entry["source"]))
        rel = _rel(name)
        if rel in seen:
            raise Ec2RestoreError("artifact name %r appears twice; every artifact needs its own name" % (name,))
        seen.add(rel)
        loc = parse_s3(entry["source"], "source")
        item = {"name": name, "rel": rel, "bucket": loc.bucket, "key": loc.key, "size": int(entry["size"]),
                "version_id": entry.get("version_id") or loc.version_id, "sha256": entry["sha256"]}
        for key in ("kind", "expect"):
            if entry.get(key) is not None:
                item[key] = entry[key]
        out.append(item)
    return out


def restore_request(items: list, to: dict, region: str) -> dict:
    """What the driver reads on stdin: where S3 is (``_s3_relay.target``) and the artifacts (no secret)."""
    return {"artifacts": [{k: i[k] for k in ("rel", "bucket", "key", "version_id", "size", "sha256")} for i in items],
            "connect": [to["host"], int(to["port"])], "scheme": to["scheme"], "netloc": to["netloc"],
            "region": region}


def batches(items: list, limit: int = BATCH_ITEMS, budget: int = 20000) -> list:
    """``items`` cut into runs of at most ``limit`` whose JSON stays within ``budget`` characters."""
    out, run, used = [], [], 0
    for item in items:
        size = len(json.dumps(item))
        if run and (len(run) >= limit or used + size > budget):
            out.append(run)
            run, used = [], 0
        run.append(item)
        used += size
    return out + ([run] if run else [])


def _where(res: dict) -> str:
    return "SSM command %s on %s ended %s" % (res.get("command_id"), res.get("instance_id"), res.get("status"))


def _lines(stdout: str) -> list:
    out = []
    for text in (stdout or "").splitlines():
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            raise Ec2RestoreError("the validation instance printed something that is not a result (%r); nothing of "
                                  "this run is trusted" % text[:80])
        out.append(line)
    return out


def parse_restore_output(res: dict, items: list) -> list:
    """The restored entries of one command's result ``res`` (``run_command``'s), each checked against ``items``.

    Fail closed: a status other than ``Success``, a missing, unreadable or failed line, a size or
    SHA-256 other than the verified one, or no end mark is :class:`Ec2RestoreError` with the reason.
    """
    lines = _lines(res.get("stdout"))
    by_index = {}
    for line in lines:
        if "i" in line:
            by_index[line["i"]] = line
    out = []
    for index, item in enumerate(items):
        line = by_index.get(index)
        if line is None:
            raise Ec2RestoreError("no result for artifact %s from the validation instance (%s); the restore on ec2 "
                                  "did not run to its end: look at the command in the SSM console and run the drill "
                                  "again" % (item["name"], _where(res)))
        if line.get("error"):
            raise Ec2RestoreError("the validation instance could not restore %s: %s (%s)"
                                  % (item["name"], str(line["error"])[:300], _where(res)))
        if line.get("size") != item["size"] or line.get("sha256") != item["sha256"]:
            raise Ec2RestoreError("%s: the bytes restored on the validation instance differ from what was verified "
                                  "(size %s, sha256 %s; verified %d, %s)"
                                  % (item["name"], line.get("size"), line.get("sha256"), item["size"], item["sha256"]))
        entry = {"name": item["name"], "path": "%s/%s" % (RESTORE_DIR, item["rel"]), "sha256": item["sha256"],
                 "size": item["size"], "on_instance": True}
        for key in ("kind", "expect"):
            if key in item:
                entry[key] = item[key]
        out.append(entry)
    if res.get("status") != "Success" or not any(line.get("done") is True for line in lines):
        raise Ec2RestoreError("no result: the restore on the validation instance did not end cleanly (%s)"
                              % _where(res))
    return out


def validate_request(restored: list, min_rows: int, caps, *, extract: bool) -> dict:
    """What the validation driver reads: the restored entries by their path inside the restore dir, the caps."""
    entries = []
    for entry in restored:
        path = str(entry.get("path") or "")
        if not entry.get("on_instance") or not path.startswith(RESTORE_DIR + "/"):
            raise Ec2RestoreError("restored entry %r is not a file restored on the validation instance (%s); pass "
                                  "restore_artifacts' result with backend ec2" % (entry.get("name"), path))
        item = {"name": entry.get("name"), "rel": path[len(RESTORE_DIR) + 1:]}
        for key in ("kind", "expect"):
            if entry.get(key) is not None:
                item[key] = entry[key]
        entries.append(item)
    return {"restored": entries, "min_rows": int(min_rows), "extract": bool(extract),
            "caps": {"max_members": caps.max_members, "max_total_bytes": caps.max_total_bytes,
                     "max_ratio": caps.max_ratio}}


def parse_validate_output(res: dict, entries: list) -> list:
    """The validators' results of one command, one per entry in order; anything else is :class:`Ec2RestoreError`."""
    lines = _lines(res.get("stdout"))
    answer = lines[-1] if lines else None
    answered = isinstance(answer, dict) and isinstance(answer.get("results"), list)
    if res.get("status") != "Success" or not answered:
        why = answer.get("error") if isinstance(answer, dict) and answer.get("error") else "no result"
        raise Ec2RestoreError("validation on the validation instance failed: %s (%s)" % (str(why)[:300],
                                                                                         _where(res)))
    results = answer["results"]
    names = [r.get("name") if isinstance(r, dict) else None for r in results]
    if names != [e["name"] for e in entries] or not all(isinstance(r.get("valid"), bool) for r in results):
        raise Ec2RestoreError("validation on the validation instance answered for %s where %s were asked; no "
                              "result is trusted (%s)" % (names, [e["name"] for e in entries], _where(res)))
    return results


# ---------------------------------------------------------------- the work, through SSM


def restore_ec2(clients: dict, drill_id: str, artifacts: list, *, session: dict, region: str, to: dict,
                timeout: float = COMMAND_TIMEOUT, check_mode: bool = False, **kw) -> dict:
    """Restore ``artifacts`` (verify_artifacts' list) on the validation instance; ``{changed, restored, ...}``.

    ``clients``: ``ec2``, ``ssm``, ``secretsmanager`` (the controller's). ``session``: the drill's
    (``AWS_ACCESS_KEY_ID`` ...), stored as the session secret; ``to``: ``_s3_relay.target``.
    """
    items = checked_artifacts(artifacts)
    if not session or not session.get("AWS_ACCESS_KEY_ID") or not session.get("AWS_SECRET_ACCESS_KEY"):
        raise Ec2RestoreError("the restore on ec2 needs the drill's session as explicit access_key, secret_key and "
                              "session_token; pass the drill's minted session (never the controller's own)")
    inst = validation_instance(clients["ec2"], drill_id)
    inside = "%s (%s)" % (inst["instance_id"], _runtime_ec2.VALIDATION_TIER)
    expires = inst["tags"].get(TAG_EXPIRES_AT)
    if not expires:
        raise Ec2RestoreError("the validation instance %s has no %s tag; start the ec2 runtime again"
                              % (inst["instance_id"], TAG_EXPIRES_AT))
    secret = put_session(clients["secretsmanager"], drill_id, session, drill_tags(drill_id, expires),
                         check_mode=check_mode)
    if check_mode:
        return {"changed": True, "restored": [], "bytes_restored": 0, "inside": inside, "session_secret": secret}
    size = sum(i["size"] for i in items) + RESTORE_SLACK
    restored = []
    for n, run in enumerate(batches(items)):
        lines = restore_commands(secret, region, restore_request(run, to, region), fresh=n == 0, size=size)
        if commands_size(lines) > MAX_COMMAND_CHARS:
            raise Ec2RestoreError("the restore command for %s would be %d characters, more than the %d one SSM "
                                  "command may carry here; shorten the artifacts' names or keys"
                                  % (run[0]["name"], commands_size(lines), MAX_COMMAND_CHARS))
        res = _runtime_ec2.run_command(clients["ssm"], [inst["instance_id"]], lines, timeout=timeout,
                                       comment="drguard restore", output_limit=OUTPUT_LIMIT, **kw)[0]
        restored += parse_restore_output(res, run)
    return {"changed": True, "restored": restored, "bytes_restored": sum(r["size"] for r in restored),
            "inside": inside, "session_secret": secret}


def _scratch(restored: list, caps) -> int:
    largest = max((int(e.get("size") or 0) for e in restored), default=0)
    return min(caps.max_total_bytes, caps.max_ratio * max(largest, 1)) + _workloads.SCRATCH_SLACK


def validate_ec2(clients: dict, drill_id: str, restored: list, min_rows: int, caps, *, extract: bool = True,
                 timeout: float = COMMAND_TIMEOUT, **kw):
    """``_workloads.validate`` over the files restored on the validation instance; a ``Validation`` and ``inside``."""
    caps.check()
    if not restored:
        return _workloads.Validation(False, []), None
    request = validate_request(restored, min_rows, caps, extract=extract)
    inst = validation_instance(clients["ec2"], drill_id)
    inside = "%s (%s)" % (inst["instance_id"], _runtime_ec2.VALIDATION_TIER)
    results = []
    for run in batches(request["restored"], limit=40, budget=12000):
        lines = validate_commands(dict(request, restored=run), _scratch(restored, caps))
        if commands_size(lines) > MAX_COMMAND_CHARS:
            raise Ec2RestoreError("the validation command would be %d characters, more than the %d one SSM command "
                                  "may carry here" % (commands_size(lines), MAX_COMMAND_CHARS))
        res = _runtime_ec2.run_command(clients["ssm"], [inst["instance_id"]], lines, timeout=timeout,
                                       comment="drguard validate", output_limit=OUTPUT_LIMIT, **kw)[0]
        results += parse_validate_output(res, run)
    return _workloads.Validation(bool(results) and all(r["valid"] for r in results), results), inside


def run_user_command(clients: dict, drill_id: str, argv: list, *, script_path: str | None = None,
                     timeout: float = 600, **kw) -> dict:
    """The user's validation command on the validation instance (:func:`user_commands`): ``{rc, stdout, inside}``.

    ``script_path``: a script on the controller handed in (:func:`script_of`); every argument equal
    to it names the copy on the instance. Fail closed: no final status in time or no exit mark is
    :class:`Ec2RestoreError`; a non-zero exit is returned (the caller fails on it).
    """
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise Ec2RestoreError("command must be a non-empty list of non-empty strings (argv)")
    script = script_of(script_path) if script_path else None
    if script is not None:
        argv = ["%s/%s" % (SCRIPT_DIR, script[0]) if a == script_path else a for a in argv]
    inst = validation_instance(clients["ec2"], drill_id)
    inside = "%s (%s)" % (inst["instance_id"], _runtime_ec2.VALIDATION_TIER)
    res = _runtime_ec2.run_command(clients["ssm"], [inst["instance_id"]], user_commands(argv, script),
                                   timeout=timeout, comment="drguard validation command", output_limit=OUTPUT_LIMIT,
                                   **kw)[0]
    rc, output = parse_user_output(res)
    return {"rc": rc, "stdout": output, "inside": inside, "command_id": res["command_id"]}
