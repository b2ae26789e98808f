#!/usr/bin/env python3
"""Test-only: open one leak in a drill's freshly built sandbox network.

Run by tests/e2e/hooks/inject_leak.yml (drill_hook_after_network) under the emulator's
environment. Everything it creates carries the drill's tags, so teardown must remove it.
"""

from __future__ import annotations

import argparse
import json
import sys

import boto3

LEAKS = ("igw_route", "nat_route", "peering_route", "tgw_route", "sg_egress_open",
         "default_sg_rules", "nacl_no_production_deny", "map_public_ip", "endpoint_allow_all")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--leak", required=True, choices=LEAKS)
    p.add_argument("--network", required=True, help="JSON of the sandbox_network__output fact")
    p.add_argument("--drill-id", required=True)
    p.add_argument("--expires-at", required=True)
    p.add_argument("--production-cidr", required=True)
    a = p.parse_args()
    net = json.loads(a.network)
    ec2 = boto3.client("ec2")
    tags = [{"Key": "drguard:managed", "Value": "true"}, {"Key": "drguard:drill-id", "Value": a.drill_id},
            {"Key": "drguard:expires-at", "Value": a.expires_at},
            # The drill's naming convention too: teardown deletes only what proves it is the drill's.
            {"Key": "Name", "Value": "drguard-%s-leak" % a.drill_id}]

    def spec(kind):
        return [{"ResourceType": kind, "Tags": tags}]

    vpc, rtb = net["vpc_id"], net["route_table_id"]
    if a.leak == "igw_route":
        igw = ec2.create_internet_gateway(TagSpecifications=spec("internet-gateway"))["InternetGateway"]
        ec2.attach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc)
        ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw["InternetGatewayId"])
    elif a.leak == "nat_route":
        eip = ec2.allocate_address(Domain="vpc", TagSpecifications=spec("elastic-ip"))
        nat = ec2.create_nat_gateway(SubnetId=net["subnet_ids"][0], AllocationId=eip["AllocationId"],
                                     TagSpecifications=spec("natgateway"))["NatGateway"]
        ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat["NatGatewayId"])
    elif a.leak == "peering_route":
        prod = [v for v in ec2.describe_vpcs()["Vpcs"]
                if v["CidrBlock"] == a.production_cidr][0]["VpcId"]
        pcx = ec2.create_vpc_peering_connection(VpcId=vpc, PeerVpcId=prod,
                                                TagSpecifications=spec("vpc-peering-connection"))
        pcx_id = pcx["VpcPeeringConnection"]["VpcPeeringConnectionId"]
        ec2.accept_vpc_peering_connection(VpcPeeringConnectionId=pcx_id)
        ec2.create_route(RouteTableId=rtb, DestinationCidrBlock=a.production_cidr, VpcPeeringConnectionId=pcx_id)
    elif a.leak == "tgw_route":
        tgw = ec2.create_transit_gateway(TagSpecifications=spec("transit-gateway"))["TransitGateway"]
        ec2.create_transit_gateway_vpc_attachment(TransitGatewayId=tgw["TransitGatewayId"], VpcId=vpc,
                                                  SubnetIds=net["subnet_ids"][:1],
                                                  TagSpecifications=spec("transit-gateway-attachment"))
        ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", TransitGatewayId=tgw["TransitGatewayId"])
    elif a.leak == "sg_egress_open":
        sg = sorted(net["security_groups"].values())[0]
        ec2.authorize_security_group_egress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    elif a.leak == "default_sg_rules":
        ec2.authorize_security_group_ingress(GroupId=net["default_security_group_id"], IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    elif a.leak == "nacl_no_production_deny":
        nacl = ec2.describe_network_acls(NetworkAclIds=[net["network_acl_id"]])["NetworkAcls"][0]
        for entry in nacl["Entries"]:
            if entry["RuleAction"] == "deny" and entry["RuleNumber"] < 32767:
                ec2.delete_network_acl_entry(NetworkAclId=nacl["NetworkAclId"], RuleNumber=entry["RuleNumber"],
                                             Egress=entry["Egress"])
    elif a.leak == "map_public_ip":
        ec2.modify_subnet_attribute(SubnetId=net["subnet_ids"][0], MapPublicIpOnLaunch={"Value": True})
    elif a.leak == "endpoint_allow_all":
        ec2.modify_vpc_endpoint(VpcEndpointId=net["s3_endpoint_id"], PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "*",
                                                     "Resource": "*"}]}))
    print("injected %s" % a.leak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
