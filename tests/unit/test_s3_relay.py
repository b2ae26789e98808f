"""The S3 endpoint relay's pure parts (plugins/module_utils/_s3_relay.py): its target and the inside client's SigV4."""

from __future__ import annotations

import datetime
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_relay

NOW = datetime.datetime(2026, 12, 1, 1, 2, 3, tzinfo=datetime.timezone.utc)
SESSION = {"AWS_ACCESS_KEY_ID": "ASIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0/example+key",
           "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLE=="}


def botocore_authorization(url, region, session):
    request = AWSRequest(method="GET", url=url, headers={"x-amz-content-sha256": _s3_relay.EMPTY_SHA256})
    creds = Credentials(session["AWS_ACCESS_KEY_ID"], session["AWS_SECRET_ACCESS_KEY"],
                        session.get("AWS_SESSION_TOKEN"))
    auth = S3SigV4Auth(creds, "s3", region)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW):  # a fixed clock for the comparison
        auth.add_auth(request)
    return request.headers["Authorization"]


@pytest.mark.parametrize(("netloc", "bucket", "key", "version"), [
    ("127.0.0.1:5000", "backups", "orders/2026-11-30/orders.sqlite", "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"),
    ("s3.eu-west-1.amazonaws.com", "drg-backups", "a b/ünïcode+~(1).tar.gz", "null"),
    ("127.0.0.1:5000", "backups", "plain", None),
])
def test_the_inside_signature_is_the_one_botocore_computes(netloc, bucket, key, version):
    path = _s3_relay.object_path(bucket, key)
    query = {"versionId": version} if version else {}
    mine = _s3_relay.sign_get(netloc=netloc, path=path, query=query, region="eu-west-1", session=SESSION, now=NOW)
    url = "http://%s%s" % (netloc, path) + ("?versionId=%s" % version.replace("+", "%2B") if version else "")
    assert mine["authorization"] == botocore_authorization(url, "eu-west-1", SESSION)
    assert mine["x-amz-security-token"] == SESSION["AWS_SESSION_TOKEN"]


def test_a_wrong_secret_gives_another_signature():
    args = {"netloc": "127.0.0.1:5000", "path": "/b/k", "query": {}, "region": "eu-west-1", "now": NOW}
    other = dict(SESSION, AWS_SECRET_ACCESS_KEY="wrong")
    assert _s3_relay.sign_get(session=SESSION, **args)["authorization"] != \
        _s3_relay.sign_get(session=other, **args)["authorization"]


def test_target_is_the_endpoint_url_or_the_regions_s3():
    assert _s3_relay.target("http://127.0.0.1:5000") == {"host": "127.0.0.1", "port": 5000, "scheme": "http",
                                                        "netloc": "127.0.0.1:5000"}
    assert _s3_relay.target(None, "eu-west-1") == {"host": "s3.eu-west-1.amazonaws.com", "port": 443,
                                                   "scheme": "https", "netloc": "s3.eu-west-1.amazonaws.com"}
    for bad in ("ftp://x", "http://x/path", "http://u:p@x", "http://x:99999"):
        with pytest.raises(_s3_relay.RelayError, match="endpoint_url"):
            _s3_relay.target(bad)
    with pytest.raises(_s3_relay.RelayError, match="region"):
        _s3_relay.target(None, None)
    with pytest.raises(_s3_relay.RelayError, match="region"):
        _s3_relay.target(None, "eu-west-1/../x")
