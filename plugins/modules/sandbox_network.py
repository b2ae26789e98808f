#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sandbox_network
short_description: Build a drill's isolated sandbox network (default-deny egress) from its boundary policy
version_added: 0.1.0
description:
  - Builds, in one call, the isolated network a drill runs in, translated from the drill's boundary policy
    (C(drill_boundary), see docs/boundary-policy.md), or converges an existing one back to it.
  - A VPC (the declared C(sandbox_cidr), or a free /16 picked per drill that overlaps no production CIDR and no
    existing VPC of the region) with DNS support; two private subnets in two availability zones (the two halves of the
    VPC CIDR, C(MapPublicIpOnLaunch) explicitly false, no IPv6).
  - One route table for both subnets with the local route, the S3 gateway endpoint route and, only when declared,
    C(control_plane_route). No internet gateway, NAT gateway, peering, transit gateway or VPN gateway otherwise, and
    routes that are not declared are removed.
  - One security group per tier, named C(drguard-<drill_id>-<tier>), with the default allow-all egress revoked;
    egress only to the declared C(egress) destinations and C(fallback) paths (and tcp/443 to the S3 prefix list when
    S3 grants are declared), ingress only from the declared C(ingress) sources, C(tier_rules) as
    security-group-to-security-group rules. Rules that are not declared are revoked. The VPC's default security
    group is stripped of every rule.
  - A network ACL for both subnets, with DENY entries for every production CIDR in both directions with the lowest rule
    numbers (1..N), then narrow ALLOWs from rule 100 (the sandbox CIDR itself, ingress sources on their ports, egress
    destinations and fallback paths on their ports, S3 on 443 when granted, and ephemeral return ports 1024-65535 in
    the opposite direction). Everything else meets the implicit deny.
  - When C(s3_read) or C(s3_write) is declared, an S3 gateway endpoint on the route table whose policy allows only
    reading the C(s3_read) grants and writing (C(s3:PutObject)) the C(s3_write) grants; never C(*) actions or
    resources. Without S3 grants no endpoint is created, so the sandbox has no path to S3 at all.
  - With O(flow_logs), VPC flow logs (traffic type ALL) into the drill's own log group
    C(/drguard/<drill_id>/flow-logs) (7-day retention), delivered through the IAM role C(drguard-<drill_id>-flowlogs)
    that only the flow-logs service can assume and that may only write to that log group.
    Because IAM is eventually consistent, while a new role is not yet assumable (C(Unable to assume given IAM role))
    CreateFlowLogs is retried for up to 60 s.
  - Every resource carries the drguard tags (C(drguard:managed), C(drguard:drill-id), C(drguard:expires-at)) and a
    C(Name); EC2 resources are tagged in the call that creates them, so teardown (M(drguard.sandbox.sweep)) finds
    everything even after a failure half-way.
  - Idempotent. Resources are found by the drill's tags and names; a second run changes nothing. In check mode
    nothing is created or changed and RV(actions) lists what a real run would do.
  - Bad input (drill id, expiry, boundary) fails before any AWS call.
author:
  - drguard maintainers (!UNKNOWN)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows what the run changes (or would change, in check mode), before and after - the rules of each
        security group it converges (by group name, including the stripped default group), the network ACL
        entries when it converges them, and the S3 endpoint policy when it creates, changes or deletes it.
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill's id (4-40 lowercase letters, digits and hyphens); names and tags every resource.
    type: str
    required: true
  boundary:
    description:
      - The drill's boundary policy (C(drill_boundary)) - C(sandbox_cidr), C(production_cidrs), C(ingress),
        C(egress) (with C(kind)), C(fallback), C(control_plane_route), C(tiers), C(tier_rules), C(s3_read),
        C(s3_write). Unknown keys are errors.
    type: dict
    required: true
  expires_at:
    description:
      - Value of the C(drguard:expires-at) tag, RFC 3339 with a time zone (for example V(2026-11-29T08:40:00Z)).
    type: str
    required: true
  flow_logs:
    description:
      - Capture the VPC's flow logs (ALL traffic) into the drill's own log group.
    type: bool
    default: true
  state:
    description:
      - Only V(present). Deletion is teardown's job (M(drguard.sandbox.sweep) with the drill id).
    type: str
    default: present
    choices: [present]
notes:
  - Needs ec2 describe/create/modify/authorize/revoke permissions for VPCs, subnets, route tables, security groups,
    network ACLs, VPC endpoints and flow logs; logs:CreateLogGroup/TagLogGroup/PutRetentionPolicy; and
    iam:CreateRole/GetRole/PutRolePolicy/TagRole/PassRole on C(drguard-*-flowlogs).
  - A failure after something was created fails the task and lists what was created in RV(created); everything is
    tagged with the drill id, so the drill's teardown removes it.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Build the drill's sandbox network
  drguard.sandbox.sandbox_network:
    drill_id: dr-20261129044000-a1b2c3
    expires_at: "2026-11-29T08:40:00Z"
    boundary:
      production_cidrs: [10.0.0.0/16, 10.1.0.0/16]
      ingress:
        - {cidr: 192.0.2.0/28, protocol: tcp, ports: [22], description: control plane}
      egress:
        - {cidr: 198.51.100.0/28, protocol: tcp, ports: [443], description: telemetry}
      tiers: [app, db]
      tier_rules:
        - {from: app, to: db, protocol: tcp, ports: [5432]}
      s3_read: [{bucket: backups, prefix: orders/}]
  register: net

- name: What would be built (nothing is created)
  drguard.sandbox.sandbox_network:
    drill_id: dr-20261129044000-a1b2c3
    expires_at: "2026-11-29T08:40:00Z"
    boundary: "{{ drill_boundary }}"
  check_mode: true
  register: plan
"""

RETURN = r"""
vpc_id:
  description: The sandbox VPC (null in check mode when it does not exist yet).
  returned: always
  type: str
  sample: vpc-0a1b2c3d4e5f60718
sandbox_cidr:
  description: The VPC's CIDR (declared or picked).
  returned: always
  type: str
  sample: 10.213.0.0/16
subnet_ids:
  description: The two private subnets, in availability-zone order.
  returned: always
  type: list
  elements: str
  sample: [subnet-0a1b2c3d, subnet-0e1f2a3b]
route_table_id:
  description: The route table associated with both subnets.
  returned: always
  type: str
  sample: rtb-0a1b2c3d
security_groups:
  description: Security group id per tier.
  returned: always
  type: dict
  sample: {app: sg-0a1b2c3d, db: sg-0e1f2a3b}
default_security_group_id:
  description: The VPC's default security group (stripped of every rule).
  returned: always
  type: str
  sample: sg-0c1d2e3f
network_acl_id:
  description: The network ACL associated with both subnets.
  returned: always
  type: str
  sample: acl-0a1b2c3d
s3_endpoint_id:
  description: The S3 gateway endpoint; null when the boundary declares no S3 grant.
  returned: always
  type: str
  sample: vpce-0a1b2c3d
flow_log_id:
  description: The VPC flow log; null when O(flow_logs=false).
  returned: always
  type: str
  sample: fl-0a1b2c3d
log_group_name:
  description: The drill's flow-log log group; null when O(flow_logs=false).
  returned: always
  type: str
  sample: /drguard/dr-20261129044000-a1b2c3/flow-logs
flow_logs_role_name:
  description: The IAM role that delivers the flow logs; null when O(flow_logs=false).
  returned: always
  type: str
  sample: drguard-dr-20261129044000-a1b2c3-flowlogs
resources:
  description: Every resource of the network, with the resource types M(drguard.sandbox.sweep) uses.
  returned: always
  type: list
  elements: dict
  contains:
    type:
      description: Resource type, one of V(vpc), V(subnet), V(route_table), V(security_group), V(network_acl),
        V(vpc_endpoint), V(flow_log), V(log_group), V(iam_role).
      type: str
    id:
      description: Resource id (the name for log groups and IAM roles).
      type: str
  sample: [{type: vpc, id: vpc-0a1b2c3d4e5f60718}, {type: subnet, id: subnet-0a1b2c3d}]
actions:
  description: What this run changed (in check mode, what a real run would change). Empty when nothing changed.
  returned: always
  type: list
  elements: str
  sample: ["create vpc drguard-dr-20261129044000-a1b2c3-vpc (10.213.0.0/16)"]
created:
  description: Resources this run created (also on failure, so that teardown can be checked against it).
  returned: always
  type: list
  elements: dict
  sample: [{type: vpc, id: vpc-0a1b2c3d4e5f60718}]
diff:
  description:
    - What this run changed (in check mode, would change), before and after; V({}) on both sides when nothing did.
    - Keys present only for what changed - C(security_groups) (group name -> C(ingress)/C(egress) rule lines),
      C(network_acl) (ACL name -> entry lines in rule order), C(s3_endpoint_policy) (the policy document, V({})
      where there is no endpoint).
  returned: diff mode
  type: dict
  contains:
    before:
      description: The state as it was.
      type: dict
    after:
      description: The state as it is now (or would be, in check mode).
      type: dict
  sample:
    before: {security_groups: {drguard-dr-1-app: {ingress: [], egress: ["all traffic to 0.0.0.0/0"]}}}
    after: {security_groups: {drguard-dr-1-app: {ingress: [], egress: ["tcp 443 to 198.51.100.0/28"]}}}
"""

try:
    import botocore.config
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    BotoCoreError = ClientError = Exception  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build
from ansible_collections.drguard.sandbox.plugins.module_utils import _quotas
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    expires_at=dict(type="str", required=True),
    flow_logs=dict(type="bool", default=True),
    state=dict(type="str", default="present", choices=["present"]),
)


def _validate(params: dict, region: str | None) -> tuple:
    """Everything that can be wrong with the input, checked before any AWS call (raises BuildError)."""
    try:
        drill_id = validate_drill_id(params["drill_id"])
    except DrillError as exc:
        raise _network_build.BuildError("%s." % exc) from None
    try:
        expires = format_time(parse_time(params["expires_at"]))
    except DrillError as exc:
        raise _network_build.BuildError(
            "expires_at is not valid: %s (for example 2026-11-29T08:40:00Z)." % exc) from None
    try:
        boundary = parse_boundary(params["boundary"])
    except BoundaryError as exc:
        raise _network_build.BuildError("the boundary is not valid: %s." % exc) from None
    try:
        # AWS quotas the emulator does not enforce (the S3 prefix list's CIDRs are counted again
        # once read, still before anything is created).
        _network_build.check_network_quotas(boundary, (), drill_id, drill_tags(drill_id, expires))
    except _quotas.QuotaError as exc:
        raise _network_build.BuildError("%s." % exc) from None
    if not region:
        raise _network_build.BuildError("no AWS region is set; give region (or module_defaults / AWS_REGION).")
    return drill_id, expires, boundary


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        drill_id, expires, boundary = _validate(module.params, module.region)
    except _network_build.BuildError as exc:
        module.fail_json(msg=str(exc))
    config = botocore.config.Config(max_pool_connections=_network_build.WORKERS * 2)
    clients = {s: aws_client(module, s, config=config) for s in ("ec2", "logs", "iam")}
    builder = _network_build.NetworkBuilder(
        clients, module.region, drill_id, boundary, drill_tags(drill_id, expires),
        flow_logs=module.params["flow_logs"], check_mode=module.check_mode, diff=module._diff)
    try:
        result = builder.build()
    except (_network_build.BuildError, BoundaryError, ClientError, BotoCoreError) as exc:
        created = list(builder.created)
        hint = (" %d resource(s) created by this run are tagged drguard:drill-id=%s; tear them down with "
                "drguard.sandbox.sweep (drill_id: %s)." % (len(created), drill_id, drill_id)) if created else ""
        module.fail_json(
            msg="building the sandbox network of drill %s failed at the %s step: %s.%s"
                % (drill_id, builder.step, describe_error(exc).rstrip("."), hint),
            step=builder.step, created=created, actions=list(builder.actions))
    result["created"] = list(builder.created)
    module.exit_json(changed=bool(result["actions"]), **result)


if __name__ == "__main__":
    main()
