# Copyright: drguard maintainers
# Apache License 2.0
"""Read-only exposure of a backup set to the drill (private helpers of backup_access).

* S3: the inline IAM policy ``drguard-backup-readonly`` on the drill's role: reads of
  the backup prefix, listing limited to the prefix, and an explicit Deny of every
  write, delete, retention/legal-hold change and bucket reconfiguration on the whole
  bucket. An explicit Deny wins over any Allow the role gets elsewhere.
* Local: a bind mount remounted ``ro,nosuid,nodev,noexec``; :func:`mount_entry` reads
  ``/proc/self/mountinfo`` so the state is read back from the kernel, not assumed.
"""

from __future__ import annotations

import errno
import os
import re
import uuid

POLICY_NAME = "drguard-backup-readonly"
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

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


class AccessError(ValueError):
    """Bad input or unsafe state; the message says what and what to do."""


def parse_s3(source: str) -> tuple:
    """``s3://bucket/prefix/`` -> ``(bucket, prefix)``; the prefix has no wildcards."""
    if not isinstance(source, str) or not source.startswith("s3://"):
        raise AccessError("%r is not an s3://bucket/prefix/ location" % (source,))
    bucket, _, prefix = source[5:].partition("/")
    return check_bucket_prefix(bucket, prefix)


def check_bucket_prefix(bucket, prefix) -> tuple:
    if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
        raise AccessError("%r is not a valid S3 bucket name" % (bucket,))
    prefix = prefix or ""
    if not isinstance(prefix, str) or any(c in prefix for c in "*?\x00") or prefix.startswith("/"):
        raise AccessError("S3 prefix %r must be a plain key prefix without wildcards or a leading '/'" % (prefix,))
    return bucket, prefix


def readonly_policy(bucket: str, prefix: str) -> dict:
    """The identity policy that lets the drill read ``s3://bucket/prefix*`` and write nothing."""
    bucket, prefix = check_bucket_prefix(bucket, prefix)
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
