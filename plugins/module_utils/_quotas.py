# Copyright: drguard maintainers
# Apache License 2.0
"""The AWS quotas the translators must respect (docs/boundary-policy.md, "Limits").

The emulator enforces none of these; real AWS does, and a build that crosses one fails
half-way. The translators first fit within them (``_network_build`` collapses CIDRs and
merges ports), then call :func:`check` on what is left, before any AWS call that creates
something. A boundary may declare ``quotas`` for an account whose adjustable quotas were
raised (:func:`parse_quotas`), never above AWS's hard maximum.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


class QuotaError(ValueError):
    """What the drill needs is over an AWS quota; the message names the quota and how to fix it."""


@dataclass(frozen=True)
class Limit:
    key: str            # the drill_boundary.quotas key (adjustable limits only) or a plain name
    what: str           # "network ACL entries per direction"
    default: int        # AWS's default
    maximum: int        # the most AWS allows (== default when not adjustable)
    quota: str          # the AWS quota name (Service Quotas, or the documentation's name)
    code: str = ""      # the Service Quotas code, when there is one
    unit: str = ""

    @property
    def adjustable(self) -> bool:
        return self.maximum > self.default


# Amazon VPC quotas (Amazon VPC User Guide, "Amazon VPC quotas").
NACL_RULES = Limit("nacl_rules_per_direction", "network ACL entries per direction", 20, 40,
                   "Rules per network ACL", "L-2AEEBF1A")
# Rules per security group x security groups per network interface may not exceed 1,000.
SG_RULES = Limit("sg_rules_per_direction", "rules per security group per direction", 60, 1000,
                 "Inbound or outbound rules per security group", "L-0EA8095F")
# IAM and AWS STS quotas (IAM User Guide, "IAM and AWS STS quotas").
ROLE_POLICY = Limit("role_policy", "characters of inline role policy (whitespace not counted)", 10240, 10240,
                    "Role policy size")
SESSION_POLICY = Limit("session_policy", "characters of plain-text session policy", 2048, 2048,
                       "Session policy size")
ROLE_NAME = Limit("role_name", "characters of IAM role name", 64, 64, "Role name length")
ROLE_PATH = Limit("role_path", "characters of IAM path", 512, 512, "Path length")
# Control access to VPC endpoints using endpoint policies (AWS PrivateLink guide).
ENDPOINT_POLICY = Limit("endpoint_policy", "characters of VPC endpoint policy (whitespace counted)", 20480, 20480,
                        "VPC endpoint policy size")
# Tagging AWS resources (tag restrictions), CloudWatch Logs and EC2 naming limits.
TAGS = Limit("tags", "tags per resource", 50, 50, "Tags per resource")
TAG_KEY = Limit("tag_key", "characters of tag key", 128, 128, "Tag key length")
TAG_VALUE = Limit("tag_value", "characters of tag value", 256, 256, "Tag value length")
LOG_GROUP_NAME = Limit("log_group_name", "characters of log group name", 512, 512, "Log group name length")
SG_NAME = Limit("sg_name", "characters of security group name", 255, 255, "Security group name length")
SECRET_NAME = Limit("secret_name", "characters of secret name", 512, 512, "Secret name length")

ADJUSTABLE = {limit.key: limit for limit in (NACL_RULES, SG_RULES)}


def parse_quotas(raw) -> dict:
    """``drill_boundary.quotas`` -> ``{key: raised value}``; raises QuotaError naming the key."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise QuotaError("drill_boundary.quotas: expected a mapping of %s to the raised quota"
                         % " / ".join(sorted(ADJUSTABLE)))
    out = {}
    for key, value in raw.items():
        limit = ADJUSTABLE.get(key)
        if limit is None:
            raise QuotaError("drill_boundary.quotas: unknown key %r; allowed: %s"
                             % (key, ", ".join(sorted(ADJUSTABLE))))
        if isinstance(value, bool) or not isinstance(value, int) or not limit.default <= value <= limit.maximum:
            raise QuotaError("drill_boundary.quotas.%s: %r must be a whole number from %d (AWS's default) to %d "
                             "(the most quota '%s' can be raised to)" % (key, value, limit.default, limit.maximum,
                                                                         limit.quota))
        out[key] = value
    return out


def allowed(limit: Limit, quotas: dict | None = None) -> int:
    """What the account allows for ``limit``: the declared raised quota, else AWS's default."""
    return (quotas or {}).get(limit.key, limit.default)


def check(limit: Limit, needed: int, quotas: dict | None = None, *, context: str = "", fix: str = "") -> None:
    """Raise QuotaError when ``needed`` is over what the account allows for ``limit``."""
    have = allowed(limit, quotas)
    if needed <= have:
        return
    head = "%s needs %d %s" % (context or "the drill", needed, limit.what)
    quota = "quota '%s'%s" % (limit.quota, " (%s)" % limit.code if limit.code else "")
    if limit.adjustable and needed <= limit.maximum:
        msg = ("%s; AWS allows %d %s (%s, up to %d): raise the quota and set drill_boundary.quotas.%s: %d"
               % (head, have, "by default" if have == limit.default else "as declared", quota, limit.maximum,
                  limit.key, min(limit.maximum, needed)))
        if fix:
            msg += ", or " + fix
    elif limit.adjustable:
        msg = "%s; AWS allows %d%s and at most %d (%s, its hard maximum)" % (
            head, have, " by default" if have == limit.default else " as declared", limit.maximum, quota)
    else:
        msg = "%s; AWS allows at most %d (%s, not adjustable)" % (head, have, quota)
    if fix and not (limit.adjustable and needed <= limit.maximum):
        msg += ": " + fix
    raise QuotaError(msg)


_WS = re.compile(r"\s+")


def iam_policy_chars(doc) -> int:
    """A policy's size as IAM counts it: the JSON text without whitespace outside strings."""
    text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    try:
        return len(json.dumps(json.loads(text), separators=(",", ":")))
    except ValueError:
        return len(_WS.sub("", text))


def check_tags(tags: dict, context: str) -> None:
    """Tags per resource and key/value lengths (the drill's own tags plus the Name tag)."""
    check(TAGS, len(tags), context=context, fix="drop some tags")
    for key, value in tags.items():
        check(TAG_KEY, len(str(key)), context="%s tag %r" % (context, str(key)[:40]), fix="shorten the key")
        check(TAG_VALUE, len(str(value)), context="%s tag %r" % (context, str(key)[:40]), fix="shorten the value")


def check_name(limit: Limit, name: str, context: str, fix: str = "use a shorter drill id") -> None:
    check(limit, len(name), context="%s %r" % (context, name[:80]), fix=fix)
