# Copyright: drguard maintainers
# Apache License 2.0
"""Backup artifact sources (local directory, ``s3://bucket/prefix/``) and streaming checks.

* S3 locations are parsed by ``_s3_location`` (``parse_s3``, ``parse_prefix``).
* :func:`collect_local` / :func:`collect_s3` - hash every artifact of a backup set (producer side).
* :func:`verify_local` / :func:`verify_s3` - reconcile one manifest entry with the store and
  stream its bytes (consumer side): bounded memory (one reused 8 MiB buffer for a local file,
  1 MiB chunks from S3), never more than ``size + 1`` bytes, S3 objects read by the pinned
  version id.
* :func:`unlisted_local` / :func:`unlisted_s3` - strict mode: objects the manifest does not list.

Failure entries have exactly the shape (docs/manifest.md) consumed by ``quarantine_artifact``:
``{name, reason, detail, source, version_id, observed_sha256, observed_size}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import queue
import re
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from ansible_collections.drguard.sandbox.plugins.module_utils._manifest import Artifact
from ansible_collections.drguard.sandbox.plugins.module_utils._manifest import unsafe_name_problem
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import OBJECT_NOT_FOUND_CODES
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import s3_uri

CHUNK = 1024 * 1024  # S3 body reads
# Local files: one reused buffer of this size per reader (os.readv into it, no new bytes per
# read). 8 MiB reads keep the Python work per byte negligible (128 steps per GiB), and hashlib
# releases the GIL while it hashes them, so workers hash in parallel. Bounded: one buffer per worker.
FILE_CHUNK = 8 * 1024 * 1024
# With a read-ahead thread (a spare worker): this many buffers of this size circulate between
# the reader and the hasher; chunks small enough that the hasher finds them still in the CPU's
# cache after the reader's copy (docs/benchmarks.md).
READ_AHEAD_CHUNK = 1024 * 1024
READ_AHEAD_BUFFERS = 4
SNIFF = 512
# Reads of one S3 object whose body ends early (or stalls) before it is artifact_missing.
STREAM_ATTEMPTS = 3
LOCK_CHOICES = ("compliance", "governance", "none")

# When one artifact has several problems, the entry carries the most serious one
# (the others are named in its detail).
_PRIORITY = ("artifact_missing", "unsafe_name", "size_mismatch", "digest_mismatch",
             "metadata_mismatch", "not_immutable")
_COMPOSITE_RE = re.compile(r"-\d+$")


def _boto():
    """``botocore.exceptions``, imported on first use: verifying a local set never needs the AWS SDK
    (its import is a large part of a module's start-up), and S3 code has it loaded already."""
    from botocore import exceptions  # noqa: PLC0415 - lazy: local verifications never load the AWS SDK
    return exceptions


def _cut_short() -> tuple:
    """botocore's errors for a response body that ended early or stalled."""
    b = _boto()
    return b.IncompleteReadError, b.ResponseStreamingError, b.ReadTimeoutError


# --------------------------------------------------------------------------- kinds and hashing

def detect_kind(head: bytes) -> str:
    """``sqlite``, ``tar`` (POSIX/GNU ustar) or ``raw``, from the first bytes."""
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return "raw"


@dataclass
class Hashed:
    sha256: str | None  # None when reading stopped at the limit (a partial digest means nothing)
    size: int
    head: bytes
    over_limit: bool


class Digest:
    """A running SHA-256 with the byte count and the first bytes; it survives an error mid-stream."""

    def __init__(self):
        self.sha, self.size, self.head = hashlib.sha256(), 0, b""

    def update(self, chunk) -> None:
        self.sha.update(chunk)
        if len(self.head) < SNIFF:
            self.head += bytes(chunk[:SNIFF - len(self.head)])
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def hash_chunks(chunks, limit: int | None = None, digest: Digest | None = None) -> Hashed:
    """Stream ``chunks`` through SHA-256, stopping once more than ``limit`` bytes were seen.

    ``digest`` (optional) is updated as bytes arrive, so the caller still has the bytes seen so
    far when reading raises.
    """
    digest = digest or Digest()
    for piece in chunks:
        size = digest.size
        digest.update(piece[:limit + 1 - size] if limit is not None and size + len(piece) > limit + 1 else piece)
        if limit is not None and digest.size > limit:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # release the connection / file now, not at garbage collection
            return Hashed(None, digest.size, digest.head, True)
    return Hashed(digest.hexdigest(), digest.size, digest.head, False)


def hash_file(fd: int, limit: int | None, read_ahead: bool = False) -> Hashed:
    """SHA-256 of an open file descriptor from its current offset, read into reused buffers.

    With ``limit``, at most ``limit + 1`` bytes are read (a longer file shows, never read whole).
    With ``read_ahead``, a second thread reads the next chunks while this one hashes (both in C,
    without the GIL): reading (the kernel's copy from the page cache) and hashing then overlap
    instead of taking turns. A read error is raised here either way.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass  # only a hint
    cap = None if limit is None else limit + 1
    sha, size, head = hashlib.sha256(), 0, b""
    for view in (_reads_ahead(fd, cap) if read_ahead else _reads(fd, cap)):
        sha.update(view)
        if len(head) < SNIFF:
            head += bytes(view[:SNIFF - len(head)])
        size += len(view)
    if cap is not None and size > limit:
        return Hashed(None, size, head, True)
    return Hashed(sha.hexdigest(), size, head, False)


def _read_into(fd: int, view: memoryview, cap: int | None, done: int) -> int:
    """One read into ``view``, never past ``cap`` bytes in all (``done`` read so far); 0 at the end."""
    want = len(view) if cap is None else min(len(view), cap - done)
    return os.readv(fd, [view[:want]]) if want > 0 else 0


def _reads(fd: int, cap: int | None):
    """Views of the bytes read, in order, all in one reused buffer (each valid until the next)."""
    view = memoryview(bytearray(FILE_CHUNK))
    done = 0
    while True:
        n = _read_into(fd, view, cap, done)
        if not n:
            return
        done += n
        yield view[:n]


def _reads_ahead(fd: int, cap: int | None):
    """As :func:`_reads`, read by a thread of its own up to READ_AHEAD_BUFFERS chunks ahead.

    The thread never outlives the generator: closing it (or an error) stops the reader and
    joins it before the caller closes the descriptor.
    """
    free, full, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for _i in range(READ_AHEAD_BUFFERS):
        free.put(memoryview(bytearray(READ_AHEAD_CHUNK)))

    def reader():
        done = 0
        try:
            while True:
                view = free.get()
                if stop.is_set():
                    return
                n = _read_into(fd, view, cap, done)
                full.put((view, n))
                if not n:
                    return
                done += n
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, raised there
            full.put((None, exc))

    thread = threading.Thread(target=reader, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            view, n = full.get()
            if view is None:
                raise n
            if not n:
                return
            yield view[:n]
            free.put(view)
    finally:
        stop.set()
        free.put(memoryview(b""))  # wakes a reader waiting for a buffer
        thread.join()


def file_chunks(handle, limit: int | None):
    """Chunks of an open file; with ``limit``, at most ``limit + 1`` bytes (a longer file shows, never read whole)."""
    remaining = None if limit is None else limit + 1
    while remaining is None or remaining > 0:
        chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def _body_chunks(body):
    try:
        while True:
            chunk = body.read(CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        body.close()


def _error_code(exc) -> tuple:
    err = getattr(exc, "response", {}) or {}
    code = str(err.get("Error", {}).get("Code", ""))
    status = err.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def s3_get_chunks(s3, bucket: str, key: str, version_id: str | None, limit: int | None):
    """Chunks of one S3 object version; with ``limit``, a Range of ``limit + 1`` bytes at most."""
    kwargs = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    if limit is not None:
        # bytes=0-N is N+1 bytes: one past the signed size, so a longer object shows
        # as too long without being downloaded. An empty object answers 416.
        kwargs["Range"] = "bytes=0-%d" % limit
    try:
        resp = s3.get_object(**kwargs)
    except _boto().ClientError as exc:
        code, status = _error_code(exc)
        if limit is not None and (code == "InvalidRange" or status == 416):
            return None, iter(())
        raise
    return resp, _body_chunks(resp["Body"])


# --------------------------------------------------------------------------- producer side

def local_names(root: str, exclude=()) -> list:
    """Relative ``/``-separated names of the regular files under ``root`` (sorted).

    Symlinks are followed only when they stay inside ``root``; anything else raises.
    """
    if not os.path.isdir(root):
        raise LocationError("source %r is not a directory" % root)
    real_root = os.path.realpath(root)
    excluded = {os.path.realpath(p) for p in exclude if p}
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                raise LocationError("%s is a symlinked directory; artifacts must be regular files" % full)
        for f in filenames:
            full = os.path.join(dirpath, f)
            real = os.path.realpath(full)
            if real in excluded or os.path.abspath(full) in excluded:
                continue
            if not (real == real_root or real.startswith(real_root + os.sep)):
                raise LocationError("%s resolves outside the source directory" % full)
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise LocationError("%s is not a regular file" % full)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            names.append(rel)
    names.sort()
    for name in names:
        problem = unsafe_name_problem(name)
        if problem:
            raise LocationError("file %r cannot be signed: %s" % (name, problem))
    return names


def hash_local(root: str, name: str) -> Artifact:
    path = os.path.join(root, *name.split("/"))
    with open(path, "rb", buffering=0) as handle:
        hashed = hash_file(handle.fileno(), None)
    return Artifact(name, hashed.sha256, hashed.size, detect_kind(hashed.head), None)


def s3_keys(s3, bucket: str, prefix: str) -> list:
    """``(key, size)`` of every current object under ``prefix`` (list_objects_v2).

    Empty "folder" markers (a key ending in ``/`` with no content, as the S3 console
    creates them) hold nothing and are skipped, when signing and in strict mode alike.
    """
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate  # noqa: PLC0415 - lazy (boto3)

    return [(o["Key"], o.get("Size")) for o in paginate(s3, "list_objects_v2", "Contents", Bucket=bucket, Prefix=prefix)
            if not (o["Key"].endswith("/") and o.get("Size") == 0)]


def hash_s3(s3, bucket: str, prefix: str, name: str, version_id: str | None = None) -> Artifact:
    """Hash one object (``version_id``, or the current version) and pin the version read."""
    key = prefix + name
    kwargs = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        head = s3.head_object(**kwargs)
    except _boto().ClientError as exc:
        code, status = _error_code(exc)
        if code in OBJECT_NOT_FOUND_CODES or status in (404, 405):
            raise LocationError("%s does not exist" % s3_uri(bucket, key, version_id)) from None
        raise
    version = head.get("VersionId")
    version = None if version in (None, "null") else version
    _resp, chunks = s3_get_chunks(s3, bucket, key, version, None)
    hashed = hash_chunks(chunks)
    if hashed.size != head["ContentLength"]:
        raise LocationError("s3://%s/%s changed while it was read (%d bytes read, %d expected); sign again"
                            % (bucket, key, hashed.size, head["ContentLength"]))
    return Artifact(name, hashed.sha256, hashed.size, detect_kind(hashed.head), version)


# --------------------------------------------------------------------------- consumer side

def failure(name, reason: str, detail: str, source, *, version_id=None, observed_sha256=None,  # noqa: PLR0917
            observed_size=None):
    """One failure entry in the exact shape ``quarantine_artifact`` consumes."""
    return {"name": name, "reason": reason, "detail": detail, "source": source, "version_id": version_id,
            "observed_sha256": observed_sha256, "observed_size": observed_size}


@dataclass
class Check:
    """How to verify: ``mode`` full|metadata, ``lock`` compliance|governance|none, ``now``."""
    mode: str
    lock: str
    now: datetime


def whole_object_sha256(head: dict) -> str | None:
    """The store's SHA-256 of the whole object as hex, or None when there is none.

    A composite checksum (multipart upload: ChecksumType COMPOSITE, a ``-N`` suffix,
    or a multipart ETag without ChecksumType FULL_OBJECT) is a checksum of part
    checksums, not a SHA-256 of the file, and is never returned.
    """
    value = head.get("ChecksumSHA256")
    if not value:
        return None
    ctype = head.get("ChecksumType")
    if ctype is not None and ctype != "FULL_OBJECT":
        return None
    if _COMPOSITE_RE.search(value):
        return None
    if ctype is None and _COMPOSITE_RE.search(str(head.get("ETag", "")).strip('"')):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "unparseable:" + value
    return raw.hex() if len(raw) == 32 else "unparseable:" + value


def _lock_problem(head: dict, lock: str, now: datetime) -> str | None:
    if lock == "none":
        return None
    mode = head.get("ObjectLockMode")
    until = head.get("ObjectLockRetainUntilDate")
    accepted = ("COMPLIANCE",) if lock == "compliance" else ("GOVERNANCE", "COMPLIANCE")
    if mode not in accepted:
        return "object lock mode is %s; %s requires %s" % (mode or "absent", lock, " or ".join(accepted))
    if until is None:
        return "object lock has no retain-until date"
    if until <= now:
        return "object lock retention expired at %s" % until.isoformat()
    return None


def _result(art: Artifact, source, version_id, findings: list, started: float, observed=None):  # noqa: PLR0917
    """(artifact entry, failure entry or None) from a list of (reason, detail) findings."""
    observed = observed or {}
    entry = {"name": art.name, "verified": not findings, "sha256": art.sha256, "size": art.size,
             "seconds": round(time.monotonic() - started, 3), "reason": None, "source": source,
             "version_id": version_id, "kind": art.kind, "expect": art.expect}
    if not findings:
        return entry, None
    findings.sort(key=lambda f: _PRIORITY.index(f[0]))
    reason = findings[0][0]
    entry["reason"] = reason
    detail = "; ".join(d for _r, d in findings)
    return entry, failure(art.name, reason, detail, source, version_id=version_id,
                          observed_sha256=observed.get("sha256"), observed_size=observed.get("size"))


def _compare_stream(art: Artifact, hashed: Hashed, findings: list, observed: dict) -> None:
    observed["size"] = hashed.size if not hashed.over_limit else None
    observed["sha256"] = hashed.sha256
    if hashed.over_limit:
        findings.append(("size_mismatch", "the object is longer than the signed %d bytes "
                         "(reading stopped after %d)" % (art.size, hashed.size)))
    elif hashed.size != art.size:
        findings.append(("size_mismatch", "%d bytes read, %d signed" % (hashed.size, art.size)))
    elif hashed.sha256 != art.sha256:
        findings.append(("digest_mismatch", "SHA-256 %s, signed %s" % (hashed.sha256, art.sha256)))


def verify_s3(s3, bucket: str, prefix: str, art: Artifact, check: Check, bytes_counter: list):  # noqa: PLR0917
    """Reconcile one artifact with S3 (HeadObject by pinned version) and, in full mode, stream it."""
    started = time.monotonic()
    key = prefix + art.name
    findings, observed = [], {}
    kwargs = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
    if art.version_id:
        kwargs["VersionId"] = art.version_id
    try:
        head = s3.head_object(**kwargs)
    except _boto().ClientError as exc:
        code, status = _error_code(exc)
        where = "version %s of s3://%s/%s" % (art.version_id, bucket, key) if art.version_id \
            else "s3://%s/%s" % (bucket, key)
        if code in OBJECT_NOT_FOUND_CODES or status in (404, 405) \
                or (art.version_id and code in ("400", "InvalidArgument")):
            detail = "%s does not exist (or is a delete marker)" % where
        elif code in ("403", "AccessDenied") or status == 403:
            detail = "%s cannot be read (access denied), so it cannot be verified" % where
        else:
            detail = "%s cannot be read (%s), so it cannot be verified" % (where, code or status)
        return _result(art, s3_uri(bucket, key, art.version_id), art.version_id,
                       [("artifact_missing", detail)], started)
    except _boto().BotoCoreError as exc:
        return _result(art, s3_uri(bucket, key, art.version_id), art.version_id,
                       [("artifact_missing", "s3://%s/%s cannot be read (%s)" % (bucket, key, exc))], started)

    got_version = head.get("VersionId")
    got_version = None if got_version in (None, "null") else got_version
    # The version actually verified: the pinned one, or the current one for an unpinned
    # (null) entry, so that the source handed on (restore, quarantine) is this exact version.
    version = art.version_id or got_version
    source = s3_uri(bucket, key, version)
    if head.get("DeleteMarker"):
        return _result(art, source, version, [("artifact_missing", "%s is a delete marker" % source)], started)
    if art.version_id and got_version != art.version_id:
        findings.append(("metadata_mismatch", "S3 answered version %s for pinned version %s"
                         % (got_version, art.version_id)))
    length = head.get("ContentLength")
    if length != art.size:
        observed["size"] = length
        findings.append(("size_mismatch", "S3 ContentLength is %s, signed size %d" % (length, art.size)))
    store_sha = whole_object_sha256(head)
    if store_sha is not None and store_sha != art.sha256:
        findings.append(("metadata_mismatch", "S3 ChecksumSHA256 of the whole object is %s, signed %s"
                         % (store_sha, art.sha256)))
    lock = _lock_problem(head, check.lock, check.now)
    if lock:
        findings.append(("not_immutable", lock))

    if check.mode == "full" and not any(r == "size_mismatch" for r, _d in findings):
        _stream_s3(s3, (bucket, key, version, source), art, findings, observed, bytes_counter)
    return _result(art, source, version, findings, started, observed)


def _stream_s3(s3, where: tuple, art: Artifact, findings: list, observed: dict,  # noqa: PLR0917
               bytes_counter: list) -> None:
    """Stream one pinned object version through SHA-256 and add what it shows to ``findings``.

    * botocore checks the bytes against the store's own ChecksumSHA256 as they arrive (response
      checksum validation) and raises FlexibleChecksumError at the end when they disagree: the
      object exists and was read, but the store contradicts its own bytes - ``metadata_mismatch``,
      with both checksums and the served bytes' SHA-256 in the detail.
    * A body that ends early or stalls (IncompleteReadError, ResponseStreamingError,
      ReadTimeoutError) is transient: the object is read again from the start, up to
      STREAM_ATTEMPTS reads in all, then ``artifact_missing`` (it could not be read).
    * An error answer to the GET itself (already retried by the client when transient) is
      ``artifact_missing``.
    """
    bucket, key, version, source = where
    last = None
    for _attempt in range(STREAM_ATTEMPTS):
        digest = Digest()
        try:
            resp, chunks = s3_get_chunks(s3, bucket, key, version, art.size)
            hashed = hash_chunks(chunks, art.size, digest)
        except _boto().FlexibleChecksumError as exc:
            served = digest.hexdigest()
            observed.update(sha256=served, size=digest.size)
            findings.append(("metadata_mismatch", "the store's own checksum contradicts the bytes it served "
                             "for %s: %s; the %d bytes served have SHA-256 %s (%s the signed %s)"
                             % (source, _checksum_words(exc), digest.size, served,
                                "equal to" if served == art.sha256 else "not", art.sha256)))
            return
        except _cut_short() as exc:
            last = exc
            continue
        except _boto().ClientError as exc:
            code, status = _error_code(exc)
            findings.append(("artifact_missing", "%s could not be read (%s)" % (source, code or status)))
            return
        except (_boto().BotoCoreError, OSError) as exc:
            findings.append(("artifact_missing", "%s could not be read completely (%s)" % (source, exc)))
            return
        if resp is not None:
            answered = resp.get("VersionId")
            answered = None if answered in (None, "null") else answered
            if version and answered != version:
                findings.append(("metadata_mismatch", "S3 served version %s for version %s" % (answered, version)))
        bytes_counter.append(hashed.size)
        _compare_stream(art, hashed, findings, observed)
        return
    findings.append(("artifact_missing", "%s could not be read completely: the stream was cut short on each of "
                     "%d reads (last: %s)" % (source, STREAM_ATTEMPTS, last)))


def _checksum_words(exc) -> str:
    """``ChecksumSHA256 <store> (hex <..>), bytes <..>`` from botocore's checksum error, in hex where it can."""
    match = re.search(r"Expected checksum (\S+) did not match calculated checksum: (\S+)", str(exc))
    if not match:
        return str(exc)

    def hexed(value):
        try:
            return base64.b64decode(value, validate=True).hex()
        except (binascii.Error, ValueError):
            return value
    return "ChecksumSHA256 of the store %s, of the bytes %s" % (hexed(match.group(1)), hexed(match.group(2)))


def verify_local(root: str, art: Artifact, check: Check, bytes_counter: list, read_ahead: bool = False):
    """Check one artifact under a local directory; never reads more than ``size + 1`` bytes.

    ``read_ahead``: read with a second thread while this one hashes (see :func:`hash_file`).
    """
    started = time.monotonic()
    path = os.path.join(root, *art.name.split("/"))
    real_root = os.path.realpath(root)
    if not os.path.lexists(path):
        return _result(art, path, None, [("artifact_missing", "%s does not exist" % path)], started)
    real = os.path.realpath(path)
    if not real.startswith(real_root + os.sep):
        return _result(art, path, None, [("unsafe_name", "%s resolves outside the source directory %s "
                                          "through a symlink" % (path, root))], started)
    findings, observed = [], {}
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the verification.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return _result(art, path, None, [("artifact_missing", "%s cannot be opened: %s" % (path, exc.strerror))],
                       started)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _result(art, path, None, [("artifact_missing", "%s is not a regular file" % path)], started)
        if st.st_size != art.size:
            observed["size"] = st.st_size
            findings.append(("size_mismatch", "%s is %d bytes, signed size %d" % (path, st.st_size, art.size)))
        elif check.mode == "full":
            try:
                hashed = hash_file(fd, art.size, read_ahead=read_ahead)
            except OSError as exc:
                findings.append(("artifact_missing", "%s could not be read completely: %s" % (path, exc.strerror)))
            else:
                bytes_counter.append(hashed.size)
                _compare_stream(art, hashed, findings, observed)
    finally:
        os.close(fd)
    return _result(art, path, None, findings, started, observed)


def unlisted_local(root: str, names: set, exclude=()) -> list:
    """Failure entries for everything under ``root`` that is not a listed artifact."""
    excluded = {os.path.realpath(p) for p in exclude if p} | {os.path.abspath(p) for p in exclude if p}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        entries = list(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for f in sorted(entries):
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel in names or os.path.abspath(full) in excluded or os.path.realpath(full) in excluded:
                continue
            size = os.lstat(full).st_size
            out.append(failure(rel, "unlisted_artifact", "%s is in the backup location but not in the manifest"
                               % full, full, observed_size=size))
    return out


def unlisted_s3(s3, bucket: str, prefix: str, names: set, exclude_keys=()) -> list:
    """Failure entries for current objects under the prefix that the manifest does not list."""
    out = []
    for key, size in s3_keys(s3, bucket, prefix):
        name = key[len(prefix):]
        if name in names or key in exclude_keys:
            continue
        version = None
        try:
            version = s3.head_object(Bucket=bucket, Key=key).get("VersionId")
        except (_boto().ClientError, _boto().BotoCoreError):
            pass
        version = None if version in (None, "null") else version
        out.append(failure(name, "unlisted_artifact", "s3://%s/%s is in the backup location but not in the manifest"
                           % (bucket, key), s3_uri(bucket, key, version), version_id=version,
                           observed_size=size))
    return out
