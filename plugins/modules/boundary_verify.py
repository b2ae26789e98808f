#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: boundary_verify
short_description: Prove from the live configuration that a VPC is isolated as the boundary policy declares
version_added: 0.1.0
description:
  - Reads the B(live) network configuration of a VPC (VPC CIDRs, DHCP options, every route table including the
    main one and the prefix lists its routes send to, internet, egress-only, carrier, NAT, virtual private and
    transit gateways, peering connections, subnets, security groups including the default one, network ACLs,
    network interfaces, traffic mirror sessions and targets, VPC endpoints, endpoint services offered from its
    load balancers, Route 53 Resolver rules, endpoints and query logging and private hosted zones of the VPC,
    the VPC Lattice service networks it joins, and flow logs) and compares it with the declared
    boundary policy (C(drill_boundary)). It never relies on what a builder meant to create, so it can be
    pointed at any VPC.
  - A network interface of another service in the VPC (requester-managed, such as a Client VPN target network
    association's, a Lambda function's or a load balancer's) is C(eni_foreign_service), because it can carry
    traffic into or out of the sandbox.
  - Interface endpoints are C(endpoint_unsupported), except the ssm, ssmmessages, ec2messages and secretsmanager ones
    (private DNS on) when the boundary declares C(ssm_endpoints) for the ec2 runtime (C(docs/runtime.md)); the
    secretsmanager one only with a policy that grants reading drill runtime secrets and nothing else.
  - Fails closed. An unknown route target, an unsupported endpoint, a configuration it cannot prove safe,
    or any describe call that fails (for example C(AccessDenied)) is a finding, never a pass.
  - Read-only. C(changed) is always false and check mode behaves exactly like a normal run.
  - Describe calls are filtered by VPC id where AWS offers a filter (otherwise read account-wide and tied to the
    VPC by attachment, network interface or load balancer), paginated, and run in parallel (about 27 API calls).
  - C(docs/boundary-policy.md) lists every VPC attribute that can move traffic, change name resolution or expose
    the sandbox, with the call that reads it and its finding code, or why it is not read.
  - "Finding codes (each explained with its remedy in C(docs/boundary-policy.md)):
    C(vpc_not_found), C(unreadable), C(vpc_overlaps_production), C(vpc_cidr_undeclared), C(ipv6_present),
    C(route_igw), C(route_nat), C(route_peering), C(route_tgw), C(route_vgw), C(route_egress_only_igw),
    C(route_unknown_target), C(route_to_production), C(igw_attached), C(nat_gateway_present),
    C(vgw_attached), C(peering_active), C(tgw_attachment), C(subnet_public_ip), C(subnet_ipv6_autoassign),
    C(default_sg_has_rules), C(sg_egress_open), C(sg_ingress_open), C(sg_egress_undeclared),
    C(sg_ingress_undeclared), C(nacl_missing_production_deny), C(nacl_allow_any), C(nacl_allow_undeclared),
    C(subnet_default_nacl), C(endpoint_policy_open), C(endpoint_policy_undeclared), C(endpoint_unsupported),
    C(flow_logs_missing), C(dhcp_options_dns), C(dhcp_options_unsupported), C(egress_only_igw_attached),
    C(carrier_gateway_present), C(eni_public_ip), C(eni_source_dest_check_off), C(eni_foreign_service),
    C(traffic_mirror_session), C(traffic_mirror_target), C(endpoint_service_offered),
    C(load_balancer_internet_facing),
    C(resolver_rule_associated), C(resolver_endpoint_present), C(resolver_query_logging),
    C(private_hosted_zone_associated), C(lattice_service_network_associated), C(fallback_blocked),
    C(tier_group_missing), C(tier_rule_missing), C(tier_rule_extra)."
  - A declared fallback path (C(drill_boundary.fallback), a DR site or secondary region) counts as declared
    egress, and must be allowed. Every workload security group must allow it out on its ports and every
    network ACL in use must let it out and its replies back in, else C(fallback_blocked).
  - "In a drill's VPC (its C(drguard:drill-id) tag, or the one drill id its security groups carry) each tier of
    C(drill_boundary.tiers), plus C(validation) when C(ssm_endpoints) is declared, must have its group
    C(drguard-<drill id>-<tier>) (else C(tier_group_missing)), and the references between tier groups must be
    exactly what C(tier_rules) declares, both ways (ingress on the destination's group from the source's, egress
    on the source's to the destination's), compared as port sets per protocol: C(tier_rule_missing) for declared
    ports a group does not allow, C(tier_rule_extra) for a reference, port or protocol no tier rule declares (a
    reverse or self reference included) and for a CIDR rule inside the VPC on a tier's group. A tier's group may
    reference no other group but the SSM endpoints' one on tcp 443 out (else C(sg_ingress_undeclared) /
    C(sg_egress_undeclared)); any other group is judged as before."
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  vpc_id:
    description:
      - The VPC to verify (C(vpc-...)).
    type: str
    required: true
  boundary:
    description:
      - The declared boundary policy (C(drill_boundary)); see C(plugins/module_utils/boundary.py) and
        C(docs/boundary-policy.md) for the schema. An invalid policy fails the task before any AWS call.
    type: dict
    required: true
  require_flow_logs:
    description:
      - Require an C(ACTIVE) VPC flow log of C(ALL) traffic; without one, C(flow_logs_missing) is reported.
    type: bool
    default: true
  fail_on_findings:
    description:
      - Fail the task when the VPC is not isolated. The failure result still carries C(isolated),
        C(findings) and C(checked).
      - When false, the task succeeds and the caller decides from C(isolated).
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
notes:
  - "IAM permissions needed: ec2:DescribeVpcs, ec2:DescribeRouteTables, ec2:DescribeInternetGateways,
    ec2:DescribeNatGateways, ec2:DescribeVpnGateways, ec2:DescribeVpcPeeringConnections,
    ec2:DescribeTransitGatewayVpcAttachments, ec2:DescribeSubnets, ec2:DescribeSecurityGroups,
    ec2:DescribeNetworkAcls, ec2:DescribeVpcEndpoints, ec2:DescribePrefixLists,
    ec2:DescribeEgressOnlyInternetGateways, ec2:DescribeCarrierGateways, ec2:DescribeNetworkInterfaces,
    ec2:DescribeTrafficMirrorSessions, ec2:DescribeTrafficMirrorTargets,
    ec2:DescribeVpcEndpointServiceConfigurations, elasticloadbalancing:DescribeLoadBalancers,
    ec2:DescribeDhcpOptions, ec2:GetManagedPrefixListEntries, route53resolver:ListResolverRuleAssociations,
    route53resolver:ListResolverEndpoints, route53resolver:ListResolverQueryLogConfigAssociations,
    route53:ListHostedZonesByVPC, vpc-lattice:ListServiceNetworkVpcAssociations and (with I(require_flow_logs))
    ec2:DescribeFlowLogs. Each missing permission shows up as an C(unreadable) finding."
"""

EXAMPLES = r"""
- name: Prove the sandbox boundary from the live configuration
  drguard.sandbox.boundary_verify:
    vpc_id: "{{ sandbox_network.vpc_id }}"
    boundary: "{{ drill_boundary }}"
  register: boundary_proof

- name: Audit any VPC without failing the play, then decide
  drguard.sandbox.boundary_verify:
    vpc_id: vpc-0123456789abcdef0
    boundary:
      production_cidrs: [10.0.0.0/16]
    require_flow_logs: false
    fail_on_findings: false
  register: audit

- name: Show what leaks
  ansible.builtin.debug:
    msg: "{{ audit.findings | map(attribute='code') | list }}"
  when: not audit.isolated
"""

RETURN = r"""
isolated:
  description: True only when no finding was made (every check passed and every resource was readable).
  returned: always, also in the failure result of I(fail_on_findings)
  type: bool
  sample: false
findings:
  description: One entry per problem, sorted by code and resource.
  returned: always, also in the failure result of I(fail_on_findings)
  type: list
  elements: dict
  contains:
    code:
      description: The finding code (closed vocabulary, see C(docs/boundary-policy.md)).
      type: str
      sample: route_igw
    resource:
      description: The AWS resource the finding is about (or the failed API operation for C(unreadable)).
      type: str
      sample: rtb-0123456789abcdef0
    detail:
      description: One human sentence saying what was found.
      type: str
      sample: "rtb-0123456789abcdef0 (main): route to 0.0.0.0/0 via GatewayId igw-0123456789abcdef0"
checked:
  description:
    - How many resources of each type were examined. A type whose describe call failed is absent
      (and reported as C(unreadable)).
  returned: always
  type: dict
  sample: {"vpcs": 1, "route_tables": 2, "routes": 3, "subnets": 2, "security_groups": 3,
           "security_group_rules": 6, "network_acls": 2, "network_acl_entries": 14, "vpc_endpoints": 1,
           "internet_gateways": 0, "nat_gateways": 0, "vpn_gateways": 0, "peering_connections": 0,
           "transit_gateway_attachments": 0, "flow_logs": 1}
vpc_id:
  description: The VPC that was verified.
  returned: always
  type: str
  sample: vpc-0123456789abcdef0
vpc_cidrs:
  description: The IPv4 CIDR blocks associated with the VPC, as read live.
  returned: always
  type: list
  elements: str
  sample: ["10.213.0.0/16"]
"""

import re

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._boundary_live import evaluate
from ansible_collections.drguard.sandbox.plugins.module_utils._boundary_live import read_vpc
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

ARGUMENT_SPEC = dict(
    vpc_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    require_flow_logs=dict(type="bool", default=True),
    fail_on_findings=dict(type="bool", default=True),
)

VPC_ID_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    vpc_id = (p["vpc_id"] or "").strip()
    if not VPC_ID_RE.match(vpc_id):
        module.fail_json(msg="vpc_id %r is not a VPC id; pass the id of an existing VPC such as "
                             "vpc-0123456789abcdef0" % (p["vpc_id"],))
    try:
        boundary = parse_boundary(p["boundary"])
    except BoundaryError as exc:
        module.fail_json(msg="boundary is invalid: %s" % exc)

    snapshot = read_vpc(aws_client(module, "ec2"), vpc_id, p["require_flow_logs"], elbv2=aws_client(module, "elbv2"),
                        route53resolver=aws_client(module, "route53resolver"), route53=aws_client(module, "route53"),
                        lattice=aws_client(module, "vpc-lattice"))
    result = evaluate(boundary, vpc_id, snapshot, p["require_flow_logs"])
    result.update(changed=False, vpc_id=vpc_id)

    if not result["isolated"] and p["fail_on_findings"]:
        codes = sorted({f["code"] for f in result["findings"]})
        if codes == ["vpc_not_found"]:
            msg = ("VPC %s is not isolated: 1 finding(s) (vpc_not_found); no such VPC exists for these "
                   "credentials and region, check vpc_id and region" % vpc_id)
        else:
            msg = ("VPC %s is not isolated: %d finding(s) (%s); fix each one (see findings and "
                   "docs/boundary-policy.md) or set fail_on_findings=false to only report"
                   % (vpc_id, len(result["findings"]), ", ".join(codes)))
        module.fail_json(msg=msg, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
