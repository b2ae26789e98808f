"""boundary_verify's tier rules against a network sandbox_network built in the emulator.

Each test builds a drill's network, changes one tier rule with plain boto3 (as someone with
ec2 rights could) and asserts the exact finding code and resource; a clean build has none.
"""

from __future__ import annotations

import uuid

import pytest

PRODUCTION = ["10.0.0.0/16", "10.1.0.0/16"]
BOUNDARY = {
    "production_cidrs": list(PRODUCTION),
    "ingress": [{"cidr": "192.0.2.0/28", "ports": [22]}],
    "egress": [{"cidr": "198.51.100.0/28", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "ports": [5432]},
                   {"from": "app", "to": "db", "protocol": "udp", "ports": ["8000-8100"]}],
}
TIER_CODES = {"tier_rule_missing", "tier_rule_extra", "tier_group_missing"}


def _built(module_runner, **overrides) -> dict:
    drill_id = "t-tier-%s" % uuid.uuid4().hex[:8]
    boundary = dict(BOUNDARY, **overrides)
    net = module_runner("sandbox_network", {"drill_id": drill_id, "boundary": boundary,
                                            "expires_at": "2030-01-01T00:00:00Z"})
    assert not net.failed, net.get("msg")
    return dict(net, drill_id=drill_id, boundary=dict(boundary, sandbox_cidr=net["sandbox_cidr"]))


@pytest.fixture
def net(module_runner):
    return _built(module_runner)


@pytest.fixture
def ec2(aws):
    return aws("ec2")


def _verify(module_runner, net, boundary=None) -> dict:
    res = module_runner("boundary_verify", {"vpc_id": net["vpc_id"], "fail_on_findings": False,
                                            "boundary": boundary or net["boundary"]})
    assert not res.failed, res
    return res


def _found(res) -> set:
    return {(f["code"], f["resource"]) for f in res["findings"]}


def _tcp(port_from: int, port_to: int, group: str, proto: str = "tcp", built: bool = False) -> list:
    """One group-reference rule; ``built``: as sandbox_network wrote it (moto revokes a rule with its description)."""
    pair = dict({"GroupId": group}, **({"Description": "drguard tier app to db"} if built else {}))
    return [{"IpProtocol": proto, "FromPort": port_from, "ToPort": port_to, "UserIdGroupPairs": [pair]}]


def test_clean_build_has_no_tier_finding(module_runner, net):
    res = _verify(module_runner, net)
    assert res["findings"] == [] and res["isolated"] is True
    # app->db tcp 5432 and udp 8000-8100, each as db's ingress and app's egress
    assert res["checked"]["tier_rules"] == 4


def test_revoked_ingress_is_missing_on_the_destination(module_runner, net, ec2):
    sg = net["security_groups"]
    ec2.revoke_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(5432, 5432, sg["app"], built=True))
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_missing", sg["db"])}, res["findings"]
    assert "ingress tcp port 5432 from %s (app)" % sg["app"] in res["findings"][0]["detail"]


def test_revoked_egress_is_missing_on_the_source(module_runner, net, ec2):
    sg = net["security_groups"]
    ec2.revoke_security_group_egress(GroupId=sg["app"], IpPermissions=_tcp(8000, 8100, sg["db"], "udp", True))
    ec2.authorize_security_group_egress(GroupId=sg["app"], IpPermissions=_tcp(8000, 8049, sg["db"], "udp"))
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_missing", sg["app"])}, res["findings"]
    assert "egress udp ports 8050-8100 to %s (db)" % sg["db"] in res["findings"][0]["detail"]


def test_split_ranges_are_the_same_port_set(module_runner, net, ec2):
    sg = net["security_groups"]
    ec2.revoke_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(8000, 8100, sg["app"], "udp", True))
    ec2.authorize_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(8000, 8049, sg["app"], "udp")
                                         + _tcp(8050, 8100, sg["app"], "udp"))
    res = _verify(module_runner, net)
    assert res["findings"] == [], res["findings"]


@pytest.mark.parametrize("case", ["wider_port", "other_port", "reverse", "self", "other_protocol", "all_traffic"])
def test_undeclared_tier_rule_is_extra(module_runner, net, ec2, case):
    sg = net["security_groups"]
    group, direction, perms = {
        "wider_port": (sg["db"], "ingress", _tcp(5432, 5433, sg["app"])),
        "other_port": (sg["app"], "egress", _tcp(5433, 5433, sg["db"])),
        "reverse": (sg["app"], "ingress", _tcp(5432, 5432, sg["db"])),
        "self": (sg["db"], "ingress", _tcp(5432, 5432, sg["db"])),
        "other_protocol": (sg["db"], "ingress", _tcp(5432, 5432, sg["app"], "udp")),
        "all_traffic": (sg["db"], "ingress", [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg["app"]}]}]),
    }[case]
    fn = ec2.authorize_security_group_ingress if direction == "ingress" else ec2.authorize_security_group_egress
    fn(GroupId=group, IpPermissions=perms)
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_extra", group)}, res["findings"]


def test_intra_vpc_cidr_on_a_tier_group_is_extra(module_runner, net, ec2):
    sg = net["security_groups"]
    ec2.authorize_security_group_ingress(GroupId=sg["db"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": net["sandbox_cidr"]}]}])
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_extra", sg["db"])}, res["findings"]
    assert net["sandbox_cidr"] in res["findings"][0]["detail"]


def test_reference_to_a_group_of_no_tier_is_undeclared(module_runner, net, ec2):
    sg = net["security_groups"]
    other = ec2.create_security_group(VpcId=net["vpc_id"], GroupName="other-%s" % net["drill_id"],
                                      Description="not a tier")["GroupId"]
    ec2.revoke_security_group_egress(GroupId=other, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    # A group of no tier is judged as before: its reference to a tier group inside the VPC passes.
    ec2.authorize_security_group_egress(GroupId=other, IpPermissions=_tcp(5432, 5432, sg["db"]))
    assert _verify(module_runner, net)["findings"] == []
    ec2.authorize_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(5432, 5432, other))
    res = _verify(module_runner, net)
    assert _found(res) == {("sg_ingress_undeclared", sg["db"])}, res["findings"]
    ec2.revoke_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(5432, 5432, other))
    ec2.revoke_security_group_egress(GroupId=other, IpPermissions=_tcp(5432, 5432, sg["db"]))
    ec2.delete_security_group(GroupId=other)


def test_tier_without_a_group_is_missing(module_runner, net):
    boundary = dict(net["boundary"], tiers=["app", "db", "cache"],
                    tier_rules=net["boundary"]["tier_rules"] + [{"from": "app", "to": "cache", "ports": [6379]}])
    res = _verify(module_runner, net, boundary)
    assert _found(res) == {("tier_group_missing", net["vpc_id"])}, res["findings"]
    assert "drguard-%s-cache" % net["drill_id"] in res["findings"][0]["detail"]


def test_ssm_endpoints_group_and_validation_tier(module_runner, ec2):
    net = _built(module_runner, ssm_endpoints=True)
    sg, ssm = net["security_groups"], net["ssm_endpoint_security_group_id"]
    assert set(sg) == {"app", "db", "validation"} and ssm
    clean = _verify(module_runner, net)
    assert clean["findings"] == [], clean["findings"]
    # validation has no declared tier rule: a reference between it and a tier is extra
    ec2.authorize_security_group_egress(GroupId=sg["validation"], IpPermissions=_tcp(5432, 5432, sg["db"]))
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_extra", sg["validation"])}, res["findings"]
    ec2.revoke_security_group_egress(GroupId=sg["validation"], IpPermissions=_tcp(5432, 5432, sg["db"]))
    # the SSM endpoints are reached on tcp 443 only
    ec2.authorize_security_group_egress(GroupId=sg["app"], IpPermissions=_tcp(22, 22, ssm))
    res = _verify(module_runner, net)
    assert _found(res) == {("sg_egress_undeclared", sg["app"])}, res["findings"]


def test_drill_found_from_its_groups_when_the_vpc_tag_is_gone(module_runner, net, ec2):
    """Untagging the VPC does not turn the check off: the drill's groups (its default one too) carry the drill id."""
    sg = net["security_groups"]
    ec2.delete_tags(Resources=[net["vpc_id"]], Tags=[{"Key": "drguard:drill-id"}])
    ec2.authorize_security_group_ingress(GroupId=sg["db"], IpPermissions=_tcp(5433, 5433, sg["app"]))
    res = _verify(module_runner, net)
    assert _found(res) == {("tier_rule_extra", sg["db"])}, res["findings"]
    # No drill identity anywhere (a VPC that is no drill's): the groups cannot be told apart by tier, so no
    # declared tier is checked; fail closed, each is a finding and the VPC is not isolated.
    groups = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [net["vpc_id"]]}])["SecurityGroups"]
    ec2.delete_tags(Resources=[g["GroupId"] for g in groups], Tags=[{"Key": "drguard:drill-id"}])
    res = _verify(module_runner, net)
    assert "tier_rules" not in res["checked"] and res["isolated"] is False
    assert sorted((f["code"], f["resource"], f["detail"].split(":")[0]) for f in res["findings"]) == [
        ("tier_group_missing", net["vpc_id"], "tier %s" % t) for t in sorted(net["boundary"]["tiers"])], res["findings"]
