"""The live probe matrix (plugins/module_utils/_probes.py: probe_matrix), pure: no root, no namespace.

The plan is the address plan plus an embedded world in the shape docs/runtime.md gives
(``world.neighbours.<kind>.addresses``), built here by hand so the matrix is judged against
addresses the test chose, not against the world planner's own output.
"""

from __future__ import annotations

import collections

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import address_plan
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import ProbeError
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import probe_matrix
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import undeclared_port
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import full_plan
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

DRILL = "dr-20261130200000-a1b2c3"
RAW = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22]}],
    "egress": [
        {"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": ["8000-8100", 53]},
        {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"},
    ],
    "fallback": [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
}


def make_plan(raw=RAW, drill=DRILL):
    boundary = parse_boundary(raw)
    plan = address_plan(boundary, drill)
    p = plan["prefix"]

    def neighbour(short, x, addresses):
        return {"ns": p + short, "veth_host": f"{p}{x}w", "veth_peer": f"{p}{x}n", "addresses": addresses}

    plan["world"] = {
        "ns": p + "wan",
        "neighbours": {
            "production": neighbour("prod", "p", ["10.0.0.1"]),
            "control_plane": neighbour("cp", "c", ["192.0.2.1", "198.51.100.1"]),
            "telemetry": neighbour("tel", "t", ["198.51.100.17"]),
            "fallback": neighbour("fb", "f", ["203.0.113.1"]),
        },
        "listeners": [],
        "telemetry": {"address": "198.51.100.17", "port": 4317},
    }
    return boundary, plan


def key(row):
    return (row["src"], row["dst"], row["address"], row["protocol"], row["expected"])


def test_matrix_is_exactly_the_rows_the_boundary_implies():
    boundary, plan = make_plan()
    rows = probe_matrix(boundary, plan)
    a = {t: plan["tiers"][t]["address"] for t in ("app", "db", "validation")}
    expected = set()
    for src in ("app", "db", "validation"):
        expected |= {(src, "production", f"10.0.0.1:{port}", "tcp", "deny")
                     for port in (5432, 443, 6514, 8000, 8100, 53, 4317)}
        expected |= {(src, "control_plane", f"198.51.100.1:{port}", "tcp", "allow") for port in (8000, 8100)}
        expected |= {(src, "telemetry", "198.51.100.17:4317", "tcp", "allow"),
                     (src, "fallback", "203.0.113.1:443", "tcp", "allow"),
                     (src, "dns", "192.0.2.1:53", "udp", "deny")}
        for dst in ("app", "db", "validation"):
            expected |= {("control_plane", dst, f"{a[dst]}:22", "tcp", "allow"),
                         ("production", dst, f"{a[dst]}:22", "tcp", "deny")}
    expected |= {
        ("app", "db", f"{a['db']}:5432", "tcp", "allow"),      # the declared tier rule
        ("app", "db", f"{a['db']}:1025", "tcp", "deny"),       # an undeclared port on the declared peer
        ("app", "validation", f"{a['validation']}:1025", "tcp", "deny"),
        ("db", "app", f"{a['app']}:1025", "tcp", "deny"),
        ("db", "validation", f"{a['validation']}:1025", "tcp", "deny"),
        ("validation", "app", f"{a['app']}:1025", "tcp", "deny"),
        ("validation", "db", f"{a['db']}:5432", "tcp", "deny"),  # undeclared pair, on the peer's declared port
    }
    assert set(map(key, rows)) == expected
    assert len(rows) == len(expected), "no row twice"


def test_rows_carry_the_report_shape_and_their_source_address():
    boundary, plan = make_plan()
    rows = probe_matrix(boundary, plan)
    for row in rows:
        assert set(row) == {"src", "dst", "address", "layer", "expected", "observed", "reason", "latency_ms",
                            "protocol", "src_address"}
        assert row["layer"] == "l4" and row["observed"] is None
    by_src = {r["src"]: r["src_address"] for r in rows if r["src"] in ("control_plane", "production")}
    assert by_src == {"control_plane": "192.0.2.1", "production": "10.0.0.1"}, "ingress sent from inside its CIDR"
    assert {r["src_address"] for r in rows if r["src"] == "app"} == {plan["tiers"]["app"]["address"]}


def test_declared_dns_port_is_not_an_allow_row():
    boundary, plan = make_plan()
    rows = probe_matrix(boundary, plan)
    assert not [r for r in rows if r["expected"] == "allow" and r["address"].endswith(":53")]
    assert collections.Counter(r["dst"] for r in rows if r["address"].endswith(":53")) == {"production": 3, "dns": 3}


def test_undeclared_port_skips_declared_ranges():
    raw = dict(RAW, ingress=[{"cidr": "192.0.2.0/28", "ports": ["1000-1030"]}],
               tier_rules=[{"from": "app", "to": "db", "ports": [1031, "1032-1040"]}])
    boundary = parse_boundary(raw)
    assert undeclared_port(boundary, "db") == 1041
    assert undeclared_port(boundary, "app") == 1031


def test_every_port_declared_is_one_clear_error():
    raw = dict(RAW, ingress=[{"cidr": "192.0.2.0/28", "ports": ["1-65535"]}])
    with pytest.raises(ProbeError, match="every port above 1024 is declared for tier app") as raised:
        undeclared_port(parse_boundary(raw), "app")
    assert raised.value.detail == {"tier": "app"}


def test_range_probed_at_both_ends_and_world_listener_ports_become_bait():
    boundary, plan = make_plan()
    plan["world"]["listeners"].append({"kind": "production", "name": "extra", "ns": "x", "address": "10.0.0.1",
                                       "protocol": "tcp", "port": 9999})
    rows = probe_matrix(boundary, plan)
    assert {r["address"] for r in rows if r["src"] == "app" and r["dst"] == "control_plane"} == {
        "198.51.100.1:8000", "198.51.100.1:8100"}
    assert "10.0.0.1:9999" in {r["address"] for r in rows if r["dst"] == "production"}


def test_plan_without_world_or_address_fails_clearly():
    boundary, plan = make_plan()
    bare = dict(plan)
    del bare["world"]
    with pytest.raises(ProbeError, match="no embedded world"):
        probe_matrix(boundary, bare)
    plan["world"]["neighbours"]["fallback"]["addresses"] = ["198.18.0.1"]
    with pytest.raises(ProbeError, match="fallback neighbour has no address in 203.0.113.0/28"):
        probe_matrix(boundary, plan)


def test_no_control_plane_neighbour_dns_goes_to_the_uplink():
    raw = {"sandbox_cidr": "10.213.0.0/16", "production_cidrs": ["10.0.0.0/16"], "tiers": ["app"]}
    boundary, plan = make_plan(raw)
    plan["world"]["neighbours"]["control_plane"]["addresses"] = []
    rows = probe_matrix(boundary, plan)
    assert {r["address"] for r in rows if r["dst"] == "dns"} == {plan["uplink"]["address"] + ":53"}
    assert not [r for r in rows if r["expected"] == "allow"]


def test_every_row_meets_a_listener_of_the_planned_world():
    """Against the world planner's own plan: every allow row and every undeclared-port row has a listener
    (so an allow row connects, and a hole shows as 'connected', not only as a refusal)."""
    boundary = parse_boundary(RAW)
    plan = full_plan(boundary, DRILL)
    rows = probe_matrix(boundary, plan)
    listening = {(item["address"], item["port"], item["protocol"]) for item in plan["world"]["listeners"]}

    def target(row):
        host, port = row["address"].rsplit(":", 1)
        return host, int(port), row["protocol"]

    assert [r for r in rows if r["expected"] == "allow" and target(r) not in listening] == []
    assert [r for r in rows if r["dst"] in ("production", "dns") and target(r) not in listening] == []
    assert [r for r in rows if r["dst"] in plan["tiers"] and target(r) not in listening] == []


def test_module_check_mode_plans_the_rows_and_sends_nothing():
    result = run_module("runtime_probe", {"drill_id": DRILL, "boundary": RAW}, check_mode=True)
    assert not result.failed, result.get("msg")
    boundary = parse_boundary(RAW)
    assert result["rows"] == probe_matrix(boundary, full_plan(boundary, DRILL))
    assert {r["observed"] for r in result["rows"]} == {None} and result["violations"] == []
    assert result["changed"] is False


@pytest.mark.parametrize("module", ["runtime_probe", "runtime_verify"])
def test_modules_refuse_a_bad_boundary_before_anything(module):
    raw = dict(RAW, tier_rules=[{"from": "app", "to": "cache", "ports": [6379]}])
    result = run_module(module, {"drill_id": DRILL, "boundary": raw})
    assert result.failed
    assert result["msg"].startswith("boundary is invalid for the netns runtime: drill_boundary.tier_rules[0].to: "
                                    "'cache' is not a declared tier")
    assert "rows" not in result and "findings" not in result


def test_probe_timeout_out_of_range_is_refused():
    result = run_module("runtime_probe", {"drill_id": DRILL, "boundary": RAW, "timeout": 0})
    assert result.failed and result["msg"] == ("timeout 0.0 is outside 0.05-30 seconds; pass a probe timeout in "
                                               "that range")


def test_two_rules_naming_the_same_flow_give_one_row():
    raw = dict(RAW, tier_rules=[{"from": "app", "to": "db", "ports": [5432]},
                                {"from": "app", "to": "db", "ports": ["5432-5432"], "description": "again"}],
               ingress=[{"cidr": "192.0.2.0/28", "ports": [22]}, {"cidr": "192.0.2.0/28", "ports": [22]}])
    boundary, plan = make_plan(raw)
    rows = probe_matrix(boundary, plan)
    keys = [key(r) for r in rows]
    assert len(keys) == len(set(keys))
    assert keys.count(("app", "db", plan["tiers"]["db"]["address"] + ":5432", "tcp", "allow")) == 1


def test_s3_endpoint_rows_from_every_tier_only_when_s3_is_granted():
    boundary, plan = make_plan()
    assert [r for r in probe_matrix(boundary, plan) if r["dst"] == "s3_endpoint"] == []
    boundary, plan = make_plan(dict(RAW, s3_read=[{"bucket": "backups", "prefix": "orders/"}]))
    plan["world"]["s3_endpoint"] = {"address": "198.18.7.1", "port": 443, "ns": plan["prefix"] + "s3"}
    rows = [key(r) for r in probe_matrix(boundary, plan) if r["dst"] == "s3_endpoint"]
    # Every tier, as every tier's security group reaches the S3 prefix list on tcp 443 on AWS; no other port.
    assert sorted(rows) == sorted(
        [(src, "s3_endpoint", "198.18.7.1:443", "tcp", "allow") for src in ("app", "db", "validation")]
        + [(src, "s3_endpoint", "198.18.7.1:80", "tcp", "deny") for src in ("app", "db", "validation")])


def test_s3_endpoint_allow_row_meets_the_planned_endpoint_listener():
    boundary = parse_boundary(dict(RAW, s3_read=[{"bucket": "backups", "prefix": "orders/"}]))
    plan = full_plan(boundary, DRILL)
    listening = {(i["address"], i["port"]) for i in plan["world"]["listeners"] if i["kind"] == "s3"}
    allow = {tuple(r["address"].rsplit(":", 1)) for r in probe_matrix(boundary, plan)
             if r["dst"] == "s3_endpoint" and r["expected"] == "allow"}
    assert listening == {(a, int(p)) for a, p in allow} == {("198.18.0.1", 443)}
