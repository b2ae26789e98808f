"""Many drills in one run: each inventory host of the group `drills` is one drill (docs/scale-out.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from drillkit import new_drill_id, remaining, run_drills, runtime_remaining

pytestmark = pytest.mark.slow


def _custom_stats(stdout: str) -> dict:
    """The run's aggregated set_stats figures as ansible-playbook prints them (ANSIBLE_SHOW_CUSTOM_STATS)."""
    text = stdout.split("CUSTOM STATS:", 1)[1]
    return json.JSONDecoder().raw_decode(text[text.index("RUN:") + 4:].strip())[0]


def test_drills_run_side_by_side_and_one_failure_stops_only_itself(world, tmp_path):
    # Two drills declare the same sandbox CIDR (separate VPCs, separate namespaces: nothing shared); the third
    # gets one derived from its id.
    same = dict(world.drill_vars["drill_boundary"], sandbox_cidr="10.77.0.0/16")
    hosts = {"db-eu": {"drill_boundary": same}, "db-us": {"drill_boundary": same},
             "db-broken": {"drill_fault_phase": "restore"}}
    run = run_drills(world, tmp_path, hosts, forks=3)
    recap = run.recap()
    # One drill failed; the job says which, and the others passed all the same.
    assert run.rc != 0
    assert {h: recap[h]["failed"] > 0 for h in hosts} == {"db-eu": False, "db-us": False, "db-broken": True}, \
        run.stdout[-5000:]
    stats = _custom_stats(run.stdout)["drills"]
    assert set(stats) == set(hosts)
    assert {h: stats[h]["outcome"] for h in hosts} == {"db-eu": "passed", "db-us": "passed", "db-broken": "failed"}
    assert "drill" not in _custom_stats(run.stdout)  # the one-drill key is not the last host's figures
    ids = {h: stats[h]["drill_id"] for h in hosts}
    assert len(set(ids.values())) == 3
    reports = {r["drill_id"]: r for r in run.reports.values()}
    assert set(reports) == set(ids.values())
    # Names that must never collide: runtime prefixes, VPCs, roles; and every drill tore down its own.
    prefixes = {reports[i]["runtime"]["prefix"] for i in ids.values()}
    assert len(prefixes) == 3
    assert len({reports[i]["identity"]["role_arn"] for i in ids.values()}) == 3
    for drill_id in ids.values():
        assert reports[drill_id]["teardown"]["remaining"] == 0, drill_id
        assert remaining(world.emu, drill_id) == []
        assert all(not v for v in runtime_remaining(drill_id).values()), drill_id
        assert not Path("/dev/shm/drguard-%s" % drill_id).exists(), drill_id  # secret store and PKI
    assert reports[ids["db-broken"]]["failed_phase"] == "restore"


def test_two_drill_hosts_with_one_id_are_refused_before_anything_exists(world, tmp_path):
    shared = new_drill_id()
    run = run_drills(world, tmp_path, {"a": {"drill_id": shared}, "b": {"drill_id": shared}, "c": {}}, forks=3,
                     args=("-e", "drill_fault_phase=network"))
    assert run.rc != 0
    text = re.sub(r"\s+", " ", run.stdout)
    assert "drill_id %s is also the drill_id of b in this run" % shared in text, run.stdout[-3000:]
    assert "drill_id %s is also the drill_id of a in this run" % shared in text
    assert run.recap()["a"]["ok"] == run.recap()["b"]["ok"] == 2  # inputs only: nothing else ran
    assert not (tmp_path / shared).exists()
    assert remaining(world.emu, shared) == []
    assert all(not v for v in runtime_remaining(shared).values())
