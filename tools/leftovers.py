#!/usr/bin/env python3
"""Independent check that nothing tagged with a drill id remains.

Asks each service directly with plain boto3 (not through our sweep module), so that
teardown's own claim of "remaining: 0" is checked by a second reader.
"""

from __future__ import annotations

import argparse
import json
import sys

import boto3

TAG = "drguard:drill-id"


def _tags(items, key="Key", value="Value"):
    return {t[key]: t[value] for t in items or []}


def _tagged_with(item: dict, drill_id: str) -> bool:
    """The item's own tags name the drill (a server-side tag filter is only a hint: moto ignores
    it for NAT gateways, and an independent check must not trust it)."""
    return _tags(item.get("Tags")).get(TAG) == drill_id


def leftovers(drill_id: str, session: boto3.session.Session | None = None,
              endpoint_url: str | None = None) -> list[dict]:
    """Every resource still tagged with ``drill_id`` (KMS keys pending deletion excluded)."""
    session = session or boto3.session.Session()

    def client(name):
        return session.client(name, endpoint_url=endpoint_url)

    ec2 = client("ec2")
    flt = [{"Name": "tag:%s" % TAG, "Values": [drill_id]}]
    found = []
    for kind, call, key, id_key in (
        ("vpc", ec2.describe_vpcs, "Vpcs", "VpcId"),
        ("subnet", ec2.describe_subnets, "Subnets", "SubnetId"),
        ("security_group", ec2.describe_security_groups, "SecurityGroups", "GroupId"),
        ("route_table", ec2.describe_route_tables, "RouteTables", "RouteTableId"),
        ("network_acl", ec2.describe_network_acls, "NetworkAcls", "NetworkAclId"),
        ("internet_gateway", ec2.describe_internet_gateways, "InternetGateways", "InternetGatewayId"),
        ("vpc_endpoint", ec2.describe_vpc_endpoints, "VpcEndpoints", "VpcEndpointId"),
        ("flow_log", ec2.describe_flow_logs, "FlowLogs", "FlowLogId"),
        ("network_interface", ec2.describe_network_interfaces, "NetworkInterfaces", "NetworkInterfaceId"),
    ):
        for item in call(Filters=flt)[key]:
            if not _tagged_with(item, drill_id):
                continue
            if kind == "vpc_endpoint" and item.get("State", "").lower() in ("deleted", "deleting"):
                continue
            found.append({"type": kind, "id": item[id_key]})
    for res in ec2.describe_instances(Filters=flt)["Reservations"]:
        for inst in res["Instances"]:
            if _tagged_with(inst, drill_id) and inst["State"]["Name"] != "terminated":
                found.append({"type": "instance", "id": inst["InstanceId"]})
    for nat in ec2.describe_nat_gateways(Filters=flt)["NatGateways"]:
        if _tagged_with(nat, drill_id) and nat["State"] not in ("deleted", "deleting"):
            found.append({"type": "nat_gateway", "id": nat["NatGatewayId"]})

    logs = client("logs")
    for page in logs.get_paginator("describe_log_groups").paginate():
        for group in page["logGroups"]:
            tags = logs.list_tags_log_group(logGroupName=group["logGroupName"]).get("tags", {})
            if tags.get(TAG) == drill_id:
                found.append({"type": "log_group", "id": group["logGroupName"]})

    iam = client("iam")
    for page in iam.get_paginator("list_roles").paginate():
        for role in page["Roles"]:
            tags = _tags(iam.list_role_tags(RoleName=role["RoleName"])["Tags"])
            if tags.get(TAG) == drill_id or drill_id in role["RoleName"]:
                found.append({"type": "iam_role", "id": role["RoleName"]})

    sm = client("secretsmanager")
    for page in sm.get_paginator("list_secrets").paginate():
        for secret in page["SecretList"]:
            if _tags(secret.get("Tags")).get(TAG) == drill_id or drill_id in secret["Name"]:
                found.append({"type": "secret", "id": secret["Name"]})

    kms = client("kms")
    for page in kms.get_paginator("list_keys").paginate():
        for key in page["Keys"]:
            meta = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
            if meta.get("KeyManager") != "CUSTOMER" or meta.get("KeyState") == "PendingDeletion":
                continue
            tags = _tags(kms.list_resource_tags(KeyId=key["KeyId"]).get("Tags"), "TagKey", "TagValue")
            if tags.get(TAG) == drill_id:
                found.append({"type": "kms_key", "id": key["KeyId"]})

    s3 = client("s3")
    for bucket in s3.list_buckets().get("Buckets", []):
        try:
            tags = _tags(s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"])
        except s3.exceptions.ClientError:
            continue
        if tags.get(TAG) == drill_id:
            found.append({"type": "s3_bucket", "id": bucket["Name"]})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drill-id", required=True)
    args = parser.parse_args()
    found = leftovers(args.drill_id)
    print("leftovers for %s: %d %s" % (args.drill_id, len(found), json.dumps(found) if found else ""))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
