#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: quarantine_artifact
short_description: Preserve every artifact that failed verification, under legal hold, and alert
version_added: 0.1.0
description:
  - Takes the C(failures) list of M(drguard.sandbox.verify_artifacts) as-is and quarantines
    every entry in one call, in parallel.
  - "S3 sources: the exact failing object version (pinned by C(version_id) or the source's
    C(?versionId=)) is copied server-side to C(<quarantine prefix><drill_id>/<encoded name>)
    with an Object Lock legal hold ON; the copy and the source version are tagged
    C(drguard:drill-id), C(drguard:quarantine-reason), C(drguard:observed-sha256) and
    C(drguard:quarantined-at) (existing tags of the source version are kept). The original
    is never deleted or overwritten."
  - "Local sources: the file is moved into the 0700 directory C(<quarantine>/<drill_id>/)
    and made read-only (0400). When the original cannot be removed (it sits on the drill's
    read-only backup mount) it is copied and the original is left in place; the record
    says so."
  - A JSON quarantine record (one per failure, C(<encoded name>@<reason>.json)) is written
    beside the copy (S3 with legal hold ON; local files 0600), and one CloudEvent
    C(drguard.artifact.quarantined) per failure goes to the alert sink. A source that does
    not exist (for example C(artifact_missing)) gets a record and an alert but no copy.
  - Names are untrusted. They are never used raw in a key or path; the quarantine leaf is
    the name percent-encoded (every byte outside C([A-Za-z0-9_.~-]) and a leading dot
    encoded, long names shortened with a SHA-256 suffix), so nothing can leave the
    quarantine location. Manifest-level failures (C(name) null) use the leaf C(@manifest).
  - An C(unsafe_name) failure's source is the manifest that lists the name, so its copy is
    the manifest's copy (leaf C(@manifest)); its record still uses the name's encoded leaf.
  - A local source path that is not absolute and normalized, that has a symlink among its
    parent directories, or that is not a regular file (symlink, directory, device), is
    recorded and alerted but never moved or followed.
  - Idempotent. A failure whose record already exists is not quarantined or alerted again
    (C(changed=false)); missing tags or a missing legal hold are restored.
  - S3 copies use a multipart copy (UploadPartCopy), which also covers objects above the
    5 GiB CopyObject limit; the quarantine bucket must have Object Lock enabled and must
    not be a source bucket.
  - In check mode nothing is written and no alert is emitted; the records returned
    describe what would be done.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  failures:
    description:
      - Failure entries from M(drguard.sandbox.verify_artifacts), each
        C({name, reason, detail, source, version_id, observed_sha256, observed_size}).
      - C(name) is null for manifest-level failures; C(source) is then the manifest's location.
      - C(reason) must be one of the reason codes of DESIGN section 5.
      - C(source) is C(s3://bucket/key) with an optional C(?versionId=...) suffix, or an
        absolute local path.
    type: list
    elements: dict
    required: true
  drill_id:
    description: The drill's id.
    type: str
    required: true
  quarantine:
    description:
      - Where failing artifacts are preserved. C(s3://bucket/prefix/) (an Object Lock
        bucket outside the sandbox) or an absolute local directory.
      - A local directory and the drill's directory inside it are created with mode 0700 (missing parents too);
        an existing one must be a real directory (a symlink is refused, never followed) owned by the user running
        the drill, and group and other permission bits on it are removed.
    type: str
    required: true
  workers:
    description: Failures quarantined in parallel.
    type: int
    default: 8
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
  - drguard.sandbox.alert_sink
author:
  - drguard maintainers
"""

EXAMPLES = r"""
- name: Quarantine every artifact that failed verification (controller credentials)
  drguard.sandbox.quarantine_artifact:
    failures: "{{ verify.failures }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    quarantine: s3://org-dr-quarantine/drills/
    alert_sink:
      path: "{{ drill_ctx.output_dir }}/alerts.jsonl"
  register: quarantined

- name: Quarantine local artifacts into a private directory
  drguard.sandbox.quarantine_artifact:
    failures: "{{ verify.failures }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    quarantine: /srv/dr-quarantine
    alert_sink:
      path: "{{ drill_ctx.output_dir }}/alerts.jsonl"
      sns_topic_arn: "{{ drill_alert_topic_arn }}"
"""

RETURN = r"""
records:
  description:
    - One quarantine record per failure, in the order of O(failures). In check mode,
      what would be recorded.
  returned: always
  type: list
  elements: dict
  contains:
    drill_id:
      description: The drill's id.
      type: str
    name:
      description: The artifact name as given (null for manifest-level failures).
      type: str
    reason:
      description: The failure reason (DESIGN section 5).
      type: str
    source:
      description: The failing object's location as given.
      type: str
    version_id:
      description: The exact S3 version quarantined (null for local sources).
      type: str
    quarantine_location:
      description: Where the copy is (C(s3://bucket/key?versionId=...) or a local path); null when nothing was copied.
      type: str
    record_location:
      description: Where this record is stored.
      type: str
    copied:
      description: Whether a copy of the failing object exists in quarantine.
      type: bool
    original:
      description:
        - C(preserved) (S3, tagged), C(moved) (local), C(kept) (local, could not be removed),
          C(missing) or C(untouched).
      type: str
    legal_hold:
      description: C(ON) for S3 copies.
      type: str
    alert_id:
      description: Id of the CloudEvent emitted for this failure.
      type: str
    action:
      description: C(quarantined), C(unchanged) or, in check mode, C(would_quarantine).
      type: str
  sample:
    - drill_id: dr-20261129050000-a1b2c3
      name: orders.sqlite
      reason: digest_mismatch
      source: s3://backups/orders/orders.sqlite?versionId=3HL4kqtJlcpXroDTDmJ
      version_id: 3HL4kqtJlcpXroDTDmJ
      quarantine_location: s3://dr-quarantine/drills/dr-20261129050000-a1b2c3/orders.sqlite?versionId=Ue8
      record_location: s3://dr-quarantine/drills/dr-20261129050000-a1b2c3/orders.sqlite@digest_mismatch.json
      copied: true
      original: preserved
      legal_hold: "ON"
      action: quarantined
alerts:
  description: Ids of the CloudEvents emitted by this run (empty in check mode and when nothing changed).
  returned: always
  type: list
  elements: str
errors:
  description: Failures that could not be quarantined (the task then fails).
  returned: failure
  type: list
  elements: dict
"""

import errno
import hashlib
import json
import os
import re
import stat
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote
from urllib.parse import unquote
from urllib.parse import urlencode

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_chunks
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import PrivateDirError
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertError
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import ALERT_SINK_SPEC
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertSink
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import needs_aws
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    failures=dict(type="list", elements="dict", required=True),
    drill_id=dict(type="str", required=True),
    quarantine=dict(type="str", required=True),
    alert_sink=ALERT_SINK_SPEC,
    workers=dict(type="int", default=8),
)

# DESIGN §5, the closed vocabulary.
REASONS = ("manifest_malformed", "signature_invalid", "untrusted_key", "threshold_not_met",
           "manifest_expired", "rollback", "stale_backup", "unsafe_name", "artifact_missing",
           "unlisted_artifact", "size_mismatch", "digest_mismatch", "metadata_mismatch", "not_immutable")

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
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
NOT_FOUND = ("404", "NoSuchKey", "NoSuchVersion", "NotFound")
CHUNK = 1024 * 1024


class QuarantineError(Exception):
    """One failure could not be quarantined; the message says why."""


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
    return "%s@%s.json" % (leaf, reason)


class Source:
    """Where a failing object is: S3 (bucket, key, version) or a local path."""

    def __init__(self, kind, location, *, bucket=None, key=None, version_id=None, path=None):
        self.kind, self.location = kind, location
        self.bucket, self.key, self.version_id, self.path = bucket, key, version_id, path

    @property
    def identity(self):
        return (self.kind, self.bucket, self.key, self.version_id, self.path)


def parse_source(failure: dict, index: int) -> Source:
    where = "failures[%d]" % index
    src = failure.get("source")
    version = failure.get("version_id")
    if not isinstance(src, str) or not src or "\x00" in src:
        raise QuarantineError("%s.source must be the failing object's location (s3://bucket/key or an "
                              "absolute path), got %r" % (where, src))
    if version is not None and (not isinstance(version, str) or not version):
        raise QuarantineError("%s.version_id must be a string or null, got %r" % (where, version))
    if src.startswith("s3://"):
        bucket, _, key = src[5:].partition("/")
        match = re.search(r"\?versionId=([^&?/]*)$", key)
        if match:
            key, qversion = key[:match.start()], unquote(match.group(1))
            if version and qversion != version:
                raise QuarantineError("%s: version_id %r contradicts the source's versionId %r; refusing "
                                      "to guess which version failed" % (where, version, qversion))
            version = version or qversion or None
        if not BUCKET_RE.match(bucket) or not key:
            raise QuarantineError("%s.source %r is not s3://bucket/key" % (where, src))
        return Source("s3", src, bucket=bucket, key=key, version_id=version)
    if not os.path.isabs(src):
        raise QuarantineError("%s.source %r is neither s3://bucket/key nor an absolute path" % (where, src))
    return Source("local", src, path=src)


def validate_failure(failure, index: int) -> dict:
    where = "failures[%d]" % index
    if not isinstance(failure, dict):
        raise QuarantineError("%s must be a mapping from verify_artifacts' failures" % where)
    name = failure.get("name")
    if name is not None and not isinstance(name, str):
        raise QuarantineError("%s.name must be a string or null, got %r" % (where, type(name).__name__))
    if failure.get("reason") not in REASONS:
        raise QuarantineError("%s.reason %r is not a DESIGN section 5 reason code (%s)"
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
    if not isinstance(value, str) or not value.strip():
        raise QuarantineError("quarantine must be s3://bucket/prefix/ or an absolute local directory")
    if value.startswith("s3://"):
        bucket, _, prefix = value[5:].partition("/")
        if not BUCKET_RE.match(bucket):
            raise QuarantineError("quarantine %r: %r is not a valid bucket name" % (value, bucket))
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if any(part in (".", "..") for part in prefix.split("/")) or "\\" in prefix:
            raise QuarantineError("quarantine prefix %r must not contain '.' or '..' segments" % prefix)
        return {"kind": "s3", "bucket": bucket, "prefix": prefix}
    if not os.path.isabs(value) or "\x00" in value:
        raise QuarantineError("quarantine %r must be s3://bucket/prefix/ or an absolute local directory" % value)
    return {"kind": "local", "path": os.path.normpath(value)}


# ------------------------------------------------------------------------- helpers
def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _s3_url(bucket, key, version_id=None) -> str:
    url = "s3://%s/%s" % (bucket, key)
    return url + "?versionId=%s" % version_id if version_id else url


def _merge_reasons(existing: str | None, reasons) -> str:
    have = {r for r in (existing or "").split("+") if r}
    return "+".join(sorted(have | set(reasons)))


class Quarantiner:
    """Quarantines groups of failures that share one source object and one leaf."""

    def __init__(self, module, drill_id, dest, sink, now):
        self.module = module
        self.check = module.check_mode
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
                self._s3 = self.module.client("s3", retry_decorator=AWSRetry.jittered_backoff())
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
            except botocore.exceptions.ClientError as exc:
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
            return _s3_url(self.dest["bucket"], self.base() + record_leaf(leaf, reason))
        return os.path.join(self.base(), record_leaf(leaf, reason))

    def load_record(self, leaf, reason):
        """The stored record for (leaf, reason), or None when there is none yet."""
        if self.dest["kind"] == "s3":
            try:
                body = self.s3.get_object(Bucket=self.dest["bucket"],
                                          Key=self.base() + record_leaf(leaf, reason))["Body"].read()
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) in NOT_FOUND:
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
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in ("NoSuchObjectLockConfiguration", "InvalidRequest"):
                raise
            status = "OFF"
        if status == "ON":
            return False
        if not self.check:
            self.s3.put_object_legal_hold(Bucket=bucket, Key=key, VersionId=version_id, LegalHold={"Status": "ON"})
        return True

    # -- sources -----------------------------------------------------------------------
    def head_s3_source(self, src: Source):
        kwargs = {"Bucket": src.bucket, "Key": src.key}
        if src.version_id:
            kwargs["VersionId"] = src.version_id
        try:
            return self.s3.head_object(**kwargs)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in NOT_FOUND or error_code(exc) == "400" and src.version_id:
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
        for _, f in items:
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
        reasons = [f["reason"] for _, f in items]
        sha = next((f["observed_sha256"] for _, f in items if f["observed_sha256"]), None)
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
            try:
                existing = self.s3.head_object(Bucket=bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in NOT_FOUND:
                    raise
                existing = None
            # The canonical location of the exact version, however the failure spelled it.
            want_source = quote(_s3_url(src.bucket, src.key, version), safe="/:?=")[:1024]
            if existing is not None:
                have = (existing.get("Metadata") or {}).get(META_SOURCE)
                if have != want_source:
                    raise QuarantineError("quarantine key %s already holds a copy of %s, not of %s; refusing to "
                                          "overwrite evidence" % (_s3_url(bucket, key), unquote(have or "?"),
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
                                            what="quarantine copy %s" % _s3_url(bucket, key))
            out.update(location=_s3_url(bucket, key, copy_version), legal_hold="ON")
        else:
            path = os.path.join(self.base(), leaf)
            if not os.path.lexists(path):
                changed = True
                if not self.check:
                    self._download(src, version, path)
            elif os.path.islink(path) or os.path.getsize(path) != int(head["ContentLength"]):
                raise QuarantineError("quarantine file %s already holds something other than %s; refusing to "
                                      "overwrite evidence" % (path, _s3_url(src.bucket, src.key, version)))
            out.update(location=path, sha256=_sha256_file(path) if os.path.exists(path) else None)
        # Tagged last, so a refused quarantine (conflict) leaves the source version untouched.
        changed |= self.ensure_tags(src.bucket, src.key, version, reasons=reasons, sha=sha,
                                    what="source %s" % _s3_url(src.bucket, src.key, version))
        out["changed"] = changed
        return out

    def _download(self, src, version, path) -> None:
        self._local_dir()  # the 0700 quarantine directory, checked not to be a symlink
        kwargs = {"Bucket": src.bucket, "Key": src.key}
        if version:
            kwargs["VersionId"] = version
        body = self.s3.get_object(**kwargs)["Body"]
        atomic_write_chunks(path, iter(lambda: body.read(CHUNK), b""), 0o400)

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
            return {"changed": self._ensure_mode(dest), "original": original, "location": dest,
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
        os.chmod(dest, 0o400)
        return {"changed": True, "original": original, "location": dest, "sha256": _sha256_file(dest),
                "note": note}

    @staticmethod
    def _ensure_mode(dest) -> bool:
        if stat.S_IMODE(os.lstat(dest).st_mode) == 0o400 or os.path.islink(dest):
            return False
        os.chmod(dest, 0o400)
        return True

    @staticmethod
    def _copy_local(path, dest) -> None:
        with open(path, "rb") as inp:
            atomic_write_chunks(dest, iter(lambda: inp.read(CHUNK), b""), 0o400)

    def _local_to_s3(self, src, leaf, items) -> dict:
        bucket, key = self.dest["bucket"], self.base() + leaf
        reasons = [f["reason"] for _, f in items]
        sha = next((f["observed_sha256"] for _, f in items if f["observed_sha256"]), None)
        try:
            existing = self.s3.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) not in NOT_FOUND:
                raise
            existing = None
        changed = False
        if existing is None:
            if not os.path.isfile(path := src.path) or os.path.islink(path):
                return {"changed": False, "original": "missing" if not os.path.lexists(path) else "untouched",
                        "note": "the source file was not found or is not a regular file; nothing to copy"}
            changed = True
            if self.check:
                return {"changed": True, "original": "kept", "location": _s3_url(bucket, key), "legal_hold": "ON"}
            with open(path, "rb") as handle:
                put = self.s3.put_object(
                    Bucket=bucket, Key=key, Body=handle, ChecksumAlgorithm="SHA256", ObjectLockLegalHoldStatus="ON",
                    Metadata={META_SOURCE: quote(src.location, safe="/:?=")[:1024]},
                    Tagging=urlencode(self._wanted_tags({}, reasons, sha)))
            version = put.get("VersionId")
        else:
            have = (existing.get("Metadata") or {}).get(META_SOURCE)
            if have != quote(src.location, safe="/:?=")[:1024]:
                raise QuarantineError("quarantine key %s already holds a copy of %s, not of %s; refusing to "
                                      "overwrite evidence" % (_s3_url(bucket, key), unquote(have or "?"),
                                                              src.location))
            version = existing.get("VersionId")
        changed |= self.ensure_legal_hold(key, version)
        changed |= self.ensure_tags(bucket, key, version, reasons=reasons, sha=sha,
                                    what="quarantine copy %s" % _s3_url(bucket, key))
        return {"changed": changed, "original": "kept", "location": _s3_url(bucket, key, version),
                "legal_hold": "ON"}


def _quarantine_failed_event(q: Quarantiner, src: Source, items, error: str) -> None:
    if q.check:
        return
    try:
        event = q.sink.emit(EVENT_TYPE_FAILED, src.location, {
            "drill_id": q.drill_id, "source": src.location,
            "failures": [{"name": f["name"], "reason": f["reason"]} for _, f in items],
            "error": error})
        with q._lock:
            q.alerts.append(event["id"])
    except Exception:  # noqa: BLE001,S110 - the quarantine error is already being reported
        pass


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    if p["workers"] < 1:
        module.fail_json(msg="workers must be at least 1")
    try:
        drill_id = validate_drill_id(p["drill_id"])
        failures = [validate_failure(f, i) for i, f in enumerate(p["failures"])]
        sources = [parse_source(f, i) for i, f in enumerate(failures)]
        dest = parse_quarantine(p["quarantine"])
        sink_opts = {k: v for k, v in (p["alert_sink"] or {}).items() if v is not None}
        sink = AlertSink(drill_id, sink_opts,
                         client=lambda s: module.client(s, retry_decorator=AWSRetry.jittered_backoff()))
    except (QuarantineError, DrillError, AlertError) as exc:
        module.fail_json(msg=str(exc))
    if not failures:
        module.exit_json(changed=False, records=[], alerts=[])

    q = Quarantiner(module, drill_id, dest, sink, format_time(utcnow()))
    try:
        q.check_destination(sources)
        if needs_aws(sink.sink):
            sink.verify_destinations()
    except (QuarantineError, AlertError) as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Could not check the quarantine location or the alert sink")

    # One copy per (source object, copy leaf); groups that share a copy leaf run in the
    # same worker, one after the other, so they never race for the same key or file.
    manifest_sources = {s.identity for f, s in zip(failures, sources, strict=True) if f["name"] is None}
    jobs = {}
    for index, (failure, src) in enumerate(zip(failures, sources, strict=True)):
        leaf = copy_leaf(failure, src, manifest_sources)
        jobs.setdefault(leaf, {}).setdefault(src.identity, (src, []))[1].append((index, failure))

    def run_one(src, leaf, items):
        try:
            return q.run_group(src, leaf, items), None
        except (QuarantineError, AlertError, OSError) as exc:
            error = str(exc)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            error = "%s: %s" % (src.location, error_code(exc) or exc)
        except Exception as exc:  # noqa: BLE001 - unknown state is a failure, reported per source
            error = "%s: unexpected %s: %s" % (src.location, type(exc).__name__, exc)
        _quarantine_failed_event(q, src, items, error)
        return [], {"source": src.location, "names": [f["name"] for _, f in items],
                    "reasons": [f["reason"] for _, f in items], "error": error}

    def work(job):
        leaf, by_source = job
        return [run_one(src, leaf, items) for src, items in by_source.values()]

    with ThreadPoolExecutor(max_workers=min(p["workers"], len(jobs))) as pool:
        outcomes = [o for batch in pool.map(work, jobs.items()) for o in batch]

    records, changed, errors = [None] * len(failures), False, []
    for results, error in outcomes:
        if error:
            errors.append(error)
        for index, record, was_changed in results:
            records[index] = record
            changed |= was_changed
    records = [r for r in records if r is not None]
    if errors:
        module.fail_json(msg="Quarantine failed for %d of %d failure(s) (first: %s); the others were quarantined "
                             "and the drill must stay halted" % (sum(len(e["names"]) for e in errors), len(failures),
                                                                  errors[0]["error"]),
                         changed=changed or bool(q.alerts), records=records, alerts=q.alerts, errors=errors)
    module.exit_json(changed=changed, records=records, alerts=q.alerts)


if __name__ == "__main__":
    main()
