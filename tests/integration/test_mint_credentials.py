"""mint_credentials against a moto server of the test's own, with IAM enforcement on.

The controller is an admin IAM user created before enforcement; the minted session
credentials must be able to do what the drill needs and be denied everything else.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from botocore.exceptions import ClientError

from emulator import child_env

from conftest import REGION, run_module
from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time

EXPIRES = "2099-01-01T00:00:00Z"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _id(prefix="mc"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


class Env:
    """A fresh emulator with an admin controller user and the drill's resources."""

    def __init__(self, emu):
        self.emu = emu
        boot = self.client("iam", "testing", "testing")
        self.admin = "admin-%s" % uuid.uuid4().hex[:6]
        boot.create_user(UserName=self.admin)
        boot.put_user_policy(UserName=self.admin, PolicyName="admin", PolicyDocument=json.dumps(ADMIN_POLICY))
        key = boot.create_access_key(UserName=self.admin)["AccessKey"]
        self.key = (key["AccessKeyId"], key["SecretAccessKey"])
        self.admin_arn = boot.get_user(UserName=self.admin)["User"]["Arn"]
        emu.enforce_iam()

    def client(self, service, key_id=None, secret=None, token=None):
        if key_id is None:
            key_id, secret = self.key
        return self.emu.client(service, key_id, secret, token)

    def session_client(self, service, creds):
        return self.client(service, creds["access_key_id"], creds["secret_access_key"], creds["session_token"])

    def run(self, args, check_mode=False):
        args = dict(args, access_key=self.key[0], secret_key=self.key[1])
        return run_module("mint_credentials", args, check_mode=check_mode)

    def role_names(self):
        return sorted(r["RoleName"] for r in self.client("iam").list_roles()["Roles"])


@pytest.fixture
def env(fresh_emulator, monkeypatch):
    for key, value in child_env(fresh_emulator.url, {}).items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return Env(fresh_emulator)


@pytest.fixture
def drill(env):
    """The drill's own resources: a VPC, a backup bucket with an object, a secret; plus foreign ones."""
    drill_id = _id()
    ec2, s3 = env.client("ec2"), env.client("s3")
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    backup, other = "bk-" + drill_id, "other-" + drill_id
    for bucket in (backup, other):
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="orders/part-0001", Body=b"row")
    env.client("secretsmanager").create_secret(Name="drguard/%s/db" % drill_id, SecretString="synthetic")
    return {
        "drill_id": drill_id, "vpc": vpc, "backup": backup, "other": other,
        "args": {"drill_id": drill_id, "expires_at": EXPIRES, "resources": {
            "vpc_id": vpc, "backup": [{"bucket": backup, "prefix": "orders/"}],
            "secrets_prefix": "drguard/%s/" % drill_id}},
    }


def denied(call):
    with pytest.raises(ClientError) as info:
        call()
    code = info.value.response["Error"]["Code"]
    assert code in ("AccessDenied", "403", "AccessDeniedException"), info.value.response
    return code


def test_minted_credentials_allow_only_the_drill(env, drill):
    first = env.run(drill["args"])
    assert not first.failed, first.get("msg")
    assert first["changed"] is True
    creds = first["credentials"]
    assert set(creds) == {"access_key_id", "secret_access_key", "session_token"}
    assert first["role_name"] == "drguard-" + drill["drill_id"]
    assert first["role_arn"].endswith(":role/drguard/drguard-" + drill["drill_id"])
    assert first["trusted_principal_arn"] == env.admin_arn
    assert first["expiration"].endswith("Z")

    # What the drill needs.
    s3 = env.session_client("s3", creds)
    assert s3.get_object(Bucket=drill["backup"], Key="orders/part-0001")["Body"].read() == b"row"
    vpcs = env.session_client("ec2", creds).describe_vpcs()["Vpcs"]
    assert drill["vpc"] in {v["VpcId"] for v in vpcs}
    who = env.session_client("sts", creds).get_caller_identity()["Arn"]
    assert ":assumed-role/drguard-%s/drguard-%s" % (drill["drill_id"], drill["drill_id"]) in who
    # moto authorizes Secrets Manager against Resource "*", so the scoped grant is
    # checked on the policy itself (see docs/identity.md).
    secret_arn = "arn:aws:secretsmanager:%s:123456789012:secret:drguard/%s/db-AbCdEf" % (REGION, drill["drill_id"])
    assert ident.evaluate(first["policy"], "secretsmanager:GetSecretValue", secret_arn)
    assert not ident.evaluate(first["policy"], "secretsmanager:GetSecretValue",
                              secret_arn.replace(drill["drill_id"], "someone-else"))

    # Everything else is denied.
    denied(lambda: s3.get_object(Bucket=drill["other"], Key="orders/part-0001"))
    denied(lambda: s3.put_object(Bucket=drill["backup"], Key="orders/evil", Body=b"x"))
    denied(lambda: s3.delete_object(Bucket=drill["backup"], Key="orders/part-0001"))
    iam = env.session_client("iam", creds)
    denied(iam.list_roles)
    denied(lambda: iam.create_user(UserName="pivot-" + drill["drill_id"]))
    denied(lambda: env.session_client("ec2", creds).create_internet_gateway())
    denied(lambda: env.session_client("sts", creds).assume_role(
        RoleArn=first["role_arn"], RoleSessionName="pivot"))
    assert s3.get_object(Bucket=drill["backup"], Key="orders/part-0001")["Body"].read() == b"row"

    # Role shape: path, tags, trust policy with exactly one principal and an external id.
    role = env.client("iam").get_role(RoleName=first["role_name"])["Role"]
    assert role["Path"] == "/drguard/" and role["MaxSessionDuration"] >= 900
    tags = {t["Key"]: t["Value"] for t in env.client("iam").list_role_tags(RoleName=first["role_name"])["Tags"]}
    assert tags == {"drguard:managed": "true", "drguard:drill-id": drill["drill_id"], "drguard:expires-at": EXPIRES}
    trust = role["AssumeRolePolicyDocument"]
    statement = trust["Statement"][0]
    assert statement["Principal"] == {"AWS": env.admin_arn}
    assert statement["Condition"]["StringEquals"]["sts:ExternalId"]
    assert statement["Condition"]["StringEquals"]["sts:ExternalId"] not in json.dumps(first)

    # Only the trusted principal, and only with the external id, can assume the role.
    external_id = statement["Condition"]["StringEquals"]["sts:ExternalId"]
    admin_sts = env.client("sts")
    # (moto lets a request WITHOUT ExternalId through a StringEquals condition; AWS does not.)
    denied(lambda: admin_sts.assume_role(RoleArn=first["role_arn"], RoleSessionName="wrong-external-id",
                                         ExternalId=external_id + "x"))
    boot = env.client("iam")
    boot.create_user(UserName="other-" + drill["drill_id"])
    boot.put_user_policy(UserName="other-" + drill["drill_id"], PolicyName="admin",
                         PolicyDocument=json.dumps(ADMIN_POLICY))
    other = boot.create_access_key(UserName="other-" + drill["drill_id"])["AccessKey"]
    other_sts = env.client("sts", other["AccessKeyId"], other["SecretAccessKey"])
    denied(lambda: other_sts.assume_role(RoleArn=first["role_arn"], RoleSessionName="other-admin",
                                         ExternalId=external_id))

    # Idempotent: same role and policy, fresh credentials, nothing changed.
    second = env.run(drill["args"])
    assert not second.failed, second.get("msg")
    assert second["changed"] is False, second["actions"]
    assert second["policy"] == first["policy"]
    assert second["credentials"]["access_key_id"] != creds["access_key_id"]
    assert env.client("iam").get_role(RoleName=first["role_name"])["Role"]["AssumeRolePolicyDocument"] == trust
    check = env.run(drill["args"], check_mode=True)
    assert check["changed"] is False and "credentials" not in check

    # A wider policy put on the role by hand is taken away again.
    env.client("iam").put_role_policy(RoleName=first["role_name"], PolicyName="sneaky",
                                      PolicyDocument=json.dumps(ADMIN_POLICY))
    healed = env.run(drill["args"])
    assert healed["changed"] is True and "delete foreign inline policy sneaky" in healed["actions"]
    assert env.client("iam").list_role_policies(RoleName=first["role_name"])["PolicyNames"] == [ident.POLICY_NAME]


def test_revoked_sessions_are_denied_everything(env, drill):
    minted = env.run(drill["args"])
    assert not minted.failed, minted.get("msg")
    s3 = env.session_client("s3", minted["credentials"])
    assert s3.get_object(Bucket=drill["backup"], Key="orders/part-0001")["Body"].read() == b"row"

    check = env.run({"drill_id": drill["drill_id"], "state": "revoked"}, check_mode=True)
    assert check["changed"] is True
    assert s3.get_object(Bucket=drill["backup"], Key="orders/part-0001")["Body"].read() == b"row"

    revoked = env.run({"drill_id": drill["drill_id"], "state": "revoked"})
    assert not revoked.failed and revoked["changed"] is True
    denied(lambda: s3.get_object(Bucket=drill["backup"], Key="orders/part-0001"))
    denied(lambda: env.session_client("ec2", minted["credentials"]).describe_vpcs())
    doc = env.client("iam").get_role_policy(RoleName=minted["role_name"],
                                            PolicyName=ident.REVOKE_POLICY_NAME)["PolicyDocument"]
    assert doc["Statement"][0]["Effect"] == "Deny" and doc["Statement"][0]["Action"] == "*"
    assert doc["Statement"][0]["Condition"] == {"DateLessThan": {"aws:TokenIssueTime": revoked["revoked_at"]}}
    # On AWS the condition covers the old session: it was issued before revoked_at.
    issued = parse_time(minted["expiration"]) - timedelta(seconds=900)
    assert issued < parse_time(revoked["revoked_at"])

    missing = env.run({"drill_id": _id("gone"), "state": "revoked"})
    assert not missing.failed and missing["changed"] is False


BAD_INPUTS = [
    ({"duration_seconds": 899}, "duration_seconds must be between 900 and 3600"),
    ({"duration_seconds": 3601}, "duration_seconds must be between 900 and 3600"),
    ({"trusted_principal_arn": "arn:aws:iam::123456789012:user/nobody-here"}, "cannot be resolved"),
    ({"trusted_principal_arn": "arn:aws:iam::123456789012:root"}, "account root"),
    ({"extra_statements": [{"Sid": "Wide", "Effect": "Allow", "Action": "s3:*", "Resource": "*"}]},
     "Sid 'Wide'"),
    ({"extra_statements": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*/x"}]},
     "wildcard resource"),
    ({"extra_statements": [{"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}]}, "NotAction"),
    ({"extra_statements": [{"Effect": "Allow", "Action": "iam:PassRole",
                            "Resource": "arn:aws:iam::123456789012:role/x"}]}, "pass or create identities"),
    ({"session_policy": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*",
                                                                  "Resource": "*"}]}}, "session_policy"),
    ({"resources": {"backup": [{"bucket": "Bad_Bucket"}]}}, "not a valid S3 bucket name"),
    ({"expires_at": "tomorrow"}, "RFC 3339"),
]


def test_bad_input_fails_clearly_and_creates_nothing(env, drill):
    before = env.role_names()
    for override, needle in BAD_INPUTS:
        result = env.run(dict(drill["args"], **override))
        assert result.failed, override
        assert needle in result["msg"], (override, result["msg"])
        assert "credentials" not in result
    assert env.role_names() == before
    missing_expiry = env.run({"drill_id": drill["drill_id"], "resources": drill["args"]["resources"]})
    assert missing_expiry.failed and "expires_at is required" in missing_expiry["msg"]
    assert env.role_names() == before


def test_absent_removes_role_and_policies(env, drill):
    check = env.run(drill["args"], check_mode=True)
    assert check["changed"] is True and "credentials" not in check
    assert "drguard-" + drill["drill_id"] not in env.role_names()

    minted = env.run(drill["args"])
    assert not minted.failed, minted.get("msg")
    iam = env.client("iam")
    managed = iam.create_policy(PolicyName="extra-" + drill["drill_id"],
                                PolicyDocument=json.dumps(ADMIN_POLICY))["Policy"]["Arn"]
    iam.attach_role_policy(RoleName=minted["role_name"], PolicyArn=managed)
    iam.create_instance_profile(InstanceProfileName="ip-" + drill["drill_id"])
    iam.add_role_to_instance_profile(InstanceProfileName="ip-" + drill["drill_id"], RoleName=minted["role_name"])
    assert env.run({"drill_id": drill["drill_id"], "state": "revoked"})["changed"] is True

    check = env.run({"drill_id": drill["drill_id"], "state": "absent"}, check_mode=True)
    assert check["changed"] is True and minted["role_name"] in env.role_names()
    gone = env.run({"drill_id": drill["drill_id"], "state": "absent"})
    assert not gone.failed and gone["changed"] is True, gone.get("msg")
    assert minted["role_name"] not in env.role_names()
    with pytest.raises(ClientError):
        iam.list_role_policies(RoleName=minted["role_name"])
    profile = iam.get_instance_profile(InstanceProfileName="ip-" + drill["drill_id"])["InstanceProfile"]
    assert profile["Roles"] == []
    again = env.run({"drill_id": drill["drill_id"], "state": "absent"})
    assert not again.failed and again["changed"] is False


def test_foreign_role_with_the_same_name_is_refused(env):
    drill_id = _id("foreign")
    iam = env.client("iam")
    iam.create_role(RoleName="drguard-" + drill_id, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))
    for state in ("present", "revoked", "absent"):
        result = env.run({"drill_id": drill_id, "state": state, "expires_at": EXPIRES,
                          "resources": {"secrets_prefix": "drguard/%s/" % drill_id}})
        assert result.failed and "is not this drill's" in result["msg"], result
    assert iam.get_role(RoleName="drguard-" + drill_id)["Role"]["RoleName"] == "drguard-" + drill_id


def test_diff_mode_shows_the_policy_each_state_changes(env, drill):
    """With --diff: present shows drguard-drill, revoked the revocation, absent the drill policy going away."""
    diff = {"_ansible_diff": True}
    check = env.run(dict(drill["args"], **diff), check_mode=True)
    assert not check.failed, check.get("msg")
    assert check["diff"] == {"before": {}, "after": check["policy"]}

    minted = env.run(dict(drill["args"], **diff))
    assert not minted.failed, minted.get("msg")
    assert minted["diff"] == {"before": {}, "after": minted["policy"]}
    again = env.run(dict(drill["args"], **diff))
    assert again["changed"] is False and again["diff"]["after"] == minted["policy"]
    assert again["diff"]["before"]["Statement"] == minted["policy"]["Statement"]
    assert "diff" not in env.run(drill["args"]), "no diff unless asked for"
    # Neither the credentials nor the external id ever reach the diff.
    external_id = env.client("iam").get_role(RoleName=minted["role_name"])["Role"][
        "AssumeRolePolicyDocument"]["Statement"][0]["Condition"]["StringEquals"]["sts:ExternalId"]
    assert external_id not in json.dumps(minted["diff"])

    revoked = env.run({"drill_id": drill["drill_id"], "state": "revoked", **diff})
    assert not revoked.failed and revoked["diff"]["before"] == {}
    assert revoked["diff"]["after"] == ident.revoke_policy(revoked["revoked_at"])
    later = env.run({"drill_id": drill["drill_id"], "state": "revoked", **diff}, check_mode=True)
    assert later["diff"]["before"] == revoked["diff"]["after"]
    assert later["diff"]["after"] == ident.revoke_policy(later["revoked_at"])

    gone = env.run({"drill_id": drill["drill_id"], "state": "absent", **diff})
    assert not gone.failed and gone["changed"] is True
    assert gone["diff"]["after"] == {}
    assert gone["diff"]["before"]["Statement"] == minted["policy"]["Statement"]
    missing = env.run({"drill_id": drill["drill_id"], "state": "absent", **diff})
    assert missing["changed"] is False and missing["diff"] == {"before": {}, "after": {}}
