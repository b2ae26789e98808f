"""sandbox_network against the emulator: build, read back with boto3, idempotence, check mode, bad input."""

from __future__ import annotations

import ipaddress
import json
import uuid

import pytest
from faults import throttle
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _aws

from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import pick_sandbox_cidr

EXPIRES = "2026-11-29T09:00:00Z"
CONTRACT = ("drguard:managed", "drguard:drill-id", "drguard:expires-at")
PRODUCTION = ["10.0.0.0/16", "10.1.0.0/16", "172.20.0.0/16"]
CONTROL = "192.0.2.0/28"
TELEMETRY = "198.51.100.0/28"


def _drill_id(tag: str) -> str:
    return "t-%s-%s" % (tag, uuid.uuid4().hex[:10])


def _boundary(**overrides) -> dict:
    raw = {
        "production_cidrs": list(PRODUCTION),
        "ingress": [{"cidr": CONTROL, "protocol": "tcp", "ports": [22, "8000-8100"], "description": "control plane"}],
        "egress": [{"cidr": TELEMETRY, "protocol": "tcp", "ports": [443], "description": "telemetry"},
                   {"cidr": CONTROL, "protocol": "udp", "ports": [514]}],
        "tiers": ["app", "db"],
        "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
        "s3_read": [{"bucket": "backups-bucket", "prefix": "orders/"}],
        "s3_write": [{"bucket": "telemetry-bucket", "prefix": "drills/"}],
    }
    raw.update(overrides)
    return raw


def _args(drill_id: str, boundary: dict | None = None, **extra) -> dict:
    args = {"drill_id": drill_id, "boundary": boundary if boundary is not None else _boundary(),
            "expires_at": EXPIRES}
    args.update(extra)
    return args


def _build(drill_id, boundary=None, **extra):
    res = run_module("sandbox_network", _args(drill_id, boundary, **extra))
    assert not res.failed, res.get("msg")
    return res


def _s3_prefix_list(ec2) -> str:
    return ec2.describe_prefix_lists(Filters=[{"Name": "prefix-list-name",
                                               "Values": ["com.amazonaws.us-east-1.s3"]}])["PrefixLists"][0][
        "PrefixListId"]


def _drill_resources(aws, drill_id: str) -> list:
    """Everything tagged with ``drill_id`` that the builder could create, read through each service."""
    ec2, logs, iam = aws("ec2"), aws("logs"), aws("iam")
    flt = [{"Name": "tag:drguard:drill-id", "Values": [drill_id]}]
    found = []
    for op, key, id_field, param in (
            ("describe_vpcs", "Vpcs", "VpcId", "Filters"),
            ("describe_subnets", "Subnets", "SubnetId", "Filters"),
            ("describe_route_tables", "RouteTables", "RouteTableId", "Filters"),
            ("describe_security_groups", "SecurityGroups", "GroupId", "Filters"),
            ("describe_network_acls", "NetworkAcls", "NetworkAclId", "Filters"),
            ("describe_vpc_endpoints", "VpcEndpoints", "VpcEndpointId", "Filters"),
            ("describe_flow_logs", "FlowLogs", "FlowLogId", "Filter")):
        found += [i[id_field] for i in getattr(ec2, op)(**{param: flt})[key]]
    for group in logs.describe_log_groups(logGroupNamePrefix="/drguard/%s/" % drill_id)["logGroups"]:
        found.append(group["logGroupName"])
    for role in iam.list_roles()["Roles"]:
        if drill_id in role["RoleName"]:
            found.append(role["RoleName"])
    return found


def _managed_count(aws) -> int:
    """How many drguard-managed resources the region holds (EC2 network kinds, log groups, roles)."""
    ec2 = aws("ec2")
    flt = [{"Name": "tag:drguard:managed", "Values": ["true"]}]
    n = sum(len(getattr(ec2, op)(Filters=flt)[key]) for op, key in (
        ("describe_vpcs", "Vpcs"), ("describe_subnets", "Subnets"), ("describe_route_tables", "RouteTables"),
        ("describe_security_groups", "SecurityGroups"), ("describe_network_acls", "NetworkAcls"),
        ("describe_vpc_endpoints", "VpcEndpoints")))
    n += len(ec2.describe_flow_logs(Filter=flt)["FlowLogs"])
    n += len([g for g in aws("logs").describe_log_groups(logGroupNamePrefix="/drguard/")["logGroups"]])
    n += len([r for r in aws("iam").list_roles()["Roles"] if r["RoleName"].startswith("drguard-")])
    return n


def _tags_of(aws, kind: str, rid: str) -> dict:
    if kind == "log_group":
        return aws("logs").list_tags_log_group(logGroupName=rid)["tags"]
    if kind == "iam_role":
        return {t["Key"]: t["Value"] for t in aws("iam").list_role_tags(RoleName=rid)["Tags"]}
    ec2 = aws("ec2")
    described = {
        "vpc": lambda: ec2.describe_vpcs(VpcIds=[rid])["Vpcs"][0],
        "subnet": lambda: ec2.describe_subnets(SubnetIds=[rid])["Subnets"][0],
        "route_table": lambda: ec2.describe_route_tables(RouteTableIds=[rid])["RouteTables"][0],
        "security_group": lambda: ec2.describe_security_groups(GroupIds=[rid])["SecurityGroups"][0],
        "network_acl": lambda: ec2.describe_network_acls(NetworkAclIds=[rid])["NetworkAcls"][0],
        "vpc_endpoint": lambda: ec2.describe_vpc_endpoints(VpcEndpointIds=[rid])["VpcEndpoints"][0],
        "flow_log": lambda: ec2.describe_flow_logs(FlowLogIds=[rid])["FlowLogs"][0],
    }[kind]()
    return {t["Key"]: t["Value"] for t in described.get("Tags") or []}


def _sg_rules(group: dict) -> set:
    out = set()
    for direction, field in (("in", "IpPermissions"), ("out", "IpPermissionsEgress")):
        for perm in group.get(field) or []:
            base = (direction, perm["IpProtocol"], perm.get("FromPort"), perm.get("ToPort"))
            out |= {base + (r["CidrIp"],) for r in perm.get("IpRanges") or []}
            out |= {base + (r["CidrIpv6"],) for r in perm.get("Ipv6Ranges") or []}
            out |= {base + (p["GroupId"],) for p in perm.get("UserIdGroupPairs") or []}
            out |= {base + (p["PrefixListId"],) for p in perm.get("PrefixListIds") or []}
    return out


# --------------------------------------------------------------------------- the full build


@pytest.fixture
def built(aws_env):
    drill_id = _drill_id("full")
    return drill_id, _build(drill_id)


def test_vpc_and_subnets_are_private_and_outside_production(built, aws):
    drill_id, res = built
    ec2 = aws("ec2")
    vpc = ec2.describe_vpcs(VpcIds=[res["vpc_id"]])["Vpcs"][0]
    cidr = ipaddress.ip_network(vpc["CidrBlock"])
    assert str(cidr) == res["sandbox_cidr"]
    assert not any(cidr.overlaps(ipaddress.ip_network(p)) for p in PRODUCTION)
    assert ec2.describe_vpc_attribute(VpcId=res["vpc_id"], Attribute="enableDnsSupport")["EnableDnsSupport"]["Value"]

    subnets = ec2.describe_subnets(SubnetIds=res["subnet_ids"])["Subnets"]
    assert len(subnets) == 2
    assert len({s["AvailabilityZone"] for s in subnets}) == 2
    assert sorted(s["CidrBlock"] for s in subnets) == sorted(str(n) for n in cidr.subnets(prefixlen_diff=1))
    for sub in subnets:
        assert sub["VpcId"] == res["vpc_id"]
        assert sub["MapPublicIpOnLaunch"] is False
        assert sub["AssignIpv6AddressOnCreation"] is False
        assert not sub.get("Ipv6CidrBlockAssociationSet")

    vpc_filter = [{"Name": "vpc-id", "Values": [res["vpc_id"]]}]
    assert ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [res["vpc_id"]]}])[
        "InternetGateways"] == []
    assert [n for n in ec2.describe_nat_gateways(Filter=vpc_filter)["NatGateways"] if n["State"] != "deleted"] == []
    assert ec2.describe_vpn_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [res["vpc_id"]]}])[
        "VpnGateways"] == []
    assert ec2.describe_transit_gateway_vpc_attachments(Filters=vpc_filter)["TransitGatewayVpcAttachments"] == []
    # moto ignores peering filters (docs/emulator.md): filter here, as boundary_verify does.
    peerings = ec2.describe_vpc_peering_connections()["VpcPeeringConnections"]
    assert [p for p in peerings if res["vpc_id"] in (p["RequesterVpcInfo"].get("VpcId"),
                                                     p["AccepterVpcInfo"].get("VpcId"))] == []


def test_routes_are_local_and_s3_endpoint_only(built, aws):
    _drill_id_, res = built
    ec2 = aws("ec2")
    rt = ec2.describe_route_tables(RouteTableIds=[res["route_table_id"]])["RouteTables"][0]
    assert sorted(a["SubnetId"] for a in rt["Associations"] if a.get("SubnetId")) == sorted(res["subnet_ids"])
    routes = [r for r in rt["Routes"] if r.get("GatewayId") != "local"]
    local = [r for r in rt["Routes"] if r.get("GatewayId") == "local"]
    assert [r["DestinationCidrBlock"] for r in local] == [res["sandbox_cidr"]]
    assert routes == [{"DestinationPrefixListId": _s3_prefix_list(ec2), "GatewayId": res["s3_endpoint_id"],
                       "Origin": routes[0]["Origin"], "State": "active"}]


def test_security_groups_allow_exactly_what_is_declared(built, aws):
    _drill_id_, res = built
    ec2 = aws("ec2")
    groups = {g["GroupId"]: g for g in ec2.describe_security_groups(
        GroupIds=list(res["security_groups"].values()))["SecurityGroups"]}
    app, db = res["security_groups"]["app"], res["security_groups"]["db"]
    pl = _s3_prefix_list(ec2)
    common = {
        ("in", "tcp", 22, 22, CONTROL), ("in", "tcp", 8000, 8100, CONTROL),
        ("out", "tcp", 443, 443, TELEMETRY), ("out", "udp", 514, 514, CONTROL), ("out", "tcp", 443, 443, pl),
    }
    assert _sg_rules(groups[app]) == common | {("out", "tcp", 5432, 5432, db)}
    assert _sg_rules(groups[db]) == common | {("in", "tcp", 5432, 5432, app)}
    for gid, group in groups.items():
        assert group["VpcId"] == res["vpc_id"]
        assert group["GroupName"] == "drguard-%s-%s" % (built[0], "app" if gid == app else "db")

    default = ec2.describe_security_groups(GroupIds=[res["default_security_group_id"]])["SecurityGroups"][0]
    assert default["GroupName"] == "default" and default["VpcId"] == res["vpc_id"]
    assert default["IpPermissions"] == [] and default["IpPermissionsEgress"] == []


def test_network_acl_denies_production_first_then_narrow_allows(built, aws):
    _drill_id_, res = built
    ec2 = aws("ec2")
    acl = ec2.describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]
    assert sorted(a["SubnetId"] for a in acl["Associations"]) == sorted(res["subnet_ids"])
    for egress in (False, True):
        entries = [e for e in acl["Entries"] if e["Egress"] is egress and e["RuleNumber"] != 32767]
        denies = [e for e in entries if e["RuleAction"] == "deny"]
        allows = [e for e in entries if e["RuleAction"] == "allow"]
        assert sorted(e["CidrBlock"] for e in denies) == sorted(PRODUCTION)
        assert all(str(e["Protocol"]) == "-1" for e in denies)
        assert max(e["RuleNumber"] for e in denies) < min(e["RuleNumber"] for e in allows)
        assert not any(e["CidrBlock"] in ("0.0.0.0/0",) for e in allows)
        allowed = {(str(e["Protocol"]), e["CidrBlock"], (e.get("PortRange") or {}).get("From"),
                    (e.get("PortRange") or {}).get("To")) for e in allows}
        assert ("-1", res["sandbox_cidr"], None, None) in allowed
        if egress:
            assert ("6", TELEMETRY, 443, 443) in allowed
            assert ("17", CONTROL, 514, 514) in allowed
            assert ("6", CONTROL, 1024, 65535) in allowed  # return traffic of ingress on 22/8000-8100
            assert not any(c == CONTROL and p == "6" and f == 22 for p, c, f, _t in allowed)
        else:
            assert ("6", CONTROL, 22, 22) in allowed and ("6", CONTROL, 8000, 8100) in allowed
            assert ("6", TELEMETRY, 1024, 65535) in allowed  # return traffic of egress to 443
            assert ("17", CONTROL, 1024, 65535) in allowed
            assert not any(c == TELEMETRY and f == 443 for _p, c, f, _t in allowed)
        for _proto, cidr, _f, _t in allowed:
            net = ipaddress.ip_network(cidr)
            assert not any(net.overlaps(ipaddress.ip_network(p)) for p in PRODUCTION)


def test_s3_endpoint_policy_grants_only_declared_prefixes(built, aws):
    _drill_id_, res = built
    ep = aws("ec2").describe_vpc_endpoints(VpcEndpointIds=[res["s3_endpoint_id"]])["VpcEndpoints"][0]
    assert ep["ServiceName"] == "com.amazonaws.us-east-1.s3" and ep["VpcEndpointType"] == "Gateway"
    assert ep["RouteTableIds"] == [res["route_table_id"]]
    policy = json.loads(ep["PolicyDocument"])
    actions, resources = set(), set()
    for stmt in policy["Statement"]:
        assert stmt["Effect"] == "Allow"
        acts = stmt["Action"] if isinstance(stmt["Action"], list) else [stmt["Action"]]
        ress = stmt["Resource"] if isinstance(stmt["Resource"], list) else [stmt["Resource"]]
        assert not {"*", "s3:*"} & set(acts) and "*" not in ress
        actions |= set(acts)
        resources |= set(ress)
        if "s3:PutObject" in acts:
            assert ress == ["arn:aws:s3:::telemetry-bucket/drills/*"]
        if "s3:GetObject" in acts:
            assert ress == ["arn:aws:s3:::backups-bucket/orders/*"]
        if "s3:ListBucket" in acts:
            assert ress in (["arn:aws:s3:::backups-bucket"], "arn:aws:s3:::backups-bucket")
            assert stmt["Condition"] == {"StringLike": {"s3:prefix": ["orders/*"]}}
    assert {"s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:PutObject", "s3:GetBucketLocation"} <= actions
    assert not {a for a in actions if a.startswith("s3:Delete") or a.startswith("s3:PutBucket")}
    assert resources == {"arn:aws:s3:::backups-bucket/orders/*", "arn:aws:s3:::telemetry-bucket/drills/*",
                         "arn:aws:s3:::backups-bucket", "arn:aws:s3:::telemetry-bucket"}


def test_flow_logs_go_to_the_drills_own_log_group(built, aws):
    drill_id, res = built
    ec2, iam, logs = aws("ec2"), aws("iam"), aws("logs")
    flows = ec2.describe_flow_logs(Filter=[{"Name": "resource-id", "Values": [res["vpc_id"]]}])["FlowLogs"]
    assert [f["FlowLogId"] for f in flows] == [res["flow_log_id"]]
    flow = flows[0]
    assert flow["FlowLogStatus"] == "ACTIVE" and flow["TrafficType"] == "ALL"
    assert flow["LogDestinationType"] == "cloud-watch-logs"
    assert flow["LogGroupName"] == res["log_group_name"] == "/drguard/%s/flow-logs" % drill_id

    role = iam.get_role(RoleName=res["flow_logs_role_name"])["Role"]
    assert res["flow_logs_role_name"] == "drguard-%s-flowlogs" % drill_id
    assert flow["DeliverLogsPermissionArn"] == role["Arn"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "vpc-flow-logs.amazonaws.com"}]
    assert iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"] == []
    names = iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
    assert len(names) == 1
    doc = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=names[0])["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    group = logs.describe_log_groups(logGroupNamePrefix=res["log_group_name"])["logGroups"][0]
    group_arn = group["arn"][:-2] if group["arn"].endswith(":*") else group["arn"]
    for stmt in doc["Statement"]:
        ress = stmt["Resource"] if isinstance(stmt["Resource"], list) else [stmt["Resource"]]
        assert set(ress) <= {group_arn, group_arn + ":*"}
        assert "*" not in stmt["Action"] and "logs:*" not in stmt["Action"]


def test_every_resource_carries_the_contract_tags(built, aws):
    drill_id, res = built
    kinds = {r["type"] for r in res["resources"]}
    assert kinds == {"vpc", "subnet", "route_table", "security_group", "network_acl", "vpc_endpoint", "flow_log",
                     "log_group", "iam_role"}
    assert len(res["resources"]) == 12  # vpc, 2 subnets, rt, 2 tier SGs + default SG, acl, endpoint, flow log...
    for item in res["resources"]:
        tags = _tags_of(aws, item["type"], item["id"])
        assert {k: tags.get(k) for k in CONTRACT} == {
            "drguard:managed": "true", "drguard:drill-id": drill_id, "drguard:expires-at": EXPIRES}, item
    # And nothing tagged with the drill exists that the result does not list.
    listed = {r["id"] for r in res["resources"]}
    assert set(_drill_resources(aws, drill_id)) == listed


def test_second_run_changes_nothing_and_returns_the_same_ids(built):
    drill_id, first = built
    second = _build(drill_id)
    assert second["changed"] is False and second["actions"] == [] and second["created"] == []
    for key in ("vpc_id", "sandbox_cidr", "subnet_ids", "route_table_id", "security_groups",
                "default_security_group_id", "network_acl_id", "s3_endpoint_id", "flow_log_id", "log_group_name",
                "flow_logs_role_name", "resources"):
        assert second[key] == first[key], key
    check = run_module("sandbox_network", _args(drill_id), check_mode=True)
    assert check["changed"] is False and check["actions"] == []


def test_drift_is_converged_back_to_the_boundary(built, aws):
    drill_id, res = built
    ec2 = aws("ec2")
    app = res["security_groups"]["app"]
    ec2.authorize_security_group_egress(GroupId=app, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    ec2.authorize_security_group_ingress(GroupId=res["default_security_group_id"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    ec2.create_network_acl_entry(NetworkAclId=res["network_acl_id"], Egress=True, RuleNumber=500, Protocol="-1",
                                 RuleAction="allow", CidrBlock="0.0.0.0/0")
    ec2.replace_network_acl_entry(NetworkAclId=res["network_acl_id"], Egress=False, RuleNumber=1, Protocol="-1",
                                  RuleAction="allow", CidrBlock=PRODUCTION[0])
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=res["vpc_id"])
    ec2.create_route(RouteTableId=res["route_table_id"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)

    check = run_module("sandbox_network", _args(drill_id), check_mode=True)
    assert check["changed"] is True and check["actions"]
    assert ec2.describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]["Entries"] != []
    fixed = _build(drill_id)
    assert fixed["changed"] is True
    text = "\n".join(fixed["actions"])
    assert "revoke 1 egress rule(s) from drguard-%s-app" % drill_id in text
    assert "default security group" in text and "delete undeclared route" in text
    assert "replace 1 network ACL entries" in text and "delete 1 undeclared network ACL entries" in text

    group = ec2.describe_security_groups(GroupIds=[app])["SecurityGroups"][0]
    assert not any(p["IpProtocol"] == "-1" for p in group["IpPermissionsEgress"])
    default = ec2.describe_security_groups(GroupIds=[res["default_security_group_id"]])["SecurityGroups"][0]
    assert default["IpPermissions"] == []
    acl = ec2.describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]
    assert not [e for e in acl["Entries"] if e["RuleNumber"] == 500]
    assert [e["RuleAction"] for e in acl["Entries"] if e["RuleNumber"] == 1 and not e["Egress"]] == ["deny"]
    rt = ec2.describe_route_tables(RouteTableIds=[res["route_table_id"]])["RouteTables"][0]
    assert not [r for r in rt["Routes"] if r.get("GatewayId") == igw]
    assert _build(drill_id)["changed"] is False


# --------------------------------------------------------------------------- variants


def test_check_mode_creates_nothing_and_reports_the_plan(aws_env, aws):
    drill_id = _drill_id("check")
    before = _managed_count(aws)
    res = run_module("sandbox_network", _args(drill_id), check_mode=True)
    assert not res.failed, res.get("msg")
    assert res["changed"] is True and res["vpc_id"] is None and res["created"] == []
    text = "\n".join(res["actions"])
    for what in ("create vpc drguard-%s-vpc" % drill_id, "create subnet", "create route table",
                 "create security group drguard-%s-app" % drill_id, "create network ACL",
                 "create S3 gateway endpoint", "create log group /drguard/%s/flow-logs" % drill_id,
                 "create IAM role drguard-%s-flowlogs" % drill_id, "create flow log"):
        assert what in text, what
    assert _drill_resources(aws, drill_id) == []
    assert _managed_count(aws) == before


def test_picked_cidr_avoids_production_and_existing_vpcs(aws_env, aws):
    ec2 = aws("ec2")
    drill_id = _drill_id("pick")
    raw = _boundary(production_cidrs=["10.64.0.0/10", "172.16.0.0/12"])
    existing = [v["CidrBlock"] for v in ec2.describe_vpcs()["Vpcs"]]
    first_choice = pick_sandbox_cidr(parse_boundary(raw), drill_id, avoid=existing)
    # Someone else's VPC takes the CIDR this drill would pick first.
    foreign = ec2.create_vpc(CidrBlock=str(first_choice))["Vpc"]["VpcId"]
    res = _build(drill_id, raw)
    picked = ipaddress.ip_network(res["sandbox_cidr"])
    assert picked != first_choice and picked.prefixlen == 16
    for other in ec2.describe_vpcs()["Vpcs"]:
        if other["VpcId"] != res["vpc_id"]:
            assert not picked.overlaps(ipaddress.ip_network(other["CidrBlock"])), other
    for prod in raw["production_cidrs"]:
        assert not picked.overlaps(ipaddress.ip_network(prod))
    assert ec2.describe_vpcs(VpcIds=[foreign])["Vpcs"][0]["CidrBlock"] == str(first_choice)
    # Re-running keeps the CIDR although the picker would now avoid the drill's own VPC.
    assert _build(drill_id, raw)["sandbox_cidr"] == res["sandbox_cidr"]


def test_minimal_boundary_with_control_plane_route_and_no_flow_logs(aws_env, aws):
    ec2 = aws("ec2")
    tgw = ec2.create_transit_gateway(Description="control plane")["TransitGateway"]["TransitGatewayId"]
    drill_id = _drill_id("min")
    raw = {"sandbox_cidr": "172.30.0.0/16", "production_cidrs": ["10.0.0.0/8"],
           "control_plane_route": {"cidr": "192.168.10.0/24", "target": tgw}, "tiers": ["only"]}
    res = _build(drill_id, raw, flow_logs=False)
    assert res["sandbox_cidr"] == "172.30.0.0/16"
    assert res["s3_endpoint_id"] is None and res["flow_log_id"] is None and res["log_group_name"] is None
    assert list(res["security_groups"]) == ["only"]
    rt = ec2.describe_route_tables(RouteTableIds=[res["route_table_id"]])["RouteTables"][0]
    non_local = [r for r in rt["Routes"] if r.get("GatewayId") != "local"]
    assert [(r["DestinationCidrBlock"], r.get("TransitGatewayId")) for r in non_local] == [("192.168.10.0/24", tgw)]
    group = ec2.describe_security_groups(GroupIds=[res["security_groups"]["only"]])["SecurityGroups"][0]
    assert group["IpPermissions"] == [] and group["IpPermissionsEgress"] == []
    assert ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [res["vpc_id"]]}])["VpcEndpoints"] == []
    assert ec2.describe_flow_logs(Filter=[{"Name": "resource-id", "Values": [res["vpc_id"]]}])["FlowLogs"] == []
    assert aws("logs").describe_log_groups(logGroupNamePrefix="/drguard/%s/" % drill_id)["logGroups"] == []
    acl = ec2.describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]
    entries = sorted((e["Egress"], e["RuleNumber"], e["RuleAction"], e["CidrBlock"]) for e in acl["Entries"]
                     if e["RuleNumber"] != 32767)
    assert entries == [(False, 1, "deny", "10.0.0.0/8"), (False, 100, "allow", "172.30.0.0/16"),
                       (True, 1, "deny", "10.0.0.0/8"), (True, 100, "allow", "172.30.0.0/16")]
    # A declared sandbox CIDR that contradicts the existing VPC fails instead of rebuilding.
    moved = run_module("sandbox_network", _args(drill_id, dict(raw, sandbox_cidr="172.29.0.0/16"), flow_logs=False))
    assert moved.failed and "already exists with CIDR 172.30.0.0/16" in moved["msg"]


@pytest.mark.parametrize(("args", "expected"), [
    ({"boundary": _boundary(sandbox_cidr="10.1.0.0/16")}, "overlaps production CIDR(s) 10.1.0.0/16"),
    ({"boundary": _boundary(sandbox_cidr="10.300.0.0/16")}, "is not a valid CIDR"),
    ({"boundary": _boundary(production_cidrs=["10.0.0.0"])}, "has no prefix length"),
    ({"boundary": _boundary(egress_all=True)}, "unknown key(s) egress_all"),
    ({"boundary": _boundary(egress=[{"cidr": "10.0.5.0/24", "ports": [443]}])}, "traffic to or from production"),
    ({"drill_id": "Bad_ID"}, "drill_id 'Bad_ID' is not valid"),
    ({"expires_at": "2026-11-29 09:00"}, "expires_at is not valid"),
    ({"boundary": _boundary(production_cidrs=["10.%d.0.0/16" % (2 * i) for i in range(41)])},
     "needs 46 network ACL entries per direction; AWS allows 20 by default and at most 40"),
])
def test_bad_input_fails_clearly_and_creates_nothing(aws_env, aws, args, expected):
    drill_id = _drill_id("bad")
    before = _managed_count(aws)
    res = run_module("sandbox_network", dict(_args(drill_id), **args))
    assert res.failed
    assert expected in res["msg"]
    assert res["msg"].count(".") >= 1 and "Traceback" not in res["msg"]
    assert _drill_resources(aws, drill_id) == []
    assert _managed_count(aws) == before


def test_input_checks_raise_without_a_module():
    from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import BuildError
    from ansible_collections.drguard.sandbox.plugins.modules import sandbox_network

    drill_id, expires, boundary = sandbox_network._validate(_args("t-ok-1234"), "us-east-1")
    assert (drill_id, expires, boundary.tiers) == ("t-ok-1234", EXPIRES, ("app", "db"))
    with pytest.raises(BuildError, match=r"^expires_at is not valid: .* \(for example 2026-11-29T08:40:00Z\)\.$"):
        sandbox_network._validate(_args("t-ok-1234", expires_at="soon"), "us-east-1")
    with pytest.raises(BuildError, match=r"^no AWS region is set; give region"):
        sandbox_network._validate(_args("t-ok-1234"), None)


def test_failure_after_creating_names_everything_for_teardown(aws_env, aws):
    drill_id = _drill_id("fail")
    # A role with the drill's delivery-role name that belongs to nobody: the builder must not adopt it.
    aws("iam").create_role(RoleName="drguard-%s-flowlogs" % drill_id, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))
    res = run_module("sandbox_network", _args(drill_id))
    assert res.failed
    assert "does not belong to drill %s" % drill_id in res["msg"]
    assert "drguard.sandbox.sweep" in res["msg"]
    assert res["created"], res
    for item in res["created"]:
        tags = _tags_of(aws, item["type"], item["id"])
        assert tags.get("drguard:drill-id") == drill_id, item


def test_new_expiry_is_retagged_everywhere(built, aws):
    drill_id, res = built
    later = "2026-11-29T11:30:00Z"
    again = _build(drill_id, expires_at=later)
    assert again["changed"] is True and again["created"] == []
    assert again["vpc_id"] == res["vpc_id"]
    for item in again["resources"]:
        assert _tags_of(aws, item["type"], item["id"])["drguard:expires-at"] == later, item
    assert _build(drill_id, expires_at=later)["changed"] is False


def test_foreign_log_group_with_the_drills_name_is_not_adopted(aws_env, aws):
    drill_id = _drill_id("lg")
    aws("logs").create_log_group(logGroupName="/drguard/%s/flow-logs" % drill_id)
    res = run_module("sandbox_network", _args(drill_id))
    assert res.failed
    assert "log group /drguard/%s/flow-logs exists but does not belong to drill" % drill_id in res["msg"]
    assert "flow log prerequisites" in res["msg"]


# --------------------------------------------------------------------------- diff mode


OPEN_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Sid": "Drifted", "Effect": "Allow", "Principal": "*", "Action": "s3:*", "Resource": "*"}]}


def test_diff_mode_shows_the_rules_and_policy_it_converges(built, aws):
    drill_id, res = built
    ec2 = aws("ec2")
    app, db, pl = res["security_groups"]["app"], res["security_groups"]["db"], _s3_prefix_list(ec2)
    app_name, acl_name = "drguard-%s-app" % drill_id, "drguard-%s-nacl" % drill_id
    # One drifted security-group rule, one drifted endpoint policy, one undeclared NACL entry.
    ec2.authorize_security_group_egress(GroupId=app, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    ec2.modify_vpc_endpoint(VpcEndpointId=res["s3_endpoint_id"], PolicyDocument=json.dumps(OPEN_POLICY))
    ec2.create_network_acl_entry(NetworkAclId=res["network_acl_id"], Egress=True, RuleNumber=500, Protocol="-1",
                                 RuleAction="allow", CidrBlock="0.0.0.0/0")
    declared_app_egress = sorted(["tcp 443 to %s" % TELEMETRY, "udp 514 to %s" % CONTROL, "tcp 5432 to %s" % db,
                                  "tcp 443 to %s" % pl])

    plain = run_module("sandbox_network", _args(drill_id), check_mode=True)
    assert plain["changed"] is True and "diff" not in plain  # no diff unless asked for

    planned = run_module("sandbox_network", _args(drill_id, _ansible_diff=True), check_mode=True)
    fixed = run_module("sandbox_network", _args(drill_id, _ansible_diff=True))
    assert not fixed.failed, fixed.get("msg")
    assert fixed["changed"] is True
    # Check mode shows the same diff as the run that makes the change.
    assert planned["diff"] == fixed["diff"]
    before, after = fixed["diff"]["before"], fixed["diff"]["after"]
    assert set(before) == set(after) == {"security_groups", "network_acl", "s3_endpoint_policy"}

    # Security groups: only the drifted group, every rule before and after (the db group was not touched).
    assert set(before["security_groups"]) == set(after["security_groups"]) == {app_name}
    declared_ingress = ["tcp 22 from %s" % CONTROL, "tcp 8000-8100 from %s" % CONTROL]
    assert after["security_groups"][app_name] == {"ingress": declared_ingress, "egress": declared_app_egress}
    assert before["security_groups"][app_name] == {
        "ingress": declared_ingress, "egress": sorted(declared_app_egress + ["all traffic to 0.0.0.0/0"])}

    # Endpoint policy: the drifted document before, what the endpoint now holds after.
    assert before["s3_endpoint_policy"] == OPEN_POLICY
    live = ec2.describe_vpc_endpoints(VpcEndpointIds=[res["s3_endpoint_id"]])["VpcEndpoints"][0]
    assert after["s3_endpoint_policy"] == json.loads(live["PolicyDocument"])
    assert "s3:*" not in json.dumps(after["s3_endpoint_policy"])

    # Network ACL: rule order, the undeclared allow only before.
    acl_before, acl_after = before["network_acl"][acl_name], after["network_acl"][acl_name]
    assert set(acl_before) - set(acl_after) == {"egress #500 allow all traffic 0.0.0.0/0"}
    assert set(acl_after) <= set(acl_before)
    assert acl_after[0] == "ingress #1 deny all traffic %s" % PRODUCTION[0]
    assert "egress #100 allow all traffic %s" % res["sandbox_cidr"] in acl_after

    # Converged: the group holds exactly the "after" rules, and a second diff run is empty.
    group = ec2.describe_security_groups(GroupIds=[app])["SecurityGroups"][0]
    assert not any(p["IpProtocol"] == "-1" for p in group["IpPermissionsEgress"])
    again = run_module("sandbox_network", _args(drill_id, _ansible_diff=True))
    assert again["changed"] is False and again["diff"] == {"before": {}, "after": {}}


def test_diff_mode_of_a_new_network_shows_what_it_sets_up(aws_env, aws):
    drill_id = _drill_id("diffnew")
    res = run_module("sandbox_network", _args(drill_id, _ansible_diff=True), check_mode=True)
    assert not res.failed, res.get("msg")
    before, after = res["diff"]["before"], res["diff"]["after"]
    assert before["s3_endpoint_policy"] == {} and after["s3_endpoint_policy"]["Statement"]
    # A new group starts with AWS' allow-all egress, which the run revokes.
    app_name = "drguard-%s-app" % drill_id
    assert before["security_groups"][app_name] == {"ingress": [], "egress": ["all traffic to 0.0.0.0/0"]}
    assert "tcp 5432 to planned:db" in after["security_groups"][app_name]["egress"]
    assert before["network_acl"]["drguard-%s-nacl" % drill_id] == []
    assert _drill_resources(aws, drill_id) == []


# --------------------------------------------------------------------------- retries


def throttle_first(*operations, times=1):
    """EC2's throttling answer for ``operations``, above botocore's own retries (tests/faults.py)."""
    return throttle(*operations, times=times, code="EC2ThrottledException", status=503)


def test_throttled_calls_are_retried(aws_env, aws, monkeypatch):
    monkeypatch.setattr(_aws, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(_aws, "RETRY_MAX_DELAY", 0.05)
    drill_id = _drill_id("retry")
    ops = ("DescribeVpcs", "CreateVpc", "CreateSecurityGroup", "AuthorizeSecurityGroupEgress",
           "CreateNetworkAclEntry", "CreateVpcEndpoint", "CreateLogGroup", "CreateRole", "CreateFlowLogs")
    with throttle_first(*ops) as seen:
        res = run_module("sandbox_network", _args(drill_id))
    assert not res.failed, res.get("msg")
    assert {op for op, n in seen.items() if n >= 2} == set(ops)  # each throttled once, then done again
    assert res["flow_log_id"] and res["s3_endpoint_id"]
    assert _build(drill_id)["changed"] is False


# --------------------------------------------------------------------------- AWS quotas (docs/boundary-policy.md)

TWELVE = ["10.%d.0.0/16" % (2 * i) for i in range(12)]  # no two adjacent: nothing collapses


def test_twelve_production_cidrs_fail_in_validation_and_create_nothing(aws_env, aws):
    """The issue's example: it built on the emulator and would fail half-built on real AWS."""
    drill_id = _drill_id("quota")
    before = _managed_count(aws)
    boundary = _boundary(production_cidrs=TWELVE, ingress=[
        {"cidr": "192.0.2.0/28", "ports": [22, 443]}, {"cidr": "192.0.2.16/28", "ports": [22, 9100]},
        {"cidr": "192.0.2.32/28", "ports": [22, 8443]}])
    res = run_module("sandbox_network", _args(drill_id, boundary))
    assert res.failed
    from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build as nb
    needed = nb.nacl_entries_per_direction(nb.desired_nacl_entries(parse_boundary(boundary), "10.213.0.0/16"))
    assert 20 < needed <= 40
    assert res["msg"].startswith(
        "the boundary needs %d network ACL entries per direction; AWS allows 20 by default (quota 'Rules per network "
        "ACL' (L-2AEEBF1A), up to 40): raise the quota and set drill_boundary.quotas.nacl_rules_per_direction: %d"
        % (needed, needed))
    assert not res.get("created")
    assert _drill_resources(aws, drill_id) == []
    assert _managed_count(aws) == before
    assert not [v for v in aws("ec2").describe_vpcs()["Vpcs"]
                if any(t["Value"] == drill_id for t in v.get("Tags") or [])]


def test_s3_prefix_list_cidrs_counted_before_anything_is_created(aws_env, aws):
    """Without S3 the boundary needs exactly 20 entries; the prefix list's CIDRs push it over, before any create."""
    drill_id = _drill_id("quotas3")
    before = _managed_count(aws)
    boundary = _boundary(production_cidrs=TWELVE, ingress=[
        {"cidr": "192.0.2.0/28", "ports": [22, 443]}, {"cidr": "192.0.2.16/28", "ports": [22, 9100]},
        {"cidr": "192.0.2.32/28", "ports": [22, 8443]}], egress=[{"cidr": "198.51.100.0/28", "ports": [443]}])
    from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build as nb
    entries = nb.desired_nacl_entries(parse_boundary(boundary), "10.213.0.0/16")
    assert nb.nacl_entries_per_direction(entries) == 20
    res = run_module("sandbox_network", _args(drill_id, boundary))
    assert res.failed
    assert res["step"] == "quota check"
    assert "network ACL entries per direction; AWS allows 20 by default (quota 'Rules per network ACL'" in res["msg"]
    assert res["created"] == []
    assert _drill_resources(aws, drill_id) == []
    assert _managed_count(aws) == before
    # the account raised its quota: the same boundary builds
    raised = _build(drill_id, dict(boundary, quotas={"nacl_rules_per_direction": 40}), flow_logs=False)
    acl = aws("ec2").describe_network_acls(NetworkAclIds=[raised["network_acl_id"]])["NetworkAcls"][0]
    ingress = [e for e in acl["Entries"] if not e["Egress"] and e["RuleNumber"] != 32767]
    assert len(ingress) > 20


def test_fitted_boundary_builds_and_boundary_verify_proves_it_isolated(aws_env, aws):
    """Collapsed production denies, merged ports and dropped nested allows still verify as the declared boundary."""
    drill_id = _drill_id("fit")
    adjacent = ["10.%d.0.0/16" % i for i in range(12)]
    boundary = _boundary(production_cidrs=adjacent, ingress=[
        {"cidr": "192.0.2.0/28", "ports": [22, 23, "24-30", 443]}, {"cidr": "192.0.2.0/29", "ports": [443]},
        {"cidr": "192.0.2.16/28", "ports": [22, 9100]}, {"cidr": "192.0.2.32/28", "ports": [22, 8443]}])
    res = _build(drill_id, boundary)
    acl = aws("ec2").describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]
    ingress = sorted((e["RuleNumber"], e["RuleAction"], e["CidrBlock"], (e.get("PortRange") or {}).get("From"),
                      (e.get("PortRange") or {}).get("To"))
                     for e in acl["Entries"] if not e["Egress"] and e["RuleNumber"] != 32767)
    assert [e[2] for e in ingress if e[1] == "deny"] == ["10.0.0.0/13", "10.8.0.0/14"]
    assert [e for e in ingress if e[2] in ("192.0.2.0/28", "192.0.2.0/29") and e[3] != 1024] == [
        (101, "allow", "192.0.2.0/28", 22, 30), (102, "allow", "192.0.2.0/28", 443, 443)]
    assert len(ingress) <= 20
    proof = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary, "fail_on_findings": False})
    assert proof["findings"] == [] and proof["isolated"] is True, proof["findings"]


# --------------------------------------------------------------- fallback paths (drill_boundary.fallback)

DR_SITE = "203.0.113.0/28"


def test_fallback_is_allowed_out_like_egress_and_verifies_as_declared(aws_env, aws):
    drill_id = _drill_id("fallback")
    boundary = _boundary(fallback=[{"cidr": DR_SITE, "protocol": "tcp", "ports": [443, "8443-8444"],
                                    "description": "DR site"}])
    res = _build(drill_id, boundary, flow_logs=False)
    ec2 = aws("ec2")
    for group in ec2.describe_security_groups(GroupIds=list(res["security_groups"].values()))["SecurityGroups"]:
        mine = {r for r in _sg_rules(group) if r[-1] == DR_SITE}
        assert mine == {("out", "tcp", 443, 443, DR_SITE), ("out", "tcp", 8443, 8444, DR_SITE)}
    acl = ec2.describe_network_acls(NetworkAclIds=[res["network_acl_id"]])["NetworkAcls"][0]
    fallback = {(e["Egress"], e["RuleAction"], str(e["Protocol"]), e["PortRange"]["From"], e["PortRange"]["To"])
                for e in acl["Entries"] if e["CidrBlock"] == DR_SITE}
    assert fallback == {(True, "allow", "6", 443, 443), (True, "allow", "6", 8443, 8444),
                        (False, "allow", "6", 1024, 65535)}
    # no route: the fallback is filtered like egress, never routed by the builder
    rt = ec2.describe_route_tables(RouteTableIds=[res["route_table_id"]])["RouteTables"][0]
    assert not [r for r in rt["Routes"] if r.get("DestinationCidrBlock") == DR_SITE]
    assert _build(drill_id, boundary, flow_logs=False)["changed"] is False
    proof = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary,
                                           "require_flow_logs": False, "fail_on_findings": False})
    assert proof["findings"] == [] and proof["isolated"] is True, proof["findings"]

    # the live configuration loses the app tier's fallback rule: the boundary now blocks the failover path
    app = res["security_groups"]["app"]
    ec2.revoke_security_group_egress(GroupId=app, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": DR_SITE}]}])
    proof = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary,
                                           "require_flow_logs": False, "fail_on_findings": False})
    assert [(f["code"], f["resource"]) for f in proof["findings"]] == [("fallback_blocked", app)], proof["findings"]
    assert "egress tcp port 443 to %s (drill_boundary.fallback[0])" % DR_SITE in proof["findings"][0]["detail"]


def test_fallback_rules_count_toward_the_network_acl_quota(aws_env, aws):
    drill_id = _drill_id("fbquota")
    before = _managed_count(aws)
    boundary = _boundary(production_cidrs=TWELVE, ingress=[
        {"cidr": "192.0.2.0/28", "ports": [22, 443]}, {"cidr": "192.0.2.16/28", "ports": [22, 9100]},
        {"cidr": "192.0.2.32/28", "ports": [22, 8443]}], egress=[{"cidr": "198.51.100.0/28", "ports": [443]}],
        s3_read=[], s3_write=[])
    from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build as nb
    assert nb.nacl_entries_per_direction(nb.desired_nacl_entries(parse_boundary(boundary), "10.213.0.0/16")) == 20
    boundary["fallback"] = [{"cidr": DR_SITE, "ports": [443]}]
    res = run_module("sandbox_network", _args(drill_id, boundary))
    assert res.failed
    assert res["msg"].startswith("the boundary needs 21 network ACL entries per direction; AWS allows 20 by default")
    assert _drill_resources(aws, drill_id) == []
    assert _managed_count(aws) == before


SSM_SERVICES = ("ssm", "ssmmessages", "ec2messages", "secretsmanager")


def _interface_endpoints(ec2, vpc_id: str) -> dict:
    return {e["ServiceName"].rsplit(".", 1)[1]: e for e in ec2.describe_vpc_endpoints(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["VpcEndpoints"]
        if e["VpcEndpointType"] == "Interface" and e["State"].lower() not in ("deleted", "deleting")}


def test_ssm_endpoints_only_when_declared_with_private_dns_and_443_from_the_sandbox_only(aws_env, aws):
    ec2 = aws("ec2")
    plain_id, ssm_id = _drill_id("nossm"), _drill_id("ssm")
    plain = _build(plain_id, flow_logs=False)
    assert _interface_endpoints(ec2, plain["vpc_id"]) == {}
    assert "validation" not in plain["security_groups"] and plain["ssm_endpoint_ids"] == {}

    boundary = _boundary(ssm_endpoints=True)
    res = _build(ssm_id, boundary, flow_logs=False)
    eps = _interface_endpoints(ec2, res["vpc_id"])
    assert sorted(eps) == sorted(SSM_SERVICES)
    assert res["ssm_endpoint_ids"] == {s: eps[s]["VpcEndpointId"] for s in SSM_SERVICES}
    group_id = res["ssm_endpoint_security_group_id"]
    for service, ep in eps.items():
        assert ep["ServiceName"] == "com.amazonaws.us-east-1.%s" % service
        assert ep["PrivateDnsEnabled"] is True
        assert sorted(ep["SubnetIds"]) == sorted(res["subnet_ids"])
        assert [g["GroupId"] for g in ep["Groups"]] == [group_id]
        tags = {t["Key"]: t["Value"] for t in ep["Tags"]}
        assert tags["Name"] == "drguard-%s-%s" % (ssm_id, service) and all(k in tags for k in CONTRACT)
    # The certificates' way in reads the drill's runtime secrets only, whoever asks.
    assert json.loads(eps["secretsmanager"]["PolicyDocument"])["Statement"] == [{
        "Sid": "DrillRuntimeSecretsOnly", "Effect": "Allow", "Principal": "*",
        "Action": ["secretsmanager:GetSecretValue"],
        "Resource": ["arn:*:secretsmanager:us-east-1:*:secret:drguard/%s/runtime/*" % ssm_id]}]
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    assert group["GroupName"] == "drguard-%s-ssm-endpoints" % ssm_id
    ingress = [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]],
                p.get("UserIdGroupPairs")) for p in group["IpPermissions"]]
    assert ingress == [("tcp", 443, 443, [res["sandbox_cidr"]], [])]
    assert group["IpPermissionsEgress"] == []
    dns = ec2.describe_vpc_attribute(VpcId=res["vpc_id"], Attribute="enableDnsHostnames")
    assert dns["EnableDnsHostnames"]["Value"] is True
    # every workload group (the tiers and validation) reaches the endpoints on 443 through their group, nothing else new
    assert sorted(res["security_groups"]) == ["app", "db", "validation"]
    for tier, gid in res["security_groups"].items():
        g = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
        to_endpoints = [p for p in g["IpPermissionsEgress"]
                        if [x["GroupId"] for x in p.get("UserIdGroupPairs") or []] == [group_id]]
        assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in to_endpoints] == [("tcp", 443, 443)], tier
    assert _build(ssm_id, boundary, flow_logs=False)["changed"] is False

    # declared no more: the endpoints go again
    again = _build(ssm_id, _boundary(), flow_logs=False)
    assert again["changed"] is True and again["ssm_endpoint_ids"] == {}
    assert _interface_endpoints(ec2, res["vpc_id"]) == {}


def test_ssm_endpoints_must_be_a_boolean(aws_env, aws):
    drill_id = _drill_id("ssmbad")
    res = run_module("sandbox_network", _args(drill_id, _boundary(ssm_endpoints="yes")))
    assert res.failed
    assert "drill_boundary.ssm_endpoints: 'yes' is not true or false" in res["msg"]
    assert _drill_resources(aws, drill_id) == []


def test_built_ssm_endpoints_verify_isolated_when_declared_and_unsupported_when_not(aws_env, aws):
    drill_id = _drill_id("ssmprove")
    boundary = _boundary(ssm_endpoints=True, fallback=[{"cidr": "203.0.113.0/28", "ports": [443]}])
    res = _build(drill_id, boundary, flow_logs=False)
    proof = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary,
                                           "require_flow_logs": False, "fail_on_findings": False})
    assert proof["findings"] == [] and proof["isolated"] is True, proof["findings"]
    assert proof["checked"]["vpc_endpoints"] == 5  # S3 gateway + ssm, ssmmessages, ec2messages, secretsmanager
    # The secretsmanager endpoint's policy widened (or removed: AWS then allows everything) is a way out.
    ep = res["ssm_endpoint_ids"]["secretsmanager"]
    ec2 = aws("ec2")
    for policy, code in (({"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "secretsmanager:*",
                                          "Resource": "*"}]}, "endpoint_policy_undeclared"),
                         ({"Statement": [{"Effect": "Allow", "Principal": "*",
                                          "Action": "secretsmanager:GetSecretValue",
                                          "Resource": "arn:aws:secretsmanager:us-east-1:*:secret:prod/*"}]},
                          "endpoint_policy_undeclared")):
        ec2.modify_vpc_endpoint(VpcEndpointId=ep, PolicyDocument=json.dumps(policy))
        widened = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary,
                                                 "require_flow_logs": False, "fail_on_findings": False})
        assert [(f["code"], f["resource"]) for f in widened["findings"]] == [(code, ep)], widened["findings"]
    # The build puts the policy back.
    assert _build(drill_id, boundary, flow_logs=False)["changed"] is True
    proof = run_module("boundary_verify", {"vpc_id": res["vpc_id"], "boundary": boundary,
                                           "require_flow_logs": False, "fail_on_findings": False})
    assert proof["findings"] == [], proof["findings"]
    undeclared = run_module("boundary_verify", {"vpc_id": res["vpc_id"],
                                                "boundary": dict(boundary, ssm_endpoints=False),
                                                "require_flow_logs": False, "fail_on_findings": False})
    assert sorted((f["code"], f["resource"]) for f in undeclared["findings"]) == sorted(
        ("endpoint_unsupported", e) for e in res["ssm_endpoint_ids"].values())
