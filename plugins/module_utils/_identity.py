# Copyright: drguard maintainers
# Apache License 2.0
"""Least-privilege IAM policies for a drill's ephemeral identity.

``build_role_policy`` generates the drill role's inline policy from the drill's own
resources; ``build_session_policy`` narrows it further for the AssumeRole session;
``validate_policy`` rejects any statement that would let a compromised validation node
write outside the drill's resources or pivot to another identity. Everything here is
pure data (no AWS call), so bad input fails before anything is created.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re

from ansible_collections.amazon.aws.plugins.module_utils.policy import compare_policies

from ansible_collections.drguard.sandbox.plugins.module_utils import _quotas
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import BUCKET_RE

POLICY_VERSION = "2012-10-17"
ROLE_PATH = "/drguard/"
ROLE_PREFIX = "drguard-"
POLICY_NAME = "drguard-drill"
REVOKE_POLICY_NAME = "drguard-revoke-sessions"
MIN_DURATION = 900
MAX_DURATION = 3600
# Plain-text limits documented by IAM / STS.
MAX_INLINE_POLICY_CHARS = _quotas.ROLE_POLICY.maximum       # IAM counts it without whitespace
MAX_SESSION_POLICY_CHARS = _quotas.SESSION_POLICY.maximum   # the plain text STS is given

# Verbs whose actions only read. An action (or an action pattern such as
# ``ec2:Describe*``) counts as read-only when its name starts with one of them.
READ_VERBS = ("Describe", "Get", "List", "Head")
# Reads that return data worth stealing - stored secrets, or credentials and tokens
# minted for another identity or service - never on a wildcard resource. Patterns
# (case-insensitive globs), so that a whole family is covered, and an action pattern
# such as ``redshift:Get*`` or ``ssm:*`` that could match one of them counts too.
SENSITIVE_READS = (
    "*:Get*Credential*",    # redshift:GetClusterCredentials, redshift-serverless:GetCredentials, sso:GetRoleCredentials
    "*:Get*Token*",         # sts:GetServiceBearerToken, ecr/codeartifact:GetAuthorizationToken, cognito GetOpenIdToken
    "*:Get*Secret*",        # secretsmanager:GetSecretValue
    "*:Get*Password*",      # ec2:GetPasswordData
    "*:Get*AccessDetails",  # lightsail:GetInstanceAccessDetails
    "ssm:GetParameter*", "glue:GetConnection*", "lambda:GetFunction", "lambda:GetFunctionConfiguration",
    "s3:GetObject", "s3:GetObjectVersion", "dynamodb:GetItem", "kms:GetParametersForImport",
)
# Actions that hand out or change identity: a drill role never gets them, on any
# resource (this is what "cannot pivot" means in policy terms).
PIVOT_ACTIONS = (
    "sts:AssumeRole", "sts:AssumeRoleWithSAML", "sts:AssumeRoleWithWebIdentity",
    "sts:GetFederationToken", "sts:GetSessionToken", "sts:TagSession", "sts:SetSourceIdentity",
    "iam:PassRole", "iam:CreateUser", "iam:CreateAccessKey", "iam:CreateLoginProfile",
    "iam:UpdateLoginProfile", "iam:CreateRole", "iam:UpdateAssumeRolePolicy",
    "iam:PutRolePolicy", "iam:PutUserPolicy", "iam:PutGroupPolicy", "iam:AttachRolePolicy",
    "iam:AttachUserPolicy", "iam:AttachGroupPolicy", "iam:CreatePolicyVersion",
    "iam:SetDefaultPolicyVersion", "iam:AddUserToGroup", "iam:CreateServiceLinkedRole",
    "iam:DeleteRolePermissionsBoundary", "iam:PutRolePermissionsBoundary",
    "iam:AddRoleToInstanceProfile", "iam:UpdateAccessKey", "iam:CreateInstanceProfile",
    "ec2:AssociateIamInstanceProfile", "ec2:ReplaceIamInstanceProfileAssociation",
    "lambda:CreateFunction", "lambda:UpdateFunctionConfiguration",
)
# EC2 reads the drill's validation needs; EC2 Describe calls support no
# resource-level permissions, so AWS requires Resource "*" for them.
EC2_DESCRIBE = (
    "ec2:DescribeVpcs", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
    "ec2:DescribeSecurityGroupRules", "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeRouteTables", "ec2:DescribeNetworkAcls", "ec2:DescribeInstances",
)

_ACTION_RE = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9*?]+$")
_ARN_RE = re.compile(r"^arn:([^:]+):([^:]+):([^:]*):([^:]*):(.+)$")
_KMS_KEY_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")
_LOG_GROUP_ARN_RE = re.compile(r"^arn:aws[a-z-]*:logs:[a-z0-9-]+:\d{12}:log-group:[A-Za-z0-9_./#-]+$")
_VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SG_RE = re.compile(r"^sg-[0-9a-f]{8,17}$")
_SECRET_PREFIX_RE = re.compile(r"^[A-Za-z0-9/_+=.@-]+$")
_RESOURCE_KEYS = {"vpc_id", "subnet_ids", "security_group_ids", "backup", "telemetry",
                  "secrets_prefix", "kms_key_arns", "log_group_arns"}
_WILDCARDS = ("*", "?")


class PolicyError(ValueError):
    """A policy (or its inputs) is not acceptable; the message says which statement and why."""


def policy_document(doc):
    """A policy document as a dict (IAM answers JSON text on some endpoints); other values as they are."""
    if isinstance(doc, str):
        try:
            return json.loads(doc)
        except ValueError:
            return doc
    return doc


def policies_differ(current, wanted) -> bool:
    """Whether two IAM policy documents mean different things (amazon.aws' ``compare_policies``).

    Statement and list order, one-element lists against scalars and dict key order do
    not count as differences.
    """
    return compare_policies(policy_document(current), policy_document(wanted))


def role_name(drill_id: str) -> str:
    return ROLE_PREFIX + drill_id


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _has_wildcard(text: str) -> bool:
    return any(w in text for w in _WILDCARDS)


def is_read_action(action: str) -> bool:
    """True when ``action`` (possibly a pattern like ``ec2:Describe*``) can only read."""
    if action == "*" or ":" not in action:
        return False
    name = action.split(":", 1)[1]
    return any(name.startswith(verb) and not _has_wildcard(name[:len(verb)]) for verb in READ_VERBS)


def _matches_any(pattern: str, names) -> list:
    regex = re.compile(fnmatch.translate(pattern.lower()))
    return [name for name in names if regex.match(name.lower())]


def _globs_intersect(a: str, b: str) -> bool:
    """True when some string matches both globs ``a`` and ``b`` (``*`` and ``?``, case-insensitive)."""
    a, b = a.lower(), b.lower()

    def closure(states):
        todo, seen = list(states), set(states)
        while todo:
            i, j = todo.pop()
            for nxt in ((i + 1, j) if i < len(a) and a[i] == "*" else None,
                        (i, j + 1) if j < len(b) and b[j] == "*" else None):
                if nxt and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    seen, todo = set(), [(0, 0)]
    while todo:
        for i, j in closure([todo.pop()]):
            if (i, j) in seen:
                continue
            seen.add((i, j))
            if i == len(a) and j == len(b):
                return True
            if i == len(a) or j == len(b):
                continue
            x, y = a[i], b[j]
            # One character consumed by both: a star stays, anything else moves on.
            if x in "*?" or y in "*?" or x == y:
                todo.append((i if x == "*" else i + 1, j if y == "*" else j + 1))
    return False


def _action_overlaps(action: str, patterns) -> list:
    """The patterns of ``patterns`` that some action matched by ``action`` also matches.

    Service and action name are compared separately (an action name never holds a
    colon), so ``ec2:Describe*`` does not overlap ``*:Get*Credential*``.
    """
    service, _sep, name = action.partition(":") if action != "*" else ("*", ":", "*")
    hits = []
    for pattern in patterns:
        p_service, _sep, p_name = pattern.partition(":")
        if _globs_intersect(service, p_service) and _globs_intersect(name, p_name):
            hits.append(pattern)
    return hits


def s3_prefix_problem(resource: str) -> str | None:
    """Why an S3 object ARN pattern reaches beyond one key prefix, or None.

    ``arn:aws:s3:::bucket/orders*`` also matches ``orders-payroll/...``: a wildcard in
    an object key must follow a ``/`` (``bucket/orders/*``).
    """
    match = _ARN_RE.match(resource or "")
    if not match or match.group(2) != "s3" or not _has_wildcard(match.group(5)):
        return None
    literal = re.split(r"[*?]", match.group(5), maxsplit=1)[0]
    if "/" in literal and not literal.endswith("/"):
        return ("its key prefix %r does not end with '/', so it also matches sibling prefixes such as %r"
                % (literal.split("/", 1)[1], literal.split("/", 1)[1] + "-other/"))
    return None


def is_specific_resource(resource: str) -> bool:
    """True when ``resource`` names one resource (or objects under one named resource).

    ``*``, ``arn:aws:s3:::*``, ``arn:aws:s3:::*-backups/x``, ``...:secret:*`` and
    ``...:role/*`` are wildcard-only; ``arn:aws:s3:::bucket/prefix/*`` and
    ``...:secret:drguard/dr-1/*`` name something.
    """
    match = _ARN_RE.match(resource or "")
    if not match:
        return False
    partition, service, region, account, rest = match.groups()
    if _has_wildcard(partition) or _has_wildcard(service) or _has_wildcard(account) or _has_wildcard(region):
        return False
    if not _has_wildcard(rest):
        return True
    literal = re.split(r"[*?]", rest, maxsplit=1)[0]
    if service == "s3":
        bucket = rest.split("/", 1)[0]
        return bool(bucket) and not _has_wildcard(bucket) and "/" in literal
    # Typed ARNs (``secret:name``, ``log-group:name``, ``key/id``): the type and at
    # least one complete literal name segment must come before any wildcard.
    complete = re.split(r"[/:]", literal)[:-1]
    return len([s for s in complete if s]) >= 2


def _statement_label(index: int, statement: dict) -> str:
    sid = statement.get("Sid") if isinstance(statement, dict) else None
    return "statement %d%s" % (index, " (Sid %r)" % sid if sid else "")


def validate_policy(doc, what: str = "policy") -> dict:
    """Return ``doc`` normalised (Statement as a list) or raise :class:`PolicyError`.

    Rejected, for every Allow statement: NotAction or NotResource; a Principal; an
    action that could hand out or change an identity (sts:AssumeRole, iam:PassRole,
    iam:Create*, ...), on any resource; a write action - anything not
    Describe/Get/List/Head-like, including ``*``, ``s3:*`` or ``s3:Put*`` - or a
    data-returning read such as secretsmanager:GetSecretValue, on ``*`` or on any
    wildcard-only resource. Deny statements only take permissions away and pass.
    """
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            raise PolicyError("%s is not valid JSON" % what) from None
    if not isinstance(doc, dict):
        raise PolicyError("%s must be a JSON object with Version and Statement" % what)
    unknown = set(doc) - {"Version", "Id", "Statement"}
    if unknown:
        raise PolicyError("%s has unknown top-level keys %s" % (what, ", ".join(sorted(unknown))))
    if doc.get("Version") != POLICY_VERSION:
        raise PolicyError("%s must have Version %r" % (what, POLICY_VERSION))
    statements = doc.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise PolicyError("%s has no Statement list" % what)
    for index, statement in enumerate(statements):
        validate_statement(statement, index, what)
    out = dict(doc)
    out["Statement"] = statements
    return out


def validate_statement(statement, index: int = 0, what: str = "policy") -> None:
    """Raise :class:`PolicyError` when one statement is unsafe (see :func:`validate_policy`)."""
    label = "%s %s" % (what, _statement_label(index, statement))
    if not isinstance(statement, dict):
        raise PolicyError("%s is not an object" % label)
    allowed_keys = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
    unknown = set(statement) - allowed_keys - {"Principal", "NotPrincipal"}
    if unknown:
        raise PolicyError("%s has unknown keys %s" % (label, ", ".join(sorted(unknown))))
    effect = statement.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError("%s must have Effect Allow or Deny, got %r" % (label, effect))
    if "Principal" in statement or "NotPrincipal" in statement:
        raise PolicyError("%s has a Principal; identity policies must not name principals" % label)
    if "Action" in statement and "NotAction" in statement:
        raise PolicyError("%s has both Action and NotAction" % label)
    if "Resource" in statement and "NotResource" in statement:
        raise PolicyError("%s has both Resource and NotResource" % label)
    if "Condition" in statement and not isinstance(statement["Condition"], dict):
        raise PolicyError("%s has a Condition that is not an object" % label)
    actions = _as_list(statement.get("Action", statement.get("NotAction")))
    resources = _as_list(statement.get("Resource", statement.get("NotResource")))
    if not actions or not all(isinstance(a, str) and (a == "*" or _ACTION_RE.match(a)) for a in actions):
        raise PolicyError("%s has missing or malformed actions %r (use service:Action)" % (label, actions))
    if not resources or not all(isinstance(r, str) and r for r in resources):
        raise PolicyError("%s has missing or malformed resources %r" % (label, resources))
    if effect == "Deny":
        return
    if "NotAction" in statement:
        raise PolicyError("%s allows NotAction, which grants every other action; list the actions instead" % label)
    if "NotResource" in statement:
        raise PolicyError("%s allows NotResource, which grants every other resource; list the resources instead"
                          % label)
    for resource in resources:
        if resource != "*" and not _ARN_RE.match(resource):
            raise PolicyError("%s has resource %r, which is neither an ARN nor '*'" % (label, resource))
    for action in actions:
        pivots = _matches_any(action, PIVOT_ACTIONS)
        if pivots:
            raise PolicyError("%s allows %r, which includes %s: a drill identity must not be able to assume, "
                              "pass or create identities" % (label, action, pivots[0]))
        if action.lower().startswith("iam:") and not is_read_action(action):
            raise PolicyError("%s allows %r, which changes IAM roles or policies: a drill identity must not be "
                              "able to change any identity, not even its own role, whose policies carry its "
                              "revocation; grant IAM reads only" % (label, action))
        sensitive = _action_overlaps(action, SENSITIVE_READS)
        if is_read_action(action) and not sensitive:
            continue
        kind = "read of credentials or secrets" if is_read_action(action) else "write action"
        for resource in resources:
            if not is_specific_resource(resource):
                raise PolicyError("%s allows %s %r on wildcard resource %r; name the drill's own resources "
                                  "(for example arn:aws:s3:::bucket/prefix/*)" % (label, kind, action, resource))
            problem = s3_prefix_problem(resource)
            if problem:
                raise PolicyError("%s allows %s %r on %r, but %s; end the prefix with '/' (for example "
                                  "arn:aws:s3:::bucket/prefix/*)" % (label, kind, action, resource, problem))


def _grant_list(value, key: str) -> list:
    grants = []
    for item in _as_list(value):
        if not isinstance(item, dict) or set(item) - {"bucket", "prefix"} or "bucket" not in item:
            raise PolicyError("resources.%s entries must be {bucket, prefix}, got %r" % (key, item))
        bucket, prefix = item["bucket"], item.get("prefix") or ""
        if not isinstance(bucket, str) or not BUCKET_RE.match(bucket):
            raise PolicyError("resources.%s bucket %r is not a valid S3 bucket name" % (key, bucket))
        if not isinstance(prefix, str) or _has_wildcard(prefix) or prefix.startswith("/"):
            raise PolicyError("resources.%s prefix %r must be a plain key prefix without wildcards" % (key, prefix))
        # A prefix names a folder: "orders" grants orders/..., never orders-payroll/...
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        grants.append((bucket, prefix))
    return grants


def _ids(value, regex, key: str) -> list:
    items = _as_list(value)
    for item in items:
        if not isinstance(item, str) or not regex.match(item):
            raise PolicyError("resources.%s value %r is not a valid id" % (key, item))
    return items


def normalize_resources(resources: dict | None) -> dict:
    """Validate the ``resources`` option and return it with every key present."""
    resources = dict(resources or {})
    unknown = set(resources) - _RESOURCE_KEYS
    if unknown:
        raise PolicyError("resources has unknown keys %s (allowed: %s)"
                          % (", ".join(sorted(unknown)), ", ".join(sorted(_RESOURCE_KEYS))))
    out = {
        "vpc_id": None, "subnet_ids": [], "security_group_ids": [], "backup": [], "telemetry": [],
        "secrets_prefix": None, "kms_key_arns": [], "log_group_arns": [],
    }
    if resources.get("vpc_id"):
        out["vpc_id"] = _ids(resources["vpc_id"], _VPC_RE, "vpc_id")[0]
    out["subnet_ids"] = _ids(resources.get("subnet_ids"), _SUBNET_RE, "subnet_ids")
    out["security_group_ids"] = _ids(resources.get("security_group_ids"), _SG_RE, "security_group_ids")
    out["backup"] = _grant_list(resources.get("backup"), "backup")
    out["telemetry"] = _grant_list(resources.get("telemetry"), "telemetry")
    prefix = resources.get("secrets_prefix")
    if prefix:
        if not isinstance(prefix, str) or not _SECRET_PREFIX_RE.match(prefix) or len(prefix.strip("/")) < 3:
            raise PolicyError("resources.secrets_prefix %r must be a literal Secrets Manager name prefix such as "
                              "drguard/<drill_id>/" % (prefix,))
        out["secrets_prefix"] = prefix
    out["kms_key_arns"] = _ids(resources.get("kms_key_arns"), _KMS_KEY_ARN_RE, "kms_key_arns")
    groups = [arn[:-2] if isinstance(arn, str) and arn.endswith(":*") else arn
              for arn in _as_list(resources.get("log_group_arns"))]
    out["log_group_arns"] = _ids(groups, _LOG_GROUP_ARN_RE, "log_group_arns")
    return out


def build_role_policy(resources: dict, partition: str, region: str, account_id: str,
                      extra_statements: list | None = None) -> dict:
    """The drill role's inline policy, generated from the drill's own resources.

    Every write names a drill resource; the only ``*`` resource is EC2 Describe
    (AWS supports nothing narrower). ``extra_statements`` are appended after
    validation. The result is validated again before it is returned (fail closed).
    """
    res = normalize_resources(resources)
    statements = []
    if res["vpc_id"] or res["subnet_ids"] or res["security_group_ids"]:
        statements.append({"Sid": "DescribeDrillNetwork", "Effect": "Allow",
                           "Action": list(EC2_DESCRIBE), "Resource": "*"})
    if res["backup"]:
        statements.append({
            "Sid": "ReadBackupObjects", "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectAttributes",
                       "s3:GetObjectRetention", "s3:GetObjectLegalHold"],
            "Resource": sorted({"arn:%s:s3:::%s/%s*" % (partition, b, p) for b, p in res["backup"]}),
        })
        by_bucket = {}
        for bucket, prefix in res["backup"]:
            by_bucket.setdefault(bucket, set()).add(prefix)
        for index, (bucket, prefixes) in enumerate(sorted(by_bucket.items())):
            statement = {"Sid": "ListBackup%d" % index, "Effect": "Allow",
                         "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
                         "Resource": "arn:%s:s3:::%s" % (partition, bucket)}
            if "" not in prefixes:
                statement["Condition"] = {"StringLike": {"s3:prefix": sorted(p + "*" for p in prefixes)}}
            statements.append(statement)
    if res["telemetry"]:
        statements.append({
            "Sid": "WriteTelemetry", "Effect": "Allow", "Action": ["s3:PutObject"],
            "Resource": sorted({"arn:%s:s3:::%s/%s*" % (partition, b, p) for b, p in res["telemetry"]}),
        })
    if res["secrets_prefix"]:
        statements.append({
            "Sid": "ReadDrillSecrets", "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
            "Resource": "arn:%s:secretsmanager:%s:%s:secret:%s*" % (partition, region, account_id,
                                                                    res["secrets_prefix"]),
        })
    if res["kms_key_arns"]:
        statements.append({"Sid": "DecryptDrillKeys", "Effect": "Allow", "Action": ["kms:Decrypt"],
                           "Resource": sorted(res["kms_key_arns"])})
    if res["log_group_arns"]:
        statements.append({
            "Sid": "WriteDrillLogs", "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": sorted({a + ":log-stream:*" for a in res["log_group_arns"]}
                               | {a + ":*" for a in res["log_group_arns"]}),
        })
    for index, statement in enumerate(_as_list(extra_statements)):
        validate_statement(statement, index, "extra_statements")
        statements.append(copy.deepcopy(statement))
    if not statements:
        raise PolicyError("resources grant nothing; give at least one of %s or extra_statements"
                          % ", ".join(sorted(_RESOURCE_KEYS)))
    doc = validate_policy({"Version": POLICY_VERSION, "Statement": statements}, "generated policy")
    try:
        _quotas.check(_quotas.ROLE_POLICY, _quotas.iam_policy_chars(doc), context="the generated role policy",
                      fix="use fewer prefixes or resources")
    except _quotas.QuotaError as exc:
        raise PolicyError(str(exc)) from None
    return doc


def _is_regional(statement: dict) -> bool:
    services = {a.split(":", 1)[0] for a in _as_list(statement.get("Action")) if ":" in a}
    return bool(services) and not services & {"s3", "iam", "sts"}


def build_session_policy(role_policy: dict, region: str) -> dict:
    """A session policy that narrows ``role_policy`` for the AssumeRole session.

    Same grants, minus the statement ids (the session limit is 2048 characters), and
    every statement additionally requires TLS (``aws:SecureTransport``) and, for
    regional services (EC2 Describe would otherwise work in every region), the drill's
    region (``aws:RequestedRegion``).
    """
    statements = []
    for statement in role_policy["Statement"]:
        if statement.get("Effect") != "Allow":
            continue
        narrowed = {k: copy.deepcopy(v) for k, v in statement.items() if k != "Sid"}
        condition = narrowed.setdefault("Condition", {})
        condition.setdefault("Bool", {})["aws:SecureTransport"] = "true"
        if _is_regional(statement):
            condition.setdefault("StringEquals", {})["aws:RequestedRegion"] = region
        statements.append(narrowed)
    doc = validate_policy({"Version": POLICY_VERSION, "Statement": statements}, "generated session policy")
    check_session_policy_size(doc)
    return doc


def check_session_policy_size(doc: dict) -> None:
    # The plain text sent is compact JSON; STS also packs it with the session tags into a binary
    # format with its own limit (PackedPolicyTooLarge), which only the AssumeRole call can tell.
    try:
        _quotas.check(_quotas.SESSION_POLICY, len(json.dumps(doc, separators=(",", ":"))),
                      context="the session policy", fix="pass a shorter session_policy or fewer resources")
    except _quotas.QuotaError as exc:
        raise PolicyError(str(exc)) from None


def trust_policy(principal_arn: str, external_id: str) -> dict:
    """Only ``principal_arn`` may assume the role, and only with ``external_id``."""
    return {"Version": POLICY_VERSION, "Statement": [{
        "Sid": "DrillController", "Effect": "Allow", "Principal": {"AWS": principal_arn},
        # Tags and SourceIdentity on AssumeRole need their own trust permissions.
        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
    }]}


def external_id_of(trust_doc) -> str | None:
    """The ``sts:ExternalId`` a trust policy written by :func:`trust_policy` requires."""
    try:
        for statement in _as_list(trust_doc.get("Statement")):
            value = statement.get("Condition", {}).get("StringEquals", {}).get("sts:ExternalId")
            if isinstance(value, str):
                return value
    except AttributeError:
        return None
    return None


def revoke_policy(now_rfc3339: str) -> dict:
    """Deny everything to sessions issued before ``now`` (the console's "revoke active sessions")."""
    return {"Version": POLICY_VERSION, "Statement": [{
        "Sid": "RevokeOlderSessions", "Effect": "Deny", "Action": "*", "Resource": "*",
        "Condition": {"DateLessThan": {"aws:TokenIssueTime": now_rfc3339}},
    }]}


def normalize_principal(caller_arn: str) -> tuple:
    """``(kind, arn-or-name)`` for a caller ARN.

    Returns ``("user", arn)``, ``("role", role_name)`` for an assumed-role session
    (resolved to the role's ARN by the caller), or raises :class:`PolicyError` for
    an account root or anything that is not one principal.
    """
    match = _ARN_RE.match(caller_arn or "")
    if not match:
        raise PolicyError("trusted principal %r is not an ARN" % (caller_arn,))
    _partition, service, _region, account, rest = match.groups()
    if _has_wildcard(caller_arn):
        raise PolicyError("trusted principal %r contains a wildcard; name exactly one principal" % (caller_arn,))
    if service == "iam" and rest == "root":
        raise PolicyError("trusted principal %r is an account root, which would trust every principal of account "
                          "%s; name one IAM user or role" % (caller_arn, account))
    if service == "iam" and rest.startswith("user/"):
        return ("user", caller_arn)
    if service == "iam" and rest.startswith("role/"):
        return ("role_arn", caller_arn)
    if service == "sts" and rest.startswith("user/"):
        # Some STS-compatible endpoints (moto) report an IAM user with an sts ARN.
        return ("user", "arn:%s:iam::%s:%s" % (_partition, account, rest))
    if service == "sts" and rest.startswith("assumed-role/"):
        parts = rest.split("/")
        if len(parts) >= 3:
            return ("role", parts[1])
    raise PolicyError("trusted principal %r is not an IAM user, role or assumed-role session" % (caller_arn,))


def evaluate(doc: dict, action: str, resource: str) -> bool:
    """Whether ``doc`` alone allows ``action`` on ``resource`` (Action/Resource matching only).

    Conditions are ignored. Used by the module to self-check the generated policy and
    by the tests; it is not an IAM policy simulator.
    """
    allowed = False
    for statement in _as_list(doc.get("Statement")):
        acts = _as_list(statement.get("Action"))
        ress = _as_list(statement.get("Resource"))
        if not (any(_matches_any(a, [action]) for a in acts)
                and any(fnmatch.fnmatchcase(resource, r) for r in ress)):
            continue
        if statement.get("Effect") == "Deny":
            return False
        allowed = True
    return allowed
