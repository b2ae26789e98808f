"""The sandbox runtime end to end: a leak opened in the live runtime halts the drill before any backup is read.

Each leak is injected by tests/e2e/hooks/inject_runtime_leak.yml (drill_hook_after_runtime) into the
drill's router table after the runtime is built; runtime_verify must report it from the live ruleset,
a probe row must observe it, and the drill must alert, halt in the probes phase, tear down to zero
(cloud and runtime) and exit non-zero. Root only (namespaces and nftables), like the runtime itself.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from drillkit import path_without, remaining, run_drill, runtime_remaining

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ip", "nft", "setpriv")),
    reason="the netns runtime needs root and ip, nft and setpriv on PATH")

# Each leak: the runtime_verify finding codes, the probe violation codes, the destination of the rows it opens
# or closes. Accepted before the production drop, the bait's packets are not counted by production_drop either.
LEAKS = {
    "production_bait": ({"runtime_rule_undeclared", "runtime_production_not_dropped_first"},
                        {"production_reachable", "production_drop_not_counted"}, "production"),
    "fallback_blocked": ({"runtime_fallback_blocked"}, {"fallback_blocked"}, "fallback"),
    "undeclared_peer": ({"runtime_rule_undeclared"}, {"undeclared_reachable"}, "db"),
}


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_runtime_leak_halts_before_backup_is_read(world, tmp_path, leak):
    codes, violations, dst = LEAKS[leak]
    run = run_drill(world, tmp_path, extra={"drill_hook_after_runtime": "../tests/e2e/hooks/inject_runtime_leak.yml"},
                    env_extra={"DRGUARD_TEST_RUNTIME_LEAK": leak})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "probes", report["error"]
    # Halted before any backup byte was read: no identity, backup_mount or verify phase, no artifact results.
    assert [p["name"] for p in report["phases"]] == ["network", "prove", "runtime", "probes", "teardown"]
    assert report["artifacts"] is None

    runtime = report["runtime"]
    assert runtime["isolated"] is False
    assert {f["code"] for f in runtime["findings"]} == codes, runtime["findings"]
    wrong = [r for r in runtime["probes"] if r["observed"] != r["expected"]]
    assert wrong and dst in {r["dst"] for r in wrong}, wrong
    if leak == "production_bait":
        # Both ways: the tiers reach the bait, and the bait's own probes reach the tiers' ingress ports.
        assert all("production" in (r["src"], r["dst"]) for r in wrong), wrong
        bait = {r["address"].split(":")[0] for r in wrong if r["dst"] == "production"}
        assert len(bait) == 1 and {r["src"] for r in wrong if r["dst"] == "production"} == {
            u["tier"] for u in runtime["units"]}
    else:
        assert {r["dst"] for r in wrong} == {dst}, wrong
    if leak == "fallback_blocked":
        assert {(r["expected"], r["observed"]) for r in wrong} == {("allow", "deny")}
        assert all(r["reason"].startswith("fallback_blocked") for r in wrong)
        assert {r["src"] for r in wrong} == {u["tier"] for u in runtime["units"]}
    else:
        assert {(r["expected"], r["observed"]) for r in wrong} == {("deny", "allow")}
    if leak == "undeclared_peer":
        assert {r["src"] for r in wrong} == {"validation"}

    alerts = [json.loads(line) for line in (run.output_dir / "alerts.jsonl").read_text().splitlines()]
    assert [a["type"] for a in alerts] == ["drguard.boundary.violated"]
    assert {v["code"] for v in alerts[0]["data"]["violations"]} == violations
    assert {f["code"] for f in alerts[0]["data"]["findings"]} == codes

    assert report["teardown"]["remaining"] == 0
    assert remaining(world.emu, run.drill_id) == []
    left = runtime_remaining(run.drill_id)
    assert {"namespaces", "tables", "mounts", "processes"} <= set(left) and not any(left.values()), left


def _boundary(world, **change):
    return {"drill_boundary": dict(world.drill_vars["drill_boundary"], **change)}


@pytest.mark.parametrize("change,message", [
    ({"tier_rules": [{"from": "app", "to": "cache", "protocol": "tcp", "ports": [6379]}]},
     "drill_boundary.tier_rules[0].to: 'cache' is not a declared tier (app, db)"),
    ({"fallback": [{"cidr": "10.0.5.0/24", "protocol": "tcp", "ports": [443]}]},
     "drill_boundary.fallback[0]: 10.0.5.0/24 overlaps production CIDR(s) 10.0.0.0/16"),
], ids=["unknown_tier", "fallback_overlaps_production"])
def test_bad_runtime_input_fails_before_anything_is_created(world, tmp_path, change, message):
    run = run_drill(world, tmp_path, extra=_boundary(world, **change))
    assert run.rc != 0
    assert message in run.stdout, run.stdout[-3000:]
    assert not (tmp_path / run.drill_id).exists()
    assert "Phase network" not in run.stdout
    assert remaining(world.emu, run.drill_id) == []
    assert not any(runtime_remaining(run.drill_id).values())


def test_runtime_that_cannot_be_created_fails_before_the_network_is_built(world, tmp_path):
    """nft missing from PATH: as root the namespace manager looks tools up on PATH only (a user's drill also
    looks in /usr/sbin and /sbin), and every directory holding an nft is left out of the PATH given here.
    The runtime's host check, run before any phase, refuses before any VPC or namespace exists."""
    run = run_drill(world, tmp_path, env_extra={"PATH": path_without("nft")})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "failed" and report["failed_phase"] == "init", report["error"]
    assert ("the netns runtime cannot start: nft (package nftables) not found on PATH; install what is missing"
            in report["error"]), report["error"]
    assert [p["name"] for p in report["phases"]] == ["teardown"]
    assert "TASK [Phase network" not in run.stdout
    assert report["teardown"]["remaining"] == 0 and report["teardown"]["deleted"] == 0
    assert remaining(world.emu, run.drill_id) == []
    assert not any(runtime_remaining(run.drill_id).values())
