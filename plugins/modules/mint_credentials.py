#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mint_credentials
short_description: Mint short-lived, least-privilege credentials for one drill, revoke them, delete them
version_added: 0.1.0
description:
  - C(state=present) creates (or brings into line) the drill's IAM role C(drguard-<drill_id>) under path
    C(/drguard/), with an inline policy C(drguard-drill) generated from the drill's own resources, a trust
    policy that allows only one principal with an C(sts:ExternalId) condition, and the drill's tags; then
    calls C(sts:AssumeRole) with a session policy, session tag C(drguard:drill-id), C(SourceIdentity) = the
    drill id and returns the temporary credentials.
  - Every policy statement, generated or user-supplied, is validated before anything is created. Rejected
    are Allow statements with C(NotAction)/C(NotResource), any action that could assume, pass or create an
    identity (C(sts:AssumeRole), C(iam:PassRole), C(iam:CreateUser), ...), and any write action (anything
    not Describe/Get/List/Head-like, including C(*), C(s3:*), C(s3:Put*)) or secret-returning read on
    C(*) or on a wildcard-only resource.
  - C(state=revoked) adds the inline policy C(drguard-revoke-sessions), which denies everything to sessions
    issued before now (what the console's "revoke active sessions" does). C(state=absent) deletes the role
    with all its policies.
  - The external id is kept in the role's trust policy, not in a tag. When O(external_id) is not given, an
    existing role's external id is reused and a new role gets a random one, so the trust policy is stable
    across runs.
  - Idempotence - C(changed) reports changes to AWS state (the role, its policies, tags, boundary). Minting
    a new session is not a change of AWS state, so a run that only mints reports C(changed=false). In check
    mode nothing is created and no credentials are minted.
  - "The result holds live credentials - run this module in a task with C(no_log: true)."
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the inline policy the state changes - C(drguard-drill) for C(present) and C(absent),
        C(drguard-revoke-sessions) for C(revoked) - before and after. The trust policy is left out (it holds
        the external id).
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill's id (4-40 lowercase letters, digits and hyphens).
    type: str
    required: true
  state:
    description:
      - C(present) creates the role and mints credentials, C(revoked) revokes every session issued so far,
        C(absent) deletes the role.
    type: str
    default: present
    choices: [present, revoked, absent]
  expires_at:
    description:
      - RFC 3339 UTC value of the C(drguard:expires-at) tag. Required with C(state=present).
    type: str
  duration_seconds:
    description:
      - Lifetime of the minted session, 900 to 3600 seconds.
    type: int
    default: 900
  permissions_boundary:
    description:
      - ARN of a managed policy to set as the role's permissions boundary.
    type: str
  trusted_principal_arn:
    description:
      - The one IAM user or role allowed to assume the drill role. Defaults to the caller
        (C(sts:GetCallerIdentity); an assumed-role session is resolved to its role).
      - Must exist in the caller's account; an account root or a wildcard is refused.
    type: str
  external_id:
    description:
      - The C(sts:ExternalId) the trust policy requires. Default - the existing role's, or a new random one.
    type: str
  resources:
    description:
      - The drill's own resources, from which the least-privilege inline policy is generated.
      - C(vpc_id), C(subnet_ids), C(security_group_ids) - grant EC2 Describe of the network (EC2 supports
        no resource-level permission for Describe, so that one statement has Resource C(*)).
      - C(backup) - list of C({bucket, prefix}) - read-only (GetObject*, ListBucket limited to the prefix).
      - C(telemetry) - list of C({bucket, prefix}) - C(s3:PutObject) under the prefix only.
      - C(secrets_prefix) - Secrets Manager name prefix - GetSecretValue and DescribeSecret.
      - C(kms_key_arns) - C(kms:Decrypt) only. C(log_group_arns) - C(logs:CreateLogStream) and
        C(logs:PutLogEvents) in those groups.
    type: dict
    default: {}
  extra_statements:
    description:
      - Additional identity-policy statements, validated by the same rules as the generated ones.
    type: list
    elements: dict
    default: []
  session_policy:
    description:
      - Session policy for C(sts:AssumeRole) (at most 2048 characters). Default - the role policy with
        every statement restricted to TLS and, for regional services, to the drill's region.
    type: dict
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Mint the drill's credentials
  drguard.sandbox.mint_credentials:
    drill_id: "{{ drill_ctx.drill_id }}"
    expires_at: "{{ drill_ctx.expires_at }}"
    duration_seconds: 1800
    resources:
      vpc_id: "{{ network.vpc_id }}"
      backup:
        - {bucket: orders-backups, prefix: orders-db/}
      telemetry:
        - {bucket: drill-telemetry, prefix: "{{ drill_ctx.drill_id }}/"}
      secrets_prefix: "drguard/{{ drill_ctx.drill_id }}/"
  register: identity_mint
  no_log: true

- name: Revoke every session of the drill (teardown, before sweeping)
  drguard.sandbox.mint_credentials:
    drill_id: "{{ drill_ctx.drill_id }}"
    state: revoked

- name: Delete the drill role
  drguard.sandbox.mint_credentials:
    drill_id: "{{ drill_ctx.drill_id }}"
    state: absent
"""

RETURN = r"""
credentials:
  description: The temporary credentials (never log them). Absent in check mode and for other states.
  returned: state=present and not check mode
  type: dict
  contains:
    access_key_id:
      description: Access key id.
      type: str
    secret_access_key:
      description: Secret access key.
      type: str
    session_token:
      description: Session token.
      type: str
expiration:
  description: RFC 3339 UTC expiry of the credentials.
  returned: state=present and not check mode
  type: str
  sample: "2026-11-29T05:15:00Z"
role_arn:
  description: ARN of the drill role.
  returned: always
  type: str
  sample: arn:aws:iam::123456789012:role/drguard/drguard-dr-20261129044000-a1b2c3
role_name:
  description: Name of the drill role.
  returned: always
  type: str
policy:
  description: The generated inline policy document (C(drguard-drill)).
  returned: state=present
  type: dict
session_policy:
  description: The session policy passed to C(sts:AssumeRole).
  returned: state=present
  type: dict
trusted_principal_arn:
  description: The one principal the trust policy allows.
  returned: state=present
  type: str
revoked_at:
  description: Sessions issued before this RFC 3339 UTC time are denied everything.
  returned: state=revoked and the role exists
  type: str
actions:
  description: What was done (or would be done in check mode), one line each.
  returned: always
  type: list
  elements: str
diff:
  description: The inline policy this state changes, before and after (V({}) where there is none).
  returned: diff mode
  type: dict
  contains:
    before:
      description: The policy as it was.
      type: dict
    after:
      description: The policy as it is now (or would be, in check mode).
      type: dict
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._minter import Minter
from ansible_collections.drguard.sandbox.plugins.module_utils._minter import MintError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "revoked", "absent"]),
    expires_at=dict(type="str"),
    duration_seconds=dict(type="int", default=900),
    permissions_boundary=dict(type="str"),
    trusted_principal_arn=dict(type="str"),
    external_id=dict(type="str", no_log=True),
    resources=dict(type="dict", default={}),
    extra_statements=dict(type="list", elements="dict", default=[]),
    session_policy=dict(type="dict"),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        validate_drill_id(p["drill_id"])
    except DrillError as exc:
        module.fail_json(msg=str(exc))
    try:
        minter = Minter(p["drill_id"], lambda service: aws_client(module, service), region=module.region,
                        check_mode=module.check_mode, diff=module._diff, hide=module.no_log_values.add)
        result = getattr(minter, p["state"])(p)
    except MintError as exc:
        if exc.exception is not None:
            module.fail_json_aws(exc.exception, msg=exc.message, **exc.kwargs)
        module.fail_json(msg=exc.message, **exc.kwargs)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Cannot manage IAM role drguard-%s" % p["drill_id"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
