"""drill_context and drill_report: inputs, phase accounting, RTO/RPO, rendering."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils._telemetry import cloud_event
from ansible_collections.drguard.sandbox.plugins.module_utils.report import (
    build_phases,
    decide_outcome,
    measure,
    overhead,
    render_markdown,
    runtime_section,
)

BOUNDARY = {"production_cidrs": ["10.0.0.0/16"]}
# A directory readable by the group, as a umask of 027 would leave it.
LOOSE_DIR_MODE = 0o750


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
    assert state == {"drill_id": res["drill_id"], "region": "us-east-1", "started_at": res["started_at"],
                     "expires_at": res["expires_at"]}
    assert stat.S_IMODE(os.stat(res["state_file"]).st_mode) == 0o600
    assert res["boundary"]["production_cidrs"] == ["10.0.0.0/16"]


def test_drill_context_rejects_bad_boundary_before_creating_anything(tmp_path):
    res = run_module("drill_context", {"output_root": str(tmp_path / "out"), "region": "us-east-1",
                                       "boundary": {"production_cidrs": ["10.0.0.0/16"],
                                                    "sandbox_cidr": "10.0.128.0/20"}})
    assert res.failed and "overlaps production" in res["msg"]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_drill_context_creates_output_root_and_its_parents_0700_under_umask_002(tmp_path, umask_002):
    root = tmp_path / "runs" / "dr"
    res = run_module("drill_context", {"output_root": str(root), "boundary": BOUNDARY, "region": "us-east-1"})
    assert not res.failed, res
    modes = [stat.S_IMODE(os.lstat(p).st_mode) for p in (tmp_path / "runs", root, Path(res["output_dir"]))]
    assert modes == [0o700, 0o700, 0o700]


def test_drill_context_refuses_an_output_root_that_is_a_symlink_and_creates_nothing(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, LOOSE_DIR_MODE)
    os.symlink(elsewhere, tmp_path / "runs")
    for check_mode in (True, False):
        res = run_module("drill_context", {"output_root": str(tmp_path / "runs"), "boundary": BOUNDARY,
                                           "region": "us-east-1"}, check_mode=check_mode)
        assert res.failed and "runs is a symlink" in res["msg"], res
    assert os.listdir(elsewhere) == [] and stat.S_IMODE(os.stat(elsewhere).st_mode) == LOOSE_DIR_MODE


def test_drill_context_refuses_a_planted_drill_directory_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "dr-planted-1")
    res = run_module("drill_context", {"output_root": str(tmp_path), "boundary": BOUNDARY, "region": "us-east-1",
                                       "drill_id": "dr-planted-1"})
    assert res.failed and "dr-planted-1 is a symlink" in res["msg"], res
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_drill_context_refuses_an_output_root_owned_by_another_user(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    os.chown(root, 4242, 4242)
    res = run_module("drill_context", {"output_root": str(root), "boundary": BOUNDARY, "region": "us-east-1"})
    assert res.failed and "owned by uid 4242" in res["msg"], res
    assert os.listdir(root) == []


def test_drill_context_tightens_an_existing_output_root_of_ours(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    os.chmod(root, LOOSE_DIR_MODE)
    res = run_module("drill_context", {"output_root": str(root), "boundary": BOUNDARY, "region": "us-east-1"})
    assert not res.failed, res
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700


def test_drill_context_rejects_bad_drill_id(tmp_path):
    res = run_module("drill_context", {"output_root": str(tmp_path), "region": "us-east-1",
                                       "boundary": BOUNDARY, "drill_id": "Bad_ID"})
    assert res.failed and "drill_id" in res["msg"]


def _report_args(tmp_path, **kw):
    args = {"output_dir": str(tmp_path), "drill_id": "dr-test-1", "region": "us-east-1",
            "started_at": "2026-11-29T00:00:00Z", "started_epoch": 1000.0,
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
    assert [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("drill-report.json", "drill-report.md")] == [
        0o600, 0o600]
    md = (tmp_path / "drill-report.md").read_text()
    assert "# Drill report: dr-test-1" in md and "**passed**" in md
    assert res["headline"]["teardown_remaining"] == 0


def test_report_refuses_an_output_dir_that_is_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "out")
    res = run_module("drill_report", _report_args(tmp_path / "out"))
    assert res.failed and "out is a symlink" in res["msg"], res
    assert os.listdir(elsewhere) == []


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


def test_report_passes_when_every_phase_and_the_teardown_passed(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, teardown_started=1005.0))
    assert res["headline"]["outcome"] == "passed"
    assert res["report"]["failed_phase"] is None and res["report"]["error"] is None
    assert [(p["name"], p["status"]) for p in res["report"]["phases"]] == [
        ("network", "passed"), ("teardown", "passed")]


def test_report_halted_by_a_safety_gate(tmp_path):
    res = run_module("drill_report", _report_args(
        tmp_path, halted=True, failed_phase="prove", error="The sandbox is not isolated",
        phases=[{"name": "network", "started": 1001.0}, {"name": "prove", "started": 1002.0}], teardown_started=1003.0))
    assert res["headline"]["outcome"] == "halted"
    assert (res["report"]["failed_phase"], res["report"]["error"]) == ("prove", "The sandbox is not isolated")
    assert [(p["name"], p["status"]) for p in res["report"]["phases"]] == [
        ("network", "passed"), ("prove", "failed"), ("teardown", "passed")]


def test_report_failed_phase_wins_over_a_failed_teardown(tmp_path):
    res = run_module("drill_report", _report_args(
        tmp_path, failed_phase="network", error="fault injected in phase network", teardown_started=1003.0,
        teardown_error="Teardown of drill dr-test-1 is incomplete: boom"))
    assert res["headline"]["outcome"] == "failed"
    assert (res["report"]["failed_phase"], res["report"]["error"]) == ("network", "fault injected in phase network")
    assert [(p["name"], p["status"]) for p in res["report"]["phases"]] == [
        ("network", "failed"), ("teardown", "failed")]


def test_report_teardown_error_fails_the_drill(tmp_path):
    res = run_module("drill_report", _report_args(
        tmp_path, teardown_started=1003.0, teardown_error="Teardown of drill dr-test-1 is incomplete: revoking failed"))
    assert res["headline"]["outcome"] == "failed"
    assert res["report"]["failed_phase"] == "teardown"
    assert res["report"]["error"] == "Teardown of drill dr-test-1 is incomplete: revoking failed"
    assert (res["report"]["phases"][-1]["name"], res["report"]["phases"][-1]["status"]) == ("teardown", "failed")


@pytest.mark.parametrize("given,expected", [
    ({}, ("passed", None, None)),
    ({"halted": True, "failed_phase": "verify", "error": "e"}, ("halted", "verify", "e")),
    ({"failed_phase": "restore", "error": None}, ("failed", "restore", "unknown error")),
    ({"teardown_error": "t"}, ("failed", "teardown", "t")),
    ({"teardown": None}, ("failed", "teardown", "teardown did not prove that zero resources remain")),
    ({"teardown": {"remaining": None}}, ("failed", "teardown", "teardown did not prove that zero resources remain")),
    ({"recovery": {"rto": {"met": False}, "rpo": {"met": False}}},
     ("failed", "recovery", "RTO and RPO target not met")),
    ({"recovery": {"rto": {"met": None}, "rpo": {"met": True}}}, ("passed", None, None)),
])
def test_decide_outcome(given, expected):
    args = {"halted": False, "failed_phase": None, "error": None, "teardown": {"remaining": 0},
            "teardown_error": None, "recovery": {"rto": {"met": True}, "rpo": {"met": None}}}
    args.update(given)
    assert decide_outcome(**args) == expected


def test_overhead_splits_boundary_work_from_recovery_work():
    phases = [{"name": "network", "seconds": 1.5}, {"name": "prove", "seconds": 0.5},
              {"name": "runtime", "seconds": 1.0}, {"name": "probes", "seconds": 2.0},
              {"name": "mtls", "seconds": 1.0}, {"name": "identity", "seconds": 9.0},
              {"name": "restore", "seconds": 3.0}, {"name": "validate", "seconds": 2.0},
              {"name": "teardown", "seconds": None}]
    assert overhead(phases) == {
        "boundary_seconds": 6.0, "recovery_seconds": 5.0, "boundary_share": 0.545,
        "boundary_phases": {"network": 1.5, "prove": 0.5, "runtime": 1.0, "probes": 2.0, "mtls": 1.0},
        "recovery_phases": {"restore": 3.0, "validate": 2.0}}
    assert overhead([])["boundary_share"] is None


ROWS = [{"src": "app", "dst": "production", "address": "10.0.0.1:5432", "layer": "l4", "expected": "deny",
         "observed": "deny", "reason": "timed out", "latency_ms": 1000.0},
        {"src": "app", "dst": "db", "address": "10.9.0.18:5432", "layer": "l4", "expected": "allow",
         "observed": "allow", "reason": "connected", "latency_ms": 0.4}]


def _collector_file(tmp_path):
    """A collector's file as the collector writes it: valid events with receivedat, and one corrupt line."""
    def event(kind):
        return dict(cloud_event(kind, "/drguard/drill/dr-test-1", "app", {"x": 1}), receivedat="2026-11-30T00:00:00Z")
    path = tmp_path / "telemetry.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (
        event("drguard.probe.result"), event("drguard.probe.result"), event("drguard.phase.finished"))) + "{oops\n")
    return path


def test_report_carries_runtime_probes_telemetry_and_overhead(tmp_path):
    res = run_module("drill_report", _report_args(
        tmp_path, phases=[{"name": "network", "started": 1001.0}, {"name": "runtime", "started": 1002.0},
                          {"name": "restore", "started": 1004.0}],
        runtime={"backend": "netns", "prefix": "drg-abc123-", "rules": 14, "changed": True,
                 "units": [{"tier": "app", "ns": "drg-abc123-app", "address": "10.9.0.2", "veth": "x"}]},
        runtime_verify={"isolated": True, "findings": []},
        probes={"rows": ROWS, "violations": [], "counters": {"delta": {"production_drop": 3}}},
        telemetry_path=str(_collector_file(tmp_path))))
    assert not res.failed, res
    rt = res["report"]["runtime"]
    assert rt["backend"] == "netns" and rt["isolated"] is True and rt["violations"] == 0
    assert rt["units"] == [{"tier": "app", "ns": "drg-abc123-app", "address": "10.9.0.2"}]
    ec2 = runtime_section({"backend": "ec2", "units": [{"tier": "app", "instance_id": "i-0abc",
                                                               "address": "10.9.0.2", "subnet_id": "subnet-1"}]},
                                 None, None)
    assert ec2["units"] == [{"tier": "app", "instance_id": "i-0abc", "address": "10.9.0.2"}]
    assert rt["probes"] == ROWS and rt["counters"]["delta"] == {"production_drop": 3}
    assert res["report"]["telemetry"]["by_type"] == {"drguard.probe.result": 2, "drguard.phase.finished": 1}
    assert res["report"]["telemetry"]["events"] == 3 and res["report"]["telemetry"]["corrupt"] == 1
    assert res["report"]["overhead"]["boundary_phases"] == {"network": 1.0, "runtime": 2.0}
    assert res["headline"]["runtime_backend"] == "netns" and res["headline"]["probe_violations"] == 0
    md = (tmp_path / "drill-report.md").read_text()
    assert "| app | production | 10.0.0.1:5432 | deny | deny | timed out | 1000.0 |" in md
    assert "production_drop +3" in md and "| drguard.probe.result | 2 |" in md
    assert "## Boundary overhead" in md


def test_report_says_when_nothing_ran_inside(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, runtime={"backend": "none", "units": []}))
    assert res["report"]["runtime"]["note"].startswith("runtime backend none: nothing ran inside the boundary")
    assert "nothing ran inside the boundary" in (tmp_path / "drill-report.md").read_text()
    assert run_module("drill_report", _report_args(tmp_path))["report"]["runtime"] is None


def test_report_says_when_the_telemetry_file_cannot_be_counted(tmp_path):
    res = run_module("drill_report", _report_args(tmp_path, telemetry_path=str(tmp_path / "missing.jsonl")))
    assert res["report"]["telemetry"]["events"] is None
    assert "cannot be read" in res["report"]["telemetry"]["error"]
    assert "Not counted: telemetry file" in (tmp_path / "drill-report.md").read_text()
