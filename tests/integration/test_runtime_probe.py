"""Live probes (plugins/module_utils/_probes.py, module runtime_probe) through a real netns runtime.

Root only (CI runs as root, with iproute2, nftables and setpriv). Each test builds the runtime and its
embedded world for a drill id of its own (so its namespaces carry a prefix no other test uses), applies
the translator's ruleset, probes for real, and destroys the prefix even when it fails. Traffic only ever
goes between namespaces the test created.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import probe_matrix
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import run_probes
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and

pytestmark = needs_root_and("ip", "nft", "setpriv", what="live probes need")

RAW = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [2222]}],
    "egress": [
        {"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [8443]},
        {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"},
    ],
    "fallback": [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
}

def nft(ns, *args):
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True, check=True).stdout


def rule_handle(plan, counter):
    """The handle of the forward rule counted by ``counter`` in the drill's table."""
    items = json.loads(nft(plan["router"]["ns"], "-j", "-a", "list", "chain", "inet", plan["table"], "forward"))
    for item in items["nftables"]:
        rule = item.get("rule")
        if rule and any(e.get("counter") == counter for e in rule["expr"]):
            return rule["handle"]
    raise AssertionError(f"no forward rule counts {counter}")


@pytest.fixture
def runtime(tmp_path):
    """Build the runtime with its world and listeners (``_runtime.up``) for a drill id of this test's own;
    removed (``_runtime.down``, which proves nothing remains) whatever happens."""
    built = []

    def build(raw=RAW):
        boundary = parse_boundary(raw)
        drill_id = f"dr-probe-{uuid.uuid4().hex[:10]}"
        plan = _runtime.full_plan(boundary, drill_id)
        assert not _netns.read_state(plan["prefix"])["namespaces"], "prefix already in use"
        out = tmp_path / drill_id
        built.append((drill_id, str(out)))
        _runtime.up(boundary, drill_id, str(out), python_executable())
        plan["output_dir"] = str(out)
        return boundary, plan

    try:
        yield build
    finally:
        for drill_id, out in built:
            _runtime.down(drill_id, out)


def bait_hits(plan):
    path = os.path.join(plan["output_dir"], "runtime", "bait-hits.jsonl")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def by_key(rows):
    return {(r["src"], r["dst"], r["address"]): r for r in rows}


def test_correct_runtime_every_row_as_expected_and_production_counted(runtime):
    boundary, plan = runtime()
    rows = probe_matrix(boundary, plan)
    result = run_probes(rows, plan, timeout=1.0)
    wrong = [r for r in result["rows"] if r["observed"] != r["expected"]]
    assert wrong == [], wrong
    assert result["violations"] == []
    production = sum(1 for r in rows if "production" in (r["src"], r["dst"]))
    assert production > 0 and result["counters"]["delta"]["production_drop"] >= production
    assert result["summary"] == {"rows": len(rows), "allow": sum(r["expected"] == "allow" for r in rows),
                                 "deny": sum(r["expected"] == "deny" for r in rows), "violations": 0}
    app_db = by_key(result["rows"])[("app", "db", plan["tiers"]["db"]["address"] + ":5432")]
    assert app_db["reason"] == "connected", "the declared tier rule reaches the db listener"
    assert {r["reason"] for r in result["rows"] if r["expected"] == "allow"} == {"connected"}
    assert {r["reason"] for r in result["rows"] if r["dst"] == "production"} == {"timed out"}
    assert bait_hits(plan) == [], "no connection ever reached a production bait"


def test_injected_rule_to_production_bait_is_a_violation_row(runtime):
    boundary, plan = runtime()
    router, table = plan["router"]["ns"], plan["table"]
    nft(router, "insert", "rule", "inet", table, "forward", "ip", "daddr", "10.0.0.1", "tcp", "dport", "5432", "accept")
    nft(router, "insert", "rule", "inet", table, "forward", "ip", "saddr", "10.0.0.1", "tcp", "sport", "5432", "accept")
    result = run_probes(probe_matrix(boundary, plan), plan, timeout=1.0)
    leaked = {(v["code"], result["rows"][v["row"]]["src"], result["rows"][v["row"]]["address"])
              for v in result["violations"] if "row" in v}
    assert leaked == {("production_reachable", tier, "10.0.0.1:5432") for tier in ("app", "db", "validation")}
    assert {r["reason"] for r in result["rows"] if r["address"] == "10.0.0.1:5432"} == {"connected"}
    assert len(bait_hits(plan)) >= 3, "the bait logged the connections that reached it"


def test_blocked_fallback_gives_a_fallback_blocked_row(runtime):
    boundary, plan = runtime()
    nft(plan["router"]["ns"], "delete", "rule", "inet", plan["table"], "forward", "handle",
        str(rule_handle(plan, "fallback_allow")))
    result = run_probes(probe_matrix(boundary, plan), plan, timeout=1.0)
    assert {v["code"] for v in result["violations"]} == {"fallback_blocked"}
    blocked = [result["rows"][v["row"]] for v in result["violations"]]
    assert {(r["src"], r["address"]) for r in blocked} == {(t, "203.0.113.1:443") for t in ("app", "db", "validation")}
    assert all(r["reason"].startswith("fallback_blocked") and r["observed"] == "deny" for r in blocked)


def test_tier_reaching_an_undeclared_peer_is_caught(runtime):
    boundary, plan = runtime()
    val, db = plan["tiers"]["validation"], plan["tiers"]["db"]
    nft(plan["router"]["ns"], "insert", "rule", "inet", plan["table"], "forward", "ip", "saddr", val["subnet"],
        "ip", "daddr", db["subnet"], "tcp", "dport", "5432", "accept")
    result = run_probes(probe_matrix(boundary, plan), plan, timeout=1.0)
    caught = [(v["code"], result["rows"][v["row"]]["src"], result["rows"][v["row"]]["address"])
              for v in result["violations"]]
    assert caught == [("undeclared_reachable", "validation", db["address"] + ":5432")]


def test_production_drop_not_counted_when_production_is_left_unrouted(runtime):
    """A production address the router never sees (no route to it from the wan) times out without the
    production rule dropping anything: the rows alone would pass, the counter check catches it."""
    boundary, plan = runtime()
    prod = plan["world"]["neighbours"]["production"]
    subprocess.run(["ip", "-n", plan["router"]["ns"], "route", "add", "blackhole", "10.0.0.0/16"], check=True)
    result = run_probes(probe_matrix(boundary, plan), plan, timeout=0.5)
    codes = [v["code"] for v in result["violations"]]
    assert "production_drop_not_counted" in codes, (codes, prod)


def test_module_returns_rows_counters_and_fails_naming_the_violation(runtime):
    boundary, plan = runtime()
    args = {"drill_id": plan["drill_id"], "boundary": RAW, "timeout": 1.0}
    ok = run_module("runtime_probe", args)
    assert not ok.failed, ok.get("msg")
    assert ok["summary"]["violations"] == 0 and ok["summary"]["rows"] == len(probe_matrix(boundary, plan))
    assert ok["counters"]["delta"]["production_drop"] > 0 and ok["changed"] is False

    nft(plan["router"]["ns"], "delete", "rule", "inet", plan["table"], "forward", "handle",
        str(rule_handle(plan, "fallback_allow")))
    bad = run_module("runtime_probe", args)
    assert bad.failed and "fallback_blocked" in bad["msg"] and "203.0.113.1:443" in bad["msg"]
    assert {v["code"] for v in bad["violations"]} == {"fallback_blocked"}
    assert len(bad["rows"]) == ok["summary"]["rows"]


def test_module_sends_every_row_to_the_collector(runtime):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry

    boundary, plan = runtime()
    tel = plan["world"]["telemetry"]
    result = run_module("runtime_probe", {"drill_id": plan["drill_id"], "boundary": RAW,
                                          "telemetry": {"address": tel["address"], "port": tel["port"]}})
    assert not result.failed, result.get("msg")
    rows = result["summary"]["rows"]
    assert result["telemetry"] == {"sent": rows, "acknowledged": rows}
    summary = _telemetry.summarise(os.path.join(plan["output_dir"], "telemetry.jsonl"))
    assert summary["by_type"] == {"drguard.probe.result": rows}
