# Copyright: drguard maintainers
# Apache License 2.0
"""Restore verified artifacts and prove them usable (private backend of restore_artifacts, validate_restore).

* :func:`restore` - copy what ``verify_artifacts`` verified into a private directory,
  hashing every byte again while it is written (S3 objects by their pinned version).
* :func:`validate` - open each restored artifact by its content: SQLite read-only with
  ``PRAGMA integrity_check``, tar member by member, anything else ``raw``.

Both raise only :class:`RestoreError` (whose message is the task's), except botocore
errors that are not an S3 answer about one object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

try:
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    ClientError = None

from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_chunks
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3

RESTORED_MODE = 0o400


class RestoreError(Exception):
    """A restore or validation that cannot go on; the message says what was wrong."""


# --------------------------------------------------------------------------- restore
def safe_relative(name: str) -> str:
    """The artifact name as a relative path that cannot leave the restore directory."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    return os.path.join(*parts)


def _chunks(s3, source, version_id, size):
    """Chunks of the artifact, at most one byte past the verified size (never a full endless read)."""
    if is_s3(source):
        loc = parse_s3(source, "source")
        try:
            _resp, chunks = art.s3_get_chunks(s3, loc.bucket, loc.key, version_id or loc.version_id, size)
        except ClientError as exc:
            raise RestoreError("%s: %s" % (source, error_code(exc) or exc)) from None
        yield from chunks
        return
    with open(source, "rb") as handle:
        yield from art.file_chunks(handle, size)


def restore_one(s3, entry: dict, dest: str) -> dict:
    """Restore one verified entry under ``dest``; the bytes must match its sha256 and size exactly."""
    name = entry.get("name")
    if not entry.get("verified"):
        raise RestoreError("artifact %r was not verified; refusing to restore it" % (name,))
    rel = safe_relative(name)
    want_sha, want_size = entry.get("sha256"), entry.get("size")
    source = entry.get("source")
    if not want_sha or want_size is None or not source:
        raise RestoreError("artifact %r lacks sha256, size or source" % (name,))
    target = os.path.join(dest, rel)
    ensure_private_dir(os.path.dirname(target), parents=True)
    want = int(want_size)

    def checked(chunks):
        digest, seen = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            seen += len(chunk)
            if seen > want:
                raise RestoreError("%s: longer than the verified %d bytes" % (name, want))
            yield chunk
        if seen != want or digest.hexdigest() != want_sha:
            raise RestoreError("%s: restored bytes differ from what was verified (size %d, sha256 %s)"
                               % (name, seen, digest.hexdigest()))

    # A raise inside checked() removes the temporary file: nothing unverified is left behind.
    written = atomic_write_chunks(target, checked(_chunks(s3, source, entry.get("version_id"), want)), RESTORED_MODE)
    return {"name": name, "path": target, "sha256": want_sha, "size": written}


def restore(artifacts: list, dest: str, *, client, workers: int = 4, check_mode: bool = False) -> dict:
    """Restore every entry of ``artifacts`` under ``dest`` in parallel: ``{changed, restored, bytes_restored}``.

    ``client("s3")`` gives a retrying S3 client; it is only called when a source is in S3.
    In check mode only the restore directory is judged.
    """
    if workers < 1:
        raise RestoreError("workers must be at least 1")
    if not artifacts:
        raise RestoreError("artifacts is empty: nothing was verified, so nothing can be restored")
    try:
        if check_mode:
            check_private_dir(dest)
            return {"changed": True, "restored": [], "bytes_restored": 0}
        ensure_private_dir(dest, parents=True)
    except OSError as exc:
        raise RestoreError("Cannot use the restore directory: %s" % exc) from None
    need_s3 = any(is_s3(str(a.get("source", ""))) for a in artifacts)
    s3 = client("s3") if need_s3 else None
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            restored = list(pool.map(lambda e: restore_one(s3, e, dest), artifacts))
    except (RestoreError, LocationError, OSError) as exc:
        raise RestoreError("Restore failed: %s" % exc) from None
    return {"changed": True, "restored": restored, "bytes_restored": sum(r["size"] for r in restored)}


# --------------------------------------------------------------------------- validate
def kind_of(path: str) -> str:
    """The artifact's kind from its first bytes; a symlink or anything but a regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RestoreError("%s is a symlink; validate only the files restore_artifacts wrote" % path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise RestoreError("%s is not a regular file" % path)
        return art.detect_kind(handle.read(512))


def sqlite_uri(path: str) -> str:
    """A read-only SQLite URI for exactly ``path``.

    SQLite decodes %XX escapes and stops at '?' or '#' in a URI, so the path is
    percent-encoded: an artifact named ``%2E%2E/x.db`` must not open ``../x.db``.
    ``immutable=1``: the restored file is 0400 in a private directory and nothing
    writes it, so SQLite takes no locks and creates no -wal/-shm file beside it.
    """
    return "file:%s?mode=ro&immutable=1" % quote(os.path.abspath(path), safe="/")


def check_sqlite(path: str, min_rows: int) -> dict:
    """``PRAGMA integrity_check`` and row counts of a read-only SQLite database."""
    con = sqlite3.connect(sqlite_uri(path), uri=True)
    try:
        verdict = [row[0] for row in con.execute("PRAGMA integrity_check")]
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        # Table names come from the database itself and are quoted as identifiers.
        counts = {t: con.execute('SELECT count(*) FROM "%s"' % t.replace('"', '""')).fetchone()[0]  # noqa: S608
                  for t in tables}
    finally:
        con.close()
    ok = verdict == ["ok"]
    total = sum(counts.values())
    if ok and total < min_rows:
        return {"valid": False, "detail": "only %d row(s), fewer than min_rows %d" % (total, min_rows),
                "tables": counts}
    return {"valid": ok, "detail": "ok" if ok else "integrity_check: %s" % "; ".join(verdict[:5]),
            "tables": counts}


def check_tar(path: str) -> dict:
    """Every member of a tar archive: no absolute path, no ``..``, no link or device."""
    members = size = 0
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            name = info.name
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                return {"valid": False, "detail": "unsafe member path %r" % name, "members": members}
            if not (info.isfile() or info.isdir()):
                return {"valid": False, "detail": "member %r is a link or device" % name, "members": members}
            members += 1
            size += info.size
    if members == 0:
        return {"valid": False, "detail": "empty archive", "members": 0}
    return {"valid": True, "detail": "ok", "members": members, "bytes": size}


def validate_one(entry: dict, min_rows: int) -> dict:
    """``{name, kind, valid, detail, ...}`` for one restored entry; a file that cannot be opened is invalid."""
    name, path = entry.get("name"), entry.get("path")
    try:
        kind = kind_of(path)
        if kind == "sqlite":
            outcome = check_sqlite(path, min_rows)
        elif kind == "tar":
            outcome = check_tar(path)
        else:
            outcome = {"valid": True, "detail": "raw artifact; digest verified"}
    except (OSError, RestoreError, sqlite3.Error, tarfile.TarError, TypeError) as exc:
        kind, outcome = "unknown", {"valid": False, "detail": "cannot open: %s" % exc}
    return dict(name=name, kind=kind, **outcome)


@dataclass
class Validation:
    """Whether every restored artifact validated, and one result per artifact."""
    valid: bool
    results: list

    @property
    def message(self) -> str:
        """The task's failure message when something did not validate."""
        bad = ["%s (%s)" % (r["name"], r["detail"]) for r in self.results if not r["valid"]] or ["nothing restored"]
        return "Restored backup does not validate: %s" % ", ".join(bad)


def validate(restored: list, min_rows: int = 1) -> Validation:
    """Validate every entry of ``restored``; nothing restored is not valid."""
    results = [validate_one(entry, min_rows) for entry in restored]
    return Validation(bool(results) and all(r["valid"] for r in results), results)
