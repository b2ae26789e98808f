#!/usr/bin/env python3
"""Benchmark: N drills in one run (one inventory host each, forks N) against the same drills run
one after another (N runs of ansible-playbook, one drill each), on the embedded emulator.

Figures, not assertions: for each N it prints the wall time of the one run, the sum of the
one-after-another runs (the first N of them), the speed-up (sequential / parallel) and the
throughput (drills per minute) of both, and whether every drill passed with nothing left behind.
All drills verify and restore the same seeded backup set (read-only). Writes bench/results/scale-<time>.json.
Usage: .venv/bin/python bench/scale_bench.py [--counts 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections"), str(ROOT / "tools"), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from drillkit import remaining, run_drill, run_drills, seed_world  # noqa: E402
from emulator import Emulator  # noqa: E402


def _clean(emu, reports) -> bool:
    return all(r.get("teardown", {}).get("remaining") == 0 and not remaining(emu, r["drill_id"]) for r in reports)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4,8", help="comma-separated drill counts (default 1,2,4,8)")
    args = parser.parse_args()
    counts = sorted({int(c) for c in args.counts.split(",")})
    rows, sequential = [], []
    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        world = seed_world(emu, Path(tmp) / "world")
        for i in range(max(counts)):  # one after another: each its own ansible-playbook run
            t0 = time.perf_counter()
            run = run_drill(world, Path(tmp) / ("seq%d" % i))
            wall = time.perf_counter() - t0
            report = run.report
            sequential.append({"wall_seconds": round(wall, 2), "outcome": report["outcome"],
                               "clean": _clean(emu, [report])})
        for n in counts:
            hosts = {"drill-%02d" % i: {} for i in range(n)}
            t0 = time.perf_counter()
            multi = run_drills(world, Path(tmp) / ("par%d" % n), hosts, forks=n)
            wall = time.perf_counter() - t0
            reports = list(multi.reports.values())
            seq = sum(r["wall_seconds"] for r in sequential[:n])
            rows.append({"drills": n, "parallel_seconds": round(wall, 2), "sequential_seconds": round(seq, 2),
                         "speedup": round(seq / wall, 2),
                         "parallel_per_minute": round(60 * n / wall, 2),
                         "sequential_per_minute": round(60 * n / seq, 2),
                         "passed": sum(r["outcome"] == "passed" for r in reports), "reports": len(reports),
                         "clean": _clean(emu, reports) and all(s["clean"] for s in sequential[:n]),
                         "rc": multi.rc})
    print("%6s %12s %14s %8s %16s %18s %8s %6s" % ("drills", "one run (s)", "one by one (s)", "speedup",
                                                   "drills/min (one)", "drills/min (1by1)", "passed", "clean"))
    for r in rows:
        print("%6d %12.1f %14.1f %7.2fx %16.2f %18.2f %5d/%-2d %6s" % (
            r["drills"], r["parallel_seconds"], r["sequential_seconds"], r["speedup"], r["parallel_per_minute"],
            r["sequential_per_minute"], r["passed"], r["drills"], r["clean"]))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("scale-%s.json" % time.strftime("%Y%m%dT%H%M%S"))
    path.write_text(json.dumps({"rows": rows, "sequential": sequential}, indent=2))
    print("written:", path.relative_to(ROOT))
    return 0 if all(r["passed"] == r["drills"] and r["clean"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
