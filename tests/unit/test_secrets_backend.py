"""The drill_secrets and secret_exec backends without a module: one error type, bad input first, policies, tmpfs."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _secret_exec as sx  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import SecretError  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import Secrets  # noqa: E402

EXPIRES = "2099-01-01T00:00:00Z"
READER = "arn:aws:iam::123456789012:role/drguard-reader"
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MASKING_KEY = "control-plane-masking-key-0123456789"


def _drill():
    return "ut-" + uuid.uuid4().hex[:10]


def _params(drill, **override):
    params = {"drill_id": drill, "state": "present", "expires_at": EXPIRES, "store": "secretsmanager",
              "secrets": [], "masking_key": None, "reader_role_arn": READER, "tmpfs_dir": None}
    params.update(override)
    return params


def _error(code, operation):
    return ClientError({"Error": {"Code": code, "Message": "injected"}}, operation)


class NoAWS:
    """A client that must never be used: validation happens before any AWS call."""

    def __init__(self, service):
        self.service = service

    def __getattr__(self, name):
        raise AssertionError("%s:%s was called before the input was validated" % (self.service, name))


class FakeKMS:
    """Just enough KMS for the key logic: one key (or none) behind the alias, calls recorded."""

    def __init__(self, drill_id, *, tags=None, policy=None, create_failures=0):
        self.drill_id = drill_id
        self.key = None
        if tags is not None:
            self.key = {"KeyId": KEY_ARN.rsplit("/", 1)[-1], "Arn": KEY_ARN, "KeyState": "Enabled"}
        self.tags = tags or []
        self.policy = policy
        self.create_failures = create_failures
        self.calls = []

    def can_paginate(self, _op):
        return False

    def describe_key(self, KeyId):  # noqa: N803 - boto3's parameter names
        if self.key is None:
            raise _error("NotFoundException", "DescribeKey")
        return {"KeyMetadata": self.key}

    def list_resource_tags(self, KeyId):  # noqa: N803
        return {"Tags": self.tags, "Truncated": False}

    def get_key_policy(self, KeyId, PolicyName):  # noqa: N803
        return {"Policy": json.dumps(self.policy)}

    def put_key_policy(self, **kwargs):
        self.calls.append(("put_key_policy", kwargs))

    def create_key(self, **kwargs):
        self.calls.append(("create_key", kwargs))
        if self.create_failures:
            self.create_failures -= 1
            raise _error("MalformedPolicyDocumentException", "CreateKey")
        return {"KeyMetadata": {"KeyId": "new-key", "Arn": KEY_ARN}}

    def create_alias(self, **kwargs):
        self.calls.append(("create_alias", kwargs))

    def schedule_key_deletion(self, **kwargs):
        self.calls.append(("schedule_key_deletion", kwargs))

    def delete_alias(self, **kwargs):
        self.calls.append(("delete_alias", kwargs))


class FakeSM:
    """A Secrets Manager with no secrets, or one whose listing is denied."""

    def __init__(self, list_error=None):
        self.list_error = list_error

    def can_paginate(self, _op):
        return False

    def list_secrets(self, **_kwargs):
        if self.list_error:
            raise _error(self.list_error, "ListSecrets")
        return {"SecretList": []}


def _factory(**clients):
    return lambda service: clients[service]


def _own_tags(drill_id):
    return [{"TagKey": "drguard:managed", "TagValue": "true"}, {"TagKey": "drguard:drill-id", "TagValue": drill_id},
            {"TagKey": "drguard:expires-at", "TagValue": EXPIRES}]


# ---------------------------------------------------------------- drill_secrets: input


@pytest.mark.parametrize(("override", "region", "needle"), [
    ({"drill_id": "Not A Drill"}, "eu-west-1", "drill_id 'Not A Drill' is not valid"),
    ({"expires_at": None}, "eu-west-1", "expires_at is required with state=present"),
    ({"expires_at": "tomorrow"}, "eu-west-1", "RFC 3339"),
    ({"secrets": [{"name": "a/b", "kind": "synthetic_token"}]}, "eu-west-1", "is not valid"),
    ({"secrets": [{"name": "x", "kind": "synthetic_token"}] * 2}, "eu-west-1", "given twice"),
    ({"secrets": [{"name": "x", "kind": "masked"}]}, "eu-west-1", "has no value"),
    ({"secrets": [{"name": "x", "kind": "masked", "value": "ghp_" + "a" * 36}]}, "eu-west-1",
     "masking_key must be at least 16"),
    ({"secrets": [{"name": "x", "kind": "synthetic_token", "value": "v"}]}, "eu-west-1",
     "only masked secrets take a value"),
    ({"reader_role_arn": "not-an-arn"}, "eu-west-1", "not an IAM role ARN"),
    ({}, None, "no AWS region; set region or AWS_REGION"),
])
def test_bad_input_raises_secret_error_before_any_aws_call(override, region, needle):
    store = Secrets(_params(_drill(), **override), NoAWS, region=region)
    with pytest.raises(SecretError) as info:
        store.run()
    assert needle in info.value.message
    assert info.value.exception is None  # not an AWS error: main() reports it with fail_json
    assert store.actions == [] and store.changed is False


def test_masked_values_are_hidden_before_anything_is_stored():
    hidden = []
    store = Secrets(_params(_drill(), masking_key=MASKING_KEY, reader_role_arn="bad",
                            secrets=[{"name": "gh", "kind": "masked", "value": "ghp_" + "Q" * 36}]),
                    NoAWS, region="eu-west-1", hide=hidden.append)
    with pytest.raises(SecretError, match="not an IAM role ARN"):
        store.run()
    assert hidden == [sec.mask("ghp_" + "Q" * 36, MASKING_KEY)]


# ---------------------------------------------------------------- drill_secrets: the KMS key


@pytest.mark.parametrize("state", ["present", "absent"])
def test_key_not_tagged_for_the_drill_is_refused_with_its_arn(state):
    drill_id = _drill()
    kms = FakeKMS(drill_id, tags=[dict(t, TagValue="someone-else") if t["TagKey"] == "drguard:drill-id" else t
                                  for t in _own_tags(drill_id)], policy={"Statement": []})
    store = Secrets(_params(drill_id, state=state), _factory(kms=kms, secretsmanager=FakeSM()), region="eu-west-1")
    with pytest.raises(SecretError) as info:
        store.run()
    assert "not tagged as this drill's key" in info.value.message and "refusing" in info.value.message
    assert info.value.kwargs["kms_key_arn"] == KEY_ARN
    assert info.value.kwargs["kms_alias"] == "alias/drguard/" + drill_id
    assert info.value.kwargs["actions"] == []
    assert kms.calls == []


def test_equivalent_key_policy_is_left_alone_and_a_different_one_replaced():
    """amazon.aws' compare_policies: statement order, one-element lists and the root ARN's forms are no change."""
    drill_id = _drill()
    wanted = sec.key_policy("aws", "123456789012", READER, "eu-west-1")
    admin, reader = wanted["Statement"]
    same = {"Statement": [dict(reader, Action=["kms:Decrypt"]), dict(admin, Principal={"AWS": "123456789012"})],
            "Version": "2012-10-17"}
    kms = FakeKMS(drill_id, tags=_own_tags(drill_id), policy=same)
    result = Secrets(_params(drill_id), _factory(kms=kms, secretsmanager=FakeSM()), region="eu-west-1").run()
    assert result["changed"] is False and result["actions"] == [] and kms.calls == []
    assert result["kms_key_arn"] == KEY_ARN

    wider = dict(same, Statement=[dict(reader, Action=["kms:Decrypt", "kms:Encrypt"]), admin])
    kms = FakeKMS(drill_id, tags=_own_tags(drill_id), policy=wider)
    result = Secrets(_params(drill_id), _factory(kms=kms, secretsmanager=FakeSM()), region="eu-west-1").run()
    assert result["changed"] is True and result["actions"] == ["update key policy of %s" % KEY_ARN]
    assert [(name, json.loads(kw["Policy"])) for name, kw in kms.calls] == [("put_key_policy", wanted)]


@pytest.fixture
def fake_clock(monkeypatch):
    """retry_while of _secrets on a fake clock: sleeps are recorded, not slept."""
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(sec, "retry_while", functools.partial(sec.retry_while, sleep=sleep, clock=lambda: now[0]))
    return slept


def test_key_policy_naming_a_new_role_is_retried_while_iam_propagates(fake_clock):
    drill_id = _drill()
    kms = FakeKMS(drill_id, create_failures=2)
    result = Secrets(_params(drill_id), _factory(kms=kms, secretsmanager=FakeSM()), region="eu-west-1").run()
    assert [name for name, _ in kms.calls] == ["create_key"] * 3 + ["create_alias"]
    assert fake_clock == [1.0, 2.0]
    tags = {t["TagKey"]: t["TagValue"] for t in kms.calls[0][1]["Tags"]}
    assert tags["drguard:drill-id"] == drill_id and tags["drguard:managed"] == "true"
    assert result["kms_key_arn"] == KEY_ARN and result["actions"] == ["create KMS key alias/drguard/" + drill_id]


def test_key_policy_rejected_for_good_keeps_the_boto_error(fake_clock):
    drill_id = _drill()
    kms = FakeKMS(drill_id, create_failures=1000)
    with pytest.raises(SecretError) as info:
        Secrets(_params(drill_id), _factory(kms=kms, secretsmanager=FakeSM()), region="eu-west-1").run()
    assert info.value.message == "KMS rejects the key policy for reader role %s" % READER
    assert info.value.exception.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    assert sum(fake_clock) <= sec.KEY_POLICY_WAIT and ("create_alias", {}) not in kms.calls


def test_aws_error_is_raised_as_secret_error_with_the_boto_error():
    drill_id = _drill()
    store = Secrets(_params(drill_id, state="absent"),
                    _factory(kms=FakeKMS(drill_id), secretsmanager=FakeSM(list_error="AccessDeniedException")))
    with pytest.raises(SecretError) as info:
        store.run()
    assert info.value.message == "Cannot remove the drill's secrets"
    assert info.value.exception.response["Error"]["Code"] == "AccessDeniedException"


# ---------------------------------------------------------------- drill_secrets: tmpfs store


@pytest.fixture
def tmpfs_store():
    drill_id = _drill()
    directory = sec.default_tmpfs_dir(drill_id)
    yield drill_id, directory
    if os.path.lexists(directory):
        if os.path.islink(directory):
            os.unlink(directory)
        else:
            sec.wipe_dir(directory)


def test_tmpfs_store_without_a_module(tmpfs_store):
    drill_id, directory = tmpfs_store
    params = _params(drill_id, store="tmpfs", reader_role_arn=None,
                     secrets=[{"name": "api", "kind": "synthetic_token"}, {"name": "db", "kind": "synthetic_db"}])
    check = Secrets(dict(params), None, check_mode=True).run()
    assert check["changed"] is True and not os.path.lexists(directory)

    hidden = []
    result = Secrets(dict(params), None, hide=hidden.append).run()
    assert result["tmpfs_dir"] == directory and result["changed"] is True
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    values = [sec.read_secret_file(directory, name) for name in ("api", "db")]
    assert sorted(hidden) == sorted(values)
    for name in ("api", "db"):
        assert stat.S_IMODE(os.lstat(os.path.join(directory, name)).st_mode) == 0o600

    os.chmod(directory, 0o755)  # noqa: S103 - loosened on purpose: the store tightens it again
    hidden.clear()
    again = Secrets(dict(params), None, hide=hidden.append).run()
    assert again["changed"] is False and sorted(hidden) == sorted(values)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700

    gone = Secrets(dict(params, state="absent"), None).run()
    assert gone["changed"] is True and not os.path.lexists(directory)
    assert {s["name"] for s in gone["secrets"]} == {"api", "db"}


def test_tmpfs_store_refuses_a_symlink_in_its_place(tmpfs_store, tmp_path):
    drill_id, directory = tmpfs_store
    os.symlink(str(tmp_path), directory)
    store = Secrets(_params(drill_id, store="tmpfs", secrets=[{"name": "api", "kind": "synthetic_token"}]), None)
    with pytest.raises(SecretError) as info:
        store.run()
    assert info.value.message.startswith("tmpfs store %s: " % directory) and "symlink" in info.value.message
    assert info.value.kwargs["actions"] == [] and os.listdir(str(tmp_path)) == []


def test_secret_file_is_private_and_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    os.symlink(str(target), str(tmp_path / "api"))
    sec.write_secret_file(str(tmp_path), "api", "value-1")
    assert target.read_text() == "untouched" and not os.path.islink(str(tmp_path / "api"))
    assert stat.S_IMODE(os.lstat(str(tmp_path / "api")).st_mode) == 0o600
    assert sec.read_secret_file(str(tmp_path), "api") == "value-1"
    assert sorted(os.listdir(str(tmp_path))) == ["api", "elsewhere"]
    with pytest.raises(SecretError, match="is not valid"):
        sec.write_secret_file(str(tmp_path), "../escape", "v")


# ---------------------------------------------------------------- secret_exec


def _exec_params(drill, **override):
    params = {"drill_id": drill, "argv": ["true"], "env_secrets": {}, "file_secrets": {}, "store": "tmpfs",
              "tmpfs_dir": None, "chdir": None, "timeout": 30, "pass_aws_credentials": False,
              "access_key": None, "secret_key": None, "session_token": None, "profile": None}
    params.update(override)
    return params


@pytest.mark.parametrize(("override", "needle"), [
    ({"drill_id": "X"}, "drill_id 'X' is not valid"),
    ({"argv": []}, "argv is empty"),
    ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
    ({"env_secrets": {"HOME": "api"}}, "is not a usable environment variable name"),
    ({"env_secrets": {"1X": "api"}}, "is not a usable environment variable name"),
    ({"env_secrets": {"T": "a/b"}}, "which is not a valid secret name"),
    ({"file_secrets": {"../escape": "api"}}, "is not a plain file name"),
    ({"chdir": "/nonexistent/dir"}, "chdir /nonexistent/dir is not a directory"),
    ({"pass_aws_credentials": True}, "pass_aws_credentials needs the drill's session"),
])
def test_exec_bad_input_raises_secret_error(override, needle):
    with pytest.raises(SecretError) as info:
        sx.check_params(_exec_params(_drill(), **override))
    assert needle in info.value.message and info.value.exception is None


def test_drill_session_is_only_the_explicit_one(monkeypatch):
    explicit = {"access_key": "ASIADRILL0001", "secret_key": "drill-secret-0123", "session_token": "tok"}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "controller-secret")
    assert sx.drill_session(explicit) == {"AWS_ACCESS_KEY_ID": "ASIADRILL0001",
                                          "AWS_SECRET_ACCESS_KEY": "drill-secret-0123", "AWS_SESSION_TOKEN": "tok"}
    assert sx.drill_session(dict(explicit, profile="default")) is None
    assert sx.drill_session(dict(explicit, secret_key="controller-secret")) is None
    assert sx.drill_session(dict(explicit, secret_key=None)) is None


def test_child_environment_is_allow_listed(monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "hvs.nope")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACONTROLLER")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("PATH", "/usr/bin")
    params = _exec_params(_drill(), pass_aws_credentials=True, access_key="ASIADRILL", secret_key="s3cr3t-drill")
    env, extra = sx.child_environment(params, {"TOKEN": "v"}, "/dev/shm/home", region="eu-west-1")
    assert "VAULT_TOKEN" not in env and env["AWS_ACCESS_KEY_ID"] == "ASIADRILL"
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] == "/usr/bin" and env["HOME"] == "/dev/shm/home"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1" and env["TOKEN"] == "v"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == env["AWS_CONFIG_FILE"] == os.devnull
    assert sorted(extra) == ["ASIADRILL", "s3cr3t-drill"]


def test_private_tmpfs_dir_is_0700_whatever_the_umask():
    old = os.umask(0o277)  # mkdtemp alone would give 0500
    try:
        directory = sx.tmpfs_private_dir("home", _drill())
    finally:
        os.umask(old)
    try:
        assert os.path.dirname(directory) == sec.TMPFS_ROOT
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    finally:
        sec.wipe_dir(directory)


def test_failing_command_raises_with_its_redacted_result(tmpfs_store):
    drill_id, directory = tmpfs_store
    Secrets(_params(drill_id, store="tmpfs", secrets=[{"name": "api", "kind": "synthetic_token"}]), None).run()
    value = sec.read_secret_file(directory, "api")
    hidden, warnings = [], []
    argv = [sys.executable, "-c", "import os, sys; print(os.environ['T']); print(os.environ['HOME']); sys.exit(4)"]
    with pytest.raises(SecretError) as info:
        sx.execute(_exec_params(drill_id, argv=argv, env_secrets={"T": "api"}), None, hide=hidden.append,
                   warn=warnings.append)
    assert info.value.message == "command %s exited with rc 4" % sys.executable
    result = info.value.kwargs
    assert result["rc"] == 4 and result["changed"] is False and result["argv"] == argv
    masked, home = result["stdout"].split()
    assert masked == sec.MASK and value not in json.dumps(result)
    assert os.path.basename(home).startswith("drguard-home-%s-" % drill_id) and not os.path.exists(home)
    assert hidden == [value] and warnings == []

    ok = sx.execute(_exec_params(drill_id, argv=["true"]), None)
    assert ok["rc"] == 0 and ok["stdout"] == "" and ok["stdout_truncated"] is False
