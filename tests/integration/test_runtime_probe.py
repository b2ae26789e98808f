"""Live probes (plugins/module_utils/_probes.py, module runtime_probe) through a real netns runtime.

Root only (CI runs as root, with iproute2, nftables and setpriv). Each test builds the runtime and its
embedded world for a drill id of its own (so its namespaces carry a prefix no other test uses), applies
the translator's ruleset, probes for real, and destroys the prefix even when it fails. Traffic only ever
goes between namespaces the test created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import router_ruleset
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import probe_matrix
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import run_probes
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

_MISSING = [tool for tool in ("ip", "nft", "setpriv") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason=(f"live probes need root and ip/nft/setpriv on PATH (euid {os.geteuid()}, missing: "
            f"{', '.join(_MISSING) or 'nothing'}); make venv as root installs them"),
)

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

# A TCP listener: accepts and closes, forever (destroy kills it with its namespace).
LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    s.accept()[0].close()
"""


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
def runtime():
    """Build the runtime for a drill id of this test's own; destroyed whatever happens."""
    built = []

    def build(raw=RAW):
        boundary = parse_boundary(raw)
        plan = _runtime.full_plan(boundary, f"dr-probe-{uuid.uuid4().hex[:10]}")
        built.append(plan["prefix"])
        assert not _netns.read_state(plan["prefix"])["namespaces"], "prefix already in use"
        _netns.create(plan)
        _netns.apply_ruleset(plan["router"]["ns"], router_ruleset(boundary, plan, plan["table"]))
        db = plan["tiers"]["db"]
        _netns.spawn(db["ns"], [python_executable(), "-I", "-S", "-c", LISTENER, db["address"], "5432"])
        return boundary, plan

    try:
        yield build
    finally:
        for prefix in built:
            _netns.destroy(prefix)
            assert not _netns.read_state(prefix)["namespaces"], f"left behind under {prefix}"


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
    assert {r["reason"] for r in result["rows"] if r["dst"] == "production"} == {"timed out"}


def test_injected_rule_to_production_bait_is_a_violation_row(runtime):
    boundary, plan = runtime()
    router, table = plan["router"]["ns"], plan["table"]
    nft(router, "insert", "rule", "inet", table, "forward", "ip", "daddr", "10.0.0.1", "tcp", "dport", "5432", "accept")
    nft(router, "insert", "rule", "inet", table, "forward", "ip", "saddr", "10.0.0.1", "tcp", "sport", "5432", "accept")
    result = run_probes(probe_matrix(boundary, plan), plan, timeout=1.0)
    leaked = {(v["code"], result["rows"][v["row"]]["src"], result["rows"][v["row"]]["address"])
              for v in result["violations"] if "row" in v}
    assert leaked == {("production_reachable", tier, "10.0.0.1:5432") for tier in ("app", "db", "validation")}


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


def test_module_sends_every_row_to_the_collector(runtime, tmp_path):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry

    boundary, plan = runtime()
    tel = plan["world"]["telemetry"]
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    _netns.spawn(plan["world"]["neighbours"]["telemetry"]["ns"],
                 _telemetry.collector_argv(python_executable(), tel["address"], tel["port"]),
                 stdout_path=str(out / "telemetry.jsonl"))
    result = run_module("runtime_probe", {"drill_id": plan["drill_id"], "boundary": RAW,
                                          "telemetry": {"address": tel["address"], "port": tel["port"]}})
    assert not result.failed, result.get("msg")
    rows = result["summary"]["rows"]
    assert result["telemetry"] == {"sent": rows, "acknowledged": rows}
    assert _telemetry.summarise(str(out / "telemetry.jsonl"))["by_type"] == {"drguard.probe.result": rows}
