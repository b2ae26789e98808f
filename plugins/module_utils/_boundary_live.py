# Copyright: drguard maintainers
# Apache License 2.0
"""Read a VPC's live network configuration and judge it against a Boundary.

Private helpers of ``boundary_verify``. Two halves that never meet halfway:

* :func:`read_vpc` issues the describe calls (filtered by VPC id, paginated, in
  parallel) and returns a *snapshot*: for each resource type either the list AWS
  returned or an :class:`Unreadable` naming the failed call and its error code.
* :func:`evaluate` is pure: snapshot + :class:`Boundary` -> findings and counts.

Nothing here knows how the sandbox was built; it only sees what exists (a drill's
tier groups are found by the names and tags they carry). Anything it cannot read,
recognise or prove safe is a finding (fail closed).
"""

from __future__ import annotations

import ipaddress
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports the missing SDK
    BotoCoreError = ClientError = Exception

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import merge_port_ranges
from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import names as network_names
from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import sg_name
from ansible_collections.drguard.sandbox.plugins.module_utils._network_build import workload_tiers
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import ssm_endpoints_declared
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DRILL_ID_RE
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID

# Every code evaluate() can emit. docs/boundary-policy.md explains each one.
FINDING_CODES = (
    "vpc_not_found", "unreadable", "vpc_overlaps_production", "vpc_cidr_undeclared", "ipv6_present",
    "route_igw", "route_nat", "route_peering", "route_tgw", "route_vgw", "route_egress_only_igw",
    "route_unknown_target", "route_to_production",
    "igw_attached", "nat_gateway_present", "vgw_attached", "peering_active", "tgw_attachment",
    "subnet_public_ip", "subnet_ipv6_autoassign",
    "default_sg_has_rules", "sg_egress_open", "sg_ingress_open", "sg_egress_undeclared", "sg_ingress_undeclared",
    "nacl_missing_production_deny", "nacl_allow_any", "nacl_allow_undeclared", "subnet_default_nacl",
    "endpoint_policy_open", "endpoint_policy_undeclared", "endpoint_unsupported",
    "flow_logs_missing",
    "dhcp_options_dns", "dhcp_options_unsupported", "egress_only_igw_attached", "carrier_gateway_present",
    "eni_public_ip", "eni_source_dest_check_off", "eni_foreign_service", "traffic_mirror_session",
    "traffic_mirror_target",
    "endpoint_service_offered", "load_balancer_internet_facing",
    "resolver_rule_associated", "resolver_endpoint_present", "resolver_query_logging",
    "private_hosted_zone_associated", "lattice_service_network_associated",
    "fallback_blocked",
    "tier_group_missing", "tier_rule_missing", "tier_rule_extra",
)

S3_SERVICE_RE = re.compile(r"^com\.amazonaws\.[a-z0-9-]+\.s3$")
SSM_SERVICE_RE = re.compile(r"^com\.amazonaws\.[a-z0-9-]+\.(ssm|ssmmessages|ec2messages|secretsmanager)$")
# What the secretsmanager endpoint may allow: reading a drill's runtime secrets (its tiers' certificates).
RUNTIME_SECRET_ARN_RE = re.compile(r"^arn:[a-z*-]+:secretsmanager:[a-z0-9*-]*:[0-9*]*:secret:drguard/"
                                   r"[a-z0-9][a-z0-9-]{2,38}[a-z0-9]/runtime/\*$")
S3_ARN_RE = re.compile(r"^arn:aws[a-z-]*:s3:::(.+)$")

# Actions an S3 endpoint policy may allow on s3_read grants / s3_write grants
# (lowercase: IAM action names are case-insensitive). Anything else, including
# any wildcard, is not provably within the grants.
S3_READ_ACTIONS = frozenset({
    "s3:getobject", "s3:getobjectversion", "s3:getobjectattributes", "s3:getobjectversionattributes",
    "s3:getobjecttagging", "s3:getobjectversiontagging", "s3:getobjectretention",
    "s3:getobjectlegalhold", "s3:listbucket", "s3:listbucketversions", "s3:getbucketlocation",
    "s3:getbucketversioning", "s3:getbucketobjectlockconfiguration",
})
S3_WRITE_ACTIONS = frozenset({
    "s3:putobject", "s3:abortmultipartupload", "s3:listmultipartuploadparts",
    "s3:listbucketmultipartuploads", "s3:putobjecttagging", "s3:getbucketlocation",
})

# Route keys that describe the destination or the route itself, not where it goes.
_ROUTE_META_KEYS = frozenset({"DestinationCidrBlock", "DestinationIpv6CidrBlock", "DestinationPrefixListId",
                              "Origin", "State", "InstanceOwnerId"})
_ROUTE_TARGET_CODES = {
    "NatGatewayId": "route_nat",
    "TransitGatewayId": "route_tgw",
    "VpcPeeringConnectionId": "route_peering",
    "EgressOnlyInternetGatewayId": "route_egress_only_igw",
}
# The key that carries a declared control-plane target, by id prefix.
_CONTROL_PLANE_KEY = {"tgw-": "TransitGatewayId", "pcx-": "VpcPeeringConnectionId", "vgw-": "GatewayId"}

# DHCP options that cannot send traffic anywhere: the search domain (names still resolve through
# AmazonProvidedDNS and traffic is still filtered) and IPv6 lease times.
_DHCP_HARMLESS = frozenset({"domain-name", "ipv6-address-preferred-lease-time"})
# IAM action names that are not the CamelCase of the boto3 method.
_ACTION_NAMES = {"list_hosted_zones_by_vpc": "ListHostedZonesByVPC"}
_PROTOCOL_NAMES = {"-1": "all", "6": "tcp", "17": "udp", "1": "icmp", "58": "icmpv6"}
_NACL_DEFAULT_RULE = 32767
# The ports replies to the sandbox arrive on: the ephemeral range AWS documents for network ACLs
# (it covers every client's choice: Linux, Windows, NAT gateways, load balancers).
_RETURN_PORTS = (1024, 65535)
_ANY4 = ipaddress.ip_network("0.0.0.0/0")
# Interface types of this account's own instances' interfaces; every other type (vpc_endpoint, lambda,
# network_load_balancer, transit_gateway, ...) is a service's.
_INSTANCE_INTERFACE_TYPES = frozenset({"interface", "efa", "efa-only"})
# Addresses on an interface that are reachable from outside the VPC: the internet, a Wavelength carrier
# network, an Outpost's on-premises network (through its local gateway).
_OUTSIDE_ADDRESS_KEYS = ("PublicIp", "CarrierIp", "CustomerOwnedIp")


@dataclass(frozen=True)
class Unreadable:
    """A describe call that failed: the resource type is not verified."""
    operation: str
    error_code: str
    message: str
    service: str = "ec2"  # the IAM service prefix of the operation


# name -> (operation, result key, kwargs builder). Filters keep every call to this VPC.
def _calls(vpc_id: str, require_flow_logs: bool) -> dict:
    def vpc_filter(name):
        return {"Filters": [{"Name": name, "Values": [vpc_id]}]}
    calls = {
        "vpcs": ("describe_vpcs", "Vpcs", {"VpcIds": [vpc_id]}),
        "route_tables": ("describe_route_tables", "RouteTables", vpc_filter("vpc-id")),
        "internet_gateways": ("describe_internet_gateways", "InternetGateways", vpc_filter("attachment.vpc-id")),
        "nat_gateways": ("describe_nat_gateways", "NatGateways",
                         {"Filter": [{"Name": "vpc-id", "Values": [vpc_id]}]}),
        "vpn_gateways": ("describe_vpn_gateways", "VpnGateways", vpc_filter("attachment.vpc-id")),
        "peering_requester": ("describe_vpc_peering_connections", "VpcPeeringConnections",
                              vpc_filter("requester-vpc-info.vpc-id")),
        "peering_accepter": ("describe_vpc_peering_connections", "VpcPeeringConnections",
                             vpc_filter("accepter-vpc-info.vpc-id")),
        "tgw_attachments": ("describe_transit_gateway_vpc_attachments", "TransitGatewayVpcAttachments",
                            vpc_filter("vpc-id")),
        "subnets": ("describe_subnets", "Subnets", vpc_filter("vpc-id")),
        "security_groups": ("describe_security_groups", "SecurityGroups", vpc_filter("vpc-id")),
        "network_acls": ("describe_network_acls", "NetworkAcls", vpc_filter("vpc-id")),
        "vpc_endpoints": ("describe_vpc_endpoints", "VpcEndpoints", vpc_filter("vpc-id")),
        # AWS-managed prefix lists (a handful): tells which pl- id is S3 in this region.
        "prefix_lists": ("describe_prefix_lists", "PrefixLists", {}),
        # No VPC filter exists for these: read the account's and keep this VPC's (by attachment,
        # network interface or load balancer) when judging.
        "egress_only_igws": ("describe_egress_only_internet_gateways", "EgressOnlyInternetGateways", {}),
        "traffic_mirror_sessions": ("describe_traffic_mirror_sessions", "TrafficMirrorSessions", {}),
        "traffic_mirror_targets": ("describe_traffic_mirror_targets", "TrafficMirrorTargets", {}),
        "endpoint_services": ("describe_vpc_endpoint_service_configurations", "ServiceConfigurations", {}),
        "carrier_gateways": ("describe_carrier_gateways", "CarrierGateways", vpc_filter("vpc-id")),
        "network_interfaces": ("describe_network_interfaces", "NetworkInterfaces", vpc_filter("vpc-id")),
    }
    if require_flow_logs:
        calls["flow_logs"] = ("describe_flow_logs", "FlowLogs", vpc_filter("resource-id"))
    return calls


def _error_code(exc: Exception) -> tuple:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return err.get("Code") or "ClientError", err.get("Message") or str(exc)
    return type(exc).__name__, str(exc)


def read_vpc(client, vpc_id: str, require_flow_logs: bool, workers: int = 8, *, elbv2=None,
             route53resolver=None, route53=None, lattice=None) -> dict:
    """Describe everything that shapes the VPC's boundary, in parallel.

    ``client`` is an EC2 client from ``_aws.aws_client``; each listing goes through
    ``_aws.paginate``, so a transient error (throttling) retries the listing with backoff.
    Returns ``{name: list | Unreadable}``. Every failure (AccessDenied, throttling
    beyond retries, an API the endpoint does not implement) becomes an
    :class:`Unreadable`, never an empty list. ``elbv2`` reads the load balancers (which
    tie endpoint services to this VPC), ``route53resolver`` and ``route53`` what changes
    how the VPC's names resolve, ``lattice`` (VPC Lattice) the service networks it joins;
    a client not given makes its reads ``Unreadable`` too.
    """
    calls = {name: (client, "ec2") + call for name, call in _calls(vpc_id, require_flow_logs).items()}
    calls["load_balancers"] = (elbv2, "elasticloadbalancing", "describe_load_balancers", "LoadBalancers", {})
    vpc_filter = {"Filters": [{"Name": "VPCId", "Values": [vpc_id]}]}
    calls["resolver_rule_associations"] = (route53resolver, "route53resolver", "list_resolver_rule_associations",
                                           "ResolverRuleAssociations", vpc_filter)
    calls["resolver_endpoints"] = (route53resolver, "route53resolver", "list_resolver_endpoints",
                                   "ResolverEndpoints", {"Filters": [{"Name": "HostVPCId", "Values": [vpc_id]}]})
    calls["resolver_query_log_associations"] = (
        route53resolver, "route53resolver", "list_resolver_query_log_config_associations",
        "ResolverQueryLogConfigAssociations", {"Filters": [{"Name": "ResourceId", "Values": [vpc_id]}]})
    calls["lattice_associations"] = (lattice, "vpc-lattice", "list_service_network_vpc_associations", "items",
                                     {"vpcIdentifier": vpc_id})
    calls["private_hosted_zones"] = (route53, "route53", "list_hosted_zones_by_vpc", "HostedZoneSummaries",
                                     {"VPCId": vpc_id, "VPCRegion": client.meta.region_name})

    def one(item):
        name, (api, service, operation, key, kwargs) = item
        if api is None:
            return name, Unreadable(operation, "NoClient", "no client was given for this service", service)
        try:
            return name, paginate(api, operation, key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            code, message = _error_code(exc)
            return name, Unreadable(operation, code, message, service)

    with ThreadPoolExecutor(max_workers=min(workers, len(calls))) as pool:
        result = dict(pool.map(one, calls.items()))
    _fill_prefix_list_cidrs(client, result)
    _read_dhcp_options(client, vpc_id, result)
    _read_route_prefix_lists(client, result)
    return result


def _read_dhcp_options(client, vpc_id: str, result: dict) -> None:
    """The VPC's DHCP options set (``[]`` for ``default``: AmazonProvidedDNS only); unset when the VPC is unread."""
    vpc = next((v for v in result.get("vpcs") if v.get("VpcId") == vpc_id), None) \
        if isinstance(result.get("vpcs"), list) else None
    if vpc is None:
        return
    dopt = vpc.get("DhcpOptionsId") or "default"
    if dopt == "default":
        result["dhcp_options"] = []
        return
    try:
        result["dhcp_options"] = paginate(client, "describe_dhcp_options", "DhcpOptions", DhcpOptionsIds=[dopt])
    except (ClientError, BotoCoreError) as exc:
        code, message = _error_code(exc)
        result["dhcp_options"] = Unreadable("describe_dhcp_options", code, message)


def _read_route_prefix_lists(client, result: dict) -> None:
    """``{pl-id: [cidr]}`` of every prefix list a route sends to (or one Unreadable), for route_to_production."""
    tables = result.get("route_tables")
    if not isinstance(tables, list):
        return  # route tables unreadable: already a finding, no route is judged
    ids = sorted({r["DestinationPrefixListId"] for t in tables for r in t.get("Routes") or []
                  if r.get("DestinationPrefixListId")})
    entries = {}
    for pl in ids:
        try:
            entries[pl] = [e["Cidr"] for e in paginate(client, "get_managed_prefix_list_entries", "Entries",
                                                       PrefixListId=pl)]
        except (ClientError, BotoCoreError) as exc:
            code, message = _error_code(exc)
            if _is_aws_managed(pl, result.get("prefix_lists")):
                continue  # an AWS service's list (S3): its routes are judged by target
            result["route_prefix_lists"] = Unreadable("get_managed_prefix_list_entries", code, message)
            return
    result["route_prefix_lists"] = [entries]


def _is_aws_managed(pl_id: str, lists) -> bool:
    return isinstance(lists, list) and any(p.get("PrefixListId") == pl_id for p in lists)


def _fill_prefix_list_cidrs(client, result: dict) -> None:
    """DescribePrefixLists may leave ``Cidrs`` out; read them from the managed prefix list."""
    lists = result.get("prefix_lists")
    if not isinstance(lists, list):
        return
    for pl in lists:
        if not S3_SERVICE_RE.match(pl.get("PrefixListName", "")) or pl.get("Cidrs"):
            continue
        try:
            managed = paginate(client, "describe_managed_prefix_lists", "PrefixLists",
                               Filters=[{"Name": "prefix-list-name", "Values": [pl["PrefixListName"]]}])
            pl["Cidrs"] = [e["Cidr"] for m in managed
                           for e in paginate(client, "get_managed_prefix_list_entries", "Entries",
                                             PrefixListId=m["PrefixListId"])]
        except (ClientError, BotoCoreError) as exc:
            code, message = _error_code(exc)
            result["prefix_lists"] = Unreadable("get_managed_prefix_list_entries", code, message)
            return


# ---------------------------------------------------------------- evaluation

class _Findings:
    def __init__(self):
        self.items = []
        self._seen = set()

    def add(self, code: str, resource: str, detail: str) -> None:
        key = (code, resource, detail)
        if key not in self._seen:
            self._seen.add(key)
            self.items.append({"code": code, "resource": resource, "detail": detail})


def _net(text):
    try:
        return ipaddress.ip_network(text, strict=False)
    except (TypeError, ValueError):
        return None


def _within_any(net, nets) -> bool:
    return net is not None and net.version == 4 and any(net.subnet_of(n) for n in nets if n.version == 4)


def _overlapping(net, nets) -> list:
    if net is None or net.version != 4:
        return []
    return [n for n in nets if n.version == 4 and net.overlaps(n)]


def _proto(value) -> str:
    text = str(value).lower()
    return _PROTOCOL_NAMES.get(text, text)


def _ports_covered(want_start: int, want_end: int, ranges) -> bool:
    """True when the union of ``ranges`` (PortRange objects) covers want_start..want_end."""
    pos = want_start
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start > pos:
            break
        pos = max(pos, r.end + 1)
        if pos > want_end:
            return True
    return pos > want_end


def _declared_covers(rules, net, proto: str, start: int, end: int) -> bool:
    if net is None or net.version != 4 or proto not in ("tcp", "udp"):
        return False
    ranges = [p for r in rules if r.protocol == proto and net.subnet_of(r.cidr) for p in r.ports]
    return _ports_covered(start, end, ranges)


def _readable(snapshot: dict, name: str, findings: _Findings, vpc_id: str):
    value = snapshot.get(name)
    if isinstance(value, Unreadable):
        action = value.service + ":" + _ACTION_NAMES.get(
            value.operation, "".join(w.capitalize() for w in value.operation.split("_")))
        findings.add("unreadable", action,
                     "%s failed with %s (%s); %s of %s were not verified"
                     % (action, value.error_code, value.message, name.replace("_", " "), vpc_id))
        return None
    # Results are re-filtered here: a describe filter that an endpoint ignored must not
    # pull another VPC's resources into this verdict (items without VpcId are kept).
    return [item for item in value or [] if item.get("VpcId", vpc_id) == vpc_id]


def _live_cidrs(vpc: dict) -> tuple:
    v4 = [a["CidrBlock"] for a in vpc.get("CidrBlockAssociationSet") or []
          if (a.get("CidrBlockState") or {}).get("State") in ("associated", "associating")]
    if not v4 and vpc.get("CidrBlock"):
        v4 = [vpc["CidrBlock"]]
    v6 = [a.get("Ipv6CidrBlock") or a.get("Ipv6Pool") or "?" for a in vpc.get("Ipv6CidrBlockAssociationSet") or []
          if (a.get("Ipv6CidrBlockState") or {}).get("State") in ("associated", "associating")]
    return v4, v6


def _check_vpc(boundary, vpc: dict, vpc_id: str, f: _Findings) -> list:
    v4, v6 = _live_cidrs(vpc)
    for cidr in v4:
        hits = boundary.overlaps_production(cidr)
        if hits:
            f.add("vpc_overlaps_production", vpc_id, "VPC CIDR %s overlaps production CIDR(s) %s"
                  % (cidr, ", ".join(str(h) for h in hits)))
        net = _net(cidr)
        if boundary.sandbox_cidr is not None and not (net and net.subnet_of(boundary.sandbox_cidr)):
            f.add("vpc_cidr_undeclared", vpc_id, "VPC CIDR %s is outside the declared sandbox_cidr %s"
                  % (cidr, boundary.sandbox_cidr))
    for cidr in v6:
        f.add("ipv6_present", vpc_id, "IPv6 CIDR %s is associated with the VPC; the boundary is IPv4-only" % cidr)
    return v4


def _route_dest(route: dict) -> str:
    return (route.get("DestinationCidrBlock") or route.get("DestinationIpv6CidrBlock")
            or route.get("DestinationPrefixListId") or "?")


def _is_declared_route(boundary, route: dict, targets: list) -> bool:
    cp = boundary.control_plane_route
    if not cp or len(targets) != 1 or route.get("DestinationCidrBlock") != cp["cidr"]:
        return False
    key, value = targets[0]
    return value == cp["target"] and _CONTROL_PLANE_KEY.get(cp["target"][:4]) == key


def _route_target_code(key: str, value: str, route: dict, s3_endpoints: set, s3_pl: str | None) -> str | None:
    """None when the target is allowed; otherwise the finding code."""
    if key == "GatewayId":
        if value == "local":
            return None
        if value.startswith("igw-"):
            return "route_igw"
        if value.startswith("vgw-"):
            return "route_vgw"
        if value.startswith("vpce-") and s3_pl and route.get("DestinationPrefixListId") == s3_pl \
                and value in s3_endpoints:
            return None
        return "route_unknown_target"
    return _ROUTE_TARGET_CODES.get(key, "route_unknown_target")


def _route_dest_cidrs(route: dict, pl_entries: dict) -> list:
    """The CIDRs a route's destination stands for (a prefix list's entries, when they were read)."""
    pl = route.get("DestinationPrefixListId")
    if pl:
        return [c for c in pl_entries.get(pl) or [] if _net(c)]
    dest = route.get("DestinationCidrBlock") or route.get("DestinationIpv6CidrBlock")
    return [dest] if _net(dest) else []


def _check_routes(boundary, tables: list, s3: tuple, pl_entries: dict, f: _Findings) -> int:
    """``s3``: (ids of the VPC's S3 gateway endpoints, the S3 prefix list id); ``pl_entries``: {pl-id: [cidr]}."""
    s3_endpoints, s3_pl = s3
    count = 0
    for table in tables:
        rtb = table.get("RouteTableId", "?")
        main = any(a.get("Main") for a in table.get("Associations") or [])
        for route in table.get("Routes") or []:
            count += 1
            dest = _route_dest(route)
            targets = [(k, str(v)) for k, v in sorted(route.items()) if k not in _ROUTE_META_KEYS and v]
            where = "%s%s" % (rtb, " (main)" if main else "")
            state = " (blackhole)" if route.get("State") == "blackhole" else ""
            if not targets:
                f.add("route_unknown_target", rtb, "%s: route to %s has no recognisable target%s"
                      % (where, dest, state))
                continue
            local = targets == [("GatewayId", "local")]
            if not local and not _is_declared_route(boundary, route, targets):
                for key, value in targets:
                    code = _route_target_code(key, value, route, s3_endpoints, s3_pl)
                    if code:
                        f.add(code, rtb, "%s: route to %s via %s %s%s" % (where, dest, key, value, state))
            if not local:
                cidrs = _route_dest_cidrs(route, pl_entries)
                hits = sorted({h for c in cidrs for h in boundary.overlaps_production(c)})
                if hits:
                    via = (" (entries %s)" % ", ".join(c for c in cidrs if boundary.overlaps_production(c))
                           if route.get("DestinationPrefixListId") else "")
                    f.add("route_to_production", rtb, "%s: route to %s%s overlaps production CIDR(s) %s%s"
                          % (where, dest, via, ", ".join(str(h) for h in hits), state))
    return count


def _declared_target(boundary) -> str | None:
    return boundary.control_plane_route["target"] if boundary.control_plane_route else None


def _check_gateways(boundary, vpc_id: str, snap: dict, f: _Findings, checked: dict) -> None:
    declared = _declared_target(boundary)
    igws = _readable(snap, "internet_gateways", f, vpc_id)
    if igws is not None:
        checked["internet_gateways"] = len(igws)
        for igw in igws:
            for att in igw.get("Attachments") or []:
                if att.get("VpcId") == vpc_id and att.get("State") != "detached":
                    f.add("igw_attached", igw.get("InternetGatewayId", "?"),
                          "internet gateway attached to %s (state %s)" % (vpc_id, att.get("State")))
    nats = _readable(snap, "nat_gateways", f, vpc_id)
    if nats is not None:
        checked["nat_gateways"] = len(nats)
        for nat in nats:
            if nat.get("State") not in ("deleted", "failed"):
                f.add("nat_gateway_present", nat.get("NatGatewayId", "?"),
                      "NAT gateway in subnet %s (state %s)" % (nat.get("SubnetId"), nat.get("State")))
    vgws = _readable(snap, "vpn_gateways", f, vpc_id)
    if vgws is not None:
        checked["vpn_gateways"] = len(vgws)
        for vgw in vgws:
            gid = vgw.get("VpnGatewayId", "?")
            for att in vgw.get("VpcAttachments") or []:
                if (att.get("VpcId") == vpc_id and att.get("State") != "detached" and vgw.get("State") != "deleted"
                        and gid != declared):
                    f.add("vgw_attached", gid, "virtual private gateway attached to %s (state %s)"
                          % (vpc_id, att.get("State")))
    peerings, readable = {}, False
    for name in ("peering_requester", "peering_accepter"):
        items = _readable(snap, name, f, vpc_id)
        readable = readable or items is not None
        for pcx in items or []:
            ends = {(pcx.get(side) or {}).get("VpcId") for side in ("RequesterVpcInfo", "AccepterVpcInfo")}
            if vpc_id in ends:  # the API filter is not trusted to have been applied
                peerings[pcx.get("VpcPeeringConnectionId", "?")] = pcx
    if readable:
        checked["peering_connections"] = len(peerings)
    for pid, pcx in sorted(peerings.items()):
        status = (pcx.get("Status") or {}).get("Code")
        if status in ("initiating-request", "pending-acceptance", "provisioning", "active") and pid != declared:
            req, acc = pcx.get("RequesterVpcInfo") or {}, pcx.get("AccepterVpcInfo") or {}
            f.add("peering_active", pid, "peering %s between %s (%s) and %s (%s)"
                  % (status, req.get("VpcId"), req.get("CidrBlock"), acc.get("VpcId"), acc.get("CidrBlock")))
    atts = _readable(snap, "tgw_attachments", f, vpc_id)
    if atts is not None:
        checked["transit_gateway_attachments"] = len(atts)
        for att in atts:
            if (att.get("State") not in ("deleted", "failed", "rejected")
                    and att.get("TransitGatewayId") != declared):
                f.add("tgw_attachment", att.get("TransitGatewayAttachmentId", "?"),
                      "VPC attached to transit gateway %s (state %s), which is not the declared "
                      "control-plane target" % (att.get("TransitGatewayId"), att.get("State")))


def _check_subnets(subnets: list, f: _Findings) -> None:
    for sn in subnets:
        sid = sn.get("SubnetId", "?")
        if sn.get("MapPublicIpOnLaunch"):
            f.add("subnet_public_ip", sid, "subnet %s assigns public IPv4 addresses on launch" % sn.get("CidrBlock"))
        if sn.get("MapCustomerOwnedIpOnLaunch"):
            f.add("subnet_public_ip", sid, "subnet %s assigns customer-owned IPv4 addresses (pool %s) on launch, "
                  "reachable from the on-premises network" % (sn.get("CidrBlock"), sn.get("CustomerOwnedIpv4Pool")))
        if sn.get("AssignIpv6AddressOnCreation"):
            f.add("subnet_ipv6_autoassign", sid, "subnet assigns IPv6 addresses on creation")
        for a in sn.get("Ipv6CidrBlockAssociationSet") or []:
            if (a.get("Ipv6CidrBlockState") or {}).get("State") in ("associated", "associating"):
                f.add("ipv6_present", sid, "IPv6 CIDR %s is associated with the subnet" % a.get("Ipv6CidrBlock"))


def _sg_rule_text(direction: str, proto: str, start: int, end: int, peer: str) -> str:
    ports = "all ports" if proto == "all" else ("port %d" % start if start == end else "ports %d-%d" % (start, end))
    return "%s %s %s %s %s" % (direction, proto, ports, "to" if direction == "egress" else "from", peer)


@dataclass(frozen=True)
class _SgContext:
    boundary: object
    vpc_nets: tuple
    group_ids: frozenset
    s3_pl: str | None
    owner: str | None
    tiers: object = None  # _TierGroups of a drill's VPC, else None
    tier: str | None = None  # the tier whose group is judged, if it is one


@dataclass(frozen=True)
class _TierGroups:
    """The live groups of a drill's VPC, told apart by name: ``by_tier`` {tier: group}, the SSM endpoints' one."""
    drill_id: str
    by_tier: dict
    ssm_group: str | None

    def tier_of(self, gid) -> str | None:
        return next((t for t, g in self.by_tier.items() if g.get("GroupId") == gid), None)


def _drill_id_tag(item: dict | None) -> str | None:
    value = next((t.get("Value") for t in (item or {}).get("Tags") or [] if t.get("Key") == TAG_DRILL_ID), None)
    return value if isinstance(value, str) and DRILL_ID_RE.fullmatch(value) else None


def _tier_groups(boundary, vpc: dict | None, groups: list) -> _TierGroups | None:
    """Which live group is which tier's: the drill is the VPC's ``drguard:drill-id`` tag, else the one drill id
    that groups named for a tier (``drguard-<drill id>-<tier>``) carry. None for a VPC of no (or no single) drill:
    its groups cannot be told apart by tier."""
    tiers = workload_tiers(boundary)
    drill_id = _drill_id_tag(vpc)
    if drill_id is None:
        ids = {_drill_id_tag(g) for g in groups} - {None}
        ids = {i for i in ids if any(g.get("GroupName") in {sg_name(i, t) for t in tiers} for g in groups)}
        if len(ids) != 1:
            return None
        drill_id = ids.pop()
    by_name = {g.get("GroupName"): g for g in groups}
    by_tier = {t: by_name[sg_name(drill_id, t)] for t in tiers if sg_name(drill_id, t) in by_name}
    # The SSM endpoints' group is known by name, declared or not: its endpoints are judged on their own
    # (endpoint_unsupported when ssm_endpoints is not declared).
    ssm = by_name.get(network_names(drill_id)["ssm_sg"])
    return _TierGroups(drill_id, by_tier, ssm.get("GroupId") if ssm else None)


def _check_security_groups(boundary, groups: list, vpc_cidrs: list, s3_pl: str | None,
                           f: _Findings, *, tiers: _TierGroups | None = None) -> int:
    vpc_nets = tuple(n for n in (_net(c) for c in vpc_cidrs) if n is not None)
    group_ids = frozenset(g.get("GroupId") for g in groups)
    rules_seen = 0
    for sg in groups:
        gid = sg.get("GroupId", "?")
        ctx = _SgContext(boundary, vpc_nets, group_ids, s3_pl, sg.get("OwnerId"), tiers,
                         tiers.tier_of(gid) if tiers else None)
        perms = {"ingress": sg.get("IpPermissions") or [], "egress": sg.get("IpPermissionsEgress") or []}
        if sg.get("GroupName") == "default":
            n = sum(len(p.get("IpRanges") or []) + len(p.get("Ipv6Ranges") or []) + len(p.get("PrefixListIds") or [])
                    + len(p.get("UserIdGroupPairs") or []) or 1 for p in perms["ingress"] + perms["egress"])
            if n:
                f.add("default_sg_has_rules", gid, "the default security group has %d rule(s); remove them all "
                      "so that nothing relies on it" % n)
        for direction, plist in perms.items():
            for perm in plist:
                proto = _proto(perm.get("IpProtocol", "-1"))
                start, end = 0, 65535
                if proto in ("tcp", "udp") and int(perm.get("FromPort", -1)) != -1:
                    start, end = int(perm["FromPort"]), int(perm.get("ToPort", perm["FromPort"]))
                rule = (direction, proto, start, end)
                for peer_kind, items in (("cidr", perm.get("IpRanges") or []), ("cidr6", perm.get("Ipv6Ranges") or []),
                                         ("pl", perm.get("PrefixListIds") or []),
                                         ("sg", perm.get("UserIdGroupPairs") or [])):
                    for item in items:
                        rules_seen += 1
                        code = _judge_sg_peer(ctx, rule, peer_kind, item)
                        if code:
                            peer = (item.get("CidrIp") or item.get("CidrIpv6") or item.get("PrefixListId")
                                    or item.get("GroupId") or "?")
                            detail = _sg_rule_text(direction, proto, start, end, peer)
                            hits = boundary.overlaps_production(peer) if peer_kind == "cidr" and _net(peer) else []
                            if hits:
                                detail += " (overlaps production CIDR(s) %s)" % ", ".join(str(h) for h in hits)
                            if code == "tier_rule_extra":
                                detail = ("tier %s's group %s allows %s: every tier may use it, while "
                                          "drill_boundary.tier_rules declares tier traffic group to group"
                                          % (ctx.tier, gid, detail))
                            f.add(code, gid, detail)
    return rules_seen


def _judge_sg_peer(ctx: _SgContext, rule: tuple, kind: str, item: dict) -> str | None:
    """None when one peer of a security group rule is within the boundary, else the finding code."""
    direction, proto, start, end = rule
    boundary = ctx.boundary
    open_code, undeclared_code = "sg_%s_open" % direction, "sg_%s_undeclared" % direction
    if kind == "cidr":
        net = _net(item.get("CidrIp"))
        if net is None:
            return undeclared_code
        if _within_any(net, ctx.vpc_nets) and not boundary.overlaps_production(net):
            # intra-sandbox; on a tier's group it would let every tier past tier_rules
            return "tier_rule_extra" if ctx.tier is not None else None
        if net.prefixlen == 0 or proto == "all":
            return open_code
        declared = boundary.egress + boundary.fallback if direction == "egress" else boundary.ingress
        return None if _declared_covers(declared, net, proto, start, end) else undeclared_code
    if kind == "cidr6":
        net = _net(item.get("CidrIpv6"))
        return open_code if net is None or net.prefixlen == 0 else undeclared_code
    if kind == "pl":
        ok = (direction == "egress" and ctx.s3_pl is not None and item.get("PrefixListId") == ctx.s3_pl
              and proto == "tcp" and start == end == 443 and bool(boundary.s3_read or boundary.s3_write))
        return None if ok else undeclared_code
    # SG reference: allowed only to groups of this VPC, same account, not across a peering.
    ok = (item.get("GroupId") in ctx.group_ids and not item.get("VpcPeeringConnectionId")
          and (not item.get("UserId") or not ctx.owner or item.get("UserId") == ctx.owner))
    if ok and ctx.tier is not None:
        # A tier's group reaches other tiers' groups (judged by _check_tier_rules) and, on tcp 443 out,
        # the SSM endpoints' group; any other group of the VPC is undeclared.
        peer = item.get("GroupId")
        ssm = (peer == ctx.tiers.ssm_group and direction == "egress" and proto == "tcp" and start == end == 443)
        ok = ctx.tiers.tier_of(peer) is not None or ssm
    return None if ok else undeclared_code


def _ports_minus(ranges, cut) -> list:
    """The ports of ``ranges`` that are not in ``cut`` (both lists of inclusive ``(start, end)``), merged."""
    left = merge_port_ranges(ranges)
    for c_start, c_end in merge_port_ranges(cut):
        nxt = []
        for start, end in left:
            if c_end < start or end < c_start:
                nxt.append((start, end))
                continue
            if start < c_start:
                nxt.append((start, c_start - 1))
            if c_end < end:
                nxt.append((c_end + 1, end))
        left = nxt
    return left


def _check_tier_rules(boundary, vpc_id: str, tiers: _TierGroups, f: _Findings) -> int:
    """Every tier rule both ways (ingress on the destination's group from the source's, egress on the source's
    to the destination's), as port sets per protocol; a reference between tier groups that no tier rule
    declares is extra. Returns how many declared (group, direction, protocol, peer) sets were compared."""
    for tier in workload_tiers(boundary):
        if tier not in tiers.by_tier:
            f.add("tier_group_missing", vpc_id, "tier %s has no security group %s in the VPC (drill %s)"
                  % (tier, sg_name(tiers.drill_id, tier), tiers.drill_id))
    gid = {t: g.get("GroupId") for t, g in tiers.by_tier.items()}
    declared, pairs = {}, {}
    for tr in boundary.tier_rules:
        if tr.source not in gid or tr.dest not in gid:
            continue
        ports = [(p.start, p.end) for p in tr.ports]
        for key in ((gid[tr.dest], "ingress", tr.protocol, gid[tr.source]),
                    (gid[tr.source], "egress", tr.protocol, gid[tr.dest])):
            declared.setdefault(key, []).extend(ports)
            pairs.setdefault(key, set()).add("%s to %s" % (tr.source, tr.dest))
    live = {}
    for tier, sg in tiers.by_tier.items():
        for direction, field in (("ingress", "IpPermissions"), ("egress", "IpPermissionsEgress")):
            for perm in sg.get(field) or []:
                proto = _proto(perm.get("IpProtocol", "-1"))
                start, end = 0, 65535
                if proto in ("tcp", "udp") and int(perm.get("FromPort", -1)) != -1:
                    start, end = int(perm["FromPort"]), int(perm.get("ToPort", perm["FromPort"]))
                for pair in perm.get("UserIdGroupPairs") or []:
                    peer = pair.get("GroupId")
                    if tiers.tier_of(peer) is None:
                        continue  # judged by _judge_sg_peer
                    if proto not in ("tcp", "udp"):
                        ports = "all ports" if proto == "all" else "type/code %s/%s" % (
                            perm.get("FromPort"), perm.get("ToPort"))
                        f.add("tier_rule_extra", gid[tier], "tier %s's group %s allows %s %s %s %s %s (%s), which no "
                              "tier rule declares (tier rules are tcp or udp)"
                              % (tier, gid[tier], direction, proto, ports,
                                 "to" if direction == "egress" else "from", peer, tiers.tier_of(peer)))
                        continue
                    live.setdefault((gid[tier], direction, proto, peer), []).append((start, end))

    def text(key, ranges):
        _group, direction, proto, peer = key
        return ", ".join(_sg_rule_text(direction, proto, s, e, "%s (%s)" % (peer, tiers.tier_of(peer)))
                         for s, e in ranges)

    for key in sorted(set(declared) | set(live)):
        group, direction, proto, peer = key
        tier = tiers.tier_of(group)
        missing = _ports_minus(declared.get(key, []), live.get(key, []))
        extra = _ports_minus(live.get(key, []), declared.get(key, []))
        if missing:
            f.add("tier_rule_missing", group, "tier %s's group %s lacks %s, declared by drill_boundary.tier_rules (%s)"
                  % (tier, group, text(key, missing), ", ".join(sorted(pairs[key]))))
        if extra:
            src, dst = (tiers.tier_of(peer), tier) if direction == "ingress" else (tier, tiers.tier_of(peer))
            allowed = ", ".join(("%d" % s if s == e else "%d-%d" % (s, e))
                                for s, e in merge_port_ranges(declared.get(key, [])))
            f.add("tier_rule_extra", group, "tier %s's group %s allows %s, which drill_boundary.tier_rules does "
                  "not declare (%s to %s on %s: %s)" % (tier, group, text(key, extra), src, dst, proto,
                                                        "ports " + allowed if allowed else "nothing"))
    return len(declared)


def _nacl_entry_text(e: dict) -> str:
    direction = "egress" if e.get("Egress") else "ingress"
    proto = _proto(e.get("Protocol", "-1"))
    pr = e.get("PortRange") or {}
    ports = " ports %s-%s" % (pr.get("From"), pr.get("To")) if pr and proto in ("tcp", "udp") else ""
    peer = e.get("CidrBlock") or e.get("Ipv6CidrBlock") or "?"
    return "%s rule %s %s %s%s %s %s" % (direction, e.get("RuleNumber"), e.get("RuleAction"), proto, ports,
                                         "to" if e.get("Egress") else "from", peer)


def _without(nets: list, cut) -> list:
    """``nets`` minus the addresses of ``cut``."""
    out = []
    for net in nets:
        if net.subnet_of(cut):
            continue
        out.extend(net.address_exclude(cut) if cut.subnet_of(net) else [net])
    return out


def _check_production_deny(prod, entries: list, direction: str, aid: str, f: _Findings) -> None:
    """Every address of ``prod`` must meet an explicit DENY of all protocols before any ALLOW.

    Entries are walked in rule-number order, as AWS evaluates them: a DENY takes its
    addresses out of the part still open; an ALLOW that overlaps the open part comes
    too early. Several DENY entries that together cover the CIDR count (rule 10 denies
    one half, rule 11 the other); one that covers only part of it does not.
    """
    open_part, early = [prod], []
    for e in sorted(entries, key=lambda e: e.get("RuleNumber", 0)):
        if e.get("RuleNumber") == _NACL_DEFAULT_RULE or not open_part:
            continue
        net = _net(e.get("CidrBlock"))
        if net is None or net.version != 4:
            continue
        if e.get("RuleAction") == "allow" and _overlapping(net, open_part):
            early.append(e["RuleNumber"])
        elif e.get("RuleAction") == "deny" and _proto(e.get("Protocol")) == "all":
            open_part = _without(open_part, net)
    if open_part == [prod]:
        f.add("nacl_missing_production_deny", aid, "%s: no explicit DENY of all protocols covering production CIDR %s"
              % (direction, prod))
    elif open_part:
        f.add("nacl_missing_production_deny", aid, "%s: explicit DENY rules of all protocols cover only part of "
              "production CIDR %s; not denied: %s"
              % (direction, prod, ", ".join(str(n) for n in ipaddress.collapse_addresses(open_part))))
    if early:
        f.add("nacl_missing_production_deny", aid, "%s: ALLOW rule(s) %s overlapping production CIDR %s come before "
              "the DENY rules that cover all of it" % (direction, ", ".join(map(str, early)), prod))


def _check_nacls(boundary, nacls: list, subnets: list | None, allowed: dict, f: _Findings) -> int:
    """``allowed``: {"vpc": [cidr], "s3": [cidr]} - the live VPC CIDRs and the S3 prefix list's CIDRs."""
    vpc_nets = [n for n in (_net(c) for c in allowed["vpc"]) if n is not None]
    declared_nets = [r.cidr for r in boundary.ingress + boundary.egress + boundary.fallback]
    s3_nets = []
    if boundary.s3_read or boundary.s3_write:
        s3_nets = [n for n in (_net(c) for c in allowed["s3"]) if n is not None]
    entries_seen = 0
    subnet_acl = {}
    for acl in nacls:
        for assoc in acl.get("Associations") or []:
            subnet_acl[assoc.get("SubnetId")] = acl
    for sn in subnets or []:
        sid = sn.get("SubnetId")
        acl = subnet_acl.get(sid)
        if acl is None:
            f.add("nacl_missing_production_deny", sid or "?",
                  "no network ACL association was found for the subnet, so no production deny is proven")
        elif acl.get("IsDefault") and any(e.get("RuleAction") == "allow" and e.get("CidrBlock") == "0.0.0.0/0"
                                          for e in acl.get("Entries") or []):
            f.add("subnet_default_nacl", sid, "subnet uses the VPC's allow-all default network ACL %s"
                  % acl.get("NetworkAclId"))
    for acl in nacls:
        if not acl.get("Associations"):
            continue  # associated with no subnet: filters no traffic
        aid = acl.get("NetworkAclId", "?")
        entries = acl.get("Entries") or []
        entries_seen += len(entries)
        for egress in (False, True):
            direction = "egress" if egress else "ingress"
            mine = [e for e in entries if bool(e.get("Egress")) == egress]
            allows = [e for e in mine if e.get("RuleAction") == "allow"]
            for prod in boundary.production_cidrs:
                _check_production_deny(prod, mine, direction, aid, f)
            for e in allows:
                net = _net(e.get("CidrBlock") or e.get("Ipv6CidrBlock"))
                if net is None or net.prefixlen == 0:
                    f.add("nacl_allow_any", aid, _nacl_entry_text(e))
                    continue
                if net.version == 4 and not boundary.overlaps_production(net) and (
                        _within_any(net, vpc_nets) or _within_any(net, declared_nets)
                        or (_within_any(net, s3_nets) and _proto(e.get("Protocol")) == "tcp")):
                    continue
                f.add("nacl_allow_undeclared", aid, _nacl_entry_text(e))
    return entries_seen


# ------------------------------------------------- fallback paths: allowed, not merely not leaking

# A box of traffic: (IPv4 network, first port, last port).

def _box_minus(box: tuple, cut: tuple) -> list:
    """The boxes of ``box`` that ``cut`` does not cover."""
    net, start, end = box
    cnet, cstart, cend = cut
    if not net.overlaps(cnet) or end < cstart or start > cend:
        return [box]
    if net.subnet_of(cnet):
        inside, out = net, []
    else:
        inside, out = cnet, [(n, start, end) for n in net.address_exclude(cnet)]
    if start < cstart:
        out.append((inside, start, cstart - 1))
    if end > cend:
        out.append((inside, cend + 1, end))
    return out


def _boxes_minus(boxes: list, cut: tuple) -> list:
    return [piece for box in boxes for piece in _box_minus(box, cut)]


def _boxes_text(boxes: list) -> str:
    by_ports = {}
    for net, start, end in boxes:
        by_ports.setdefault((start, end), []).append(net)
    parts = []
    for (start, end), nets in sorted(by_ports.items()):
        ports = "port %d" % start if start == end else "ports %d-%d" % (start, end)
        parts += ["%s %s" % (n, ports) for n in ipaddress.collapse_addresses(nets)]
    return ", ".join(parts)


def _fallback_flows(boundary):
    """``(index, rule, port range)`` for every declared fallback port range."""
    for i, rule in enumerate(boundary.fallback):
        for port in rule.ports:
            yield i, rule, port


def _flow_text(direction: str, i: int, rule, port) -> str:
    ports = "port %d" % port.start if port.start == port.end else "ports %d-%d" % (port.start, port.end)
    return "%s %s %s to %s (drill_boundary.fallback[%d])" % (direction, rule.protocol, ports, rule.cidr, i)


def _workload_group(sg: dict, tiers) -> bool:
    """A group a tier's workloads sit in: not the default one; it sends traffic or is named for a tier.

    A group without any egress rule whose name is no tier's (an interface endpoint's, which only
    receives) holds no workload, so a fallback is not expected there.
    """
    name = sg.get("GroupName") or ""
    if name == "default":
        return False
    return bool(sg.get("IpPermissionsEgress")) or any(name == t or name.endswith("-" + t) for t in tiers)


def _check_fallback_groups(boundary, groups: list, f: _Findings) -> None:
    """Every workload group must allow egress to every declared fallback port (security groups are stateful)."""
    for sg in groups:
        if not _workload_group(sg, boundary.tiers):
            continue
        gid = sg.get("GroupId", "?")
        allows = []
        for perm in sg.get("IpPermissionsEgress") or []:
            proto = _proto(perm.get("IpProtocol", "-1"))
            start, end = 0, 65535
            if proto in ("tcp", "udp") and int(perm.get("FromPort", -1)) != -1:
                start, end = int(perm["FromPort"]), int(perm.get("ToPort", perm["FromPort"]))
            for rng in perm.get("IpRanges") or []:
                net = _net(rng.get("CidrIp"))
                if net is not None and net.version == 4:
                    allows.append((proto, (net, start, end)))
        for i, rule, port in _fallback_flows(boundary):
            left = [(rule.cidr, port.start, port.end)]
            for proto, box in allows:
                if proto in ("all", rule.protocol):
                    left = _boxes_minus(left, box)
            if left:
                f.add("fallback_blocked", gid, "%s is not allowed by security group %s (%s); not allowed: %s"
                      % (_flow_text("egress", i, rule, port), gid, sg.get("GroupName"), _boxes_text(left)))


def _nacl_blocked(entries: list, egress: bool, protocol: str, box: tuple) -> list:
    """The parts of ``box`` the ACL does not allow, walking entries in rule-number order as AWS does."""
    open_part, blocked = [box], []
    for e in sorted(entries, key=lambda e: e.get("RuleNumber", 0)):
        if bool(e.get("Egress")) != egress or e.get("RuleNumber") == _NACL_DEFAULT_RULE or not open_part:
            continue
        proto = _proto(e.get("Protocol", "-1"))
        net = _net(e.get("CidrBlock"))
        if net is None or net.version != 4 or proto not in ("all", protocol):
            continue
        pr = e.get("PortRange") or {}
        start, end = (0, 65535) if proto == "all" or not pr else (int(pr.get("From", 0)), int(pr.get("To", 65535)))
        cut = (net, start, end)
        if e.get("RuleAction") != "allow":
            blocked += _overlap(open_part, cut)
        open_part = _boxes_minus(open_part, cut)
    return blocked + open_part  # what no entry allowed meets the implicit deny


def _overlap(boxes: list, cut: tuple) -> list:
    """The parts of ``boxes`` inside ``cut`` (two IPv4 networks that overlap: one holds the other)."""
    cnet, cstart, cend = cut
    return [(net if net.subnet_of(cnet) else cnet, max(start, cstart), min(end, cend))
            for net, start, end in boxes
            if net.overlaps(cnet) and start <= cend and cstart <= end]


def _check_fallback_nacls(boundary, nacls: list, f: _Findings) -> None:
    """Every associated ACL must let each fallback flow out and its replies back in."""
    for acl in nacls:
        if not acl.get("Associations"):
            continue
        aid = acl.get("NetworkAclId", "?")
        entries = acl.get("Entries") or []
        for i, rule, port in _fallback_flows(boundary):
            for egress, box, direction in ((True, (rule.cidr, port.start, port.end), "egress"),
                                           (False, (rule.cidr,) + _RETURN_PORTS, "ingress (the return path)")):
                left = _nacl_blocked(entries, egress, rule.protocol, box)
                if left:
                    f.add("fallback_blocked", aid, "%s is not allowed by network ACL %s; not allowed: %s"
                          % (_flow_text(direction, i, rule, port), aid, _boxes_text(left)))
                    break


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _grant_covers(resource: str, grants) -> bool:
    m = S3_ARN_RE.match(resource)
    if not m:
        return False
    rest = m.group(1)
    return any(rest == g.bucket or rest.startswith("%s/%s" % (g.bucket, g.prefix)) for g in grants)


def _check_endpoint_policy(boundary, ep: dict, f: _Findings) -> None:
    eid = ep.get("VpcEndpointId", "?")
    text = ep.get("PolicyDocument")
    if not text:
        f.add("endpoint_policy_open", eid, "S3 gateway endpoint has no policy, so AWS allows full access")
        return
    try:
        doc = json.loads(text) if isinstance(text, str) else text
        statements = _as_list(doc.get("Statement"))
    except (ValueError, AttributeError):
        f.add("endpoint_policy_open", eid, "S3 gateway endpoint policy cannot be parsed; treated as open")
        return
    for i, st in enumerate(statements):
        if not isinstance(st, dict):
            f.add("endpoint_policy_open", eid, "statement %d is not an object; treated as open" % i)
            continue
        effect = st.get("Effect")
        if effect == "Deny":
            continue  # a Deny only narrows access
        sid = "statement %s" % (st.get("Sid") or i)
        if effect != "Allow":
            f.add("endpoint_policy_undeclared", eid, "%s has effect %r" % (sid, effect))
            continue
        negated = [key for key in ("NotAction", "NotResource", "NotPrincipal") if key in st]
        for key in negated:
            f.add("endpoint_policy_open", eid, "%s allows with %s, which grants everything not listed"
                  % (sid, key))
        if negated:
            continue  # already open; its Action/Resource lists mean nothing on their own
        actions = [str(a) for a in _as_list(st.get("Action"))]
        resources = [str(r) for r in _as_list(st.get("Resource"))]
        if any(a in ("*", "s3:*") or a.lower() == "s3:*" for a in actions):
            f.add("endpoint_policy_open", eid, "%s allows Action %s" % (sid, ", ".join(actions)))
            continue
        if "*" in resources:
            f.add("endpoint_policy_open", eid, "%s allows Resource *" % sid)
            continue
        for action in actions:
            low = action.lower()
            # Each resource must be covered by a grant that allows this action.
            if resources and all((low in S3_READ_ACTIONS and _grant_covers(r, boundary.s3_read))
                                 or (low in S3_WRITE_ACTIONS and _grant_covers(r, boundary.s3_write))
                                 for r in resources):
                continue
            f.add("endpoint_policy_undeclared", eid, "%s allows %s on %s, which is not within the declared "
                  "s3_read/s3_write grants" % (sid, action, ", ".join(resources) or "no resource"))


def _check_secrets_endpoint_policy(ep: dict, f: _Findings) -> None:
    """The secretsmanager endpoint may allow reading drill runtime secrets only: GetSecretValue on
    ``drguard/<drill id>/runtime/*``; anything else (no policy: AWS allows all) is a way out of the sandbox."""
    eid = ep.get("VpcEndpointId", "?")
    try:
        text = ep.get("PolicyDocument")
        statements = _as_list((json.loads(text) if isinstance(text, str) else text or {}).get("Statement"))
    except (ValueError, AttributeError):
        statements = []
    if not statements:
        f.add("endpoint_policy_open", eid, "secretsmanager endpoint has no readable policy, so AWS allows full "
              "access to Secrets Manager from the sandbox")
        return
    for i, st in enumerate(statements):
        if not isinstance(st, dict) or st.get("Effect") == "Deny":
            if not isinstance(st, dict):
                f.add("endpoint_policy_open", eid, "statement %d is not an object; treated as open" % i)
            continue
        sid = "statement %s" % (st.get("Sid") or i)
        actions = [str(a).lower() for a in _as_list(st.get("Action"))]
        resources = [str(r) for r in _as_list(st.get("Resource"))]
        if st.get("Effect") != "Allow" or any(k in st for k in ("NotAction", "NotResource", "NotPrincipal")) \
                or not actions or actions != ["secretsmanager:getsecretvalue"] * len(actions) or not resources \
                or not all(RUNTIME_SECRET_ARN_RE.match(r) for r in resources):
            f.add("endpoint_policy_undeclared", eid, "secretsmanager endpoint %s allows %s on %s; only "
                  "secretsmanager:GetSecretValue on drguard/<drill id>/runtime/* is expected"
                  % (sid, ", ".join(actions) or "nothing", ", ".join(resources) or "no resource"))


def _check_endpoints(boundary, endpoints: list, f: _Findings) -> set:
    s3_gateways = set()
    for ep in endpoints:
        if ep.get("State", "").lower() in ("deleted", "rejected", "failed", "expired"):
            continue
        eid = ep.get("VpcEndpointId", "?")
        service, etype = ep.get("ServiceName", ""), ep.get("VpcEndpointType", "")
        if etype == "Gateway" and S3_SERVICE_RE.match(service):
            s3_gateways.add(eid)
            _check_endpoint_policy(boundary, ep, f)
        elif etype == "Interface" and SSM_SERVICE_RE.match(service):
            # The ec2 runtime's way in (docs/runtime.md): accepted only when declared, with private DNS.
            if not ssm_endpoints_declared(boundary):
                f.add("endpoint_unsupported", eid, "Interface endpoint for %s: the boundary does not declare "
                      "drill_boundary.ssm_endpoints (the ec2 runtime's SSM endpoints)" % service)
            elif not ep.get("PrivateDnsEnabled"):
                f.add("endpoint_unsupported", eid, "Interface endpoint for %s has private DNS off: the declared "
                      "SSM endpoints must have private DNS" % service)
            elif service.endswith(".secretsmanager"):
                _check_secrets_endpoint_policy(ep, f)
        else:
            f.add("endpoint_unsupported", eid, "%s endpoint for %s: only S3 gateway endpoints are verifiable"
                  % (etype or "unknown", service or "unknown service"))
    return s3_gateways


def _check_dhcp_options(dopts: list, f: _Findings) -> None:
    """Names resolve only through the VPC's own resolver; DHCP must point instances at nothing else."""
    for dopt in dopts:
        did = dopt.get("DhcpOptionsId", "?")
        for conf in dopt.get("DhcpConfigurations") or []:
            key = conf.get("Key")
            values = [v.get("Value") for v in conf.get("Values") or []]
            if key == "domain-name-servers":
                other = [v for v in values if v != "AmazonProvidedDNS"]
                if other:
                    f.add("dhcp_options_dns", did, "domain-name-servers %s: instances would resolve names through "
                          "server(s) other than the VPC's AmazonProvidedDNS" % ", ".join(map(str, other)))
            elif key in _DHCP_HARMLESS:
                continue
            else:
                f.add("dhcp_options_unsupported", did, "%s %s: instances would be pointed at these servers; the "
                      "verifier cannot prove them inside the boundary" % (key, ", ".join(map(str, values))))


def _foreign_service(eni: dict) -> str | None:
    """Why ``eni`` is another service's interface, not one of this account's instances' (None: it is not).

    AWS marks the interfaces it creates in a subnet on a service's behalf (a Client VPN target network
    association, a Lambda function, a load balancer, an interface endpoint, ...) as requester-managed and
    names the service in RequesterId and Description; many also carry their own InterfaceType, an operator,
    or an attachment to something that is not an instance of the interface's own account.
    """
    kind = eni.get("InterfaceType") or "interface"
    if eni.get("RequesterManaged"):
        return "requester-managed by %s (type %s)" % (eni.get("RequesterId") or "an AWS service", kind)
    if kind not in _INSTANCE_INTERFACE_TYPES:
        return "of type %s" % kind
    operator = eni.get("Operator") or {}
    if operator.get("Managed"):
        return "managed by %s" % (operator.get("Principal") or "a service provider")
    att = eni.get("Attachment") or {}
    if att and att.get("Status") != "detached" and not (
            att.get("InstanceId") and att.get("InstanceOwnerId") == eni.get("OwnerId")):
        return "attached to %s of %s, not to an instance of its owner %s" % (
            att.get("InstanceId") or "no instance", att.get("InstanceOwnerId") or "an unknown owner",
            eni.get("OwnerId") or "unknown")
    return None


def _check_outside_reach(vpc_id: str, snap: dict, f: _Findings, checked: dict) -> None:
    """Gateways, interfaces, mirroring and offered services that connect the VPC to the outside."""
    eigws = _readable(snap, "egress_only_igws", f, vpc_id)
    if eigws is not None:
        mine = [g for g in eigws if any(a.get("VpcId") == vpc_id and a.get("State") != "detached"
                                        for a in g.get("Attachments") or [])]
        checked["egress_only_internet_gateways"] = len(mine)
        for g in mine:
            f.add("egress_only_igw_attached", g.get("EgressOnlyInternetGatewayId", "?"),
                  "egress-only internet gateway (IPv6 internet) attached to %s" % vpc_id)
    cagws = _readable(snap, "carrier_gateways", f, vpc_id)
    if cagws is not None:
        cagws = [g for g in cagws if g.get("State") not in ("deleted", "deleting")]
        checked["carrier_gateways"] = len(cagws)
        for g in cagws:
            f.add("carrier_gateway_present", g.get("CarrierGatewayId", "?"),
                  "carrier gateway (Wavelength carrier network) in %s (state %s)" % (vpc_id, g.get("State")))
    enis = _readable(snap, "network_interfaces", f, vpc_id)
    eni_ids = set()
    # A NAT gateway's own interface (its Elastic IP, no source/dest check) is reported as nat_gateway_present.
    nat_enis = {a.get("NetworkInterfaceId") for nat in snap.get("nat_gateways") or [] if isinstance(nat, dict)
                and nat.get("State") not in ("deleted", "failed") for a in nat.get("NatGatewayAddresses") or []} \
        if isinstance(snap.get("nat_gateways"), list) else set()
    # Interfaces whose owner is judged on its own: an interface endpoint's (endpoint_unsupported) and a transit
    # gateway attachment's, one in each of its subnets (the declared control-plane target, or tgw_attachment).
    # Tied only when the owners were read; otherwise they count as any other service's interface (fail closed).
    endpoint_enis = {i for ep in snap.get("vpc_endpoints") for i in ep.get("NetworkInterfaceIds") or []
                     if ep.get("VpcId", vpc_id) == vpc_id} if isinstance(snap.get("vpc_endpoints"), list) else set()
    tgw_subnets = {sn for att in snap.get("tgw_attachments") if att.get("VpcId", vpc_id) == vpc_id
                   and att.get("State") not in ("deleted", "failed", "rejected")
                   for sn in att.get("SubnetIds") or []} if isinstance(snap.get("tgw_attachments"), list) else set()
    if enis is not None:
        checked["network_interfaces"] = len(enis)
        for eni in enis:
            eid = eni.get("NetworkInterfaceId", "?")
            eni_ids.add(eid)
            if eid in nat_enis:
                continue
            kind = eni.get("InterfaceType") or "interface"
            public = sorted({str(assoc[key]) for assoc in [eni.get("Association") or {}] + [
                a.get("Association") or {} for a in eni.get("PrivateIpAddresses") or []]
                for key in _OUTSIDE_ADDRESS_KEYS if assoc.get(key)})
            if public:
                f.add("eni_public_ip", eid, "%s %s has public, carrier or customer-owned IPv4 address(es) %s: "
                      "reachable from outside the VPC" % (kind, eid, ", ".join(public)))
            foreign = _foreign_service(eni)
            owned = eid in endpoint_enis or (kind == "transit_gateway" and eni.get("SubnetId") in tgw_subnets)
            if foreign and not owned:
                described = " (%s)" % eni["Description"] if eni.get("Description") else ""
                f.add("eni_foreign_service", eid, "network interface %s%s is %s: an interface of another service "
                      "(a Client VPN target network association, a Lambda function, a load balancer, ...) can "
                      "carry traffic into or out of the sandbox" % (eid, described, foreign))
            if eni.get("SourceDestCheck") is False:
                f.add("eni_source_dest_check_off", eid, "%s %s has source/destination check off, so it can forward "
                      "traffic that is neither from nor to it" % (kind, eid))
            for a in eni.get("Ipv6Addresses") or []:
                f.add("ipv6_present", eid, "IPv6 address %s is assigned to network interface %s"
                      % (a.get("Ipv6Address"), eid))
    for name, code, text in (("traffic_mirror_sessions", "traffic_mirror_session",
                              "mirrors the traffic of sandbox network interface %s to target %s"),
                             ("traffic_mirror_targets", "traffic_mirror_target",
                              "sandbox network interface %s receives mirrored traffic (target %s)")):
        items = _readable(snap, name, f, vpc_id)
        if items is None or enis is None:
            continue  # without the VPC's interfaces nothing can be tied to it (unreadable already)
        mine = [i for i in items if i.get("NetworkInterfaceId") in eni_ids]
        checked[name] = len(mine)
        for i in mine:
            rid = i.get("TrafficMirrorSessionId") or i.get("TrafficMirrorTargetId") or "?"
            f.add(code, rid, text % (i.get("NetworkInterfaceId"), i.get("TrafficMirrorTargetId")))
    lbs = _readable(snap, "load_balancers", f, vpc_id)
    services = _readable(snap, "endpoint_services", f, vpc_id)
    if lbs is not None:
        checked["load_balancers"] = len(lbs)
        for lb in lbs:
            if lb.get("Scheme") == "internet-facing":
                f.add("load_balancer_internet_facing", lb.get("LoadBalancerArn", "?"),
                      "internet-facing %s load balancer %s in %s" % (lb.get("Type"), lb.get("LoadBalancerName"),
                                                                     vpc_id))
        if services is not None:
            arns = {lb.get("LoadBalancerArn") for lb in lbs}
            mine = [s for s in services if arns & set((s.get("NetworkLoadBalancerArns") or [])
                                                      + (s.get("GatewayLoadBalancerArns") or []))]
            checked["endpoint_services"] = len(mine)
            for svc in mine:
                if (svc.get("ServiceState") or "").lower() in ("deleted", "failed"):
                    continue
                f.add("endpoint_service_offered", svc.get("ServiceId", "?"),
                      "endpoint service %s (PrivateLink) is offered from load balancer(s) %s in %s: other VPCs "
                      "and accounts can reach into the sandbox" % (svc.get("ServiceName"), ", ".join(
                          sorted(arns & set((svc.get("NetworkLoadBalancerArns") or [])
                                            + (svc.get("GatewayLoadBalancerArns") or [])))), vpc_id))


def _check_name_resolution(vpc_id: str, snap: dict, f: _Findings, checked: dict) -> None:
    """Route 53 Resolver rules, endpoints and query logging, and private hosted zones, of this VPC."""
    rules = _readable(snap, "resolver_rule_associations", f, vpc_id)
    if rules is not None:
        # AWS associates its own rules (the internet resolver) with every VPC: those are the default.
        rules = [a for a in rules if a.get("VPCId", vpc_id) == vpc_id and a.get("Status") not in ("DELETING", "FAILED")
                 and not str(a.get("ResolverRuleId", "")).startswith("rslvr-autodefined-")]
        checked["resolver_rule_associations"] = len(rules)
        for a in rules:
            f.add("resolver_rule_associated", a.get("Id", "?"), "Route 53 Resolver rule %s is associated with %s: "
                  "queries it matches are answered or forwarded elsewhere" % (a.get("ResolverRuleId"), vpc_id))
    endpoints = _readable(snap, "resolver_endpoints", f, vpc_id)
    if endpoints is not None:
        endpoints = [e for e in endpoints if e.get("HostVPCId") == vpc_id and e.get("Status") != "DELETING"]
        checked["resolver_endpoints"] = len(endpoints)
        for e in endpoints:
            f.add("resolver_endpoint_present", e.get("Id", "?"), "%s Route 53 Resolver endpoint in %s: DNS queries "
                  "cross the boundary through it" % (e.get("Direction"), vpc_id))
    logs = _readable(snap, "resolver_query_log_associations", f, vpc_id)
    if logs is not None:
        logs = [a for a in logs if a.get("ResourceId") == vpc_id and a.get("Status") not in ("DELETING", "FAILED")]
        checked["resolver_query_log_associations"] = len(logs)
        for a in logs:
            f.add("resolver_query_logging", a.get("Id", "?"), "the VPC's DNS queries are logged by query log "
                  "config %s, to a destination the verifier cannot place inside the drill"
                  % a.get("ResolverQueryLogConfigId"))
    lattice = _readable(snap, "lattice_associations", f, vpc_id)
    if lattice is not None:
        lattice = [a for a in lattice if a.get("vpcId", vpc_id) == vpc_id
                   and a.get("status") not in ("DELETE_IN_PROGRESS", "CREATE_FAILED", "DELETE_FAILED")]
        checked["lattice_associations"] = len(lattice)
        for a in lattice:
            f.add("lattice_service_network_associated", a.get("id", "?"), "VPC Lattice service network %s (%s) is "
                  "associated with %s: its services are reachable from the sandbox and resolve by name"
                  % (a.get("serviceNetworkId"), a.get("serviceNetworkName"), vpc_id))
    zones = _readable(snap, "private_hosted_zones", f, vpc_id)
    if zones is not None:
        checked["private_hosted_zones"] = len(zones)
        for z in zones:
            f.add("private_hosted_zone_associated", str(z.get("HostedZoneId", "?")).rsplit("/", maxsplit=1)[-1],
                  "private hosted zone %s (owner %s) is associated with %s and answers its names"
                  % (z.get("Name"), (z.get("Owner") or {}).get("OwningAccount") or (z.get("Owner") or {}).get(
                      "OwningService"), vpc_id))


def _check_flow_logs(logs: list, vpc_id: str, f: _Findings) -> None:
    good = [fl for fl in logs if fl.get("ResourceId") == vpc_id and fl.get("FlowLogStatus") == "ACTIVE"
            and fl.get("TrafficType") == "ALL" and fl.get("DeliverLogsStatus") != "FAILED"]
    if not good:
        seen = ", ".join("%s (%s, %s, delivery %s)" % (fl.get("FlowLogId"), fl.get("FlowLogStatus"),
                                                       fl.get("TrafficType"), fl.get("DeliverLogsStatus"))
                         for fl in logs) or "none"
        f.add("flow_logs_missing", vpc_id, "no ACTIVE flow log of ALL traffic covers the VPC (found: %s)" % seen)


def evaluate(boundary, vpc_id: str, snapshot: dict, require_flow_logs: bool = True) -> dict:
    """Judge a :func:`read_vpc` snapshot against ``boundary``.

    Returns ``{"isolated", "findings", "checked", "vpc_cidrs"}``; ``isolated`` is
    true only when there is no finding at all.
    """
    f = _Findings()
    checked = {}
    vpcs = snapshot.get("vpcs")
    if isinstance(vpcs, Unreadable) and vpcs.error_code.startswith(("InvalidVpcID.NotFound", "InvalidVpcID.Malformed")):
        vpcs = []
    if isinstance(vpcs, list) and not any(v.get("VpcId") == vpc_id for v in vpcs):
        f.add("vpc_not_found", vpc_id, "no VPC %s exists in this account and region" % vpc_id)
        return {"isolated": False, "findings": f.items, "checked": {"vpcs": 0}, "vpc_cidrs": []}

    vpc_cidrs = []
    vpcs = _readable(snapshot, "vpcs", f, vpc_id)
    if vpcs is not None:
        checked["vpcs"] = 1
        vpc_cidrs = _check_vpc(boundary, next(v for v in vpcs if v.get("VpcId") == vpc_id), vpc_id, f)

    prefix_lists = _readable(snapshot, "prefix_lists", f, vpc_id)
    s3_pl = next((p for p in prefix_lists or [] if S3_SERVICE_RE.match(p.get("PrefixListName", ""))), None)

    endpoints = _readable(snapshot, "vpc_endpoints", f, vpc_id)
    s3_gateways = set()
    if endpoints is not None:
        checked["vpc_endpoints"] = len(endpoints)
        s3_gateways = _check_endpoints(boundary, endpoints, f)

    tables = _readable(snapshot, "route_tables", f, vpc_id)
    if tables is not None:
        pl_entries = (_readable(snapshot, "route_prefix_lists", f, vpc_id) or [{}])[0]
        checked["route_tables"] = len(tables)
        checked["routes"] = _check_routes(boundary, tables, (s3_gateways, s3_pl.get("PrefixListId") if s3_pl else None),
                                          pl_entries, f)

    _check_gateways(boundary, vpc_id, snapshot, f, checked)

    subnets = _readable(snapshot, "subnets", f, vpc_id)
    if subnets is not None:
        checked["subnets"] = len(subnets)
        _check_subnets(subnets, f)

    groups = _readable(snapshot, "security_groups", f, vpc_id)
    if groups is not None:
        checked["security_groups"] = len(groups)
        vpc = next((v for v in vpcs or [] if v.get("VpcId") == vpc_id), None)
        tiers = _tier_groups(boundary, vpc, groups)
        checked["security_group_rules"] = _check_security_groups(
            boundary, groups, vpc_cidrs, s3_pl.get("PrefixListId") if s3_pl else None, f, tiers=tiers)
        if tiers is not None:
            checked["tier_rules"] = _check_tier_rules(boundary, vpc_id, tiers, f)
        elif workload_tiers(boundary):
            # Fail closed: declared tiers whose groups cannot be told apart are tiers nobody checked.
            for tier in workload_tiers(boundary):
                f.add("tier_group_missing", vpc_id, "tier %s: no security group of the VPC can be told to be its "
                      "(the VPC carries no valid drguard:drill-id tag and no single drill's tier groups "
                      "drguard-<drill id>-<tier> are there); its tier rules cannot be checked" % tier)
        _check_fallback_groups(boundary, groups, f)

    nacls = _readable(snapshot, "network_acls", f, vpc_id)
    if nacls is not None:
        checked["network_acls"] = len(nacls)
        allowed = {"vpc": vpc_cidrs, "s3": (s3_pl or {}).get("Cidrs") or []}
        checked["network_acl_entries"] = _check_nacls(boundary, nacls, subnets, allowed, f)
        _check_fallback_nacls(boundary, nacls, f)

    if "dhcp_options" in snapshot:  # absent only when the VPC itself was not read (already a finding)
        dopts = _readable(snapshot, "dhcp_options", f, vpc_id)
        if dopts is not None:
            checked["dhcp_options"] = len(dopts)
            _check_dhcp_options(dopts, f)
    _check_outside_reach(vpc_id, snapshot, f, checked)
    _check_name_resolution(vpc_id, snapshot, f, checked)

    if require_flow_logs:
        logs = _readable(snapshot, "flow_logs", f, vpc_id)
        if logs is not None:
            checked["flow_logs"] = len(logs)
            _check_flow_logs(logs, vpc_id, f)

    findings = sorted(f.items, key=lambda x: (x["code"], x["resource"], x["detail"]))
    return {"isolated": not findings, "findings": findings, "checked": checked, "vpc_cidrs": vpc_cidrs}
