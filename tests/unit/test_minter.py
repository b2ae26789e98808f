"""The mint_credentials backend without AWS: bad input fails first, policy comparison, one error type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._minter import Minter  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._minter import MintError  # noqa: E402

DRILL = "dr-20261129044000-a1b2c3"
PARAMS = {
    "drill_id": DRILL, "state": "present", "expires_at": "2099-01-01T00:00:00Z", "duration_seconds": 900,
    "permissions_boundary": None, "trusted_principal_arn": None, "external_id": None,
    "resources": {"secrets_prefix": "drguard/%s/" % DRILL}, "extra_statements": [], "session_policy": None,
}


class NoAWS:
    """A client that must never be used: validation happens before any AWS call."""

    def __init__(self, service):
        self.service = service

    def __getattr__(self, name):
        raise AssertionError("%s:%s was called before the input was validated" % (self.service, name))


@pytest.mark.parametrize(("override", "needle"), [
    ({"expires_at": None}, "expires_at is required"),
    ({"expires_at": "tomorrow"}, "RFC 3339"),
    ({"duration_seconds": 899}, "duration_seconds must be between 900 and 3600"),
    ({"permissions_boundary": "arn:aws:iam::123456789012:role/x"}, "is not a managed policy ARN"),
    ({"external_id": "x"}, "external_id must be 2-1224 characters"),
    ({"resources": {"backup": [{"bucket": "Bad_Bucket"}]}}, "not a valid S3 bucket name"),
    ({"resources": {"nope": 1}}, "resources has unknown keys nope"),
])
def test_bad_input_raises_mint_error_before_any_aws_call(override, needle):
    minter = Minter(DRILL, NoAWS, region="eu-west-1")
    with pytest.raises(MintError) as info:
        minter.present(dict(PARAMS, **override))
    assert needle in info.value.message
    assert info.value.exception is None  # not an AWS error: main() reports it with fail_json
    assert minter.actions == [] and minter.changed is False


def test_missing_region_is_refused_before_any_aws_call():
    with pytest.raises(MintError, match="no AWS region"):
        Minter(DRILL, NoAWS, region=None).present(dict(PARAMS))


def test_policy_comparison_ignores_order_and_one_element_lists():
    a = {"Version": "2012-10-17", "Statement": [
        {"Sid": "A", "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": ["arn:aws:s3:::b/*"]},
        {"Sid": "B", "Effect": "Deny", "Action": "*", "Resource": "*"}]}
    b = {"Statement": [
        {"Effect": "Deny", "Resource": "*", "Action": ["*"], "Sid": "B"},
        {"Resource": "arn:aws:s3:::b/*", "Action": ["s3:ListBucket", "s3:GetObject"], "Effect": "Allow", "Sid": "A"}],
        "Version": "2012-10-17"}
    assert not ident.policies_differ(a, b)
    assert not ident.policies_differ('{"Version": "2012-10-17", "Statement": []}',
                                       {"Version": "2012-10-17", "Statement": []})
    wider = {"Version": "2012-10-17", "Statement": [dict(a["Statement"][0], Resource="arn:aws:s3:::b*"),
                                                    a["Statement"][1]]}
    assert ident.policies_differ(a, wider)
    assert ident.policies_differ(a, {"Version": "2012-10-17", "Statement": a["Statement"][:1]})
