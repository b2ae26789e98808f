#!/usr/bin/env python3
"""Benchmark: the netns sandbox runtime - create + destroy for 4 tiers (target <= 3 s).

Figures, not assertions: prints a table and writes bench/results/runtime-<time>.json.
Each run builds the whole runtime with ``_runtime.up`` (namespaces, the embedded world, the
router's nft table, every listener process unprivileged, the telemetry collector, the wait
until every listener is bound) and removes it with ``_runtime.down`` (which proves nothing
remains), for a boundary with ``--tiers`` tiers (default 4: app, db, cache, web; plus
``validation``), under a drill id of its own. The median of ``--runs`` runs (default 5) is
compared with the target.

Root only (iproute2, nftables and setpriv installed by make venv as root).

Usage: .venv/bin/python bench/runtime_bench.py [--runs 5] [--tiers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections")]

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary  # noqa: E402

TARGET_SECONDS = 3.0
TIER_NAMES = ("app", "db", "cache", "web", "api", "queue", "search", "auth")


def boundary(tiers):
    names = list(TIER_NAMES[:tiers])
    rules = [{"from": names[i], "to": names[i + 1], "protocol": "tcp", "ports": [5432 + i]}
             for i in range(len(names) - 1)]
    return parse_boundary({
        "sandbox_cidr": "10.213.0.0/16",
        "production_cidrs": ["10.0.0.0/16"],
        "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22]}],
        "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]},
                   {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
        "fallback": [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443]}],
        "tiers": names,
        "tier_rules": rules,
    })


def one_run(policy, python, workdir):
    drill_id = f"dr-bench-{uuid.uuid4().hex[:10]}"
    out = os.path.join(workdir, drill_id)
    started = time.perf_counter()
    try:
        result = _runtime.up(policy, drill_id, out, python)
        built = time.perf_counter()
    finally:
        before_down = time.perf_counter()
        _runtime.down(drill_id, out)
        ended = time.perf_counter()
    return {"create": built - started, "destroy": ended - before_down, "total": ended - started,
            "listeners": result["listeners"], "rules": result["rules"], "namespaces": len(result["units"]) + 2
            + len(result["world"]["neighbours"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs to take the median of (default 5)")
    parser.add_argument("--tiers", type=int, default=4, choices=range(1, len(TIER_NAMES) + 1),
                        help="declared tiers (default 4; validation comes on top)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("runtime_bench: the netns runtime needs root; run it as root (make venv as root installs "
              "iproute2, nftables and setpriv).", file=sys.stderr)
        return 2
    policy, python = boundary(args.tiers), python_executable()
    runs = []
    with tempfile.TemporaryDirectory(prefix="drguard-runtime-bench-") as workdir:
        for i in range(args.runs):
            runs.append(one_run(policy, python, workdir))
            r = runs[-1]
            print(f"run {i + 1}/{args.runs}: create {r['create']:.2f} s, destroy {r['destroy']:.2f} s, "
                  f"total {r['total']:.2f} s", flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in ("create", "destroy", "total")}
    shape = {k: runs[0][k] for k in ("namespaces", "listeners", "rules")}
    print()
    print(f"{'runtime, ' + str(args.tiers) + ' tiers (+ validation)':<40} {'median s':>9}")
    for k in ("create", "destroy", "total"):
        print(f"{'  ' + k:<40} {median[k]:>9.2f}")
    verdict = "within" if median["total"] <= TARGET_SECONDS else "OVER"
    print(f"target create + destroy <= {TARGET_SECONDS:g} s: {verdict} "
          f"({shape['namespaces']} namespaces, {shape['listeners']} listeners, {shape['rules']} rules)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"runtime-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "host": platform.node(), "cpus": os.cpu_count(),
                                "kernel": platform.release(), "tiers": args.tiers, "runs": runs,
                                "median": median, "target_seconds": TARGET_SECONDS, **shape}, indent=2) + "\n")
    print(f"written {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
