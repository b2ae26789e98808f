# Copyright: drguard maintainers
# Apache License 2.0
"""Quarantine of the artifacts that failed verification (private backend of quarantine_artifact).

:class:`Quarantine` takes ``verify_artifacts``' failures as-is, checks them and the
quarantine location, then preserves every failing object in parallel: S3 versions are
copied server-side under legal hold and tagged, local files are moved (or copied when
the original cannot be removed) into a 0700 directory and made 0400. Each failure gets a
JSON record beside its copy and one ``drguard.artifact.quarantined`` alert.

Everything raises :class:`QuarantineError` (the message says what was wrong and what to
do), except botocore errors while checking the quarantine location and the alert sink,
which the module reports with their AWS detail. Per-source errors during the quarantine
itself do not raise: they are collected in :attr:`Outcome.errors` so that the other
failures are still quarantined.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlencode

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = Exception

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_chunks
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import PrivateDirError
from ansible_collections.drguard.sandbox.plugins.module_utils._manifest import REASONS
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import check_bucket
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import OBJECT_NOT_FOUND_CODES
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import s3_uri
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertError
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertSink
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import needs_aws
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

EVENT_TYPE = "drguard.artifact.quarantined"
EVENT_TYPE_FAILED = "drguard.artifact.quarantine_failed"
RECORD_SCHEMA = "drguard.quarantine-record/v1"
TAG_REASON = "drguard:quarantine-reason"
TAG_SHA = "drguard:observed-sha256"
TAG_AT = "drguard:quarantined-at"
META_SOURCE = "drguard-source"
MANIFEST_LEAF = "@manifest"
EMPTY_LEAF = "@empty"
MAX_LEAF = 200
PART_SIZE = 512 * 1024 * 1024
SINGLE_PART_MAX = 5 * 1024 * 1024 * 1024
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024
READ_ONLY = 0o400
# A failure's S3 source is ``s3_uri(bucket, key, version)``, which does not escape the key:
# only a trailing ``?versionId=`` is a query, everything before it is the key, taken literally
# ('?', '#', '%' and '+' included; parse_s3 would decode or refuse them).
_VERSION_SUFFIX = re.compile(r"\?versionId=([^&?/]*)$")


class QuarantineError(Exception):
    """Something could not be quarantined or the input is unusable; the message says why."""


# --------------------------------------------------------------------------- input
def leaf_for(name) -> str:
    """The quarantine file/key leaf for an artifact ``name`` (untrusted input).

    Percent-encoding with no safe characters: ``/``, ``\\``, NUL, ``%`` and everything
    outside ``[A-Za-z0-9_.~-]`` become ``%XX``, and a leading ``.`` becomes ``%2E``, so
    the leaf is one plain path segment that is never ``.``, ``..`` or hidden. ``@``
    is always encoded, which keeps :data:`MANIFEST_LEAF` and record names (``@reason``)
    free of collisions with artifact names.
    """
    if name is None:
        return MANIFEST_LEAF
    if name == "":
        return EMPTY_LEAF
    leaf = quote(name, safe="", errors="surrogatepass")
    if leaf.startswith("."):
        leaf = "%2E" + leaf[1:]
    if len(leaf) > MAX_LEAF:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        leaf = leaf[:MAX_LEAF - 66] + "~" + digest
    return leaf


def copy_leaf(failure: dict, src, manifest_sources: set) -> str:
    """Where the copy of ``failure``'s source goes (records always use the name's leaf).

    An ``unsafe_name`` failure's source is the manifest that lists the name (the name
    itself is what is wrong), so its copy is the manifest's copy; only when the batch
    has manifest-level failures for a different source does it get a leaf of its own,
    derived from the source location, never from the name.
    """
    if failure["name"] is None:
        return MANIFEST_LEAF
    if failure["reason"] == "unsafe_name":
        if not manifest_sources or src.identity in manifest_sources:
            return MANIFEST_LEAF
        return "@source-" + hashlib.sha256(src.location.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return leaf_for(failure["name"])


def record_leaf(leaf: str, reason: str) -> str:
    """The record's leaf: ``<leaf>@<reason>.json``."""
    return "%s@%s.json" % (leaf, reason)


class Source:
    """Where a failing object is: S3 (bucket, key, version) or a local path."""

    def __init__(self, kind, location, *, bucket=None, key=None, version_id=None, path=None):
        self.kind, self.location = kind, location
        self.bucket, self.key, self.version_id, self.path = bucket, key, version_id, path

    @property
    def identity(self):
        return (self.kind, self.bucket, self.key, self.version_id, self.path)


def _split_s3(text: str) -> tuple:
    """``(bucket, rest)`` of an ``s3://`` location, the bucket checked by the one bucket rule."""
    bucket, _sep, rest = text[len("s3://"):].partition("/")
    check_bucket(bucket)
    return bucket, rest


def parse_source(failure: dict, index: int) -> Source:
    """The failing object of ``failures[index]``: ``s3://bucket/key[?versionId=]`` or an absolute path."""
    where = "failures[%d]" % index
    src = failure.get("source")
    version = failure.get("version_id")
    if not isinstance(src, str) or not src or "\x00" in src:
        raise QuarantineError("%s.source must be the failing object's location (s3://bucket/key or an "
                              "absolute path), got %r" % (where, src))
    if version is not None and (not isinstance(version, str) or not version):
        raise QuarantineError("%s.version_id must be a string or null, got %r" % (where, version))
    if is_s3(src):
        base = src
        match = _VERSION_SUFFIX.search(src)
        if match:
            base, qversion = src[:match.start()], unquote(match.group(1))
            if version and qversion != version:
                raise QuarantineError("%s: version_id %r contradicts the source's versionId %r; refusing "
                                      "to guess which version failed" % (where, version, qversion))
            version = version or qversion or None
        try:
            bucket, key = _split_s3(base)
        except LocationError:
            bucket = key = None
        if not key:
            raise QuarantineError("%s.source %r is not s3://bucket/key" % (where, src))
        return Source("s3", src, bucket=bucket, key=key, version_id=version)
    if not os.path.isabs(src):
        raise QuarantineError("%s.source %r is neither s3://bucket/key nor an absolute path" % (where, src))
    return Source("local", src, path=src)


def validate_failure(failure, index: int) -> dict:
    """``failures[index]`` checked and normalized (reason from the closed vocabulary, sha256 lowercase)."""
    where = "failures[%d]" % index
    if not isinstance(failure, dict):
        raise QuarantineError("%s must be a mapping from verify_artifacts' failures" % where)
    name = failure.get("name")
    if name is not None and not isinstance(name, str):
        raise QuarantineError("%s.name must be a string or null, got %r" % (where, type(name).__name__))
    if failure.get("reason") not in REASONS:
        raise QuarantineError("%s.reason %r is not one of the failure reason codes of docs/manifest.md (%s)"
                              % (where, failure.get("reason"), ", ".join(REASONS)))
    sha = failure.get("observed_sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA_RE.match(sha.lower())):
        raise QuarantineError("%s.observed_sha256 must be 64 hex digits or null" % where)
    size = failure.get("observed_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise QuarantineError("%s.observed_size must be a non-negative integer or null" % where)
    return {
        "name": name, "reason": failure["reason"], "detail": str(failure.get("detail") or ""),
        "source": failure.get("source"), "version_id": failure.get("version_id"),
        "observed_sha256": sha.lower() if sha else None, "observed_size": size,
    }


def parse_quarantine(value: str) -> dict:
    """The quarantine location: ``{"kind": "s3", bucket, prefix}`` or ``{"kind": "local", path}``."""
    if not isinstance(value, str) or not value.strip():
        raise QuarantineError("quarantine must be s3://bucket/prefix/ or an absolute local directory")
    if is_s3(value):
        try:
            bucket, prefix = _split_s3(value)
        except LocationError:
            raise QuarantineError("quarantine %r: %r is not a valid bucket name"
                                  % (value, value[len("s3://"):].partition("/")[0])) from None
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if any(part in (".", "..") for part in prefix.split("/")) or "\\" in prefix:
            raise QuarantineError("quarantine prefix %r must not contain '.' or '..' segments" % prefix)
        return {"kind": "s3", "bucket": bucket, "prefix": prefix}
    if not os.path.isabs(value) or "\x00" in value:
        raise QuarantineError("quarantine %r must be s3://bucket/prefix/ or an absolute local directory" % value)
    return {"kind": "local", "path": os.path.normpath(value)}


# ------------------------------------------------------------------------- helpers
def _open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path``; a symlink is never followed.

    ``O_NONBLOCK`` so that a FIFO planted at ``path`` cannot hang the quarantine.
    Raises :class:`QuarantineError` for a symlink or anything but a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise QuarantineError("%s is a symlink; refusing to follow it" % path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QuarantineError("%s is not a regular file; refusing to use it" % path)
    return fd


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with os.fdopen(_open_regular(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _make_read_only(path: str) -> bool:
    """Make the quarantined file ``path`` 0400 through its descriptor; whether its mode changed.

    The descriptor is opened with ``O_NOFOLLOW``: a symlink swapped in for the file is
    refused, never chmodded.
    """
    fd = _open_regular(path)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) == READ_ONLY:
            return False
        os.fchmod(fd, READ_ONLY)
        return True
    finally:
        os.close(fd)


def _merge_reasons(existing: str | None, reasons) -> str:
    have = {r for r in (existing or "").split("+") if r}
    return "+".join(sorted(have | set(reasons)))


class Quarantiner:
    """Quarantines groups of failures that share one source object and one leaf.

    ``client(service)`` returns a boto3 client (every call retried); it is called once,
    and only when S3 is involved.
    """

    def __init__(self, client, drill_id, dest, sink, now, check_mode=False):  # noqa: PLR0917
        self.client = client
        self.check = check_mode
        self.drill_id = drill_id
        self.dest = dest
        self.sink = sink
        self.now = now
        self._s3 = None
        self._lock = threading.Lock()
        self.alerts = []

    @property
    def s3(self):
        with self._lock:
            if self._s3 is None:
                self._s3 = self.client("s3")
            return self._s3

    # -- quarantine location ---------------------------------------------------------
    def check_destination(self, sources) -> None:
        """Fail closed before anything is written when the quarantine is unusable."""
        if self.dest["kind"] == "s3":
            bucket = self.dest["bucket"]
            if any(s.kind == "s3" and s.bucket == bucket for s in sources):
                raise QuarantineError("quarantine bucket %s also holds a failing source; use a separate "
                                      "Object Lock bucket outside the sandbox" % bucket)
            try:
                conf = self.s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
            except ClientError as exc:
                raise QuarantineError("cannot read the Object Lock configuration of quarantine bucket %s (%s); "
                                      "it must exist with Object Lock enabled"
                                      % (bucket, error_code(exc) or exc)) from None
            if conf.get("ObjectLockEnabled") != "Enabled":
                raise QuarantineError("quarantine bucket %s does not have Object Lock enabled; create it with "
                                      "Object Lock so copies can be put under legal hold" % bucket)
        else:
            root = self.dest["path"]
            for s in sources:
                if s.kind == "local" and (os.path.normpath(s.path) + os.sep).startswith(root + os.sep):
                    raise QuarantineError("source %s is already inside the quarantine directory %s"
                                          % (s.path, root))
            for path in (root, self.base()):
                try:
                    check_private_dir(path)
                except PrivateDirError as exc:
                    raise QuarantineError("the quarantine directory is unusable: %s" % exc) from None

    def base(self) -> str:
        if self.dest["kind"] == "s3":
            return "%s%s/" % (self.dest["prefix"], self.drill_id)
        return os.path.join(self.dest["path"], self.drill_id)

    def record_location(self, leaf, reason) -> str:
        if self.dest["kind"] == "s3":
            return s3_uri(self.dest["bucket"], self.base() + record_leaf(leaf, reason))
        return os.path.join(self.base(), record_leaf(leaf, reason))

    def load_record(self, leaf, reason):
        """The stored record for (leaf, reason), or None when there is none yet."""
        if self.dest["kind"] == "s3":
            try:
                body = self.s3.get_object(Bucket=self.dest["bucket"],
                                          Key=self.base() + record_leaf(leaf, reason))["Body"].read()
            except ClientError as exc:
                if error_code(exc) in OBJECT_NOT_FOUND_CODES:
                    return None
                raise
        else:
            try:
                with open(os.path.join(self.base(), record_leaf(leaf, reason)), "rb") as handle:
                    body = handle.read()
            except FileNotFoundError:
                return None
        try:
            return json.loads(body)
        except ValueError:
            raise QuarantineError("quarantine record %s is not valid JSON; inspect it by hand"
                                  % self.record_location(leaf, reason)) from None

    def store_record(self, leaf, reason, record) -> None:
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        if self.dest["kind"] == "s3":
            self.s3.put_object(Bucket=self.dest["bucket"], Key=self.base() + record_leaf(leaf, reason), Body=data,
                               ContentType="application/json", ChecksumAlgorithm="SHA256",
                               ObjectLockLegalHoldStatus="ON",
                               Tagging=urlencode({TAG_DRILL_ID: self.drill_id, TAG_REASON: reason}))
        else:
            self._local_dir()
            atomic_write(os.path.join(self.base(), record_leaf(leaf, reason)), data, 0o600)

    def _local_dir(self) -> str:
        # Parallel workers call this at once; ensure_private_dir tolerates the ones that lose the
        # mkdir race and judges what is there without following a planted symlink.
        ensure_private_dir(self.dest["path"], parents=True)
        ensure_private_dir(self.base())
        return self.base()

    # -- S3 tags ---------------------------------------------------------------------
    def _wanted_tags(self, current: dict, reasons, sha) -> dict:
        tags = dict(current)
        tags[TAG_DRILL_ID] = self.drill_id
        tags[TAG_REASON] = _merge_reasons(current.get(TAG_REASON), reasons)
        tags[TAG_SHA] = sha or current.get(TAG_SHA) or "unknown"
        tags[TAG_AT] = current.get(TAG_AT) or self.now
        return tags

    def ensure_tags(self, bucket, key, version_id, *, reasons, sha, what) -> bool:
        kwargs = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        current = {t["Key"]: t["Value"] for t in self.s3.get_object_tagging(**kwargs)["TagSet"]}
        wanted = self._wanted_tags(current, reasons, sha)
        if wanted == current:
            return False
        if len(wanted) > 10:
            raise QuarantineError("%s already has %d tags; adding the quarantine tags would exceed S3's limit "
                                  "of 10, so remove some tags and run again" % (what, len(current)))
        if not self.check:
            self.s3.put_object_tagging(Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in sorted(wanted.items())]},
                                       **kwargs)
        return True

    def ensure_legal_hold(self, key, version_id) -> bool:
        bucket = self.dest["bucket"]
        try:
            hold = self.s3.get_object_legal_hold(Bucket=bucket, Key=key, VersionId=version_id)
            status = (hold.get("LegalHold") or {}).get("Status") or "OFF"
        except ClientError as exc:
            if error_code(exc) not in ("NoSuchObjectLockConfiguration", "InvalidRequest"):
                raise
            status = "OFF"
        if status == "ON":
            return False
        if not self.check:
            self.s3.put_object_legal_hold(Bucket=bucket, Key=key, VersionId=version_id, LegalHold={"Status": "ON"})
        return True

    # -- sources -----------------------------------------------------------------------
    def head_destination(self, bucket: str, key: str):
        """HeadObject of a quarantine key, or None when nothing is there yet."""
        try:
            return self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) not in OBJECT_NOT_FOUND_CODES:
                raise
            return None

    def head_s3_source(self, src: Source):
        kwargs = {"Bucket": src.bucket, "Key": src.key}
        if src.version_id:
            kwargs["VersionId"] = src.version_id
        try:
            return self.s3.head_object(**kwargs)
        except ClientError as exc:
            if error_code(exc) in OBJECT_NOT_FOUND_CODES or error_code(exc) == "400" and src.version_id:
                return None
            raise QuarantineError("cannot read %s (%s); the quarantine needs s3:GetObject, s3:GetObjectVersion "
                                  "and tagging rights on the backup bucket"
                                  % (src.location, error_code(exc) or exc)) from None

    def copy_s3_to_s3(self, src: Source, head: dict, key: str, tags: dict, origin: str) -> str:  # noqa: PLR0917
        """Server-side multipart copy of the exact version, legal hold ON; returns the copy's version."""
        bucket = self.dest["bucket"]
        size = int(head["ContentLength"])
        copy_source = {"Bucket": src.bucket, "Key": src.key}
        if head.get("VersionId") and head["VersionId"] != "null":
            copy_source["VersionId"] = head["VersionId"]
        upload = self.s3.create_multipart_upload(
            Bucket=bucket, Key=key, ObjectLockLegalHoldStatus="ON", ChecksumAlgorithm="SHA256",
            ContentType=head.get("ContentType") or "application/octet-stream",
            Metadata={META_SOURCE: origin}, Tagging=urlencode(tags))
        upload_id = upload["UploadId"]
        try:
            parts = []
            ranges = [None] if size <= SINGLE_PART_MAX else [
                (start, min(start + PART_SIZE, size) - 1) for start in range(0, size, PART_SIZE)]
            for number, rng in enumerate(ranges, start=1):
                kwargs = {"CopySourceIfMatch": head["ETag"]} if head.get("ETag") else {}
                if rng is not None:
                    kwargs["CopySourceRange"] = "bytes=%d-%d" % rng
                result = self.s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                  CopySource=copy_source, **kwargs)["CopyPartResult"]
                part = {"PartNumber": number, "ETag": result["ETag"]}
                if result.get("ChecksumSHA256"):
                    part["ChecksumSHA256"] = result["ChecksumSHA256"]
                parts.append(part)
            done = self.s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                     MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001,S110 - the original error is the one to report
                pass
            raise
        return done.get("VersionId")

    # -- one group -----------------------------------------------------------------------
    def run_group(self, src: Source, leaf: str, items) -> list:
        """Quarantine ``items`` (index, failure) that share the copy of ``src`` at ``leaf``.

        Returns ``[(index, record, changed)]``. Each failure has its own record,
        ``<leaf of its name>@<reason>.json``; a failure whose record exists is not
        recorded or alerted again.
        """
        stored = {}
        for _index, f in items:
            rleaf = leaf_for(f["name"])
            if (rleaf, f["reason"]) not in stored:
                stored[(rleaf, f["reason"])] = self.load_record(rleaf, f["reason"])
        outcome = (self._s3_group if src.kind == "s3" else self._local_source_group)(src, leaf, items, stored)
        results, done = [], {}
        for index, failure in items:
            rkey = (leaf_for(failure["name"]), failure["reason"])
            if rkey in done:  # the same failure listed twice: one record, one alert
                results.append((index, done[rkey], False))
                continue
            old = stored.get(rkey)
            if old is not None:
                done[rkey] = dict(old, action="unchanged")
                results.append((index, done[rkey], outcome["changed"]))
                continue
            record = self._record(failure, src, rkey[0], outcome)
            if not self.check:
                event_id = str(uuid.uuid4())
                record["alert_id"] = event_id
                self.sink.emit(EVENT_TYPE, failure["name"] or src.location, self._event_data(record), event_id=event_id)
                with self._lock:
                    self.alerts.append(event_id)
                self.store_record(rkey[0], failure["reason"], record)
                record["action"] = "quarantined"
            else:
                record["action"] = "would_quarantine"
            done[rkey] = record
            results.append((index, record, True))
        return results

    def _record(self, failure, src, leaf, outcome) -> dict:
        return {
            "schema": RECORD_SCHEMA,
            "drill_id": self.drill_id,
            "name": failure["name"],
            "reason": failure["reason"],
            "detail": failure["detail"],
            "source": failure["source"],
            "version_id": outcome.get("version_id", src.version_id),
            "observed_sha256": failure["observed_sha256"],
            "observed_size": failure["observed_size"],
            "quarantined_at": self.now,
            "quarantine_location": outcome.get("location"),
            "record_location": self.record_location(leaf, failure["reason"]),
            "copied": bool(outcome.get("location")),
            "original": outcome.get("original"),
            "legal_hold": outcome.get("legal_hold"),
            "quarantined_sha256": outcome.get("sha256"),
            "note": outcome.get("note"),
            "alert_id": None,
        }

    @staticmethod
    def _event_data(record) -> dict:
        keys = ("drill_id", "name", "reason", "detail", "source", "version_id", "observed_sha256",
                "observed_size", "quarantine_location", "record_location", "copied", "original")
        data = {k: record.get(k) for k in keys}
        data["record"] = {k: v for k, v in record.items() if k != "alert_id"}
        return data

    # S3 source -------------------------------------------------------------------------
    def _s3_group(self, src, leaf, items, stored) -> dict:
        reasons = [f["reason"] for _index, f in items]
        sha = next((f["observed_sha256"] for _index, f in items if f["observed_sha256"]), None)
        head = self.head_s3_source(src)
        if head is None:
            return {"changed": False, "original": "missing", "version_id": src.version_id,
                    "note": "the source object%s was not found; nothing to copy"
                            % (" version" if src.version_id else "")}
        version = head.get("VersionId") if head.get("VersionId") not in (None, "null") else None
        changed = False
        out = {"original": "preserved", "version_id": version}
        if self.dest["kind"] == "s3":
            key = self.base() + leaf
            bucket = self.dest["bucket"]
            existing = self.head_destination(bucket, key)
            # The canonical location of the exact version, however the failure spelled it.
            want_source = quote(s3_uri(src.bucket, src.key, version), safe="/:?=")[:1024]
            if existing is not None:
                have = (existing.get("Metadata") or {}).get(META_SOURCE)
                if have != want_source:
                    raise QuarantineError("quarantine key %s already holds a copy of %s, not of %s; refusing to "
                                          "overwrite evidence" % (s3_uri(bucket, key), unquote(have or "?"),
                                                                  src.location))
                copy_version = existing.get("VersionId")
            elif self.check:
                copy_version, changed = None, True
            else:
                tags = self._wanted_tags({}, reasons, sha)
                copy_version = self.copy_s3_to_s3(src, head, key, tags, want_source)
                changed = True
            if copy_version is not None:
                changed |= self.ensure_legal_hold(key, copy_version)
                changed |= self.ensure_tags(bucket, key, copy_version, reasons=reasons, sha=sha,
                                            what="quarantine copy %s" % s3_uri(bucket, key))
            out.update(location=s3_uri(bucket, key, copy_version), legal_hold="ON")
        else:
            path = os.path.join(self.base(), leaf)
            if not os.path.lexists(path):
                changed = True
                if not self.check:
                    self._download(src, version, path)
            elif os.path.islink(path) or os.path.getsize(path) != int(head["ContentLength"]):
                raise QuarantineError("quarantine file %s already holds something other than %s; refusing to "
                                      "overwrite evidence" % (path, s3_uri(src.bucket, src.key, version)))
            out.update(location=path, sha256=_sha256_file(path) if os.path.exists(path) else None)
        # Tagged last, so a refused quarantine (conflict) leaves the source version untouched.
        changed |= self.ensure_tags(src.bucket, src.key, version, reasons=reasons, sha=sha,
                                    what="source %s" % s3_uri(src.bucket, src.key, version))
        out["changed"] = changed
        return out

    def _download(self, src, version, path) -> None:
        self._local_dir()  # the 0700 quarantine directory, checked not to be a symlink
        kwargs = {"Bucket": src.bucket, "Key": src.key}
        if version:
            kwargs["VersionId"] = version
        body = self.s3.get_object(**kwargs)["Body"]
        atomic_write_chunks(path, iter(lambda: body.read(CHUNK), b""), READ_ONLY)

    # local source ----------------------------------------------------------------------
    def _local_source_group(self, src, leaf, items, stored) -> dict:
        path = src.path
        if os.path.normpath(path) != path:
            return {"changed": False, "original": "untouched",
                    "note": "the source path is not normalized (it has '..', '.' or repeated separators); "
                            "it was recorded but never touched"}
        if os.path.realpath(os.path.dirname(path)) != os.path.dirname(path):
            return {"changed": False, "original": "untouched",
                    "note": "a parent directory of the source path is a symlink, so the path may lead outside "
                            "the backup; it was recorded but never followed or moved"}
        if self.dest["kind"] == "s3":
            return self._local_to_s3(src, leaf, items)
        dest = os.path.join(self.base(), leaf)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            info = None
        if os.path.lexists(dest):
            if info is not None and stat.S_ISREG(info.st_mode) and _sha256_file(path) != _sha256_file(dest):
                raise QuarantineError("quarantine file %s already holds different content than %s; refusing "
                                      "to overwrite evidence" % (dest, path))
            original = "moved" if info is None else "kept"
            return {"changed": _make_read_only(dest), "original": original, "location": dest,
                    "sha256": _sha256_file(dest)}
        if info is None:
            return {"changed": False, "original": "missing", "note": "the source file was not found; nothing to move"}
        if not stat.S_ISREG(info.st_mode):
            return {"changed": False, "original": "untouched",
                    "note": "the source is not a regular file (symlink, directory or device); it was "
                            "recorded but never followed or moved"}
        if self.check:
            return {"changed": True, "original": "moved", "location": dest}
        self._local_dir()  # the 0700 quarantine directory, checked not to be a symlink
        original, note = "moved", None
        try:
            os.rename(path, dest)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY):
                raise
            self._copy_local(path, dest)
            try:
                os.unlink(path)
            except OSError as exc2:
                if exc2.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY):
                    raise
                original = "kept"
                note = "the original could not be removed (%s); it was copied and left in place" % exc2.strerror
        # What was renamed is judged again through its descriptor: a symlink swapped in for the
        # source after the lstat above is refused here, never followed or chmodded.
        _make_read_only(dest)
        return {"changed": True, "original": original, "location": dest, "sha256": _sha256_file(dest),
                "note": note}

    @staticmethod
    def _copy_local(path, dest) -> None:
        with os.fdopen(_open_regular(path), "rb") as inp:
            atomic_write_chunks(dest, iter(lambda: inp.read(CHUNK), b""), READ_ONLY)

    def _local_to_s3(self, src, leaf, items) -> dict:
        bucket, key = self.dest["bucket"], self.base() + leaf
        reasons = [f["reason"] for _index, f in items]
        sha = next((f["observed_sha256"] for _index, f in items if f["observed_sha256"]), None)
        existing = self.head_destination(bucket, key)
        changed = False
        if existing is None:
            if not os.path.isfile(path := src.path) or os.path.islink(path):
                return {"changed": False, "original": "missing" if not os.path.lexists(path) else "untouched",
                        "note": "the source file was not found or is not a regular file; nothing to copy"}
            changed = True
            if self.check:
                return {"changed": True, "original": "kept", "location": s3_uri(bucket, key), "legal_hold": "ON"}
            with os.fdopen(_open_regular(path), "rb") as handle:
                put = self.s3.put_object(
                    Bucket=bucket, Key=key, Body=handle, ChecksumAlgorithm="SHA256", ObjectLockLegalHoldStatus="ON",
                    Metadata={META_SOURCE: quote(src.location, safe="/:?=")[:1024]},
                    Tagging=urlencode(self._wanted_tags({}, reasons, sha)))
            version = put.get("VersionId")
        else:
            have = (existing.get("Metadata") or {}).get(META_SOURCE)
            if have != quote(src.location, safe="/:?=")[:1024]:
                raise QuarantineError("quarantine key %s already holds a copy of %s, not of %s; refusing to "
                                      "overwrite evidence" % (s3_uri(bucket, key), unquote(have or "?"),
                                                              src.location))
            version = existing.get("VersionId")
        changed |= self.ensure_legal_hold(key, version)
        changed |= self.ensure_tags(bucket, key, version, reasons=reasons, sha=sha,
                                    what="quarantine copy %s" % s3_uri(bucket, key))
        return {"changed": changed, "original": "kept", "location": s3_uri(bucket, key, version),
                "legal_hold": "ON"}


# --------------------------------------------------------------------------- the whole run
@dataclass
class Outcome:
    """What a quarantine run did: records in the order of the failures, alert ids, per-source errors."""
    records: list
    changed: bool
    alerts: list
    errors: list = field(default_factory=list)
    total: int = 0

    @property
    def message(self) -> str:
        """The task's failure message when some failures could not be quarantined."""
        failed = sum(len(e["names"]) for e in self.errors)
        return ("Quarantine failed for %d of %d failure(s) (first: %s); the others were quarantined and the drill "
                "must stay halted" % (failed, self.total, self.errors[0]["error"]))


class Quarantine:
    """One quarantine_artifact run: input checked on construction, :meth:`check` then :meth:`run`.

    ``client(service)`` returns a retrying boto3 client (``_aws.aws_client``); it is only
    called when S3 or an AWS alert destination is involved.
    """

    def __init__(self, *, failures, drill_id, quarantine, alert_sink, client, workers=8,  # noqa: PLR0913
                 check_mode=False, now=None):
        if workers < 1:
            raise QuarantineError("workers must be at least 1")
        try:
            self.drill_id = validate_drill_id(drill_id)
            self.failures = [validate_failure(f, i) for i, f in enumerate(failures)]
            self.sources = [parse_source(f, i) for i, f in enumerate(self.failures)]
            dest = parse_quarantine(quarantine)
            sink_opts = {k: v for k, v in (alert_sink or {}).items() if v is not None}
            self.sink = AlertSink(self.drill_id, sink_opts, client=client)
        except (DrillError, AlertError) as exc:
            raise QuarantineError(str(exc)) from None
        self.workers = workers
        self.quarantiner = Quarantiner(client, self.drill_id, dest, self.sink, now or format_time(utcnow()),
                                       check_mode=check_mode)

    def check(self) -> None:
        """Fail closed before anything is written: the quarantine location and the AWS alert destinations.

        Raises :class:`QuarantineError`, or a botocore error from checking the alert sink.
        Nothing to quarantine needs no location.
        """
        if not self.failures:
            return
        try:
            self.quarantiner.check_destination(self.sources)
            if needs_aws(self.sink.sink):
                self.sink.verify_destinations()
        except AlertError as exc:
            raise QuarantineError(str(exc)) from None

    def run(self) -> Outcome:
        """Quarantine every failure, in parallel; errors are collected per source, never raised."""
        if not self.failures:
            return Outcome([], False, [], total=0)
        q = self.quarantiner
        # One copy per (source object, copy leaf); groups that share a copy leaf run in the
        # same worker, one after the other, so they never race for the same key or file.
        manifest_sources = {s.identity for f, s in zip(self.failures, self.sources, strict=True) if f["name"] is None}
        jobs = {}
        for index, (failure, src) in enumerate(zip(self.failures, self.sources, strict=True)):
            leaf = copy_leaf(failure, src, manifest_sources)
            jobs.setdefault(leaf, {}).setdefault(src.identity, (src, []))[1].append((index, failure))

        def work(job):
            leaf, by_source = job
            return [self._run_one(src, leaf, items) for src, items in by_source.values()]

        with ThreadPoolExecutor(max_workers=min(self.workers, len(jobs))) as pool:
            outcomes = [o for batch in pool.map(work, jobs.items()) for o in batch]

        records, changed, errors = [None] * len(self.failures), False, []
        for results, error in outcomes:
            if error:
                errors.append(error)
            for index, record, was_changed in results:
                records[index] = record
                changed |= was_changed
        # Alerts are only emitted for records written (changed) or for failed sources (errors).
        return Outcome([r for r in records if r is not None], changed or bool(q.alerts), q.alerts, errors,
                       total=len(self.failures))

    def _run_one(self, src, leaf, items):
        try:
            return self.quarantiner.run_group(src, leaf, items), None
        except (QuarantineError, AlertError, OSError) as exc:
            error = str(exc)
        except (BotoCoreError, ClientError) as exc:
            error = "%s: %s" % (src.location, error_code(exc) or exc)
        except Exception as exc:  # noqa: BLE001 - unknown state is a failure, reported per source
            error = "%s: unexpected %s: %s" % (src.location, type(exc).__name__, exc)
        self._failed_event(src, items, error)
        return [], {"source": src.location, "names": [f["name"] for _index, f in items],
                    "reasons": [f["reason"] for _index, f in items], "error": error}

    def _failed_event(self, src, items, error: str) -> None:
        q = self.quarantiner
        if q.check:
            return
        try:
            event = q.sink.emit(EVENT_TYPE_FAILED, src.location, {
                "drill_id": q.drill_id, "source": src.location,
                "failures": [{"name": f["name"], "reason": f["reason"]} for _index, f in items],
                "error": error})
            with q._lock:
                q.alerts.append(event["id"])
        except Exception:  # noqa: BLE001,S110 - the quarantine error is already being reported
            pass
