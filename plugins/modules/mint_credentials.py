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
  - The result holds live credentials - run this module in a task with C(no_log: true).
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
  - drguard maintainers
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
"""

import json
import re
import secrets
from datetime import timedelta

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import tag_dict
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import tag_list
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
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

MAX_SESSION_DURATION = 3600  # IAM's minimum for MaxSessionDuration, and our maximum duration
_POLICY_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}|aws):policy/[\w+=,.@/-]+$")
# How long AssumeRole AccessDenied is retried: IAM is eventually consistent, so a role
# created or changed a moment ago may not be assumable yet.
PROPAGATION_WAIT_CHANGED = 45
PROPAGATION_WAIT_UNCHANGED = 10


def _canon(doc) -> str:
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            return doc

    def norm(value):
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            items = [norm(v) for v in value]
            return items[0] if len(items) == 1 else items
        return value
    return json.dumps(norm(doc), sort_keys=True)


class Minter:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.drill_id = self.p["drill_id"]
        self.name = ident.role_name(self.drill_id)
        self.iam = module.client("iam", retry_decorator=AWSRetry.jittered_backoff())
        self.actions = []
        self.changed = False

    def act(self, line: str) -> bool:
        """Record an action; True when it should really be performed (not check mode)."""
        self.actions.append(line)
        self.changed = True
        return not self.module.check_mode

    # ------------------------------------------------------------ role lookup
    def get_role(self):
        try:
            role = self.iam.get_role(RoleName=self.name)["Role"]
        except is_boto3_error_code("NoSuchEntity"):
            return None
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:  # pylint: disable=duplicate-except
            self.module.fail_json_aws(e, msg="Cannot read IAM role %s" % self.name)
        try:
            tags = tag_dict(self.iam.list_role_tags(RoleName=self.name).get("Tags"))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot read the tags of IAM role %s" % self.name)
        if role.get("Path") != ident.ROLE_PATH or tags.get(TAG_DRILL_ID) != self.drill_id:
            self.module.fail_json(
                msg="IAM role %s exists but is not this drill's (path %r, tag %s=%r); refusing to touch it - "
                    "use another drill id or remove that role" % (self.name, role.get("Path"), TAG_DRILL_ID,
                                                                tags.get(TAG_DRILL_ID)))
        role["_tags"] = tags
        return role

    # ------------------------------------------------------------ present
    def caller(self):
        sts = self.module.client("sts", retry_decorator=AWSRetry.jittered_backoff())
        try:
            me = sts.get_caller_identity()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot find out who is calling (sts:GetCallerIdentity); "
                                             "check the controller's AWS credentials")
        return me["Arn"], me["Account"], me["Arn"].split(":")[1]

    def resolve_principal(self, arn: str, account: str, authenticated: bool) -> str:
        """The IAM ARN of the one trusted principal; a given one must exist in the caller's account."""
        try:
            kind, value = ident.normalize_principal(arn)
        except ident.PolicyError as exc:
            self.module.fail_json(msg=str(exc))
        if kind == "user" and authenticated:
            return value  # the caller itself: STS has just authenticated it
        principal_account = arn.split(":")[4]
        if principal_account != account:
            self.module.fail_json(msg="trusted principal %s is in account %s, not in the drill's account %s; "
                                      "cross-account principals cannot be resolved, so they are refused"
                                      % (arn, principal_account, account))
        try:
            if kind == "user":
                return self.iam.get_user(UserName=value.rsplit("/", 1)[1])["User"]["Arn"]
            role_name = value if kind == "role" else arn.rsplit("/", 1)[1]
            return self.iam.get_role(RoleName=role_name)["Role"]["Arn"]
        except is_boto3_error_code("NoSuchEntity"):
            self.module.fail_json(msg="trusted principal %s cannot be resolved: no such IAM %s; pass an existing "
                                      "user or role as trusted_principal_arn" % (arn, "user" if kind == "user"
                                                                                  else "role"))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:  # pylint: disable=duplicate-except
            self.module.fail_json_aws(e, msg="Cannot resolve trusted principal %s" % arn)

    def present(self):
        p = self.p
        if not p["expires_at"]:
            self.module.fail_json(msg="expires_at is required with state=present; pass the drill's expiry "
                                      "(drill_context's expires_at)")
        try:
            tags = drill_tags(self.drill_id, p["expires_at"])
        except DrillError as exc:
            self.module.fail_json(msg=str(exc))
        duration = p["duration_seconds"]
        if not ident.MIN_DURATION <= duration <= ident.MAX_DURATION:
            self.module.fail_json(msg="duration_seconds must be between %d and %d, got %d"
                                      % (ident.MIN_DURATION, ident.MAX_DURATION, duration))
        boundary = p["permissions_boundary"]
        if boundary and not _POLICY_ARN_RE.match(boundary):
            self.module.fail_json(msg="permissions_boundary %r is not a managed policy ARN "
                                      "(arn:aws:iam::<account>:policy/<name>)" % boundary)
        if p["external_id"] is not None and not re.match(r"^[\w+=,.@:/-]{2,1224}$", p["external_id"]):
            self.module.fail_json(msg="external_id must be 2-1224 characters of letters, digits and +=,.@:/-")
        region = self.module.region
        if not region:
            self.module.fail_json(msg="no AWS region; set region or AWS_REGION")
        # Pure validation first: nothing exists yet when any of this fails.
        try:
            ident.normalize_resources(p["resources"])
        except ident.PolicyError as exc:
            self.module.fail_json(msg=str(exc))
        caller_arn, account, partition = self.caller()
        try:
            policy = ident.build_role_policy(p["resources"], partition, region, account, p["extra_statements"])
            if p["session_policy"] is not None:
                session_policy = ident.validate_policy(p["session_policy"], "session_policy")
                ident.check_session_policy_size(session_policy)
            else:
                session_policy = ident.build_session_policy(policy, region)
        except ident.PolicyError as exc:
            self.module.fail_json(msg=str(exc))
        principal = self.resolve_principal(p["trusted_principal_arn"] or caller_arn, account,
                                           authenticated=not p["trusted_principal_arn"])

        role = self.get_role()
        external_id = p["external_id"]
        if external_id is None and role:
            external_id = ident.external_id_of(role.get("AssumeRolePolicyDocument") or {})
        external_id = external_id or secrets.token_urlsafe(24)
        self.module.no_log_values.add(external_id)
        trust = ident.trust_policy(principal, external_id)
        if role is None:
            role = self.create_role(trust, tags, boundary, account, partition)
        else:
            self.update_role(role, trust, tags, boundary)
        self.sync_policies(policy)

        result = dict(changed=self.changed, role_arn=role["Arn"], role_name=self.name, policy=policy,
                      session_policy=session_policy, trusted_principal_arn=principal, actions=self.actions)
        if self.module.check_mode:
            self.module.exit_json(**result)
        creds = self.assume(role["Arn"], external_id, session_policy, duration)
        result.update(
            credentials=dict(access_key_id=creds["AccessKeyId"], secret_access_key=creds["SecretAccessKey"],
                             session_token=creds["SessionToken"]),
            expiration=format_time(creds["Expiration"]),
        )
        self.module.exit_json(**result)

    def create_role(self, trust, tags, boundary, account, partition):
        arn = "arn:%s:iam::%s:role%s%s" % (partition, account, ident.ROLE_PATH, self.name)
        if not self.act("create role %s" % self.name):
            return {"Arn": arn}
        kwargs = dict(RoleName=self.name, Path=ident.ROLE_PATH, AssumeRolePolicyDocument=json.dumps(trust),
                      Description="drguard drill %s: ephemeral least-privilege identity" % self.drill_id,
                      MaxSessionDuration=MAX_SESSION_DURATION, Tags=tag_list(tags))
        if boundary:
            kwargs["PermissionsBoundary"] = boundary
        try:
            return self.iam.create_role(**kwargs)["Role"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot create IAM role %s" % self.name)

    def update_role(self, role, trust, tags, boundary):
        try:
            if _canon(role.get("AssumeRolePolicyDocument")) != _canon(trust) and self.act("update trust policy"):
                self.iam.update_assume_role_policy(RoleName=self.name, PolicyDocument=json.dumps(trust))
            if role.get("MaxSessionDuration") != MAX_SESSION_DURATION and self.act("set max session duration"):
                self.iam.update_role(RoleName=self.name, MaxSessionDuration=MAX_SESSION_DURATION)
            current = (role.get("PermissionsBoundary") or {}).get("PermissionsBoundaryArn")
            if current != boundary:
                if boundary and self.act("set permissions boundary %s" % boundary):
                    self.iam.put_role_permissions_boundary(RoleName=self.name, PermissionsBoundary=boundary)
                elif not boundary and self.act("remove permissions boundary"):
                    self.iam.delete_role_permissions_boundary(RoleName=self.name)
            missing = {k: v for k, v in tags.items() if role["_tags"].get(k) != v}
            if missing and self.act("tag role with %s" % ", ".join(sorted(missing))):
                self.iam.tag_role(RoleName=self.name, Tags=tag_list(missing))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot update IAM role %s" % self.name)

    def sync_policies(self, policy):
        """The role carries exactly our inline policy (plus a revocation), nothing else."""
        names, attached = [], []
        if not (self.module.check_mode and self.actions and self.actions[0].startswith("create role")):
            try:
                names = self.iam.list_role_policies(RoleName=self.name)["PolicyNames"]
                attached = self.iam.list_attached_role_policies(RoleName=self.name)["AttachedPolicies"]
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                self.module.fail_json_aws(e, msg="Cannot list the policies of IAM role %s" % self.name)
        try:
            current = None
            if ident.POLICY_NAME in names:
                current = self.iam.get_role_policy(RoleName=self.name,
                                                   PolicyName=ident.POLICY_NAME)["PolicyDocument"]
            if (current is None or _canon(current) != _canon(policy)) and self.act("put inline policy %s"
                                                                                  % ident.POLICY_NAME):
                self.iam.put_role_policy(RoleName=self.name, PolicyName=ident.POLICY_NAME,
                                         PolicyDocument=json.dumps(policy))
            for name in names:
                if name not in (ident.POLICY_NAME, ident.REVOKE_POLICY_NAME) and self.act(
                        "delete foreign inline policy %s" % name):
                    self.iam.delete_role_policy(RoleName=self.name, PolicyName=name)
            for item in attached:
                if self.act("detach foreign managed policy %s" % item["PolicyArn"]):
                    self.iam.detach_role_policy(RoleName=self.name, PolicyArn=item["PolicyArn"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot set the policies of IAM role %s" % self.name)

    def assume(self, role_arn, external_id, session_policy, duration):
        sts = self.module.client("sts")
        wait = PROPAGATION_WAIT_CHANGED if self.changed else PROPAGATION_WAIT_UNCHANGED

        def call():
            return sts.assume_role(
                RoleArn=role_arn, RoleSessionName=ident.role_name(self.drill_id),
                DurationSeconds=duration, Policy=json.dumps(session_policy, separators=(",", ":")),
                Tags=[{"Key": TAG_DRILL_ID, "Value": self.drill_id}],
                SourceIdentity=self.drill_id, ExternalId=external_id,
            )["Credentials"]

        try:
            return retry_while(call, lambda exc: error_code(exc) == "AccessDenied", wait)
        except is_boto3_error_code("AccessDenied") as e:
            self.module.fail_json_aws(
                e, msg="Cannot assume %s after %ds: the caller is not the trusted principal, lacks "
                       "sts:AssumeRole/sts:TagSession/sts:SetSourceIdentity, or IAM has not propagated"
                       % (role_arn, wait))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:  # pylint: disable=duplicate-except
            self.module.fail_json_aws(e, msg="Cannot assume drill role %s" % role_arn)

    # ------------------------------------------------------------ revoked / absent
    def revoked(self):
        role = self.get_role()
        if role is None:
            self.module.exit_json(changed=False, role_arn=None, role_name=self.name, actions=[])
        # Rounded up past the current second: format_time truncates, and a session issued
        # earlier in this very second must not escape DateLessThan.
        now = format_time(utcnow() + timedelta(seconds=1))
        if self.act("deny every session issued before %s" % now):
            try:
                self.iam.put_role_policy(RoleName=self.name, PolicyName=ident.REVOKE_POLICY_NAME,
                                         PolicyDocument=json.dumps(ident.revoke_policy(now)))
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                self.module.fail_json_aws(e, msg="Cannot revoke the sessions of IAM role %s" % self.name)
        self.module.exit_json(changed=True, role_arn=role["Arn"], role_name=self.name, revoked_at=now,
                              actions=self.actions)

    def absent(self):
        role = self.get_role()
        if role is None:
            self.module.exit_json(changed=False, role_arn=None, role_name=self.name, actions=[])
        try:
            for name in self.iam.list_role_policies(RoleName=self.name)["PolicyNames"]:
                if self.act("delete inline policy %s" % name):
                    self.iam.delete_role_policy(RoleName=self.name, PolicyName=name)
            for item in self.iam.list_attached_role_policies(RoleName=self.name)["AttachedPolicies"]:
                if self.act("detach managed policy %s" % item["PolicyArn"]):
                    self.iam.detach_role_policy(RoleName=self.name, PolicyArn=item["PolicyArn"])
            profiles = self.iam.list_instance_profiles_for_role(RoleName=self.name)["InstanceProfiles"]
            for profile in profiles:
                if self.act("remove from instance profile %s" % profile["InstanceProfileName"]):
                    self.iam.remove_role_from_instance_profile(
                        RoleName=self.name, InstanceProfileName=profile["InstanceProfileName"])
            if self.act("delete role %s" % self.name):
                self.iam.delete_role(RoleName=self.name)
        except is_boto3_error_code("NoSuchEntity"):
            pass  # deleted concurrently: the goal is reached
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:  # pylint: disable=duplicate-except
            self.module.fail_json_aws(e, msg="Cannot delete IAM role %s" % self.name)
        self.module.exit_json(changed=True, role_arn=role["Arn"], role_name=self.name, actions=self.actions)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        validate_drill_id(module.params["drill_id"])
    except DrillError as exc:
        module.fail_json(msg=str(exc))
    minter = Minter(module)
    getattr(minter, module.params["state"])()


if __name__ == "__main__":
    main()
