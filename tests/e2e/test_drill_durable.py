"""drill.yml end to end with drill_report_location: the outputs outlive the job's directory."""

from __future__ import annotations

import json
import uuid

import pytest

from drillkit import emulator_session, remaining, run_drill

pytestmark = pytest.mark.slow


def test_drill_copies_its_outputs_to_an_object_lock_prefix(world, tmp_path):
    s3 = emulator_session().client("s3", endpoint_url=world.emu.url)
    bucket = "drg-e2e-reports-%s" % uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    run = run_drill(world, tmp_path, extra={"drill_report_location": "s3://%s/drills/" % bucket})
    assert run.rc == 0, run.stdout[-4000:]
    report = run.report
    base = "drills/%s/" % run.drill_id
    assert report["outcome"] == "passed"
    assert report["durable"] == {"location": "s3://%s/%s" % (bucket, base), "error": None}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"]}
    assert {base + "drill-report.json", base + "drill-report.md", base + "state.json"} <= keys
    copy = s3.get_object(Bucket=bucket, Key=base + "drill-report.json")
    assert json.loads(copy["Body"].read()) == report
    assert s3.head_object(Bucket=bucket, Key=base + "drill-report.json")["ObjectLockLegalHoldStatus"] == "ON"
    assert remaining(world.emu, run.drill_id) == []


def test_an_empty_location_as_awx_sends_it_means_no_copy(world, tmp_path):
    run = run_drill(world, tmp_path, extra={"drill_report_location": ""})
    assert run.rc == 0, run.stdout[-4000:]
    assert run.report["outcome"] == "passed"
    assert "durable" not in run.report
