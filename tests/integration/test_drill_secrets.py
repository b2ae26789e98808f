"""drill_secrets on the emulator: both stores, values never in the result, clean removal."""

from __future__ import annotations

import json
import os
import stat
import uuid

import pytest
from faults import throttle

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec

EXPIRES = "2099-01-01T00:00:00Z"
MASKING_KEY = "control-plane-masking-key-0123456789"
PROD_GITHUB = "ghp_" + "R3alPr0duct1onT0kenV4lue0123456789ab"
PROD_STRIPE = "sk_live_" + "51HxProdSecretValueNeverInSandbox99"


def _id(prefix="ds"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def _secret_list():
    return [
        {"name": "orders-db", "kind": "synthetic_db"},
        {"name": "payments-api", "kind": "synthetic_token"},
        {"name": "github-token", "kind": "masked", "value": PROD_GITHUB},
        {"name": "stripe-key", "kind": "masked", "value": PROD_STRIPE},
    ]


def assert_no_value_in(result, values):
    """No value, nor its base64 / URL-encoded / JSON-escaped forms, appears in the result JSON."""
    text = json.dumps(result)
    for value in values:
        for form in sec.secret_forms(value):
            if len(form) >= 6:
                assert form not in text, "a secret value (form %r...) leaked into the result" % form[:4]


@pytest.fixture
def reader_role(aws):
    name = "drguard-" + _id("reader")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {
        "AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
    return aws("iam").create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]


def test_secretsmanager_store(module_runner, aws, reader_role):
    drill_id = _id()
    args = {"drill_id": drill_id, "expires_at": EXPIRES, "store": "secretsmanager", "secrets": _secret_list(),
            "masking_key": MASKING_KEY, "reader_role_arn": reader_role}
    check = module_runner("drill_secrets", args, check_mode=True)
    assert not check.failed and check["changed"] is True, check.get("msg")
    sm, kms = aws("secretsmanager"), aws("kms")
    assert not [s for s in sm.list_secrets()["SecretList"] if s["Name"].startswith("drguard/%s/" % drill_id)]

    result = module_runner("drill_secrets", args)
    assert not result.failed, result.get("msg")
    assert result["changed"] is True
    assert result["kms_alias"] == "alias/drguard/" + drill_id
    names = {s["name"]: s for s in result["secrets"]}
    assert set(names) == {"orders-db", "payments-api", "github-token", "stripe-key"}

    values = {}
    for name, item in names.items():
        assert item["secret_id"] == "drguard/%s/%s" % (drill_id, name)
        described = sm.describe_secret(SecretId=item["secret_id"])
        assert described["KmsKeyId"] in (result["kms_key_arn"], result["kms_key_arn"].split("/")[-1])
        tags = {t["Key"]: t["Value"] for t in described["Tags"]}
        assert tags["drguard:drill-id"] == drill_id and tags["drguard:managed"] == "true"
        values[name] = sm.get_secret_value(SecretId=item["secret_id"])["SecretString"]
        policy = json.loads(sm.get_resource_policy(SecretId=item["secret_id"])["ResourcePolicy"])
        allow = [s for s in policy["Statement"] if s["Effect"] == "Allow"]
        assert [s["Principal"] for s in allow] == [{"AWS": reader_role}]
    db = json.loads(values["orders-db"])
    assert set(db) == {"username", "password"} and len(db["password"]) >= 32
    assert values["github-token"].startswith("ghp_") and len(values["github-token"]) == len(PROD_GITHUB)
    assert values["github-token"] == sec.mask(PROD_GITHUB, MASKING_KEY) != PROD_GITHUB
    assert values["stripe-key"].startswith("sk_live_") and PROD_STRIPE not in values.values()

    # Values (stored and production) never appear in the result, in any encoding.
    assert_no_value_in(result, list(values.values()) + [db["password"], PROD_GITHUB, PROD_STRIPE, MASKING_KEY])
    assert_no_value_in(check, [PROD_GITHUB, PROD_STRIPE, MASKING_KEY])

    key = kms.describe_key(KeyId=result["kms_alias"])["KeyMetadata"]
    assert key["Arn"] == result["kms_key_arn"]
    key_tags = {t["TagKey"]: t["TagValue"] for t in kms.list_resource_tags(KeyId=key["KeyId"])["Tags"]}
    assert key_tags["drguard:drill-id"] == drill_id
    key_policy = json.loads(kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    reader_statements = [s for s in key_policy["Statement"] if s["Principal"] == {"AWS": reader_role}]
    assert [s["Action"] for s in reader_statements] == ["kms:Decrypt"]

    # Idempotent: synthetic values are kept, masked ones unchanged.
    again = module_runner("drill_secrets", args)
    assert not again.failed and again["changed"] is False, again["actions"]
    assert sm.get_secret_value(SecretId="drguard/%s/orders-db" % drill_id)["SecretString"] == values["orders-db"]
    # A new production value is re-masked.
    rotated = [dict(s, value=PROD_GITHUB[:-1] + "Z") if s["name"] == "github-token" else s for s in _secret_list()]
    changed = module_runner("drill_secrets", dict(args, secrets=rotated))
    assert changed["changed"] is True and any("github-token" in a for a in changed["actions"])
    assert sm.get_secret_value(SecretId="drguard/%s/github-token" % drill_id)["SecretString"] == sec.mask(
        PROD_GITHUB[:-1] + "Z", MASKING_KEY)

    # Removal: secrets gone for good, key pending deletion, alias gone; then a no-op.
    absent = {"drill_id": drill_id, "state": "absent", "store": "secretsmanager"}
    check = module_runner("drill_secrets", absent, check_mode=True)
    assert check["changed"] is True
    assert sm.describe_secret(SecretId="drguard/%s/orders-db" % drill_id)["Name"]
    gone = module_runner("drill_secrets", absent)
    assert not gone.failed and gone["changed"] is True, gone.get("msg")
    assert not [s for s in sm.list_secrets()["SecretList"] if s["Name"].startswith("drguard/%s/" % drill_id)]
    with pytest.raises(sm.exceptions.ResourceNotFoundException):
        sm.describe_secret(SecretId="drguard/%s/orders-db" % drill_id)
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
    aliases = [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
    assert result["kms_alias"] not in aliases
    again = module_runner("drill_secrets", absent)
    assert not again.failed and again["changed"] is False


def test_tmpfs_store(module_runner):
    drill_id = _id("tf")
    directory = "/dev/shm/drguard-" + drill_id
    args = {"drill_id": drill_id, "expires_at": EXPIRES, "store": "tmpfs", "secrets": _secret_list(),
            "masking_key": MASKING_KEY}
    try:
        check = module_runner("drill_secrets", args, check_mode=True)
        assert check["changed"] is True and not os.path.exists(directory)
        result = module_runner("drill_secrets", args)
        assert not result.failed, result.get("msg")
        assert result["tmpfs_dir"] == directory
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
        assert sec.mount_fstype(directory) == "tmpfs"
        values = []
        for item in result["secrets"]:
            assert item["path"] == os.path.join(directory, item["name"])
            assert stat.S_IMODE(os.lstat(item["path"]).st_mode) == 0o600
            with open(item["path"], encoding="utf-8") as handle:
                values.append(handle.read())
        assert sec.mask(PROD_STRIPE, MASKING_KEY) in values and PROD_STRIPE not in values
        assert_no_value_in(result, values + [PROD_GITHUB, PROD_STRIPE, MASKING_KEY])
        again = module_runner("drill_secrets", args)
        assert again["changed"] is False, again["actions"]

        absent = {"drill_id": drill_id, "state": "absent", "store": "tmpfs"}
        gone = module_runner("drill_secrets", absent)
        assert not gone.failed and gone["changed"] is True
        assert not os.path.exists(directory)
        assert module_runner("drill_secrets", absent)["changed"] is False
    finally:
        if os.path.isdir(directory):
            sec.wipe_dir(directory)


def test_tmpfs_store_refuses_a_disk(module_runner, tmp_path):
    drill_id = _id("disk")
    directory = str(tmp_path / "store")
    assert sec.mount_fstype(str(tmp_path)) != "tmpfs"
    result = module_runner("drill_secrets", {"drill_id": drill_id, "expires_at": EXPIRES, "store": "tmpfs",
                                             "tmpfs_dir": directory,
                                             "secrets": [{"name": "t", "kind": "synthetic_token"}]})
    assert result.failed and "not tmpfs" in result["msg"]
    assert not os.path.exists(directory)


@pytest.mark.parametrize(("secrets", "extra", "needle"), [
    ([{"name": "a/b", "kind": "synthetic_token"}], {}, "is not valid"),
    ([{"name": "x", "kind": "masked"}], {}, "has no value"),
    ([{"name": "x", "kind": "masked", "value": PROD_GITHUB}], {}, "masking_key must be at least 16"),
    ([{"name": "x", "kind": "synthetic_token", "value": "nope-value"}], {}, "only masked secrets take a value"),
    ([{"name": "x", "kind": "synthetic_token"}] * 2, {}, "given twice"),
    ([{"name": "x", "kind": "synthetic_token"}], {"reader_role_arn": "not-an-arn"}, "not an IAM role ARN"),
])
def test_bad_input_fails_clearly(module_runner, aws, secrets, extra, needle):
    drill_id = _id("bad")
    args = dict({"drill_id": drill_id, "expires_at": EXPIRES, "secrets": secrets}, **extra)
    result = module_runner("drill_secrets", args)
    assert result.failed and needle in result["msg"], result.get("msg")
    assert PROD_GITHUB not in json.dumps(result)
    assert not [s for s in aws("secretsmanager").list_secrets()["SecretList"]
                if s["Name"].startswith("drguard/%s/" % drill_id)]


def _sm_args(drill_id, reader_role):
    return {"drill_id": drill_id, "expires_at": EXPIRES, "store": "secretsmanager", "reader_role_arn": reader_role,
            "secrets": [{"name": "api", "kind": "synthetic_token"}]}


def test_untagged_key_behind_the_alias_is_never_touched(module_runner, aws, reader_role):
    """A key someone else pointed alias/drguard/<id> at: no policy change, no deletion, a clear refusal."""
    drill_id = _id("alias")
    kms = aws("kms")
    foreign_policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "Foreign", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "kms:*", "Resource": "*"}]})
    # Tagged for another drill, so "has some drguard tags" is not enough either.
    for tags in ([], [{"TagKey": "drguard:drill-id", "TagValue": "someone-else"},
                      {"TagKey": "drguard:managed", "TagValue": "true"},
                      {"TagKey": "drguard:expires-at", "TagValue": EXPIRES}]):
        key_id = kms.create_key(Policy=foreign_policy, Tags=tags)["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName="alias/drguard/" + drill_id, TargetKeyId=key_id)
        try:
            present = module_runner("drill_secrets", _sm_args(drill_id, reader_role))
            assert present.failed and "not tagged as this drill's key" in present["msg"], present.get("msg")
            assert key_id in present["msg"] and "refusing" in present["msg"]
            assert _canon_policy(kms, key_id) == json.loads(foreign_policy)

            absent = module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent"})
            assert absent.failed and "not tagged as this drill's key" in absent["msg"], absent.get("msg")
            meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
            assert meta["KeyState"] == "Enabled", meta
            assert "alias/drguard/" + drill_id in [a["AliasName"] for a in kms.list_aliases(KeyId=key_id)["Aliases"]]
            assert not [a for a in absent["actions"] if key_id in a or "alias" in a], absent["actions"]
        finally:
            kms.delete_alias(AliasName="alias/drguard/" + drill_id)
            kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)


def _canon_policy(kms, key_id):
    return json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])


def test_untagged_secret_under_the_prefix_survives_removal(module_runner, aws, reader_role):
    """state=absent deletes only secrets tagged for this drill; a planted one under the prefix stays, reported."""
    drill_id = _id("plant")
    sm = aws("secretsmanager")
    created = module_runner("drill_secrets", _sm_args(drill_id, reader_role))
    assert not created.failed, created.get("msg")
    planted = {
        "drguard/%s/planted-untagged" % drill_id: [],
        "drguard/%s/planted-other-drill" % drill_id: [{"Key": "drguard:drill-id", "Value": "someone-else"},
                                                    {"Key": "drguard:managed", "Value": "true"}],
        "drguard/%s/planted-unmanaged" % drill_id: [{"Key": "drguard:drill-id", "Value": drill_id}],
    }
    for name, tags in planted.items():
        sm.create_secret(Name=name, SecretString="not the drill's", Tags=tags)
    try:
        gone = module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent"})
        assert not gone.failed, gone.get("msg")
        left = {s["Name"] for s in sm.list_secrets(Filters=[{"Key": "name", "Values": ["drguard/%s/" % drill_id]}])[
            "SecretList"]}
        assert left == set(planted), left
        assert {s["secret_id"] for s in gone["secrets"]} == {"drguard/%s/api" % drill_id}
        assert sorted(s["secret_id"] for s in gone["skipped"]) == sorted(planted)
        assert {s["reason"] for s in gone["skipped"]} == {"not tagged for this drill"}
        assert [a for a in gone["actions"] if a.startswith("delete secret")] == [
            "delete secret drguard/%s/api without recovery" % drill_id]
    finally:
        for name in planted:
            sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)


def throttle_first_calls(needle: str, operations):
    """The first call of each of ``operations`` whose parameters mention ``needle`` answers
    ThrottlingException, above botocore's own retries. Yields ``{operation: calls}``."""
    return throttle(*operations, code="ThrottlingException",
                    match=lambda params: needle in json.dumps(params, default=str))


def test_throttled_calls_are_retried(module_runner, aws, reader_role):
    """Every Secrets Manager and KMS call of drill_secrets retries (the listing of state=absent did not)."""
    drill_id = _id("throttle")
    present_ops = ("DescribeKey", "CreateKey", "CreateAlias", "DescribeSecret", "CreateSecret", "GetResourcePolicy",
                   "PutResourcePolicy")
    with throttle_first_calls(drill_id, present_ops) as throttled:
        created = module_runner("drill_secrets", _sm_args(drill_id, reader_role))
    assert not created.failed, created.get("msg")
    assert sorted(throttled) == sorted(present_ops)
    absent_ops = ("ListSecrets", "DescribeSecret", "DeleteSecret", "DescribeKey", "ListResourceTags",
                  "ScheduleKeyDeletion", "DeleteAlias")
    # KMS calls after DescribeKey name the key by id: the needle is the drill's or the key's.
    key_id = aws("kms").describe_key(KeyId="alias/drguard/" + drill_id)["KeyMetadata"]["KeyId"]
    with throttle_first_calls(drill_id, absent_ops) as by_drill, throttle_first_calls(key_id, absent_ops) as by_key:
        gone = module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent"})
    assert not gone.failed, gone.get("msg")
    assert sorted(set(by_drill) | set(by_key)) == sorted(absent_ops)
    assert not [s for s in aws("secretsmanager").list_secrets()["SecretList"]
                if s["Name"].startswith("drguard/%s/" % drill_id)]
