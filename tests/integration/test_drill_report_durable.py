"""drill_report's durable copy (copy_to): the report, alerts and state outlive the job's directory.

Against the emulator for S3 (Object Lock bucket, legal hold like the quarantine), and local paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

import pytest

COPIED = ("drill-report.json", "drill-report.md", "alerts.jsonl", "state.json", "runtime/state.json")


def _drill_id() -> str:
    return "dr-dur-%s" % uuid.uuid4().hex[:10]


def _output_dir(tmp_path, drill_id) -> Path:
    out = tmp_path / "job" / drill_id
    (out / "runtime").mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "job", 0o700)
    os.chmod(out, 0o700)
    (out / "state.json").write_text(json.dumps({"drill_id": drill_id, "region": "us-east-1"}))
    (out / "runtime" / "state.json").write_text(json.dumps({"prefix": "drg-abc", "state": "absent"}))
    (out / "alerts.jsonl").write_text(json.dumps({"type": "drguard.artifact.quarantined", "id": "1"}) + "\n")
    return out


def _args(out, drill_id, **kw):
    args = {"output_dir": str(out), "drill_id": drill_id, "region": "us-east-1",
            "started_at": "2026-11-29T00:00:00Z", "started_epoch": 1000.0,
            "phases": [{"name": "network", "started": 1001.0}], "teardown_started": 1002.0,
            "teardown": {"deleted": 3, "remaining": 0, "remaining_resources": []}}
    args.update(kw)
    return args


def _lock_bucket(s3, name, enabled=True):
    if enabled:
        s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    else:
        s3.create_bucket(Bucket=name)
    return name


def test_s3_copy_under_legal_hold_with_every_output(aws, module_runner, tmp_path):
    s3 = aws("s3")
    bucket = _lock_bucket(s3, "drg-reports-%s" % uuid.uuid4().hex[:8])
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    res = module_runner("drill_report", _args(out, drill_id, copy_to="s3://%s/drills/" % bucket))
    assert not res.failed, res
    assert res["headline"]["outcome"] == "passed"
    base = "drills/%s/" % drill_id
    assert res["headline"]["report_location"] == "s3://%s/%sdrill-report.json" % (bucket, base)
    assert res["durable"]["location"] == "s3://%s/%s" % (bucket, base)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"]}
    assert keys == {base + name for name in COPIED}
    for name in COPIED:
        head = s3.head_object(Bucket=bucket, Key=base + name)
        assert head["ObjectLockLegalHoldStatus"] == "ON", name
        body = s3.get_object(Bucket=bucket, Key=base + name)["Body"].read()
        assert body == (out / name).read_bytes(), name
    entries = {f["name"]: f for f in res["durable"]["files"]}
    assert set(entries) == set(COPIED)
    local = (out / "drill-report.json").read_bytes()
    assert entries["drill-report.json"]["sha256"] == hashlib.sha256(local).hexdigest()
    report = json.loads((out / "drill-report.json").read_text())
    assert report["durable"] == {"location": "s3://%s/%s" % (bucket, base), "error": None}


def test_s3_bucket_without_object_lock_fails_the_drill_and_keeps_the_local_report(aws, module_runner, tmp_path):
    s3 = aws("s3")
    bucket = _lock_bucket(s3, "drg-nolock-%s" % uuid.uuid4().hex[:8], enabled=False)
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    res = module_runner("drill_report", _args(out, drill_id, copy_to="s3://%s/drills/" % bucket))
    assert not res.failed, res
    assert res["headline"]["outcome"] == "failed"
    assert res["headline"]["failed_phase"] == "report"
    assert res["headline"]["report_location"] is None
    assert "Object Lock" in res["report"]["error"]
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    local = json.loads((out / "drill-report.json").read_text())
    assert local["outcome"] == "failed" and "Object Lock" in local["durable"]["error"]
    assert "Object Lock" in (out / "drill-report.md").read_text()


def test_a_failed_drill_keeps_its_own_reason_when_the_copy_also_fails(aws, module_runner, tmp_path):
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    res = module_runner("drill_report", _args(out, drill_id, failed_phase="verify", error="digest_mismatch",
                                              copy_to="s3://drg-missing-%s/x/" % uuid.uuid4().hex[:8]))
    assert res["headline"]["outcome"] == "failed"
    assert res["headline"]["failed_phase"] == "verify"
    assert res["report"]["error"] == "digest_mismatch"
    assert res["report"]["durable"]["error"]


def test_local_copy_private_and_identical(module_runner, tmp_path):
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    durable = tmp_path / "durable"
    res = module_runner("drill_report", _args(out, drill_id, copy_to=str(durable)))
    assert not res.failed, res
    assert res["headline"]["report_location"] == str(durable / drill_id / "drill-report.json")
    for name in COPIED:
        copy = durable / drill_id / name
        assert copy.read_bytes() == (out / name).read_bytes(), name
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600, name
    assert stat.S_IMODE((durable / drill_id).stat().st_mode) == 0o700


def test_missing_optional_outputs_are_not_invented(module_runner, tmp_path):
    drill_id = _drill_id()
    out = tmp_path / "job" / drill_id
    durable = tmp_path / "durable"
    res = module_runner("drill_report", _args(out, drill_id, copy_to=str(durable)))
    assert not res.failed, res
    assert sorted(p.name for p in (durable / drill_id).iterdir()) == ["drill-report.json", "drill-report.md"]


@pytest.mark.parametrize("where", ["inside", "relative", "symlink"])
def test_unusable_local_location_fails_the_drill(module_runner, tmp_path, where):
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    if where == "inside":
        location = str(out / "keep")
    elif where == "relative":
        location = "durable/reports"
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", tmp_path / "link")
        location = str(tmp_path / "link")
    res = module_runner("drill_report", _args(out, drill_id, copy_to=location))
    assert res["headline"]["outcome"] == "failed", res
    assert res["headline"]["failed_phase"] == "report"
    assert res["headline"]["report_location"] is None
    assert not (tmp_path / "elsewhere" / drill_id).exists()


def test_check_mode_copies_nothing(aws, module_runner, tmp_path):
    s3 = aws("s3")
    bucket = _lock_bucket(s3, "drg-check-%s" % uuid.uuid4().hex[:8])
    drill_id = _drill_id()
    out = _output_dir(tmp_path, drill_id)
    res = module_runner("drill_report", _args(out, drill_id, copy_to="s3://%s/d/" % bucket), check_mode=True)
    assert not res.failed, res
    assert res["headline"]["outcome"] == "passed"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
