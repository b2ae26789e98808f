"""The live runtime verifier (plugins/module_utils/_runtime_verify.py, module runtime_verify) on a real kernel.

Root only. Each test builds the runtime and its embedded world for a drill id of its own, breaks one
thing the way a compromised host or a buggy builder would, and checks the exact finding; the prefix is
destroyed even when the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_verify import verify
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and

pytestmark = needs_root_and("ip", "nft", "setpriv", what="the live verifier needs")

RAW = {
    "sandbox_cidr": "10.214.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [2222]}],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [8443]},
               {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
    "fallback": [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
}


@pytest.fixture
def runtime(tmp_path):
    """Build the runtime with its world (``_runtime.up``) for a drill id of this test's own; removed
    (``_runtime.down``, which proves nothing remains) whatever happens."""
    built = []

    def build():
        boundary = parse_boundary(RAW)
        drill_id = f"dr-verify-{uuid.uuid4().hex[:10]}"
        plan = _runtime.full_plan(boundary, drill_id)
        assert not _netns.read_state(plan["prefix"])["namespaces"], "prefix already in use"
        out = tmp_path / drill_id
        built.append((drill_id, str(out)))
        _runtime.up(boundary, drill_id, str(out), python_executable())
        return boundary, plan

    try:
        yield build
    finally:
        for drill_id, out in built:
            _runtime.down(drill_id, out)


def sh(*argv):
    subprocess.run(list(argv), check=True, capture_output=True, text=True)


def codes(result):
    return sorted({(f["code"], f["resource"]) for f in result["findings"]})


def test_correct_runtime_has_no_finding(runtime):
    boundary, plan = runtime()
    result = verify(boundary, plan)
    assert result["findings"] == [] and result["isolated"] is True
    assert result["checked"]["namespaces"] == len(plan["tiers"]) + 2 + len(plan["world"]["neighbours"])


def test_injected_production_rule_is_reported(runtime):
    boundary, plan = runtime()
    router, table = plan["router"]["ns"], plan["table"]
    sh("ip", "netns", "exec", router, "nft", "insert", "rule", "inet", table, "forward",
       "ip", "daddr", "10.0.0.1", "tcp", "dport", "5432", "accept")
    result = verify(boundary, plan)
    assert {f["code"] for f in result["findings"]} == {"runtime_production_not_dropped_first",
                                                       "runtime_rule_undeclared"}
    assert {f["resource"] for f in result["findings"]} == {f"inet {table} chain forward rule 1"}
    assert result["isolated"] is False


def test_extra_tier_route_and_missing_default_are_reported(runtime):
    boundary, plan = runtime()
    app = plan["tiers"]["app"]
    sh("ip", "-n", app["ns"], "route", "replace", "default", "dev", app["veth_peer"])
    result = verify(boundary, plan)
    assert codes(result) == [("runtime_route_missing", f"{app['ns']} route default"),
                             ("runtime_route_unexpected", f"{app['ns']} route default")]


def test_tier_forwarding_table_and_ipv6_are_reported(runtime):
    boundary, plan = runtime()
    db = plan["tiers"]["db"]
    sh("ip", "netns", "exec", db["ns"], "sh", "-c",
       "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6")
    sh("ip", "netns", "exec", db["ns"], "nft", "add", "table", "inet", "escape")
    result = verify(boundary, plan)
    assert codes(result) == [("runtime_ipv6_enabled", db["ns"]), ("runtime_tier_forwarding", db["ns"]),
                             ("runtime_tier_ruleset", f"{db['ns']} inet escape")]


def test_namespaces_addresses_and_host_links_are_reported(runtime):
    boundary, plan = runtime()
    p, app, fb = plan["prefix"], plan["tiers"]["app"], plan["world"]["neighbours"]["fallback"]
    sh("ip", "netns", "add", p + "stray")
    for pid in subprocess.run(["ip", "netns", "pids", fb["ns"]], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)  # the fallback's listener, so the namespace really goes
    sh("ip", "netns", "del", fb["ns"])
    sh("ip", "-n", app["ns"], "addr", "add", "10.214.0.9/28", "dev", app["veth_peer"])
    sh("ip", "link", "add", p + "hx", "type", "veth", "peer", "name", p + "hy")  # in the host namespace
    result = verify(boundary, plan)
    assert codes(result) == [
        ("runtime_address_mismatch", f"{app['ns']} {app['veth_peer']}"),
        ("runtime_host_link", p + "hx"),
        ("runtime_host_link", p + "hy"),
        ("runtime_link_missing", f"{plan['world']['ns']} {fb['veth_host']}"),
        ("runtime_namespace_missing", fb["ns"]),
        ("runtime_namespace_unexpected", p + "stray"),
    ]


def test_unreadable_is_a_finding_not_a_pass(runtime, monkeypatch):
    boundary, plan = runtime()

    def broken(ns):
        raise _netns.NetnsError(f"nft -j gave no JSON ruleset for {ns}.")

    monkeypatch.setattr(_netns, "read_ruleset", broken)
    result = verify(boundary, plan)
    assert {f["code"] for f in result["findings"]} == {"runtime_unreadable"}
    assert {f["resource"] for f in result["findings"]} == {plan["router"]["ns"]} | {
        t["ns"] for t in plan["tiers"].values()}
    assert result["isolated"] is False


def test_module_reports_and_fails_closed(runtime):
    boundary, plan = runtime()
    args = {"drill_id": plan["drill_id"], "boundary": RAW}
    ok = run_module("runtime_verify", args)
    assert not ok.failed, ok.get("msg")
    assert ok["isolated"] is True and ok["findings"] == [] and ok["prefix"] == plan["prefix"]

    sh("ip", "netns", "exec", plan["router"]["ns"], "nft", "insert", "rule", "inet", plan["table"], "forward",
       "ip", "daddr", "10.0.0.1", "accept")
    bad = run_module("runtime_verify", args)
    assert bad.failed and "runtime_production_not_dropped_first" in bad["msg"]
    assert bad["isolated"] is False
    audit = run_module("runtime_verify", dict(args, fail_on_findings=False))
    assert not audit.failed and audit["isolated"] is False and audit["findings"] == bad["findings"]


def test_privileged_process_in_a_tier_is_reported(runtime):
    boundary, plan = runtime()
    app = plan["tiers"]["app"]
    assert verify(boundary, plan)["checked"]["tier_processes"] > 0, "the tiers' own listeners were read"
    pid = _netns.spawn(app["ns"], ["/bin/sleep", "60"], privileged=True)
    result = verify(boundary, plan)
    assert codes(result) == [("runtime_tier_process_privileged", f"{app['ns']} pid {pid}")]
    assert "runs as root" in result["findings"][0]["detail"]
