"""The one parser of S3 locations: objects, prefixes, bucket names."""

from __future__ import annotations

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_location as loc


@pytest.mark.parametrize("uri, expected", [
    ("s3://bkt/k", ("bkt", "k", None)),
    ("s3://backups.example-1/dir/k.json?versionId=abc.123", ("backups.example-1", "dir/k.json", "abc.123")),
])
def test_parse_s3(uri, expected):
    parsed = loc.parse_s3(uri)
    assert (parsed.bucket, parsed.key, parsed.version_id) == expected
    assert parsed.uri == uri


@pytest.mark.parametrize("uri, words", [
    ("s3:///x/", "is not an s3://bucket/key URI"),
    ("/local/path", "is not an s3://bucket/key URI"),
    ("s3://bkt/k\x00", "is not an s3://bucket/key URI"),
    ("s3://bkt/k?foo=1", "only a ?versionId= query"),
    ("s3://bkt/k#frag", "only a ?versionId= query"),
    ("s3://B/k", "is not a valid S3 bucket name"),
    ("s3://ab/k", "is not a valid S3 bucket name"),
    ("s3://-bkt/k", "is not a valid S3 bucket name"),
    ("s3://bkt_1/k", "is not a valid S3 bucket name"),
])
def test_parse_s3_refuses(uri, words):
    with pytest.raises(loc.LocationError, match=words.replace("?", r"\?")):
        loc.parse_s3(uri)


@pytest.mark.parametrize("uri, key", [("s3://bkt", ""), ("s3://bkt/", ""), ("s3://bkt/orders/", "orders/")])
def test_parse_prefix(uri, key):
    assert loc.parse_prefix(uri).key == key


@pytest.mark.parametrize("uri, words", [
    ("s3://bkt/orders", "end the prefix with '/'"),  # would also match orders-payroll/
    ("s3://bkt/p/?versionId=1", "cannot carry a versionId"),
    ("s3://bkt/ord*/", "without wildcards"),
    ("s3://bkt/o?x/", "only a ?versionId= query"),
    ("s3://bkt//abs/", "without wildcards or a leading '/'"),
])
def test_bad_prefixes(uri, words):
    with pytest.raises(loc.LocationError, match=words.replace("?", r"\?").replace("*", r"\*")):
        loc.parse_prefix(uri)


def test_check_bucket():
    assert loc.check_bucket("my-bucket.1") == "my-bucket.1"
    with pytest.raises(loc.LocationError, match="'My' is not a valid S3 bucket name"):
        loc.check_bucket("My", "quarantine")


def test_is_s3():
    assert loc.is_s3("s3://bkt/k") and not loc.is_s3("/tmp/x") and not loc.is_s3(None)
