"""drguard.sandbox.sweep against the emulator: discovery, dependency-ordered deletion, proof of zero."""

from __future__ import annotations

import json
import secrets
import threading
from datetime import datetime
from datetime import timedelta
from datetime import UTC

import pytest
from botocore.exceptions import ClientError

from ansible_collections.drguard.sandbox.plugins.module_utils import _sweep
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import ec2_tag_specs
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list as tag_list

FUTURE = "2099-01-01T00:00:00Z"
# Expired-mode tests judge expiry against a date long past, so that the managed
# resources of other tests sharing the emulator (which expire in the future) are
# never reaped by them.
AS_OF = "2002-01-01T00:00:00Z"
BEFORE_AS_OF = "2001-06-01T00:00:00Z"
AFTER_AS_OF = "2002-06-01T00:00:00Z"

TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})


def policy_doc(action: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]})


def new_id(prefix: str = "sw") -> str:
    return "%s-%s" % (prefix, secrets.token_hex(5))


def keys_of(items) -> set:
    return {(i["type"], i["id"]) for i in items}


def _ami(ec2) -> str:
    return ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def build_world(aws, drill_id: str, tags: dict, cidr_octet: int) -> dict:
    """Create one resource of every supported type, tagged with ``tags`` and named as the drill's builders name
    them (``drguard-<drill id>...``, IAM path ``/drguard/``, ...); return {(type, id)}.

    Also creates an untagged instance profile holding the drill's role and an untagged
    transit gateway (control-plane shaped): neither is the drill's.
    """
    ec2, iam, s3 = aws("ec2"), aws("iam"), aws("s3")
    made = set()
    base = "drguard-" + drill_id

    def spec(rtype):
        return ec2_tag_specs(rtype, tags, name=base)

    cidr = "10.%d.0.0/16" % cidr_octet
    vpc = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=spec("vpc"))["Vpc"]["VpcId"]
    peer_vpc = ec2.create_vpc(CidrBlock="10.%d.0.0/16" % (cidr_octet + 1),
                              TagSpecifications=spec("vpc"))["Vpc"]["VpcId"]
    made |= {("vpc", vpc), ("vpc", peer_vpc)}
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.%d.1.0/24" % cidr_octet,
                               TagSpecifications=spec("subnet"))["Subnet"]["SubnetId"]
    made.add(("subnet", subnet))
    igw = ec2.create_internet_gateway(TagSpecifications=spec("internet-gateway"))["InternetGateway"]
    ec2.attach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc)
    made.add(("internet_gateway", igw["InternetGatewayId"]))
    rtb = ec2.create_route_table(VpcId=vpc, TagSpecifications=spec("route-table"))["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw["InternetGatewayId"])
    ec2.associate_route_table(RouteTableId=rtb, SubnetId=subnet)
    made.add(("route_table", rtb))
    acl = ec2.create_network_acl(VpcId=vpc, TagSpecifications=spec("network-acl"))["NetworkAcl"]["NetworkAclId"]
    default_assoc = ec2.describe_network_acls(Filters=[
        {"Name": "association.subnet-id", "Values": [subnet]}])["NetworkAcls"][0]["Associations"]
    assoc_id = next(a["NetworkAclAssociationId"] for a in default_assoc if a["SubnetId"] == subnet)
    ec2.replace_network_acl_association(AssociationId=assoc_id, NetworkAclId=acl)
    made.add(("network_acl", acl))
    sg_a = ec2.create_security_group(GroupName=base + "-app", Description="app", VpcId=vpc,
                                     TagSpecifications=spec("security-group"))["GroupId"]
    sg_b = ec2.create_security_group(GroupName=base + "-db", Description="db", VpcId=vpc,
                                     TagSpecifications=spec("security-group"))["GroupId"]
    # Each group references the other: neither can go before the references are revoked.
    ec2.authorize_security_group_ingress(GroupId=sg_b, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": sg_a}]}])
    ec2.authorize_security_group_ingress(GroupId=sg_a, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080, "UserIdGroupPairs": [{"GroupId": sg_b}]}])
    made |= {("security_group", sg_a), ("security_group", sg_b)}
    eni = ec2.create_network_interface(SubnetId=subnet, Groups=[sg_a], TagSpecifications=spec("network-interface"))
    made.add(("network_interface", eni["NetworkInterface"]["NetworkInterfaceId"]))
    eip = ec2.allocate_address(Domain="vpc", TagSpecifications=spec("elastic-ip"))["AllocationId"]
    made.add(("elastic_ip", eip))
    nat = ec2.create_nat_gateway(SubnetId=subnet, AllocationId=eip,
                                 TagSpecifications=spec("natgateway"))["NatGateway"]["NatGatewayId"]
    made.add(("nat_gateway", nat))
    inst = ec2.run_instances(ImageId=_ami(ec2), MinCount=1, MaxCount=1, InstanceType="t3.micro", SubnetId=subnet,
                             SecurityGroupIds=[sg_a], TagSpecifications=spec("instance"),
                             DisableApiTermination=True)["Instances"][0]  # protection must not stop teardown
    made.add(("ec2_instance", inst["InstanceId"]))
    vpce = ec2.create_vpc_endpoint(VpcId=vpc, ServiceName="com.amazonaws.us-east-1.s3", VpcEndpointType="Gateway",
                                   RouteTableIds=[rtb], TagSpecifications=spec("vpc-endpoint"))
    made.add(("vpc_endpoint", vpce["VpcEndpoint"]["VpcEndpointId"]))
    pcx = ec2.create_vpc_peering_connection(VpcId=vpc, PeerVpcId=peer_vpc,
                                            TagSpecifications=spec("vpc-peering-connection"))
    made.add(("vpc_peering_connection", pcx["VpcPeeringConnection"]["VpcPeeringConnectionId"]))
    tgw = ec2.create_transit_gateway(Description="control plane")["TransitGateway"]["TransitGatewayId"]
    tgwa = ec2.create_transit_gateway_vpc_attachment(
        TransitGatewayId=tgw, VpcId=vpc, SubnetIds=[subnet],
        TagSpecifications=spec("transit-gateway-attachment"))["TransitGatewayVpcAttachment"]
    # moto drops TagSpecifications on this call; tag it again so the emulator has the tags AWS would.
    ec2.create_tags(Resources=[tgwa["TransitGatewayAttachmentId"]], Tags=tag_list(dict(tags, Name=base)))
    made.add(("transit_gateway_attachment", tgwa["TransitGatewayAttachmentId"]))
    vgw = ec2.create_vpn_gateway(Type="ipsec.1", TagSpecifications=spec("vpn-gateway"))["VpnGateway"]["VpnGatewayId"]
    ec2.attach_vpn_gateway(VpcId=vpc, VpnGatewayId=vgw)
    made.add(("vpn_gateway", vgw))

    logs = aws("logs")
    group = "/drguard/%s/flow" % drill_id
    logs.create_log_group(logGroupName=group, tags=tags)
    made.add(("log_group", group))

    role = base + "-runner"
    iam.create_role(RoleName=role, Path="/drguard/", AssumeRolePolicyDocument=TRUST, Tags=tag_list(tags))
    iam.put_role_policy(RoleName=role, PolicyName="inline", PolicyDocument=policy_doc("s3:GetObject"))
    made.add(("iam_role", role))
    pol = iam.create_policy(PolicyName=base + "-read", Path="/drguard/", PolicyDocument=policy_doc("s3:ListBucket"),
                            Tags=tag_list(tags))["Policy"]["Arn"]
    iam.create_policy_version(PolicyArn=pol, PolicyDocument=policy_doc("s3:GetObject"), SetAsDefault=True)
    iam.attach_role_policy(RoleName=role, PolicyArn=pol)
    made.add(("iam_policy", pol))
    iam.create_instance_profile(InstanceProfileName=role, Path="/drguard/", Tags=tag_list(tags))
    iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    made.add(("iam_instance_profile", role))
    # Holds the drill's role but is not the drill's (untagged): the role leaves it, the profile stays.
    foreign_profile = drill_id + "-foreign"
    iam.create_instance_profile(InstanceProfileName=foreign_profile)
    iam.add_role_to_instance_profile(InstanceProfileName=foreign_profile, RoleName=role)
    fl = ec2.create_flow_logs(ResourceIds=[vpc], ResourceType="VPC", TrafficType="ALL", LogGroupName=group,
                              DeliverLogsPermissionArn="arn:aws:iam::123456789012:role/" + role,
                              TagSpecifications=spec("vpc-flow-log"))["FlowLogIds"][0]
    made.add(("flow_log", fl))

    secret = aws("secretsmanager").create_secret(Name="drguard/%s/db" % drill_id, SecretString="synthetic",
                                                 Tags=tag_list(tags))["ARN"]
    made.add(("secret", secret))
    kms = aws("kms")
    key = kms.create_key(Description=drill_id, Tags=tag_list(tags, "TagKey", "TagValue"))["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/drguard/%s" % drill_id, TargetKeyId=key)
    made.add(("kms_key", key))

    bucket = base + "-telemetry"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(tags)})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"one", b"two"):
        s3.put_object(Bucket=bucket, Key="run/events.json", Body=body)
    s3.put_object(Bucket=bucket, Key="run/other.json", Body=b"x")
    s3.delete_object(Bucket=bucket, Key="run/other.json")  # leaves a delete marker
    made.add(("s3_bucket", bucket))
    topic = aws("sns").create_topic(Name=base + "-alerts", Tags=tag_list(tags))["TopicArn"]
    made.add(("sns_topic", topic))
    return {"resources": made, "vpc": vpc, "bucket": bucket, "role": role, "tgw": tgw,
            "foreign_profile": foreign_profile}


def untagged_world(aws, name: str) -> set:
    """Resources without drguard tags (or with foreign tags only): they must survive every sweep."""
    ec2 = aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.250.0.0/16", TagSpecifications=ec2_tag_specs("vpc", {"team": "prod"}))
    vpc_id = vpc["Vpc"]["VpcId"]
    sg = ec2.create_security_group(GroupName=name, Description="foreign", VpcId=vpc_id)["GroupId"]
    aws("s3").create_bucket(Bucket=name)
    aws("iam").create_role(RoleName=name, AssumeRolePolicyDocument=TRUST)
    aws("logs").create_log_group(logGroupName="/prod/" + name)
    return {("vpc", vpc_id), ("security_group", sg), ("s3_bucket", name), ("iam_role", name),
            ("log_group", "/prod/" + name)}


def sweep_args(**kwargs) -> dict:
    kwargs.setdefault("timeout", 120)
    return kwargs


def test_every_supported_type_is_found_deleted_and_proven_gone(aws, module_runner):
    drill, other = new_id("dra"), new_id("drb")
    mine = build_world(aws, drill, drill_tags(drill, FUTURE), 31)
    theirs = build_world(aws, other, drill_tags(other, FUTURE), 33)
    foreign = untagged_world(aws, new_id("prod"))
    assert {t for t, _ in mine["resources"]} == set(_sweep.RESOURCE_TYPES)

    dry = module_runner("sweep", sweep_args(drill_id=drill), check_mode=True)
    assert not dry.failed, dry
    assert dry["changed"] is True
    expected = mine["resources"]
    # Also the VPCs' own main route table / default ACL / default SG when tagged: here they are not.
    assert keys_of(dry["found"]) == expected
    assert dry["deleted"] == [] and dry["remaining"] == [] and dry["refused"] == []
    assert dry["counts"] == {"found": len(expected), "deleted": 0, "remaining": 0, "refused": 0}
    assert all(f["drill_id"] == drill for f in dry["found"])
    assert all(f["expires_at"] == FUTURE for f in dry["found"])

    again = module_runner("sweep", sweep_args(drill_id=drill), check_mode=True)
    assert keys_of(again["found"]) == expected, "check mode deleted something"

    real = module_runner("sweep", sweep_args(drill_id=drill))
    assert not real.failed, real
    assert real["changed"] is True
    assert keys_of(real["deleted"]) == expected
    assert real["remaining"] == [] and real["errors"] == [] and real["refused"] == []
    assert real["counts"] == {"found": len(expected), "deleted": len(expected), "remaining": 0, "refused": 0}

    # Gone for real, read back through the services themselves.
    ec2 = aws("ec2")
    assert ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [mine["vpc"]]}])["Vpcs"] == []
    with pytest.raises(ClientError):
        aws("s3").head_bucket(Bucket=mine["bucket"])
    with pytest.raises(ClientError):
        aws("iam").get_role(RoleName=mine["role"])
    with pytest.raises(ClientError):
        aws("iam").get_instance_profile(InstanceProfileName=mine["role"])
    foreign_profile = aws("iam").get_instance_profile(InstanceProfileName=mine["foreign_profile"])
    assert foreign_profile["InstanceProfile"]["Roles"] == []  # not the drill's: emptied, not deleted
    aws("iam").delete_instance_profile(InstanceProfileName=mine["foreign_profile"])
    key_id = next(i for t, i in mine["resources"] if t == "kms_key")
    assert aws("kms").describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert aws("kms").list_aliases(KeyId=key_id)["Aliases"] == []

    # The other drill and the untagged resources are untouched.
    left = module_runner("sweep", sweep_args(drill_id=other), check_mode=True)
    assert keys_of(left["found"]) == theirs["resources"]
    assert ec2.describe_vpcs(VpcIds=[v for t, v in foreign if t == "vpc"])["Vpcs"]
    aws("s3").head_bucket(Bucket=next(i for t, i in foreign if t == "s3_bucket"))
    aws("iam").get_role(RoleName=next(i for t, i in foreign if t == "iam_role"))

    idem = module_runner("sweep", sweep_args(drill_id=drill))
    assert not idem.failed, idem
    assert idem["changed"] is False
    assert idem["counts"] == {"found": 0, "deleted": 0, "remaining": 0, "refused": 0}

    cleanup = module_runner("sweep", sweep_args(drill_id=other))
    assert not cleanup.failed, cleanup
    aws("iam").delete_instance_profile(InstanceProfileName=theirs["foreign_profile"])


def test_expired_mode_takes_only_expired_managed_resources(aws, module_runner):
    old, young = new_id("dro"), new_id("dry")
    expired_world = build_world(aws, old, drill_tags(old, BEFORE_AS_OF), 41)
    young_world = build_world(aws, young, drill_tags(young, AFTER_AS_OF), 43)
    # (A managed resource whose expiry cannot be read is refused: test_reaper_refuses_a_missing_or_malformed_expiry.)
    garbage = new_id("drg")
    logs = aws("logs")
    # An old expiry on a resource that is not managed by drguard is none of the reaper's business.
    unmanaged = {"drguard:drill-id": garbage, "drguard:expires-at": BEFORE_AS_OF}
    logs.create_log_group(logGroupName="/keep/" + garbage, tags=unmanaged)

    dry = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF), check_mode=True)
    assert not dry.failed, dry
    found = keys_of(dry["found"])
    want = expired_world["resources"]
    assert want <= found
    assert not found & young_world["resources"]
    assert ("log_group", "/keep/" + garbage) not in found
    assert dry["as_of"] == AS_OF

    real = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF))
    assert not real.failed, real
    assert want <= keys_of(real["deleted"])
    assert real["remaining"] == []
    left = module_runner("sweep", sweep_args(drill_id=young), check_mode=True)
    assert keys_of(left["found"]) == young_world["resources"]
    assert logs.describe_log_groups(logGroupNamePrefix="/keep/" + garbage)["logGroups"]

    # Later, the young drill has expired too.
    later = module_runner("sweep", sweep_args(expired=True, as_of="2003-01-01T00:00:00+01:00"))
    assert not later.failed, later
    assert young_world["resources"] <= keys_of(later["deleted"])
    logs.delete_log_group(logGroupName="/keep/" + garbage)
    for profile in (expired_world["foreign_profile"], young_world["foreign_profile"]):
        aws("iam").delete_instance_profile(InstanceProfileName=profile)


def test_object_lock_retention_keeps_the_bucket_and_fails(aws, module_runner):
    drill = new_id("drl")
    tags = drill_tags(drill, FUTURE)
    s3 = aws("s3")
    bucket = "drguard-%s-locked" % drill
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(tags)})
    until = datetime.now(UTC) + timedelta(days=1)
    s3.put_object(Bucket=bucket, Key="evidence.bin", Body=b"keep", ObjectLockMode="GOVERNANCE",
                  ObjectLockRetainUntilDate=until)
    s3.put_object(Bucket=bucket, Key="scratch.bin", Body=b"free")
    topic = aws("sns").create_topic(Name="drguard-%s-alerts" % drill, Tags=tag_list(tags))["TopicArn"]
    try:
        res = module_runner("sweep", sweep_args(drill_id=drill))
        assert res.failed
        assert bucket in res["msg"] and "Object Lock" in res["msg"]
        assert keys_of(res["remaining"]) == {("s3_bucket", bucket)}
        reason = res["remaining"][0]["reason"]
        assert "evidence.bin" in reason and "GOVERNANCE" in reason
        assert ("sns_topic", topic) in keys_of(res["deleted"])
        assert res["counts"]["remaining"] == 1
        # The unlocked object went; the locked one is still there.
        keys = [v["Key"] for v in s3.list_object_versions(Bucket=bucket).get("Versions", [])]
        assert keys == ["evidence.bin"]

        assert res["changed"] is True  # objects went, even though the bucket stays

        report = module_runner("sweep", sweep_args(drill_id=drill, fail_on_remaining=False))
        assert not report.failed
        assert keys_of(report["remaining"]) == {("s3_bucket", bucket)}
        assert report["changed"] is False  # nothing left that can be deleted
    finally:
        for v in s3.list_object_versions(Bucket=bucket).get("Versions", []):
            s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"], BypassGovernanceRetention=True)
        s3.delete_bucket(Bucket=bucket)


def test_default_resources_go_with_their_vpc(aws, module_runner):
    """A tagged main route table / default SG / default ACL is found, and goes when its VPC goes."""
    drill = new_id("drd")
    tags = drill_tags(drill, FUTURE)
    ec2 = aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.61.0.0/16",
                         TagSpecifications=ec2_tag_specs("vpc", tags, "drguard-%s-vpc" % drill))["Vpc"]["VpcId"]
    main_rtb = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    default_sg = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                       {"Name": "group-name", "Values": ["default"]}])
    sg_id = default_sg["SecurityGroups"][0]["GroupId"]
    ec2.create_tags(Resources=[main_rtb["RouteTableId"], sg_id], Tags=tag_list(dict(tags, Name="drguard-" + drill)))
    res = module_runner("sweep", sweep_args(drill_id=drill))
    assert not res.failed, res
    assert keys_of(res["deleted"]) == {("vpc", vpc), ("route_table", main_rtb["RouteTableId"]),
                                       ("security_group", sg_id)}


def test_dependency_outside_the_drill_is_retried_until_timeout_then_reported(aws, module_runner):
    drill = new_id("drv")
    tags = drill_tags(drill, FUTURE)
    ec2 = aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.62.0.0/16",
                         TagSpecifications=ec2_tag_specs("vpc", tags, "drguard-" + drill))["Vpc"]["VpcId"]
    # Not the drill's, but inside its VPC: the VPC cannot go while it exists.
    stray = ec2.create_subnet(VpcId=vpc, CidrBlock="10.62.9.0/24")["Subnet"]["SubnetId"]
    group = "/drguard/" + drill
    aws("logs").create_log_group(logGroupName=group, tags=tags)
    res = module_runner("sweep", sweep_args(drill_id=drill, timeout=3))
    assert res.failed
    assert keys_of(res["remaining"]) == {("vpc", vpc)}
    assert "DependencyViolation" in res["remaining"][0]["reason"]
    assert vpc in res["msg"] and "DependencyViolation" in res["msg"]
    assert keys_of(res["deleted"]) == {("log_group", group)}
    assert ec2.describe_subnets(SubnetIds=[stray])["Subnets"], "a subnet that is not the drill's was deleted"

    ec2.delete_subnet(SubnetId=stray)
    res = module_runner("sweep", sweep_args(drill_id=drill, timeout=30))
    assert not res.failed, res
    assert keys_of(res["deleted"]) == {("vpc", vpc)}


@pytest.mark.parametrize(("args", "message"), [
    ({"drill_id": "dr-abcd", "expired": True}, "mutually exclusive"),
    ({}, "one of the following is required"),
    ({"expired": False}, "expired=false selects nothing"),
    ({"expired": True, "as_of": "yesterday"}, "as_of is not valid"),
    ({"expired": True, "as_of": "2026-11-29T05:00:00"}, "no time zone"),
    ({"drill_id": "Not_A_Drill"}, "drill_id"),
    ({"drill_id": "dr-abcd", "as_of": "2026-11-29T05:00:00Z"}, "as_of only applies"),
    ({"drill_id": "dr-abcd", "timeout": 0}, "timeout must be a positive"),
    ({"drill_id": "dr-abcd", "extra_resources": []}, "Unsupported parameters"),
    ({"drill_ids": []}, "drill_ids is empty"),
    ({"drill_ids": ["dr-abcd", "Not_A_Drill"]}, "Not_A_Drill"),
    ({"drill_ids": ["dr-abcd"], "drill_id": "dr-abcd"}, "mutually exclusive"),
    ({"drill_ids": ["dr-abcd"], "as_of": "2026-11-29T05:00:00Z"}, "as_of only applies"),
])
def test_bad_input_fails_clearly(module_runner, args, message):
    res = module_runner("sweep", args)
    assert res.failed
    assert message in res["msg"], res["msg"]
    assert "found" not in res  # failed before touching AWS


def test_no_region_fails_cleanly(module_runner, monkeypatch):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    res = module_runner("sweep", {"drill_id": "dr-abcd"})
    assert res.failed
    assert "requires a region" in res["msg"]


def test_a_service_that_cannot_be_listed_fails_closed(fresh_emulator, module_runner):
    """With IAM enforced, a reaper that may not list roles cannot prove zero: it fails, naming the gap."""
    client = fresh_emulator.client
    iam = client("iam")
    iam.create_user(UserName="reaper")
    iam.put_user_policy(UserName="reaper", PolicyName="all-but-list-roles", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"},
            {"Effect": "Deny", "Action": "iam:ListRoles", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reaper")["AccessKey"]
    drill = new_id("dre")
    client("logs").create_log_group(logGroupName="/drguard/" + drill, tags=drill_tags(drill, FUTURE))
    fresh_emulator.enforce_iam()
    try:
        args = sweep_args(drill_id=drill, endpoint_url=fresh_emulator.url, region="us-east-1",
                          access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
        for check_mode in (True, False):
            res = module_runner("sweep", args, check_mode=check_mode)
            assert res.failed, res
            assert "could not prove that nothing remains" in res["msg"]
            assert {k: res["errors"][0][k] for k in ("type", "id")} == {"type": "iam_role", "id": "*"}
            assert "AccessDenied" in res["errors"][0]["error"]
            assert key["SecretAccessKey"] not in json.dumps(res)
        # What it could see, it deleted.
        assert ("log_group", "/drguard/" + drill) in keys_of(res["deleted"])
    finally:
        fresh_emulator.relax_iam()


# --------------------------------------------------------------------------- deletion safety


def by_key(items) -> dict:
    return {(i["type"], i["id"]): i for i in items}


def untagged_bucket_role_vpc(aws, name: str) -> dict:
    """An untagged versioned bucket with objects, an untagged role and an untagged VPC."""
    s3, iam, ec2 = aws("s3"), aws("iam"), aws("ec2")
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"one", b"two"):
        s3.put_object(Bucket=name, Key="prod/data.json", Body=body)
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST)
    vpc = ec2.create_vpc(CidrBlock="10.251.0.0/16")["Vpc"]["VpcId"]
    return {"bucket": name, "role": name, "vpc": vpc}


def assert_survived(aws, prod: dict) -> None:
    versions = aws("s3").list_object_versions(Bucket=prod["bucket"]).get("Versions", [])
    assert len(versions) == 2, "the untagged bucket lost object versions"
    aws("iam").get_role(RoleName=prod["role"])
    assert aws("ec2").describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [prod["vpc"]]}])["Vpcs"]


def test_extra_resources_is_gone_so_a_recorded_list_deletes_nothing(aws, module_runner):
    """The planted-state attack: a list of ids naming untagged resources must never make them deletable."""
    drill = new_id("drp")
    prod = untagged_bucket_role_vpc(aws, new_id("prod"))
    planted = [{"type": "s3_bucket", "id": prod["bucket"]}, {"type": "iam_role", "id": prod["role"]},
               {"type": "vpc", "id": prod["vpc"]}]
    for args in (sweep_args(drill_id=drill, extra_resources=planted),
                 sweep_args(expired=True, as_of=AS_OF, extra_resources=[dict(e, expires_at=BEFORE_AS_OF)
                                                                        for e in planted])):
        res = module_runner("sweep", args)
        assert res.failed
        assert "Unsupported parameters" in res["msg"] and "extra_resources" in res["msg"], res["msg"]
        assert "found" not in res
    # And without the option, they are not the drill's: nothing selects them.
    res = module_runner("sweep", sweep_args(drill_id=drill))
    assert not res.failed, res
    assert res["found"] == [] and res["refused"] == []
    assert_survived(aws, prod)


def test_reaper_refuses_a_resource_with_only_the_managed_tag(aws, module_runner):
    name = new_id("mgd")
    only_managed = {"drguard:managed": "true"}
    aws("logs").create_log_group(logGroupName="/drguard/" + name, tags=only_managed)
    s3 = aws("s3")
    s3.create_bucket(Bucket="drguard-" + name)
    s3.put_bucket_tagging(Bucket="drguard-" + name, Tagging={"TagSet": tag_list(only_managed)})
    mine = {("log_group", "/drguard/" + name), ("s3_bucket", "drguard-" + name)}

    dry = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF), check_mode=True)
    assert not dry.failed, dry
    assert not mine & keys_of(dry["found"])
    real = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF))
    assert not real.failed, real
    assert not mine & keys_of(real["deleted"])
    refused = by_key(real["refused"])
    assert mine <= set(refused)
    for key in mine:
        assert refused[key]["reason"] == "tag drguard:drill-id is missing"
    # Not proven to be any drill's: reported, but not "remaining" of an expired drill.
    assert not mine & keys_of(real["remaining"])
    assert aws("logs").describe_log_groups(logGroupNamePrefix="/drguard/" + name)["logGroups"]
    s3.head_bucket(Bucket="drguard-" + name)
    aws("logs").delete_log_group(logGroupName="/drguard/" + name)
    s3.delete_bucket(Bucket="drguard-" + name)


@pytest.mark.parametrize(("expiry", "reason"), [
    (None, "tag drguard:expires-at is missing"),
    ("next tuesday", "tag drguard:expires-at 'next tuesday' is not an RFC 3339 time with a zone"),
    ("2001-06-01", "tag drguard:expires-at '2001-06-01' is not an RFC 3339 time with a zone"),
    ("20010601T000000Z", "tag drguard:expires-at '20010601T000000Z' is not an RFC 3339 time with a zone"),
])
def test_reaper_refuses_a_missing_or_malformed_expiry(aws, module_runner, expiry, reason):
    drill = new_id("drm")
    tags = {"drguard:managed": "true", "drguard:drill-id": drill}
    if expiry is not None:
        tags["drguard:expires-at"] = expiry
    group = "/drguard/%s/flow" % drill
    aws("logs").create_log_group(logGroupName=group, tags=tags)
    secret = aws("secretsmanager").create_secret(Name="drguard/%s/db" % drill, SecretString="s",
                                                 Tags=tag_list(tags))["ARN"]
    mine = {("log_group", group), ("secret", secret)}
    real = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF))
    assert not mine & keys_of(real["deleted"])
    refused = by_key(real["refused"])
    assert {k: refused[k]["reason"] for k in mine if k in refused} == {k: reason for k in mine}
    assert not mine & keys_of(real["remaining"])
    assert aws("logs").describe_log_groups(logGroupNamePrefix=group)["logGroups"]
    assert not aws("secretsmanager").describe_secret(SecretId=secret).get("DeletedDate")
    aws("logs").delete_log_group(logGroupName=group)
    aws("secretsmanager").delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True)


def naming_violations(aws, drill: str, tags: dict) -> dict:
    """Resources carrying ``drill``'s full tag set but not its naming / path / VPC convention."""
    iam, s3, ec2 = aws("iam"), aws("s3"), aws("ec2")
    out = {}
    iam.create_role(RoleName="drguard-%s-runner" % drill, Path="/", AssumeRolePolicyDocument=TRUST,
                    Tags=tag_list(tags))
    out[("iam_role", "drguard-%s-runner" % drill)] = "IAM path '/' is not /drguard/"
    iam.create_role(RoleName="admin-" + drill, Path="/drguard/", AssumeRolePolicyDocument=TRUST, Tags=tag_list(tags))
    out[("iam_role", "admin-" + drill)] = "name 'admin-%s' does not start with 'drguard-%s'" % (drill, drill)
    s3.create_bucket(Bucket="prod-" + drill)
    s3.put_bucket_tagging(Bucket="prod-" + drill, Tagging={"TagSet": tag_list(tags)})
    out[("s3_bucket", "prod-" + drill)] = "name 'prod-%s' does not start with 'drguard-%s'" % (drill, drill)
    secret = aws("secretsmanager").create_secret(Name="prod/" + drill, SecretString="s", Tags=tag_list(tags))["ARN"]
    out[("secret", secret)] = "name 'prod/%s' does not start with 'drguard/%s/'" % (drill, drill)
    aws("logs").create_log_group(logGroupName="/prod/" + drill, tags=tags)
    out[("log_group", "/prod/" + drill)] = "name '/prod/%s' does not start with '/drguard/%s'" % (drill, drill)
    key = aws("kms").create_key(Description="prod key", Tags=tag_list(tags, "TagKey", "TagValue"))["KeyMetadata"]
    aws("kms").create_alias(AliasName="alias/prod-" + drill, TargetKeyId=key["KeyId"])
    out[("kms_key", key["KeyId"])] = ("no alias alias/drguard/%s points to it and its description does not start "
                                      "with 'drguard drill %s:'" % (drill, drill))
    # Correctly named and tagged, but inside a VPC that is not the drill's.
    foreign_vpc = ec2.create_vpc(CidrBlock="10.252.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=foreign_vpc, CidrBlock="10.252.1.0/24", TagSpecifications=ec2_tag_specs(
        "subnet", tags, name="drguard-%s-private-a" % drill))["Subnet"]["SubnetId"]
    out[("subnet", subnet)] = "its VPC %s is not drill %s's (tag drguard:managed is missing)" % (foreign_vpc, drill)
    # A VPC with the tags but without the drguard Name.
    bare_vpc = ec2.create_vpc(CidrBlock="10.253.0.0/16", TagSpecifications=ec2_tag_specs("vpc", tags))["Vpc"]["VpcId"]
    out[("vpc", bare_vpc)] = "tag Name is missing (want 'drguard-%s' or 'drguard-%s-...')" % (drill, drill)
    return out


def test_teardown_refuses_drill_tagged_resources_that_break_the_naming_convention(aws, module_runner):
    drill = new_id("drn")
    violations = naming_violations(aws, drill, drill_tags(drill, FUTURE))
    aws("logs").create_log_group(logGroupName="/drguard/%s/flow" % drill, tags=drill_tags(drill, FUTURE))
    # A key from a drill killed before it got its alias: its description names the drill.
    key = aws("kms").create_key(Description="drguard drill %s: secrets" % drill,
                                Tags=tag_list(drill_tags(drill, FUTURE), "TagKey", "TagValue"))["KeyMetadata"]["KeyId"]
    good = {("log_group", "/drguard/%s/flow" % drill), ("kms_key", key)}

    dry = module_runner("sweep", sweep_args(drill_id=drill), check_mode=True)
    assert keys_of(dry["found"]) == good
    assert {k: v["reason"] for k, v in by_key(dry["refused"]).items()} == violations

    res = module_runner("sweep", sweep_args(drill_id=drill))
    assert res.failed
    assert keys_of(res["deleted"]) == good
    assert {k: v["reason"] for k, v in by_key(res["refused"]).items()} == violations
    # They carry this drill's id, so the teardown cannot claim zero: they also count as remaining.
    assert {k: v["reason"] for k, v in by_key(res["remaining"]).items()} == {
        k: "refused: " + v for k, v in violations.items()}
    assert res["counts"] == {"found": 2, "deleted": 2, "remaining": len(violations), "refused": len(violations)}
    assert "drguard-%s-runner" % drill in res["msg"] and "refused" in res["msg"]
    # Every one of them is still there.
    iam = aws("iam")
    iam.get_role(RoleName="drguard-%s-runner" % drill)
    iam.get_role(RoleName="admin-" + drill)
    aws("s3").head_bucket(Bucket="prod-" + drill)
    for (rtype, rid) in violations:
        if rtype == "secret":
            assert not aws("secretsmanager").describe_secret(SecretId=rid).get("DeletedDate")
        elif rtype == "subnet":
            assert aws("ec2").describe_subnets(SubnetIds=[rid])["Subnets"]
        elif rtype == "vpc":
            assert aws("ec2").describe_vpcs(VpcIds=[rid])["Vpcs"]
    assert aws("logs").describe_log_groups(logGroupNamePrefix="/prod/" + drill)["logGroups"]


def test_reaper_refuses_an_expired_role_outside_the_drguard_path(aws, module_runner):
    drill = new_id("drr")
    tags = drill_tags(drill, BEFORE_AS_OF)
    aws("iam").create_role(RoleName="drguard-" + drill, Path="/", AssumeRolePolicyDocument=TRUST, Tags=tag_list(tags))
    aws("iam").create_role(RoleName="drguard-%s-ok" % drill, Path="/drguard/", AssumeRolePolicyDocument=TRUST,
                           Tags=tag_list(tags))
    try:
        res = module_runner("sweep", sweep_args(expired=True, as_of=AS_OF))
        assert ("iam_role", "drguard-%s-ok" % drill) in keys_of(res["deleted"])
        refused = by_key(res["refused"])
        assert refused[("iam_role", "drguard-" + drill)]["reason"] == "IAM path '/' is not /drguard/"
        # An expired drill's resource that cannot be deleted: the reaper reports it as remaining and fails.
        assert by_key(res["remaining"])[("iam_role", "drguard-" + drill)]["reason"] == \
            "refused: IAM path '/' is not /drguard/"
        assert res.failed
        aws("iam").get_role(RoleName="drguard-" + drill)
    finally:
        # Expired and owned, it would fail every other expired-mode sweep on this emulator.
        aws("iam").delete_role(RoleName="drguard-" + drill)


def test_ownership_is_proven_again_at_delete_time(aws):
    """What the listing said does not count: a resource re-tagged after discovery is refused, not deleted."""
    drill = new_id("drt")
    tags = drill_tags(drill, FUTURE)
    logs, sm = aws("logs"), aws("secretsmanager")
    group = "/drguard/%s/flow" % drill
    logs.create_log_group(logGroupName=group, tags=tags)
    secret = sm.create_secret(Name="drguard/%s/db" % drill, SecretString="s", Tags=tag_list(tags))["ARN"]
    ctx = _sweep.Context(aws, _sweep.Selector(drill_id=drill), 10**12)
    found = _sweep.discover(ctx)
    assert keys_of(r.as_dict() for r in found.resources) == {("log_group", group), ("secret", secret)}
    # Between the listing and the deletion, the group stops being the drill's.
    logs.untag_log_group(logGroupName=group, tags=["drguard:drill-id"])
    outcome = _sweep.delete(ctx, found.resources)
    assert outcome.errors == []
    assert [(r.type, r.id, r.reason) for r in outcome.refused] == [
        ("log_group", group, "tag drguard:drill-id is missing")]
    assert logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"], "deleted on the strength of a listing"
    assert [(r.type, r.id) for r in found.resources if r.type == "secret"] == [("secret", secret)]
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        sm.describe_secret(SecretId=secret)  # the secret, still the drill's when read again, went
    logs.delete_log_group(logGroupName=group)


# --------------------------------------------------------------------------- speed without weaker proofs


def small_network(aws, drill: str, octet: int) -> dict:
    """A drill VPC with two subnets, a route table, a network ACL and a security group, named and tagged as
    the network builder makes them."""
    ec2 = aws("ec2")
    tags = drill_tags(drill, FUTURE)
    base = "drguard-" + drill

    def spec(rtype):
        return ec2_tag_specs(rtype, tags, name=base)

    vpc = ec2.create_vpc(CidrBlock="10.%d.0.0/16" % octet, TagSpecifications=spec("vpc"))["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock="10.%d.%d.0/24" % (octet, i),
                                 TagSpecifications=spec("subnet"))["Subnet"]["SubnetId"] for i in (1, 2)]
    rtb = ec2.create_route_table(VpcId=vpc, TagSpecifications=spec("route-table"))["RouteTable"]["RouteTableId"]
    acl = ec2.create_network_acl(VpcId=vpc, TagSpecifications=spec("network-acl"))["NetworkAcl"]["NetworkAclId"]
    sg = ec2.create_security_group(GroupName=base + "-app", Description="app", VpcId=vpc,
                                   TagSpecifications=spec("security-group"))["GroupId"]
    return {"vpc": vpc, "children": {("subnet", subnets[0]), ("subnet", subnets[1]), ("route_table", rtb),
                                     ("network_acl", acl), ("security_group", sg)}}


def counting(aws, operation: str):
    """A client factory for ``_sweep.Context`` on the emulator, and a counter of ``operation`` calls."""
    count = {"calls": 0}

    def bump(**_):
        count["calls"] += 1

    def factory(service):
        client = aws(service)
        client.meta.events.register("before-call.%s.%s" % (service, operation), bump)
        return client
    return factory, count


def test_a_vpc_is_read_once_per_pass_not_once_per_resource_in_it(aws):
    """Every EC2 proof needs the resource's VPC; one pass reads it once, however many resources live in it."""
    drill = new_id("drq")
    net = small_network(aws, drill, 71)
    factory, describe_vpcs = counting(aws, "DescribeVpcs")
    ctx = _sweep.Context(factory, _sweep.Selector(drill_id=drill), 10**12)
    found = _sweep.discover(ctx)
    assert keys_of(r.as_dict() for r in found.resources) == net["children"] | {("vpc", net["vpc"])}
    # The VPC kind's own listing, and one read of the VPC for the proofs of all five resources in it.
    assert describe_vpcs["calls"] == 2

    describe_vpcs["calls"] = 0
    outcome = _sweep.delete(ctx, found.resources)
    assert outcome.errors == [] and outcome.refused == []
    # Right before the children go: one read of their VPC; right before the VPC goes: the VPC itself.
    assert describe_vpcs["calls"] == 2
    assert aws("ec2").describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [net["vpc"]]}])["Vpcs"] == []


def test_a_vpc_that_stops_being_the_drills_after_discovery_protects_everything_in_it(aws):
    """The VPC read for the delete-time proof is the step's own, not the discovery's: a VPC re-tagged
    between the listing and the deletion makes its resources (and itself) refused, not deleted."""
    drill = new_id("drw")
    net = small_network(aws, drill, 73)
    ec2 = aws("ec2")
    ctx = _sweep.Context(aws, _sweep.Selector(drill_id=drill), 10**12)
    found = _sweep.discover(ctx)
    assert keys_of(r.as_dict() for r in found.resources) == net["children"] | {("vpc", net["vpc"])}
    ec2.delete_tags(Resources=[net["vpc"]], Tags=[{"Key": "drguard:drill-id"}])
    outcome = _sweep.delete(ctx, found.resources)
    assert outcome.errors == []
    refused = {(r.type, r.id): r.reason for r in outcome.refused}
    expected = {key: "its VPC %s is not drill %s's (tag drguard:drill-id is missing)" % (net["vpc"], drill)
                for key in net["children"]}
    expected[("vpc", net["vpc"])] = "tag drguard:drill-id is missing"
    assert refused == expected
    assert ec2.describe_vpcs(VpcIds=[net["vpc"]])["Vpcs"], "deleted on the strength of a listing"
    assert len(ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [net["vpc"]]}])["Subnets"]) == 2
    ec2.create_tags(Resources=[net["vpc"]], Tags=[{"Key": "drguard:drill-id", "Value": drill}])
    again = _sweep.discover(ctx)
    assert not _sweep.delete(ctx, again.resources).errors


def test_a_dependency_that_goes_while_the_sweep_waits_is_retried_then_deleted(aws, module_runner):
    """DependencyViolation is retried (backing off) until the deadline: once the blocker goes, so does the VPC."""
    drill = new_id("dry")
    ec2 = aws("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.64.0.0/16",
                         TagSpecifications=ec2_tag_specs("vpc", drill_tags(drill, FUTURE), "drguard-" + drill))
    vpc = vpc["Vpc"]["VpcId"]
    stray = ec2.create_subnet(VpcId=vpc, CidrBlock="10.64.9.0/24")["Subnet"]["SubnetId"]  # not the drill's
    remover = threading.Timer(1.5, lambda: ec2.delete_subnet(SubnetId=stray))
    remover.start()
    try:
        res = module_runner("sweep", sweep_args(drill_id=drill, timeout=60))
    finally:
        remover.join()
    assert not res.failed, res
    assert keys_of(res["deleted"]) == {("vpc", vpc)}
    assert res["seconds"] >= 1.5


def test_drill_ids_sweeps_several_drills_in_one_pass_and_nothing_else(aws, module_runner):
    """The reaper after a run of many drill hosts: their resources go in one sweep; another drill's stay."""
    one, two, other = new_id("drm"), new_id("drn"), new_id("drk")
    nets = {d: small_network(aws, d, octet) for d, octet in ((one, 161), (two, 162), (other, 163))}
    res = module_runner("sweep", sweep_args(drill_ids=[one, two]))
    assert not res.failed, res
    deleted = keys_of(res["deleted"])
    for drill in (one, two):
        assert {("vpc", nets[drill]["vpc"])} | nets[drill]["children"] <= deleted, drill
    assert {r["drill_id"] for r in res["deleted"]} == {one, two}
    assert res["remaining"] == [] and res["counts"]["remaining"] == 0
    left = module_runner("sweep", sweep_args(drill_id=other), check_mode=True)
    assert {("vpc", nets[other]["vpc"])} | nets[other]["children"] <= keys_of(left["found"])
    module_runner("sweep", sweep_args(drill_id=other))


def test_drill_ids_refuses_a_resource_named_for_another_of_its_drills(aws, module_runner):
    """Each resource proves it belongs to its *own* drill: tagged for one drill, named for the other, refused."""
    one, two = new_id("drp"), new_id("drq")
    logs = aws("logs")
    logs.create_log_group(logGroupName="/drguard/%s/x" % two, tags=drill_tags(one, FUTURE))
    res = module_runner("sweep", sweep_args(drill_ids=[one, two]))
    assert res.failed
    assert [(r["type"], r["id"]) for r in res["refused"]] == [("log_group", "/drguard/%s/x" % two)]
    assert logs.describe_log_groups(logGroupNamePrefix="/drguard/%s/x" % two)["logGroups"]
    logs.delete_log_group(logGroupName="/drguard/%s/x" % two)
