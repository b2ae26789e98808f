"""The embedded world's plan (plugins/module_utils/_runtime.py: world_plan, full_plan), pure: no root."""

from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _probes
from ansible_collections.drguard.sandbox.plugins.module_utils._netns import validate_plan
from ansible_collections.drguard.sandbox.plugins.module_utils._netns import validate_world
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import SandboxRuntimeError
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import full_plan
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

DRILL = "dr-20261130200000-a1b2c3"
RAW = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16", "172.16.5.7/32"],
    "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22]}],
    "egress": [
        {"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": ["8000-8100", 53]},
        {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317, 4318], "kind": "telemetry"},
    ],
    "fallback": [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443, "9000-9001"]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": ["5432-5433"]}],
}


def plan_of(raw=RAW, drill=DRILL):
    return full_plan(parse_boundary(raw), drill)


def listeners(plan, kind):
    return {(x["name"], x["ns"], x["address"], x["protocol"], x["port"])
            for x in plan["world"]["listeners"] if x["kind"] == kind}


def test_names_follow_the_contract_and_fit_ifnamsiz():
    plan = plan_of()
    p = plan["prefix"]
    world = plan["world"]
    assert world["ns"] == p + "wan"
    expected = {"production": ("prod", "p"), "control_plane": ("cp", "c"), "telemetry": ("tel", "t"),
                "fallback": ("fb", "f")}
    assert set(world["neighbours"]) == set(expected)
    for kind, (suffix, x) in expected.items():
        spec = world["neighbours"][kind]
        assert (spec["ns"], spec["veth_host"], spec["veth_peer"]) == (p + suffix, f"{p}{x}w", f"{p}{x}n")
        assert len(spec["veth_host"]) <= 15 and len(spec["veth_peer"]) <= 15
    # the namespace manager accepts the plan as it is
    prefix, _router, tiers = validate_plan(plan)
    assert validate_world(plan, prefix, tiers)["ns"] == p + "wan"


def test_one_address_per_cidr_first_free_host_and_a_32_is_its_own():
    n = plan_of()["world"]["neighbours"]
    assert n["production"]["addresses"] == ["10.0.0.1", "172.16.5.7"]
    assert n["control_plane"]["addresses"] == ["192.0.2.1", "198.51.100.1"]
    assert n["telemetry"]["addresses"] == ["198.51.100.17"]
    assert n["fallback"]["addresses"] == ["203.0.113.1"]


def test_overlapping_cidrs_get_unique_addresses():
    raw = dict(RAW, egress=[{"cidr": "198.51.100.0/24", "protocol": "tcp", "ports": [443]},
                            {"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
               ingress=[{"cidr": "198.51.100.0/24", "protocol": "tcp", "ports": [22]}],
               fallback=[{"cidr": "198.51.100.0/29", "protocol": "tcp", "ports": [443]}])
    n = plan_of(raw)["world"]["neighbours"]
    # the control plane holds one address for its two rules on the same /24
    assert n["control_plane"]["addresses"] == ["198.51.100.1"]
    assert n["telemetry"]["addresses"] == ["198.51.100.2"]
    assert n["fallback"]["addresses"] == ["198.51.100.3"]
    every = [a for spec in n.values() for a in spec["addresses"]]
    assert len(every) == len(set(every))


def test_no_free_host_is_one_clear_error():
    raw = dict(RAW, egress=[{"cidr": "198.51.100.9/32", "protocol": "tcp", "ports": [443]}],
               fallback=[{"cidr": "198.51.100.9/32", "protocol": "tcp", "ports": [443]}])
    with pytest.raises(SandboxRuntimeError) as err:
        plan_of(raw)
    assert err.value.msg == ("drill_boundary: the fallback CIDR 198.51.100.9/32 has no free host left for the "
                             "embedded world's fallback neighbour (every host is already another neighbour's); "
                             "declare a larger or separate CIDR.")
    assert err.value.detail == {"kind": "fallback", "cidr": "198.51.100.9/32"}


def test_no_fallback_declared_no_fallback_neighbour_nor_listener():
    raw = {k: v for k, v in RAW.items() if k != "fallback"}
    plan = plan_of(raw)
    assert "fallback" not in plan["world"]["neighbours"]
    assert listeners(plan, "fallback") == set()


def test_no_telemetry_rule_no_telemetry_neighbour():
    raw = dict(RAW, egress=[RAW["egress"][0]])
    world = plan_of(raw)["world"]
    assert "telemetry" not in world["neighbours"]
    assert world["telemetry"] is None


def test_production_bait_on_every_address_with_egress_and_tier_rule_ports():
    plan = plan_of()
    ns = plan["world"]["neighbours"]["production"]["ns"]
    ports = {5432: "db", 443: "webhook", 6514: "log-intake", 8000: "bait", 8100: "bait", 53: "bait",
             4317: "bait", 4318: "bait", 5433: "bait"}
    assert listeners(plan, "production") == {(name, ns, a, "tcp", port) for a in ("10.0.0.1", "172.16.5.7")
                                             for port, name in ports.items()}


def test_control_plane_telemetry_fallback_listeners():
    plan = plan_of()
    nb = plan["world"]["neighbours"]
    cp, tel, fb = nb["control_plane"]["ns"], nb["telemetry"]["ns"], nb["fallback"]["ns"]
    assert listeners(plan, "control_plane") == {
        ("control-plane", cp, "198.51.100.1", "tcp", 8000), ("control-plane", cp, "198.51.100.1", "tcp", 8100),
        ("control-plane", cp, "198.51.100.1", "tcp", 53),
        ("dns", cp, "192.0.2.1", "udp", 53), ("dns", cp, "198.51.100.1", "udp", 53)}
    assert listeners(plan, "telemetry") == {("collector", tel, "198.51.100.17", "tcp", 4317),
                                            ("telemetry", tel, "198.51.100.17", "tcp", 4318)}
    assert plan["world"]["telemetry"] == {"address": "198.51.100.17", "port": 4317}
    assert listeners(plan, "fallback") == {("fallback", fb, "203.0.113.1", "tcp", port) for port in (443, 9000, 9001)}


def test_tier_listeners_ingress_tier_rules_and_one_undeclared_port():
    plan = plan_of()
    t = plan["tiers"]
    assert listeners(plan, "tier") == {
        ("app", t["app"]["ns"], t["app"]["address"], "tcp", 22),
        ("app", t["app"]["ns"], t["app"]["address"], "tcp", 1025),
        ("db", t["db"]["ns"], t["db"]["address"], "tcp", 22),
        ("db", t["db"]["ns"], t["db"]["address"], "tcp", 5432),
        ("db", t["db"]["ns"], t["db"]["address"], "tcp", 5433),
        ("db", t["db"]["ns"], t["db"]["address"], "tcp", 1025),
        ("validation", t["validation"]["ns"], t["validation"]["address"], "tcp", 22),
        ("validation", t["validation"]["ns"], t["validation"]["address"], "tcp", 1025),
    }


def test_undeclared_port_skips_declared_ranges_and_agrees_with_the_probes():
    raw = dict(RAW, ingress=[{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": ["1000-1030"]}],
               tier_rules=[{"from": "app", "to": "db", "protocol": "tcp", "ports": ["1031-1040"]}])
    boundary = parse_boundary(raw)
    plan = full_plan(boundary, DRILL)
    db = [x["port"] for x in plan["world"]["listeners"] if x["kind"] == "tier" and x["name"] == "db"]
    assert 1041 in db
    assert _probes.undeclared_port(boundary, "db") == 1041


def test_every_probe_target_of_the_matrix_has_a_listener_or_is_a_deny():
    boundary = parse_boundary(RAW)
    plan = full_plan(boundary, DRILL)
    served = {(x["address"], x["protocol"], x["port"]) for x in plan["world"]["listeners"]}
    for row in _probes.probe_matrix(boundary, plan):
        address, port = row["address"].rsplit(":", 1)
        if row["expected"] == "allow" or row["dst"] == "production":
            assert (address, row["protocol"], int(port)) in served, row


def test_addresses_never_in_the_sandbox_and_never_the_wan_address():
    raw = dict(RAW, egress=[{"cidr": "169.254.0.0/30", "protocol": "tcp", "ports": [443]}])
    plan = plan_of(raw)
    sandbox = ipaddress.ip_network(plan["sandbox_cidr"])
    every = [a for spec in plan["world"]["neighbours"].values() for a in spec["addresses"]]
    assert "169.254.0.1" not in every
    assert plan["world"]["neighbours"]["control_plane"]["addresses"] == ["192.0.2.1", "169.254.0.2"]
    assert not any(ipaddress.ip_address(a) in sandbox for a in every)


@pytest.mark.parametrize("tier", ["wan", "prod", "cp", "tel", "fb", "s3"])
def test_a_tier_named_like_a_world_namespace_is_refused(tier):
    raw = dict(RAW, tiers=["app", tier], tier_rules=[])
    with pytest.raises(SandboxRuntimeError) as err:
        plan_of(raw)
    assert err.value.msg == (f"drill_boundary.tiers: {tier!r} is reserved for a namespace of the embedded world "
                             "(cp, fb, prod, s3, tel, wan); rename that tier.")


def test_full_plan_is_deterministic_and_address_plan_errors_become_runtime_errors():
    assert plan_of() == plan_of()
    with pytest.raises(SandboxRuntimeError) as err:
        plan_of(dict(RAW, tiers=["router"], tier_rules=[]))
    assert "reserved for the router namespace" in err.value.msg


def test_a_udp_telemetry_destination_is_refused_the_collector_speaks_tcp():
    raw = dict(RAW, egress=[RAW["egress"][0], dict(RAW["egress"][1], protocol="udp")])
    with pytest.raises(SandboxRuntimeError) as err:
        plan_of(raw)
    assert err.value.msg == ("drill_boundary.egress[1]: the telemetry collector listens on TCP, so a udp telemetry "
                             "destination would never be reached; declare it with protocol tcp.")


S3_RAW = dict(RAW, s3_read=[{"bucket": "backups", "prefix": "orders/"}])


def test_the_s3_endpoint_neighbour_exists_only_when_s3_is_granted():
    assert "s3" not in plan_of()["world"]["neighbours"]
    assert plan_of()["world"]["s3_endpoint"] is None
    assert not listeners(plan_of(), "s3")
    plan = plan_of(S3_RAW)
    p = plan["prefix"]
    spec = plan["world"]["neighbours"]["s3"]
    assert (spec["ns"], spec["veth_host"], spec["veth_peer"], spec["addresses"]) == (
        p + "s3", p + "sw", p + "sn", ["198.18.0.1"])
    assert plan["world"]["s3_endpoint"] == {"address": "198.18.0.1", "port": 443, "ns": p + "s3"}
    assert listeners(plan, "s3") == {("s3-endpoint", p + "s3", "198.18.0.1", "tcp", 443)}
    prefix, _router, tiers = validate_plan(plan)
    assert validate_world(plan, prefix, tiers)["neighbours"]["s3"]["addresses"] == ["198.18.0.1"]
