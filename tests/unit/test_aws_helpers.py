"""_aws helpers: credentials never come back in results; error codes; retrying IAM propagation."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import get_or_none
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while
from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import _role_not_assumable


def test_minted_access_key_id_is_censored_in_the_invocation(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    res = run_module("restore_artifacts", {
        "artifacts": [{"name": "a", "verified": False, "sha256": "0" * 64, "size": 3, "source": str(src)}],
        "dest": str(tmp_path / "r"), "region": "us-east-1",
        "access_key": "ASIACANARYKEYID12345", "secret_key": "canary-secret", "session_token": "canary-token"})
    assert res.failed
    text = json.dumps(res)
    for canary in ("ASIACANARYKEYID12345", "canary-secret", "canary-token"):
        assert canary not in text


# ---------------------------------------------------------------- retry_while, error_code


def _client_error(code, message="m"):
    return ClientError({"Error": {"Code": code, "Message": message}}, "Op")


class _Clock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def _flaky(errors, result="ok"):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return call, calls


def test_error_code():
    assert error_code(_client_error("AccessDenied")) == "AccessDenied"
    assert error_code(ValueError("x")) == ""


def test_retry_while_retries_transient_errors_with_backoff():
    clock = _Clock()
    call, calls = _flaky([_client_error("AccessDenied")] * 3)
    assert retry_while(call, lambda e: error_code(e) == "AccessDenied", 60, sleep=clock.sleep,
                       clock=lambda: clock.now) == "ok"
    assert len(calls) == 4 and clock.sleeps == [1.0, 2.0, 4.0]


def test_retry_while_gives_up_after_the_wait_with_the_last_error():
    clock = _Clock()
    call, calls = _flaky([_client_error("AccessDenied", "attempt %d" % i) for i in range(100)])
    with pytest.raises(ClientError) as info:
        retry_while(call, lambda e: True, 20, sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0] and sum(clock.sleeps) <= 20
    assert "attempt %d" % (len(calls) - 1) in str(info.value)


def test_retry_while_raises_other_errors_at_once():
    clock = _Clock()
    call, calls = _flaky([_client_error("ValidationError")])
    with pytest.raises(ClientError):
        retry_while(call, lambda e: error_code(e) == "AccessDenied", 60, sleep=clock.sleep, clock=lambda: clock.now)
    assert len(calls) == 1 and clock.sleeps == []


@pytest.mark.parametrize(("error", "transient"), [
    ({"Code": "InvalidParameter", "Message": "Unable to assume given IAM role: 'arn:aws:iam::1:role/r'"}, True),
    ({"Code": "AccessDenied", "Message": "Unable to assume role"}, True),
    ({"Code": "InvalidParameter", "Message": "LogGroupName is not valid"}, False),
    ({"Code": "UnauthorizedOperation", "Message": "not authorized to perform ec2:CreateFlowLogs"}, False),
    (None, False),
])
def test_flow_log_role_propagation_is_recognised(error, transient):
    exc = ClientError({"Error": error}, "CreateFlowLogs") if error else ValueError("Unable to assume given IAM role")
    assert _role_not_assumable(exc) is transient


# ---------------------------------------------------------------- RetryingClient (every call retries)


class _FaultInjector:
    """Answers the first ``count`` requests with ``code`` at the HTTP layer (real client, real parsing)."""

    def __init__(self, client, code, status, count):
        self.code, self.status, self.left, self.sent = code, status, count, 0
        client.meta.events.register("before-send", self)

    def __call__(self, request, **_):
        from botocore.awsrequest import AWSResponse

        self.sent += 1
        if self.left <= 0:
            return None  # let the real request through to the emulator
        self.left -= 1
        body = ('<ErrorResponse><Error><Type>Sender</Type><Code>%s</Code><Message>injected</Message>'
                '</Error><RequestId>r</RequestId></ErrorResponse>' % self.code).encode()
        return AWSResponse(request.url, self.status, {"Content-Type": "text/xml"}, _Raw(body))


class _Raw:
    def __init__(self, body):
        self.body = body

    def stream(self, **_):
        yield self.body

    def read(self, *_a, **_k):
        return self.body


@pytest.fixture
def fast_backoff(monkeypatch):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
    monkeypatch.setattr(_aws, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(_aws, "RETRY_MAX_DELAY", 0.02)


def _iam(aws):
    from botocore.config import Config
    # botocore's own retries off, so that what retries is ours alone.
    return aws("iam", config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


@pytest.mark.parametrize("code", ["Throttling", "RequestLimitExceeded", "ThrottlingException", "SlowDown"])
def test_a_throttled_call_is_retried_until_it_succeeds(aws, fast_backoff, code):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import RetryingClient
    raw = _iam(aws)
    faults = _FaultInjector(raw, code, 400, count=3)
    users = RetryingClient(raw).list_users()  # no aws_retry=True needed: every call retries
    assert "Users" in users
    assert faults.sent == 4 and faults.left == 0


def test_a_permanent_error_is_not_retried(aws, fast_backoff):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import RetryingClient
    raw = _iam(aws)
    faults = _FaultInjector(raw, "AccessDenied", 403, count=5)
    with pytest.raises(ClientError) as err:
        RetryingClient(raw).list_users()
    assert error_code(err.value) == "AccessDenied"
    assert faults.sent == 1


def test_a_call_still_throttled_after_every_retry_raises_the_throttle(aws, fast_backoff, monkeypatch):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
    monkeypatch.setattr(_aws, "RETRIES", 2)
    raw = _iam(aws)
    faults = _FaultInjector(raw, "Throttling", 400, count=50)
    with pytest.raises(ClientError) as err:
        _aws.RetryingClient(raw).list_users()
    assert error_code(err.value) == "Throttling"
    assert faults.sent == 2  # amazon.aws counts the first try among its "retries"


def test_paginate_retries_a_throttled_listing(aws, fast_backoff):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import RetryingClient
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate
    raw = _iam(aws)
    faults = _FaultInjector(raw, "Throttling", 400, count=2)
    assert isinstance(paginate(RetryingClient(raw), "list_roles", "Roles"), list)
    assert faults.sent == 3


@pytest.mark.parametrize("code, expected", [
    ("NoSuchEntity", True), ("NoSuchBucket", True), ("InvalidVpcID.NotFound", True),
    ("ResourceNotFoundException", True), ("NatGatewayNotFound", True), ("NotFound", True),
    ("AccessDenied", False), ("Throttling", False), ("DependencyViolation", False), ("", False),
])
def test_is_not_found(code, expected):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
    assert is_not_found(_client_error(code)) is expected
    assert is_not_found(ValueError("NotFound")) is False


def _aws_module(args):
    from ansible.module_utils.testing import patch_module_args
    from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

    with patch_module_args(args):
        return AnsibleAWSModule(argument_spec={})


def test_clients_of_one_module_share_one_session_and_its_settings(aws_env):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
    module = _aws_module({"region": "eu-west-3", "endpoint_url": aws_env.url})
    ec2, iam = aws_client(module, "ec2"), aws_client(module, "iam")
    assert ec2.unwrapped.meta.region_name == "eu-west-3" and ec2.unwrapped.meta.endpoint_url == aws_env.url
    assert iam.unwrapped.meta.endpoint_url == aws_env.url
    assert list(module._drguard_boto3_sessions) == [None]  # one session (no profile) for both clients
    kms = aws_client(module, "kms", region="ap-south-1")  # an override wins, as with module.client
    assert kms.unwrapped.meta.region_name == "ap-south-1"
    assert "drguard.sandbox" in ec2.unwrapped.meta.config.user_agent_extra
    ec2.describe_vpcs()  # it works against the emulator, with the module's credentials
    other = _aws_module({"region": "eu-west-3", "endpoint_url": aws_env.url})
    aws_client(other, "ec2")
    assert other._drguard_boto3_sessions[None] is not module._drguard_boto3_sessions[None]  # nothing shared across runs


def test_explicit_credentials_reach_the_client(aws_env):
    from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
    module = _aws_module({"region": "us-east-1", "endpoint_url": aws_env.url,
                          "access_key": "AKIAEXPLICIT00000001", "secret_key": "explicit-secret"})
    creds = aws_client(module, "sts").unwrapped._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("AKIAEXPLICIT00000001", "explicit-secret")


def test_get_or_none_is_none_only_when_aws_says_not_found():
    def raising(code):
        def call(**_kwargs):
            raise ClientError({"Error": {"Code": code, "Message": "x"}}, "GetRole")
        return call
    assert get_or_none(lambda **kw: {"Role": dict(kw)}, "Role", RoleName="r") == {"RoleName": "r"}
    assert get_or_none(raising("NoSuchEntity"), "Role", RoleName="r") is None
    with pytest.raises(ClientError):
        get_or_none(raising("AccessDenied"), "Role", RoleName="r")
