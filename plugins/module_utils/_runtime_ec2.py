# Copyright: drguard maintainers
# Apache License 2.0
"""The ``ec2`` backend of ``drguard.sandbox.sandbox_runtime``: one instance per tier on real AWS (docs/runtime.md).

Every tier (``drill_boundary.tiers`` plus ``validation``) gets one instance in a sandbox subnet of
the drill's VPC, in the tier's security group, without a public address, IMDSv2 required (hop
limit 1), with an instance profile holding the drill's own role. The instances are reached only
through SSM Run Command, over the ssm / ssmmessages / ec2messages interface endpoints that
``sandbox_network`` builds when ``drill_boundary.ssm_endpoints`` is true. Probes and validators
run through ``SendCommand``; a command whose result does not come back is ``unknown`` (fail
closed). The emulator accepts commands but runs none: there every probe is ``unknown``.

Everything is found again by tags and names (``drguard-<drill id>-<tier>``), so a second run
changes nothing and teardown (this module's ``down`` or the sweep) finds what a killed run left.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import shlex
import time
from datetime import datetime
from datetime import timezone
from concurrent.futures import ThreadPoolExecutor

try:
    from botocore.exceptions import ClientError
except ImportError:  # handled by AnsibleAWSModule
    ClientError = Exception
try:
    from cryptography import x509
except ImportError:  # _pki.HAS_CRYPTOGRAPHY; the certificates need it
    x509 = None

from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict
from ansible_collections.drguard.sandbox.plugins.module_utils import _network_build
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _probes
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import get_or_none
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import port_ends
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import SSM_ENDPOINT_SERVICES
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import ssm_endpoints_declared
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import ec2_tag_specs
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_EXPIRES_AT
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time

AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
INSTANCE_TYPE = "t3.micro"
IAM_PATH = "/drguard/"
EC2_PRINCIPAL = "ec2.amazonaws.com"
VALIDATION_TIER = _network_build.VALIDATION_TIER
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# SSM command invocation states that are final; anything else after the deadline is "unknown".
FINAL_STATUSES = ("Success", "Failed", "Cancelled", "TimedOut", "Undeliverable", "Terminated",
                  "DeliveryTimedOut", "ExecutionTimedOut")
PROFILE_PROPAGATION_WAIT = 60
OUTPUT_LIMIT = 2000
# A workload never runs as root: uid/gid 65534, no capability, no_new_privs, an empty environment.
UNPRIVILEGED = ("setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --ambient-caps=-all "
                "--bounding-set=-all --no-new-privs -- env -i")


class _Planned(Exception):
    """The role is planned in check mode, not there to read."""


class Ec2RuntimeError(Exception):
    """The ec2 runtime cannot be built, reached or removed; ``msg`` says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- names and the launch request (pure)


def instance_name(drill_id: str, tier: str) -> str:
    return "drguard-%s-%s" % (drill_id, tier)


def profile_name(drill_id: str) -> str:
    return "drguard-%s-runtime" % drill_id


def runtime_tiers(boundary) -> list:
    """The declared tiers, then ``validation`` (always), as the netns backend."""
    tiers = list(boundary.tiers)
    return tiers if VALIDATION_TIER in tiers else tiers + [VALIDATION_TIER]


def launch_request(drill_id: str, tier: str, *, ami: str, instance_type: str, subnet_id: str, group_id: str,
                   profile: str, tags: dict) -> dict:
    """The ``RunInstances`` arguments of ``tier``'s instance.

    No public address on the one interface, IMDSv2 only with a hop limit of 1, the drill's
    instance profile, tagged in the call (instance, volume, interface) and an idempotency token
    derived from the drill and tier, so a retried call never starts a second instance.
    """
    name = instance_name(drill_id, tier)
    token = hashlib.sha256(("%s/%s/%s" % (drill_id, tier, tags.get(TAG_EXPIRES_AT, ""))).encode()).hexdigest()[:64]
    return {
        "ImageId": ami, "InstanceType": instance_type, "MinCount": 1, "MaxCount": 1,
        "ClientToken": token,
        "NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": subnet_id, "Groups": [group_id],
                               "AssociatePublicIpAddress": False, "DeleteOnTermination": True}],
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
        "IamInstanceProfile": {"Name": profile},
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": (ec2_tag_specs("instance", tags, name) + ec2_tag_specs("volume", tags, name)
                              + ec2_tag_specs("network-interface", tags, name)),
    }


def instance_problems(instance: dict, *, subnet_id: str, group_id: str, profile_arn: str | None) -> list:
    """What makes a live instance not the one :func:`launch_request` asks for (empty: none)."""
    problems = []
    if instance.get("PublicIpAddress"):
        problems.append("it has the public address %s" % instance["PublicIpAddress"])
    for eni in instance.get("NetworkInterfaces") or []:
        if (eni.get("Association") or {}).get("PublicIp"):
            problems.append("interface %s has a public address" % eni.get("NetworkInterfaceId"))
    meta = instance.get("MetadataOptions") or {}
    if meta.get("HttpTokens") != "required":
        problems.append("IMDSv2 is not required (HttpTokens %s)" % meta.get("HttpTokens"))
    if int(meta.get("HttpPutResponseHopLimit") or 0) != 1:
        problems.append("the metadata hop limit is %s, not 1" % meta.get("HttpPutResponseHopLimit"))
    if instance.get("SubnetId") != subnet_id:
        problems.append("it is in subnet %s, not %s" % (instance.get("SubnetId"), subnet_id))
    groups = sorted({g.get("GroupId") for g in instance.get("SecurityGroups") or []}
                    | {g.get("GroupId") for e in instance.get("NetworkInterfaces") or []
                       for g in e.get("Groups") or []})
    if groups != [group_id]:
        problems.append("its security groups are %s, not %s" % (", ".join(groups) or "none", group_id))
    have_profile = (instance.get("IamInstanceProfile") or {}).get("Arn")
    if profile_arn and have_profile != profile_arn:
        problems.append("its instance profile is %s, not %s" % (have_profile, profile_arn))
    return problems


# ---------------------------------------------------------------- the network the instances go in


def find_network(ec2, drill_id: str, boundary) -> dict:
    """The drill's VPC, subnets and workload groups, found by tags and names (what ``sandbox_network`` built)."""
    names = _network_build.names(drill_id)
    flt = [{"Name": "tag:%s" % TAG_DRILL_ID, "Values": [drill_id]}]
    vpcs = paginate(ec2, "describe_vpcs", "Vpcs", Filters=flt + [{"Name": "tag:Name", "Values": [names["vpc"]]}])
    if len(vpcs) != 1:
        raise Ec2RuntimeError("drill %s has %d VPCs named %s where there must be one; build the network first "
                              "(sandbox_network) with drill_boundary.ssm_endpoints true"
                              % (drill_id, len(vpcs), names["vpc"]), vpc_count=len(vpcs))
    vpc = vpcs[0]
    vflt = flt + [{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
    subnets = {boto3_tag_list_to_ansible_dict(s.get("Tags")).get("Name"): s["SubnetId"]
               for s in paginate(ec2, "describe_subnets", "Subnets", Filters=vflt)}
    subnet_ids = [subnets[n] for n in names["subnets"] if n in subnets]
    if len(subnet_ids) != len(names["subnets"]):
        raise Ec2RuntimeError("drill %s's VPC %s lacks its sandbox subnets (%s); build the network again "
                              "(sandbox_network)" % (drill_id, vpc["VpcId"], ", ".join(names["subnets"])))
    groups = {g["GroupName"]: g["GroupId"] for g in paginate(ec2, "describe_security_groups", "SecurityGroups",
                                                             Filters=vflt)}
    tiers = runtime_tiers(boundary)
    missing = [t for t in tiers if _network_build.sg_name(drill_id, t) not in groups]
    if missing or names["ssm_sg"] not in groups:
        raise Ec2RuntimeError("drill %s's network has no security group for %s; the ec2 runtime needs the network "
                              "built with drill_boundary.ssm_endpoints true (its SSM endpoints and the validation "
                              "tier's group)" % (drill_id, ", ".join(missing + ([] if names["ssm_sg"] in groups
                                                                                else ["the SSM endpoints"]))))
    endpoints = [e for e in paginate(ec2, "describe_vpc_endpoints", "VpcEndpoints",
                                     Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])
                 if e.get("VpcEndpointType") == "Interface"
                 and e.get("State", "").lower() not in ("deleted", "deleting")]
    have = {e["ServiceName"].rsplit(".", 1)[-1] for e in endpoints if e.get("PrivateDnsEnabled")}
    lacking = [s for s in SSM_ENDPOINT_SERVICES if s not in have]
    if lacking:
        raise Ec2RuntimeError("drill %s's VPC %s has no %s interface endpoint(s) with private DNS, so SSM cannot "
                              "reach the instances or they cannot fetch their certificates; build the network "
                              "with drill_boundary.ssm_endpoints true"
                              % (drill_id, vpc["VpcId"], ", ".join(lacking)))
    tags = boto3_tag_list_to_ansible_dict(vpc.get("Tags"))
    return {"vpc_id": vpc["VpcId"], "subnet_ids": subnet_ids, "expires_at": tags.get(TAG_EXPIRES_AT),
            "groups": {t: groups[_network_build.sg_name(drill_id, t)] for t in tiers}}


# ---------------------------------------------------------------- the instance profile


def _trusts_ec2(doc) -> bool:
    doc = json.loads(doc) if isinstance(doc, str) else (doc or {})
    for stmt in doc.get("Statement") or []:
        if stmt.get("Effect") != "Allow":
            continue
        actions = stmt.get("Action")
        actions = actions if isinstance(actions, list) else [actions]
        service = (stmt.get("Principal") or {}).get("Service") if isinstance(stmt.get("Principal"), dict) else None
        services = service if isinstance(service, list) else [service]
        if EC2_PRINCIPAL in services and "sts:AssumeRole" in actions:
            return True
    return False


RUNTIME_POLICY_NAME = "drguard-runtime"
# What the SSM agent needs to register and take Run Command messages (none of these actions takes a resource).
SSM_AGENT_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage", "ec2messages:FailMessage",
    "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply",
)
EC2_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": EC2_PRINCIPAL}, "Action": "sts:AssumeRole"}]}


def runtime_secret_prefix(drill_id: str) -> str:
    """The Secrets Manager name prefix the tiers' instances may read (their certificates), ``drguard/<id>/runtime/``."""
    return "drguard/%s/runtime/" % drill_id


# drguard/<drill id>/runtime/session: the name (not a value) of the drill's session, for the validation tier only
SESSION_SECRET = "session"  # noqa: S105


def secret_arn_pattern(drill_id: str, name: str, partition: str, region: str, account: str) -> str:
    """The ARN of secret ``drguard/<drill id>/runtime/<name>`` with any six-character suffix (AWS adds one)."""
    return "arn:%s:secretsmanager:%s:%s:secret:%s%s-??????" % (
        partition, region, account, runtime_secret_prefix(drill_id), name)


def runtime_policy(drill_id: str, partition: str, region: str, account: str, instances: dict | None = None) -> dict:
    """The instance role's one inline policy: the SSM agent's actions and, per tier, its own runtime secret.

    ``instances``: ``{tier: instance id}`` of the running tiers, in the runtime's tier order. Each
    tier gets one statement allowing ``GetSecretValue`` on its own certificate bundle (the
    validation tier also on the drill's session, :data:`SESSION_SECRET`), only for credentials
    of that tier's instance (``ec2:SourceInstanceARN``, which AWS sets for an instance role's
    credentials): one tier's instance cannot read another tier's key or the session.
    """
    statements = [{"Sid": "SsmAgent", "Effect": "Allow", "Action": sorted(SSM_AGENT_ACTIONS), "Resource": "*"}]
    for n, (tier, instance_id) in enumerate((instances or {}).items()):
        names = [tier] + ([SESSION_SECRET] if tier == VALIDATION_TIER else [])
        statements.append({
            "Sid": "TierSecrets%d" % n, "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
            "Resource": [secret_arn_pattern(drill_id, name, partition, region, account) for name in names],
            "Condition": {"ArnEquals": {"ec2:SourceInstanceARN": "arn:%s:ec2:%s:%s:instance/%s" % (
                partition, region, account, instance_id)}}})
    return {"Version": "2012-10-17", "Statement": statements}


def _policy_doc(doc):
    return json.loads(doc) if isinstance(doc, str) else doc


def ensure_runtime_role(iam, drill_id: str, tags: dict, region: str, *, check_mode: bool, actions: list,
                        instances: dict | None = None) -> dict:
    """The runtime's own instance role ``drguard-<drill id>-runtime`` (path /drguard/, the drill's tags).

    It trusts ``ec2.amazonaws.com`` only and holds one inline policy (:func:`runtime_policy`); a
    widened policy is put back, a role of that name that is not the drill's is refused.
    """
    name = profile_name(drill_id)
    role = get_or_none(iam.get_role, "Role", RoleName=name)
    if role is None:
        actions.append("create role %s" % name)
        if check_mode:
            actions.append("put policy %s of role %s" % (RUNTIME_POLICY_NAME, name))
            return {"name": name, "planned": True}
        role = iam.create_role(RoleName=name, Path=IAM_PATH, AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
                               Description="drguard drill %s: the sandbox runtime's instances (SSM agent only)"
                               % drill_id, MaxSessionDuration=3600,
                               Tags=ansible_dict_to_boto3_tag_list(tags))["Role"]
    else:
        have = boto3_tag_list_to_ansible_dict(paginate(iam, "list_role_tags", "Tags", RoleName=name))
        if have.get(TAG_DRILL_ID) != drill_id or role.get("Path") != IAM_PATH:
            raise Ec2RuntimeError("role %s exists but is not drill %s's (tag %r, path %s); remove it or use another "
                                  "drill id" % (name, drill_id, have.get(TAG_DRILL_ID), role.get("Path")))
        if _policy_doc(role.get("AssumeRolePolicyDocument")) != EC2_TRUST:
            actions.append("trust only %s in role %s" % (EC2_PRINCIPAL, name))
            if not check_mode:
                iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(EC2_TRUST))
    arn = role["Arn"].split(":")
    want = runtime_policy(drill_id, arn[1], region, arn[4], instances)
    inline = paginate(iam, "list_role_policies", "PolicyNames", RoleName=name) if "Arn" in role else []
    for other in inline:
        if other != RUNTIME_POLICY_NAME:
            actions.append("delete policy %s of role %s" % (other, name))
            if not check_mode:
                iam.delete_role_policy(RoleName=name, PolicyName=other)
    for att in paginate(iam, "list_attached_role_policies", "AttachedPolicies", RoleName=name):
        actions.append("detach policy %s from role %s" % (att["PolicyArn"], name))
        if not check_mode:
            iam.detach_role_policy(RoleName=name, PolicyArn=att["PolicyArn"])
    have_doc = None
    if RUNTIME_POLICY_NAME in inline:
        have_doc = _policy_doc(iam.get_role_policy(RoleName=name, PolicyName=RUNTIME_POLICY_NAME)["PolicyDocument"])
    if have_doc != want:
        actions.append("put policy %s of role %s" % (RUNTIME_POLICY_NAME, name))
        if not check_mode:
            iam.put_role_policy(RoleName=name, PolicyName=RUNTIME_POLICY_NAME, PolicyDocument=json.dumps(want))
    return {"name": name, "planned": False, "arn": role["Arn"]}


def put_tier_statements(iam, drill_id: str, role: dict, region: str, instances: dict, *, check_mode: bool,
                        actions: list) -> None:
    """Once the tiers' instances exist: the runtime role's policy with a statement per tier (:func:`runtime_policy`)."""
    if role.get("planned") or check_mode:
        return
    arn = role["arn"].split(":")
    want = runtime_policy(drill_id, arn[1], region, arn[4], instances)
    have = _policy_doc(iam.get_role_policy(RoleName=role["name"], PolicyName=RUNTIME_POLICY_NAME)["PolicyDocument"])
    if have != want:
        actions.append("put policy %s of role %s" % (RUNTIME_POLICY_NAME, role["name"]))
        iam.put_role_policy(RoleName=role["name"], PolicyName=RUNTIME_POLICY_NAME, PolicyDocument=json.dumps(want))


def delete_runtime_role(iam, drill_id: str, *, check_mode: bool, actions: list) -> str | None:
    """Delete the runtime's own role (its policies, profiles first); ``None`` when there is none."""
    name = profile_name(drill_id)
    try:
        iam.get_role(RoleName=name)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    tags = boto3_tag_list_to_ansible_dict(paginate(iam, "list_role_tags", "Tags", RoleName=name))
    if tags.get(TAG_DRILL_ID) != drill_id:
        raise Ec2RuntimeError("role %s is not drill %s's (its drguard:drill-id tag differs); it was left as it is"
                              % (name, drill_id))
    actions.append("delete role %s" % name)
    if not check_mode:
        for pol in paginate(iam, "list_role_policies", "PolicyNames", RoleName=name):
            iam.delete_role_policy(RoleName=name, PolicyName=pol)
        for att in paginate(iam, "list_attached_role_policies", "AttachedPolicies", RoleName=name):
            iam.detach_role_policy(RoleName=name, PolicyArn=att["PolicyArn"])
        for prof in paginate(iam, "list_instance_profiles_for_role", "InstanceProfiles", RoleName=name):
            iam.remove_role_from_instance_profile(InstanceProfileName=prof["InstanceProfileName"], RoleName=name)
        iam.delete_role(RoleName=name)
    return name


def ensure_profile(iam, drill_id: str, role_name: str, tags: dict, *, check_mode: bool, actions: list,
                   role_planned: bool = False) -> dict:
    """The drill's instance profile ``drguard-<drill id>-runtime`` (path /drguard/, tagged), holding ``role_name`` only.

    The role must be the drill's (its ``drguard:drill-id`` tag) and trust ``ec2.amazonaws.com``,
    or instances could not use it: refused with one sentence (fail closed). ``role_planned``: the
    role is only planned (check mode), so it is not read.
    """
    try:
        if role_planned:
            raise _Planned()
        role = iam.get_role(RoleName=role_name)["Role"]
    except _Planned:
        role = None
    except ClientError as exc:
        if is_not_found(exc):
            raise Ec2RuntimeError("the instance role %s does not exist; mint the drill's identity first or pass "
                                  "the drill's role as ec2.instance_role" % role_name) from None
        raise
    role_tags = ({TAG_DRILL_ID: drill_id} if role is None
                 else boto3_tag_list_to_ansible_dict(paginate(iam, "list_role_tags", "Tags", RoleName=role_name)))
    if role_tags.get(TAG_DRILL_ID) != drill_id:
        raise Ec2RuntimeError("the instance role %s is not drill %s's (its drguard:drill-id tag is %r); pass the "
                              "drill's own role" % (role_name, drill_id, role_tags.get(TAG_DRILL_ID)))
    if role is not None and not _trusts_ec2(role.get("AssumeRolePolicyDocument")):
        raise Ec2RuntimeError("the instance role %s does not trust %s, so its instances would get no credentials; "
                              "let the drill's role trust %s (sts:AssumeRole)" % (role_name, EC2_PRINCIPAL,
                                                                                  EC2_PRINCIPAL))
    name = profile_name(drill_id)
    profile = get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=name)
    if profile is None:
        actions.append("create instance profile %s" % name)
        if check_mode:
            actions.append("add role %s to instance profile %s" % (role_name, name))
            return {"name": name, "arn": None, "changed": True}
        profile = iam.create_instance_profile(InstanceProfileName=name, Path=IAM_PATH,
                                              Tags=ansible_dict_to_boto3_tag_list(tags))["InstanceProfile"]
        profile["Roles"] = []
    else:
        have = boto3_tag_list_to_ansible_dict(profile.get("Tags"))
        if have.get(TAG_DRILL_ID) != drill_id or profile.get("Path") != IAM_PATH:
            raise Ec2RuntimeError("instance profile %s exists but is not drill %s's (tag %r, path %s); remove it or "
                                  "use another drill id" % (name, drill_id, have.get(TAG_DRILL_ID),
                                                            profile.get("Path")))
    changed = profile.get("Arn") is None or "create instance profile %s" % name in actions
    for other in profile.get("Roles") or []:
        if other["RoleName"] != role_name:
            actions.append("remove role %s from instance profile %s" % (other["RoleName"], name))
            changed = True
            if not check_mode:
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=other["RoleName"])
    if role_name not in [r["RoleName"] for r in profile.get("Roles") or []]:
        actions.append("add role %s to instance profile %s" % (role_name, name))
        changed = True
        if not check_mode:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role_name)
    return {"name": name, "arn": profile.get("Arn"), "changed": changed}


# ---------------------------------------------------------------- up / down


def _instances(ec2, drill_id: str, states=LIVE_STATES) -> list:
    flt = [{"Name": "tag:%s" % TAG_DRILL_ID, "Values": [drill_id]},
           {"Name": "instance-state-name", "Values": list(states)}]
    found = [i for r in paginate(ec2, "describe_instances", "Reservations", Filters=flt) for i in r.get("Instances")
             or []]
    # Re-filtered here: a filter an endpoint ignored must not let another drill's instance in.
    prefix = instance_name(drill_id, "")
    return [i for i in found if boto3_tag_list_to_ansible_dict(i.get("Tags")).get(TAG_DRILL_ID) == drill_id
            and str(boto3_tag_list_to_ansible_dict(i.get("Tags")).get("Name", "")).startswith(prefix)
            and (i.get("State") or {}).get("Name") in states]


def tier_instance_ids(live: dict, drill_id: str, tiers: list) -> dict:
    """``{tier: instance id}`` for each of ``tiers`` with exactly one instance in ``live`` (instances by Name)."""
    return {t: live[instance_name(drill_id, t)][0]["InstanceId"] for t in tiers
            if len(live.get(instance_name(drill_id, t)) or []) == 1}


def resolve_ami(ssm, ami: str | None, parameter: str) -> str:
    if ami:
        return ami
    try:
        return ssm.get_parameter(Name=parameter)["Parameter"]["Value"]
    except ClientError as exc:
        raise Ec2RuntimeError("the AMI could not be read from the SSM public parameter %s (%s); pass ec2.ami"
                              % (parameter, describe_error(exc))) from None


def _profile_not_ready(exc: BaseException) -> bool:
    """What RunInstances answers while a new instance profile has not reached EC2 yet."""
    text = describe_error(exc).lower()
    return error_code(exc) in ("InvalidParameterValue", "NoSuchEntity") and "profile" in text


def require_ssm_endpoints(boundary) -> None:
    """Refuse a boundary without ``ssm_endpoints: true``: nothing could reach the instances (before any call)."""
    if not ssm_endpoints_declared(boundary):
        raise Ec2RuntimeError("the ec2 runtime is reached through SSM interface endpoints, which the boundary does "
                              "not declare; set drill_boundary.ssm_endpoints true and build the network again")


def up(clients: dict, drill_id: str, boundary, tags: dict, *, role_name: str | None = None, ami: str | None = None,
       ami_parameter: str = AMI_PARAMETER, instance_type: str = INSTANCE_TYPE, wait_timeout: int = 600,
       check_mode: bool = False) -> dict:
    """One instance per tier (plus ``validation``) of the drill, running; idempotent (found by tags and names).

    ``clients``: ``ec2``, ``iam``, ``ssm`` from ``_aws.aws_client``. ``tags``: the drill's tags.
    ``role_name``: the instances' role; by default the runtime's own (:func:`ensure_runtime_role`).
    """
    require_ssm_endpoints(boundary)
    ec2, iam = clients["ec2"], clients["iam"]
    actions: list = []
    network = find_network(ec2, drill_id, boundary)
    tiers = runtime_tiers(boundary)
    if SESSION_SECRET in tiers:
        raise Ec2RuntimeError("a tier may not be named %r on the ec2 runtime (that secret name holds the drill's "
                              "session); rename the tier" % SESSION_SECRET)
    live = {}
    for inst in _instances(ec2, drill_id):
        name = boto3_tag_list_to_ansible_dict(inst.get("Tags")).get("Name")
        live.setdefault(name, []).append(inst)
    known = tier_instance_ids(live, drill_id, tiers)
    planned, own = False, None
    if not role_name:
        own = ensure_runtime_role(iam, drill_id, tags, ec2.meta.region_name, check_mode=check_mode, actions=actions,
                                  instances=known)
        role_name, planned = own["name"], own["planned"]
    profile = ensure_profile(iam, drill_id, role_name, tags, check_mode=check_mode, actions=actions,
                             role_planned=planned)
    image = resolve_ami(clients["ssm"], ami, ami_parameter)
    units, started = [], []
    for i, tier in enumerate(tiers):
        name = instance_name(drill_id, tier)
        subnet_id, group_id = network["subnet_ids"][i % len(network["subnet_ids"])], network["groups"][tier]
        have = live.pop(name, [])
        if len(have) > 1:
            raise Ec2RuntimeError("drill %s has %d instances named %s where there must be one; tear the runtime "
                                  "down (state absent) and start it again" % (drill_id, len(have), name))
        if have:
            inst = have[0]
            problems = instance_problems(inst, subnet_id=subnet_id, group_id=group_id, profile_arn=profile["arn"])
            if problems:
                raise Ec2RuntimeError("instance %s (%s) is not what the runtime launches: %s; tear the runtime down "
                                      "(state absent) and start it again" % (inst["InstanceId"], name,
                                                                             "; ".join(problems)),
                                      instance_id=inst["InstanceId"], problems=problems)
            if inst["State"]["Name"] in ("stopping", "stopped"):
                actions.append("start instance %s (%s)" % (inst["InstanceId"], name))
                if not check_mode:
                    ec2.get_waiter("instance_stopped").wait(InstanceIds=[inst["InstanceId"]])
                    ec2.start_instances(InstanceIds=[inst["InstanceId"]])
                started.append(inst["InstanceId"])
            units.append({"tier": tier, "instance_id": inst["InstanceId"], "address": inst.get("PrivateIpAddress"),
                          "subnet_id": subnet_id, "security_group_id": group_id})
            continue
        actions.append("launch instance %s in %s" % (name, subnet_id))
        if check_mode:
            units.append({"tier": tier, "instance_id": None, "address": None, "subnet_id": subnet_id,
                          "security_group_id": group_id})
            continue
        request = launch_request(drill_id, tier, ami=image, instance_type=instance_type, subnet_id=subnet_id,
                                 group_id=group_id, profile=profile["name"], tags=tags)
        inst = retry_while(lambda r=request: ec2.run_instances(**r)["Instances"][0], _profile_not_ready,
                           PROFILE_PROPAGATION_WAIT)
        started.append(inst["InstanceId"])
        units.append({"tier": tier, "instance_id": inst["InstanceId"], "address": inst.get("PrivateIpAddress"),
                      "subnet_id": subnet_id, "security_group_id": group_id})
    strays = [inst["InstanceId"] for group in live.values() for inst in group]
    if strays:
        raise Ec2RuntimeError("drill %s has instances that are no tier's (%s); tear the runtime down (state absent) "
                              "and start it again" % (drill_id, ", ".join(strays)), instances=strays)
    if started and not check_mode:
        _wait(ec2, "instance_running", started, wait_timeout)
    if own is not None:  # before any secret is fetched: each tier's instance may read its own secret only
        put_tier_statements(iam, drill_id, own, ec2.meta.region_name,
                            {u["tier"]: u["instance_id"] for u in units if u["instance_id"]},
                            check_mode=check_mode, actions=actions)
    certificates = []
    if "secretsmanager" in clients:
        certificates = ensure_certificates(clients["secretsmanager"], drill_id, tiers, tags, check_mode=check_mode,
                                           actions=actions)
        if check_mode:  # nothing is sent in check mode
            certificates = [dict(c, delivered=None, reason="check mode") for c in certificates]
        elif certificates:
            certificates = deliver_certificates(clients["ssm"], certificates, units, ec2.meta.region_name)
    # prefix: what every name of the runtime starts with; no collector: the telemetry collector is netns-only.
    return {"changed": bool(actions), "backend": "ec2", "units": units, "vpc_id": network["vpc_id"],
            "prefix": instance_name(drill_id, ""), "collector": None, "certificates": certificates,
            "instance_profile": profile["name"], "instance_role": role_name, "ami": image, "actions": actions}


def _wait(ec2, waiter: str, ids: list, timeout: int) -> None:
    delay = 5
    try:
        ec2.get_waiter(waiter).wait(InstanceIds=ids, WaiterConfig={"Delay": delay,
                                                                   "MaxAttempts": max(1, int(timeout) // delay)})
    except Exception as exc:  # botocore WaiterError: the instances did not get there in time
        raise Ec2RuntimeError("instances %s did not reach %s within %d s (%s); look at them in the EC2 console, "
                              "then tear the runtime down" % (", ".join(ids), waiter.split("_", 1)[1], timeout,
                                                              str(exc)[:200]), instances=ids) from None


def down(clients: dict, drill_id: str, *, wait_timeout: int = 600, check_mode: bool = False) -> dict:
    """Terminate the drill's instances, wait until they are gone and delete its instance profile."""
    ec2, iam = clients["ec2"], clients["iam"]
    ids = [i["InstanceId"] for i in _instances(ec2, drill_id, LIVE_STATES + ("shutting-down",))]
    actions = []
    if ids:
        actions.append("terminate instances %s" % ", ".join(ids))
        if not check_mode:
            ec2.terminate_instances(InstanceIds=ids)
            _wait(ec2, "instance_terminated", ids, wait_timeout)
    name = profile_name(drill_id)
    profile = get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=name)
    if profile is not None:
        if boto3_tag_list_to_ansible_dict(profile.get("Tags")).get(TAG_DRILL_ID) != drill_id:
            raise Ec2RuntimeError("instance profile %s is not drill %s's (its drguard:drill-id tag differs); it was "
                                  "left as it is" % (name, drill_id))
        actions.append("delete instance profile %s" % name)
        if not check_mode:
            for role in profile.get("Roles") or []:
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
            iam.delete_instance_profile(InstanceProfileName=name)
    role = delete_runtime_role(iam, drill_id, check_mode=check_mode, actions=actions)
    secrets = (delete_certificates(clients["secretsmanager"], drill_id, check_mode=check_mode, actions=actions)
               if "secretsmanager" in clients else [])
    if not check_mode:
        left = [i["InstanceId"] for i in _instances(ec2, drill_id, LIVE_STATES + ("shutting-down",))]
        if left:
            raise Ec2RuntimeError("instances %s of drill %s are still there after termination; run the sweep for "
                                  "the drill" % (", ".join(left), drill_id), remaining=left)
    return {"changed": bool(actions), "backend": "ec2", "units": [], "removed": {"instances": ids,
            "instance_profile": name if profile is not None else None, "instance_role": role, "secrets": secrets},
            "actions": actions}


# ---------------------------------------------------------------- SSM Run Command


def run_command(ssm, instance_ids: list, commands: list, *, timeout: float = 60, poll: float = 2.0,
                comment: str = "drguard", sleep=time.sleep, clock=time.monotonic,
                output_limit: int = OUTPUT_LIMIT) -> list:
    """Run ``commands`` (shell lines) on every instance through SSM and wait at most ``timeout`` seconds.

    Returns one ``{"instance_id", "command_id", "status", "response_code", "stdout", "stderr"}`` per
    instance. ``status`` is SSM's final status, or ``unknown`` when none came back in time (the
    caller must treat ``unknown`` as a failure: fail closed). Output is cut to ``output_limit`` characters
    (2000 by default; SSM itself returns at most 24 000 of stdout).
    """
    cmd = ssm.send_command(InstanceIds=list(instance_ids), DocumentName="AWS-RunShellScript",
                           Parameters={"commands": list(commands)}, TimeoutSeconds=max(30, int(timeout)),
                           Comment=comment[:100])["Command"]
    command_id = cmd["CommandId"]
    deadline = clock() + timeout
    results = {}
    pending = list(instance_ids)
    while pending:
        for iid in list(pending):
            try:
                inv = ssm.get_command_invocation(CommandId=command_id, InstanceId=iid)
            except ClientError as exc:
                if error_code(exc) != "InvocationDoesNotExist":  # not registered yet, right after SendCommand
                    raise
                continue
            if inv.get("Status") in FINAL_STATUSES:
                results[iid] = {"instance_id": iid, "command_id": command_id, "status": inv["Status"],
                                "response_code": inv.get("ResponseCode"),
                                "stdout": (inv.get("StandardOutputContent") or "")[:output_limit],
                                "stderr": (inv.get("StandardErrorContent") or "")[:OUTPUT_LIMIT]}
                pending.remove(iid)
        if not pending or clock() + poll > deadline:
            break
        sleep(poll)
    for iid in pending:
        results[iid] = {"instance_id": iid, "command_id": command_id, "status": "unknown", "response_code": None,
                        "stdout": "", "stderr": ""}
    return [results[i] for i in instance_ids]


def unprivileged_command(python_source: str, stdin_json: dict) -> str:
    """One shell line running ``python_source`` unprivileged (uid 65534, no capability, empty environment) with
    ``stdin_json`` on its stdin; both travel base64-encoded, so nothing in them is shell syntax."""
    src = base64.b64encode(python_source.encode()).decode()
    data = base64.b64encode(json.dumps(stdin_json).encode()).decode()
    return ("echo %s | base64 -d | %s /usr/bin/python3 -I -S -c \"$(echo %s | base64 -d)\""
            % (data, UNPRIVILEGED, src))


# ---------------------------------------------------------------- probes through SSM


def _first_host(cidr) -> str:
    net = ipaddress.ip_network(str(cidr))
    return str(net.network_address) if net.num_addresses == 1 else str(next(net.hosts()))


def probe_matrix(boundary, units: list) -> list:
    """The probe rows of the ec2 runtime (the report's row shape, as ``_probes.probe_matrix``).

    From every instance: production (the first host of each production CIDR, TCP 5432, 443, 6514:
    deny), every declared egress and fallback port on the first host of its CIDR (allow; port 53
    left out), every tier rule to the destination tier's instance (allow).
    """
    by_tier = {u["tier"]: u for u in units}
    rows = []
    for unit in units:
        src, src_address = unit["tier"], unit.get("address") or ""
        for cidr in boundary.production_cidrs:
            for port in (5432, 443, 6514):
                rows.append(_probes._row(src, "production", _first_host(cidr), port, ("tcp", "deny", src_address)))
        for rule in boundary.egress + boundary.fallback:
            dst = "fallback" if rule.kind == "fallback" else rule.kind
            for port in port_ends(rule.ports):
                if port != 53:
                    rows.append(_probes._row(src, dst, _first_host(rule.cidr), port,
                                             (rule.protocol, "allow", src_address)))
        for tr in boundary.tier_rules:
            if tr.source == src and by_tier.get(tr.dest, {}).get("address"):
                for port in port_ends(tr.ports):
                    rows.append(_probes._row(src, tr.dest, by_tier[tr.dest]["address"], port,
                                             (tr.protocol, "allow", src_address)))
    return rows


def run_probes(ssm, rows: list, units: list, *, timeout: float = 1.0, command_timeout: float = 60, **kw) -> dict:
    """Every row probed from its tier's instance through SSM (unprivileged); ``{rows, violations, summary}``.

    A row whose result does not come back (no final status in time, a failed command, no or
    unreadable output) is ``unknown`` and a ``probe_failed`` violation: the drill never passes on
    what it could not observe. The emulator runs no command, so there every row is ``unknown``.
    """
    rows = [dict(r) for r in rows]
    by_tier = {u["tier"]: u["instance_id"] for u in units}
    groups = {}
    for i, row in enumerate(rows):
        host, port = row["address"].rsplit(":", 1)
        groups.setdefault(by_tier.get(row["src"]), []).append(
            (i, {"host": host, "port": int(port), "protocol": row["protocol"],
                 "bind": row.get("src_address") or ""}))

    def one(item):
        iid, probes = item
        if not iid:
            return None, "no instance for this tier"
        spec = {"timeout": timeout, "probes": [p for _index, p in probes]}
        res = run_command(ssm, [iid], [unprivileged_command(_probes.PROBE_SOURCE, spec)],
                          timeout=command_timeout, comment="drguard probes", **kw)[0]
        if res["status"] != "Success":
            return None, "SSM command %s on %s: %s" % (res["command_id"], iid, res["status"])
        try:
            out = json.loads(res["stdout"])
            if not isinstance(out, list) or len(out) != len(probes):
                raise ValueError("wrong length")
        except ValueError:
            return None, "SSM command %s on %s ended %s with no probe result in its output" % (
                res["command_id"], iid, res["status"])
        return out, None

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(groups)))) as pool:
        answers = dict(zip(groups, pool.map(one, groups.items()), strict=True))
    violations = []
    for iid, items in groups.items():
        out, error = answers[iid]
        for k, (i, _probe) in enumerate(items):
            if out is None:
                rows[i].update(observed="unknown", reason="no result (%s)" % error, latency_ms=None)
            else:
                rows[i].update(out[k])
    for i, row in enumerate(rows):
        if row["observed"] in ("unknown", "error"):
            violations.append({"code": "probe_failed", "row": i, "detail": _probes._describe(row)})
            continue
        code = _probes._violation(row)
        if code:
            violations.append({"code": code, "row": i, "detail": _probes._describe(row)})
    summary = {"rows": len(rows), "allow": sum(1 for r in rows if r["observed"] == "allow"),
               "deny": sum(1 for r in rows if r["observed"] == "deny"),
               "unknown": sum(1 for r in rows if r["observed"] == "unknown"), "violations": len(violations)}
    return {"rows": rows, "violations": violations, "summary": summary}


# ---------------------------------------------------------------- the live runtime read back

VERIFY_CODES = ("runtime_unreadable", "runtime_instance_missing", "runtime_instance_unexpected",
                "runtime_instance_not_running", "runtime_instance_public_address", "runtime_instance_imds",
                "runtime_instance_subnet", "runtime_instance_security_group", "runtime_instance_profile",
                "runtime_instance_tags", "runtime_instance_role")


def _finding(code, resource, detail):
    return {"code": code, "resource": resource, "detail": detail}


def _instance_findings(inst: dict, tier: str, drill_id: str, network: dict, profile_arn: str | None) -> list:
    name = instance_name(drill_id, tier)
    res = "%s (%s)" % (inst["InstanceId"], name)
    out = []
    if (inst.get("State") or {}).get("Name") != "running":
        out.append(_finding("runtime_instance_not_running", res, "the instance is %s, not running; tear the "
                            "runtime down and start it again" % (inst.get("State") or {}).get("Name")))
    public = [inst["PublicIpAddress"]] if inst.get("PublicIpAddress") else []
    public += [(e.get("Association") or {}).get("PublicIp") for e in inst.get("NetworkInterfaces") or []
               if (e.get("Association") or {}).get("PublicIp")]
    if public or len(inst.get("NetworkInterfaces") or []) != 1:
        out.append(_finding("runtime_instance_public_address", res, "the instance has %s; a tier has one "
                            "interface and no public address: tear the runtime down"
                            % ("the public address %s" % ", ".join(sorted(set(public))) if public
                               else "%d interfaces" % len(inst.get("NetworkInterfaces") or []))))
    meta = inst.get("MetadataOptions") or {}
    if meta.get("HttpTokens") != "required" or int(meta.get("HttpPutResponseHopLimit") or 0) != 1:
        out.append(_finding("runtime_instance_imds", res, "the metadata service takes HttpTokens %s with hop limit "
                            "%s where IMDSv2 only with hop limit 1 is required; tear the runtime down"
                            % (meta.get("HttpTokens"), meta.get("HttpPutResponseHopLimit"))))
    if inst.get("VpcId") != network["vpc_id"] or inst.get("SubnetId") not in network["subnet_ids"]:
        out.append(_finding("runtime_instance_subnet", res, "the instance is in subnet %s of %s, not in a sandbox "
                            "subnet of the drill's VPC %s; tear the runtime down"
                            % (inst.get("SubnetId"), inst.get("VpcId"), network["vpc_id"])))
    groups = sorted({g.get("GroupId") for g in inst.get("SecurityGroups") or []}
                    | {g.get("GroupId") for e in inst.get("NetworkInterfaces") or [] for g in e.get("Groups") or []})
    if groups != [network["groups"][tier]]:
        out.append(_finding("runtime_instance_security_group", res, "the instance is in the groups %s where only the "
                            "%s tier's group %s is allowed; remove the others or tear the runtime down"
                            % (", ".join(groups) or "none", tier, network["groups"][tier])))
    have_profile = (inst.get("IamInstanceProfile") or {}).get("Arn")
    if not profile_arn or have_profile != profile_arn:
        out.append(_finding("runtime_instance_profile", res, "the instance's profile is %s, not the drill's %s; tear "
                            "the runtime down" % (have_profile, profile_arn or profile_name(drill_id))))
    tags = boto3_tag_list_to_ansible_dict(inst.get("Tags"))
    want = {TAG_DRILL_ID: drill_id, "drguard:managed": "true", "Name": name}
    if network.get("expires_at"):
        want[TAG_EXPIRES_AT] = network["expires_at"]
    wrong = sorted(k for k, v in want.items() if tags.get(k) != v)
    if wrong or TAG_EXPIRES_AT not in tags:
        out.append(_finding("runtime_instance_tags", res, "the instance's tags %s are not the drill's; the reaper "
                            "finds a tier by them: tear the runtime down" % ", ".join(wrong or [TAG_EXPIRES_AT])))
    return out


def _role_findings(iam, drill_id: str, role_name: str, region: str, instances: dict | None = None) -> list:
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
    except ClientError as exc:
        if not is_not_found(exc):
            raise
        return [_finding("runtime_instance_role", role_name, "the instances' role does not exist; start the runtime "
                         "again")]
    problems = []
    tags = boto3_tag_list_to_ansible_dict(paginate(iam, "list_role_tags", "Tags", RoleName=role_name))
    if tags.get(TAG_DRILL_ID) != drill_id:
        problems.append("it is not the drill's (tag %r)" % tags.get(TAG_DRILL_ID))
    if role_name == profile_name(drill_id):
        if _policy_doc(role.get("AssumeRolePolicyDocument")) != EC2_TRUST:
            problems.append("it trusts more than %s" % EC2_PRINCIPAL)
        arn = role["Arn"].split(":")
        inline = paginate(iam, "list_role_policies", "PolicyNames", RoleName=role_name)
        attached = paginate(iam, "list_attached_role_policies", "AttachedPolicies", RoleName=role_name)
        if inline != [RUNTIME_POLICY_NAME] or attached:
            problems.append("its policies are %s, not %s only" % (", ".join(
                list(inline) + [a["PolicyArn"] for a in attached]) or "none", RUNTIME_POLICY_NAME))
        elif _policy_doc(iam.get_role_policy(RoleName=role_name, PolicyName=RUNTIME_POLICY_NAME)[
                "PolicyDocument"]) != runtime_policy(drill_id, arn[1], region, arn[4], instances):
            problems.append("its policy %s grants other than the SSM agent's actions and each tier's instance its "
                            "own runtime secret" % RUNTIME_POLICY_NAME)
    elif not _trusts_ec2(role.get("AssumeRolePolicyDocument")):
        problems.append("it does not trust %s" % EC2_PRINCIPAL)
    return [_finding("runtime_instance_role", role_name, "the instances' role is not least privilege: %s; start "
                     "the runtime again (it puts its policy back) or tear it down" % "; ".join(problems))] \
        if problems else []


def verify(clients: dict, drill_id: str, boundary, *, role_name: str | None = None) -> dict:
    """Read the drill's live instances, their profile and role back and compare them with what the runtime launches.

    Returns ``{isolated, findings, checked}`` like the netns verifier; fails closed: what cannot
    be read is a ``runtime_unreadable`` finding, a tier without its instance ``runtime_instance_missing``.
    """
    ec2, iam = clients["ec2"], clients["iam"]
    checked = {"instances": 0, "instance_profiles": 0, "roles": 0}
    try:
        network = find_network(ec2, drill_id, boundary)
    except Ec2RuntimeError as exc:
        return {"isolated": False, "checked": checked,
                "findings": [_finding("runtime_unreadable", "drguard-%s" % drill_id, exc.msg)]}
    findings = []
    role_name = role_name or profile_name(drill_id)
    name = profile_name(drill_id)
    profile_arn = None
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as exc:
        if not is_not_found(exc):
            raise
        findings.append(_finding("runtime_instance_profile", name, "the drill's instance profile does not exist; "
                                 "start the runtime again"))
    else:
        checked["instance_profiles"] = 1
        roles = [r["RoleName"] for r in profile.get("Roles") or []]
        tags = boto3_tag_list_to_ansible_dict(profile.get("Tags"))
        if roles != [role_name] or tags.get(TAG_DRILL_ID) != drill_id or profile.get("Path") != IAM_PATH:
            findings.append(_finding("runtime_instance_profile", name, "the instance profile holds %s (tag %r, path "
                                     "%s) where it must hold %s only and be the drill's; tear the runtime down"
                                     % (", ".join(roles) or "no role", tags.get(TAG_DRILL_ID), profile.get("Path"),
                                        role_name)))
        else:
            profile_arn = profile["Arn"]
    live = {}
    for inst in _instances(ec2, drill_id, LIVE_STATES + ("shutting-down",)):
        live.setdefault(boto3_tag_list_to_ansible_dict(inst.get("Tags")).get("Name"), []).append(inst)
    # The policy the runtime puts once its instances run: one statement per tier with exactly one instance.
    instances = tier_instance_ids(live, drill_id, runtime_tiers(boundary))
    findings += _role_findings(iam, drill_id, role_name, ec2.meta.region_name, instances)
    checked["roles"] = 0 if any(f["code"] == "runtime_instance_role" and "does not exist" in f["detail"]
                                for f in findings) else 1
    for tier in runtime_tiers(boundary):
        have = live.pop(instance_name(drill_id, tier), [])
        if not have:
            findings.append(_finding("runtime_instance_missing", instance_name(drill_id, tier), "tier %s has no "
                                     "instance; start the runtime again" % tier))
        for extra in have[1:]:
            resource = "%s (%s)" % (extra["InstanceId"], instance_name(drill_id, tier))
            findings.append(_finding("runtime_instance_unexpected", resource,
                                     "tier %s has more than one instance; tear the runtime down" % tier))
        for inst in have[:1]:
            checked["instances"] += 1
            findings += _instance_findings(inst, tier, drill_id, network, profile_arn)
    for stray_name, group in live.items():
        for inst in group:
            findings.append(_finding("runtime_instance_unexpected", "%s (%s)" % (inst["InstanceId"], stray_name),
                                     "the instance carries the drill's tags but is no tier's; terminate it"))
    findings.sort(key=lambda f: (f["code"], f["resource"]))
    return {"isolated": not findings, "findings": findings, "checked": checked}


def live_units(ec2, drill_id: str, boundary) -> list:
    """The tiers' units as they run now, read from EC2 by tags and names (``instance_id`` None: no running instance)."""
    running = {}
    for inst in _instances(ec2, drill_id, ("running",)):
        running.setdefault(boto3_tag_list_to_ansible_dict(inst.get("Tags")).get("Name"), []).append(inst)
    units = []
    for tier in runtime_tiers(boundary):
        have = running.get(instance_name(drill_id, tier)) or []
        # Two instances of one tier: neither is probed (which one would answer for the tier is unknown).
        inst = have[0] if len(have) == 1 else {}
        units.append({"tier": tier, "instance_id": inst.get("InstanceId"), "address": inst.get("PrivateIpAddress")})
    return units


# ---------------------------------------------------------------- the tiers' certificates, through the secret store

CERT_DIR = "/run/drguard/tls"  # tmpfs on the instance; 0700, owned by the unprivileged workload uid
# Run on the instance (as the SSM agent's root, to hand the files to uid 65534): splits the bundle read from
# the secret store into ca.pem / cert.pem / key.pem (0600) and prints only the certificate's SHA-256.
_SPLIT_SOURCE = r"""
import hashlib, json, os, sys
d = sys.argv[1]
b = json.load(open(os.path.join(d, "bundle.json")))
for name, key in (("ca.pem", "ca_bundle"), ("cert.pem", "cert"), ("key.pem", "key")):
    p = os.path.join(d, name)
    fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.write(fd, b[key].encode()); os.fchown(fd, 65534, 65534); os.close(fd); os.replace(p + ".tmp", p)
os.unlink(os.path.join(d, "bundle.json"))
print("delivered " + hashlib.sha256(b["cert"].encode()).hexdigest())
"""


def certificate_secret_name(drill_id: str, tier: str) -> str:
    """The Secrets Manager secret holding ``tier``'s bundle: ``drguard/<drill id>/runtime/<tier>``."""
    return runtime_secret_prefix(drill_id) + tier


def fetch_secret_line(secret: str, region: str, path: str, attempts: int = 6, pause: int = 5) -> str:
    """One shell line fetching ``secret``'s value into ``path`` with the instance's role, retried a few times.

    The runtime puts the per-tier statements (:func:`runtime_policy`) only once the instances run, and IAM
    takes a few seconds to apply a changed policy; the line fails (non-zero) when every attempt failed.
    """
    return ("for n in $(seq %d); do aws secretsmanager get-secret-value --region %s --secret-id %s --query "
            "SecretString --output text > %s && break; rm -f %s; sleep %d; done; test -s %s"
            % (attempts, shlex.quote(region), shlex.quote(secret), path, path, pause, path))


def fetch_commands(secret: str, region: str) -> list:
    """The shell lines an instance runs to fetch its bundle with its own role: only the secret's name travels."""
    bundle = "%s/bundle.json" % CERT_DIR
    return ["set -eu", "umask 077",
            "install -d -m 0700 -o 65534 -g 65534 %s" % CERT_DIR,
            fetch_secret_line(secret, region, bundle),
            "/usr/bin/python3 -I -S -c %s %s" % (shlex.quote(_SPLIT_SOURCE), CERT_DIR)]


def drill_secret(sm, drill_id: str, name: str) -> dict | None:
    """``DescribeSecret`` of secret ``name``, or None when there is none; one that is not drill ``drill_id``'s
    (its ``drguard:drill-id`` tag) is refused, never to be read or overwritten."""
    try:
        meta = sm.describe_secret(SecretId=name)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    if boto3_tag_list_to_ansible_dict(meta.get("Tags")).get(TAG_DRILL_ID) != drill_id:
        raise Ec2RuntimeError("secret %s exists but is not drill %s's (its drguard:drill-id tag differs); remove it "
                              "or use another drill id" % (name, drill_id))
    return meta


def _read_bundle(sm, drill_id: str, name: str):
    meta = drill_secret(sm, drill_id, name)
    if meta is None:
        return None, None
    try:
        bundle = json.loads(sm.get_secret_value(SecretId=name)["SecretString"])
        return meta, bundle
    except (ClientError, ValueError, KeyError):
        return meta, None


def _bundle_usable(bundle, drill_id: str, tier: str, ca_pem) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(bundle["cert"].encode())
        ca = x509.load_pem_x509_certificate(bundle["ca_bundle"].encode())
        got, reason = _pki.check_leaf(cert, [ca], drill_id, purpose="server")
        return (bundle["ca_bundle"] == ca_pem and reason is None and got == tier and not _pki.needs_renewal(cert)
                and bundle.get("key", "").startswith("-----BEGIN"))
    except Exception:  # anything unreadable is issued again
        return False


def ensure_certificates(sm, drill_id: str, tiers: list, tags: dict, *, check_mode: bool, actions: list,
                        leaf_lifetime: int = _pki.DEFAULT_LEAF_LIFETIME, now=None) -> list:
    """One bundle per tier (CA certificate, the tier's leaf and key) in the secret store, tagged as the drill's.

    Kept while every tier's bundle verifies under one CA and is not due for renewal; otherwise a
    new CA (valid until the drill expires, never its key stored) signs every tier's leaf again.
    Returns per tier ``{tier, secret, serial, sha256, not_after}``: never key material.
    """
    names = {t: certificate_secret_name(drill_id, t) for t in tiers}
    found = {t: _read_bundle(sm, drill_id, names[t]) for t in tiers}
    ca_pems = {b["ca_bundle"] for _m, b in found.values() if isinstance(b, dict) and "ca_bundle" in b}
    ca_pem = next(iter(ca_pems)) if len(ca_pems) == 1 else None
    keep = ca_pem is not None and all(b is not None and _bundle_usable(b, drill_id, t, ca_pem)
                                      for t, (_m, b) in found.items())
    bundles = {t: found[t][1] for t in tiers}
    if not keep:
        for tier in tiers:
            actions.append("put the %s tier's certificate in secret %s" % (tier, names[tier]))
        if check_mode:
            return []
        expires = tags.get(TAG_EXPIRES_AT)
        ttl = int((parse_time(expires) - datetime.now(timezone.utc)).total_seconds()) if expires else 0
        if ttl < _pki.MIN_CA_LEFT:
            raise Ec2RuntimeError("the drill expires at %s, too soon for its CA; start a new drill" % expires)
        ca = _pki.new_ca(drill_id, ttl, now=now)
        ca_text = _pki.cert_pem(ca.cert).decode()
        for tier in tiers:
            leaf = _pki.issue_leaf(ca, drill_id, tier, min(leaf_lifetime, ttl), now=now)
            bundle = {"ca_bundle": ca_text, "cert": _pki.cert_pem(leaf.cert).decode(),
                      "key": _pki.key_pem(leaf.key).decode()}
            text = json.dumps(bundle)
            if found[tier][0] is None:
                sm.create_secret(Name=names[tier], SecretString=text, Tags=ansible_dict_to_boto3_tag_list(tags),
                                 Description="drguard drill %s: the %s tier's certificate bundle" % (drill_id, tier))
            else:
                sm.put_secret_value(SecretId=names[tier], SecretString=text)
            bundles[tier] = bundle
    out = []
    for tier in tiers:
        cert = x509.load_pem_x509_certificate(bundles[tier]["cert"].encode())
        out.append({"tier": tier, "secret": names[tier], "serial": _pki.serial_hex(cert),
                    "sha256": hashlib.sha256(bundles[tier]["cert"].encode()).hexdigest(),
                    "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")})
    return out


def deliver_certificates(ssm, certificates: list, units: list, region: str, *, command_timeout: float = 60,
                         **kw) -> list:
    """Have each tier's instance fetch its bundle from the secret store with its own role (one SSM command each).

    ``delivered`` is true only when the instance printed the SHA-256 of the certificate that was
    stored; anything else (no final status, a failed command, no or another confirmation) is
    false with the reason (fail closed: the emulator runs no command, so there it is always false).
    """
    by_tier = {u["tier"]: u.get("instance_id") for u in units}

    def one(cert):
        iid = by_tier.get(cert["tier"])
        if not iid:
            return dict(cert, delivered=False, reason="no instance for this tier")
        res = run_command(ssm, [iid], fetch_commands(cert["secret"], region), timeout=command_timeout,
                          comment="drguard certificates", **kw)[0]
        if res["status"] == "Success" and "delivered %s" % cert["sha256"] in res["stdout"].split("\n"):
            return dict(cert, delivered=True, reason="confirmed by the instance")
        return dict(cert, delivered=False, reason="SSM command %s on %s ended %s without confirming the certificate"
                    % (res["command_id"], iid, res["status"]))

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(certificates)))) as pool:
        return list(pool.map(one, certificates))


def delete_certificates(sm, drill_id: str, *, check_mode: bool, actions: list) -> list:
    """Delete the drill's runtime secrets (found by name prefix, proven by tag), without a recovery window."""
    prefix = runtime_secret_prefix(drill_id)
    found = paginate(sm, "list_secrets", "SecretList", Filters=[{"Key": "name", "Values": [prefix]}])
    gone = []
    for sec in found:
        if not sec["Name"].startswith(prefix):
            continue
        if boto3_tag_list_to_ansible_dict(sec.get("Tags")).get(TAG_DRILL_ID) != drill_id:
            raise Ec2RuntimeError("secret %s is not drill %s's (its drguard:drill-id tag differs); it was left as it "
                                  "is" % (sec["Name"], drill_id))
        actions.append("delete secret %s" % sec["Name"])
        if not check_mode:
            sm.delete_secret(SecretId=sec["Name"], ForceDeleteWithoutRecovery=True)
        gone.append(sec["Name"])
    return gone
