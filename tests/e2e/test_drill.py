"""playbooks/drill.yml end to end on the emulator."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT

from drillkit import remaining, run_drill, runtime_remaining, seed_world

# Each leak and exactly the finding codes it must produce (a route to 0.0.0.0/0 also
# reaches production; a rule on the default group is also judged as a rule).
LEAKS = {
    "igw_route": {"route_igw", "igw_attached", "route_to_production"},
    "nat_route": {"route_nat", "nat_gateway_present", "route_to_production"},
    "peering_route": {"route_peering", "peering_active", "route_to_production"},
    "tgw_route": {"route_tgw", "tgw_attachment", "route_to_production"},
    "sg_egress_open": {"sg_egress_open"},
    "default_sg_rules": {"default_sg_has_rules", "sg_ingress_open"},
    "nacl_no_production_deny": {"nacl_missing_production_deny"},
    "map_public_ip": {"subnet_public_ip"},
    "endpoint_allow_all": {"endpoint_policy_open"},
}
# The phase list as playbooks/drill.yml names it (phases are added there, e.g. mtls); the passing drill
# checks the order that matters: the runtime and its probes right after the proof, before any backup is read.
PHASES = yaml.safe_load((ROOT / "playbooks" / "drill.yml").read_text())[0]["vars"]["_drill_phases"]


def _no_leftovers(world, drill_id):
    assert remaining(world.emu, drill_id) == []
    left = runtime_remaining(drill_id)
    assert not any(left.values()), left


def test_drill_passes_and_leaves_nothing(world, tmp_path):
    run = run_drill(world, tmp_path)
    assert run.rc == 0, run.stdout[-4000:]
    report = run.report
    assert report["outcome"] == "passed"
    assert [p["name"] for p in report["phases"]] == PHASES + ["teardown"]
    assert PHASES[:4] == ["network", "prove", "runtime", "probes"]
    assert PHASES[-5:] == ["identity", "backup_mount", "verify", "restore", "validate"]
    assert all(p["status"] == "passed" for p in report["phases"])
    assert report["boundary"]["isolated"] is True
    runtime = report["runtime"]
    assert runtime["backend"] == "netns" and runtime["isolated"] is True and runtime["findings"] == []
    assert {u["tier"] for u in runtime["units"]} == {"app", "db", "validation"}
    assert runtime["probes"] and runtime["violations"] == 0
    assert [r for r in runtime["probes"] if r["observed"] != r["expected"]] == []
    targets = {r["dst"] for r in runtime["probes"]}
    assert {"production", "control_plane", "telemetry", "fallback", "dns", "db", "s3_endpoint"} <= targets, targets
    # The demo grants s3_read: the restore ran inside the validation tier, through the S3 endpoint.
    assert report["validation"]["restore_inside"] == runtime["prefix"] + "validation"
    assert report["artifacts"]["verified"] is True
    assert {a["name"] for a in report["artifacts"]["artifacts"]} == {"orders.sqlite", "files.tar"}
    assert report["teardown"]["remaining"] == 0 and report["teardown"]["deleted"] > 0
    assert report["recovery"]["rto"]["measured_seconds"] > 0 and report["recovery"]["rto"]["met"] is True
    assert (run.output_dir / "drill-report.md").exists()
    assert "Report: " in run.stdout
    assert not (run.output_dir / "restore").exists()
    _no_leftovers(world, run.drill_id)


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_leak_halts_before_backup_is_touched(world, tmp_path, leak):
    run = run_drill(world, tmp_path, extra={"drill_hook_after_network": "../tests/e2e/hooks/inject_leak.yml"},
                    env_extra={"DRGUARD_TEST_LEAK": leak})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "prove", report["error"]
    codes = {f["code"] for f in report["boundary"]["findings"]}
    assert codes == LEAKS[leak], report["boundary"]["findings"]
    # Halted before any backup byte was read: no verify phase, no artifact results.
    assert [p["name"] for p in report["phases"]] == ["network", "prove", "teardown"]
    assert report["artifacts"] is None
    assert report["teardown"]["remaining"] == 0
    alerts = [json.loads(line) for line in (run.output_dir / "alerts.jsonl").read_text().splitlines()]
    assert [a["type"] for a in alerts] == ["drguard.boundary.violated"]
    _no_leftovers(world, run.drill_id)


@pytest.mark.parametrize("phase", PHASES)
def test_failure_in_any_phase_still_tears_down(world, tmp_path, phase):
    run = run_drill(world, tmp_path, extra={"drill_fault_phase": phase})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "failed"
    assert report["failed_phase"] == phase
    assert "fault injected in phase %s" % phase in report["error"]
    statuses = {p["name"]: p["status"] for p in report["phases"]}
    assert statuses[phase] == "failed" and statuses["teardown"] == "passed"
    assert report["teardown"]["remaining"] == 0
    _no_leftovers(world, run.drill_id)


@pytest.mark.parametrize("change,drop,message", [
    ({"drill_boundary": {"production_cidrs": ["10.0.0.0/16"], "sandbox_cidr": "10.0.0.0/20"}}, (),
     "overlaps production"),
    ({"drill_boundary": {"production_cidrs": ["10.0.0.0/33"]}}, (), "not a valid CIDR"),
    ({"drill_boundary": {"production_cidrs": ["0.0.0.0/0"]}}, (), "cover all of IPv4"),
    ({}, ("drill_region",), "missing required arguments: drill_region"),
    ({"drill_regoin": "us-east-1"}, (), "drill_regoin"),
])
def test_bad_input_fails_before_anything_is_created(world, tmp_path, change, drop, message):
    run = run_drill(world, tmp_path, extra=change, drop=drop)
    assert run.rc != 0
    assert message in run.stdout, run.stdout[-3000:]
    assert not (tmp_path / run.drill_id).exists()
    assert "Phase network" not in run.stdout


def test_no_credentials_fails_before_anything_is_created(world, tmp_path):
    run = run_drill(world, tmp_path, env_extra={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                                                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                                                "AWS_CONFIG_FILE": "/nonexistent"})
    assert run.rc != 0
    assert "No usable AWS credentials" in run.stdout, run.stdout[-3000:]
    assert not (tmp_path / run.drill_id).exists()
    assert "Phase network" not in run.stdout


def test_tampered_backup_halts_quarantines_and_alerts(e2e_emulator, tmp_path):
    tampered = seed_world(e2e_emulator, tmp_path / "world", mode="tampered")
    run = run_drill(tampered, tmp_path / "runs")
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "verify"
    reasons = {f["name"]: f["reason"] for f in report["artifacts"]["failures"]}
    assert reasons.get("files.tar") in ("digest_mismatch", "metadata_mismatch"), reasons
    assert report["quarantine"], "no quarantine record"
    alerts = [json.loads(line) for line in (run.output_dir / "alerts.jsonl").read_text().splitlines()]
    assert "drguard.artifact.quarantined" in {a["type"] for a in alerts}
    assert report["teardown"]["remaining"] == 0
    _no_leftovers(tampered, run.drill_id)
