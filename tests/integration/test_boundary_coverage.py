"""boundary_verify coverage: one emulator test per class of VPC attribute that can move sandbox
traffic, change name resolution or make something reachable from outside (docs/boundary-policy.md,
"Coverage"). Each test opens one such door on a compliant VPC and asserts the exact codes reported.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import pytest
from faults import throttle
from test_boundary_verify import assert_leak
from test_boundary_verify import build_compliant
from test_boundary_verify import sample_boundary
from test_boundary_verify import verify


@pytest.fixture
def ec2(aws):
    return aws("ec2")


@pytest.fixture
def sandbox(aws, ec2):
    return build_compliant(ec2, aws("logs"))


def _eni(ec2, sandbox, **kw):
    return ec2.create_network_interface(SubnetId=sandbox["subnets"][0], **kw)["NetworkInterface"][
        "NetworkInterfaceId"]


# ------------------------------------------------------------------- IPv6 and the egress-only IGW

def test_ipv6_default_route_via_egress_only_igw(aws_env, sandbox, ec2):
    eigw = ec2.create_egress_only_internet_gateway(VpcId=sandbox["vpc"])["EgressOnlyInternetGateway"][
        "EgressOnlyInternetGatewayId"]
    ec2.create_route(RouteTableId=sandbox["rtb"], DestinationIpv6CidrBlock="::/0", EgressOnlyInternetGatewayId=eigw)
    res = verify(sandbox["vpc"])
    assert_leak(res, "route_egress_only_igw", "egress_only_igw_attached")
    attached = next(f for f in res["findings"] if f["code"] == "egress_only_igw_attached")
    assert attached["resource"] == eigw and sandbox["vpc"] in attached["detail"]


def test_egress_only_igw_without_a_route_is_reported(aws_env, sandbox, ec2):
    ec2.create_egress_only_internet_gateway(VpcId=sandbox["vpc"])
    assert_leak(verify(sandbox["vpc"]), "egress_only_igw_attached")


# ------------------------------------------------------------------- prefix-list routes

def test_prefix_list_route_reaching_production_is_named(aws_env, sandbox, ec2):
    pl = ec2.create_managed_prefix_list(PrefixListName="prod-%s" % sandbox["vpc"], MaxEntries=5,
                                        AddressFamily="IPv4", Entries=[{"Cidr": "10.0.8.0/24"}])[
        "PrefixList"]["PrefixListId"]
    pcx = ec2.create_vpc_peering_connection(VpcId=sandbox["vpc"], PeerVpcId=ec2.create_vpc(
        CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"])["VpcPeeringConnection"]["VpcPeeringConnectionId"]
    ec2.create_route(RouteTableId=sandbox["rtb"], DestinationPrefixListId=pl, VpcPeeringConnectionId=pcx)
    res = verify(sandbox["vpc"])
    assert_leak(res, "route_peering", "route_to_production", "peering_active")
    prod = next(f for f in res["findings"] if f["code"] == "route_to_production")
    assert pl in prod["detail"] and "10.0.8.0/24" in prod["detail"]


def test_s3_endpoint_route_to_another_prefix_list_is_not_the_s3_route(aws_env, sandbox, ec2):
    pl = ec2.create_managed_prefix_list(PrefixListName="other-%s" % sandbox["vpc"], MaxEntries=5,
                                        AddressFamily="IPv4", Entries=[{"Cidr": "203.0.113.0/24"}])[
        "PrefixList"]["PrefixListId"]
    ec2.create_route(RouteTableId=sandbox["main_rtb"], DestinationPrefixListId=pl, GatewayId=sandbox["endpoint"])
    res = verify(sandbox["vpc"])
    assert_leak(res, "route_unknown_target")
    assert pl in res["findings"][0]["detail"]


# ------------------------------------------------------------------- DHCP options (name resolution)

def test_dhcp_options_pointing_dns_outside(aws_env, sandbox, ec2):
    dopt = ec2.create_dhcp_options(DhcpConfigurations=[
        {"Key": "domain-name-servers", "Values": ["AmazonProvidedDNS", "8.8.8.8"]},
        {"Key": "domain-name", "Values": ["sandbox.internal"]}])["DhcpOptions"]["DhcpOptionsId"]
    ec2.associate_dhcp_options(DhcpOptionsId=dopt, VpcId=sandbox["vpc"])
    res = verify(sandbox["vpc"])
    assert_leak(res, "dhcp_options_dns")
    assert res["findings"][0]["resource"] == dopt and "8.8.8.8" in res["findings"][0]["detail"]


def test_dhcp_options_ntp_and_netbios_servers_are_unsupported(aws_env, sandbox, ec2):
    dopt = ec2.create_dhcp_options(DhcpConfigurations=[
        {"Key": "ntp-servers", "Values": ["203.0.113.5"]},
        {"Key": "netbios-name-servers", "Values": ["203.0.113.6"]}])["DhcpOptions"]["DhcpOptionsId"]
    ec2.associate_dhcp_options(DhcpOptionsId=dopt, VpcId=sandbox["vpc"])
    res = verify(sandbox["vpc"])
    assert_leak(res, "dhcp_options_unsupported")
    assert sorted(f["detail"].split(" ")[0] for f in res["findings"]) == ["netbios-name-servers", "ntp-servers"]


def test_amazon_provided_dns_only_passes(aws_env, sandbox, ec2):
    dopt = ec2.create_dhcp_options(DhcpConfigurations=[
        {"Key": "domain-name-servers", "Values": ["AmazonProvidedDNS"]},
        {"Key": "domain-name", "Values": ["eu-west-1.compute.internal"]}])["DhcpOptions"]["DhcpOptionsId"]
    ec2.associate_dhcp_options(DhcpOptionsId=dopt, VpcId=sandbox["vpc"])
    res = verify(sandbox["vpc"])
    assert res["isolated"] is True, res["findings"]
    assert res["checked"]["dhcp_options"] == 1


# ------------------------------------------------------------------- carrier gateways

def test_carrier_gateway_is_reported(aws_env, sandbox, ec2):
    cagw = ec2.create_carrier_gateway(VpcId=sandbox["vpc"])["CarrierGateway"]["CarrierGatewayId"]
    res = verify(sandbox["vpc"])
    assert_leak(res, "carrier_gateway_present")
    assert res["findings"][0]["resource"] == cagw


# ------------------------------------------------------------------- traffic mirroring (copies traffic out)

def test_traffic_mirror_session_is_reported(aws_env, sandbox, ec2):
    source, target_eni = _eni(ec2, sandbox), _eni(ec2, sandbox)
    target = ec2.create_traffic_mirror_target(NetworkInterfaceId=target_eni)["TrafficMirrorTarget"][
        "TrafficMirrorTargetId"]
    tmf = ec2.create_traffic_mirror_filter()["TrafficMirrorFilter"]["TrafficMirrorFilterId"]
    session = ec2.create_traffic_mirror_session(NetworkInterfaceId=source, TrafficMirrorTargetId=target,
                                                TrafficMirrorFilterId=tmf, SessionNumber=1)[
        "TrafficMirrorSession"]["TrafficMirrorSessionId"]
    res = verify(sandbox["vpc"])
    assert_leak(res, "traffic_mirror_session", "traffic_mirror_target")  # the target interface is in the VPC too
    mirrored = next(f for f in res["findings"] if f["code"] == "traffic_mirror_session")
    assert mirrored["resource"] == session and source in mirrored["detail"] and target in mirrored["detail"]
    receiving = next(f for f in res["findings"] if f["code"] == "traffic_mirror_target")
    assert receiving["resource"] == target and target_eni in receiving["detail"]


# ------------------------------------------------------------------- network interfaces: public IPs, forwarding

def test_elastic_ip_on_a_sandbox_interface(aws_env, sandbox, ec2):
    eni = _eni(ec2, sandbox)
    alloc = ec2.allocate_address(Domain="vpc")
    ec2.associate_address(AllocationId=alloc["AllocationId"], NetworkInterfaceId=eni)
    res = verify(sandbox["vpc"])
    assert_leak(res, "eni_public_ip")
    assert res["findings"][0]["resource"] == eni and alloc["PublicIp"] in res["findings"][0]["detail"]


def test_interface_with_source_dest_check_off(aws_env, sandbox, ec2):
    eni = _eni(ec2, sandbox)
    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, SourceDestCheck={"Value": False})
    res = verify(sandbox["vpc"])
    assert_leak(res, "eni_source_dest_check_off")
    assert res["findings"][0]["resource"] == eni


def test_plain_interface_passes(aws_env, sandbox, ec2):
    _eni(ec2, sandbox)
    res = verify(sandbox["vpc"])
    assert res["isolated"] is True, res["findings"]
    assert res["checked"]["network_interfaces"] >= 1


def test_instance_interface_passes(aws_env, sandbox, ec2):
    # An instance of this account: its interface is attached to an instance of the interface's own owner.
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, SubnetId=sandbox["subnets"][0],
                                 SecurityGroupIds=[sandbox["sg"]["app"]])["Instances"][0]
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[instance["NetworkInterfaces"][0][
        "NetworkInterfaceId"]])["NetworkInterfaces"][0]
    assert eni["Attachment"]["InstanceId"] == instance["InstanceId"]
    res = verify(sandbox["vpc"])
    assert res["isolated"] is True, res["findings"]
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])


@contextmanager
def _as_aws_describes(eni_id, **fields):
    """DescribeNetworkInterfaces answers for ``eni_id`` with ``fields`` as AWS would (test-only).

    The emulator marks every interface as the caller's own (RequesterManaged false, InterfaceType
    interface); AWS marks the one a service creates in a subnet on the owner's behalf.
    """
    from botocore.client import BaseClient
    real = BaseClient._make_api_call

    def call(client, name, params):
        result = real(client, name, params)
        if name == "DescribeNetworkInterfaces":
            for eni in result.get("NetworkInterfaces") or []:
                if eni.get("NetworkInterfaceId") == eni_id:
                    eni.update(fields)
        return result

    with mock.patch.object(BaseClient, "_make_api_call", call):
        yield


def test_client_vpn_association_interface_is_a_foreign_service(aws_env, sandbox, ec2):
    # What a Client VPN target network association leaves in the subnet: a requester-managed interface.
    eni = _eni(ec2, sandbox, Description="ClientVPN Endpoint resource")
    with _as_aws_describes(eni, RequesterManaged=True, RequesterId="AROAEXAMPLECLIENTVPN:ClientVPN"):
        res = verify(sandbox["vpc"])
    assert_leak(res, "eni_foreign_service")
    assert [f["resource"] for f in res["findings"]] == [eni]
    assert "ClientVPN Endpoint resource" in res["findings"][0]["detail"]
    assert "requester-managed by AROAEXAMPLECLIENTVPN:ClientVPN" in res["findings"][0]["detail"]


# ------------------------------------------------------------------- endpoint services offered from the sandbox

def test_endpoint_service_offered_from_the_sandbox(aws_env, aws, sandbox, ec2):
    elb = aws("elbv2")
    lb = elb.create_load_balancer(Name="nlb-%s" % sandbox["vpc"][-12:], Type="network", Scheme="internal",
                                  Subnets=[sandbox["subnets"][0]])["LoadBalancers"][0]["LoadBalancerArn"]
    service = ec2.create_vpc_endpoint_service_configuration(NetworkLoadBalancerArns=[lb])[
        "ServiceConfiguration"]["ServiceId"]
    res = verify(sandbox["vpc"])
    codes = {f["code"] for f in res["findings"]}
    assert "endpoint_service_offered" in codes, res["findings"]
    offered = next(f for f in res["findings"] if f["code"] == "endpoint_service_offered")
    assert offered["resource"] == service and lb in offered["detail"]


# ------------------------------------------------------------------- new reads fail closed

@pytest.mark.parametrize("operation, code", [
    ("DescribeEgressOnlyInternetGateways", "AccessDenied"),
    ("DescribeCarrierGateways", "NotImplemented"),
    ("DescribeTrafficMirrorSessions", "UnauthorizedOperation"),
    ("DescribeNetworkInterfaces", "AccessDenied"),
    ("DescribeVpcEndpointServiceConfigurations", "NotImplemented"),
    ("DescribeTrafficMirrorTargets", "AccessDenied"),
])
def test_each_new_read_that_fails_is_unreadable(aws_env, sandbox, operation, code):
    with throttle(operation, times=None, code=code):
        res = verify(sandbox["vpc"])
    assert_leak(res, "unreadable")
    assert [f["resource"] for f in res["findings"]] == ["ec2:" + operation]
    assert code in res["findings"][0]["detail"]


def test_load_balancers_unreadable_is_reported_under_their_own_service(aws_env, sandbox):
    with throttle("DescribeLoadBalancers", times=None, code="AccessDenied"):
        res = verify(sandbox["vpc"])
    assert_leak(res, "unreadable")
    assert [f["resource"] for f in res["findings"]] == ["elasticloadbalancing:DescribeLoadBalancers"]


def test_dhcp_options_unreadable(aws_env, sandbox, ec2):
    # The DHCP options set is read only when the VPC has one other than "default".
    dopt = ec2.create_dhcp_options(DhcpConfigurations=[
        {"Key": "domain-name-servers", "Values": ["AmazonProvidedDNS"]}])["DhcpOptions"]["DhcpOptionsId"]
    ec2.associate_dhcp_options(DhcpOptionsId=dopt, VpcId=sandbox["vpc"])
    with throttle("DescribeDhcpOptions", times=None, code="NotImplemented"):
        res = verify(sandbox["vpc"])
    assert_leak(res, "unreadable")
    assert [f["resource"] for f in res["findings"]] == ["ec2:DescribeDhcpOptions"]
    assert "NotImplemented" in res["findings"][0]["detail"] and "dhcp options" in res["findings"][0]["detail"]


def test_prefix_list_entries_unreadable(aws_env, sandbox, ec2):
    pl = ec2.create_managed_prefix_list(PrefixListName="hidden-%s" % sandbox["vpc"], MaxEntries=5,
                                        AddressFamily="IPv4", Entries=[{"Cidr": "10.0.8.0/24"}])[
        "PrefixList"]["PrefixListId"]
    tgw = ec2.create_transit_gateway()["TransitGateway"]["TransitGatewayId"]
    ec2.create_route(RouteTableId=sandbox["rtb"], DestinationPrefixListId=pl, TransitGatewayId=tgw)
    with throttle("GetManagedPrefixListEntries", times=None, code="AccessDenied"):
        res = verify(sandbox["vpc"])
    # The S3 prefix list's entries are read by the same call, so the S3 route and the S3 egress
    # rule cannot be proven either (fail closed); the TGW route's destination is not verified.
    assert_leak(res, "route_tgw", "unreadable", "route_unknown_target", "sg_egress_undeclared")
    unreadable = [f for f in res["findings"] if f["code"] == "unreadable"]
    assert {f["resource"] for f in unreadable} == {"ec2:GetManagedPrefixListEntries"}
    assert any("route prefix lists of %s were not verified" % sandbox["vpc"] in f["detail"] for f in unreadable)


def test_nat_gateway_interface_is_reported_once_as_the_nat_gateway(aws_env, sandbox, ec2):
    alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat = ec2.create_nat_gateway(SubnetId=sandbox["subnets"][0], AllocationId=alloc)["NatGateway"]
    res = verify(sandbox["vpc"])
    assert_leak(res, "nat_gateway_present")
    assert res["findings"][0]["resource"] == nat["NatGatewayId"]


# ------------------------------------------------------------------- Route 53 (name resolution)

def _outbound_endpoint(aws, sandbox, direction="OUTBOUND"):
    return aws("route53resolver").create_resolver_endpoint(
        # Named: moto sorts endpoints by name and fails (500) on two unnamed ones.
        CreatorRequestId="ep-%s-%s" % (direction, sandbox["vpc"]), Direction=direction,
        Name="ep-%s-%s" % (direction.lower(), sandbox["vpc"]),
        SecurityGroupIds=[sandbox["sg"]["app"]],
        IpAddresses=[{"SubnetId": sandbox["subnets"][0]}, {"SubnetId": sandbox["subnets"][1]}])["ResolverEndpoint"]


def test_resolver_endpoint_in_the_sandbox(aws_env, aws, sandbox):
    ep = _outbound_endpoint(aws, sandbox, "INBOUND")
    res = verify(sandbox["vpc"])
    assert_leak(res, "resolver_endpoint_present")
    assert res["findings"][0]["resource"] == ep["Id"] and "INBOUND" in res["findings"][0]["detail"]


def test_forwarding_rule_associated_with_the_sandbox(aws_env, aws, ec2):
    # The outbound endpoint lives in another VPC: only the rule association touches the sandbox.
    r53r = aws("route53resolver")
    sandbox = build_compliant(ec2, aws("logs"))
    other = build_compliant(ec2, aws("logs"))
    ep = _outbound_endpoint(aws, other)
    rule = r53r.create_resolver_rule(CreatorRequestId="rule-%s" % sandbox["vpc"], RuleType="FORWARD",
                                     DomainName="corp.example.", TargetIps=[{"Ip": "10.0.0.2", "Port": 53}],
                                     ResolverEndpointId=ep["Id"])["ResolverRule"]["Id"]
    assoc = r53r.associate_resolver_rule(ResolverRuleId=rule, VPCId=sandbox["vpc"])["ResolverRuleAssociation"]
    res = verify(sandbox["vpc"])
    assert_leak(res, "resolver_rule_associated")
    assert res["findings"][0]["resource"] == assoc["Id"] and rule in res["findings"][0]["detail"]


def test_private_hosted_zone_associated_with_the_sandbox(aws_env, aws, sandbox):
    from conftest import REGION
    zone = aws("route53").create_hosted_zone(
        Name="shadow-%s.example." % sandbox["vpc"], CallerReference=sandbox["vpc"],
        VPC={"VPCRegion": REGION, "VPCId": sandbox["vpc"]}, HostedZoneConfig={"PrivateZone": True})["HostedZone"]
    res = verify(sandbox["vpc"])
    assert_leak(res, "private_hosted_zone_associated")
    assert res["findings"][0]["resource"] == zone["Id"].split("/")[-1]


def test_resolver_query_logging_of_the_sandbox(aws_env, aws, sandbox):
    r53r = aws("route53resolver")
    cfg = r53r.create_resolver_query_log_config(
        Name="ql-%s" % sandbox["vpc"], CreatorRequestId="ql-%s" % sandbox["vpc"],
        DestinationArn="arn:aws:logs:eu-west-1:123456789012:log-group:/production/dns")["ResolverQueryLogConfig"]
    r53r.associate_resolver_query_log_config(ResolverQueryLogConfigId=cfg["Id"], ResourceId=sandbox["vpc"])
    res = verify(sandbox["vpc"])
    assert_leak(res, "resolver_query_logging")
    assert cfg["Id"] in res["findings"][0]["detail"]


@pytest.mark.parametrize("operation, action", [
    ("ListResolverRuleAssociations", "route53resolver:ListResolverRuleAssociations"),
    ("ListResolverEndpoints", "route53resolver:ListResolverEndpoints"),
    ("ListResolverQueryLogConfigAssociations", "route53resolver:ListResolverQueryLogConfigAssociations"),
    ("ListHostedZonesByVPC", "route53:ListHostedZonesByVPC"),
])
def test_name_resolution_reads_that_fail_are_unreadable(aws_env, sandbox, operation, action):
    with throttle(operation, times=None, code="AccessDenied"):
        res = verify(sandbox["vpc"])
    assert_leak(res, "unreadable")
    assert [f["resource"] for f in res["findings"]] == [action]


# ------------------------------------------------------------------- VPC Lattice

def test_lattice_service_network_associated_with_the_sandbox(aws_env, aws, sandbox):
    lattice = aws("vpc-lattice")
    network = lattice.create_service_network(name="sn-%s" % sandbox["vpc"][4:])
    assoc = lattice.create_service_network_vpc_association(serviceNetworkIdentifier=network["id"],
                                                           vpcIdentifier=sandbox["vpc"])
    res = verify(sandbox["vpc"])
    assert_leak(res, "lattice_service_network_associated")
    assert res["findings"][0]["resource"] == assoc["id"] and network["id"] in res["findings"][0]["detail"]


def test_lattice_read_that_fails_is_unreadable(aws_env, sandbox):
    with throttle("ListServiceNetworkVpcAssociations", times=None, code="AccessDeniedException"):
        res = verify(sandbox["vpc"])
    assert_leak(res, "unreadable")
    assert [f["resource"] for f in res["findings"]] == ["vpc-lattice:ListServiceNetworkVpcAssociations"]


# ------------------------------------------------------------------- declared fallback paths

DR_SITE = "203.0.113.0/28"


def _open_fallback(ec2, sandbox):
    """What sandbox_network adds for a fallback: egress in every tier's group, the ACL both ways."""
    for gid in sandbox["sg"].values():
        ec2.authorize_security_group_egress(GroupId=gid, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": DR_SITE}]}])
    for egress, ports in ((True, (443, 443)), (False, (1024, 65535))):
        ec2.create_network_acl_entry(NetworkAclId=sandbox["acl"], RuleNumber=130, Protocol="6", RuleAction="allow",
                                     Egress=egress, CidrBlock=DR_SITE, PortRange={"From": ports[0], "To": ports[1]})


def test_declared_fallback_is_declared_and_its_blocked_return_path_is_reported(aws_env, sandbox, ec2):
    boundary = sample_boundary(fallback=[{"cidr": DR_SITE, "ports": [443], "description": "DR site"}])
    _open_fallback(ec2, sandbox)
    assert verify(sandbox["vpc"], boundary)["findings"] == []
    # undeclared, the same rules leak
    assert_leak(verify(sandbox["vpc"]), "sg_egress_undeclared", "nacl_allow_undeclared")
    # the return path goes: a DENY now meets the replies before any allow
    ec2.replace_network_acl_entry(NetworkAclId=sandbox["acl"], RuleNumber=130, Protocol="-1", RuleAction="deny",
                                  Egress=False, CidrBlock=DR_SITE)
    res = verify(sandbox["vpc"], boundary)
    assert_leak(res, "fallback_blocked")
    assert [(f["resource"], f["detail"]) for f in res["findings"]] == [
        (sandbox["acl"], "ingress (the return path) tcp port 443 to %s (drill_boundary.fallback[0]) is not allowed "
                         "by network ACL %s; not allowed: %s ports 1024-65535" % (DR_SITE, sandbox["acl"], DR_SITE))]
