"""The backup_access backend without AWS: S3 sources, the read-only policy, one error type."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _backup_access as ba  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident  # noqa: E402


class NoAWS:
    """A client that must never be used: input is judged before any AWS call."""

    def __getattr__(self, name):
        raise AssertionError("iam:%s was called before the input was validated" % name)


def _params(**kw):
    return dict({"state": "present", "source": None, "role_name": "drguard-dr-1", "policy_name": ba.POLICY_NAME,
                 "path": None}, **kw)


@pytest.mark.parametrize(("source", "needle"), [
    ("s3://bkt/orders", "end the prefix with '/'"),
    ("s3://bkt/ord*/", "without wildcards"),
    ("s3://bkt//orders/", "leading '/'"),
    ("s3://Bad_Bucket/orders/", "not a valid S3 bucket name"),
    ("s3://bkt/orders/?versionId=1", "cannot carry a versionId"),
    ("relative/dir", "must be s3://bucket/prefix/ or an absolute directory"),
])
@pytest.mark.parametrize("state", ["present", "absent"])
def test_bad_sources_raise_access_error_before_any_aws_call(source, needle, state):
    with pytest.raises(ba.AccessError) as info:
        ba.backup_access(_params(source=source, state=state, path="/mnt/x"), iam=NoAWS,
                         run_command=None)
    assert needle in info.value.message and info.value.exception is None


def test_s3_source_needs_the_role():
    with pytest.raises(ba.AccessError, match="role_name is required"):
        ba.backup_access(_params(source="s3://bkt/orders/", role_name=None), iam=NoAWS, run_command=None)


def test_parse_source_gives_bucket_and_folder_prefix():
    assert ba.parse_source("s3://bkt/orders/") == ("bkt", "orders/")
    assert ba.parse_source("s3://bkt/orders/2026/") == ("bkt", "orders/2026/")
    assert ba.parse_source("s3://bkt") == ("bkt", "")
    assert ba.parse_source("s3://bkt/") == ("bkt", "")


def test_readonly_policy_never_reaches_sibling_prefixes():
    with pytest.raises(ba.AccessError, match="end the prefix with '/'"):
        ba.readonly_policy("bkt", "orders")
    doc = ba.readonly_policy("bkt", "orders/")
    assert "orders*" not in json.dumps(doc)
    reads = doc["Statement"][0]
    assert reads["Resource"] == "arn:aws:s3:::bkt/orders/*"
    assert doc["Statement"][1]["Condition"] == {"StringLike": {"s3:prefix": ["orders/*"]}}
    assert ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::bkt/orders/db.sqlite")
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::bkt/orders-payroll/db.sqlite")
    assert not ident.evaluate(doc, "s3:GetObject", "arn:aws:s3:::bkt/ordersX")
    assert not ident.evaluate(doc, "s3:PutObject", "arn:aws:s3:::bkt/orders/db.sqlite")
    assert not ident.evaluate(doc, "s3:DeleteObjectVersion", "arn:aws:s3:::bkt/orders/db.sqlite")
    # The generated policy passes the identity validator (no sibling-prefix reach, no wildcard writes).
    assert ident.validate_policy(doc) == doc


def test_readonly_policy_for_the_whole_bucket_lists_without_condition():
    doc = ba.readonly_policy("bkt", "")
    assert doc["Statement"][0]["Resource"] == "arn:aws:s3:::bkt/*"
    assert "Condition" not in doc["Statement"][1]
