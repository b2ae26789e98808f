"""drill_context and drill_report: inputs, phase accounting, RTO/RPO, rendering."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils.report import build_phases, measure, render_markdown

BOUNDARY = {"production_cidrs": ["10.0.0.0/16"]}


def test_phases_end_where_next_starts_and_failed_phase_marks_rest_skipped():
    marks = [{"name": "network", "started": 100.0}, {"name": "prove", "started": 103.5},
             {"name": "identity", "started": 104.0}]
    phases = build_phases(marks, 110.0, "prove")
    assert [(p["name"], p["status"], p["seconds"]) for p in phases] == [
        ("network", "passed", 3.5), ("prove", "failed", 0.5), ("identity", "skipped", 6.0)]


def test_explicit_status_and_finished_win():
    phases = build_phases([{"name": "teardown", "started": 1.0, "finished": 3.0, "status": "failed"}], 9.0, None)
    assert phases == [{"name": "teardown", "status": "failed", "seconds": 2.0}]


def test_measure_rto_rpo_against_targets():
    m = measure({"rto_seconds": 60, "rpo_seconds": 10}, 1000.0, 1030.0, 980.0)
    assert m["rto"] == {"measured_seconds": 30.0, "target_seconds": 60, "met": True}
    assert m["rpo"] == {"measured_seconds": 20.0, "target_seconds": 10, "met": False}


def test_unmeasured_rto_does_not_meet_its_target():
    m = measure({"rto_seconds": 60}, 1000.0, None, None)
    assert m["rto"]["met"] is False
    assert m["rpo"]["met"] is None


def test_drill_context_generates_id_and_private_output_dir(tmp_path):
    res = run_module("drill_context", {"output_root": str(tmp_path), "boundary": BOUNDARY, "region": "us-east-1"})
    assert not res.failed, res
    assert res["drill_id"].startswith("dr-")
    assert stat.S_IMODE(os.stat(res["output_dir"]).st_mode) == 0o700
    state = json.loads(Path(res["state_file"]).read_text())
    assert state["drill_id"] == res["drill_id"] and state["extra_resources"] == []
    assert res["boundary"]["production_cidrs"] == ["10.0.0.0/16"]


def test_drill_context_rejects_bad_boundary_before_creating_anything(tmp_path):
    res = run_module("drill_context", {"output_root": str(tmp_path / "out"), "region": "us-east-1",
                                       "boundary": {"production_cidrs": ["10.0.0.0/16"],
                                                    "sandbox_cidr": "10.0.128.0/20"}})
    assert res.failed and "overlaps production" in res["msg"]
    assert not (tmp_path / "out").exists()


def test_drill_context_rejects_bad_drill_id(tmp_path):
    res = run_module("drill_context", {"output_root": str(tmp_path), "region": "us-east-1",
                                       "boundary": BOUNDARY, "drill_id": "Bad_ID"})
    assert res.failed and "drill_id" in res["msg"]


def _report_args(tmp_path, **kw):
    args = {"output_dir": str(tmp_path), "drill_id": "dr-test-1", "region": "us-east-1",
            "started_at": "2026-11-29T00:00:00Z", "started_epoch": 1000.0, "outcome": "passed",
            "phases": [{"name": "network", "started": 1001.0}],
            "teardown": {"deleted": 12, "remaining": 0, "remaining_resources": []}}
    args.update(kw)
    return args


def test_report_written_json_and_markdown(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, boundary={"isolated": True, "vpc_id": "vpc-1",
                                                                      "findings": [], "changed": False}))
    assert not res.failed, res
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert report["outcome"] == "passed" and report["teardown"]["remaining"] == 0
    assert report["boundary"] == {"isolated": True, "vpc_id": "vpc-1", "findings": []}
    md = (tmp_path / "drill-report.md").read_text()
    assert "# Drill report: dr-test-1" in md and "**passed**" in md
    assert res["headline"]["teardown_remaining"] == 0


def test_report_fails_closed_when_teardown_left_something(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, teardown={"deleted": 3, "remaining": 1,
                                                                      "remaining_resources": [
                                                                          {"type": "vpc", "id": "vpc-9"}]}))
    assert res["headline"]["outcome"] == "failed"
    assert res["report"]["failed_phase"] == "teardown"
    assert "vpc-9" in (tmp_path / "drill-report.md").read_text()


def test_report_fails_closed_when_teardown_never_ran(tmp_path):
    args = _report_args(tmp_path)
    del args["teardown"]
    assert run_module("drill_report", args)["headline"]["outcome"] == "failed"


def test_report_missed_rto_target_fails_the_drill(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, targets={"rto_seconds": 5}, recovered_epoch=1100.0))
    assert res["headline"]["outcome"] == "failed" and "RTO" in res["report"]["error"]


def test_render_handles_halted_report():
    md = render_markdown({"drill_id": "d", "outcome": "halted", "started_at": "a", "finished_at": "b",
                          "seconds": 1, "failed_phase": "verify", "error": "digest | mismatch",
                          "phases": [], "quarantine": [{"name": "x", "reason": "digest_mismatch",
                                                         "quarantine_location": "s3://q/x"}]})
    assert "digest \\| mismatch" in md and "s3://q/x" in md
