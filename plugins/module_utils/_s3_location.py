# Copyright: drguard maintainers
# Apache License 2.0
"""S3 locations: the one parser of ``s3://`` URIs and the one bucket-name rule (private).

* :func:`parse_s3` - an object: ``s3://bucket/key`` or ``s3://bucket/key?versionId=...``.
* :func:`parse_prefix` - a folder: ``s3://bucket/prefix/`` (or ``s3://bucket`` for all of it).
  A prefix must end with ``/``: ``orders`` would also match ``orders-payroll/``.
* :data:`OBJECT_NOT_FOUND_CODES` - what S3 answers for a key or version that is not there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs
from urllib.parse import urlparse

# S3's rule for bucket names (3-63 characters, lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit).
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# A missing key or version: HEAD answers a bare status code; GET a named error.
# 405 / MethodNotAllowed is what S3 answers for a version that is a delete marker.
OBJECT_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchVersion", "NotFound", "405", "MethodNotAllowed"})


class LocationError(ValueError):
    """A location that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str
    version_id: str | None = None

    @property
    def uri(self) -> str:
        return s3_uri(self.bucket, self.key, self.version_id)


def s3_uri(bucket: str, key: str, version_id: str | None = None) -> str:
    """``s3://bucket/key`` plus ``?versionId=...`` when a version is pinned."""
    base = "s3://%s/%s" % (bucket, key)
    return base + ("?versionId=%s" % version_id if version_id else "")


def is_s3(text) -> bool:
    """Whether ``text`` names an S3 location (as opposed to a local path)."""
    return isinstance(text, str) and text.startswith("s3://")


def check_bucket(bucket, what: str = "location") -> str:
    """``bucket`` when it is a valid S3 bucket name; :class:`LocationError` otherwise."""
    if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
        raise LocationError("%s: %r is not a valid S3 bucket name" % (what, bucket))
    return bucket


def parse_s3(text: str, what: str = "location") -> S3Location:
    """Parse ``s3://bucket/key[?versionId=...]``; the bucket name is checked."""
    url = urlparse(text) if isinstance(text, str) else None
    if url is None or url.scheme != "s3" or not url.netloc or "\x00" in text:
        raise LocationError("%s %r is not an s3://bucket/key URI" % (what, text))
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"versionId"})
    if unknown or url.fragment:
        raise LocationError("%s %r: only a ?versionId= query is understood" % (what, text))
    check_bucket(url.netloc, "%s %r" % (what, text))
    version = query.get("versionId", [None])[-1] or None
    return S3Location(url.netloc, url.path[1:] if url.path.startswith("/") else url.path, version)


def parse_prefix(text: str, what: str = "source") -> S3Location:
    """``s3://bucket/prefix/`` (or ``s3://bucket`` for the whole bucket); no version, no wildcard."""
    loc = parse_s3(text, what)
    if loc.version_id:
        raise LocationError("%s %r: a prefix cannot carry a versionId" % (what, text))
    if loc.key and not loc.key.endswith("/"):
        raise LocationError("%s %r: end the prefix with '/' so that %r does not also match %r"
                            % (what, text, loc.key, loc.key + "0/"))
    if any(c in loc.key for c in "*?") or loc.key.startswith("/"):
        raise LocationError("%s %r: the prefix must be a plain key prefix without wildcards or a leading '/'"
                            % (what, text))
    return loc
