"""trusted_state: the controller's compare-and-set writer of the trusted state (local and S3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_artifacts import create_versioned_bucket
from helpers_artifacts import unique

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64
OTHER = {"other-set": {"sequence": 7, "manifest_sha256": "d" * 64, "accepted_at": "2026-01-01T00:00:00Z"}}


def _args(location, sequence=5, manifest_sha256=SHA_A, payload_sha256=SHA_B, backup_set="orders-db"):
    return {"trusted_state": location, "backup_set": backup_set, "sequence": sequence,
            "manifest_sha256": manifest_sha256, "payload_sha256": payload_sha256}


@pytest.fixture
def local_state(tmp_path):
    path = tmp_path / "state" / "trusted-state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(OTHER))
    return path


def test_local_record_is_idempotent_and_check_mode_writes_nothing(module_runner, local_state):
    before = local_state.read_bytes()
    check = module_runner("trusted_state", _args(str(local_state)), check_mode=True)
    assert not check.failed and check["changed"] is True and check["previous"] is None, check
    assert local_state.read_bytes() == before
    first = module_runner("trusted_state", _args(str(local_state)))
    assert not first.failed and first["changed"] is True, first
    state = json.loads(local_state.read_text())
    assert state["other-set"] == OTHER["other-set"]
    assert {k: state["orders-db"][k] for k in ("sequence", "manifest_sha256", "payload_sha256")} == \
        {"sequence": 5, "manifest_sha256": SHA_A, "payload_sha256": SHA_B}
    assert first["entry"] == state["orders-db"]
    again = module_runner("trusted_state", _args(str(local_state)))
    assert not again.failed and again["changed"] is False and again["entry"] == state["orders-db"]
    assert module_runner("trusted_state", _args(str(local_state)), check_mode=True)["changed"] is False


def test_local_sequence_never_goes_down(module_runner, local_state):
    assert module_runner("trusted_state", _args(str(local_state), sequence=9))["changed"] is True
    before = local_state.read_bytes()
    lower = module_runner("trusted_state", _args(str(local_state), sequence=8, manifest_sha256=SHA_C))
    assert lower.failed and lower["reason"] == "rollback" and lower["changed"] is False
    assert lower["msg"] == ("Refusing to record orders-db sequence 8 in the trusted state %s: sequence 8 of "
                            "orders-db is lower than the trusted sequence 9" % local_state)
    assert local_state.read_bytes() == before
    higher = module_runner("trusted_state", _args(str(local_state), sequence=10, manifest_sha256=SHA_C,
                                                  payload_sha256=None))
    assert not higher.failed and higher["changed"] is True
    assert json.loads(local_state.read_text())["orders-db"]["sequence"] == 10


def test_local_equal_sequence_with_another_manifest_is_equivocation(module_runner, local_state):
    assert module_runner("trusted_state", _args(str(local_state)))["changed"] is True
    before = local_state.read_bytes()
    other = module_runner("trusted_state", _args(str(local_state), manifest_sha256=SHA_C, payload_sha256=SHA_C))
    assert other.failed and other["reason"] == "rollback"
    assert other["msg"].endswith("sequence 5 of orders-db was already accepted with a different manifest "
                                 "(sha256 %s): equivocation" % SHA_A)
    assert local_state.read_bytes() == before
    # the same Statement with another set of signatures is the same manifest
    cosigned = module_runner("trusted_state", _args(str(local_state), manifest_sha256=SHA_C))
    assert not cosigned.failed and cosigned["changed"] is False
    assert local_state.read_bytes() == before


@pytest.mark.parametrize("change, message", [
    ({"backup_set": "../x"}, "Backup_set '../x' is not valid"),
    ({"sequence": -1}, "sequence must be a non-negative integer, as in the manifest"),
    ({"manifest_sha256": "ABC"}, "manifest_sha256 must be 64 lowercase hex digits"),
    ({"payload_sha256": "x" * 64}, "payload_sha256 must be 64 lowercase hex digits"),
    ({"trusted_state": "s3://bucket/state.json?versionId=1"}, "trusted_state must not pin a versionId"),
])
def test_bad_input_fails_before_anything_is_read(module_runner, local_state, change, message):
    before = local_state.read_bytes()
    result = module_runner("trusted_state", dict(_args(str(local_state)), **change))
    assert result.failed and result["msg"].startswith(message), result["msg"]
    assert local_state.read_bytes() == before


def test_corrupt_local_state_fails_closed(module_runner, local_state):
    local_state.write_text("{not json")
    result = module_runner("trusted_state", _args(str(local_state)))
    assert result.failed and result["changed"] is False
    assert result["msg"].startswith("The trusted state %s is not valid: the trusted state is not valid JSON"
                                    % local_state)
    assert local_state.read_text() == "{not json"


def test_s3_created_when_missing_then_compare_and_set(module_runner, aws):
    s3 = aws("s3")
    bucket = create_versioned_bucket(s3)
    key = "state/%s.json" % unique("ts")
    uri = "s3://%s/%s" % (bucket, key)

    def body():
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    first = module_runner("trusted_state", _args(uri))
    assert not first.failed and first["changed"] is True, first
    assert body()["orders-db"]["sequence"] == 5
    other = module_runner("trusted_state", _args(uri, backup_set="payments-db", sequence=1))
    assert other["changed"] is True and set(body()) == {"orders-db", "payments-db"}
    lower = module_runner("trusted_state", _args(uri, sequence=4, manifest_sha256=SHA_C))
    assert lower.failed and lower["reason"] == "rollback"
    assert body()["orders-db"]["sequence"] == 5
    assert module_runner("trusted_state", _args(uri))["changed"] is False


def test_local_relative_path_is_made_absolute(module_runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = module_runner("trusted_state", _args("rel/state.json"))
    assert not result.failed and result["changed"] is True
    assert json.loads(Path(tmp_path / "rel" / "state.json").read_text())["orders-db"]["sequence"] == 5


def test_missing_state_directories_are_created_private(module_runner, tmp_path):
    location = tmp_path / "new" / "deeper" / "state.json"
    result = module_runner("trusted_state", _args(str(location)))
    assert not result.failed and result["changed"] is True, result
    assert oct(location.parent.stat().st_mode & 0o777) == oct(0o700)
    assert oct(location.parent.parent.stat().st_mode & 0o777) == oct(0o700)
    assert oct(location.stat().st_mode & 0o777) == oct(0o600)


def test_an_existing_state_directory_is_used_as_it_is(module_runner, local_state):
    local_state.parent.chmod(0o755)
    result = module_runner("trusted_state", _args(str(local_state)))
    assert not result.failed and result["changed"] is True, result
    assert oct(local_state.parent.stat().st_mode & 0o777) == oct(0o755)


def test_a_symlink_in_place_of_a_missing_state_directory_is_refused(module_runner, tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    result = module_runner("trusted_state", _args(str(tmp_path / "gone" / "state.json")))
    assert result.failed and result["changed"] is False
    assert result["msg"].startswith("Cannot write the trusted state %s: %s is a symlink; refusing to follow it"
                                    % (tmp_path / "gone" / "state.json", tmp_path / "gone")), result["msg"]
    assert not (tmp_path / "nowhere").exists()
