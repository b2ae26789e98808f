#!/usr/bin/env python3
"""Benchmark: restore + validate inside the sandbox, router rules applied vs flushed (the boundary's overhead).

Figures, not assertions: prints a table and writes bench/results/inside-<time>.json.
One netns runtime (tiers app and db, a tier rule app -> db tcp 5432) is built once. Each run
then does what the drill's restore and validate phases do with the netns backend:

1. restore: ``_restore.restore`` copies a verified backup set (a SQLite database of ``--rows``
   rows and a gzip-compressed tar of ``--tar-mib`` MiB) into a fresh private directory,
   hashing every byte (on the controller, like the drill: see docs/runtime.md);
2. validate: ``_workloads.validate_inside`` in the validation tier (files copied into the
   workload's tmpfs, the tar extracted into its scratch, SQLite integrity_check);
3. the db tier's service started on the restored database (``start_db_service``: it replaces
   the runtime's plain listener) and ``--queries`` queries from the app tier over the tier rule.

Alternately with the router's ruleset applied and with the drill's rules gone (``nft delete
table inet <table>`` in the router namespace: a flush alone would keep the base chains'
``policy drop`` and forward nothing), each the median of ``--runs`` runs. The ratio rules / flushed is
the boundary's overhead on recovery work.

Root only (iproute2, nftables, setpriv, unshare installed by make venv as root).

Usage: .venv/bin/python bench/inside_bench.py [--runs 3] [--rows 200000] [--tar-mib 16] [--queries 20]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import signal
import sqlite3
import statistics
import sys
import tarfile
import tempfile
import time
import uuid
from datetime import datetime
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections")]

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _restore  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _workloads  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import router_ruleset  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary  # noqa: E402

BOUNDARY = {
    "sandbox_cidr": "10.215.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22]}],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]},
               {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
}
QUERY = "SELECT count(*), sum(amount_cents) FROM orders"


def backup_set(directory, rows, tar_mib):
    """The 'backup': a SQLite database and a tar.gz, described as verify_artifacts would (local sources)."""
    db = os.path.join(directory, "orders.sqlite")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, amount_cents INTEGER)")
    con.executemany("INSERT INTO orders (customer, amount_cents) VALUES (?, ?)",
                    (("customer-%d" % (i % 997), i % 10_000) for i in range(rows)))
    con.commit()
    con.close()
    archive = os.path.join(directory, "files.tar.gz")
    chunk = os.urandom(256 * 1024)  # incompressible enough that the ratio cap is not what is measured
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(tar_mib * 4):
            info = tarfile.TarInfo("data/part-%04d.bin" % i)
            info.size = len(chunk)
            tar.addfile(info, io.BytesIO(chunk))
    entries = []
    for path, kind in ((db, "sqlite"), (archive, "tar")):
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        entries.append({"name": os.path.basename(path), "source": path, "sha256": digest,
                        "size": os.path.getsize(path), "verified": True, "kind": kind})
    return entries


def stop_service(out):
    """Kill the db service so the next run starts it again (start_db_service is idempotent otherwise)."""
    state = _runtime.read_state_file(out)
    service = (state.get("processes") or {}).pop(_workloads.SERVICE_KEY, None)
    if service:
        try:
            os.kill(service["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while service["pid"] in _netns._pids(service["ns"]) and time.monotonic() < deadline:  # noqa: SLF001
            _netns._reap()  # noqa: SLF001
            time.sleep(0.02)
    _runtime._write_state(out, state)  # noqa: SLF001


def one_run(policy, drill_id, out, entries, *, queries, python, workdir):
    plan = _runtime.full_plan(policy, drill_id)
    app = plan["tiers"]["app"]["ns"]
    validation = plan["tiers"]["validation"]["ns"]
    dest = tempfile.mkdtemp(prefix="restore-", dir=workdir)
    t0 = time.perf_counter()
    restored = _restore.restore(entries, dest, client=None)["restored"]
    t1 = time.perf_counter()
    outcome = _workloads.validate_inside(validation, restored, 1, python=python)
    if not outcome.valid:
        raise SystemExit("inside_bench: the backup set did not validate: %s" % outcome.message)
    t2 = time.perf_counter()
    db = [r["path"] for r in restored if r["name"] == "orders.sqlite"][0]
    service = _workloads.start_db_service(policy, drill_id, out, db, python=python)
    for _ in range(queries):
        answer = _workloads.query_db(app, service["address_port"], QUERY, python=python,
                                     tls=_workloads.client_tls(policy, drill_id, out, "app", "db"))
        if not answer.get("ok"):
            raise SystemExit("inside_bench: the app tier's query failed: %s" % answer)
    t3 = time.perf_counter()
    stop_service(out)
    return {"restore": t1 - t0, "validate": t2 - t1, "db_and_queries": t3 - t2, "total": t3 - t0}


def median(runs):
    return {k: statistics.median(r[k] for r in runs) for k in ("restore", "validate", "db_and_queries", "total")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode to take the median of (default 3)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the SQLite database (default 200000)")
    parser.add_argument("--tar-mib", type=int, default=16, help="MiB in the tar.gz (default 16)")
    parser.add_argument("--queries", type=int, default=20, help="queries from the app tier per run (default 20)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("inside_bench: the netns runtime needs root; run it as root (make venv as root installs "
              "iproute2, nftables and setpriv).", file=sys.stderr)
        return 2
    policy, python = parse_boundary(BOUNDARY), python_executable()
    drill_id = f"dr-bench-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="drguard-inside-bench-") as workdir:
        os.chmod(workdir, 0o700)
        out = os.path.join(workdir, "out")
        entries = backup_set(workdir, args.rows, args.tar_mib)
        try:
            built = _runtime.up(policy, drill_id, out, python)
            plan = _runtime.full_plan(policy, drill_id)
            router, table = plan["router"]["ns"], built["table"]
            ruleset = router_ruleset(policy, plan, table)
            runs = {"rules": [], "flushed": []}
            # Alternating, so a machine shared with other work weighs on both modes alike.
            for i in range(args.runs):
                for mode in ("rules", "flushed"):
                    if mode == "rules":
                        _netns.apply_ruleset(router, ruleset)
                    else:
                        _netns.run_in(router, [_netns._tool("nft"), "delete", "table", "inet", table],  # noqa: SLF001
                                      privileged=True)
                    runs[mode].append(one_run(policy, drill_id, out, entries, queries=args.queries, python=python,
                                              workdir=workdir))
                    r = runs[mode][-1]
                    print(f"{mode} run {i + 1}/{args.runs}: restore {r['restore']:.2f} s, validate inside "
                          f"{r['validate']:.2f} s, db service + {args.queries} queries {r['db_and_queries']:.2f} s, "
                          f"total {r['total']:.2f} s", flush=True)
            figures = {mode: {"runs": runs[mode], "median": median(runs[mode])} for mode in runs}
        finally:
            _runtime.down(drill_id, out)
    ratio = {k: figures["rules"]["median"][k] / max(figures["flushed"]["median"][k], 1e-9)
             for k in figures["rules"]["median"]}
    print()
    print(f"{'restore + validate inside':<34} {'rules s':>9} {'flushed s':>10} {'ratio':>7}")
    for k in ("restore", "validate", "db_and_queries", "total"):
        print(f"{'  ' + k:<34} {figures['rules']['median'][k]:>9.2f} {figures['flushed']['median'][k]:>10.2f} "
              f"{ratio[k]:>7.2f}")
    sizes = {e["name"]: e["size"] for e in entries}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"inside-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "host": platform.node(), "cpus": os.cpu_count(),
                                "kernel": platform.release(), "rows": args.rows, "tar_mib": args.tar_mib,
                                "queries": args.queries, "sizes": sizes, **figures, "ratio": ratio}, indent=2) + "\n")
    print(f"written {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
