#!/usr/bin/python
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sweep
short_description: Delete every resource of a drill (or every expired drill resource) and prove none remain
version_added: 0.1.0
description:
  - Guaranteed teardown. Finds resources through each service's own describe/list calls by the drguard tags
    (C(drguard:drill-id), C(drguard:managed), C(drguard:expires-at)); the resource-groups tagging API is not used
    because it misses network ACLs, transit gateway attachments, VPC endpoints and IAM roles.
  - With O(drill_id), considers every resource whose C(drguard:drill-id) tag equals it. With O(expired=true), considers
    every resource tagged C(drguard:managed=true) whose C(drguard:expires-at) is not known to be later than O(as_of).
  - Nothing is deleted because a listing or a file names it. Right before deleting, each resource is read again through
    its own describe/get call and must prove that it is the drill's, or it is refused (RV(refused)) and left alone.
    The proof is the full tag set (C(drguard:managed=true), a valid C(drguard:drill-id) - O(drill_id) in teardown -
    and an RFC 3339 C(drguard:expires-at), at or before O(as_of) for the reaper) and the drill's naming convention
    (EC2 C(Name) tag C(drguard-<drill id>) or C(drguard-<drill id>-...) and, for anything in a VPC, a VPC that is
    itself the drill's; IAM path C(/drguard/) and name C(drguard-<drill id>...); log group C(/drguard/<drill id>...);
    secret C(drguard/<drill id>/...); a KMS alias C(alias/drguard/<drill id>) or key description
    starting with C(drguard drill <drill id>:); bucket and topic names
    C(drguard-<drill id>...)). A resource with only C(drguard:managed=true), or a missing or malformed expiry, is
    refused, not deleted.
  - A refused resource that carries the swept drill's id (teardown), or a complete tag set whose expiry has passed
    (reaper), also counts in RV(remaining), so the sweep cannot claim that nothing remains.
  - Covers EC2 instances, NAT gateways, elastic IPs, VPC endpoints, flow logs, VPC peering connections, transit
    gateway VPC attachments, VPN gateways, internet gateways, network interfaces, subnets, route tables, network ACLs,
    security groups and VPCs; CloudWatch Logs log groups; IAM roles (inline policies deleted, managed policies
    detached, the role removed from its instance profiles), instance profiles and customer-managed policies;
    Secrets Manager secrets (deleted without recovery); KMS keys
    (aliases deleted, deletion scheduled with the minimum 7-day window; a key pending deletion counts as gone);
    S3 buckets (every object version and delete marker first); SNS topics.
  - Deletes in dependency order, in parallel within each step (services other than EC2 alongside), retrying
    dependency errors with backoff until O(timeout). Then discovers again; whatever is still there is returned in
    RV(remaining), and the task fails when anything remains (O(fail_on_remaining)). Deleting what no longer exists
    is not an error.
  - An S3 object under Object Lock retention or legal hold is never bypassed; its bucket stays in RV(remaining)
    with the reason.
  - In check mode, nothing is deleted and RV(found) lists what a real run would delete.
author:
  - drguard maintainers (!UNKNOWN)
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
      - Delete every resource whose C(drguard:drill-id) tag equals this drill id.
      - Exactly one of O(drill_id), O(drill_ids) and O(expired) is required.
    type: str
  drill_ids:
    description:
      - Delete every resource whose C(drguard:drill-id) tag is one of these drill ids, in one pass (the drills of a
        run with many drill hosts; the reaper after such a run). The proof is the same as with O(drill_id), for the
        resource's own drill.
      - Exactly one of O(drill_id), O(drill_ids) and O(expired) is required.
    type: list
    elements: str
  expired:
    description:
      - When V(true), delete every managed resource whose C(drguard:expires-at) is at or before O(as_of) (the reaper).
      - Exactly one of O(drill_id), O(drill_ids) and O(expired) is required.
    type: bool
  as_of:
    description:
      - The reaper's notion of now, RFC 3339 with a time zone (for example V(2026-11-29T05:00:00Z)).
      - Defaults to the current time. Only used with O(expired=true).
    type: str
  timeout:
    description:
      - Seconds the whole teardown may take; dependency errors are retried until then.
    type: int
    default: 300
  fail_on_remaining:
    description:
      - Fail the task when anything remains after deletion, or when a service could not be listed (the result could
        not prove that nothing remains).
    type: bool
    default: true
notes:
  - IAM is global, so O(expired=true) also reaps expired drill roles and policies created from other regions.
  - Needs describe/list, tag-read and delete permissions on every covered service.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Tear down one drill
  drguard.sandbox.sweep:
    drill_id: dr-20261129044000-a1b2c3
  register: teardown_result

- name: Reap every expired drill resource (dry run first)
  drguard.sandbox.sweep:
    expired: true
  check_mode: true
  register: would_reap

- name: Reap as if it were a given time, reporting instead of failing
  drguard.sandbox.sweep:
    expired: true
    as_of: "2026-11-30T00:00:00Z"
    timeout: 600
    fail_on_remaining: false
"""

RETURN = r"""
found:
  description: Resources that proved they are the drill's (in check mode, what a real run would delete).
  returned: always
  type: list
  elements: dict
  contains:
    type: {description: "Resource type (for example V(vpc), V(iam_role), V(s3_bucket))", type: str}
    id: {description: Resource id as its service names it., type: str}
    drill_id: {description: "Its C(drguard:drill-id) tag, if any.", type: str}
    expires_at: {description: "Its C(drguard:expires-at) tag, if any.", type: str}
  sample: [{type: vpc, id: vpc-0a1b2c3d, drill_id: dr-20261129044000-a1b2c3, expires_at: "2026-11-29T08:40:00Z"}]
deleted:
  description: Resources found and gone after the sweep. Empty in check mode.
  returned: always
  type: list
  elements: dict
  sample: [{type: subnet, id: subnet-0a1b2c3d, drill_id: dr-20261129044000-a1b2c3, expires_at: "2026-11-29T08:40:00Z"}]
remaining:
  description:
    - Selected resources still there after the sweep, each with a C(reason). Empty in check mode.
    - Includes refused resources that carry the swept drill's id (teardown) or a complete, expired tag set (reaper);
      their C(reason) starts with C(refused:).
  returned: always
  type: list
  elements: dict
  sample:
    - type: s3_bucket
      id: dr-20261129044000-a1b2c3-telemetry
      drill_id: dr-20261129044000-a1b2c3
      expires_at: "2026-11-29T08:40:00Z"
      reason: "1 object version(s) are under Object Lock retention, ..."
refused:
  description:
    - Resources the sweep considered but did not delete because they do not prove they are the drill's, each with a
      C(reason) (for example V(IAM path '/' is not /drguard/) or V(tag drguard:drill-id is missing)).
  returned: always
  type: list
  elements: dict
  sample:
    - type: iam_role
      id: drguard-dr-20261129044000-a1b2c3-admin
      drill_id: dr-20261129044000-a1b2c3
      expires_at: "2026-11-29T08:40:00Z"
      reason: "IAM path '/' is not /drguard/"
errors:
  description:
    - Deletions that failed and services that could not be listed (C(id) is V(*) then).
  returned: always
  type: list
  elements: dict
  sample: [{type: security_group, id: sg-0a1b2c3d, error: "DependencyViolation: resource has a dependent object"}]
counts:
  description: Number of resources found, deleted, remaining and refused.
  returned: always
  type: dict
  sample: {found: 12, deleted: 12, remaining: 0, refused: 0}
as_of:
  description: The time expiry was judged against (RFC 3339 UTC).
  returned: always
  type: str
  sample: "2026-11-29T05:00:00Z"
seconds:
  description: Wall-clock seconds the sweep took.
  returned: always
  type: float
  sample: 12.4
"""

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _sweep
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str"),
    drill_ids=dict(type="list", elements="str"),
    expired=dict(type="bool"),
    as_of=dict(type="str"),
    timeout=dict(type="int", default=300),
    fail_on_remaining=dict(type="bool", default=True),
)


def main():
    module = AnsibleAWSModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=[("drill_id", "drill_ids", "expired")],
        required_one_of=[("drill_id", "drill_ids", "expired")],
        supports_check_mode=True,
    )
    params = module.params
    try:
        result, failure = _sweep.run(lambda service, config: aws_client(module, service, config=config),
                                     drill_id=params["drill_id"], drill_ids=params["drill_ids"],
                                     expired=params["expired"], as_of=params["as_of"],
                                     timeout=params["timeout"], check_mode=module.check_mode,
                                     fail_on_remaining=params["fail_on_remaining"])
    except _sweep.SweepError as exc:
        module.fail_json(msg=str(exc))
    except (BotoCoreError, ClientError) as exc:  # per-resource errors are results; this is anything else
        module.fail_json_aws(exc, msg="The sweep stopped before it could prove that nothing remains; fix the "
                                      "cause and run it again.")
    if failure:
        module.fail_json(msg=failure, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
