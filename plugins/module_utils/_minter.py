# Copyright: drguard maintainers
# Apache License 2.0
"""The drill's ephemeral identity on AWS: create, mint, revoke, delete (backend of mint_credentials).

:class:`Minter` does the AWS side of ``mint_credentials``: the role ``drguard-<drill_id>``
with its generated inline policy and one-principal trust policy, the AssumeRole session,
the revocation policy and the role's deletion. The policies themselves come from
:mod:`._identity` (pure data). Every failure is a :class:`MintError`; the module's
``main()`` is the only place that turns it into ``fail_json``.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import timedelta

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = ()

from ansible_collections.amazon.aws.plugins.module_utils.exceptions import AnsibleAWSError
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict

from ansible_collections.drguard.sandbox.plugins.module_utils import _identity as ident
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow

MAX_SESSION_DURATION = 3600  # IAM's minimum for MaxSessionDuration, and our maximum duration
_POLICY_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}|aws):policy/[\w+=,.@/-]+$")
_EXTERNAL_ID_RE = re.compile(r"^[\w+=,.@:/-]{2,1224}$")
# How long AssumeRole AccessDenied is retried: IAM is eventually consistent, so a role
# created or changed a moment ago may not be assumable yet.
PROPAGATION_WAIT_CHANGED = 45
PROPAGATION_WAIT_UNCHANGED = 10

_AWS_ERRORS = (ClientError, BotoCoreError) if ClientError else ()
# Empty only without botocore, when AnsibleAWSModule has failed before any call (pylint cannot tell).
# pylint: disable=catching-non-exception,bad-exception-cause


class MintError(AnsibleAWSError):
    """The drill identity cannot be brought into shape.

    ``message`` says what was wrong and what to do; ``exception`` is the boto error
    behind it, if any (``main()`` reports it through ``fail_json_aws``).
    """


class Minter:
    """One drill's role, its policies and its sessions.

    ``client(service)`` returns a retrying client (``_aws.aws_client``); ``hide(value)``
    marks a value as secret in the module's output (the external id).
    """

    def __init__(self, drill_id, client, *, region=None, check_mode=False, diff=False, hide=None):  # noqa: PLR0913
        self.drill_id = drill_id
        self.name = ident.role_name(drill_id)
        self.client = client
        self.region = region
        self.check_mode = check_mode
        self.want_diff = diff
        self.hide = hide or (lambda value: None)
        self.iam = client("iam")
        self.actions = []
        self.changed = False

    def act(self, line: str) -> bool:
        """Record an action; True when it should really be performed (not check mode)."""
        self.actions.append(line)
        self.changed = True
        return not self.check_mode

    def _with_diff(self, result: dict, before, after) -> dict:
        if self.want_diff:
            result["diff"] = {"before": before or {}, "after": after or {}}
        return result

    # ------------------------------------------------------------ role lookup
    def get_role(self):
        """The drill's role with its tags under ``_tags``, None when it does not exist."""
        try:
            role = self.iam.get_role(RoleName=self.name)["Role"]
        except _AWS_ERRORS as e:
            if is_not_found(e):
                return None
            raise MintError("Cannot read IAM role %s" % self.name, exception=e) from e
        try:
            tags = boto3_tag_list_to_ansible_dict(paginate(self.iam, "list_role_tags", "Tags", RoleName=self.name))
        except _AWS_ERRORS as e:
            raise MintError("Cannot read the tags of IAM role %s" % self.name, exception=e) from e
        if role.get("Path") != ident.ROLE_PATH or tags.get(TAG_DRILL_ID) != self.drill_id:
            raise MintError(
                "IAM role %s exists but is not this drill's (path %r, tag %s=%r); refusing to touch it - "
                "use another drill id or remove that role" % (self.name, role.get("Path"), TAG_DRILL_ID,
                                                              tags.get(TAG_DRILL_ID)))
        role["_tags"] = tags
        return role

    def _inline_policy(self, name):
        """The role's inline policy ``name`` as a dict, None when it has none by that name."""
        try:
            doc = self.iam.get_role_policy(RoleName=self.name, PolicyName=name)["PolicyDocument"]
        except _AWS_ERRORS as e:
            if is_not_found(e):
                return None
            raise MintError("Cannot read inline policy %s of IAM role %s" % (name, self.name), exception=e) from e
        return ident.policy_document(doc)

    # ------------------------------------------------------------ present
    def caller(self):
        try:
            me = self.client("sts").get_caller_identity()
        except _AWS_ERRORS as e:
            raise MintError("Cannot find out who is calling (sts:GetCallerIdentity); "
                            "check the controller's AWS credentials", exception=e) from e
        return me["Arn"], me["Account"], me["Arn"].split(":")[1]

    def resolve_principal(self, arn: str, account: str, authenticated: bool) -> str:
        """The IAM ARN of the one trusted principal; a given one must exist in the caller's account."""
        try:
            kind, value = ident.normalize_principal(arn)
        except ident.PolicyError as exc:
            raise MintError(str(exc)) from None
        if kind == "user" and authenticated:
            return value  # the caller itself: STS has just authenticated it
        principal_account = arn.split(":")[4]
        if principal_account != account:
            raise MintError("trusted principal %s is in account %s, not in the drill's account %s; "
                            "cross-account principals cannot be resolved, so they are refused"
                            % (arn, principal_account, account))
        try:
            if kind == "user":
                return self.iam.get_user(UserName=value.rsplit("/", 1)[1])["User"]["Arn"]
            role_name = value if kind == "role" else arn.rsplit("/", 1)[1]
            return self.iam.get_role(RoleName=role_name)["Role"]["Arn"]
        except _AWS_ERRORS as e:
            if is_not_found(e):
                raise MintError("trusted principal %s cannot be resolved: no such IAM %s; pass an existing "
                                "user or role as trusted_principal_arn"
                                % (arn, "user" if kind == "user" else "role")) from None
            raise MintError("Cannot resolve trusted principal %s" % arn, exception=e) from e

    def present(self, p: dict) -> dict:
        """Create or fix the role and its policies; mint a session unless in check mode."""
        if not p["expires_at"]:
            raise MintError("expires_at is required with state=present; pass the drill's expiry "
                            "(drill_context's expires_at)")
        try:
            tags = drill_tags(self.drill_id, p["expires_at"])
        except DrillError as exc:
            raise MintError(str(exc)) from None
        duration = p["duration_seconds"]
        if not ident.MIN_DURATION <= duration <= ident.MAX_DURATION:
            raise MintError("duration_seconds must be between %d and %d, got %d"
                            % (ident.MIN_DURATION, ident.MAX_DURATION, duration))
        boundary = p["permissions_boundary"]
        if boundary and not _POLICY_ARN_RE.match(boundary):
            raise MintError("permissions_boundary %r is not a managed policy ARN "
                            "(arn:aws:iam::<account>:policy/<name>)" % boundary)
        if p["external_id"] is not None and not _EXTERNAL_ID_RE.match(p["external_id"]):
            raise MintError("external_id must be 2-1224 characters of letters, digits and +=,.@:/-")
        if not self.region:
            raise MintError("no AWS region; set region or AWS_REGION")
        # Pure validation first: nothing exists yet when any of this fails.
        try:
            ident.normalize_resources(p["resources"])
        except ident.PolicyError as exc:
            raise MintError(str(exc)) from None
        caller_arn, account, partition = self.caller()
        try:
            policy = ident.build_role_policy(p["resources"], partition, self.region, account, p["extra_statements"])
            if p["session_policy"] is not None:
                session_policy = ident.validate_policy(p["session_policy"], "session_policy")
                ident.check_session_policy_size(session_policy)
            else:
                session_policy = ident.build_session_policy(policy, self.region)
        except ident.PolicyError as exc:
            raise MintError(str(exc)) from None
        principal = self.resolve_principal(p["trusted_principal_arn"] or caller_arn, account,
                                           authenticated=not p["trusted_principal_arn"])

        role = self.get_role()
        external_id = p["external_id"]
        if external_id is None and role:
            external_id = ident.external_id_of(ident.policy_document(role.get("AssumeRolePolicyDocument")) or {})
        external_id = external_id or secrets.token_urlsafe(24)
        self.hide(external_id)
        trust = ident.trust_policy(principal, external_id)
        if role is None:
            role = self.create_role(trust, tags, boundary, account, partition)
        else:
            self.update_role(role, trust, tags, boundary)
        before = self.sync_policies(policy)

        result = dict(changed=self.changed, role_arn=role["Arn"], role_name=self.name, policy=policy,
                      session_policy=session_policy, trusted_principal_arn=principal, actions=self.actions)
        self._with_diff(result, before, policy)
        if self.check_mode:
            return result
        creds = self.assume(role["Arn"], external_id, session_policy, duration)
        result.update(
            credentials=dict(access_key_id=creds["AccessKeyId"], secret_access_key=creds["SecretAccessKey"],
                             session_token=creds["SessionToken"]),
            expiration=format_time(creds["Expiration"]),
        )
        return result

    def create_role(self, trust, tags, boundary, account, partition):
        arn = "arn:%s:iam::%s:role%s%s" % (partition, account, ident.ROLE_PATH, self.name)
        if not self.act("create role %s" % self.name):
            return {"Arn": arn}
        kwargs = dict(RoleName=self.name, Path=ident.ROLE_PATH, AssumeRolePolicyDocument=json.dumps(trust),
                      Description="drguard drill %s: ephemeral least-privilege identity" % self.drill_id,
                      MaxSessionDuration=MAX_SESSION_DURATION, Tags=ansible_dict_to_boto3_tag_list(tags))
        if boundary:
            kwargs["PermissionsBoundary"] = boundary
        try:
            return self.iam.create_role(**kwargs)["Role"]
        except _AWS_ERRORS as e:
            raise MintError("Cannot create IAM role %s" % self.name, exception=e) from e

    def update_role(self, role, trust, tags, boundary):
        try:
            if ident.policies_differ(role.get("AssumeRolePolicyDocument"), trust) and self.act("update trust policy"):
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
                self.iam.tag_role(RoleName=self.name, Tags=ansible_dict_to_boto3_tag_list(missing))
        except _AWS_ERRORS as e:
            raise MintError("Cannot update IAM role %s" % self.name, exception=e) from e

    def sync_policies(self, policy):
        """The role carries exactly our inline policy (plus a revocation), nothing else.

        Returns the inline policy as it was before (None when there was none).
        """
        names, attached = [], []
        if not (self.check_mode and self.actions and self.actions[0].startswith("create role")):
            try:
                names = paginate(self.iam, "list_role_policies", "PolicyNames", RoleName=self.name)
                attached = paginate(self.iam, "list_attached_role_policies", "AttachedPolicies", RoleName=self.name)
            except _AWS_ERRORS as e:
                raise MintError("Cannot list the policies of IAM role %s" % self.name, exception=e) from e
        try:
            current = None
            if ident.POLICY_NAME in names:
                current = ident.policy_document(self.iam.get_role_policy(
                    RoleName=self.name, PolicyName=ident.POLICY_NAME)["PolicyDocument"])
            if (current is None or ident.policies_differ(current, policy)) and self.act(
                    "put inline policy %s" % ident.POLICY_NAME):
                self.iam.put_role_policy(RoleName=self.name, PolicyName=ident.POLICY_NAME,
                                         PolicyDocument=json.dumps(policy))
            for name in names:
                if name not in (ident.POLICY_NAME, ident.REVOKE_POLICY_NAME) and self.act(
                        "delete foreign inline policy %s" % name):
                    self.iam.delete_role_policy(RoleName=self.name, PolicyName=name)
            for item in attached:
                if self.act("detach foreign managed policy %s" % item["PolicyArn"]):
                    self.iam.detach_role_policy(RoleName=self.name, PolicyArn=item["PolicyArn"])
        except _AWS_ERRORS as e:
            raise MintError("Cannot set the policies of IAM role %s" % self.name, exception=e) from e
        return current

    def assume(self, role_arn, external_id, session_policy, duration):
        sts = self.client("sts")
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
        except _AWS_ERRORS as e:
            if error_code(e) == "AccessDenied":
                raise MintError("Cannot assume %s after %ds: the caller is not the trusted principal, lacks "
                                "sts:AssumeRole/sts:TagSession/sts:SetSourceIdentity, or IAM has not propagated"
                                % (role_arn, wait), exception=e) from e
            raise MintError("Cannot assume drill role %s" % role_arn, exception=e) from e

    # ------------------------------------------------------------ revoked / absent
    def revoked(self, p=None) -> dict:
        """Deny everything to every session issued so far."""
        role = self.get_role()
        if role is None:
            return self._with_diff(dict(changed=False, role_arn=None, role_name=self.name, actions=[]), None, None)
        before = self._inline_policy(ident.REVOKE_POLICY_NAME) if self.want_diff else None
        # Rounded up past the current second: format_time truncates, and a session issued
        # earlier in this very second must not escape DateLessThan.
        now = format_time(utcnow() + timedelta(seconds=1))
        policy = ident.revoke_policy(now)
        if self.act("deny every session issued before %s" % now):
            try:
                self.iam.put_role_policy(RoleName=self.name, PolicyName=ident.REVOKE_POLICY_NAME,
                                         PolicyDocument=json.dumps(policy))
            except _AWS_ERRORS as e:
                raise MintError("Cannot revoke the sessions of IAM role %s" % self.name, exception=e) from e
        return self._with_diff(dict(changed=True, role_arn=role["Arn"], role_name=self.name, revoked_at=now,
                                    actions=self.actions), before, policy)

    def absent(self, p=None) -> dict:
        """Delete the role with every policy and instance-profile membership."""
        role = self.get_role()
        if role is None:
            return self._with_diff(dict(changed=False, role_arn=None, role_name=self.name, actions=[]), None, None)
        before = self._inline_policy(ident.POLICY_NAME) if self.want_diff else None
        try:
            for name in paginate(self.iam, "list_role_policies", "PolicyNames", RoleName=self.name):
                if self.act("delete inline policy %s" % name):
                    self.iam.delete_role_policy(RoleName=self.name, PolicyName=name)
            for item in paginate(self.iam, "list_attached_role_policies", "AttachedPolicies", RoleName=self.name):
                if self.act("detach managed policy %s" % item["PolicyArn"]):
                    self.iam.detach_role_policy(RoleName=self.name, PolicyArn=item["PolicyArn"])
            profiles = paginate(self.iam, "list_instance_profiles_for_role", "InstanceProfiles", RoleName=self.name)
            for profile in profiles:
                if self.act("remove from instance profile %s" % profile["InstanceProfileName"]):
                    self.iam.remove_role_from_instance_profile(
                        RoleName=self.name, InstanceProfileName=profile["InstanceProfileName"])
            if self.act("delete role %s" % self.name):
                self.iam.delete_role(RoleName=self.name)
        except _AWS_ERRORS as e:
            if not is_not_found(e):
                raise MintError("Cannot delete IAM role %s" % self.name, exception=e) from e
            # deleted concurrently: the goal is reached
        return self._with_diff(dict(changed=True, role_arn=role["Arn"], role_name=self.name, actions=self.actions),
                               before, None)
