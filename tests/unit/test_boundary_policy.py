"""The boundary policy parser (plugins/module_utils/boundary.py): valid input and every error path."""

from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import (
    Boundary,
    BoundaryError,
    PortRange,
    parse_boundary,
    pick_sandbox_cidr,
)

PROD = ["10.0.0.0/16", "172.16.0.0/12"]


def full() -> dict:
    return {
        "sandbox_cidr": "10.213.0.0/16",
        "production_cidrs": list(PROD),
        "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22, "8000-8100"], "description": "cp"}],
        "egress": [{"cidr": "198.51.100.0/28", "ports": [443]},
                   {"cidr": "203.0.113.0/24", "protocol": "udp", "ports": ["514"]}],
        "control_plane_route": {"cidr": "192.0.2.0/28", "target": "tgw-0123456789abcdef0"},
        "tiers": ["app", "db", "cache-1"],
        "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
        "s3_read": [{"bucket": "backups", "prefix": "orders/"}],
        "s3_write": [{"bucket": "telemetry"}],
    }


def err(raw) -> str:
    with pytest.raises(BoundaryError) as info:
        parse_boundary(raw)
    return str(info.value)


def with_(**kw) -> dict:
    raw = full()
    raw.update(kw)
    return raw


# ------------------------------------------------------------------ valid input

def test_full_policy_parses_and_normalises():
    b = parse_boundary(full())
    assert b.sandbox_cidr == ipaddress.ip_network("10.213.0.0/16")
    assert b.production_cidrs == tuple(ipaddress.ip_network(p) for p in PROD)
    assert b.ingress[0].ports == (PortRange(22, 22), PortRange(8000, 8100))
    assert b.ingress[0].description == "cp"
    assert b.egress[0].protocol == "tcp"  # default protocol
    assert b.egress[1].protocol == "udp" and b.egress[1].ports == (PortRange(514, 514),)
    assert b.control_plane_route == {"cidr": "192.0.2.0/28", "target": "tgw-0123456789abcdef0"}
    assert b.tiers == ("app", "db", "cache-1")
    assert b.tier_rules[0].source == "app" and b.tier_rules[0].dest == "db"
    assert b.s3_read[0].object_arn == "arn:aws:s3:::backups/orders/*"
    assert b.s3_read[0].bucket_arn == "arn:aws:s3:::backups"
    assert b.s3_write[0].prefix == "" and b.s3_write[0].object_arn == "arn:aws:s3:::telemetry/*"


def test_minimal_policy_gets_defaults():
    b = parse_boundary({"production_cidrs": ["10.0.0.0/8"]})
    assert b.sandbox_cidr is None
    assert b.ingress == () and b.egress == () and b.control_plane_route is None
    assert b.tiers == ("app", "db")
    assert b.tier_rules == () and b.s3_read == () and b.s3_write == ()


def test_to_dict_round_trips():
    b = parse_boundary(full())
    d = b.to_dict()
    assert d["sandbox_cidr"] == "10.213.0.0/16"
    assert d["ingress"][0]["ports"] == ["22", "8000-8100"]
    assert d["tier_rules"][0]["from"] == "app"
    assert parse_boundary({k: v for k, v in d.items() if v is not None}) == b


def test_rule_allows_only_subnets_protocol_and_covered_ports():
    rule = parse_boundary(full()).ingress[0]
    assert rule.allows("192.0.2.0/29", "tcp", 22, 22)
    assert rule.allows("192.0.2.0/28", "tcp", 8000, 8100)
    assert not rule.allows("192.0.2.0/27", "tcp", 22, 22)      # wider than declared
    assert not rule.allows("192.0.2.0/28", "udp", 22, 22)      # other protocol
    assert not rule.allows("192.0.2.0/28", "tcp", 22, 23)      # port range not covered
    assert not rule.allows("2001:db8::/64", "tcp", 22, 22)     # IPv6 never


def test_overlaps_production():
    b = parse_boundary(full())
    assert [str(p) for p in b.overlaps_production("10.0.5.0/24")] == ["10.0.0.0/16"]
    assert [str(p) for p in b.overlaps_production("0.0.0.0/0")] == PROD
    assert b.overlaps_production("10.213.0.0/16") == []
    assert b.overlaps_production("::/0") == []


def test_with_sandbox_cidr_validates():
    b = parse_boundary({"production_cidrs": PROD})
    assert str(b.with_sandbox_cidr("10.99.0.0/16").sandbox_cidr) == "10.99.0.0/16"
    with pytest.raises(BoundaryError, match="overlaps production"):
        b.with_sandbox_cidr("10.0.0.0/16")


# ------------------------------------------------------------------ error paths

@pytest.mark.parametrize("raw, fragment", [
    ("not a dict", "must be a mapping"),
    ({}, "production_cidrs: list every production CIDR"),
    ({"production_cidrs": []}, "production_cidrs: list every production CIDR"),
    ({"production_cidrs": "10.0.0.0/8"}, "production_cidrs: list every production CIDR"),
])
def test_top_level_errors(raw, fragment):
    assert fragment in err(raw)


def test_unknown_top_level_key():
    msg = err(with_(egres=[]))
    assert "unknown key(s) egres" in msg and "allowed:" in msg


def test_unknown_rule_key():
    assert "drill_boundary.ingress[0]: unknown key(s) port" in err(
        with_(ingress=[{"cidr": "192.0.2.0/28", "port": [22]}]))


@pytest.mark.parametrize("cidr, fragment", [
    ("10.0.0.0", "has no prefix length"),
    ("10.0.0.300/24", "is not a valid CIDR"),
    ("banana/8", "is not a valid CIDR"),
    ("", "expected an IPv4 CIDR"),
    (None, "expected an IPv4 CIDR"),
    ("2001:db8::/32", "is IPv6"),
    ("10.0.0.1/16", "has host bits set; did you mean 10.0.0.0/16?"),
])
def test_invalid_cidrs(cidr, fragment):
    msg = err({"production_cidrs": [cidr]})
    assert msg.startswith("drill_boundary.production_cidrs[0]") and fragment in msg


def test_sandbox_overlapping_production():
    msg = err(with_(sandbox_cidr="10.0.128.0/17"))
    assert "sandbox_cidr: 10.0.128.0/17 overlaps production CIDR(s) 10.0.0.0/16" in msg


@pytest.mark.parametrize("cidr", ["10.200.0.0/15", "10.200.0.0/25"])
def test_sandbox_size_limits(cidr):
    assert "must be between /16 and /24" in err(with_(sandbox_cidr=cidr))


@pytest.mark.parametrize("key", ["ingress", "egress"])
def test_rules_overlapping_production(key):
    msg = err(with_(**{key: [{"cidr": "172.20.0.0/16", "ports": [443]}]}))
    assert msg.startswith("drill_boundary.%s[0]" % key)
    assert "overlaps production CIDR(s) 172.16.0.0/12" in msg


@pytest.mark.parametrize("key", ["ingress", "egress"])
def test_zero_cidr_rule_overlaps_production(key):
    assert "overlaps production" in err(with_(**{key: [{"cidr": "0.0.0.0/0", "ports": [443]}]}))


def test_rule_requires_cidr():
    assert "'cidr' is required" in err(with_(egress=[{"ports": [443]}]))


def test_rules_must_be_a_list():
    assert "drill_boundary.egress: expected a list" in err(with_(egress={"cidr": "198.51.100.0/28"}))


def test_rule_must_be_a_mapping():
    assert "drill_boundary.egress[0]: expected a mapping" in err(with_(egress=["198.51.100.0/28"]))


@pytest.mark.parametrize("ports, fragment", [
    (None, "give a non-empty list"),
    ([], "give a non-empty list"),
    ("443", "give a non-empty list"),
    ([0], "outside 1-65535 or reversed"),
    ([65536], "outside 1-65535 or reversed"),
    (["100-10"], "outside 1-65535 or reversed"),
    (["http"], "is not a port or a 'from-to' range"),
    ([True], "is not a port or a 'from-to' range"),
    (["1-2-3"], "is not a port or a 'from-to' range"),
    ([44.3], "is not a port or a 'from-to' range"),
])
def test_bad_ports(ports, fragment):
    msg = err(with_(egress=[{"cidr": "198.51.100.0/28", "ports": ports}]))
    assert msg.startswith("drill_boundary.egress[0].ports") and fragment in msg


@pytest.mark.parametrize("proto", ["-1", "all", "icmp", "TCP"])
def test_bad_protocol(proto):
    msg = err(with_(egress=[{"cidr": "198.51.100.0/28", "protocol": proto, "ports": [443]}]))
    assert "protocol" in msg and "all-protocol rules are not allowed" in msg


def test_unknown_tier_in_tier_rules():
    msg = err(with_(tier_rules=[{"from": "app", "to": "web", "ports": [80]}]))
    assert msg.startswith("drill_boundary.tier_rules[0].to: 'web' is not a declared tier")


def test_tier_rule_bad_ports():
    assert "tier_rules[0].ports" in err(with_(tier_rules=[{"from": "app", "to": "db", "ports": [70000]}]))


@pytest.mark.parametrize("tiers, fragment", [
    ([], "give at least one tier name"),
    (["App"], "is not a valid tier name"),
    (["app", "app"], "must be unique"),
    ([1], "is not a valid tier name"),
])
def test_bad_tiers(tiers, fragment):
    assert fragment in err(with_(tiers=tiers, tier_rules=[]))


@pytest.mark.parametrize("route, fragment", [
    ({"cidr": "192.0.2.0/28", "target": "igw-123"}, "must be a transit gateway"),
    ({"cidr": "192.0.2.0/28", "target": None}, "must be a transit gateway"),
    ({"cidr": "10.0.0.0/24", "target": "tgw-0a1b2c3d"}, "overlaps production"),
    ({"cidr": "10.213.4.0/24", "target": "tgw-0a1b2c3d"}, "overlaps the sandbox CIDR"),
    ({"cidr": "192.0.2.0/28", "target": "tgw-0a1b2c3d", "via": "x"}, "unknown key(s) via"),
    ({"target": "tgw-0a1b2c3d"}, "expected an IPv4 CIDR"),
])
def test_bad_control_plane_route(route, fragment):
    msg = err(with_(control_plane_route=route))
    assert msg.startswith("drill_boundary.control_plane_route") and fragment in msg


@pytest.mark.parametrize("grant, fragment", [
    ({"bucket": "Bad_Bucket"}, "is not a valid S3 bucket name"),
    ({"bucket": "ok-bucket", "prefix": "orders/*"}, "without wildcards"),
    ({"bucket": "ok-bucket", "prefix": "a?b"}, "without wildcards"),
    ({"bucket": "ok-bucket", "region": "x"}, "unknown key(s) region"),
])
def test_bad_s3_grants(grant, fragment):
    assert fragment in err(with_(s3_read=[grant]))


def test_s3_prefix_without_slash_names_a_folder_not_its_siblings():
    b = parse_boundary(with_(s3_read=[{"bucket": "backups", "prefix": "orders"}],
                             s3_write=[{"bucket": "telemetry", "prefix": "dr-1/"}]))
    assert b.s3_read[0].prefix == "orders/"
    assert b.s3_read[0].object_arn == "arn:aws:s3:::backups/orders/*"
    assert b.s3_write[0].object_arn == "arn:aws:s3:::telemetry/dr-1/*"
    assert b.to_dict()["s3_read"] == [{"bucket": "backups", "prefix": "orders/"}]


# ------------------------------------------------------------- pick_sandbox_cidr

def test_pick_returns_declared_sandbox():
    b = parse_boundary(full())
    assert pick_sandbox_cidr(b, "dr-a") == b.sandbox_cidr


def test_pick_is_stable_per_drill_and_spreads_drills():
    b = parse_boundary({"production_cidrs": PROD})
    first = pick_sandbox_cidr(b, "dr-20261129-aaaaaa")
    assert pick_sandbox_cidr(b, "dr-20261129-aaaaaa") == first
    picks = {pick_sandbox_cidr(b, "dr-20261129-%06d" % i) for i in range(40)}
    assert len(picks) > 10
    assert all(p.prefixlen == 16 for p in picks)


def test_pick_avoids_production_and_avoid_list():
    prod = ["10.64.0.0/10", "172.16.0.0/13"]  # covers 10.64-10.127 and 172.16-172.23
    b = parse_boundary({"production_cidrs": prod})
    avoid = ["10.128.0.0/9", "2001:db8::/32"]  # covers 10.128-10.255; IPv6 entries are ignored
    for i in range(30):
        pick = pick_sandbox_cidr(b, "dr-x-%d" % i, avoid)
        assert not any(pick.overlaps(ipaddress.ip_network(c)) for c in prod + avoid[:1])
        assert pick.subnet_of(ipaddress.ip_network("172.24.0.0/13"))


def test_pick_fails_when_nothing_is_free():
    # Production alone leaves room (parse_boundary refuses it otherwise); the live VPCs to avoid take the rest.
    b = parse_boundary({"production_cidrs": ["10.0.0.0/8"]})
    with pytest.raises(BoundaryError, match="no free /16 left"):
        pick_sandbox_cidr(b, "dr-full", avoid=["172.16.0.0/12"])


def test_boundary_is_hashable_value_object():
    assert isinstance(parse_boundary(full()), Boundary)
    assert parse_boundary(full()) == parse_boundary(full())


# ------------------------------------------- regressions (bugs fixed in boundary.py)

def test_tiers_must_be_a_list():
    err(with_(tiers="ab", tier_rules=[]))


def test_picked_sandbox_never_overlaps_the_control_plane_route():
    raw = {"production_cidrs": ["10.0.0.0/8"],
           "control_plane_route": {"cidr": "172.20.0.0/28", "target": "tgw-0a1b2c3d"}}
    b = parse_boundary(raw)
    picks = {pick_sandbox_cidr(b, "dr-cp-%d" % i) for i in range(64)}
    assert not any(p.overlaps(ipaddress.ip_network("172.20.0.0/28")) for p in picks)


@pytest.mark.parametrize("raw", [
    {"production_cidrs": PROD, "tiers": ["app\n"]},
    {"production_cidrs": PROD, "s3_read": [{"bucket": "backups\n"}]},
], ids=["tier", "bucket"])
def test_trailing_newline_names_are_rejected(raw):
    err(raw)


# ------------------------------- inputs that cannot be satisfied are refused up front

@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "0.0.0.0/1"])
def test_production_covering_all_or_half_of_ipv4_is_refused(cidr):
    raw = {"production_cidrs": [cidr, "128.0.0.0/1"]} if cidr == "0.0.0.0/1" else {"production_cidrs": [cidr]}
    msg = err(raw)
    assert msg.startswith("drill_boundary.production_cidrs: ")
    assert "cover all of IPv4" in msg and "list the production networks themselves" in msg


def test_production_covering_every_candidate_without_a_sandbox_cidr_is_refused():
    msg = err({"production_cidrs": ["10.0.0.0/8", "172.16.0.0/12"]})
    assert msg == ("drill_boundary.production_cidrs: 10.0.0.0/8, 172.16.0.0/12 leave no free /16 in 10.64.0.0/10 "
                   "or 172.16.0.0/12 for the sandbox; declare drill_boundary.sandbox_cidr outside production "
                   "(for example 192.168.0.0/16)")


def test_candidates_taken_by_declared_peers_count_too():
    msg = err({"production_cidrs": ["10.0.0.0/8"],
               "egress": [{"cidr": "172.16.0.0/12", "ports": [443]}]})
    assert "leave no free /16" in msg and "declare drill_boundary.sandbox_cidr" in msg


def test_production_covering_every_candidate_with_a_declared_sandbox_is_accepted():
    b = parse_boundary({"production_cidrs": ["10.0.0.0/8", "172.16.0.0/12"], "sandbox_cidr": "192.168.0.0/16"})
    assert str(pick_sandbox_cidr(b, "dr-x")) == "192.168.0.0/16"


@pytest.mark.parametrize("read, write", [
    ({"bucket": "backups", "prefix": "orders/"}, {"bucket": "backups", "prefix": "orders/"}),
    ({"bucket": "backups"}, {"bucket": "backups", "prefix": "reports/"}),
    ({"bucket": "backups", "prefix": "orders/2026/"}, {"bucket": "backups", "prefix": "orders"}),
])
def test_s3_grant_both_read_and_write_is_refused(read, write):
    msg = err({"production_cidrs": PROD, "s3_read": [read], "s3_write": [write]})
    assert msg.startswith("drill_boundary.s3_write[0]: ")
    assert "overlaps drill_boundary.s3_read[0]" in msg and "backups must stay read-only" in msg


def test_s3_read_and_write_of_disjoint_prefixes_of_one_bucket_are_accepted():
    b = parse_boundary({"production_cidrs": PROD, "s3_read": [{"bucket": "shared", "prefix": "orders/"}],
                        "s3_write": [{"bucket": "shared", "prefix": "orders-reports/"}]})
    assert [g.prefix for g in b.s3_write] == ["orders-reports/"]


@pytest.mark.parametrize("key", ["ingress", "egress"])
def test_rule_inside_the_declared_sandbox_is_refused(key):
    msg = err({"production_cidrs": PROD, "sandbox_cidr": "10.213.0.0/16",
               key: [{"cidr": "10.213.5.0/24", "ports": [443]}]})
    assert msg.startswith("drill_boundary.%s[0].cidr: 10.213.5.0/24 overlaps the sandbox CIDR 10.213.0.0/16" % key)


# ------------------------------------------- egress kind and fallback paths (issue 7)

def test_egress_kind_defaults_to_control_plane_and_accepts_telemetry():
    b = parse_boundary(with_(egress=[{"cidr": "198.51.100.0/28", "ports": [443]},
                                     {"cidr": "198.51.100.16/28", "ports": [4317], "kind": "telemetry"}]))
    assert [r.kind for r in b.egress] == ["control_plane", "telemetry"]
    assert [r.kind for r in b.ingress] == ["control_plane"]
    assert [r["kind"] for r in b.to_dict()["egress"]] == ["control_plane", "telemetry"]


@pytest.mark.parametrize("kind", ["production", "fallback", "Telemetry", "", 1])
def test_egress_kind_outside_the_choices_is_refused(kind):
    msg = err(with_(egress=[{"cidr": "198.51.100.0/28", "ports": [443], "kind": kind}]))
    assert msg.startswith("drill_boundary.egress[0].kind: %r is not one of control_plane, telemetry" % (kind,))


def test_ingress_has_no_kind():
    msg = err(with_(ingress=[{"cidr": "192.0.2.0/28", "ports": [22], "kind": "telemetry"}]))
    assert msg.startswith("drill_boundary.ingress[0]: unknown key(s) kind")


def test_second_telemetry_rule_is_refused():
    msg = err(with_(egress=[{"cidr": "198.51.100.0/28", "ports": [4317], "kind": "telemetry"},
                            {"cidr": "198.51.100.16/28", "ports": [4318], "kind": "telemetry"}]))
    assert msg.startswith("drill_boundary.egress[1].kind: a second telemetry destination")
    assert "drill_boundary.egress[0]" in msg


def fallback_raw(**rule) -> dict:
    item = {"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": [443], "description": "DR site"}
    item.update(rule)
    return with_(egress=[{"cidr": "198.51.100.0/28", "ports": [443]}], fallback=[item])


def test_fallback_parses_into_rules_shaped_like_egress():
    b = parse_boundary(fallback_raw())
    assert b.fallback == (parse_boundary(fallback_raw()).fallback[0],)
    rule = b.fallback[0]
    assert (str(rule.cidr), rule.protocol, rule.ports, rule.description, rule.kind) == (
        "203.0.113.0/28", "tcp", (PortRange(443, 443),), "DR site", "fallback")
    assert rule.allows("203.0.113.0/28", "tcp", 443, 443)
    assert b.to_dict()["fallback"] == [{"cidr": "203.0.113.0/28", "protocol": "tcp", "ports": ["443"],
                                        "description": "DR site"}]
    assert parse_boundary({k: v for k, v in b.to_dict().items() if v is not None}) == b


def test_no_fallback_by_default():
    assert parse_boundary(full()).fallback == ()
    assert parse_boundary(full()).to_dict()["fallback"] == []


@pytest.mark.parametrize("cidr", ["10.0.4.0/24", "172.20.0.0/16", "0.0.0.0/0"])
def test_fallback_overlapping_production_is_refused(cidr):
    msg = err(fallback_raw(cidr=cidr))
    assert msg.startswith("drill_boundary.fallback[0]: %s overlaps production CIDR(s)" % cidr)


def test_fallback_overlapping_the_sandbox_is_refused():
    msg = err(fallback_raw(cidr="10.213.9.0/24"))
    assert msg.startswith("drill_boundary.fallback[0].cidr: 10.213.9.0/24 overlaps the sandbox CIDR 10.213.0.0/16")


@pytest.mark.parametrize("ports", [None, []])
def test_fallback_without_ports_is_refused(ports):
    raw = fallback_raw(ports=ports)
    if ports is None:
        del raw["fallback"][0]["ports"]
    assert err(raw).startswith("drill_boundary.fallback[0].ports: give a non-empty list")


def test_fallback_has_no_kind():
    assert err(fallback_raw(kind="telemetry")).startswith("drill_boundary.fallback[0]: unknown key(s) kind")


def test_picked_sandbox_never_overlaps_a_fallback():
    b = parse_boundary({"production_cidrs": ["10.0.0.0/8"],
                        "fallback": [{"cidr": "172.20.0.0/14", "ports": [443]}]})
    picks = {pick_sandbox_cidr(b, "dr-fb-%d" % i) for i in range(64)}
    assert not any(p.overlaps(ipaddress.ip_network("172.20.0.0/14")) for p in picks)
    with pytest.raises(BoundaryError, match=r"^drill_boundary.sandbox_cidr: 172.21.0.0/16 overlaps the "
                                            r"fallback CIDR 172.20.0.0/14"):
        b.with_sandbox_cidr("172.21.0.0/16")
    assert b.with_sandbox_cidr("172.16.0.0/16").fallback == b.fallback


@pytest.mark.parametrize("ports", [[53], ["1-1024"], [443, "50-60"]])
def test_fallback_on_the_dns_port_is_refused(ports):
    msg = err(fallback_raw(protocol="udp", ports=ports))
    assert msg.startswith("drill_boundary.fallback[0].ports: %s covers port 53 (DNS)" % ports[-1])
    assert "DNS to the outside is always dropped" in msg
