"""AWS quotas the emulator does not enforce: the translators fit within them or fail first (docs/boundary-policy.md)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build as nb  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _quotas  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary  # noqa: E402

SANDBOX = "10.213.0.0/16"
# Twelve production /16s no two of which are adjacent: nothing to collapse.
TWELVE = ["10.%d.0.0/16" % (2 * i) for i in range(12)]
S3_CIDRS = ["3.5.0.0/19", "16.182.0.0/16", "18.34.0.0/19", "52.216.0.0/15", "54.231.0.0/16"]


def twelve_cidr_boundary(**overrides) -> dict:
    """The issue's example: 12 production CIDRs, 5 ingress/egress rules, S3 access."""
    raw = {
        "sandbox_cidr": SANDBOX,
        "production_cidrs": list(TWELVE),
        "ingress": [{"cidr": "192.0.2.0/28", "ports": [22, 443]},
                    {"cidr": "192.0.2.16/28", "ports": [22, 9100]},
                    {"cidr": "192.0.2.32/28", "ports": [22, 8443]}],
        "egress": [{"cidr": "198.51.100.0/28", "ports": [443, 8443]},
                   {"cidr": "198.51.100.16/28", "ports": [514, 6514]}],
        "s3_read": [{"bucket": "backups-bucket", "prefix": "orders/"}],
    }
    raw.update(overrides)
    return raw


def per_direction(entries) -> dict:
    return {egress: sorted((e for e in entries if e[0] == egress), key=lambda e: e[1]) for egress in (False, True)}


def test_twelve_production_cidrs_need_26_entries_and_fail_naming_the_quota():
    boundary = parse_boundary(twelve_cidr_boundary())
    entries = nb.desired_nacl_entries(boundary, SANDBOX, S3_CIDRS)
    assert {egress: len(es) for egress, es in per_direction(entries).items()} == {False: 26, True: 25}
    with pytest.raises(_quotas.QuotaError) as err:
        nb.check_network_quotas(boundary, S3_CIDRS)
    assert str(err.value) == (
        "the boundary needs 26 network ACL entries per direction; AWS allows 20 by default "
        "(quota 'Rules per network ACL' (L-2AEEBF1A), up to 40): raise the quota and set "
        "drill_boundary.quotas.nacl_rules_per_direction: 26, or declare fewer or wider production CIDRs, "
        "ingress and egress rules")


def test_adjacent_production_cidrs_collapse_and_every_deny_still_comes_first():
    adjacent = ["10.%d.0.0/16" % i for i in range(12)]
    boundary = parse_boundary(twelve_cidr_boundary(production_cidrs=adjacent))
    nb.check_network_quotas(boundary, S3_CIDRS)  # fits: 2 denies instead of 12
    for egress, es in per_direction(nb.desired_nacl_entries(boundary, SANDBOX, S3_CIDRS)).items():
        denies = [e for e in es if e[3] == "deny"]
        assert [e[4] for e in denies] == ["10.0.0.0/13", "10.8.0.0/14"], egress
        assert len(es) == {False: 16, True: 15}[egress]
        assert max(e[1] for e in denies) < min(e[1] for e in es if e[3] == "allow")
        deny_nets = [ipaddress.ip_network(e[4]) for e in denies]
        assert all(any(ipaddress.ip_network(p).subnet_of(d) for d in deny_nets) for p in adjacent)
        # exactly the production CIDRs: nothing outside them is denied
        assert sum(d.num_addresses for d in deny_nets) == 12 * 2 ** 16


def test_raised_quota_lets_the_boundary_through_up_to_the_hard_maximum():
    nb.check_network_quotas(parse_boundary(twelve_cidr_boundary(quotas={"nacl_rules_per_direction": 40})),
                            S3_CIDRS)
    with pytest.raises(BoundaryError, match=r"^drill_boundary\.quotas\.nacl_rules_per_direction: 41 must be a whole "
                                            r"number from 20 \(AWS's default\) to 40 \(the most quota 'Rules per "
                                            r"network ACL' can be raised to\)$"):
        parse_boundary(twelve_cidr_boundary(quotas={"nacl_rules_per_direction": 41}))
    with pytest.raises(BoundaryError, match=r"^drill_boundary\.quotas: unknown key 'nacl_rules'; allowed: "
                                            r"nacl_rules_per_direction, sg_rules_per_direction$"):
        parse_boundary(twelve_cidr_boundary(quotas={"nacl_rules": 40}))
    # a raised quota still too low names the quota and the hard maximum
    with pytest.raises(_quotas.QuotaError, match=r"needs 26 network ACL entries per direction; AWS allows 24 as "
                                                 r"declared .*up to 40\): raise the quota and set "
                                                 r"drill_boundary\.quotas\.nacl_rules_per_direction: 26"):
        nb.check_network_quotas(parse_boundary(twelve_cidr_boundary(quotas={"nacl_rules_per_direction": 24})),
                                S3_CIDRS)


def test_over_the_hard_nacl_maximum_says_it_is_not_raisable():
    many = ["10.%d.0.0/16" % (2 * i) for i in range(40)]
    boundary = parse_boundary(twelve_cidr_boundary(production_cidrs=many, quotas={"nacl_rules_per_direction": 40}))
    with pytest.raises(_quotas.QuotaError, match=r"^the boundary needs 54 network ACL entries per direction; AWS "
                                                 r"allows 40 as declared and at most 40 \(quota 'Rules per network "
                                                 r"ACL' \(L-2AEEBF1A\), its hard maximum\): declare fewer or wider"):
        nb.check_network_quotas(boundary, S3_CIDRS)


def test_ports_merge_into_ranges_and_nested_peers_go_in_nacl_and_security_groups():
    boundary = parse_boundary({
        "production_cidrs": ["10.0.0.0/16"],
        "ingress": [{"cidr": "192.0.2.0/24", "ports": [22, 23, "24-30", 443]},
                    {"cidr": "192.0.2.0/28", "ports": [443]}],
        "tiers": ["app"],
    })
    ingress_allows = {e[2:] for e in nb.desired_nacl_entries(boundary, SANDBOX) if not e[0] and e[3] == "allow"}
    assert ingress_allows == {("-1", "allow", SANDBOX, None, None),
                              ("6", "allow", "192.0.2.0/24", 22, 30), ("6", "allow", "192.0.2.0/24", 443, 443)}
    egress_allows = {e[2:] for e in nb.desired_nacl_entries(boundary, SANDBOX) if e[0] and e[3] == "allow"}
    assert egress_allows == {("-1", "allow", SANDBOX, None, None), ("6", "allow", "192.0.2.0/24", 1024, 65535)}
    sg = nb.desired_sg_rules(boundary, "app", {"app": "sg-1"}, None)
    assert set(sg) == {("ingress", "tcp", 22, 30, "cidr", "192.0.2.0/24"),
                       ("ingress", "tcp", 443, 443, "cidr", "192.0.2.0/24")}


def test_security_group_rules_over_60_fail_naming_the_quota_and_a_raised_quota_fits():
    ports = [1000 + 2 * i for i in range(61)]  # no two adjacent: nothing merges
    raw = {"production_cidrs": ["10.0.0.0/16"], "tiers": ["app", "db"],
           "tier_rules": [{"from": "app", "to": "db", "ports": ports}]}
    with pytest.raises(_quotas.QuotaError, match=r"^security group tier app \(egress\) needs 61 rules per security "
                                                 r"group per direction; AWS allows 60 by default \(quota 'Inbound or "
                                                 r"outbound rules per security group' \(L-0EA8095F\), up to 1000\): "
                                                 r"raise the quota and set drill_boundary\.quotas\."
                                                 r"sg_rules_per_direction: 61"):
        nb.check_network_quotas(parse_boundary(raw))
    nb.check_network_quotas(parse_boundary(dict(raw, quotas={"sg_rules_per_direction": 61})))
    # adjacent ports merge into one range, which fits the default
    nb.check_network_quotas(parse_boundary(dict(raw, tier_rules=[{"from": "app", "to": "db",
                                                                  "ports": list(range(1000, 1100))}])))


def test_endpoint_policy_over_20480_characters_fails_before_anything_is_created():
    grants = [{"bucket": "backups-bucket", "prefix": "orders/%03d-%s/" % (i, "x" * 80)} for i in range(120)]
    boundary = parse_boundary({"production_cidrs": ["10.0.0.0/16"], "s3_read": grants})
    with pytest.raises(_quotas.QuotaError, match=r"^the S3 endpoint policy needs \d{5} characters of VPC endpoint "
                                                 r"policy \(whitespace counted\); AWS allows at most 20480 \(quota "
                                                 r"'VPC endpoint policy size', not adjustable\): grant fewer"):
        nb.check_network_quotas(boundary, S3_CIDRS)
    nb.check_network_quotas(parse_boundary({"production_cidrs": ["10.0.0.0/16"], "s3_read": grants[:20]}),
                            S3_CIDRS)


def test_name_and_tag_limits():
    longest = "a" * 40  # the longest drill id drill.validate_drill_id accepts
    nb.check_network_quotas(parse_boundary({"production_cidrs": ["10.0.0.0/16"]}), (), longest,
                            {"drguard:managed": "true"})
    with pytest.raises(_quotas.QuotaError, match=r"^the flow-log role name 'drguard-a{50}-flowlogs' needs 67 "
                                                 r"characters of IAM role name; AWS allows at most 64"):
        _quotas.check_name(_quotas.ROLE_NAME, "drguard-%s-flowlogs" % ("a" * 50), "the flow-log role name")
    with pytest.raises(_quotas.QuotaError, match=r"^every drill resource needs 51 tags per resource; AWS allows at "
                                                 r"most 50 \(quota 'Tags per resource', not adjustable\)"):
        _quotas.check_tags({"k%d" % i: "v" for i in range(51)}, "every drill resource")
    with pytest.raises(_quotas.QuotaError, match=r"needs 257 characters of tag value"):
        _quotas.check_tags({"drguard:drill-id": "v" * 257}, "every drill resource")
    with pytest.raises(_quotas.QuotaError, match=r"needs 129 characters of tag key"):
        _quotas.check_tags({"k" * 129: "v"}, "every drill resource")
    with pytest.raises(_quotas.QuotaError, match=r"needs 513 characters of log group name"):
        _quotas.check_name(_quotas.LOG_GROUP_NAME, "/" + "g" * 512, "the flow-log log group name")


def test_role_policy_size_counts_without_whitespace_and_names_the_quota():
    assert _quotas.iam_policy_chars('{ "Version" : "2012-10-17" }') == len('{"Version":"2012-10-17"}')
    resources = {"backup": [{"bucket": "backups-bucket", "prefix": "p%04d-%s/" % (i, "y" * 100)} for i in range(120)]}
    with pytest.raises(ident.PolicyError, match=r"^the generated role policy needs \d{5} characters of inline role "
                                                r"policy \(whitespace not counted\); AWS allows at most 10240 \(quota "
                                                r"'Role policy size', not adjustable\): use fewer"):
        ident.build_role_policy(resources, "aws", "us-east-1", "123456789012")


def test_session_policy_over_2048_characters_names_the_quota():
    doc = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bucket/%s*" % ("z" * 2100)}]}
    with pytest.raises(ident.PolicyError, match=r"^the session policy needs \d{4} characters of plain-text session "
                                                r"policy; AWS allows at most 2048 \(quota 'Session policy size', "
                                                r"not adjustable\)"):
        ident.check_session_policy_size(doc)
