"""The netns runtime's nftables translator and live-ruleset verifier (plugins/module_utils/_nft_policy.py).

No root: the verifier is fed ``nft -j list ruleset`` JSON. ``LIVE_1_0_6`` below is the output of
nftables 1.0.6 (Lester Gooch #5) after ``nft -f`` of ``router_ruleset(BOUNDARY, plan, table)`` for
``DRILL`` in a throwaway network namespace (``unshare -rn``), copied verbatim.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import pathlib
import re
import shutil
import subprocess

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import (
    COUNTERS,
    FINDING_CODES,
    NftPolicyError,
    address_plan,
    router_ruleset,
    verify_ruleset,
)
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

DRILL = "dr-20261130184400-a1b2c3"
RAW = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16", "172.16.0.0/12"],
    "ingress": [{"cidr": "192.0.2.0/28", "ports": [22, "8000-8100"]}],
    "egress": [{"cidr": "198.51.100.0/28", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "ports": [5432]}],
}
BOUNDARY = parse_boundary(RAW)
PLAN = address_plan(BOUNDARY, DRILL)
TABLE = PLAN["table"]

LIVE_1_0_6 = [{'metainfo': {'version': '1.0.6', 'release_name': 'Lester Gooch #5', 'json_schema_version': 1}},
     {'table': {'family': 'inet', 'name': 'drg-c3f70e-router', 'handle': 5}},
     {'counter': {'family': 'inet',
                  'name': 'production_drop',
                  'table': 'drg-c3f70e-router',
                  'handle': 4,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'ipv6_drop',
                  'table': 'drg-c3f70e-router',
                  'handle': 5,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'established_allow',
                  'table': 'drg-c3f70e-router',
                  'handle': 6,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'dns_drop',
                  'table': 'drg-c3f70e-router',
                  'handle': 7,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'egress_allow',
                  'table': 'drg-c3f70e-router',
                  'handle': 8,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'ingress_allow',
                  'table': 'drg-c3f70e-router',
                  'handle': 9,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'tier_allow',
                  'table': 'drg-c3f70e-router',
                  'handle': 10,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'fallback_allow',
                  'table': 'drg-c3f70e-router',
                  'handle': 11,
                  'packets': 0,
                  'bytes': 0}},
     {'counter': {'family': 'inet',
                  'name': 'default_drop',
                  'table': 'drg-c3f70e-router',
                  'handle': 12,
                  'packets': 0,
                  'bytes': 0}},
     {'chain': {'family': 'inet',
                'table': 'drg-c3f70e-router',
                'name': 'forward',
                'handle': 1,
                'type': 'filter',
                'hook': 'forward',
                'prio': 0,
                'policy': 'drop'}},
     {'chain': {'family': 'inet',
                'table': 'drg-c3f70e-router',
                'name': 'input',
                'handle': 2,
                'type': 'filter',
                'hook': 'input',
                'prio': 0,
                'policy': 'drop'}},
     {'chain': {'family': 'inet',
                'table': 'drg-c3f70e-router',
                'name': 'output',
                'handle': 3,
                'type': 'filter',
                'hook': 'output',
                'prio': 0,
                'policy': 'drop'}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 14,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 16,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 17,
               'expr': [{'match': {'op': '==', 'left': {'meta': {'key': 'nfproto'}}, 'right': 'ipv6'}},
                        {'counter': 'ipv6_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 18,
               'expr': [{'match': {'op': 'in',
                                   'left': {'ct': {'key': 'state'}},
                                   'right': ['established', 'related']}},
                        {'counter': 'established_allow'},
                        {'accept': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 20,
               'expr': [{'match': {'op': '!=',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'prefix': {'addr': '10.213.0.0', 'len': 16}}}},
                        {'match': {'op': '==',
                                   'left': {'meta': {'key': 'l4proto'}},
                                   'right': {'set': ['tcp', 'udp']}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'th', 'field': 'dport'}},
                                   'right': 53}},
                        {'counter': 'dns_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 22,
               'expr': [{'match': {'op': '==',
                                   'left': {'meta': {'key': 'iifname'}},
                                   'right': {'set': ['drg-c3f70e-0r', 'drg-c3f70e-1r', 'drg-c3f70e-2r']}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'prefix': {'addr': '10.213.0.0', 'len': 16}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'prefix': {'addr': '198.51.100.0', 'len': 28}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'tcp', 'field': 'dport'}},
                                   'right': 443}},
                        {'counter': 'egress_allow'},
                        {'accept': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 24,
               'expr': [{'match': {'op': '==', 'left': {'meta': {'key': 'iifname'}}, 'right': 'drg-c3f70e-ur'}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'prefix': {'addr': '192.0.2.0', 'len': 28}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'prefix': {'addr': '10.213.0.0', 'len': 16}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'tcp', 'field': 'dport'}},
                                   'right': {'set': [22, {'range': [8000, 8100]}]}}},
                        {'counter': 'ingress_allow'},
                        {'accept': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 25,
               'expr': [{'match': {'op': '==', 'left': {'meta': {'key': 'iifname'}}, 'right': 'drg-c3f70e-0r'}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'prefix': {'addr': '10.213.0.0', 'len': 28}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'prefix': {'addr': '10.213.0.16', 'len': 28}}}},
                        {'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'tcp', 'field': 'dport'}},
                                   'right': 5432}},
                        {'counter': 'tier_allow'},
                        {'accept': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'forward',
               'handle': 26,
               'expr': [{'counter': 'default_drop'}, {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'input',
               'handle': 28,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'input',
               'handle': 30,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'input',
               'handle': 31,
               'expr': [{'match': {'op': '==', 'left': {'meta': {'key': 'nfproto'}}, 'right': 'ipv6'}},
                        {'counter': 'ipv6_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'input',
               'handle': 32,
               'expr': [{'counter': 'default_drop'}, {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'output',
               'handle': 34,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'daddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'output',
               'handle': 36,
               'expr': [{'match': {'op': '==',
                                   'left': {'payload': {'protocol': 'ip', 'field': 'saddr'}},
                                   'right': {'set': [{'prefix': {'addr': '10.0.0.0', 'len': 16}},
                                                     {'prefix': {'addr': '172.16.0.0', 'len': 12}}]}}},
                        {'counter': 'production_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'output',
               'handle': 37,
               'expr': [{'match': {'op': '==', 'left': {'meta': {'key': 'nfproto'}}, 'right': 'ipv6'}},
                        {'counter': 'ipv6_drop'},
                        {'drop': None}]}},
     {'rule': {'family': 'inet',
               'table': 'drg-c3f70e-router',
               'chain': 'output',
               'handle': 38,
               'expr': [{'counter': 'default_drop'}, {'drop': None}]}}]


def live() -> dict:
    return {"nftables": copy.deepcopy(LIVE_1_0_6)}


def rules_of(doc: dict, chain: str) -> list:
    return [i for i in doc["nftables"] if "rule" in i and i["rule"]["chain"] == chain]


def codes(findings) -> list:
    return sorted(f["code"] for f in findings)


def match(proto: str, field: str, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}}, "right": right}}


def prefix(cidr: str):
    net = ipaddress.ip_network(cidr)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def rule(chain: str, expr: list, handle: int = 99) -> dict:
    return {"rule": {"family": "inet", "table": TABLE, "chain": chain, "handle": handle, "expr": expr}}


def insert_after(doc: dict, chain: str, index: int, item: dict) -> None:
    """Put ``item`` right after the ``index``-th rule of ``chain`` (-1: before the first)."""
    chain_rules = rules_of(doc, chain)
    anchor = chain_rules[index] if index >= 0 else chain_rules[0]
    pos = doc["nftables"].index(anchor) + (1 if index >= 0 else 0)
    doc["nftables"].insert(pos, item)


# --- the plan ------------------------------------------------------------------------

def links(plan: dict) -> list:
    return list(plan["tiers"].values()) + [plan["uplink"]]


def test_plan_is_deterministic_and_per_drill():
    assert address_plan(BOUNDARY, DRILL) == PLAN
    other = address_plan(BOUNDARY, "dr-20261130184400-ffffff")
    assert other["short"] != PLAN["short"]
    mine = {link[k] for link in links(PLAN) for k in ("veth_host", "veth_peer")}
    theirs = {link[k] for link in links(other) for k in ("veth_host", "veth_peer")}
    assert not mine & theirs


def test_plan_always_has_validation_tier_once():
    assert list(PLAN["tiers"]) == ["app", "db", "validation"]
    declared = address_plan(parse_boundary(dict(RAW, tiers=["validation", "app"], tier_rules=[])), DRILL)
    assert list(declared["tiers"]) == ["validation", "app"]


def test_plan_names_fit_ifnamsiz_and_follow_drg_short_tier():
    many = dict(RAW, tiers=["app", "db", "reporting-warehouse"] + ["t%d" % i for i in range(20)], tier_rules=[])
    plan = address_plan(parse_boundary(many), DRILL)
    prefix = "drg-%s-" % plan["short"]
    names = [link[k] for link in links(plan) for k in ("veth_host", "veth_peer")]
    assert all(len(n) <= 15 for n in names), names
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"drg-[0-9a-f]{6}-[a-z0-9-]+", n) for n in names)
    assert plan["prefix"] == prefix and plan["router"]["ns"] == prefix + "router" == plan["table"]
    assert {t: s["ns"] for t, s in plan["tiers"].items()}["reporting-warehouse"] == prefix + "reporting-warehouse"


def test_plan_subnets_inside_sandbox_and_disjoint():
    sandbox = ipaddress.ip_network(PLAN["sandbox_cidr"])
    nets = [ipaddress.ip_network(link["subnet"]) for link in links(PLAN)]
    assert all(n.subnet_of(sandbox) for n in nets)
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])
    for link in links(PLAN):
        net = ipaddress.ip_network(link["subnet"])
        assert {ipaddress.ip_address(link["gateway"]), ipaddress.ip_address(link["address"])} <= set(net.hosts())
        assert link["gateway"] != link["address"]


def test_plan_is_accepted_by_the_namespace_manager():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
    prefix, router, tiers = _netns.validate_plan(PLAN)
    assert (prefix, router, sorted(tiers)) == (PLAN["prefix"], PLAN["router"]["ns"], ["app", "db", "validation"])


def test_plan_picks_sandbox_cidr_from_drill_id_when_absent():
    raw = {k: v for k, v in RAW.items() if k != "sandbox_cidr"}
    plan = address_plan(parse_boundary(raw), DRILL)
    assert plan == address_plan(parse_boundary(raw), DRILL)
    assert not any(ipaddress.ip_network(plan["sandbox_cidr"]).overlaps(p) for p in BOUNDARY.production_cidrs)


def test_plan_refuses_too_many_tiers_for_sandbox():
    raw = dict(RAW, sandbox_cidr="10.213.0.0/24", tiers=["t%d" % i for i in range(15)], tier_rules=[])
    with pytest.raises(NftPolicyError, match="holds 16 /28 blocks, 17 are needed"):
        address_plan(parse_boundary(raw), DRILL)


def test_plan_refuses_tier_named_router():
    with pytest.raises(NftPolicyError, match="'router' is reserved"):
        address_plan(parse_boundary(dict(RAW, tiers=["router", "db"], tier_rules=[])), DRILL)


# --- the ruleset text ----------------------------------------------------------------

def chain_lines(text: str, chain: str) -> list:
    lines = text.splitlines()
    start = lines.index("\tchain %s {" % chain)
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1:end]]


def test_ruleset_production_dropped_first_in_both_directions_every_chain():
    text = router_ruleset(BOUNDARY, PLAN, TABLE)
    prod = "{ 10.0.0.0/16, 172.16.0.0/12 }"
    for chain in ("forward", "input", "output"):
        body = chain_lines(text, chain)
        assert body[0] == "type filter hook %s priority 0; policy drop;" % chain
        assert body[1] == 'ip daddr %s counter name "production_drop" drop' % prod
        assert body[2] == 'ip saddr %s counter name "production_drop" drop' % prod
        assert body[-1] == 'counter name "default_drop" drop'


def test_ruleset_declares_every_counter_and_uses_them():
    text = router_ruleset(BOUNDARY, PLAN, TABLE)
    for name in COUNTERS:
        assert "\tcounter %s {" % name in text
    used = {line.split('counter name "')[1].split('"')[0] for line in text.splitlines() if 'counter name "' in line}
    assert used == set(COUNTERS) - {"fallback_allow", "s3_allow"}  # no fallback, no S3 declared


def test_ruleset_rules_per_declared_flow():
    body = chain_lines(router_ruleset(BOUNDARY, PLAN, TABLE), "forward")
    app, db = PLAN["tiers"]["app"], PLAN["tiers"]["db"]
    assert body[3] == 'meta nfproto ipv6 counter name "ipv6_drop" drop'
    assert body[4] == 'ct state established,related counter name "established_allow" accept'
    assert body[5].startswith("ip daddr != 10.213.0.0/16 meta l4proto { tcp, udp } th dport 53 ")
    accepts = [line for line in body if line.endswith(" accept")]
    assert len(accepts) == 4
    assert 'ip saddr 10.213.0.0/16 ip daddr 198.51.100.0/28 tcp dport 443 counter name "egress_allow"' in accepts[1]
    assert 'ip saddr 192.0.2.0/28 ip daddr 10.213.0.0/16 tcp dport { 22, 8000-8100 }' in accepts[2]
    assert accepts[3] == ('iifname "%s" ip saddr %s ip daddr %s tcp dport 5432 counter name "tier_allow" accept'
                          % (app["veth_host"], app["subnet"], db["subnet"]))


def test_ruleset_replaces_only_its_own_table():
    text = router_ruleset(BOUNDARY, PLAN, TABLE)
    assert text.splitlines()[:3] == ["table inet %s" % TABLE, "delete table inet %s" % TABLE,
                                     "table inet %s {" % TABLE]
    assert [line for line in text.splitlines() if line.startswith("table") or line.startswith("delete")] == \
        text.splitlines()[:3]


@pytest.mark.skipif(not shutil.which("nft") or not shutil.which("unshare"), reason="needs nft and unshare")
def test_ruleset_is_accepted_by_nft_check(tmp_path):
    path = tmp_path / "router.nft"
    path.write_text(router_ruleset(BOUNDARY, PLAN, TABLE))
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user/network namespaces here")
    done = subprocess.run(["unshare", "-rn", "nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fixture_is_what_the_translator_applies():
    # The fixture came from this exact translation; a change to the translator means re-capturing it.
    assert TABLE == "drg-c3f70e-router"
    assert [i["table"]["name"] for i in LIVE_1_0_6 if "table" in i] == [TABLE]


# --- the verifier ----------------------------------------------------------------------

def test_verify_clean_live_ruleset_has_no_findings():
    assert verify_ruleset(BOUNDARY, PLAN, live()) == []
    assert verify_ruleset(BOUNDARY, PLAN, json.dumps(live())) == []


def test_verify_takes_the_bare_item_list():
    items = [i for i in copy.deepcopy(LIVE_1_0_6) if "metainfo" not in i]
    assert verify_ruleset(BOUNDARY, PLAN, items) == []
    assert codes(verify_ruleset(BOUNDARY, PLAN, items[:1])) == ["runtime_chain_missing"] * 3 + [
        "runtime_counter_missing"] * (len(COUNTERS) - 1)  # s3_allow: no S3 declared


@pytest.mark.skipif(not shutil.which("nft") or not shutil.which("unshare"), reason="needs nft and unshare")
def test_verify_round_trip_through_a_real_kernel(tmp_path):
    # Apply in a throwaway user+network namespace, read back as the kernel reports it, judge it.
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user/network namespaces here")
    path = tmp_path / "router.nft"
    path.write_text(router_ruleset(BOUNDARY, PLAN, TABLE))
    done = subprocess.run(["unshare", "-rn", "sh", "-c", 'nft -f "$1" && nft -f "$1" && nft -j list ruleset',
                           "sh", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_ruleset(BOUNDARY, PLAN, done.stdout) == []
    other = parse_boundary(dict(RAW, tier_rules=[{"from": "db", "to": "app", "ports": [5432]}]))
    assert codes(verify_ruleset(other, PLAN, done.stdout)) == ["runtime_rule_missing", "runtime_rule_undeclared"]


def test_verify_tier_rule_widened_to_whole_sandbox_is_undeclared():
    doc = live()
    tier = [r for r in rules_of(doc, "forward") if {"counter": "tier_allow"} in r["rule"]["expr"]][0]
    for e in tier["rule"]["expr"]:
        if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "saddr":
            e["match"]["right"] = prefix("10.213.0.0/16")  # any tier, not only app, may reach db
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    assert codes(found) == ["runtime_rule_undeclared"]
    assert "from 10.213.0.0/16 to 10.213.0.16/28 proto tcp dport 5432" in found[0]["detail"]


def test_verify_accept_to_production_is_flagged():
    doc = live()
    # An accept to production placed after the production drops is still undeclared.
    insert_after(doc, "forward", 5, rule("forward", [match("ip", "daddr", prefix("10.0.5.0/24")),
                                                     match("tcp", "dport", 5432), {"accept": None}]))
    assert codes(verify_ruleset(BOUNDARY, PLAN, doc)) == ["runtime_rule_undeclared"]


def test_verify_accept_before_production_drop_is_not_dropped_first():
    doc = live()
    insert_after(doc, "forward", -1, rule("forward", [match("ip", "saddr", prefix("10.213.0.0/28")),
                                                      match("ip", "daddr", prefix("10.213.0.16/28")),
                                                      match("tcp", "dport", 5432), {"accept": None}]))
    insert_after(doc, "forward", -1, rule("forward", [match("ip", "daddr", "10.0.0.5"),
                                                      match("tcp", "dport", 443), {"accept": None}]))
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    assert codes(found) == ["runtime_production_not_dropped_first", "runtime_rule_undeclared"]
    # the harmless tier accept (second rule) cannot touch production: only rule 1 is reported
    assert {f["resource"] for f in found} == {"inet %s chain forward rule 1" % TABLE}


def test_verify_production_drop_narrowed_by_port_does_not_count():
    doc = live()
    first = rules_of(doc, "forward")[0]["rule"]["expr"]
    first.insert(1, match("tcp", "dport", 22))  # drops production only on port 22
    assert codes(verify_ruleset(BOUNDARY, PLAN, doc)) == ["runtime_production_not_dropped_first"]


def test_verify_production_drop_narrowed_by_interface_does_not_count():
    doc = live()
    first = rules_of(doc, "output")[1]["rule"]["expr"]  # ip saddr production drop
    first.insert(0, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}})
    assert [(f["code"], f["resource"]) for f in verify_ruleset(BOUNDARY, PLAN, doc)] == \
        [("runtime_rule_missing", "inet %s chain output" % TABLE)]


def test_verify_removed_rule_is_missing():
    doc = live()
    tier = [r for r in rules_of(doc, "forward") if {"counter": "tier_allow"} in r["rule"]["expr"]]
    doc["nftables"].remove(tier[0])
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    assert codes(found) == ["runtime_rule_missing"]
    assert "tier app -> db tcp/5432" in found[0]["detail"]


def test_verify_removed_production_drop_is_missing():
    doc = live()
    doc["nftables"].remove(rules_of(doc, "input")[1])  # ip saddr production drop
    assert [(f["code"], f["resource"]) for f in verify_ruleset(BOUNDARY, PLAN, doc)] == \
        [("runtime_rule_missing", "inet %s chain input" % TABLE)]


def test_verify_declared_flow_judged_by_meaning_not_text():
    doc = live()
    egress = [r for r in rules_of(doc, "forward") if {"counter": "egress_allow"} in r["rule"]["expr"]][0]
    # written differently by hand: ct state new, no interface match, a single host inside the declared /28
    egress["rule"]["expr"] = [
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
        match("ip", "saddr", prefix("10.213.0.0/16")), match("ip", "daddr", prefix("198.51.100.0/28")),
        match("tcp", "dport", {"set": [443]}), {"counter": "egress_allow"}, {"accept": None}]
    assert verify_ruleset(BOUNDARY, PLAN, doc) == []


def test_verify_chain_policy_accept():
    doc = live()
    for item in doc["nftables"]:
        if "chain" in item and item["chain"]["name"] == "forward":
            item["chain"]["policy"] = "accept"
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    assert [(f["code"], f["resource"]) for f in found] == \
        [("runtime_policy_not_drop", "inet %s chain forward" % TABLE)]


def test_verify_widened_port_range_is_undeclared():
    doc = live()
    ingress = [r for r in rules_of(doc, "forward") if {"counter": "ingress_allow"} in r["rule"]["expr"]][0]
    for e in ingress["rule"]["expr"]:
        if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "dport":
            e["match"]["right"] = {"set": [22, {"range": [8000, 8101]}]}
    # still allows the declared ingress (not missing), but 8101 is more than declared
    assert codes(verify_ruleset(BOUNDARY, PLAN, doc)) == ["runtime_rule_undeclared"]


def test_verify_ipv6_drop_removed():
    doc = live()
    doc["nftables"].remove(rules_of(doc, "forward")[2])
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    # the established accept now comes before any IPv6 drop
    assert [(f["code"], f["resource"]) for f in found] == \
        [("runtime_ipv6_not_dropped", "inet %s chain forward rule 3" % TABLE)]


def test_verify_dns_drop_removed_with_dns_egress():
    raw = dict(RAW, egress=RAW["egress"] + [{"cidr": "198.51.100.53/32", "protocol": "udp", "ports": [53]}])
    boundary = parse_boundary(raw)
    text_rules = chain_lines(router_ruleset(boundary, PLAN, TABLE), "forward")
    assert any("th dport 53" in line for line in text_rules)
    doc = live()
    dns = [r for r in rules_of(doc, "forward") if {"counter": "dns_drop"} in r["rule"]["expr"]][0]
    idx = doc["nftables"].index(dns)
    doc["nftables"][idx] = rule("forward", [match("ip", "daddr", "198.51.100.53"), match("udp", "dport", 53),
                                            {"counter": "egress_allow"}, {"accept": None}])
    assert codes(verify_ruleset(boundary, PLAN, doc)) == ["runtime_dns_not_dropped", "runtime_rule_undeclared"]


def test_verify_missing_table_and_foreign_table():
    doc = {"nftables": [i for i in LIVE_1_0_6 if "table" not in i or i["table"]["name"] != TABLE]}
    doc["nftables"].append({"table": {"family": "ip", "name": "filter", "handle": 9}})
    found = verify_ruleset(BOUNDARY, PLAN, doc)
    assert [(f["code"], f["resource"]) for f in found] == [
        ("runtime_table_unexpected", "ip filter"), ("runtime_table_missing", "inet %s" % TABLE)]


def test_verify_jump_is_unsupported():
    doc = live()
    insert_after(doc, "forward", 5, rule("forward", [{"jump": {"target": "elsewhere"}}]))
    assert codes(verify_ruleset(BOUNDARY, PLAN, doc)) == ["runtime_rule_unsupported"]


def test_verify_counter_missing():
    doc = {"nftables": [i for i in LIVE_1_0_6 if not ("counter" in i and i["counter"]["name"] == "tier_allow")]}
    assert codes(verify_ruleset(BOUNDARY, PLAN, doc)) == ["runtime_counter_missing"]


@pytest.mark.parametrize("garbage", [
    "not json", "", "[]", {"nftables": "x"}, {"nftables": [{"rule": "x"}]},
    {"nftables": [{"table": {"family": "inet", "name": TABLE}},
                  {"rule": {"family": "inet", "table": TABLE, "chain": "forward", "expr": [{"match": {"op": "<"}}]}}]},
    {"nftables": [{"table": {"family": "inet", "name": TABLE}},
                  {"rule": {"family": "inet", "table": TABLE, "chain": "forward",
                            "expr": [match("ip", "daddr", {"weird": 1}), {"accept": None}]}}]},
    {"nftables": [{"table": {"family": "inet", "name": TABLE}}, {"chain": {"family": "inet", "table": TABLE}}]},
])
def test_verify_garbage_is_unreadable(garbage):
    found = verify_ruleset(BOUNDARY, PLAN, garbage)
    assert codes(found) == ["runtime_unreadable"]


def test_every_emitted_code_is_documented():
    with open(pathlib.Path(__file__).parents[2] / "docs" / "runtime.md") as fh:
        doc = fh.read()
    for code in FINDING_CODES:
        assert "`%s`" % code in doc, code


# --- fallback paths (drill_boundary.fallback) ---------------------------------------------

DR_SITE = "203.0.113.0/28"
FALLBACK_RAW = dict(RAW, fallback=[{"cidr": DR_SITE, "ports": [443, "8443-8444"], "description": "DR site"}])
FALLBACK_BOUNDARY = parse_boundary(FALLBACK_RAW)


def with_fallback_rule() -> dict:
    """The clean fixture plus the fallback accept the translator writes (the egress accept's shape)."""
    doc = live()
    egress = [r for r in rules_of(doc, "forward") if {"counter": "egress_allow"} in r["rule"]["expr"]][0]
    fallback = copy.deepcopy(egress)
    fallback["rule"]["handle"] = 90
    for e in fallback["rule"]["expr"]:
        if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "daddr":
            e["match"]["right"] = prefix(DR_SITE)
        if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "dport":
            e["match"]["right"] = {"set": [443, {"range": [8443, 8444]}]}
        if e == {"counter": "egress_allow"}:
            e["counter"] = "fallback_allow"
    forward = rules_of(doc, "forward")
    insert_after(doc, "forward", len(forward) - 2, fallback)  # after the tier rule, before the default drop
    return doc


def fallback_rule_of(doc: dict) -> dict:
    return [r for r in rules_of(doc, "forward") if {"counter": "fallback_allow"} in r["rule"]["expr"]][0]


def test_ruleset_emits_fallback_paths_under_fallback_allow():
    text = router_ruleset(FALLBACK_BOUNDARY, PLAN, TABLE)
    forward = chain_lines(text, "forward")
    line = ('iifname { "drg-c3f70e-0r", "drg-c3f70e-1r", "drg-c3f70e-2r" } ip saddr 10.213.0.0/16 '
            'ip daddr %s tcp dport { 443, 8443-8444 } counter name "fallback_allow" accept' % DR_SITE)
    assert line in forward
    assert forward.index(line) < forward.index('counter name "default_drop" drop')
    assert 'fallback_allow' not in router_ruleset(BOUNDARY, PLAN, TABLE).split("chain forward")[1]


def test_verify_accepts_a_declared_fallback():
    assert verify_ruleset(FALLBACK_BOUNDARY, PLAN, with_fallback_rule()) == []


def test_verify_fallback_accept_without_the_declaration_is_undeclared():
    found = verify_ruleset(BOUNDARY, PLAN, with_fallback_rule())
    assert codes(found) == ["runtime_rule_undeclared"]
    assert "to %s proto tcp dport 443,8443-8444" % DR_SITE in found[0]["detail"]


def test_verify_missing_fallback_is_blocked():
    found = verify_ruleset(FALLBACK_BOUNDARY, PLAN, live())
    assert [(f["code"], f["resource"]) for f in found] == [("runtime_fallback_blocked", "inet %s chain forward"
                                                            % TABLE)]
    assert found[0]["detail"].startswith("the declared fallback to %s tcp/443,8443-8444 (drill_boundary.fallback[0])"
                                         " is not allowed by any live rule" % DR_SITE)


def test_verify_fallback_dropped_before_its_accept_is_blocked():
    doc = with_fallback_rule()
    drop = rule("forward", [match("ip", "daddr", prefix("203.0.113.8/29")), {"drop": None}])
    forward = rules_of(doc, "forward")
    insert_after(doc, "forward", forward.index(fallback_rule_of(doc)) - 1, drop)
    found = verify_ruleset(FALLBACK_BOUNDARY, PLAN, doc)
    assert codes(found) == ["runtime_fallback_blocked"]
    assert "is dropped by rule %d of chain forward before any rule accepts it" % (
        rules_of(doc, "forward").index(drop) + 1) in found[0]["detail"]


def test_verify_fallback_narrowed_to_part_of_its_ports_is_blocked():
    doc = with_fallback_rule()
    for e in fallback_rule_of(doc)["rule"]["expr"]:
        if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "dport":
            e["match"]["right"] = 443
    assert codes(verify_ruleset(FALLBACK_BOUNDARY, PLAN, doc)) == ["runtime_fallback_blocked"]


@pytest.mark.skipif(not shutil.which("nft") or not shutil.which("unshare"), reason="needs nft and unshare")
def test_verify_fallback_round_trip_through_a_real_kernel(tmp_path):
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user/network namespaces here")
    path = tmp_path / "router.nft"
    path.write_text(router_ruleset(FALLBACK_BOUNDARY, PLAN, TABLE))
    done = subprocess.run(["unshare", "-rn", "sh", "-c", 'nft -f "$1" && nft -j list ruleset', "sh", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_ruleset(FALLBACK_BOUNDARY, PLAN, done.stdout) == []
    # the same kernel ruleset without the fallback accept (the rule removed after it was built)
    doc = json.loads(done.stdout)
    doc["nftables"].remove(fallback_rule_of(doc))
    assert codes(verify_ruleset(FALLBACK_BOUNDARY, PLAN, doc)) == ["runtime_fallback_blocked"]


# --- the S3 endpoint (drill_boundary.s3_read / s3_write) ------------------------------------

S3_RAW = dict(RAW, s3_read=[{"bucket": "backups", "prefix": "orders/"}])
S3_BOUNDARY = parse_boundary(S3_RAW)
S3_PLAN = address_plan(S3_BOUNDARY, DRILL)


def test_plan_has_an_s3_endpoint_only_when_s3_is_granted():
    assert PLAN["s3_endpoint"] is None
    assert S3_PLAN["s3_endpoint"] == {"address": "198.18.0.1", "port": 443}
    write_only = parse_boundary(dict(RAW, s3_write=[{"bucket": "telemetry", "prefix": "dr/"}]))
    assert address_plan(write_only, DRILL)["s3_endpoint"] == {"address": "198.18.0.1", "port": 443}


def test_s3_endpoint_avoids_every_declared_cidr():
    taken = parse_boundary(dict(S3_RAW, production_cidrs=["10.0.0.0/16", "198.18.0.0/24"],
                                egress=[{"cidr": "198.18.1.0/24", "ports": [443]}]))
    assert address_plan(taken, DRILL)["s3_endpoint"]["address"] == "198.18.2.1"
    covered = parse_boundary(dict(S3_RAW, production_cidrs=["198.18.0.0/15"]))
    with pytest.raises(NftPolicyError, match="S3 endpoint"):
        address_plan(covered, DRILL)


def test_ruleset_lets_every_tier_reach_the_s3_endpoint_on_443_only_when_granted():
    devs = '{ %s }' % ", ".join('"%s"' % t["veth_host"] for t in S3_PLAN["tiers"].values())
    line = ('iifname %s ip saddr 10.213.0.0/16 ip daddr 198.18.0.1 tcp dport 443 counter name "s3_allow" accept'
            % devs)
    assert line in chain_lines(router_ruleset(S3_BOUNDARY, S3_PLAN, TABLE), "forward")
    assert "s3_allow\" accept" not in router_ruleset(BOUNDARY, PLAN, TABLE)
    assert "198.18." not in router_ruleset(BOUNDARY, PLAN, TABLE)


def _s3_rule(address="198.18.0.1", port=443):
    return rule("forward", [match("ip", "saddr", prefix("10.213.0.0/16")), match("ip", "daddr", address),
                            match("tcp", "dport", port), {"counter": "s3_allow"}, {"accept": None}])


def _with_s3(doc, item):
    doc["nftables"].append({"counter": {"family": "inet", "name": "s3_allow", "table": TABLE, "handle": 98,
                                        "packets": 0, "bytes": 0}})
    forward = rules_of(doc, "forward")
    insert_after(doc, "forward", len(forward) - 2, item)  # before default_drop
    return doc


def test_verify_accepts_the_s3_endpoint_when_granted_and_requires_it():
    assert verify_ruleset(S3_BOUNDARY, S3_PLAN, _with_s3(live(), _s3_rule())) == []
    missing = codes(verify_ruleset(S3_BOUNDARY, S3_PLAN, live()))
    assert missing == ["runtime_counter_missing", "runtime_rule_missing"]


def test_verify_flags_an_s3_endpoint_accept_when_s3_is_not_granted():
    found = verify_ruleset(BOUNDARY, PLAN, _with_s3(live(), _s3_rule()))
    assert codes(found) == ["runtime_rule_undeclared"]
    assert "to 198.18.0.1/32 proto tcp dport 443" in found[0]["detail"]


def test_verify_flags_an_s3_accept_on_another_port_or_address():
    assert "runtime_rule_undeclared" in codes(verify_ruleset(S3_BOUNDARY, S3_PLAN, _with_s3(live(), _s3_rule(port=80))))
    assert "runtime_rule_undeclared" in codes(
        verify_ruleset(S3_BOUNDARY, S3_PLAN, _with_s3(live(), _s3_rule(address="198.18.0.2"))))
