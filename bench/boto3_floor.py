"""The floor: the same provision / prove / teardown work from one plain boto3 script.

No Ansible, no module start-up, no retries: what the API calls alone cost on this
emulator. Used by bench/drill_bench.py beside the real drill's figures.
"""

from __future__ import annotations

import json
import time

import boto3


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, **_):
        self.calls += 1


def run(region: str = "us-east-1", cidr: str = "10.77.0.0/16") -> dict:
    session = boto3.session.Session(region_name=region)
    counter = Counter()
    session.events.register("before-send.*.*", counter)
    ec2, logs, iam = session.client("ec2"), session.client("logs"), session.client("iam")
    tag = [{"Key": "drguard:drill-id", "Value": "floor"}]
    t0 = time.perf_counter()

    # provision
    vpc = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=[{"ResourceType": "vpc", "Tags": tag}])["Vpc"]["VpcId"]
    azs = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]][:2]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.%d.0/20" % (i * 16), AvailabilityZone=az)["Subnet"]
               ["SubnetId"] for i, az in enumerate(azs)]
    for s in subnets:
        ec2.modify_subnet_attribute(SubnetId=s, MapPublicIpOnLaunch={"Value": False})
    rtb = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    for s in subnets:
        ec2.associate_route_table(RouteTableId=rtb, SubnetId=s)
    sgs = []
    for tier in ("app", "db"):
        sg = ec2.create_security_group(GroupName="floor-%s" % tier, Description=tier, VpcId=vpc)["GroupId"]
        ec2.revoke_security_group_egress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        ec2.authorize_security_group_egress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "198.51.100.0/28"}]}])
        sgs.append(sg)
    default_sg = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                       {"Name": "group-name", "Values": ["default"]}])
    default_sg = default_sg["SecurityGroups"][0]
    if default_sg["IpPermissions"]:
        ec2.revoke_security_group_ingress(GroupId=default_sg["GroupId"], IpPermissions=default_sg["IpPermissions"])
    if default_sg["IpPermissionsEgress"]:
        ec2.revoke_security_group_egress(GroupId=default_sg["GroupId"],
                                         IpPermissions=default_sg["IpPermissionsEgress"])
    nacl = ec2.create_network_acl(VpcId=vpc)["NetworkAcl"]["NetworkAclId"]
    for n, prod in enumerate(("10.0.0.0/16", "10.1.0.0/16")):
        for egress in (True, False):
            ec2.create_network_acl_entry(NetworkAclId=nacl, RuleNumber=10 + n, Protocol="-1", RuleAction="deny",
                                         Egress=egress, CidrBlock=prod)
    assoc = ec2.describe_network_acls(Filters=[{"Name": "association.subnet-id", "Values": subnets}])
    for a in assoc["NetworkAcls"][0]["Associations"]:
        ec2.replace_network_acl_association(AssociationId=a["NetworkAclAssociationId"], NetworkAclId=nacl)
    vpce = ec2.create_vpc_endpoint(VpcId=vpc, ServiceName="com.amazonaws.%s.s3" % region, RouteTableIds=[rtb],
                                   VpcEndpointType="Gateway",
                                   PolicyDocument=json.dumps({"Statement": [{"Effect": "Allow", "Principal": "*",
                                                                             "Action": "s3:GetObject",
                                                                             "Resource": "arn:aws:s3:::b/*"}]}))
    vpce = vpce["VpcEndpoint"]["VpcEndpointId"]
    logs.create_log_group(logGroupName="/floor/flow-logs")
    role = iam.create_role(RoleName="floor-flowlogs", AssumeRolePolicyDocument=json.dumps({
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
                       "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    fl = ec2.create_flow_logs(ResourceIds=[vpc], ResourceType="VPC", TrafficType="ALL",
                              LogGroupName="/floor/flow-logs", DeliverLogsPermissionArn=role)["FlowLogIds"][0]
    t1 = time.perf_counter()

    # prove: read everything back
    flt = [{"Name": "vpc-id", "Values": [vpc]}]
    ec2.describe_vpcs(VpcIds=[vpc])
    ec2.describe_route_tables(Filters=flt)
    ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])
    ec2.describe_nat_gateways(Filters=flt)
    ec2.describe_vpc_peering_connections()
    ec2.describe_transit_gateway_vpc_attachments()
    ec2.describe_vpn_gateways()
    ec2.describe_vpc_endpoints(Filters=flt)
    ec2.describe_security_groups(Filters=flt)
    ec2.describe_network_acls(Filters=flt)
    ec2.describe_subnets(Filters=flt)
    ec2.describe_flow_logs()
    t2 = time.perf_counter()

    # teardown
    ec2.delete_flow_logs(FlowLogIds=[fl])
    ec2.delete_vpc_endpoints(VpcEndpointIds=[vpce])
    default_nacl = [n for n in ec2.describe_network_acls(Filters=flt)["NetworkAcls"] if n["IsDefault"]][0]
    for a in ec2.describe_network_acls(NetworkAclIds=[nacl])["NetworkAcls"][0]["Associations"]:
        ec2.replace_network_acl_association(AssociationId=a["NetworkAclAssociationId"],
                                            NetworkAclId=default_nacl["NetworkAclId"])
    ec2.delete_network_acl(NetworkAclId=nacl)
    for a in ec2.describe_route_tables(RouteTableIds=[rtb])["RouteTables"][0]["Associations"]:
        ec2.disassociate_route_table(AssociationId=a["RouteTableAssociationId"])
    ec2.delete_route_table(RouteTableId=rtb)
    for sg in sgs:
        ec2.delete_security_group(GroupId=sg)
    for s in subnets:
        ec2.delete_subnet(SubnetId=s)
    ec2.delete_vpc(VpcId=vpc)
    logs.delete_log_group(logGroupName="/floor/flow-logs")
    iam.delete_role(RoleName="floor-flowlogs")
    t3 = time.perf_counter()
    return {"provision": t1 - t0, "prove": t2 - t1, "teardown": t3 - t2, "total": t3 - t0,
            "api_calls": counter.calls}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
