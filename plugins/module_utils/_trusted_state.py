# Copyright: drguard maintainers
# Apache License 2.0
"""The trusted state (rollback protection): its one reader and its one writer.

A JSON document, a local file or an S3 object, mapping each backup set to the highest
``sequence`` accepted and the SHA-256 of that manifest (format: docs/manifest.md).
:class:`TrustedState` reads it and records an accepted manifest with compare-and-set:
a local file is replaced atomically under an exclusive lock on its directory after a
re-read; an S3 object is written with a conditional ``PutObject`` (``If-Match`` on the
ETag read, ``If-None-Match: *`` for a new object) and re-read on conflict. Before every
write the fresh state is checked again, so the sequence never goes down and an equal
sequence with another manifest (equivocation) is refused as ``rollback``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re

try:
    import botocore
except ImportError:
    pass  # reported by the modules (AnsibleAWSModule)

from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_json
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow

MAX_STATE = 64 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CAS_ATTEMPTS = 3
_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def sentence(text) -> str:
    """``text`` (or an exception's message) with its first letter capitalized, to open an error message."""
    text = str(text)
    return text[:1].upper() + text[1:]


class StateError(Exception):
    """The trusted state cannot be read, parsed or written, or refuses an entry; the message says what to do.

    ``reason`` is ``rollback`` when the state holds a higher sequence, or the same sequence
    with another manifest (raised by :func:`record_accepted`), None otherwise.
    """

    def __init__(self, msg: str, reason: str | None = None):
        super().__init__(msg)
        self.reason = reason


class TrustedState:
    """A trusted state at ``location`` (absolute local path or ``s3://bucket/key``).

    ``s3`` is a callable returning an S3 client that retries transient errors
    (``_aws.aws_client``); it is called only for an S3 location.
    """

    def __init__(self, location: str, s3=None):
        """Raises :class:`StateError` for an S3 location that is not a valid ``s3://bucket/key``."""
        self.location = location
        self._s3 = s3
        try:
            self.loc = parse_s3(location, "trusted_state") if is_s3(location) else None
        except LocationError as exc:
            raise StateError(sentence(exc)) from None
        if self.loc and self.loc.version_id:
            raise StateError("trusted_state must not pin a versionId: it is read and written at its latest version")
        self.etag = None

    @property
    def is_s3(self) -> bool:
        return self.loc is not None

    # ------------------------------------------------------------------ read
    def read(self) -> dict:
        """The state as a dict (empty when it does not exist yet); remembers the S3 ETag read."""
        try:
            data = self._read_s3() if self.loc else self._read_local()
            return mf.parse_trusted_state(data)
        except mf.PolicyError as exc:
            raise StateError("The trusted state %s is not valid: %s" % (self.location, exc)) from None

    def _read_local(self):
        if not os.path.exists(self.location):
            return None
        try:
            with open(self.location, "rb") as handle:
                data = handle.read(MAX_STATE + 1)
        except OSError as exc:
            raise StateError("Cannot read the trusted state %s: %s" % (self.location, exc.strerror)) from None
        if len(data) > MAX_STATE:
            raise StateError("The trusted state %s is larger than %d bytes" % (self.location, MAX_STATE))
        return data

    def _read_s3(self):
        try:
            resp = self._s3().get_object(Bucket=self.loc.bucket, Key=self.loc.key)
            if resp.get("ContentLength", 0) > MAX_STATE:
                raise StateError("The trusted state %s is larger than %d bytes" % (self.location, MAX_STATE))
            data = resp["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                self.etag = None
                return None
            raise StateError("Cannot read the trusted state %s: %s; grant s3:GetObject on it"
                             % (self.location, error_code(exc) or exc)) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StateError("Cannot read the trusted state %s: %s" % (self.location, exc)) from None
        self.etag = resp.get("ETag")
        return data

    # ------------------------------------------------------------------ write
    def record(self, backup_set: str, sequence: int, manifest_sha256: str, payload_sha256: str | None, *,
               now, state: dict | None = None) -> bool:
        """Record an accepted manifest; True when the state was written, False when it already held it.

        ``state`` is the state read earlier by :meth:`read` (S3: its ETag is the write
        condition); None reads it now. Raises ``mf.ManifestError("rollback")`` when the
        current state holds a higher sequence, or the same sequence with another manifest,
        and :class:`StateError` when the state cannot be written.
        """
        entry = mf.state_entry(sequence, manifest_sha256, payload_sha256, now)
        if self.loc:
            return self._record_s3(backup_set, entry, self.read() if state is None else state)
        return self._record_local(backup_set, entry)

    @staticmethod
    def _needs_write(fresh: dict, backup_set: str, entry: dict) -> bool:
        problem = mf.rollback_problem(fresh, backup_set, entry["sequence"], entry["manifest_sha256"],
                                      entry.get("payload_sha256"))
        if problem:
            raise problem
        current = fresh.get(backup_set)
        return not (current and current["sequence"] == entry["sequence"])

    def _record_local(self, backup_set: str, entry: dict) -> bool:
        directory = os.path.dirname(self.location)
        try:
            if not os.path.isdir(directory):
                # Missing directories are created 0700; an existing one is used as it is.
                ensure_private_dir(directory, parents=True)
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError as exc:
            raise StateError("Cannot write the trusted state %s: %s" % (self.location, exc.strerror or exc)) from None
        try:
            # Serialize writers in this directory: re-read, re-check, replace atomically.
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            fresh = self.read()
            if not self._needs_write(fresh, backup_set, entry):
                return False
            fresh[backup_set] = entry
            try:
                atomic_write_json(self.location, fresh)
            except OSError as exc:
                raise StateError("Cannot write the trusted state %s: %s" % (self.location, exc.strerror)) from None
            return True
        finally:
            os.close(dir_fd)

    def _record_s3(self, backup_set: str, entry: dict, fresh: dict) -> bool:
        for _attempt in range(CAS_ATTEMPTS):
            if not self._needs_write(fresh, backup_set, entry):
                return False
            doc = dict(fresh)
            doc[backup_set] = entry
            kwargs = {"Bucket": self.loc.bucket, "Key": self.loc.key, "ContentType": "application/json",
                      "Body": (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(),
                      "ChecksumAlgorithm": "SHA256"}
            # Conditional write: a concurrent update is re-read and re-checked, never overwritten.
            if self.etag:
                kwargs["IfMatch"] = self.etag
            else:
                kwargs["IfNoneMatch"] = "*"
            try:
                self._s3().put_object(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in _CONFLICT:
                    raise StateError("Could not write the trusted state %s: %s; record it with credentials that "
                                     "may s3:PutObject there" % (self.location, error_code(exc) or exc)) from None
                fresh = self.read()
                continue
            except botocore.exceptions.BotoCoreError as exc:
                raise StateError("Could not write the trusted state %s: %s" % (self.location, exc)) from None
            return True
        raise StateError("The trusted state %s kept changing during the update; run it again" % self.location)


def record_accepted(params: dict, s3, *, check_mode: bool, result: dict) -> dict:
    """The backend of the ``trusted_state`` module: record one accepted manifest (compare-and-set).

    ``params`` are the module's options (``trusted_state``, ``backup_set``, ``sequence``,
    ``manifest_sha256``, ``payload_sha256``); ``s3`` a callable returning an S3 client that
    retries transient errors. ``result`` is filled in as far as it got (``changed``,
    ``previous``, ``entry``) and returned. Raises :class:`StateError` (``reason="rollback"``
    when the state refuses the entry); in check mode nothing is written.
    """
    try:
        mf.validate_backup_set(params["backup_set"])
    except ValueError as exc:
        raise StateError(sentence(exc)) from None
    if params["sequence"] < 0:
        raise StateError("sequence must be a non-negative integer, as in the manifest")
    for name in ("manifest_sha256", "payload_sha256"):
        if params[name] is not None and not _HEX64.match(params[name]):
            raise StateError("%s must be 64 lowercase hex digits (a SHA-256 as verify_artifacts returns it)" % name)
    location = params["trusted_state"]
    if not is_s3(location):
        location = os.path.abspath(os.path.expanduser(location))
    backup_set, sequence = params["backup_set"], params["sequence"]
    manifest_sha256, payload_sha256 = params["manifest_sha256"], params["payload_sha256"]
    result.setdefault("changed", False)
    result.setdefault("previous", None)
    try:
        store = TrustedState(location, s3)
        state = store.read()
        result["previous"] = state.get(backup_set)
        problem = mf.rollback_problem(state, backup_set, sequence, manifest_sha256, payload_sha256)
        if problem:
            raise problem
        now = utcnow()
        result["entry"] = mf.state_entry(sequence, manifest_sha256, payload_sha256, now)
        if check_mode:
            current = result["previous"]
            result["changed"] = not (current and current["sequence"] == sequence)
        else:
            result["changed"] = store.record(backup_set, sequence, manifest_sha256, payload_sha256,
                                             now=now, state=state)
    except mf.ManifestError as exc:
        raise StateError("Refusing to record %s sequence %d in the trusted state %s: %s"
                         % (backup_set, sequence, location, exc.detail), reason=exc.reason) from None
    if not result["changed"]:
        result["entry"] = result["previous"]
    return result
