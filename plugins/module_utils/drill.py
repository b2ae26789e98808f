# Copyright: drguard maintainers
# Apache License 2.0
"""Drill identity and the tag contract (docs/teardown.md, docs/architecture.md).

Every resource a drill creates carries three tags::

    drguard:managed    = "true"
    drguard:drill-id   = <drill id>
    drguard:expires-at = <RFC 3339 UTC>

Teardown finds a drill's resources by ``drguard:drill-id``; the reaper finds every
``drguard:managed`` resource whose ``drguard:expires-at`` is in the past. Neither deletes
anything whose tag set is incomplete or malformed (:func:`tag_problem`).
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from datetime import timedelta
from datetime import UTC

from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_specifications

TAG_MANAGED = "drguard:managed"
TAG_DRILL_ID = "drguard:drill-id"
TAG_EXPIRES_AT = "drguard:expires-at"

# Lowercase letters, digits and hyphens, so the id fits S3, IAM, KMS alias and
# log group names alike. Generated ids look like ``dr-20261129044000-a1b2c3``.
DRILL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,38}[a-z0-9]$")
# RFC 3339 date-time (section 5.6), the only form an expiry tag may take.
RFC3339_RE = re.compile(r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")


class DrillError(ValueError):
    """Bad drill input; the message says what was wrong and what to do."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_drill_id(now: datetime | None = None) -> str:
    """A fresh, unique drill id: ``dr-<UTC yyyymmddhhmmss>-<6 hex>``."""
    now = now or utcnow()
    return "dr-%s-%s" % (now.strftime("%Y%m%d%H%M%S"), secrets.token_hex(3))


def validate_drill_id(drill_id: str) -> str:
    """Return ``drill_id`` if it is usable in every resource name, else raise DrillError."""
    if not isinstance(drill_id, str) or not DRILL_ID_RE.fullmatch(drill_id):
        raise DrillError(
            "drill_id %r is not valid: use 4-40 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit" % (drill_id,))
    return drill_id


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix and whole seconds."""
    if when.tzinfo is None:
        raise DrillError("timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 timestamp; a value without a zone is an error (fail closed)."""
    if not isinstance(value, str):
        raise DrillError("timestamp %r is not a string" % (value,))
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise DrillError("timestamp %r is not RFC 3339" % (value,)) from None
    if parsed.tzinfo is None:
        raise DrillError("timestamp %r has no time zone; use RFC 3339 with Z or an offset" % (value,))
    return parsed.astimezone(UTC)


def expires_at(ttl_seconds: int, now: datetime | None = None) -> str:
    if int(ttl_seconds) <= 0:
        raise DrillError("ttl must be a positive number of seconds, got %r" % (ttl_seconds,))
    return format_time((now or utcnow()) + timedelta(seconds=int(ttl_seconds)))


def drill_tags(drill_id: str, expires: str, extra: dict | None = None) -> dict:
    """The contract tags for ``drill_id`` (plus ``extra``, which cannot override them)."""
    validate_drill_id(drill_id)
    parse_time(expires)
    tags = dict(extra or {})
    tags.update({TAG_MANAGED: "true", TAG_DRILL_ID: drill_id, TAG_EXPIRES_AT: expires})
    return tags


def tag_problem(tags: dict, drill_id: str | None = None) -> str | None:
    """Why ``tags`` are not a complete, well-formed drguard tag set (of ``drill_id`` when given); None if they are.

    Complete means ``drguard:managed=true``, a valid ``drguard:drill-id`` and an RFC 3339
    ``drguard:expires-at`` with a zone. Deletion requires it: a resource that proves less is
    reported, never deleted.
    """
    if tags.get(TAG_MANAGED) != "true":
        return "tag %s is %s" % (TAG_MANAGED, "missing" if TAG_MANAGED not in tags
                                 else "%r, not 'true'" % (tags[TAG_MANAGED],))
    owner = tags.get(TAG_DRILL_ID)
    if owner is None:
        return "tag %s is missing" % TAG_DRILL_ID
    try:
        validate_drill_id(owner)
    except DrillError:
        return "tag %s %r is not a valid drill id" % (TAG_DRILL_ID, owner)
    if drill_id is not None and owner != drill_id:
        return "tag %s is %r, not %r" % (TAG_DRILL_ID, owner, drill_id)
    if expiry_of(tags) is None:
        if TAG_EXPIRES_AT not in tags:
            return "tag %s is missing" % TAG_EXPIRES_AT
        return "tag %s %r is not an RFC 3339 time with a zone" % (TAG_EXPIRES_AT, tags[TAG_EXPIRES_AT])
    return None


def expiry_of(tags: dict) -> datetime | None:
    """The resource's ``drguard:expires-at`` when it is a well-formed RFC 3339 time, else None."""
    value = tags.get(TAG_EXPIRES_AT)
    if not isinstance(value, str) or not RFC3339_RE.fullmatch(value):
        return None
    try:
        return parse_time(value)
    except DrillError:
        return None  # matches the pattern but is no date (month 13, ...)


def is_expired(tags: dict, now: datetime | None = None) -> bool:
    """True when ``tags`` are a complete drguard tag set whose ``drguard:expires-at`` is at or before ``now``.

    A missing or unreadable expiry (or drill id) is *not* expired: the reaper reports such a
    resource instead of deleting it, because nothing proves it is a drill's.
    """
    if tag_problem(tags) is not None:
        return False
    return expiry_of(tags) <= (now or utcnow())


def ec2_tag_specs(resource_type: str, tags: dict, name: str | None = None) -> list:
    """EC2 ``TagSpecifications`` so a resource is tagged in the call that creates it."""
    all_tags = dict(tags)
    if name:
        all_tags["Name"] = name
    return boto3_tag_specifications(dict(sorted(all_tags.items())), [resource_type])
