"""Policy generation and validation for the drill identity (pure Python, no emulator)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident  # noqa: E402

ACCOUNT = "123456789012"
REGION = "eu-west-1"
DRILL = "dr-20261129044000-a1b2c3"
FULL = {
    "vpc_id": "vpc-0123456789abcdef0",
    "subnet_ids": ["subnet-0123456789abcdef0"],
    "security_group_ids": ["sg-0123456789abcdef0"],
    "backup": [{"bucket": "orders-backups", "prefix": "orders-db/"}, {"bucket": "orders-backups", "prefix": "x/"}],
    "telemetry": [{"bucket": "drill-telemetry", "prefix": DRILL + "/"}],
    "secrets_prefix": "drguard/%s/" % DRILL,
    "kms_key_arns": ["arn:aws:kms:%s:%s:key/1234abcd-12ab-34cd-56ef-1234567890ab" % (REGION, ACCOUNT)],
    "log_group_arns": ["arn:aws:logs:%s:%s:log-group:/drguard/%s:*" % (REGION, ACCOUNT, DRILL)],
}


def policy(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(action, resource, **extra):
    return dict({"Effect": "Allow", "Action": action, "Resource": resource}, **extra)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_generator_has_no_wildcard_write_resources():
    doc = ident.build_role_policy(FULL, "aws", REGION, ACCOUNT)
    assert doc == ident.validate_policy(doc)
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        actions, resources = _as_list(statement["Action"]), _as_list(statement["Resource"])
        if "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions), statement
        for action in actions:
            assert "*" not in action, "generated policies list actions explicitly: %s" % action
            if not ident.is_read_action(action):
                assert all(ident.is_specific_resource(r) for r in resources), statement
    text = json.dumps(doc)
    assert "arn:aws:s3:::*" not in text and '"s3:*"' not in text and "iam:" not in text


def test_generator_grants_exactly_the_drill_resources():
    doc = ident.build_role_policy(FULL, "aws", REGION, ACCOUNT)
    secret = "arn:aws:secretsmanager:%s:%s:secret:drguard/%s/db-AbCdEf" % (REGION, ACCOUNT, DRILL)
    assert ident.evaluate(doc, "secretsmanager:GetSecretValue", secret)
    assert not ident.evaluate(doc, "secretsmanager:GetSecretValue", secret.replace(DRILL, "dr-other-1"))
    assert not ident.evaluate(doc, "secretsmanager:PutSecretValue", secret)
    assert ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::orders-backups/orders-db/part-1")
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::orders-backups/other/part-1")
    assert not ident.evaluate(doc, "s3:PutObject", "arn:aws:s3:::orders-backups/orders-db/part-1")
    assert not ident.evaluate(doc, "s3:DeleteObject", "arn:aws:s3:::orders-backups/orders-db/part-1")
    assert ident.evaluate(doc, "s3:PutObject", "arn:aws:s3:::drill-telemetry/%s/m.json" % DRILL)
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::drill-telemetry/%s/m.json" % DRILL)
    assert ident.evaluate(doc, "kms:Decrypt", FULL["kms_key_arns"][0])
    assert not ident.evaluate(doc, "kms:Encrypt", FULL["kms_key_arns"][0])
    assert ident.evaluate(doc, "ec2:DescribeVpcs", "*")
    assert not ident.evaluate(doc, "ec2:CreateInternetGateway", "*")
    assert not ident.evaluate(doc, "iam:ListRoles", "*")
    log_stream = "arn:aws:logs:%s:%s:log-group:/drguard/%s:log-stream:x" % (REGION, ACCOUNT, DRILL)
    assert ident.evaluate(doc, "logs:PutLogEvents", log_stream)
    listing = [s for s in doc["Statement"] if "s3:ListBucket" in s["Action"]]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["orders-db/*", "x/*"]}}


def test_session_policy_narrows_and_fits():
    role = ident.build_role_policy(FULL, "aws", REGION, ACCOUNT)
    session = ident.build_session_policy(role, REGION)
    assert len(json.dumps(session, separators=(",", ":"))) <= ident.MAX_SESSION_POLICY_CHARS
    assert len(session["Statement"]) == len(role["Statement"])
    for statement in session["Statement"]:
        assert statement["Condition"]["Bool"] == {"aws:SecureTransport": "true"}
        if any(a.startswith(("ec2:", "kms:", "secretsmanager:", "logs:")) for a in _as_list(statement["Action"])):
            assert statement["Condition"]["StringEquals"]["aws:RequestedRegion"] == REGION


@pytest.mark.parametrize(("statement", "needle"), [
    (allow("s3:*", "*"), "write action 's3:*' on wildcard resource '*'"),
    (allow("s3:Put*", "arn:aws:s3:::*/orders/*"), "wildcard resource"),
    (allow("s3:PutObject", "arn:aws:s3:::*-backups/orders/*"), "wildcard resource"),
    (allow("s3:PutObject", "arn:aws:s3:::*"), "wildcard resource"),
    (allow("*", "*"), "'*'"),
    (allow(["s3:GetObject", "s3:DeleteObject"], "*"), "wildcard resource"),
    (allow("secretsmanager:GetSecretValue", "*"), "read of credentials or secrets"),
    (allow("secretsmanager:PutSecretValue", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:*"),
     "wildcard resource"),
    (allow("kms:Decrypt", "arn:aws:kms:eu-west-1:123456789012:key/*"), "wildcard resource"),
    (allow("s3:PutObject", "arn:aws:s3:::bucket/*", Sid="Cross"), None),
    ({"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}, "NotAction"),
    ({"Effect": "Allow", "Action": "s3:GetObject", "NotResource": "arn:aws:s3:::x/*"}, "NotResource"),
    (allow("iam:PassRole", "arn:aws:iam::123456789012:role/admin"), "pass or create identities"),
    (allow("sts:AssumeRole", "arn:aws:iam::123456789012:role/admin"), "pass or create identities"),
    (allow("iam:*", "arn:aws:iam::123456789012:user/x"), "pass or create identities"),
    (allow("s3:PutObject", "arn:aws:s3:::bucket/*", Principal={"AWS": "*"}), "Principal"),
    (allow("s3:PutObject", "arn:aws:s3:::bucket/*", Effect="Maybe"), "Effect"),
    (allow("not an action", "*"), "malformed actions"),
    (allow("s3:PutObject", "bucket/*"), "neither an ARN"),
])
def test_validator_rejects(statement, needle):
    if needle is None:  # the control case: a scoped write is fine
        ident.validate_policy(policy(statement))
        return
    with pytest.raises(ident.PolicyError) as info:
        ident.validate_policy(policy(dict(statement, Sid=statement.get("Sid", "Bad"))))
    assert needle in str(info.value) and "Sid 'Bad'" in str(info.value)


@pytest.mark.parametrize("statement", [
    allow("ec2:Describe*", "*"),
    allow(["ec2:DescribeVpcs", "ec2:DescribeSubnets"], "*"),
    allow("s3:ListAllMyBuckets", "*"),
    allow("sts:GetCallerIdentity", "*"),
    allow("s3:PutObject", "arn:aws:s3:::telemetry/dr-1/*"),
    allow("logs:PutLogEvents", "arn:aws:logs:eu-west-1:123456789012:log-group:/drguard/dr-1:log-stream:*"),
    allow("secretsmanager:GetSecretValue", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:drguard/dr-1/*"),
    {"Effect": "Deny", "NotAction": "s3:GetObject", "NotResource": "*"},
    {"Effect": "Deny", "Action": "*", "Resource": "*"},
])
def test_validator_accepts(statement):
    ident.validate_policy(policy(statement))


def test_validator_rejects_malformed_documents():
    for doc, needle in [("{", "not valid JSON"), ({"Statement": []}, "Version"),
                        ({"Version": "2012-10-17", "Statement": []}, "no Statement"),
                        ({"Version": "2012-10-17", "Statement": [allow("s3:GetObject", "*")], "X": 1}, "unknown")]:
        with pytest.raises(ident.PolicyError) as info:
            ident.validate_policy(doc)
        assert needle in str(info.value)


def test_extra_statements_are_validated_before_generation():
    with pytest.raises(ident.PolicyError, match="extra_statements statement 0"):
        ident.build_role_policy({}, "aws", REGION, ACCOUNT, [allow("s3:*", "*")])
    doc = ident.build_role_policy({}, "aws", REGION, ACCOUNT, [allow("sqs:SendMessage",
                                                                     "arn:aws:sqs:eu-west-1:123456789012:q")])
    assert doc["Statement"][-1]["Action"] == "sqs:SendMessage"


@pytest.mark.parametrize(("resources", "needle"), [
    ({}, "grant nothing"),
    ({"nope": 1}, "unknown keys"),
    ({"backup": [{"bucket": "b*", "prefix": ""}]}, "not a valid S3 bucket"),
    ({"backup": [{"bucket": "bucket", "prefix": "a*"}]}, "without wildcards"),
    ({"secrets_prefix": "*"}, "literal Secrets Manager"),
    ({"kms_key_arns": ["arn:aws:kms:eu-west-1:123456789012:alias/x"]}, "not a valid id"),
    ({"vpc_id": "vpc-*"}, "not a valid id"),
])
def test_bad_resources(resources, needle):
    with pytest.raises(ident.PolicyError, match=needle):
        ident.build_role_policy(resources, "aws", REGION, ACCOUNT)


def test_principal_normalisation_and_trust():
    user = "arn:aws:iam::123456789012:user/ops"
    assert ident.normalize_principal(user) == ("user", user)
    assert ident.normalize_principal("arn:aws:sts::123456789012:assumed-role/awx/job-1") == ("role", "awx")
    assert ident.normalize_principal("arn:aws:sts::123456789012:user/ops") == ("user", user)
    for bad, needle in [("arn:aws:iam::123456789012:root", "account root"), ("*", "not an ARN"),
                        ("arn:aws:iam::123456789012:user/*", "wildcard"),
                        ("arn:aws:iam::123456789012:group/admins", "not an IAM user")]:
        with pytest.raises(ident.PolicyError, match=needle):
            ident.normalize_principal(bad)
    trust = ident.trust_policy("arn:aws:iam::123456789012:user/ops", "ext-123")
    assert ident.external_id_of(trust) == "ext-123"
    assert trust["Statement"][0]["Principal"] == {"AWS": "arn:aws:iam::123456789012:user/ops"}
    revoke = ident.revoke_policy("2026-11-29T05:00:00Z")
    assert revoke["Statement"][0] == {"Sid": "RevokeOlderSessions", "Effect": "Deny", "Action": "*",
                                      "Resource": "*", "Condition": {"DateLessThan": {
                                          "aws:TokenIssueTime": "2026-11-29T05:00:00Z"}}}


# ------------------------------------------------- credential vending, own role, S3 prefixes

ROLE_ARN = "arn:aws:iam::123456789012:role/drguard/drguard-%s" % DRILL


@pytest.mark.parametrize("action", [
    "redshift:GetClusterCredentials", "redshift:GetClusterCredentialsWithIAM", "redshift-serverless:GetCredentials",
    "ssm:GetParameterHistory", "ssm:GetParameter", "glue:GetConnection", "glue:GetConnections",
    "sts:GetServiceBearerToken", "ecr:GetAuthorizationToken", "codeartifact:GetAuthorizationToken",
    "sso:GetRoleCredentials", "ec2:GetPasswordData", "lambda:GetFunctionConfiguration",
    "secretsmanager:GetSecretValue", "rds-db:connect", "kms:Decrypt",
    # wildcard actions that include a credential-vending read
    "redshift:Get*", "ssm:*", "glue:GetConn*", "sso:Get*", "ssm:GetParam?ter",
])
@pytest.mark.parametrize("resource", ["*", "arn:aws:ssm:eu-west-1:123456789012:parameter/*"])
def test_validator_rejects_credential_vending_reads_on_wildcard_resources(action, resource):
    with pytest.raises(ident.PolicyError) as info:
        ident.validate_policy(policy(allow(action, resource, Sid="Vend")))
    message = str(info.value)
    assert "Sid 'Vend'" in message and repr(action) in message and repr(resource) in message
    assert "read of credentials or secrets" in message or "write action" in message, message


@pytest.mark.parametrize("action", ["redshift:DescribeClusters", "ssm:DescribeParameters", "glue:GetTables",
                                    "ecr:DescribeRepositories", "redshift:List*", "sts:GetCallerIdentity"])
def test_validator_still_accepts_plain_reads_on_wildcard_resources(action):
    ident.validate_policy(policy(allow(action, "*")))


@pytest.mark.parametrize("action", [
    "iam:DeleteRolePolicy", "iam:PutRolePolicy", "iam:DetachRolePolicy", "iam:AttachRolePolicy",
    "iam:UpdateAssumeRolePolicy", "iam:DeleteRolePermissionsBoundary", "iam:TagRole", "iam:UntagRole",
    "iam:DeleteRole", "iam:UpdateRole", "iam:DeletePolicyVersion", "iam:*RolePolicy", "iam:Delete*",
    "iam:Untag*",
])
@pytest.mark.parametrize("resource", [ROLE_ARN, "arn:aws:iam::123456789012:role/drguard/*", "*"])
def test_validator_rejects_iam_changes_even_on_the_drills_own_role(action, resource):
    with pytest.raises(ident.PolicyError) as info:
        ident.validate_policy(policy(allow(action, resource, Sid="Self")))
    message = str(info.value)
    assert "Sid 'Self'" in message and repr(action) in message
    assert "revocation" in message or "pass or create identities" in message, message


def test_validator_accepts_iam_reads_of_the_drills_own_role():
    ident.validate_policy(policy(allow(["iam:GetRole", "iam:ListRolePolicies"], ROLE_ARN)))


@pytest.mark.parametrize("resource", [
    "arn:aws:s3:::orders-backups/orders*", "arn:aws:s3:::orders-backups/orders?db/*",
    "arn:aws:s3:::orders-backups/dr/orders*", "arn:aws:s3:::orders-backups/orders-*",
])
@pytest.mark.parametrize("action", ["s3:GetObject", "s3:PutObject"])
def test_validator_rejects_s3_prefixes_that_reach_sibling_prefixes(resource, action):
    with pytest.raises(ident.PolicyError) as info:
        ident.validate_policy(policy(allow(action, resource, Sid="Prefix")))
    message = str(info.value)
    assert "Sid 'Prefix'" in message and repr(resource) in message and "end with '/'" in message, message


@pytest.mark.parametrize("resource", ["arn:aws:s3:::orders-backups/orders/*", "arn:aws:s3:::orders-backups/*",
                                      "arn:aws:s3:::orders-backups/orders/part-1"])
def test_validator_accepts_s3_grants_on_whole_prefixes(resource):
    ident.validate_policy(policy(allow("s3:GetObject", resource)))


def test_generated_prefix_without_slash_grants_the_folder_not_its_siblings():
    resources = {"backup": [{"bucket": "orders-backups", "prefix": "orders"}],
                 "telemetry": [{"bucket": "drill-telemetry", "prefix": DRILL}]}
    doc = ident.build_role_policy(resources, "aws", REGION, ACCOUNT)
    assert ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::orders-backups/orders/part-1")
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::orders-backups/orders-payroll/salaries.csv")
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::orders-backups/orders")
    assert ident.evaluate(doc, "s3:PutObject", "arn:aws:s3:::drill-telemetry/%s/m.json" % DRILL)
    assert not ident.evaluate(doc, "s3:PutObject", "arn:aws:s3:::drill-telemetry/%s-other/m.json" % DRILL)
    listing = [s for s in doc["Statement"] if "s3:ListBucket" in s["Action"]]
    assert listing[0]["Condition"] == {"StringLike": {"s3:prefix": ["orders/*"]}}
