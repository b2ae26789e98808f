"""Drill identity and the tag contract (plugins/module_utils/drill.py)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils.drill import (
    DRILL_ID_RE,
    TAG_DRILL_ID,
    TAG_EXPIRES_AT,
    TAG_MANAGED,
    DrillError,
    drill_tags,
    ec2_tag_specs,
    expires_at,
    format_time,
    is_expired,
    new_drill_id,
    parse_time,
    tag_problem,
    validate_drill_id,
)
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list as tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict as tag_dict

NOW = datetime(2026, 11, 29, 4, 40, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------- ids

def test_new_drill_id_format_and_uniqueness():
    # 24 random bits per second: a same-second collision among 200 draws has p ~ 0.1 %,
    # so demand near-uniqueness rather than perfection (no flaky test).
    ids = {new_drill_id(NOW) for _ in range(200)}
    assert len(ids) >= 195
    for drill_id in ids:
        assert drill_id.startswith("dr-20261129044000-")
        assert re.fullmatch(r"[0-9a-f]{6}", drill_id.rsplit("-", 1)[1])
        assert DRILL_ID_RE.match(drill_id)
        assert validate_drill_id(drill_id) == drill_id


def test_new_drill_id_defaults_to_now():
    assert new_drill_id().startswith("dr-%s" % datetime.now(UTC).strftime("%Y%m%d"))


@pytest.mark.parametrize("good", ["dr-1", "abcd", "a" * 40, "dr-20261129044000-a1b2c3", "0drill9"])
def test_valid_drill_ids(good):
    assert validate_drill_id(good) == good


@pytest.mark.parametrize("bad", ["", "abc", "a" * 41, "Dr-1234", "dr_1234", "-dr-123", "dr-123-", "dr 1234",
                                 "dr-12.4", None, 1234])
def test_invalid_drill_ids(bad):
    with pytest.raises(DrillError, match="is not valid: use 4-40 lowercase letters"):
        validate_drill_id(bad)


def test_drill_id_with_trailing_newline_is_invalid():
    with pytest.raises(DrillError):
        validate_drill_id("dr-1234\n")


# ---------------------------------------------------------------------- times

def test_format_time_is_utc_z_whole_seconds():
    when = datetime(2026, 11, 29, 6, 40, 5, 987654, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(when) == "2026-11-29T04:40:05Z"


def test_format_time_rejects_naive():
    with pytest.raises(DrillError, match="timezone-aware"):
        format_time(datetime(2026, 11, 29, 4, 40))


@pytest.mark.parametrize("text, expected", [
    ("2026-11-29T04:40:00Z", NOW),
    ("2026-11-29T04:40:00z", NOW),
    ("2026-11-29T06:40:00+02:00", NOW),
    ("2026-11-28T23:40:00-05:00", NOW),
    (" 2026-11-29T04:40:00.5Z ", NOW + timedelta(microseconds=500000)),
])
def test_parse_time(text, expected):
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["2026-11-29T04:40:00", "2026-11-29", "2026-11-29 04:40:00"])
def test_parse_time_without_zone_fails_closed(text):
    with pytest.raises(DrillError, match="has no time zone"):
        parse_time(text)


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01T00:00:00Z", "Z"])
def test_parse_time_rejects_garbage(text):
    with pytest.raises(DrillError, match="is not RFC 3339"):
        parse_time(text)


@pytest.mark.parametrize("value", [None, 1700000000, NOW])
def test_parse_time_rejects_non_strings(value):
    with pytest.raises(DrillError, match="is not a string"):
        parse_time(value)


def test_expires_at():
    assert expires_at(7200, NOW) == "2026-11-29T06:40:00Z"
    assert parse_time(expires_at(60)) > datetime.now(UTC)


@pytest.mark.parametrize("ttl", [0, -5])
def test_expires_at_rejects_non_positive_ttl(ttl):
    with pytest.raises(DrillError, match="positive number of seconds"):
        expires_at(ttl, NOW)


# ----------------------------------------------------------------------- tags

def test_drill_tags_contract_wins_over_extra():
    tags = drill_tags("dr-abc1", "2026-11-29T06:40:00Z",
                      {"Name": "x", TAG_MANAGED: "false", TAG_DRILL_ID: "other", "team": "dr"})
    assert tags == {TAG_MANAGED: "true", TAG_DRILL_ID: "dr-abc1", TAG_EXPIRES_AT: "2026-11-29T06:40:00Z",
                    "Name": "x", "team": "dr"}
    assert (TAG_MANAGED, TAG_DRILL_ID, TAG_EXPIRES_AT) == ("drguard:managed", "drguard:drill-id",
                                                           "drguard:expires-at")


def test_drill_tags_validate_inputs():
    with pytest.raises(DrillError):
        drill_tags("BAD ID", "2026-11-29T06:40:00Z")
    with pytest.raises(DrillError, match="no time zone"):
        drill_tags("dr-abc1", "2026-11-29T06:40:00")


def test_amazon_aws_tag_helpers_round_trip():
    # The collection's tag conversion is amazon.aws' (drill.tag_list/tag_dict are gone).
    tags = {"b": 2, "a": "1"}
    items = tag_list(tags)
    assert sorted(items, key=lambda t: t["Key"]) == [{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}]
    assert tag_dict(items) == {"a": "1", "b": "2"}
    assert tag_list(tags, "TagKey", "TagValue")[1] == {"TagKey": "a", "TagValue": "1"}
    assert tag_dict(None) == {}
    assert tag_dict([{"TagKey": "k", "TagValue": "v"}], "TagKey", "TagValue") == {"k": "v"}


def test_ec2_tag_specs():
    tags = drill_tags("dr-abc1", "2026-11-29T06:40:00Z")
    specs = ec2_tag_specs("vpc", tags, name="dr-abc1-vpc")
    assert specs[0]["ResourceType"] == "vpc"
    assert tag_dict(specs[0]["Tags"]) == dict(tags, Name="dr-abc1-vpc")
    assert "Name" not in tags  # the caller's dict is not modified
    assert "Name" not in tag_dict(ec2_tag_specs("subnet", tags)[0]["Tags"])
    # The amazon.aws shape, one spec, keys in a stable (sorted) order, values as strings.
    assert len(specs) == 1 and set(specs[0]) == {"ResourceType", "Tags"}
    assert [t["Key"] for t in specs[0]["Tags"]] == sorted(dict(tags, Name="x"))
    assert all(isinstance(t["Value"], str) for t in specs[0]["Tags"])


# ------------------------------------------------------------------ is_expired

def managed(expires):
    tags = {TAG_MANAGED: "true", TAG_DRILL_ID: "dr-abc1"}
    if expires is not None:
        tags[TAG_EXPIRES_AT] = expires
    return tags


def test_is_expired_past_now_and_future():
    assert is_expired(managed("2026-11-29T04:39:59Z"), NOW) is True
    assert is_expired(managed("2026-11-29T04:40:00Z"), NOW) is True   # at the instant: expired
    assert is_expired(managed("2026-11-29T04:40:01Z"), NOW) is False
    assert is_expired(managed("2026-11-29T06:40:00+02:00"), NOW) is True


@pytest.mark.parametrize("expires", [None, "", "soon", "2026-11-29T05:00:00", "2026-11-29", "20261129T040000Z",
                                     "2026-13-29T04:00:00Z", "2026-11-29T04:00:00+0000"])
def test_missing_or_malformed_expiry_is_never_expired(expires):
    """Nothing proves such a resource is a drill's: the reaper reports it instead of deleting it."""
    assert is_expired(managed(expires), NOW) is False
    assert tag_problem(managed(expires)) == (
        "tag drguard:expires-at is missing" if expires is None
        else "tag drguard:expires-at %r is not an RFC 3339 time with a zone" % expires)


@pytest.mark.parametrize(("tags", "problem"), [
    ({}, "tag drguard:managed is missing"),
    ({TAG_MANAGED: "yes"}, "tag drguard:managed is 'yes', not 'true'"),
    ({TAG_MANAGED: "true"}, "tag drguard:drill-id is missing"),
    ({TAG_MANAGED: "true", TAG_DRILL_ID: "Bad_Id", TAG_EXPIRES_AT: "2026-11-29T04:00:00Z"},
     "tag drguard:drill-id 'Bad_Id' is not a valid drill id"),
    ({TAG_MANAGED: "true", TAG_DRILL_ID: "dr-other", TAG_EXPIRES_AT: "2026-11-29T04:00:00Z"},
     "tag drguard:drill-id is 'dr-other', not 'dr-abc1'"),
    ({TAG_MANAGED: "true", TAG_DRILL_ID: "dr-abc1", TAG_EXPIRES_AT: "2026-11-29T04:00:00Z"}, None),
    ({TAG_MANAGED: "true", TAG_DRILL_ID: "dr-abc1", TAG_EXPIRES_AT: "2026-11-29t04:00:00.5+02:00"}, None),
])
def test_tag_problem_requires_the_full_tag_set(tags, problem):
    assert tag_problem(tags, "dr-abc1") == problem


def test_only_a_complete_tag_set_can_be_expired():
    only_managed = {TAG_MANAGED: "true", TAG_EXPIRES_AT: "2000-01-01T00:00:00Z"}
    assert is_expired(only_managed, NOW) is False
    assert is_expired(dict(only_managed, **{TAG_DRILL_ID: "dr-abc1"}), NOW) is True


@pytest.mark.parametrize("tags", [{}, {TAG_MANAGED: "false", TAG_EXPIRES_AT: "2000-01-01T00:00:00Z"},
                                  {TAG_MANAGED: "True", TAG_EXPIRES_AT: "2000-01-01T00:00:00Z"},
                                  {TAG_EXPIRES_AT: "2000-01-01T00:00:00Z"}])
def test_unmanaged_resources_never_expire(tags):
    assert is_expired(tags, NOW) is False


def test_is_expired_defaults_to_now():
    past = format_time(datetime.now(UTC) - timedelta(minutes=1))
    future = format_time(datetime.now(UTC) + timedelta(hours=1))
    assert is_expired(managed(past)) is True
    assert is_expired(managed(future)) is False
