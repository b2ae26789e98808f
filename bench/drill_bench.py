#!/usr/bin/env python3
"""Benchmark: a whole drill on the emulator, split by phase, with its AWS API call count,
beside the floor (the same provision / prove / teardown work from one plain boto3 script).

Figures, not assertions: prints a table and writes bench/results/drill-<time>.json.
The teardown gets its own lines: the phase (from the drill's report), the teardown task
(``drill_teardown``, start to end, as Ansible timed it: process start-up included), the
module's own ``seconds`` and each step's, with their share of the whole drill. The play runs
with the ``ansible.posix.json`` stdout callback so that the module's result can be read back.

``--sweep-only`` times the sweep module alone instead: each run builds one resource of
every supported type for a new drill (tests/integration/test_sweep.py's ``build_world``:
VPC, peer VPC, subnet, IGW, route table, NACL, 2 SGs, ENI, EIP, NAT, instance, endpoint,
peering, TGW attachment, VPN gateway, flow log, log group, IAM role/policy/profile,
secret, KMS key, versioned bucket, topic) and runs ``drguard.sandbox.sweep`` on it
in-process (its ``main()``, client construction included, no Ansible process).
Usage: .venv/bin/python bench/drill_bench.py [--runs N] [--sweep-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections"), str(ROOT / "tools"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e"),
                str(ROOT / "bench")]

from drillkit import run_drill, seed_world  # noqa: E402
from emulator import Emulator, child_env  # noqa: E402

TEARDOWN_ACTIONS = ("drguard.sandbox.drill_teardown", "drill_teardown")


def sweep_only(runs: int) -> int:
    """Time the sweep module alone on worlds with one resource of every supported type."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from conftest import run_module
    from test_sweep import FUTURE, build_world, new_id

    from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags

    results = []
    with Emulator() as emu:
        env_backup = dict(os.environ)
        os.environ.update(child_env(emu.url))
        try:
            for i in range(runs):
                drill = new_id("drbench")
                world = build_world(emu.client, drill, drill_tags(drill, FUTURE), 100 + 2 * i)
                emu.calls(reset=True)
                t0 = time.perf_counter()
                res = run_module("sweep", {"drill_id": drill, "timeout": 300})
                wall = time.perf_counter() - t0
                results.append({"module_seconds": res.get("seconds"), "wall_seconds": round(wall, 3),
                                "counts": res.get("counts"), "failed": res.failed,
                                "api_calls": emu.calls()["total"]})
                emu.client("iam").delete_instance_profile(InstanceProfileName=world["foreign_profile"])
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
    for i, r in enumerate(results):
        print("run %d: sweep module %.2f s (in-process wall %.2f s), %d API calls, counts %s%s" % (
            i, r["module_seconds"] or 0, r["wall_seconds"], r["api_calls"], json.dumps(r["counts"]),
            ", FAILED" if r["failed"] else ""))
    print("sweep module, one of every supported type: median %.2f s over %d run(s)" % (
        statistics.median(r["module_seconds"] or 0 for r in results), len(results)))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("sweep-%s.json" % time.strftime("%Y%m%dT%H%M%S"))
    path.write_text(json.dumps({"runs": results}, indent=2))
    print("written:", path.relative_to(ROOT))
    return 1 if any(r["failed"] for r in results) else 0


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def teardown_figures(stdout: str) -> dict:
    """The teardown task's wall seconds, the module's own ``seconds`` and each step's, from the json callback."""
    none = {"task_seconds": None, "module_seconds": None, "steps": {}}
    try:
        played = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        return none
    for play in played.get("plays") or []:
        for task in play.get("tasks") or []:
            for result in (task.get("hosts") or {}).values():
                if result.get("action") in TEARDOWN_ACTIONS and "steps" in result:
                    duration = task["task"]["duration"]
                    return {"task_seconds": round(_when(duration["end"]) - _when(duration["start"]), 3),
                            "module_seconds": result.get("seconds"),
                            "steps": {k: v.get("seconds") for k, v in result["steps"].items()}}
    return none


def _share(part, whole) -> str:
    return "%.2f s (%.0f %% of the drill)" % (part, 100.0 * part / whole) if part is not None and whole else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--sweep-only", action="store_true",
                        help="time the sweep module alone on one resource of every supported type")
    args = parser.parse_args()
    if args.sweep_only:
        return sweep_only(args.runs)
    results = []
    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        world = seed_world(emu, Path(tmp) / "world")
        for i in range(args.runs):
            emu.calls(reset=True)
            t0 = time.perf_counter()
            run = run_drill(world, Path(tmp) / ("run%d" % i),
                            env_extra={"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"})
            wall = time.perf_counter() - t0
            calls = emu.calls()
            try:
                report = run.report
            except FileNotFoundError:
                print("the drill wrote no report (exit code %d); its output ends with:\n%s\n%s"
                      % (run.rc, run.stdout[-3000:], run.stderr[-2000:]), file=sys.stderr)
                return 1
            phases = {p["name"]: p["seconds"] for p in report["phases"]}
            results.append({"outcome": report["outcome"], "wall_seconds": round(wall, 2),
                            "drill_seconds": report["seconds"], "phases": phases, "api_calls": calls,
                            "teardown": teardown_figures(run.stdout)})
        env_backup = dict(os.environ)
        os.environ.update(child_env(emu.url))
        try:
            import boto3_floor
            floor = boto3_floor.run()
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
    last = results[-1]
    ppt = sum(last["phases"].get(k, 0) or 0 for k in ("network", "prove", "teardown"))
    floor_ppt = floor["total"]
    print("drill outcome: %s; wall %.1f s (ansible-playbook process), drill %.1f s" % (
        last["outcome"], last["wall_seconds"], last["drill_seconds"]))
    print("%-14s %10s" % ("phase", "seconds"))
    for name, sec in last["phases"].items():
        print("%-14s %10.2f" % (name, sec or 0))
    print("provision+prove+teardown: %.2f s (target <= 60 s)" % ppt)
    drill_s = last["drill_seconds"]
    print("teardown phase: %s (target <= 3 s)" % _share(last["phases"].get("teardown"), drill_s))
    print("  teardown task (Ansible, start to end): %s" % _share(last["teardown"]["task_seconds"], drill_s))
    print("  drill_teardown module (its own seconds): %s" % _share(last["teardown"]["module_seconds"], drill_s))
    print("  steps: %s" % ", ".join("%s %.2f s" % (k, v or 0) for k, v in last["teardown"]["steps"].items()))
    if args.runs > 1:
        print("teardown phase over %d runs: %s" % (args.runs, ", ".join(
            "%.2f" % (r["phases"].get("teardown") or 0) for r in results)))
        print("drill_teardown module over %d runs: %s" % (args.runs, ", ".join(
            "%.2f" % (r["teardown"]["module_seconds"] or 0) for r in results)))
    print("AWS API calls served by the emulator during the drill: %d %s" % (
        last["api_calls"]["total"], json.dumps(last["api_calls"]["by_service"], sort_keys=True)))
    print("floor (one boto3 script, same network work): %.2f s, %d calls; drill/floor ratio for "
          "provision+prove+teardown: %.1fx" % (floor_ppt, floor["api_calls"], ppt / floor_ppt if floor_ppt else 0))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("drill-%s.json" % time.strftime("%Y%m%dT%H%M%S"))
    path.write_text(json.dumps({"runs": results, "floor": floor,
                                "provision_prove_teardown_seconds": ppt}, indent=2))
    print("written:", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
