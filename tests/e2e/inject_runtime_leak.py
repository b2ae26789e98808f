#!/usr/bin/env python3
"""Test-only: open one leak in a drill's freshly built sandbox runtime (its router's nft table).

Run by tests/e2e/hooks/inject_runtime_leak.yml (drill_hook_after_runtime), after the runtime
is built and before runtime_verify reads it back. It changes only the drill's own table in
the drill's own router namespace; teardown removes the namespace and the rule with it.

- ``production_bait``: accept traffic to the first production bait address, and its replies
  (the production drop would stop the answers of a one-way accept, and a probe sees a hole
  only when the answer comes back);
- ``fallback_blocked``: drop everything to the declared fallback CIDR, first in forward;
- ``undeclared_peer``: accept validation -> db on TCP 5432 (only app -> db is declared).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

LEAKS = ("production_bait", "fallback_blocked", "undeclared_peer")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--leak", required=True, choices=LEAKS)
    p.add_argument("--runtime", required=True, help="JSON of the sandbox_runtime__output fact")
    p.add_argument("--fallback-cidr", required=True)
    a = p.parse_args()
    runtime = json.loads(a.runtime)
    prefix, table = runtime["prefix"], runtime["table"]
    if not prefix.startswith("drg-") or not table.startswith(prefix):
        raise SystemExit("refusing: %r / %r is not a drill's runtime" % (prefix, table))
    units = {u["tier"]: u for u in runtime["units"]}
    rules = []
    if a.leak == "production_bait":
        bait = runtime["world"]["neighbours"]["production"]["addresses"][0]
        rules = [["ip", "daddr", bait, "accept"], ["ip", "saddr", bait, "accept"]]
    elif a.leak == "fallback_blocked":
        rules = [["ip", "daddr", a.fallback_cidr, "drop"]]
    elif a.leak == "undeclared_peer":
        rules = [["ip", "saddr", units["validation"]["address"], "ip", "daddr", units["db"]["address"],
                  "tcp", "dport", "5432", "accept"]]
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", prefix + "router", "nft", "insert", "rule", "inet", table, "forward",
                        *rule], check=True)
    print("injected %s into inet %s" % (a.leak, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
