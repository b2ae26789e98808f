#!/usr/bin/env python3
"""Benchmark: the drill's PKI and mTLS between namespaces.

Figures, not assertions: prints a table and writes bench/results/mtls-<time>.json.

- minting: a CA and 10 tier leaves (``_pki.new_ca`` + ``issue_leaf``), and the same written to a
  tmpfs store (``Store.present``: keys, trust bundle with CRL, state); median of ``--runs``
  (target < 1 s);
- handshakes: the db tier's echo server (unprivileged, in its namespace) and ``--handshakes``
  probes from the app tier's namespace through the router, one process: each a fresh TCP
  connect, a TLS 1.3 handshake with client certificates, the server's identity check and an
  application round trip. p50 / p95 of the client's TLS handshake (TCP connect included, as a
  caller sees it; targets 5 / 20 ms), of the TCP connect alone, their ratio, and the server's
  own handshake latency from its ``drguard.tls.handshake`` events.

Root only for the handshakes (iproute2, nftables, setpriv); minting runs anywhere.

Usage: .venv/bin/python bench/mtls_bench.py [--runs 5] [--handshakes 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import datetime
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".collections")]

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: E402

MINT_TARGET = 1.0
P50_TARGET_MS = 5.0
P95_TARGET_MS = 20.0
TIERS = [f"tier{i}" for i in range(1, 10)]  # + validation = 10 leaves
PORT = 5432


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def mint(runs):
    memory, store = [], []
    for _ in range(runs):
        drill_id = f"dr-bench-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        ca = _pki.new_ca(drill_id, 7200)
        for tier in _pki.tier_list(TIERS):
            _pki.issue_leaf(ca, drill_id, tier)
        memory.append(time.perf_counter() - start)
        directory = os.path.join("/dev/shm", f"drguard-bench-{uuid.uuid4().hex[:8]}")  # noqa: S108
        try:
            start = time.perf_counter()
            _pki.Store(drill_id, os.path.join(directory, "pki")).present(TIERS, 7200)
            store.append(time.perf_counter() - start)
        finally:
            _pki.destroy(directory)
    return {"leaves": len(_pki.tier_list(TIERS)), "in_memory_s": statistics.median(memory),
            "to_tmpfs_s": statistics.median(store)}


def handshakes(count):
    prefix = f"drg-b{uuid.uuid4().hex[:5]}-"
    drill_id = f"dr-bench-{uuid.uuid4().hex[:8]}"
    root = os.path.join("/dev/shm", f"drguard-bench-{uuid.uuid4().hex[:8]}")  # noqa: S108
    tiers = {}
    for i, name in enumerate(("app", "db"), start=1):
        tiers[name] = {"ns": f"{prefix}{name}", "veth_host": f"{prefix}{i}r", "veth_peer": f"{prefix}{i}t",
                       "subnet": f"10.252.{i}.0/24", "address": f"10.252.{i}.2", "gateway": f"10.252.{i}.1"}
    plan = {"router": {"ns": f"{prefix}router"}, "tiers": tiers}
    ruleset = f"""
table inet {prefix}router {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ip saddr 10.252.1.0/24 ip daddr 10.252.2.2 tcp dport {PORT} accept
    }}
}}
"""
    os.mkdir(root, 0o711)
    try:
        _netns.create(plan)
        _netns.apply_ruleset(plan["router"]["ns"], ruleset)
        store = _pki.Store(drill_id, os.path.join(root, "pki"))
        store.present(["app", "db"], 3600)
        paths = {t: store.deliver(t, os.path.join(root, t), uid=_netns.UNPRIVILEGED_UID,
                                  gid=_netns.UNPRIVILEGED_GID) for t in ("app", "db")}
        events = os.path.join(root, "events.jsonl")
        config = _mtls.server_config(drill_id=drill_id, tier="db", address=tiers["db"]["address"], ports=[PORT],
                                     tier_rules=[{"from": "app", "to": "db", "protocol": "tcp", "ports": [PORT]}],
                                     identity=paths["db"]["identity"], trust=paths["db"]["trust"])
        _mtls.start_server(tiers["db"]["ns"], config, events_path=events, stderr_path=os.path.join(root, "err"))
        client = _mtls.client_config(drill_id=drill_id, address=tiers["db"]["address"], port=PORT, expect_tier="db",
                                     identity=paths["app"]["identity"], trust=paths["app"]["trust"], count=count)
        rows = _mtls.probe(tiers["app"]["ns"], client)
        deadline = time.monotonic() + 10
        while len(_mtls.read_events(events)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        server = [e["data"]["latency_ms"] for e in _mtls.read_events(events) if e["data"]["accepted"]]
    finally:
        _netns.destroy(prefix)
        _pki.destroy(root)
    ok = [r for r in rows if r["ok"]]
    tls = [r["handshake_ms"] for r in ok]
    tcp = [r["connect_ms"] for r in ok]
    return {"handshakes": count, "succeeded": len(ok), "failed": count - len(ok),
            "handshake_ms": {"p50": pct(tls, 50), "p95": pct(tls, 95)},
            "tls_only_ms": {"p50": pct([a - b for a, b in zip(tls, tcp, strict=True)], 50),
                            "p95": pct([a - b for a, b in zip(tls, tcp, strict=True)], 95)},
            "tcp_connect_ms": {"p50": pct(tcp, 50), "p95": pct(tcp, 95)},
            "ratio_to_tcp_connect_p50": round(pct(tls, 50) / pct(tcp, 50), 1),
            "round_trip_ms_p50": pct([r["round_trip_ms"] for r in ok], 50),
            "server_handshake_ms": {"p50": pct(server, 50), "p95": pct(server, 95)} if server else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=200)
    args = parser.parse_args()
    minted = mint(args.runs)
    print(f"{'mint CA + ' + str(minted['leaves']) + ' leaves (median of ' + str(args.runs) + ')':<44} "
          f"{minted['in_memory_s'] * 1000:8.1f} ms in memory, {minted['to_tmpfs_s'] * 1000:8.1f} ms to tmpfs "
          f"(target < {MINT_TARGET:g} s: {'met' if minted['to_tmpfs_s'] < MINT_TARGET else 'MISSED'})")
    result = {"mint": minted}
    if os.geteuid() != 0:
        print("handshakes between namespaces need root; skipped")
    else:
        hs = handshakes(args.handshakes)
        result["handshakes"] = hs
        print(f"{'handshakes app -> db (' + str(hs['succeeded']) + '/' + str(hs['handshakes']) + ' ok)':<44}")
        met = hs["handshake_ms"]["p50"] < P50_TARGET_MS and hs["handshake_ms"]["p95"] < P95_TARGET_MS
        print(f"  {'TCP connect + TLS 1.3 mTLS handshake':<42} p50 {hs['handshake_ms']['p50']:7.2f} ms  "
              f"p95 {hs['handshake_ms']['p95']:7.2f} ms  (targets {P50_TARGET_MS:g} / {P95_TARGET_MS:g} ms: "
              f"{'met' if met else 'MISSED'})")
        print(f"  {'TLS part alone':<42} p50 {hs['tls_only_ms']['p50']:7.2f} ms  "
              f"p95 {hs['tls_only_ms']['p95']:7.2f} ms")
        print(f"  {'plain TCP connect':<42} p50 {hs['tcp_connect_ms']['p50']:7.2f} ms  "
              f"p95 {hs['tcp_connect_ms']['p95']:7.2f} ms")
        print(f"  {'ratio handshake / TCP connect (p50)':<42} {hs['ratio_to_tcp_connect_p50']:7.1f}x")
        if hs["server_handshake_ms"]:
            print(f"  {'server side (accept -> verified)':<42} p50 {hs['server_handshake_ms']['p50']:7.2f} ms  "
                  f"p95 {hs['server_handshake_ms']['p95']:7.2f} ms")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"mtls-{stamp}.json"
    path.write_text(json.dumps({"when": stamp, "host": platform.node(), "cpus": os.cpu_count(), **result},
                               indent=2, sort_keys=True) + "\n")
    print(f"written {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
