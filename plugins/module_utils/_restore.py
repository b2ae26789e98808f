# Copyright: drguard maintainers
# Apache License 2.0
"""Restore verified artifacts and prove them usable (private backend of restore_artifacts, validate_restore).

* :func:`restore` - copy what ``verify_artifacts`` verified into a private directory,
  hashing every byte again while it is written (S3 objects by their pinned version).
* :func:`validate` - open each restored artifact by its content (docs/validation.md); the
  validators live in ``_workloads`` (standard library only, so they also run inside the
  sandbox) and are importable from here.

Both raise only :class:`RestoreError` (whose message is the task's), except botocore
errors that are not an S3 answer about one object.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

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
# The validators run inside the sandbox too, so they live in the standard-library-only _workloads;
# their names stay importable from here.
# pylint: disable=unused-import
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import COMPRESSIONS  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_MEMBERS  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_RATIO  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_TOTAL_BYTES  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import Caps  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import Validation  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_sqlite  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_stream  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_tar  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import sniff  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import sqlite_uri  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate_one  # noqa: F401
# pylint: enable=unused-import

RESTORED_MODE = 0o400


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
    out = {"name": name, "path": target, "sha256": want_sha, "size": written}
    # What the signed manifest declares about the artifact travels on to validate_restore.
    for key in ("kind", "expect"):
        if entry.get(key) is not None:
            out[key] = entry[key]
    return out


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
