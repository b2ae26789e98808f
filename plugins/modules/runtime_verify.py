#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_verify
short_description: Prove from the live kernel state that a drill's netns runtime is isolated as the boundary declares
version_added: 0.1.0
description:
  - Reads the B(live) state of a drill's C(netns) sandbox runtime back from the kernel, everything under the drill's
    prefix C(drg-<short>-) - namespaces, links, IPv4 addresses, routes and forwarding of every namespace, the nft
    ruleset of the router namespace, the nft ruleset, IPv6 settings and processes (uid, capabilities,
    no_new_privs) of every tier namespace, and host links carrying the prefix - and compares it with the
    declared boundary policy (C(drill_boundary)). It never relies on what the builder meant to create.
  - The router's ruleset is judged by meaning (what each rule can let through), as described in
    C(docs/runtime.md) ("Verifying the live rules").
  - Fails closed. A namespace, ruleset or setting that cannot be read is a C(runtime_unreadable) finding,
    never a pass.
  - Read-only. C(changed) is always false and check mode behaves exactly like a normal run.
  - Needs root (it enters the drill's namespaces) and C(ip) and C(nft) on C(PATH).
  - "Finding codes (each explained with its remedy in C(docs/runtime.md), \"Verifying the live runtime\"):
    C(runtime_unreadable), C(runtime_table_missing), C(runtime_table_unexpected), C(runtime_chain_missing),
    C(runtime_chain_unexpected), C(runtime_policy_not_drop), C(runtime_production_not_dropped_first),
    C(runtime_ipv6_not_dropped), C(runtime_dns_not_dropped), C(runtime_rule_undeclared),
    C(runtime_rule_unsupported), C(runtime_rule_missing), C(runtime_counter_missing),
    C(runtime_namespace_missing), C(runtime_namespace_unexpected), C(runtime_link_missing),
    C(runtime_link_unexpected), C(runtime_address_mismatch), C(runtime_route_missing),
    C(runtime_route_unexpected), C(runtime_tier_forwarding), C(runtime_tier_ruleset), C(runtime_ipv6_enabled),
    C(runtime_host_link), C(runtime_tier_process_privileged)."
  - "With O(backend=ec2) it reads the drill's live instances, their instance profile and role back through the
    EC2 and IAM APIs (amazon.aws' connection options, every call retried) instead: one running instance per tier
    in a sandbox subnet of the drill's VPC, one interface, no public address, IMDSv2 required with hop limit 1, the
    tier's security group only, the drill's instance profile holding the runtime's role (trusts
    C(ec2.amazonaws.com) only, its one least-privilege policy), the drill's tags. Codes C(runtime_unreadable),
    C(runtime_instance_missing), C(runtime_instance_unexpected), C(runtime_instance_not_running),
    C(runtime_instance_public_address), C(runtime_instance_imds), C(runtime_instance_subnet),
    C(runtime_instance_security_group), C(runtime_instance_profile), C(runtime_instance_tags),
    C(runtime_instance_role) (C(docs/runtime.md), \"The ec2 backend\")."
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill whose runtime is verified; its namespaces are named C(drg-<short>-...) after it.
    type: str
    required: true
  boundary:
    description:
      - The declared boundary policy (C(drill_boundary)); see C(docs/boundary-policy.md). An invalid policy
        fails the task before anything is read.
    type: dict
    required: true
  backend:
    description:
      - The runtime's backend. V(netns) reads namespaces and nft rulesets on this host; V(ec2) reads the drill's
        instances through the AWS API.
    type: str
    default: netns
    choices: [netns, ec2]
  world:
    description:
      - Whether the embedded world (the C(wan) namespace and the production, control-plane, telemetry and
        fallback neighbours, see C(docs/runtime.md)) belongs to the runtime. When true its namespaces, links and
        addresses are expected and the router's default route goes through the uplink; when false they are
        unexpected.
    type: bool
    default: true
  fail_on_findings:
    description:
      - Fail the task when the runtime is not isolated. The failure result still carries C(isolated),
        C(findings) and C(checked).
      - When false, the task succeeds and the caller decides from C(isolated).
    type: bool
    default: true
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: drguard.sandbox.runtime_probe
  - module: drguard.sandbox.boundary_verify
"""

EXAMPLES = r"""
- name: Prove the runtime from the live kernel state
  drguard.sandbox.runtime_verify:
    drill_id: "{{ drill.drill_id }}"
    boundary: "{{ drill_boundary }}"
  register: runtime_proof

- name: Audit without failing the play
  drguard.sandbox.runtime_verify:
    drill_id: dr-20261130200000-a1b2c3
    boundary: "{{ drill_boundary }}"
    fail_on_findings: false
  register: audit
"""

RETURN = r"""
isolated:
  description: True only when no finding was made (everything was readable and matched the boundary).
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
      description: The finding code (closed vocabulary, see C(docs/runtime.md)).
      type: str
      sample: runtime_rule_undeclared
    resource:
      description: The namespace, link, route, table, chain or rule the finding is about.
      type: str
      sample: inet drg-ab12cd-router chain forward rule 4
    detail:
      description: One sentence saying what was found and what to do.
      type: str
      sample: "an accept (from 10.213.0.0/28 to 10.0.0.1 proto tcp dport 5432) allows traffic no declared egress,
        ingress, tier rule or fallback path allows; remove it"
checked:
  description: How many of each kind were read.
  returned: always
  type: dict
  sample: {"namespaces": 9, "links": 14, "routes": 12, "router_rules": 31, "tier_rulesets": 3, "tier_processes": 3}
prefix:
  description: The drill's prefix; everything read carries it.
  returned: always
  type: str
  sample: drg-ab12cd-
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import NftPolicyError
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import address_plan
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_verify import verify
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    backend=dict(type="str", default="netns", choices=["netns", "ec2"]),
    world=dict(type="bool", default=True),
    fail_on_findings=dict(type="bool", default=True),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    _aws.hide_session_credentials(module)
    p = module.params
    result = verify_ec2(module) if p["backend"] == "ec2" else verify_netns(module)
    if not result["isolated"] and p["fail_on_findings"]:
        codes = sorted({f["code"] for f in result["findings"]})
        module.fail_json(msg="the runtime of drill %s is not isolated: %d finding(s) (%s); fix each one (see findings "
                             "and docs/runtime.md) or set fail_on_findings=false to only report"
                             % (p["drill_id"], len(result["findings"]), ", ".join(codes)), **result)
    module.exit_json(**result)


def verify_ec2(module):
    """The ec2 runtime read back through the AWS API (read-only)."""
    p = module.params
    try:
        drill_id = validate_drill_id(p["drill_id"])
        boundary = parse_boundary(p["boundary"])
    except (BoundaryError, DrillError, ValueError) as exc:
        module.fail_json(msg="runtime_verify: %s." % str(exc).rstrip("."))
    try:
        result = _runtime_ec2.verify({"ec2": _aws.aws_client(module, "ec2"), "iam": _aws.aws_client(module, "iam")},
                                     drill_id, boundary)
    except _aws.ClientError as exc:
        module.fail_json_aws(exc, msg="runtime_verify: reading the ec2 runtime of drill %s failed" % drill_id)
    result.update(changed=False, prefix=_runtime_ec2.instance_name(drill_id, ""))
    return result


def verify_netns(module):
    """The netns runtime read back from the kernel."""
    p = module.params
    try:
        boundary = parse_boundary(p["boundary"])
        plan = _runtime.full_plan(boundary, p["drill_id"]) if p["world"] else address_plan(boundary, p["drill_id"])
    except (BoundaryError, NftPolicyError, _runtime.SandboxRuntimeError, ValueError) as exc:
        module.fail_json(msg="boundary is invalid for the netns runtime: %s" % exc)

    result = verify(boundary, plan, world=p["world"])
    result.update(changed=False, prefix=plan["prefix"])
    return result


if __name__ == "__main__":
    main()
