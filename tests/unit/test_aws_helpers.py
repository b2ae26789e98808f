"""_aws helpers: credentials never come back in results; error codes; retrying IAM propagation."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
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
