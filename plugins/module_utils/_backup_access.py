# Copyright: drguard maintainers
# Apache License 2.0
"""Read-only exposure of a backup set to the drill (backend of backup_access).

* S3: the inline IAM policy ``drguard-backup-readonly`` on the drill's role: reads of
  the backup prefix (a folder: ``orders/`` never reaches ``orders-payroll/``), listing
  limited to the prefix, and an explicit Deny of every write, delete,
  retention/legal-hold change and bucket reconfiguration on the whole bucket. An
  explicit Deny wins over any Allow the role gets elsewhere.
* Local: a bind mount remounted ``ro,nosuid,nodev,noexec``; :func:`mount_entry` reads
  ``/proc/self/mountinfo`` so the state is read back from the kernel, not assumed.

Every failure is an :class:`AccessError`; the module's ``main()`` is the only place that
turns it into ``fail_json``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = None

from ansible_collections.amazon.aws.plugins.module_utils.exceptions import AnsibleAWSError

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._identity import policies_differ
from ansible_collections.drguard.sandbox.plugins.module_utils._identity import policy_document
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_prefix
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import s3_uri

POLICY_NAME = "drguard-backup-readonly"

READ_OBJECT_ACTIONS = [
    "s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectTagging", "s3:GetObjectVersionTagging",
    "s3:GetObjectRetention", "s3:GetObjectLegalHold", "s3:GetObjectAttributes",
    "s3:GetObjectVersionAttributes",
]
LIST_ACTIONS = ["s3:ListBucket", "s3:ListBucketVersions"]
# Read-only bucket settings the verifier may consult (versioning, Object Lock).
READ_BUCKET_ACTIONS = ["s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration", "s3:GetBucketLocation"]
DENY_ACTIONS = [
    "s3:PutObject*", "s3:DeleteObject*", "s3:PutObjectRetention", "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention", "s3:RestoreObject", "s3:PutBucket*", "s3:DeleteBucket*",
    # Writes whose action names do not start with PutBucket/PutObject but can still
    # destroy or move backup data.
    "s3:PutLifecycleConfiguration", "s3:PutReplicationConfiguration", "s3:PutEncryptionConfiguration",
    "s3:ReplicateObject", "s3:ReplicateDelete", "s3:AbortMultipartUpload",
]

MOUNT_OPTIONS = "remount,bind,ro,nosuid,nodev,noexec"
CAP_SYS_ADMIN = 21
# Stacked mounts at the same point that state=absent removes, one after the other.
MAX_STACKED_MOUNTS = 16

NEED_PRIVILEGE = ("mounting the backup read-only needs root or CAP_SYS_ADMIN; run the play as root "
                  "(become: true) or give the controller container CAP_SYS_ADMIN, or use an S3 backup source")

_AWS_ERRORS = tuple(e for e in (ClientError, BotoCoreError) if e is not None)
# Empty only without botocore, when AnsibleAWSModule has failed before any call (pylint cannot tell).
# pylint: disable=catching-non-exception,bad-exception-cause


class AccessError(AnsibleAWSError):
    """Bad input or unsafe state; ``message`` says what and what to do.

    ``exception`` is the boto error behind it, if any; ``kwargs`` are extra result
    fields for the failure (the policy read back, for instance).
    """


def parse_source(source: str) -> tuple:
    """``s3://bucket/prefix/`` (or ``s3://bucket``) -> ``(bucket, prefix)``; :class:`AccessError` otherwise.

    The prefix is a folder: it ends with ``/`` (``orders`` would also match
    ``orders-payroll/``) and holds no wildcard.
    """
    try:
        loc = parse_prefix(source, "source")
    except LocationError as exc:
        raise AccessError(str(exc)) from None
    return loc.bucket, loc.key


def readonly_policy(bucket: str, prefix: str) -> dict:
    """The identity policy that lets the drill read ``s3://bucket/prefix/`` and write nothing."""
    bucket, prefix = parse_source(s3_uri(bucket, prefix or ""))
    bucket_arn = "arn:aws:s3:::%s" % bucket
    list_stmt = {"Sid": "ListBackupPrefix", "Effect": "Allow", "Action": LIST_ACTIONS, "Resource": bucket_arn}
    if prefix:
        list_stmt["Condition"] = {"StringLike": {"s3:prefix": [prefix + "*"]}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "ReadBackupObjects", "Effect": "Allow", "Action": READ_OBJECT_ACTIONS,
             "Resource": "%s/%s*" % (bucket_arn, prefix)},
            list_stmt,
            {"Sid": "ReadBackupBucketSettings", "Effect": "Allow", "Action": READ_BUCKET_ACTIONS,
             "Resource": bucket_arn},
            {"Sid": "DenyEveryBackupWrite", "Effect": "Deny", "Action": DENY_ACTIONS,
             "Resource": [bucket_arn, bucket_arn + "/*"]},
        ],
    }


# ------------------------------------------------------------------------------- S3
def s3_access(iam, state: str, bucket: str, prefix: str, role: str, *, name: str = POLICY_NAME,  # noqa: PLR0913
              check_mode: bool = False, diff: bool = False) -> dict:
    """Put (``present``) or remove (``absent``) the read-only policy ``name`` on IAM role ``role``.

    ``iam`` is a retrying IAM client. Returns the module result; after writing, the
    policy is read back and must match what was written.
    """
    if not role:
        raise AccessError("role_name is required for an S3 backup source: the drill's IAM role "
                          "(drguard-<drill_id>, created by mint_credentials)")
    try:
        current = policy_document(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
    except _AWS_ERRORS as exc:
        if not is_not_found(exc):
            raise AccessError("Could not read inline policy %s of role %s" % (name, role), exception=exc) from exc
        current = None
        if state == "present":
            _check_role(iam, role)

    if state == "absent":
        result = {"changed": current is not None}
        if current is not None and not check_mode:
            try:
                iam.delete_role_policy(RoleName=role, PolicyName=name)
            except _AWS_ERRORS as exc:
                if not is_not_found(exc):
                    raise AccessError("Could not delete inline policy %s of role %s" % (name, role),
                                      exception=exc) from exc
        return _with_diff(result, diff, current, None)

    wanted = readonly_policy(bucket, prefix)
    fact = {"kind": "s3", "source": s3_uri(bucket, prefix), "read_only": True}
    result = {"changed": current is None or policies_differ(current, wanted), "backup_mount": fact, "policy": wanted}
    _with_diff(result, diff, current, wanted)
    if not result["changed"] or check_mode:
        return result
    try:
        iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=json.dumps(wanted))
        stored = policy_document(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
    except _AWS_ERRORS as exc:
        raise AccessError("Could not put the read-only backup policy on role %s" % role, exception=exc) from exc
    if policies_differ(stored, wanted):
        raise AccessError("the read-only policy read back from role %s differs from what was written; "
                          "the backup is not proven read-only" % role, policy=stored)
    return result


def _check_role(iam, role: str) -> None:
    try:
        iam.get_role(RoleName=role)
    except _AWS_ERRORS as exc:
        if is_not_found(exc):
            raise AccessError("IAM role %s does not exist; create the drill's role first "
                              "(mint_credentials creates drguard-<drill_id>)" % role) from None
        raise AccessError("Could not read IAM role %s" % role, exception=exc) from exc


def _with_diff(result: dict, diff: bool, before, after) -> dict:
    if diff:
        result["diff"] = {"before": before or {}, "after": after or {}}
    return result


# ---------------------------------------------------------------------------- local
def local_access(run_command, state: str, source: str, path: str, *, check_mode: bool = False) -> dict:
    """Bind-mount ``source`` read-only at ``path`` (``present``) or unmount it (``absent``).

    ``run_command(argv)`` runs a command and returns ``(rc, stdout, stderr)``
    (``module.run_command``). Returns the module result.
    """
    if not os.path.isabs(source):
        raise AccessError("source %r must be s3://bucket/prefix/ or an absolute directory" % source)
    if not path or not os.path.isabs(path):
        raise AccessError("path (an absolute mount point) is required for a local backup source")
    # Resolve symlinks in the parents (mountinfo reports real paths); the mount point
    # itself is never followed.
    path = os.path.normpath(path)
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        if state == "absent":
            return {"changed": local_absent(run_command, path, check_mode)}
        changed, entry = local_present(run_command, os.path.normpath(source), path, check_mode)
    except OSError as exc:
        raise AccessError("local backup mount failed: %s" % exc) from None
    return {"changed": changed, "mount": entry, "backup_mount": {"kind": "local", "source": path, "read_only": True}}


def _run(run_command, argv, what):
    rc, out, err = run_command(argv)
    if rc != 0:
        text = (err or out).strip()
        if "permission denied" in text.lower() or "must be superuser" in text.lower():
            raise AccessError(NEED_PRIVILEGE)
        raise AccessError("%s failed (rc=%d): %s" % (what, rc, text or "no output"))


def local_present(run_command, source, path, check_mode=False):
    """Mount ``source`` read-only at ``path``; ``(changed, mount entry)``, proven by a refused write."""
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
        if check_mode:
            return True, {}
        _run(run_command, ["mount", "-o", MOUNT_OPTIONS, path], "remounting %s read-only" % path)
        changed = True
    else:
        if not can_mount():
            raise AccessError(NEED_PRIVILEGE)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path) or os.listdir(path)):
            raise AccessError("mount point %s exists and is not an empty directory; choose a new or empty "
                              "directory" % path)
        if (os.path.realpath(path) + os.sep).startswith(source + os.sep):
            raise AccessError("mount point %s is inside the backup source %s" % (path, source))
        if check_mode:
            return True, {}
        # The mount point and its missing parents: 0700, ours, never a symlink.
        ensure_private_dir(path, parents=True)
        _run(run_command, ["mount", "--bind", source, path], "bind-mounting %s at %s" % (source, path))
        changed = True
        try:
            _run(run_command, ["mount", "-o", MOUNT_OPTIONS, path], "remounting %s read-only" % path)
        except AccessError:
            run_command(["umount", path])
            raise
    entry = mount_entry(path)
    problem = write_probe(path)
    if entry is None or "ro" not in entry["options"] or problem:
        run_command(["umount", path])
        raise AccessError("the bind mount at %s is not read-only (%s); it was unmounted"
                          % (path, problem or "the kernel does not report it 'ro'"))
    return changed, entry


def local_absent(run_command, path, check_mode=False):
    """Unmount everything at ``path`` and remove the then empty mount point; whether anything changed."""
    changed = False
    for _attempt in range(MAX_STACKED_MOUNTS):
        if not os.path.isdir(path) or mount_entry(path) is None:
            break
        changed = True
        if check_mode:
            return True
        if not can_mount():
            raise AccessError(NEED_PRIVILEGE.replace("mounting", "unmounting"))
        _run(run_command, ["umount", path], "unmounting %s" % path)
    else:
        raise AccessError("%s is still mounted after %d unmounts; inspect it by hand" % (path, MAX_STACKED_MOUNTS))
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path) or os.listdir(path):
            raise AccessError("%s is not an empty directory after unmounting; refusing to delete its contents"
                              % path)
        if not check_mode:
            os.rmdir(path)
        changed = True
    return changed


# ------------------------------------------------------------------------ dispatch
def backup_access(params: dict, *, iam, run_command, check_mode: bool = False, diff: bool = False) -> dict:
    """The whole module: ``params`` are backup_access's options; ``iam()`` returns an IAM client."""
    source = params["source"]
    if is_s3(source):
        bucket, prefix = parse_source(source)
        return s3_access(iam(), params["state"], bucket, prefix, params["role_name"],
                         name=params["policy_name"], check_mode=check_mode, diff=diff)
    return local_access(run_command, params["state"], source, params["path"], check_mode=check_mode)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entries(mountinfo: str = "/proc/self/mountinfo") -> list:
    """Every mount as ``{"mount_point", "root", "options", "fstype", "source"}``."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            out.append({"root": _unescape(fields[3]), "mount_point": _unescape(fields[4]),
                        "options": fields[5].split(","), "fstype": fields[sep + 1],
                        "source": _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""})
    return out


def mount_entry(path: str, mountinfo: str = "/proc/self/mountinfo"):
    """The topmost mount at exactly ``path`` (already resolved), or None."""
    found = [e for e in mount_entries(mountinfo) if e["mount_point"] == path]
    return found[-1] if found else None


def can_mount() -> bool:
    """True when this process may mount (root or CAP_SYS_ADMIN in its effective set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_SYS_ADMIN))
    except OSError:
        pass
    return os.geteuid() == 0


def same_directory(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same directory (a bind mount shows the same inode)."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def write_probe(path: str) -> str | None:
    """Try to create a file in ``path``; ``None`` when refused with EROFS, else what happened.

    Anything but EROFS (the write succeeding, or failing for another reason such as
    EACCES) means the mount is not proven read-only.
    """
    probe = os.path.join(path, ".drguard-write-probe-%s" % uuid.uuid4().hex)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return None
        return "creating a file failed with %s instead of EROFS" % (errno.errorcode.get(exc.errno, exc.errno),)
    os.close(fd)
    os.unlink(probe)
    return "a file could be created, so the mount is writable"
