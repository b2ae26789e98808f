# Copyright: drguard maintainers
# Apache License 2.0
"""Discovery and deletion engine behind ``drguard.sandbox.sweep`` (guaranteed teardown).

Resources are found through each service's own describe/list calls (never the
resource-groups tagging API, which misses NACLs, transit gateway attachments, VPC
endpoints and IAM roles). A server-side tag filter only narrows the listing; the
authority is always the client-side check of the resource's own tags, so a service
that ignores a filter can never make us delete a foreign resource.

Deletion runs in dependency order, in parallel inside each step::

    instances, NAT gateways, VPC endpoints, flow logs, peerings, TGW attachments
      -> elastic IPs, internet gateways, VPN gateways (detached first)
      -> network interfaces
      -> subnets, route tables, network ACLs, security groups
      -> VPCs
    IAM roles/policies, log groups, secrets, KMS keys, S3 buckets, SNS topics: alongside

The EC2 chain and everything else run side by side; outside EC2 nothing waits for
anything. Discovery is one parallel pass (each kind proves its candidates as soon as its
own listing is in; a VPC is read once per pass). Every call goes through a client from
``_aws.aws_client`` (transient errors retried); dependency errors are retried with
``_aws.retry_while`` until the deadline; "not found" means already gone. As soon as a
chain's deletions are done it discovers its own kinds again: what is still there is what
remains.

Nothing is deleted on the strength of a listing or a file. Right before deleting, each
resource is read again through its own describe/get call and must prove that it is the
drill's (:func:`prove`): the full drguard tag set (``drguard:managed=true``, a valid
``drguard:drill-id`` - the swept drill's in teardown - and an RFC 3339
``drguard:expires-at``, in the past for the reaper) *and* the drill's naming convention
(EC2 ``Name`` tag ``drguard-<drill id>...`` inside the drill's own VPC, IAM path
``/drguard/`` and name ``drguard-<drill id>...``, log group ``/drguard/<drill id>...``,
secret ``drguard/<drill id>/...``, KMS alias ``alias/drguard/<drill id>`` (or the key's
description ``drguard drill <drill id>: ...``), bucket and
topic ``drguard-<drill id>...``). A resource that fails is *refused*: reported with the
reason, never deleted.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # handled by AnsibleAWSModule
    BotoCoreError = ClientError = Exception

from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_EXPIRES_AT
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_MANAGED
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import expiry_of
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import tag_problem
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate as _paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while

WORKERS = 16
IAM_PATH = "/drguard/"

# Beyond "not found": a gateway already detached is as good as gone for a sweep.
_ALSO_GONE_CODES = {"Gateway.NotAttached"}
# Error codes that mean "something still depends on it / it is busy: try again later".
_RETRY_CODES = {
    "DependencyViolation", "IncorrectState", "InvalidNetworkInterface.InUse", "ResourceInUse",
    "InvalidIPAddress.InUse", "DeleteConflict", "ConcurrentModification", "ConcurrentModificationException",
    "OperationAbortedException", "OperationAborted", "InvalidState", "IncorrectInstanceState",
    "InvalidTransitGatewayAttachment.InvalidState", "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
}


class SweepError(Exception):
    """The sweep's one error: bad options, or a deletion that cannot succeed; ``str()`` is the reason."""


def _tag_map(items: list | None, key: str = "Key", value: str = "Value") -> dict:
    return boto3_tag_list_to_ansible_dict(items or [], key, value)


def is_gone(exc: BaseException) -> bool:
    return is_not_found(exc) or error_code(exc) in _ALSO_GONE_CODES


def is_retryable(exc: BaseException) -> bool:
    code = error_code(exc)
    if code in _RETRY_CODES:
        return True
    if code == "InvalidParameterValue":
        text = describe_error(exc).lower()
        return "in use" in text or "in-use" in text or "dependenc" in text
    return False


@dataclass
class Resource:
    type: str
    id: str
    tags: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    reason: str | None = None

    @property
    def key(self) -> tuple:
        return (self.type, self.id)

    def as_dict(self, with_reason: bool = False) -> dict:
        out = {"type": self.type, "id": self.id, "drill_id": self.tags.get(TAG_DRILL_ID),
               "expires_at": self.tags.get(TAG_EXPIRES_AT)}
        if with_reason:
            out["reason"] = self.reason
        return out


class Selector:
    """Which tagged resources a sweep considers: one drill's (or several drills'), or every expired managed one.

    ``matches`` only picks candidates from a listing; :func:`prove` decides, on a fresh read,
    whether a candidate may be deleted.
    """

    def __init__(self, drill_id: str | None = None, as_of=None, drill_ids=None):
        ids = [drill_id] if drill_id is not None else list(drill_ids or [])
        self.drill_ids = frozenset(ids) if ids else None  # None: the reaper's expired mode
        self.as_of = as_of

    def matches(self, tags: dict) -> bool:
        """A candidate: one of the drills' ids (teardown), or managed and not known to expire later (reaper)."""
        if self.drill_ids is not None:
            return tags.get(TAG_DRILL_ID) in self.drill_ids
        if tags.get(TAG_MANAGED) != "true":
            return False
        expiry = expiry_of(tags)
        return expiry is None or expiry <= self.as_of  # no readable expiry: a candidate, refused by prove()

    def tag_problem(self, tags: dict) -> str | None:
        """Why ``tags`` do not make a resource deletable by this sweep (None: they do)."""
        if self.drill_ids is None:
            problem = tag_problem(tags)
            if problem is None and expiry_of(tags) > self.as_of:
                problem = "tag %s %s is later than %s" % (TAG_EXPIRES_AT, tags[TAG_EXPIRES_AT],
                                                          format_time(self.as_of))
            return problem
        owner = tags.get(TAG_DRILL_ID)
        if owner not in self.drill_ids and len(self.drill_ids) > 1:
            return "tag %s is %r, not one of %s" % (TAG_DRILL_ID, owner, ", ".join(sorted(self.drill_ids)))
        return tag_problem(tags, owner if owner in self.drill_ids else next(iter(self.drill_ids)))

    def owns(self, tags: dict) -> bool:
        """Whether a refused resource still counts as *remaining*: it carries a swept drill's id
        (teardown), or a complete tag set whose expiry has passed (reaper)."""
        if self.drill_ids is not None:
            return tags.get(TAG_DRILL_ID) in self.drill_ids
        return tag_problem(tags) is None and expiry_of(tags) <= self.as_of

    @property
    def tag_key(self) -> str:
        return TAG_DRILL_ID if self.drill_ids is not None else TAG_MANAGED

    @property
    def tag_values(self) -> list:
        return sorted(self.drill_ids) if self.drill_ids is not None else ["true"]

    def ec2_filters(self) -> list:
        return [{"Name": "tag:%s" % self.tag_key, "Values": self.tag_values}]


def parallel(fn: Callable, items: list, workers: int = WORKERS) -> list:
    """``[fn(x) for x in items]`` in threads; exceptions are returned, not raised."""
    def safe(item):
        try:
            return fn(item)
        except Exception as exc:  # noqa: BLE001 - the caller turns it into a record
            return exc
    items = list(items)
    if len(items) <= 1:
        return [safe(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(safe, items))


def _all(results: list) -> list:
    """The results of :func:`parallel`, raising the first exception among them."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


class Context:
    """Clients, selector and deadline shared by every kind during one sweep."""

    def __init__(self, client_factory: Callable, selector: Selector, deadline: float):
        self._factory = client_factory
        self._clients: dict = {}
        self._lock = threading.Lock()
        self.selector = selector
        self.deadline = deadline
        self.mutated = False  # any mutating call succeeded (objects deleted from a bucket that stays, ...)

    def client(self, service: str):
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._factory(service)
            return self._clients[service]

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def retry(self, fn: Callable, *args, _mutates: bool = True, **kwargs):
        """Call the mutating ``fn``; retry dependency errors (``DependencyViolation``, in use, ...) until the deadline.

        Throttling and other transient errors are already retried by the client itself
        (``_aws.aws_client``); this waits for *dependencies* to go, with ``_aws.retry_while``'s
        backoff. Returns ``None`` when the target turned out to be gone already.
        """
        try:
            result = retry_while(lambda: fn(*args, **kwargs), is_retryable, max(self.time_left(), 0.0))
        except ClientError as exc:
            if is_gone(exc):
                return None
            raise
        if _mutates:
            self.mutated = True  # only ever set, never cleared: safe across threads
        return result


class Reads:
    """Reads shared by the proofs of one pass (a VPC that many resources live in is read once).

    One ``Reads`` per pass - a discovery, or one deletion step right before it deletes - so a
    proof never rests on a read older than its pass. Threads that ask for the same thing at
    the same time wait for the one read.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._futures: dict = {}

    def once(self, key, compute: Callable):
        with self._lock:
            fut = self._futures.get(key)
            owner = fut is None
            if owner:
                fut = self._futures[key] = Future()
        if owner:
            try:
                fut.set_result(compute())
            except Exception as exc:  # noqa: BLE001 - handed to every reader of this key
                fut.set_exception(exc)
        return fut.result()


# --------------------------------------------------------------------------- kinds


class Kind:
    """One resource type: how to find it (by tag, by id) and how to delete it."""

    name = ""
    service = ""
    wait_gone = False          # wait until it is gone before the next EC2 step
    extra_gone_codes: tuple = ()  # codes that mean "gone" for this kind only (S3 HEAD's bare "404")

    def discover(self, ctx: Context) -> list:
        raise NotImplementedError

    def fetch(self, ctx: Context, rid: str) -> Resource | None:
        """``rid`` as it is now; raises what the service raises (``lookup`` handles "gone")."""
        raise NotImplementedError

    def lookup(self, ctx: Context, rid: str) -> Resource | None:
        """``rid`` as it is now, or None when it is gone."""
        try:
            return self.fetch(ctx, rid)
        except ClientError as exc:
            if is_gone(exc) or error_code(exc) in self.extra_gone_codes:
                return None
            raise

    def delete(self, ctx: Context, res: Resource) -> None:
        """Delete ``res``, as read (and proven) right before; "already gone" is success."""
        raise NotImplementedError

    def remaining_reason(self, res: Resource) -> str | None:
        """Why ``res`` may legitimately still exist after its deletion (None: no known reason)."""
        return None

    def convention_problem(self, ctx: Context, res: Resource, drill_id: str, reads: Reads) -> str | None:
        """Why ``res`` (freshly read) does not follow drill ``drill_id``'s naming convention (None: it does).

        Other resources it depends on (its VPC) are read through ``reads``: once per pass.
        """
        raise NotImplementedError


def _prefixed(what: str, value, prefix: str, exact: str | None = None) -> str | None:
    """None when ``value`` is ``exact`` or starts with ``prefix``, else why not."""
    if isinstance(value, str) and (value == exact or value.startswith(prefix)):
        return None
    return "%s %r does not start with %r" % (what, value, exact or prefix)


def _drill_name(what: str, value, drill_id: str) -> str | None:
    """The ``drguard-<drill id>`` / ``drguard-<drill id>-...`` convention."""
    base = "drguard-%s" % drill_id
    return _prefixed(what, value, base + "-", base)


def _iam_problem(meta: dict, name_key: str, drill_id: str) -> str | None:
    if meta.get("Path") != IAM_PATH:
        return "IAM path %r is not %s" % (meta.get("Path"), IAM_PATH)
    return _drill_name("name", meta.get(name_key), drill_id)


class Ec2Kind(Kind):
    service = "ec2"
    op = ""
    key = ""
    id_field = ""
    ids_param = ""
    filter_param = "Filters"
    server_filter = True
    gone_states: tuple = ()

    def items(self, response_items: list) -> list:
        return response_items

    def state(self, item: dict) -> str | None:
        return item.get("State")

    def to_resource(self, item: dict) -> Resource | None:
        state = self.state(item)
        if isinstance(state, dict):
            state = state.get("Code") or state.get("Name")
        if state in self.gone_states:
            return None
        return Resource(self.name, item[self.id_field], _tag_map(item.get("Tags") or item.get("TagSet")), item)

    def _describe(self, ctx: Context, **kwargs) -> list:
        items = self.items(_paginate(ctx.client("ec2"), self.op, self.key, **kwargs))
        return [r for r in (self.to_resource(i) for i in items) if r is not None]

    def discover(self, ctx: Context) -> list:
        kwargs = {self.filter_param: ctx.selector.ec2_filters()} if self.server_filter else {}
        return [r for r in self._describe(ctx, **kwargs) if ctx.selector.matches(r.tags)]

    def fetch(self, ctx: Context, rid: str) -> Resource | None:
        return next((r for r in self._describe(ctx, **{self.ids_param: [rid]}) if r.id == rid), None)

    def vpc_ids(self, res: Resource) -> list:
        """The VPCs ``res`` lives in or is attached to; each must be the drill's own VPC."""
        return [res.meta["VpcId"]] if res.meta.get("VpcId") else []

    def convention_problem(self, ctx, res, drill_id, reads):
        name = res.tags.get("Name")
        if name is None:
            return "tag Name is missing (want 'drguard-%s' or 'drguard-%s-...')" % (drill_id, drill_id)
        problem = _drill_name("tag Name", name, drill_id)
        if problem:
            return problem
        for vpc_id in self.vpc_ids(res):
            problem = _vpc_problem(ctx, vpc_id, drill_id, reads)
            if problem:
                return problem
        return None


def _vpc_problem(ctx: Context, vpc_id: str, drill_id: str, reads: Reads) -> str | None:
    """None when ``vpc_id``, read in this pass, is drill ``drill_id``'s own VPC (full tags and name)."""
    vpc = reads.once(("vpc", vpc_id), lambda: KINDS["vpc"].lookup(ctx, vpc_id))
    if vpc is None:
        return "its VPC %s does not exist" % vpc_id
    problem = tag_problem(vpc.tags, drill_id) or _drill_name("tag Name", vpc.tags.get("Name"), drill_id)
    return "its VPC %s is not drill %s's (%s)" % (vpc_id, drill_id, problem) if problem else None


class Instance(Ec2Kind):
    name, op, key, id_field, ids_param = "ec2_instance", "describe_instances", "Reservations", "InstanceId", \
        "InstanceIds"
    gone_states = ("terminated",)
    wait_gone = True

    def items(self, response_items):
        return [i for r in response_items for i in r.get("Instances", [])]

    def state(self, item):
        return (item.get("State") or {}).get("Name")

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        try:
            ctx.retry(ec2.terminate_instances, InstanceIds=[res.id])
        except ClientError as exc:
            if error_code(exc) != "OperationNotPermitted":
                raise
            # Termination protection on a drill instance must not make it outlive the drill.
            ctx.retry(ec2.modify_instance_attribute, InstanceId=res.id, DisableApiTermination={"Value": False})
            ctx.retry(ec2.terminate_instances, InstanceIds=[res.id])


class NatGateway(Ec2Kind):
    name, op, key, id_field, ids_param = "nat_gateway", "describe_nat_gateways", "NatGateways", "NatGatewayId", \
        "NatGatewayIds"
    filter_param = "Filter"
    gone_states = ("deleted",)
    wait_gone = True

    def delete(self, ctx, res):
        ctx.retry(ctx.client("ec2").delete_nat_gateway, NatGatewayId=res.id)


def _raise_unsuccessful(response: dict) -> None:
    for item in response.get("Unsuccessful") or []:
        err = item.get("Error") or {}
        code = err.get("Code", "")
        if code.endswith("NotFound") or code.endswith(".NotFound"):
            continue
        raise ClientError({"Error": {"Code": code or "Unsuccessful", "Message": err.get("Message", "")}}, "Delete")


class VpcEndpoint(Ec2Kind):
    name, op, key, id_field, ids_param = "vpc_endpoint", "describe_vpc_endpoints", "VpcEndpoints", "VpcEndpointId", \
        "VpcEndpointIds"
    gone_states = ("deleted", "Deleted")
    wait_gone = True

    def delete(self, ctx, res):
        _raise_unsuccessful(ctx.retry(ctx.client("ec2").delete_vpc_endpoints, VpcEndpointIds=[res.id]) or {})


class FlowLog(Ec2Kind):
    name, op, key, id_field, ids_param = "flow_log", "describe_flow_logs", "FlowLogs", "FlowLogId", "FlowLogIds"
    filter_param = "Filter"

    def state(self, item):
        return None

    def convention_problem(self, ctx, res, drill_id, reads):
        target = res.meta.get("ResourceId") or ""
        if not target.startswith("vpc-"):
            return "it logs %r, not a VPC (drill flow logs are on the drill's VPC)" % target
        return super().convention_problem(ctx, res, drill_id, reads)

    def vpc_ids(self, res):
        return [res.meta["ResourceId"]]

    def delete(self, ctx, res):
        _raise_unsuccessful(ctx.retry(ctx.client("ec2").delete_flow_logs, FlowLogIds=[res.id]) or {})


class VpcPeering(Ec2Kind):
    name, op, key, id_field, ids_param = "vpc_peering_connection", "describe_vpc_peering_connections", \
        "VpcPeeringConnections", "VpcPeeringConnectionId", "VpcPeeringConnectionIds"
    gone_states = ("deleted", "rejected", "failed", "expired")
    wait_gone = True

    def state(self, item):
        return (item.get("Status") or {}).get("Code")

    def vpc_ids(self, res):
        vpc = (res.meta.get("RequesterVpcInfo") or {}).get("VpcId")
        return [vpc] if vpc else ["(none)"]

    def delete(self, ctx, res):
        ctx.retry(ctx.client("ec2").delete_vpc_peering_connection, VpcPeeringConnectionId=res.id)


class TgwAttachment(Ec2Kind):
    name, op, key, id_field, ids_param = "transit_gateway_attachment", "describe_transit_gateway_vpc_attachments", \
        "TransitGatewayVpcAttachments", "TransitGatewayAttachmentId", "TransitGatewayAttachmentIds"
    gone_states = ("deleted",)
    wait_gone = True

    def delete(self, ctx, res):
        ctx.retry(ctx.client("ec2").delete_transit_gateway_vpc_attachment, TransitGatewayAttachmentId=res.id)


class ElasticIp(Ec2Kind):
    name, op, key, id_field, ids_param = "elastic_ip", "describe_addresses", "Addresses", "AllocationId", \
        "AllocationIds"

    def state(self, item):
        return None

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        if res.meta.get("AssociationId"):
            ctx.retry(ec2.disassociate_address, AssociationId=res.meta["AssociationId"])
        ctx.retry(ec2.release_address, AllocationId=res.id)


class VpnGateway(Ec2Kind):
    name, op, key, id_field, ids_param = "vpn_gateway", "describe_vpn_gateways", "VpnGateways", "VpnGatewayId", \
        "VpnGatewayIds"
    gone_states = ("deleted",)
    wait_gone = True

    def vpc_ids(self, res):
        return [a["VpcId"] for a in res.meta.get("VpcAttachments") or []
                if a.get("State") in ("attached", "attaching") and a.get("VpcId")]

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        for att in res.meta.get("VpcAttachments") or []:
            if att.get("State") in ("attached", "attaching"):
                ctx.retry(ec2.detach_vpn_gateway, VpcId=att["VpcId"], VpnGatewayId=res.id)
        ctx.retry(ec2.delete_vpn_gateway, VpnGatewayId=res.id)


class InternetGateway(Ec2Kind):
    name, op, key, id_field, ids_param = "internet_gateway", "describe_internet_gateways", "InternetGateways", \
        "InternetGatewayId", "InternetGatewayIds"

    def state(self, item):
        return None

    def vpc_ids(self, res):
        return [a["VpcId"] for a in res.meta.get("Attachments") or [] if a.get("VpcId")]

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        for att in res.meta.get("Attachments") or []:
            ctx.retry(ec2.detach_internet_gateway, InternetGatewayId=res.id, VpcId=att["VpcId"])
        ctx.retry(ec2.delete_internet_gateway, InternetGatewayId=res.id)


class NetworkInterface(Ec2Kind):
    name, op, key, id_field, ids_param = "network_interface", "describe_network_interfaces", "NetworkInterfaces", \
        "NetworkInterfaceId", "NetworkInterfaceIds"

    def state(self, item):
        return None

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        att = res.meta.get("Attachment") or {}
        if att.get("AttachmentId") and att.get("Status") in ("attached", "attaching"):
            ctx.retry(ec2.detach_network_interface, AttachmentId=att["AttachmentId"], Force=True)
        ctx.retry(ec2.delete_network_interface, NetworkInterfaceId=res.id)


class Subnet(Ec2Kind):
    name, op, key, id_field, ids_param = "subnet", "describe_subnets", "Subnets", "SubnetId", "SubnetIds"

    def state(self, item):
        return None

    def delete(self, ctx, res):
        ctx.retry(ctx.client("ec2").delete_subnet, SubnetId=res.id)


def _with_vpc(what: str, res: Resource) -> str:
    return "%s goes only with its VPC %s, which still exists" % (what, res.meta.get("VpcId"))


class RouteTable(Ec2Kind):
    name, op, key, id_field, ids_param = "route_table", "describe_route_tables", "RouteTables", "RouteTableId", \
        "RouteTableIds"

    def state(self, item):
        return None

    def remaining_reason(self, res):
        return _with_vpc("the main route table", res) if self.is_main(res) else None

    def is_main(self, res: Resource) -> bool:
        return any(a.get("Main") for a in res.meta.get("Associations") or [])

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        if self.is_main(res):
            return  # deleted with its VPC; the final discovery tells whether it went
        for assoc in res.meta.get("Associations") or []:
            if assoc.get("RouteTableAssociationId") and not assoc.get("Main"):
                ctx.retry(ec2.disassociate_route_table, AssociationId=assoc["RouteTableAssociationId"])
        ctx.retry(ec2.delete_route_table, RouteTableId=res.id)


class NetworkAcl(Ec2Kind):
    name, op, key, id_field, ids_param = "network_acl", "describe_network_acls", "NetworkAcls", "NetworkAclId", \
        "NetworkAclIds"

    def remaining_reason(self, res):
        return _with_vpc("the default network ACL", res) if res.meta.get("IsDefault") else None

    def state(self, item):
        return None

    def delete(self, ctx, res):
        ec2 = ctx.client("ec2")
        if res.meta.get("IsDefault"):
            return  # the default ACL goes with its VPC
        if res.meta.get("Associations"):
            default = _paginate(ec2, "describe_network_acls", "NetworkAcls", Filters=[
                {"Name": "vpc-id", "Values": [res.meta["VpcId"]]}, {"Name": "default", "Values": ["true"]}])
            if not default:
                raise SweepError("network ACL %s is associated with subnets and its VPC has no default ACL to "
                                 "move them to" % res.id)
            for assoc in res.meta["Associations"]:
                ctx.retry(ec2.replace_network_acl_association, AssociationId=assoc["NetworkAclAssociationId"],
                          NetworkAclId=default[0]["NetworkAclId"])
        ctx.retry(ec2.delete_network_acl, NetworkAclId=res.id)


class SecurityGroup(Ec2Kind):
    name, op, key, id_field, ids_param = "security_group", "describe_security_groups", "SecurityGroups", "GroupId", \
        "GroupIds"

    def state(self, item):
        return None

    def remaining_reason(self, res):
        return _with_vpc("the default security group", res) if res.meta.get("GroupName") == "default" else None

    def convention_problem(self, ctx, res, drill_id, reads):
        # The VPC's own default group keeps its name; the builder marks it with the Name tag.
        group_name = res.meta.get("GroupName")
        problem = None if group_name == "default" else _drill_name("group name", group_name, drill_id)
        return problem or super().convention_problem(ctx, res, drill_id, reads)

    def revoke_group_references(self, ctx: Context, res: Resource) -> None:
        """Revoke the rules that reference other security groups (they block those groups' deletion)."""
        ec2 = ctx.client("ec2")
        for field_name, revoke in (("IpPermissions", ec2.revoke_security_group_ingress),
                                   ("IpPermissionsEgress", ec2.revoke_security_group_egress)):
            perms = []
            for perm in res.meta.get(field_name) or []:
                pairs = perm.get("UserIdGroupPairs") or []
                if pairs:
                    keep = {k: v for k, v in perm.items()
                            if k in ("IpProtocol", "FromPort", "ToPort")}
                    keep["UserIdGroupPairs"] = [{k: v for k, v in p.items() if k in ("GroupId", "UserId")}
                                                for p in pairs]
                    perms.append(keep)
            if perms:
                ctx.retry(revoke, GroupId=res.id, IpPermissions=perms)

    def delete(self, ctx, res):
        if res.meta.get("GroupName") == "default":
            return  # goes with its VPC
        ctx.retry(ctx.client("ec2").delete_security_group, GroupId=res.id)


class Vpc(Ec2Kind):
    name, op, key, id_field, ids_param = "vpc", "describe_vpcs", "Vpcs", "VpcId", "VpcIds"

    def state(self, item):
        return None

    def vpc_ids(self, res):
        return []

    def delete(self, ctx, res):
        ctx.retry(ctx.client("ec2").delete_vpc, VpcId=res.id)


# ---- services outside EC2


class LogGroup(Kind):
    name, service = "log_group", "logs"

    def _tags(self, ctx, group: dict) -> dict:
        logs = ctx.client("logs")
        arn = group.get("logGroupArn") or (group.get("arn") or "").removesuffix(":*")
        try:
            return logs.list_tags_for_resource(resourceArn=arn).get("tags") or {}
        except ClientError as exc:
            if is_gone(exc):
                raise
            # Older partitions only know the log-group-name form.
            return logs.list_tags_log_group(logGroupName=group["logGroupName"]).get("tags") or {}

    def _resources(self, ctx, groups: list) -> list:
        return _tagged(self.name, groups, lambda g: g["logGroupName"], lambda g: self._tags(ctx, g))

    def discover(self, ctx):
        groups = _paginate(ctx.client("logs"), "describe_log_groups", "logGroups")
        return [r for r in self._resources(ctx, groups) if ctx.selector.matches(r.tags)]

    def fetch(self, ctx, rid):
        groups = _paginate(ctx.client("logs"), "describe_log_groups", "logGroups", logGroupNamePrefix=rid)
        found = self._resources(ctx, [g for g in groups if g["logGroupName"] == rid])
        return found[0] if found else None

    def convention_problem(self, ctx, res, drill_id, reads):
        return _prefixed("name", res.id, "/drguard/%s/" % drill_id, "/drguard/%s" % drill_id)

    def delete(self, ctx, res):
        ctx.retry(ctx.client("logs").delete_log_group, logGroupName=res.id)


def _tagged(kind: str, items: list, id_of: Callable, tags_of: Callable) -> list:
    """Fetch each item's tags in parallel and return Resources (items that vanished meanwhile are skipped)."""
    out = []
    for item, tags in zip(items, parallel(tags_of, items), strict=True):
        if isinstance(tags, Exception):
            if is_gone(tags):
                continue
            raise tags
        out.append(Resource(kind, id_of(item), tags, item))
    return out


class IamRole(Kind):
    name, service = "iam_role", "iam"

    def _tags(self, ctx, role):
        return _tag_map(_paginate(ctx.client("iam"), "list_role_tags", "Tags", RoleName=role["RoleName"]))

    def discover(self, ctx):
        roles = [r for r in _paginate(ctx.client("iam"), "list_roles", "Roles")
                 if not r.get("Path", "/").startswith("/aws-service-role/")]
        found = _tagged(self.name, roles, lambda r: r["RoleName"], lambda r: self._tags(ctx, r))
        return [r for r in found if ctx.selector.matches(r.tags)]

    def fetch(self, ctx, rid):
        role = ctx.client("iam").get_role(RoleName=rid)["Role"]
        return Resource(self.name, rid, self._tags(ctx, role), role)

    def convention_problem(self, ctx, res, drill_id, reads):
        return _iam_problem(res.meta, "RoleName", drill_id)

    def delete(self, ctx, res):
        iam = ctx.client("iam")
        inline, attached, profiles = _all(parallel(lambda listing: _paginate(iam, *listing, RoleName=res.id), [
            ("list_role_policies", "PolicyNames"), ("list_attached_role_policies", "AttachedPolicies"),
            ("list_instance_profiles_for_role", "InstanceProfiles")]))
        # The role leaves its instance profiles; a profile itself goes only when it proves it is the drill's.
        _all(parallel(lambda call: call(), [
            *(lambda n=n: ctx.retry(iam.delete_role_policy, RoleName=res.id, PolicyName=n) for n in inline),
            *(lambda a=a: ctx.retry(iam.detach_role_policy, RoleName=res.id, PolicyArn=a["PolicyArn"])
              for a in attached),
            *(lambda p=p: ctx.retry(iam.remove_role_from_instance_profile, RoleName=res.id,
                                    InstanceProfileName=p["InstanceProfileName"]) for p in profiles)]))
        ctx.retry(iam.delete_role, RoleName=res.id)


class IamInstanceProfile(Kind):
    """Instance profiles, by their own tags (listings leave tags out, so each is read with GetInstanceProfile)."""

    name, service = "iam_instance_profile", "iam"

    def discover(self, ctx):
        profiles = _paginate(ctx.client("iam"), "list_instance_profiles", "InstanceProfiles")
        found = parallel(lambda p: self.lookup(ctx, p["InstanceProfileName"]), profiles)
        out = []
        for res in found:
            if isinstance(res, Exception):
                raise res
            if res is not None and ctx.selector.matches(res.tags):
                out.append(res)
        return out

    def fetch(self, ctx, rid):
        prof = ctx.client("iam").get_instance_profile(InstanceProfileName=rid)["InstanceProfile"]
        return Resource(self.name, rid, _tag_map(prof.get("Tags")), prof)

    def convention_problem(self, ctx, res, drill_id, reads):
        return _iam_problem(res.meta, "InstanceProfileName", drill_id)

    def delete(self, ctx, res):
        iam = ctx.client("iam")
        for role in res.meta.get("Roles") or []:
            ctx.retry(iam.remove_role_from_instance_profile, InstanceProfileName=res.id, RoleName=role["RoleName"])
        ctx.retry(iam.delete_instance_profile, InstanceProfileName=res.id)


class IamPolicy(Kind):
    name, service = "iam_policy", "iam"

    def _tags(self, ctx, arn):
        return _tag_map(_paginate(ctx.client("iam"), "list_policy_tags", "Tags", PolicyArn=arn))

    def discover(self, ctx):
        policies = _paginate(ctx.client("iam"), "list_policies", "Policies", Scope="Local")
        found = _tagged(self.name, policies, lambda p: p["Arn"], lambda p: self._tags(ctx, p["Arn"]))
        return [r for r in found if ctx.selector.matches(r.tags)]

    def fetch(self, ctx, rid):
        pol = ctx.client("iam").get_policy(PolicyArn=rid)["Policy"]
        return Resource(self.name, rid, self._tags(ctx, rid), pol)

    def convention_problem(self, ctx, res, drill_id, reads):
        return _iam_problem(res.meta, "PolicyName", drill_id)

    def delete(self, ctx, res):
        iam = ctx.client("iam")
        arn = res.id

        def listing(what):
            op, key, extra = what
            return _paginate(iam, op, key, PolicyArn=arn, **extra)
        roles, users, groups, versions = _all(parallel(listing, [
            ("list_entities_for_policy", "PolicyRoles", {"EntityFilter": "Role"}),
            ("list_entities_for_policy", "PolicyUsers", {"EntityFilter": "User"}),
            ("list_entities_for_policy", "PolicyGroups", {"EntityFilter": "Group"}),
            ("list_policy_versions", "Versions", {})]))
        _all(parallel(lambda call: call(), [
            *(lambda r=r: ctx.retry(iam.detach_role_policy, RoleName=r["RoleName"], PolicyArn=arn) for r in roles),
            *(lambda u=u: ctx.retry(iam.detach_user_policy, UserName=u["UserName"], PolicyArn=arn) for u in users),
            *(lambda g=g: ctx.retry(iam.detach_group_policy, GroupName=g["GroupName"], PolicyArn=arn)
              for g in groups),
            *(lambda v=v: ctx.retry(iam.delete_policy_version, PolicyArn=arn, VersionId=v["VersionId"])
              for v in versions if not v.get("IsDefaultVersion"))]))
        ctx.retry(iam.delete_policy, PolicyArn=arn)


class Secret(Kind):
    name, service = "secret", "secretsmanager"

    def _resource(self, item):
        return Resource(self.name, item["ARN"], _tag_map(item.get("Tags")), {"Name": item.get("Name")})

    def discover(self, ctx):
        sel = ctx.selector
        items = _paginate(ctx.client("secretsmanager"), "list_secrets", "SecretList",
                          Filters=[{"Key": "tag-key", "Values": [sel.tag_key]}])
        return [r for r in (self._resource(i) for i in items) if sel.matches(r.tags)]

    def fetch(self, ctx, rid):
        item = ctx.client("secretsmanager").describe_secret(SecretId=rid)
        if item.get("DeletedDate"):
            return None  # scheduled for deletion: no longer readable, gone at the end of its window
        return self._resource(item)

    def convention_problem(self, ctx, res, drill_id, reads):
        return _prefixed("name", res.meta.get("Name"), "drguard/%s/" % drill_id)

    def delete(self, ctx, res):
        ctx.retry(ctx.client("secretsmanager").delete_secret, SecretId=res.id, ForceDeleteWithoutRecovery=True)


class KmsKey(Kind):
    name, service = "kms_key", "kms"
    _gone_states = ("PendingDeletion", "PendingReplicaDeletion")

    def fetch(self, ctx, rid):
        """The customer key, or None for an AWS-managed key or one pending deletion."""
        kms = ctx.client("kms")
        meta = kms.describe_key(KeyId=rid)["KeyMetadata"]
        if meta.get("KeyManager") != "CUSTOMER" or meta.get("KeyState") in self._gone_states:
            return None
        tags = _tag_map(_paginate(kms, "list_resource_tags", "Tags", KeyId=rid), "TagKey", "TagValue")
        return Resource(self.name, meta["KeyId"], tags, meta)

    def discover(self, ctx):
        keys = _paginate(ctx.client("kms"), "list_keys", "Keys")
        out = []
        for res in parallel(lambda k: self.fetch(ctx, k["KeyId"]), keys):
            if isinstance(res, Exception):
                if is_gone(res):
                    continue
                raise res
            if res is not None and ctx.selector.matches(res.tags):
                out.append(res)
        return out

    def convention_problem(self, ctx, res, drill_id, reads):
        # The builder creates the key (tags and description in one call), then its alias: a drill
        # killed in between leaves a key that only its description names.
        want = "alias/drguard/%s" % drill_id
        if (res.meta.get("Description") or "").startswith("drguard drill %s:" % drill_id):
            return None
        aliases = [a.get("AliasName") for a in _paginate(ctx.client("kms"), "list_aliases", "Aliases", KeyId=res.id)]
        return None if want in aliases else "no alias %s points to it and its description does not start with %r" % (
            want, "drguard drill %s:" % drill_id)

    def delete(self, ctx, res):
        kms = ctx.client("kms")
        for alias in _paginate(kms, "list_aliases", "Aliases", KeyId=res.id):
            ctx.retry(kms.delete_alias, AliasName=alias["AliasName"])
        try:
            ctx.retry(kms.schedule_key_deletion, KeyId=res.id, PendingWindowInDays=7)
        except ClientError as exc:
            # Scheduled meanwhile (another teardown): that is what we wanted.
            if error_code(exc) == "KMSInvalidStateException" and self.lookup(ctx, res.id) is None:
                return
            raise


class S3Bucket(Kind):
    name, service = "s3_bucket", "s3"
    extra_gone_codes = ("404",)

    def _tags(self, ctx, name):
        try:
            return _tag_map(ctx.client("s3").get_bucket_tagging(Bucket=name).get("TagSet"))
        except ClientError as exc:
            if error_code(exc) == "NoSuchTagSet":
                return {}
            raise

    def discover(self, ctx):
        buckets = ctx.client("s3").list_buckets().get("Buckets") or []
        found = _tagged(self.name, buckets, lambda b: b["Name"], lambda b: self._tags(ctx, b["Name"]))
        return [r for r in found if ctx.selector.matches(r.tags)]

    def fetch(self, ctx, rid):
        ctx.client("s3").head_bucket(Bucket=rid)
        return Resource(self.name, rid, self._tags(ctx, rid))

    def convention_problem(self, ctx, res, drill_id, reads):
        return _drill_name("name", res.id, drill_id)

    def _lock_reason(self, ctx, bucket: str, errors: list) -> str:
        """Explain why objects could not be deleted (Object Lock retention / legal hold)."""
        s3 = ctx.client("s3")
        first = errors[0]
        what = "%d object version(s) could not be deleted, first %r version %s: %s" % (
            len(errors), first.get("Key"), first.get("VersionId"), first.get("Message") or first.get("Code"))
        if not first.get("Key") or not first.get("VersionId"):
            return what
        try:
            head = s3.head_object(Bucket=bucket, Key=first["Key"], VersionId=first["VersionId"])
        except (ClientError, BotoCoreError):
            return what
        if head.get("ObjectLockMode") or head.get("ObjectLockLegalHoldStatus") == "ON":
            until = head.get("ObjectLockRetainUntilDate")
            return ("%d object version(s) are under Object Lock retention, first %r version %s (mode %s, "
                    "retained until %s, legal hold %s); the bucket can go only after retention ends" % (
                        len(errors), first["Key"], first["VersionId"], head.get("ObjectLockMode"),
                        until.isoformat() if hasattr(until, "isoformat") else until,
                        head.get("ObjectLockLegalHoldStatus", "OFF")))
        return what

    def delete(self, ctx, res):
        s3 = ctx.client("s3")
        failures = []
        try:
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=res.id):
                objects = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                           for v in (page.get("Versions") or []) + (page.get("DeleteMarkers") or [])]
                for start in range(0, len(objects), 1000):
                    batch = objects[start:start + 1000]
                    result = ctx.retry(s3.delete_objects, Bucket=res.id, Delete={"Objects": batch, "Quiet": True},
                                       _mutates=False) or {}
                    if len(result.get("Errors") or []) < len(batch):
                        ctx.mutated = True
                    for err in result.get("Errors") or []:
                        # Some stores leave the version out of the error: take it from the request.
                        version = err.get("VersionId") or next(
                            (o["VersionId"] for o in batch if o["Key"] == err.get("Key")), None)
                        failures.append(dict(err, VersionId=version))
        except ClientError as exc:
            if is_gone(exc):
                return
            raise
        if failures:
            raise SweepError(self._lock_reason(ctx, res.id, failures))
        ctx.retry(s3.delete_bucket, Bucket=res.id)


class SnsTopic(Kind):
    name, service = "sns_topic", "sns"

    def _tags(self, ctx, arn):
        return _tag_map(ctx.client("sns").list_tags_for_resource(ResourceArn=arn).get("Tags"))

    def discover(self, ctx):
        topics = _paginate(ctx.client("sns"), "list_topics", "Topics")
        found = _tagged(self.name, topics, lambda t: t["TopicArn"], lambda t: self._tags(ctx, t["TopicArn"]))
        return [r for r in found if ctx.selector.matches(r.tags)]

    def fetch(self, ctx, rid):
        ctx.client("sns").get_topic_attributes(TopicArn=rid)
        return Resource(self.name, rid, self._tags(ctx, rid))

    def convention_problem(self, ctx, res, drill_id, reads):
        return _drill_name("topic name", res.id.rsplit(":", 1)[-1], drill_id)

    def delete(self, ctx, res):
        ctx.retry(ctx.client("sns").delete_topic, TopicArn=res.id)


# EC2 deletion steps, in dependency order.
EC2_STEPS = (
    (Instance(), NatGateway(), VpcEndpoint(), FlowLog(), VpcPeering(), TgwAttachment()),
    (ElasticIp(), InternetGateway(), VpnGateway()),
    (NetworkInterface(),),
    (Subnet(), RouteTable(), NetworkAcl(), SecurityGroup()),
    (Vpc(),),
)
OTHER_KINDS = (LogGroup(), IamRole(), IamPolicy(), IamInstanceProfile(), Secret(), KmsKey(), S3Bucket(), SnsTopic())
KINDS = {k.name: k for k in [k for step in EC2_STEPS for k in step] + list(OTHER_KINDS)}
RESOURCE_TYPES = sorted(KINDS)
SERVICES = sorted({k.service for k in KINDS.values()})


# --------------------------------------------------------------------------- sweep


def check_options(drill_id: str | None, expired: bool | None, as_of: str | None, timeout: int,
                  drill_ids: list | None = None):
    """The sweep's options, checked before any AWS call; returns the time expiry is judged against.

    Raises :class:`SweepError` with a one-sentence message for anything wrong.
    """
    if drill_ids is not None and not drill_ids:
        raise SweepError("drill_ids is empty and selects nothing; give at least one drill id.")
    targets = [drill_id] if drill_id is not None else list(drill_ids or [])
    for target in targets:
        try:
            validate_drill_id(target)
        except DrillError as exc:
            raise SweepError("%s." % exc) from None
    if not targets and expired is not True:
        raise SweepError("expired=false selects nothing; set expired: true to reap every expired drill "
                         "resource, or give drill_id to tear down one drill.")
    if as_of is not None and targets:
        raise SweepError("as_of only applies to expired: true; remove it when tearing down by drill_id.")
    try:
        when = parse_time(as_of) if as_of is not None else utcnow()
    except DrillError as exc:
        raise SweepError("as_of is not valid: %s (for example 2026-11-29T05:00:00Z)." % exc) from None
    if timeout <= 0:
        raise SweepError("timeout must be a positive number of seconds, got %d." % timeout)
    return when


def prove(ctx: Context, res: Resource, reads: Reads | None = None) -> str | None:
    """Why ``res`` (as read just now) may not be deleted by this sweep; None when it proves it is the drill's."""
    problem = ctx.selector.tag_problem(res.tags)
    if problem is None:
        problem = KINDS[res.type].convention_problem(ctx, res, res.tags[TAG_DRILL_ID], reads or Reads())
    return problem


@dataclass
class Discovery:
    resources: list       # candidates that prove they are the drill's: what a sweep deletes
    refused: list         # candidates that do not (``reason`` says why): never deleted
    errors: list          # [{type, id, error}] for kinds that could not be listed / resources not checked

    def add(self, other: Discovery) -> None:
        self.resources += other.resources
        self.refused += other.refused
        self.errors += other.errors

    def sort(self) -> Discovery:
        for items in (self.resources, self.refused):
            items.sort(key=lambda r: (r.type, r.id))
        return self


def _discover_kind(ctx: Context, kind: Kind, reads: Reads) -> Discovery:
    """One kind's candidates, each proven (or refused) as soon as its listing is in."""
    out = Discovery([], [], [])
    try:
        listed = kind.discover(ctx)
    except Exception as exc:  # noqa: BLE001 - reported: nothing is proven for this kind
        out.errors.append({"type": kind.name, "id": "*", "error": "could not list: %s" % describe_error(exc)})
        return out
    seen, candidates = set(), []
    for res in listed:
        if res.key not in seen:
            seen.add(res.key)
            candidates.append(res)
    for res, outcome in zip(candidates, parallel(lambda r: prove(ctx, r, reads), candidates), strict=True):
        if isinstance(outcome, Exception):
            if not is_gone(outcome):
                out.errors.append({"type": res.type, "id": res.id,
                                   "error": "could not check its ownership: %s" % describe_error(outcome)})
        elif outcome is None:
            out.resources.append(res)
        else:
            res.reason = outcome
            out.refused.append(res)
    return out


def discover(ctx: Context, kinds=None) -> Discovery:
    """Every candidate of every kind (or of ``kinds``), split into the proven (deletable) and the refused.

    One parallel pass: every kind lists at once and proves its candidates as soon as its own
    listing is in; the VPCs the proofs need are read once for the pass.
    """
    kinds = list(KINDS.values()) if kinds is None else list(kinds)
    reads = Reads()
    found = Discovery([], [], [])
    for kind, part in zip(kinds, parallel(lambda k: _discover_kind(ctx, k, reads), kinds, workers=len(kinds)),
                          strict=True):
        if isinstance(part, Exception):
            found.errors.append({"type": kind.name, "id": "*", "error": "could not list: %s" % describe_error(part)})
        else:
            found.add(part)
    return found.sort()


@dataclass
class Outcome:
    errors: list = field(default_factory=list)   # [{type, id, error}] deletions that failed
    refused: list = field(default_factory=list)  # Resources that failed the proof when read again
    after: Discovery | None = None               # the look again after deleting (``delete(look_again=True)``)


class _Deletion:
    """One sweep's deletions: what failed and what was refused, collected from many threads."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.outcome = Outcome()
        self._lock = threading.Lock()

    def _record(self, errors=(), refused=()) -> None:
        with self._lock:
            self.outcome.errors.extend(errors)
            self.outcome.refused.extend(refused)

    def recheck(self, items: list) -> list:
        """Read each item again through its own call and prove it, in one parallel pass; keep those that
        still prove they are the drill's (the proof at delete time)."""
        ctx, reads = self.ctx, Reads()

        def judge(res):
            try:
                now = KINDS[res.type].lookup(ctx, res.id)
            except Exception as exc:  # noqa: BLE001 - recorded below
                return res, "could not read it again: %s" % describe_error(exc), None
            if now is None:
                return None  # gone already
            try:
                return now, None, prove(ctx, now, reads)
            except Exception as exc:  # noqa: BLE001 - recorded below
                return (None if is_gone(exc) else
                        (now, "could not check its ownership: %s" % describe_error(exc), None))

        proven, refused, errors = [], [], []
        for item, outcome in zip(items, parallel(judge, items), strict=True):
            if outcome is None:
                continue
            # judge returns what it expects; anything else it raised keeps the item (not deleted).
            res, error, problem = ((item, "could not read it again: %s" % describe_error(outcome), None)
                                   if isinstance(outcome, Exception) else outcome)
            if error:
                errors.append({"type": res.type, "id": res.id, "error": error})
            elif problem:
                res.reason = problem
                refused.append(res)
            else:
                proven.append(res)
        self._record(errors, refused)
        return proven

    def delete_all(self, items: list) -> None:
        def one(res):
            try:
                KINDS[res.type].delete(self.ctx, res)
            except (ClientError, BotoCoreError, SweepError) as exc:
                self._record([{"type": res.type, "id": res.id, "error": describe_error(exc)}])
        parallel(one, items)

    def wait_gone(self, items: list) -> None:
        """Poll until each item is gone or the deadline passes (what stays is found again at the end).

        Jittered backoff from 50 ms up to 5 s: on the emulator most things are gone at the first
        look; a NAT gateway on AWS takes a minute and is not polled more than every few seconds.
        """
        ctx, pending, delay = self.ctx, list(items), 0.05
        while pending and ctx.time_left() > 0:
            states = parallel(lambda r: KINDS[r.type].lookup(ctx, r.id), pending)
            pending = [r for r, state in zip(pending, states, strict=True) if state is not None]
            if pending:
                time.sleep(min(random.uniform(delay / 2, delay), max(ctx.time_left(), 0.05)))  # noqa: S311
                delay = min(delay * 2, 5.0)

    def ec2_chain(self, resources: list) -> None:
        """The EC2 steps in dependency order; inside a step: read again and prove, then delete, in parallel."""
        for step in EC2_STEPS:
            names = {k.name for k in step}
            todo = [r for r in resources if r.type in names]
            if not todo:
                continue
            items = self.recheck(todo)
            groups = [r for r in items if r.type == "security_group"]
            if groups:
                revoked = parallel(lambda g: KINDS["security_group"].revoke_group_references(self.ctx, g), groups)
                self._record([{"type": grp.type, "id": grp.id,
                               "error": "could not revoke group references: %s" % describe_error(err)}
                              for grp, err in zip(groups, revoked, strict=True)
                              if isinstance(err, Exception) and not is_gone(err)])
            self.delete_all(items)
            self.wait_gone([r for r in items if KINDS[r.type].wait_gone])

    def others(self, resources: list) -> None:
        """Everything outside EC2: nothing waits for anything else, so each resource is read again,
        proven and deleted on its own (no step to wait for)."""
        parallel(lambda r: self.delete_all(self.recheck([r])), resources)


def delete(ctx: Context, resources: list, look_again: bool = False) -> Outcome:
    """Delete ``resources`` in dependency order, each only after it proved again that it is the drill's.

    The EC2 chain and everything else (IAM, logs, secrets, KMS, S3, SNS) run side by side. With
    ``look_again``, each of the two discovers its own kinds again as soon as its deletions are
    done (``Outcome.after``): what is found then is what remains.
    """
    run = _Deletion(ctx)
    ec2 = [r for r in resources if KINDS[r.type].service == "ec2"]
    rest = [r for r in resources if KINDS[r.type].service != "ec2"]
    ec2_kinds = [k for step in EC2_STEPS for k in step]

    def side(work, items, kinds):
        work(items)
        return discover(ctx, kinds) if look_again else None

    with ThreadPoolExecutor(max_workers=2) as pool:
        sides = [pool.submit(side, run.ec2_chain, ec2, ec2_kinds), pool.submit(side, run.others, rest, OTHER_KINDS)]
        afters = [fut.result() for fut in sides]
    if look_again:
        run.outcome.after = Discovery([], [], [])
        for after in afters:
            run.outcome.after.add(after)
        run.outcome.after.sort()
    return run.outcome


def _listing_failure(errors: list) -> str:
    return ("could not prove that nothing remains because the sweep could not list everything: %s; grant the "
            "missing describe/list permissions and run it again." % "; ".join(
                "%s %s (%s)" % (e["type"], e["id"], e["error"]) for e in errors))


def run(client_factory: Callable, *, drill_id: str | None = None, expired: bool | None = None,  # noqa: PLR0913
        as_of: str | None = None, timeout: int = 300, check_mode: bool = False,
        fail_on_remaining: bool = True, drill_ids: list | None = None) -> tuple:
    """The whole sweep: check the options, discover, delete, look again.

    ``client_factory(service, config=...)`` returns a (retrying) client. Returns ``(result, failure)`` like
    :func:`sweep`, ``result`` with ``seconds``. Raises :class:`SweepError` for bad options; a botocore error
    outside any one resource propagates.
    """
    when = check_options(drill_id, expired, as_of, timeout, drill_ids)
    started = time.monotonic()
    config = {"max_pool_connections": WORKERS * 2}  # many list/tag calls run in parallel
    # Built here, in the calling thread, before anything runs: a region or connection problem fails
    # once, cleanly, instead of inside a worker thread.
    clients = {service: client_factory(service, config=config) for service in SERVICES}
    ctx = Context(clients.__getitem__, Selector(drill_id=drill_id, as_of=when, drill_ids=drill_ids), started + timeout)
    first = discover(ctx)
    result, failure = sweep(ctx, first, check_mode, fail_on_remaining)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result, failure


def sweep(ctx: Context, first: Discovery, check_mode: bool, fail_on_remaining: bool) -> tuple:
    """Delete what ``first`` proved to be the drill's, look again, and say what remains.

    Returns ``(result, failure)``: the module's result (without ``seconds``) and, when the
    sweep could not prove that nothing remains, the one-sentence message to fail with (else None).
    """
    found = [r.as_dict() for r in first.resources]
    refused = [r.as_dict(with_reason=True) for r in first.refused]
    result = dict(found=found, deleted=[], remaining=[], refused=refused, errors=list(first.errors),
                  as_of=format_time(ctx.selector.as_of))
    if check_mode:
        result.update(changed=bool(found), counts=dict(found=len(found), deleted=0, remaining=0, refused=len(refused)))
        return result, (_listing_failure(first.errors) if first.errors and fail_on_remaining else None)

    outcome = delete(ctx, first.resources, look_again=True)
    second = outcome.after
    reasons = {}
    for err in outcome.errors:
        reasons.setdefault((err["type"], err["id"]), err["error"])
    first_keys = {r.key for r in first.resources}
    remaining = []
    for res in second.resources:
        res.reason = (reasons.get(res.key) or KINDS[res.type].remaining_reason(res)
                      or ("still exists after deletion" if res.key in first_keys
                          else "appeared while the sweep ran (is the drill still running?)"))
        remaining.append(res.as_dict(with_reason=True))
    # Refused now, or when read again right before deletion (the reason given then wins).
    refused_now = {r.key: r for r in second.refused}
    refused_now.update({r.key: r for r in outcome.refused})
    refused = [refused_now[k] for k in sorted(refused_now)]
    remaining += [dict(r.as_dict(with_reason=True), reason="refused: %s" % r.reason)
                  for r in refused if ctx.selector.owns(r.tags)]
    remaining_keys = {(r["type"], r["id"]) for r in remaining}
    deleted = [r.as_dict() for r in first.resources if r.key not in remaining_keys and r.key not in refused_now]
    result.update(
        changed=bool(deleted) or ctx.mutated, deleted=deleted, remaining=remaining,
        refused=[r.as_dict(with_reason=True) for r in refused], errors=outcome.errors + second.errors,
        counts=dict(found=len(found), deleted=len(deleted), remaining=len(remaining), refused=len(refused)),
    )
    failure = None
    if fail_on_remaining:
        if remaining:
            listed = "; ".join("%s %s (%s)" % (r["type"], r["id"], r["reason"]) for r in remaining[:10])
            more = " and %d more (see remaining)" % (len(remaining) - 10) if len(remaining) > 10 else ""
            hint = ("fix the cause and run the sweep again" if not any(r["reason"].startswith("refused: ")
                                                                       for r in remaining)
                    else "a refused resource is never deleted by the sweep: find out whose it is and delete or "
                         "re-tag it by hand, then run the sweep again")
            failure = "%d resource(s) remain after teardown: %s%s; %s." % (len(remaining), listed, more, hint)
        elif second.errors:
            failure = _listing_failure(second.errors)
    return result, failure
