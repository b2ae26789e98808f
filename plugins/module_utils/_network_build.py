# Copyright: drguard maintainers
# Apache License 2.0
"""Builder behind ``drguard.sandbox.sandbox_network``: one boundary -> one isolated VPC.

Two halves, kept apart on purpose:

* translations (pure functions): the :class:`~boundary.Boundary` becomes the desired
  security-group rules, network ACL entries and S3 endpoint policy;
* :class:`NetworkBuilder`: finds what already exists for the drill (by tags and names),
  creates what is missing and converges what differs, recording each change. In check
  mode it records the same changes and performs none.

Every resource is tagged in the call that creates it (``TagSpecifications``), so a
failure half-way leaves nothing that teardown (``drguard.sandbox.sweep``) cannot find.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

try:
    from botocore.exceptions import ClientError
except ImportError:  # handled by AnsibleAWSModule
    ClientError = Exception

from ansible_collections.amazon.aws.plugins.module_utils.policy import compare_policies
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import pick_sandbox_cidr
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import SSM_ENDPOINT_SERVICES
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import ssm_endpoints_declared
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import ec2_tag_specs
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils import _quotas
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import get_or_none
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate as _paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while

PROTO_NUMBERS = {"tcp": "6", "udp": "17", "-1": "-1"}
EPHEMERAL = (1024, 65535)
DENY_FIRST_RULE = 1          # production denies take rule numbers 1..N in each direction
ALLOW_FIRST_RULE = 100       # narrow allows start here, so every deny comes first (N <= 40, the quota's maximum)
LOG_RETENTION_DAYS = 7
WORKERS = 8

S3_READ_OBJECT_ACTIONS = [
    "s3:GetObject", "s3:GetObjectVersion", "s3:GetObjectTagging", "s3:GetObjectVersionTagging",
    "s3:GetObjectAttributes", "s3:GetObjectVersionAttributes", "s3:GetObjectRetention",
    "s3:GetObjectLegalHold",
]
S3_LIST_ACTIONS = ["s3:ListBucket", "s3:ListBucketVersions"]
S3_BUCKET_READ_ACTIONS = ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:GetBucketObjectLockConfiguration"]
S3_WRITE_OBJECT_ACTIONS = ["s3:PutObject"]
FLOW_LOGS_ACTIONS = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]

# Characters AWS accepts in security group rule descriptions.
_DESC_BAD = re.compile(r"[^a-zA-Z0-9. _\-:/()#,@\[\]+=&;{}!$*]")


class BuildError(Exception):
    """The live state contradicts the boundary in a way the builder must not paper over."""


# --------------------------------------------------------------------------- names


def names(drill_id: str) -> dict:
    """Every name the builder gives a resource of drill ``drill_id``."""
    base = "drguard-%s" % drill_id
    return {
        "vpc": base + "-vpc",
        "subnets": [base + "-private-a", base + "-private-b"],
        "route_table": base + "-private",
        "nacl": base + "-nacl",
        "endpoint": base + "-s3",
        "default_sg": base + "-default",
        "flow_log": base + "-flow-logs",
        "log_group": "/drguard/%s/flow-logs" % drill_id,
        "role": base + "-flowlogs",
        "ssm_sg": base + "-ssm-endpoints",
        "ssm_endpoints": {s: "%s-%s" % (base, s) for s in SSM_ENDPOINT_SERVICES},
    }


VALIDATION_TIER = "validation"


def workload_tiers(boundary) -> list:
    """The tiers that get a security group: the declared ones, plus ``validation`` when the ec2 runtime's SSM
    endpoints are declared (its validation instance needs a group of its own, like the netns runtime's tier)."""
    tiers = list(boundary.tiers)
    if ssm_endpoints_declared(boundary) and VALIDATION_TIER not in tiers:
        tiers.append(VALIDATION_TIER)
    return tiers


def sg_name(drill_id: str, tier: str) -> str:
    return "drguard-%s-%s" % (drill_id, tier)


def split_cidr(cidr) -> list:
    """The two private subnets' CIDRs: the halves of the VPC CIDR."""
    net = ipaddress.ip_network(str(cidr))
    return [str(n) for n in net.subnets(prefixlen_diff=1)]


def _description(text: str, fallback: str) -> str:
    cleaned = _DESC_BAD.sub("", text or "").strip()[:255]
    return cleaned or fallback


# --------------------------------------------------------------------------- translations

# A security group rule: (direction, protocol, from_port, to_port, kind, target)
#   direction: "ingress" | "egress"; protocol: "tcp" | "udp" | "-1";
#   kind: "cidr" | "sg" | "pl"; target: CIDR, group id or prefix list id.


def desired_sg_rules(boundary, tier: str, group_ids: dict, s3_prefix_list: str | None,
                     ssm_group: str | None = None) -> dict:
    """``{rule tuple: description}`` for the security group of ``tier``.

    ``group_ids`` maps tier -> security group id (None while planned in check mode;
    such rules are keyed with the tier's name instead). ``ssm_group``: the SSM endpoints' group
    (declared endpoints only), which every workload group reaches on tcp 443.
    """
    rules = {}
    if ssm_endpoints_declared(boundary):
        rules[("egress", "tcp", 443, 443, "sg", ssm_group or "planned:ssm-endpoints")] = \
            "drguard SSM interface endpoints"
    # A fallback path (a DR site) goes out exactly like a declared egress destination.
    for direction, source in (("ingress", boundary.ingress), ("egress", boundary.egress),
                              ("egress", boundary.fallback)):
        for rule in source:
            label = "fallback" if rule.kind == "fallback" else direction
            for port in rule.ports:
                key = (direction, rule.protocol, port.start, port.end, "cidr", str(rule.cidr))
                rules.setdefault(key, _description(rule.description, "drguard %s %s" % (label, rule.cidr)))
    if s3_prefix_list and (boundary.s3_read or boundary.s3_write):
        rules[("egress", "tcp", 443, 443, "pl", s3_prefix_list)] = "drguard S3 via the gateway endpoint"
    for tr in boundary.tier_rules:
        for port in tr.ports:
            if tr.dest == tier:
                peer = group_ids.get(tr.source) or "planned:" + tr.source
                rules.setdefault(("ingress", tr.protocol, port.start, port.end, "sg", peer),
                                 _description(tr.description, "drguard tier %s to %s" % (tr.source, tr.dest)))
            if tr.source == tier:
                peer = group_ids.get(tr.dest) or "planned:" + tr.dest
                rules.setdefault(("egress", tr.protocol, port.start, port.end, "sg", peer),
                                 _description(tr.description, "drguard tier %s to %s" % (tr.source, tr.dest)))
    return _fit_sg_rules(rules)


def merge_port_ranges(ranges) -> list:
    """Port ranges ``[(start, end)]`` with overlapping and adjacent ones merged, sorted."""
    out = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _fit_sg_rules(rules: dict) -> dict:
    """The same traffic in fewer rules (AWS counts each one against its quota).

    Ports of one peer (direction, protocol, CIDR/group/prefix list) merge into ranges, and
    a CIDR rule inside another CIDR rule's network on covered ports goes. Nothing is widened:
    the rules allow exactly the union they allowed before.
    """
    ports = {}
    for (direction, proto, start, end, kind, target), desc in rules.items():
        ports.setdefault((direction, proto, kind, target), []).append(((start, end), desc))
    merged = {}
    for (direction, proto, kind, target), items in ports.items():
        if proto == "-1":
            for (start, end), desc in items:
                merged.setdefault((direction, proto, start, end, kind, target), desc)
            continue
        first = {}
        for rng, desc in items:
            first.setdefault(rng, desc)
        for start, end in merge_port_ranges(first):
            desc = next(d for (s, e), d in sorted(first.items()) if start <= s and e <= end)
            merged[(direction, proto, start, end, kind, target)] = desc

    def covered(rule):
        direction, proto, start, end, kind, target = rule
        if kind != "cidr":
            return False
        net = ipaddress.ip_network(target)
        for other in merged:
            o_dir, o_proto, o_start, o_end, o_kind, o_target = other
            if other == rule or o_kind != "cidr" or o_dir != direction or o_proto != proto:
                continue
            o_net = ipaddress.ip_network(o_target)
            if net.subnet_of(o_net) and net != o_net and (proto == "-1" or (o_start <= start and end <= o_end)):
                return True
        return False

    return {rule: desc for rule, desc in merged.items() if not covered(rule)}


def live_sg_rules(group: dict) -> set:
    """The rule tuples of a described security group (one tuple per range/peer)."""
    out = set()
    for direction, field in (("ingress", "IpPermissions"), ("egress", "IpPermissionsEgress")):
        for perm in group.get(field) or []:
            proto = str(perm.get("IpProtocol"))
            proto = {"6": "tcp", "17": "udp"}.get(proto, proto)
            start, end = perm.get("FromPort"), perm.get("ToPort")
            if proto == "-1":
                start = end = None
            for rng in perm.get("IpRanges") or []:
                out.add((direction, proto, start, end, "cidr", rng["CidrIp"]))
            for rng in perm.get("Ipv6Ranges") or []:
                out.add((direction, proto, start, end, "cidr6", rng["CidrIpv6"]))
            for pair in perm.get("UserIdGroupPairs") or []:
                out.add((direction, proto, start, end, "sg", pair["GroupId"]))
            for pl in perm.get("PrefixListIds") or []:
                out.add((direction, proto, start, end, "pl", pl["PrefixListId"]))
    return out


def _rule_descriptions(group: dict) -> dict:
    """``{rule tuple: description}`` of the group's security-group-reference rules that carry one."""
    out = {}
    for direction, field in (("ingress", "IpPermissions"), ("egress", "IpPermissionsEgress")):
        for perm in group.get(field) or []:
            proto = str(perm.get("IpProtocol"))
            proto = {"6": "tcp", "17": "udp"}.get(proto, proto)
            start, end = (None, None) if proto == "-1" else (perm.get("FromPort"), perm.get("ToPort"))
            for pair in perm.get("UserIdGroupPairs") or []:
                if pair.get("Description"):
                    out[(direction, proto, start, end, "sg", pair["GroupId"])] = pair["Description"]
    return out


def ip_permission(rule: tuple, description: str | None = None) -> dict:
    """The EC2 ``IpPermissions`` entry for one rule tuple."""
    _direction, proto, start, end, kind, target = rule
    perm = {"IpProtocol": proto}
    if proto != "-1":
        perm["FromPort"], perm["ToPort"] = start, end
    desc = {"Description": description} if description else {}
    if kind == "cidr":
        perm["IpRanges"] = [dict({"CidrIp": target}, **desc)]
    elif kind == "cidr6":
        perm["Ipv6Ranges"] = [dict({"CidrIpv6": target}, **desc)]
    elif kind == "sg":
        perm["UserIdGroupPairs"] = [dict({"GroupId": target}, **desc)]
    else:
        perm["PrefixListIds"] = [dict({"PrefixListId": target}, **desc)]
    return perm


def _ports_text(proto: str, start, end) -> str:
    if proto == "-1":
        return "all traffic"
    return "%s %s" % (proto, start if start == end else "%s-%s" % (start, end))


def sg_rules_view(rules) -> dict:
    """Rule tuples as the diff shows them: ``{"ingress": [...], "egress": [...]}``, one sorted line each."""
    view = {"ingress": [], "egress": []}
    for direction, proto, start, end, _kind, target in rules:
        view[direction].append("%s %s %s" % (_ports_text(proto, start, end),
                                             "from" if direction == "ingress" else "to", target))
    return {k: sorted(v) for k, v in view.items()}


# A network ACL entry: (egress, rule_number, protocol number, action, cidr, from_port, to_port)


def desired_nacl_entries(boundary, sandbox_cidr, s3_cidrs=()) -> set:
    """The network ACL entries for the sandbox subnets.

    Production CIDRs are denied (all protocols, both directions) with the lowest rule
    numbers; then narrow allows: the sandbox itself, ingress sources on their ports,
    egress destinations and fallback paths on their ports, S3 (when granted) on 443, and
    the ephemeral return ports in the opposite directions. Everything else meets the
    implicit deny. No route is added for a fallback path.

    AWS allows 20 entries per direction by default (docs/boundary-policy.md, "Limits"), so
    the entries are fitted first: ports of one peer merge into ranges, an allow inside another
    allow goes, and when the entries would still be over the quota the production CIDRs collapse
    into the fewest networks that cover exactly them. :func:`check_network_quotas` says when
    that is still too many.
    """
    allows = {False: [], True: []}

    def allow(egress, proto, cidr, start, end):
        item = (PROTO_NUMBERS[proto], str(cidr), start, end)
        if item not in allows[egress]:
            allows[egress].append(item)

    allow(False, "-1", sandbox_cidr, None, None)
    allow(True, "-1", sandbox_cidr, None, None)
    for rule in boundary.ingress:
        for port in rule.ports:
            allow(False, rule.protocol, rule.cidr, port.start, port.end)
        allow(True, rule.protocol, rule.cidr, *EPHEMERAL)
    for rule in boundary.egress + boundary.fallback:
        for port in rule.ports:
            allow(True, rule.protocol, rule.cidr, port.start, port.end)
        allow(False, rule.protocol, rule.cidr, *EPHEMERAL)
    if boundary.s3_read or boundary.s3_write:
        for cidr in s3_cidrs:
            allow(True, "tcp", cidr, 443, 443)
            allow(False, "tcp", cidr, *EPHEMERAL)
    fitted = {egress: _fit_nacl_allows(items) for egress, items in allows.items()}
    # One deny per declared production CIDR while that fits the quota (the layout reads like the
    # boundary); otherwise the fewest networks covering exactly the production CIDRs.
    denies = list(dict.fromkeys(boundary.production_cidrs))
    room = _quotas.allowed(_quotas.NACL_RULES, _quotas.parse_quotas((boundary.raw or {}).get("quotas")))
    if len(denies) + max(len(items) for items in fitted.values()) > room:
        denies = list(ipaddress.collapse_addresses(denies))
    entries = set()
    for egress, items in fitted.items():
        for i, prod in enumerate(denies):
            entries.add((egress, DENY_FIRST_RULE + i, "-1", "deny", str(prod), None, None))
        for n, (proto, cidr, start, end) in enumerate(items):
            entries.add((egress, ALLOW_FIRST_RULE + n, proto, "allow", cidr, start, end))
    return entries


def _fit_nacl_allows(items: list) -> list:
    """``[(proto, cidr, start, end)]`` allowing the same traffic in fewer entries, first-seen order kept."""
    order, ports = [], {}
    for proto, cidr, start, end in items:
        key = (proto, cidr)
        if key not in ports:
            order.append(key)
            ports[key] = []
        ports[key].append((start, end))
    merged = []
    for proto, cidr in order:
        if proto == "-1":
            merged.append((proto, cidr, None, None))
        else:
            merged += [(proto, cidr, start, end) for start, end in merge_port_ranges(ports[(proto, cidr)])]

    def covered(item):
        proto, cidr, start, end = item
        net = ipaddress.ip_network(cidr)
        for other in merged:
            o_proto, o_cidr, o_start, o_end = other
            if other == item:
                continue
            o_net = ipaddress.ip_network(o_cidr)
            if not net.subnet_of(o_net):
                continue
            if o_proto == "-1" and (net != o_net or proto != "-1"):
                return True
            if o_proto == proto != "-1" and net != o_net and o_start <= start and end <= o_end:
                return True
        return False

    return [item for item in merged if not covered(item)]


def nacl_entries_per_direction(entries) -> int:
    """The larger of the ingress and egress entry counts (each direction has its own quota)."""
    return max(sum(1 for e in entries if e[0] == egress) for egress in (False, True))


def check_network_quotas(boundary, s3_cidrs=(), drill_id: str | None = None, tags: dict | None = None) -> None:
    """Raise :class:`_quotas.QuotaError` when the fitted network is still over an AWS quota.

    Runs before anything is created (the module's validation, then again once the S3 prefix
    list's CIDRs are known). ``boundary.raw["quotas"]`` carries the account's raised quotas.
    """
    quotas = _quotas.parse_quotas(boundary.raw.get("quotas"))
    sandbox = boundary.sandbox_cidr or "10.255.0.0/16"
    entries = desired_nacl_entries(boundary, sandbox, s3_cidrs)
    _quotas.check(_quotas.NACL_RULES, nacl_entries_per_direction(entries), quotas, context="the boundary",
                  fix="declare fewer or wider production CIDRs, ingress and egress rules")
    s3_pl = "pl-s3" if (boundary.s3_read or boundary.s3_write) else None
    ids = {tier: "planned:" + tier for tier in boundary.tiers}
    for tier in boundary.tiers:
        rules = desired_sg_rules(boundary, tier, ids, s3_pl)
        for direction in ("ingress", "egress"):
            _quotas.check(_quotas.SG_RULES, sum(1 for r in rules if r[0] == direction), quotas,
                          context="security group tier %s (%s)" % (tier, direction),
                          fix="declare fewer peers or port ranges")
    if boundary.s3_read or boundary.s3_write:
        _quotas.check(_quotas.ENDPOINT_POLICY, len(json.dumps(endpoint_policy(boundary))), quotas,
                      context="the S3 endpoint policy", fix="grant fewer buckets or prefixes (a shorter common prefix)")
    if drill_id is not None:
        n = names(drill_id)
        _quotas.check_name(_quotas.ROLE_NAME, n["role"], "the flow-log role name")
        _quotas.check_name(_quotas.LOG_GROUP_NAME, n["log_group"], "the flow-log log group name")
        for tier in boundary.tiers:
            _quotas.check_name(_quotas.SG_NAME, sg_name(drill_id, tier), "the security group name")
    if tags is not None:
        _quotas.check_tags(dict(tags, Name="x"), "every drill resource")


def live_nacl_entries(acl: dict) -> set:
    out = set()
    for e in acl.get("Entries") or []:
        if e.get("RuleNumber") == 32767:
            continue  # the implicit deny-all, not ours to manage
        rng = e.get("PortRange") or {}
        proto = str(e.get("Protocol"))
        start, end = (rng.get("From"), rng.get("To")) if proto != "-1" else (None, None)
        cidr = e.get("CidrBlock") or e.get("Ipv6CidrBlock")
        out.add((bool(e.get("Egress")), int(e["RuleNumber"]), proto, e.get("RuleAction"), cidr, start, end))
    return out


def nacl_entries_view(entries) -> list:
    """Network ACL entries as the diff shows them, in rule order: ``"egress #1 deny all traffic 10.0.0.0/16"``."""
    names_ = {v: k for k, v in PROTO_NUMBERS.items()}
    return ["%s #%d %s %s %s" % ("egress" if egress else "ingress", number, action,
                                 _ports_text(names_.get(proto, proto), start, end), cidr)
            for egress, number, proto, action, cidr, start, end in sorted(entries, key=lambda e: (e[0], e[1]))]


def nacl_entry_args(acl_id: str, entry: tuple) -> dict:
    egress, number, proto, action, cidr, start, end = entry
    args = {"NetworkAclId": acl_id, "Egress": egress, "RuleNumber": number, "Protocol": proto,
            "RuleAction": action, "CidrBlock": cidr}
    if proto != "-1":
        args["PortRange"] = {"From": start, "To": end}
    return args


def secrets_endpoint_policy(drill_id: str, region: str) -> dict:
    """The secretsmanager interface endpoint's policy: reading the drill's runtime secrets (each tier's
    certificates, docs/mtls.md "On AWS") and nothing else, whoever asks."""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "DrillRuntimeSecretsOnly", "Effect": "Allow", "Principal": "*",
        "Action": ["secretsmanager:GetSecretValue"],
        "Resource": ["arn:*:secretsmanager:%s:*:secret:drguard/%s/runtime/*" % (region, drill_id)]}]}


def endpoint_policy(boundary) -> dict:
    """The S3 gateway endpoint policy: read only ``s3_read``, write only ``s3_write``.

    Never ``Action: *``, ``s3:*`` or ``Resource: *``.
    """
    statements = []
    if boundary.s3_read:
        statements.append({
            "Sid": "ReadDeclaredObjects", "Effect": "Allow", "Principal": "*",
            "Action": list(S3_READ_OBJECT_ACTIONS),
            "Resource": sorted({g.object_arn for g in boundary.s3_read}),
        })
        by_bucket = {}
        for grant in boundary.s3_read:
            by_bucket.setdefault(grant.bucket, set()).add(grant.prefix)
        for i, (bucket, prefixes) in enumerate(sorted(by_bucket.items())):
            stmt = {"Sid": "ListDeclaredPrefixes%d" % i, "Effect": "Allow", "Principal": "*",
                    "Action": list(S3_LIST_ACTIONS), "Resource": "arn:aws:s3:::%s" % bucket}
            if "" not in prefixes:
                stmt["Condition"] = {"StringLike": {"s3:prefix": sorted(p + "*" for p in prefixes)}}
            statements.append(stmt)
    if boundary.s3_write:
        statements.append({
            "Sid": "WriteDeclaredObjects", "Effect": "Allow", "Principal": "*",
            "Action": list(S3_WRITE_OBJECT_ACTIONS),
            "Resource": sorted({g.object_arn for g in boundary.s3_write}),
        })
    read_buckets = sorted({g.bucket_arn for g in boundary.s3_read})
    if read_buckets:
        statements.append({"Sid": "DeclaredBucketMetadata", "Effect": "Allow", "Principal": "*",
                           "Action": list(S3_BUCKET_READ_ACTIONS), "Resource": read_buckets})
    write_buckets = sorted({g.bucket_arn for g in boundary.s3_write} - set(read_buckets))
    if write_buckets:
        # Writers only need to locate their bucket, not read its configuration.
        statements.append({"Sid": "DeclaredWriteBucketLocation", "Effect": "Allow", "Principal": "*",
                           "Action": ["s3:GetBucketLocation"], "Resource": write_buckets})
    return {"Version": "2012-10-17", "Statement": statements}


def flow_logs_trust_policy() -> dict:
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "vpc-flow-logs.amazonaws.com"},
        "Action": "sts:AssumeRole"}]}


def flow_logs_role_policy(log_group_arn: str) -> dict:
    """Inline policy of the delivery role: write to the drill's own log group only."""
    base = log_group_arn[:-2] if log_group_arn.endswith(":*") else log_group_arn
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "DeliverToDrillLogGroup", "Effect": "Allow", "Action": list(FLOW_LOGS_ACTIONS),
        "Resource": [base, base + ":*"]}]}


def _policy(doc) -> dict:
    if isinstance(doc, str):
        text = doc if doc.lstrip().startswith("{") else unquote(doc)
        return json.loads(text)
    return doc or {}


def _policy_differs(current, wanted) -> bool:
    """Whether two policies (documents or JSON, IAM's URL-encoded too) mean different things."""
    return compare_policies(_policy(current), _policy(wanted))


# --------------------------------------------------------------------------- AWS


# How long a just-created IAM role may stay unassumable by a service (eventual consistency).
ROLE_PROPAGATION_WAIT = 60


def _role_not_assumable(exc: BaseException) -> bool:
    """The error AWS returns while a new role has not reached the service yet."""
    return error_code(exc) in ("InvalidParameter", "InvalidParameterValue", "AccessDenied") \
        and "assume" in describe_error(exc).lower()


class NetworkBuilder:
    """Finds, creates and converges one drill's sandbox network.

    ``clients`` maps service -> client from ``_aws.aws_client`` (endpoint, region, and every
    call retried on transient errors). With ``diff``, :attr:`diff` holds what the run changes
    (security-group rules per group, network ACL entries, the S3 endpoint policy) before and after.
    """

    def __init__(self, clients: dict, region: str, drill_id: str, boundary, tags: dict, *,
                 flow_logs: bool, check_mode: bool, diff: bool = False):
        self.ec2 = clients["ec2"]
        self.logs = clients["logs"]
        self.iam = clients["iam"]
        self.region = region
        self.drill_id = drill_id
        self.boundary = boundary
        self.tags = dict(tags)
        self.flow_logs = flow_logs
        self.check = check_mode
        self.names = names(drill_id)
        self.actions: list = []
        self.created: list = []
        self.step = "start"
        self._lock = threading.Lock()
        self.result: dict = {}
        self.want_diff = diff
        self.diff: dict = {"before": {}, "after": {}}

    # ---------------------------------------------------------------- bookkeeping

    def _record(self, text: str, created: tuple | None = None) -> None:
        with self._lock:
            self.actions.append(text)
            if created and created[1]:
                self.created.append({"type": created[0], "id": created[1]})

    def _record_diff(self, section: str, key: str | None, before, after) -> None:
        """Note what a change replaces (``before``) and with what (``after``), when diff is asked for."""
        if not self.want_diff:
            return
        with self._lock:
            for side, value in (("before", before), ("after", after)):
                if key is None:
                    self.diff[side][section] = value
                else:
                    self.diff[side].setdefault(section, {})[key] = value

    def _drill_filter(self, name: str | None = None, vpc_id: str | None = None) -> list:
        filters = [{"Name": "tag:%s" % TAG_DRILL_ID, "Values": [self.drill_id]}]
        if name:
            filters.append({"Name": "tag:Name", "Values": [name]})
        if vpc_id:
            filters.append({"Name": "vpc-id", "Values": [vpc_id]})
        return filters

    def _one(self, items: list, what: str, id_field: str):
        if len(items) > 1:
            raise BuildError("found %d %s for drill %s (%s) where there must be one; tear the drill down "
                             "(sweep by drill_id) and build it again"
                             % (len(items), what, self.drill_id, ", ".join(i[id_field] for i in items)))
        return items[0] if items else None

    def _ensure_ec2_tags(self, resource_id: str, current: list | None, kind: str, name: str | None) -> None:
        desired = dict(self.tags)
        if name:
            desired["Name"] = name
        have = boto3_tag_list_to_ansible_dict(current)
        missing = {k: v for k, v in desired.items() if have.get(k) != v}
        if missing:
            self._record("tag %s %s (%s)" % (kind, resource_id, ", ".join(sorted(missing))))
            if not self.check:
                self.ec2.create_tags(Resources=[resource_id], Tags=ansible_dict_to_boto3_tag_list(missing))

    # ---------------------------------------------------------------- the build

    def build(self) -> dict:
        """Build or converge everything; returns the module's result fields."""
        prereq = {}
        # The S3 prefix list is read first: its CIDRs count against the network ACL quota,
        # checked before anything (the flow-log branch included) is created.
        s3 = self._s3_prefix_list()
        self.step = "quota check"
        try:
            check_network_quotas(self.boundary, s3["cidrs"], self.drill_id, self.tags)
        except _quotas.QuotaError as exc:
            raise BuildError(str(exc)) from None
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            # The log group and the IAM role do not depend on the VPC: build them meanwhile.
            logs_future = pool.submit(self._flow_log_prereqs) if self.flow_logs else None

            def then(step, *args):
                # Stop early when the flow-log branch has already failed: no point building on.
                if logs_future is not None and logs_future.done() and logs_future.exception() is not None:
                    self.step = "flow log prerequisites (log group, IAM role)"
                    raise logs_future.exception()
                return step(*args)

            then(self._vpc)
            then(self._subnets)
            then(self._route_table)
            then(self._ssm_endpoint_group)
            then(self._security_groups, s3["id"])
            then(self._default_security_group)
            then(self._network_acl, s3["cidrs"])
            then(self._endpoint)
            then(self._interface_endpoints)
            then(self._routes)
            if logs_future is not None:
                self.step = "flow log prerequisites (log group, IAM role)"
                prereq = logs_future.result()
                self._flow_log(prereq)
        finally:
            pool.shutdown(wait=True)
        return self._result(prereq)

    def _result(self, prereq: dict) -> dict:
        r = self.result
        resources = [{"type": "vpc", "id": r.get("vpc_id")}]
        resources += [{"type": "subnet", "id": s} for s in r.get("subnet_ids", [])]
        resources.append({"type": "route_table", "id": r.get("route_table_id")})
        resources += [{"type": "security_group", "id": g} for g in r.get("security_groups", {}).values()]
        resources.append({"type": "security_group", "id": r.get("default_security_group_id")})
        resources.append({"type": "network_acl", "id": r.get("network_acl_id")})
        if r.get("s3_endpoint_id"):
            resources.append({"type": "vpc_endpoint", "id": r["s3_endpoint_id"]})
        resources += [{"type": "vpc_endpoint", "id": e} for e in (r.get("ssm_endpoint_ids") or {}).values()]
        if r.get("ssm_endpoint_security_group_id"):
            resources.append({"type": "security_group", "id": r["ssm_endpoint_security_group_id"]})
        if self.flow_logs:
            resources.append({"type": "flow_log", "id": r.get("flow_log_id")})
            if prereq.get("log_group_arn"):
                resources.append({"type": "log_group", "id": self.names["log_group"]})
            if prereq.get("role_arn"):
                resources.append({"type": "iam_role", "id": self.names["role"]})
        out = dict(
            vpc_id=r.get("vpc_id"),
            sandbox_cidr=r.get("sandbox_cidr"),
            subnet_ids=[s for s in r.get("subnet_ids", []) if s],
            route_table_id=r.get("route_table_id"),
            security_groups=r.get("security_groups", {}),
            default_security_group_id=r.get("default_security_group_id"),
            network_acl_id=r.get("network_acl_id"),
            s3_endpoint_id=r.get("s3_endpoint_id"),
            ssm_endpoint_ids=dict(r.get("ssm_endpoint_ids") or {}),
            ssm_endpoint_security_group_id=r.get("ssm_endpoint_security_group_id"),
            flow_log_id=r.get("flow_log_id"),
            log_group_name=self.names["log_group"] if self.flow_logs else None,
            flow_logs_role_name=self.names["role"] if self.flow_logs else None,
            resources=[x for x in resources if x["id"]],
            actions=list(self.actions),
        )
        if self.want_diff:
            out["diff"] = {"before": dict(self.diff["before"]), "after": dict(self.diff["after"])}
        return out

    # ---------------------------------------------------------------- VPC

    def _vpc(self) -> None:
        self.step = "VPC"
        name = self.names["vpc"]
        vpc = self._one(_paginate(self.ec2, "describe_vpcs", "Vpcs", Filters=self._drill_filter(name)),
                        "VPCs named %s" % name, "VpcId")
        if vpc is not None:
            cidr = ipaddress.ip_network(vpc["CidrBlock"])
            if self.boundary.sandbox_cidr is not None and cidr != self.boundary.sandbox_cidr:
                raise BuildError("the drill's VPC %s already exists with CIDR %s but the boundary declares "
                                 "sandbox_cidr %s; tear the drill down first or declare %s"
                                 % (vpc["VpcId"], cidr, self.boundary.sandbox_cidr, cidr))
            try:
                self.boundary = self.boundary.with_sandbox_cidr(str(cidr))
            except BoundaryError as exc:
                raise BuildError("the drill's existing VPC %s does not fit the boundary: %s; tear the drill down"
                                 % (vpc["VpcId"], str(exc).rstrip("."))) from None
            self._ensure_ec2_tags(vpc["VpcId"], vpc.get("Tags"), "vpc", name)
            dns = self.ec2.describe_vpc_attribute(VpcId=vpc["VpcId"], Attribute="enableDnsSupport")
            if not (dns.get("EnableDnsSupport") or {}).get("Value"):
                self._record("enable DNS support on vpc %s" % vpc["VpcId"])
                if not self.check:
                    self.ec2.modify_vpc_attribute(VpcId=vpc["VpcId"], EnableDnsSupport={"Value": True})
            self._dns_hostnames(vpc["VpcId"])
            self.result.update(vpc_id=vpc["VpcId"], sandbox_cidr=str(cidr))
            return
        if self.boundary.sandbox_cidr is not None:
            cidr = self.boundary.sandbox_cidr
        else:
            avoid = []
            for other in _paginate(self.ec2, "describe_vpcs", "Vpcs"):
                avoid.append(other["CidrBlock"])
                avoid += [a["CidrBlock"] for a in other.get("CidrBlockAssociationSet") or []
                          if (a.get("CidrBlockState") or {}).get("State") in ("associated", "associating")]
            cidr = pick_sandbox_cidr(self.boundary, self.drill_id, avoid=avoid)
        # parse_boundary / pick_sandbox_cidr already ensure this; check again (fail closed).
        self.boundary = self.boundary.with_sandbox_cidr(str(cidr))
        vpc_id = None
        self._record("create vpc %s (%s)" % (name, cidr))
        if not self.check:
            vpc_id = self.ec2.create_vpc(CidrBlock=str(cidr), TagSpecifications=ec2_tag_specs("vpc", self.tags, name),
                                         )["Vpc"]["VpcId"]
            self.created.append({"type": "vpc", "id": vpc_id})
            self.ec2.get_waiter("vpc_available").wait(VpcIds=[vpc_id])
            # DNS support is on for a new VPC; set it explicitly anyway (the boundary relies on it).
            self.ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsSupport={"Value": True})
            self._dns_hostnames(vpc_id)
        self.result.update(vpc_id=vpc_id, sandbox_cidr=str(cidr))

    def _dns_hostnames(self, vpc_id: str) -> None:
        """Private DNS of the SSM interface endpoints needs DNS hostnames on (declared endpoints only)."""
        if not ssm_endpoints_declared(self.boundary):
            return
        attr = self.ec2.describe_vpc_attribute(VpcId=vpc_id, Attribute="enableDnsHostnames")
        if not (attr.get("EnableDnsHostnames") or {}).get("Value"):
            self._record("enable DNS hostnames on vpc %s (private DNS of the SSM endpoints)" % vpc_id)
            if not self.check:
                self.ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})

    # ---------------------------------------------------------------- subnets

    def _zones(self) -> list:
        zones = self.ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}]
        ).get("AvailabilityZones") or []
        names_ = sorted(z["ZoneName"] for z in zones)
        if len(names_) < 2:
            raise BuildError("region %s has %d available availability zone(s); the sandbox needs two"
                             % (self.region, len(names_)))
        return names_[:2]

    def _subnets(self) -> None:
        self.step = "subnets"
        vpc_id = self.result["vpc_id"]
        existing = {}
        if vpc_id:
            for sub in _paginate(self.ec2, "describe_subnets", "Subnets", Filters=self._drill_filter(vpc_id=vpc_id)):
                existing.setdefault(boto3_tag_list_to_ansible_dict(sub.get("Tags")).get("Name"), []).append(sub)
        cidrs = split_cidr(self.result["sandbox_cidr"])
        zones = None
        ids = []
        for i, name in enumerate(self.names["subnets"]):
            sub = self._one(existing.get(name, []), "subnets named %s" % name, "SubnetId")
            if sub is None:
                zones = zones or self._zones()
                self._record("create subnet %s (%s in %s)" % (name, cidrs[i], zones[i]))
                sid = None
                if not self.check:
                    sid = self.ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidrs[i], AvailabilityZone=zones[i],
                                                 TagSpecifications=ec2_tag_specs("subnet", self.tags, name),
                                                 )["Subnet"]["SubnetId"]
                    self.created.append({"type": "subnet", "id": sid})
                    # Explicit, whatever the account's defaults: no public IPs, no IPv6.
                    self.ec2.modify_subnet_attribute(SubnetId=sid, MapPublicIpOnLaunch={"Value": False})
                ids.append(sid)
                continue
            self._ensure_ec2_tags(sub["SubnetId"], sub.get("Tags"), "subnet", name)
            if sub.get("MapPublicIpOnLaunch"):
                self._record("turn off MapPublicIpOnLaunch on subnet %s" % sub["SubnetId"])
                if not self.check:
                    self.ec2.modify_subnet_attribute(SubnetId=sub["SubnetId"], MapPublicIpOnLaunch={"Value": False})
            if sub.get("AssignIpv6AddressOnCreation"):
                self._record("turn off AssignIpv6AddressOnCreation on subnet %s" % sub["SubnetId"])
                if not self.check:
                    self.ec2.modify_subnet_attribute(SubnetId=sub["SubnetId"],
                                                     AssignIpv6AddressOnCreation={"Value": False})
            ids.append(sub["SubnetId"])
        self.result["subnet_ids"] = ids

    # ---------------------------------------------------------------- route table

    def _route_table(self) -> None:
        self.step = "route table"
        vpc_id, name = self.result["vpc_id"], self.names["route_table"]
        rt = None
        if vpc_id:
            rt = self._one(_paginate(self.ec2, "describe_route_tables", "RouteTables",
                                     Filters=self._drill_filter(name, vpc_id)), "route tables named %s" % name,
                           "RouteTableId")
        if rt is None:
            self._record("create route table %s" % name)
            rt_id = None
            if not self.check:
                rt_id = self.ec2.create_route_table(
                    VpcId=vpc_id, TagSpecifications=ec2_tag_specs("route-table", self.tags, name))["RouteTable"][
                    "RouteTableId"]
                self.created.append({"type": "route_table", "id": rt_id})
            rt = {"RouteTableId": rt_id, "Associations": [], "Routes": []}
        else:
            self._ensure_ec2_tags(rt["RouteTableId"], rt.get("Tags"), "route table", name)
        rt_id = rt["RouteTableId"]
        self.result["route_table_id"] = rt_id
        associated = {a.get("SubnetId") for a in rt.get("Associations") or []}
        for sid in self.result["subnet_ids"]:
            if sid is not None and sid in associated:
                continue
            self._record("associate route table %s with subnet %s" % (name, sid or "(planned)"))
            if self.check:
                continue
            current = _paginate(self.ec2, "describe_route_tables", "RouteTables",
                                Filters=[{"Name": "association.subnet-id", "Values": [sid]}])
            assoc = [a for t in current for a in t.get("Associations") or [] if a.get("SubnetId") == sid]
            if assoc:
                self.ec2.replace_route_table_association(AssociationId=assoc[0]["RouteTableAssociationId"],
                                                         RouteTableId=rt_id)
            else:
                self.ec2.associate_route_table(RouteTableId=rt_id, SubnetId=sid)

    def _routes(self) -> None:
        """Only local, the S3 endpoint route, and the declared control-plane route."""
        self.step = "routes"
        rt_id = self.result["route_table_id"]
        routes = []
        if rt_id:
            rts = _paginate(self.ec2, "describe_route_tables", "RouteTables", RouteTableIds=[rt_id])
            routes = rts[0].get("Routes") or [] if rts else []
        endpoint = self.result.get("s3_endpoint_id")
        want = self.boundary.control_plane_route
        target_field = None
        if want:
            target_field = {"tgw-": "TransitGatewayId", "pcx-": "VpcPeeringConnectionId",
                            "vgw-": "GatewayId"}[want["target"][:4]]
        have_control = False
        for route in routes:
            if route.get("GatewayId") == "local":
                continue
            dest = {k: route[k] for k in ("DestinationCidrBlock", "DestinationIpv6CidrBlock",
                                          "DestinationPrefixListId") if route.get(k)}
            gw = route.get("GatewayId") or ""
            if route.get("DestinationPrefixListId") and gw.startswith("vpce-"):
                if endpoint and gw == endpoint:
                    continue
                raise BuildError("route table %s routes %s through endpoint %s, which the boundary does not "
                                 "declare; remove that endpoint's association" % (rt_id, dest, gw))
            if want and route.get("DestinationCidrBlock") == want["cidr"]:
                if route.get(target_field) == want["target"]:
                    have_control = True
                    continue
                self._record("replace route %s -> %s in %s" % (want["cidr"], want["target"], rt_id))
                if not self.check:
                    self.ec2.replace_route(RouteTableId=rt_id, DestinationCidrBlock=want["cidr"],
                                           **{target_field: want["target"]})
                have_control = True
                continue
            self._record("delete undeclared route %s from %s" % (dest, rt_id))
            if not self.check:
                self.ec2.delete_route(RouteTableId=rt_id, **dest)
        if want and not have_control:
            self._record("create route %s -> %s" % (want["cidr"], want["target"]))
            if not self.check:
                self.ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock=want["cidr"],
                                      **{target_field: want["target"]})

    # ---------------------------------------------------------------- S3 prefix list

    def _s3_prefix_list(self) -> dict:
        """The region's S3 prefix list id and CIDRs (for the SG rule and the NACL)."""
        if not (self.boundary.s3_read or self.boundary.s3_write):
            return {"id": None, "cidrs": []}
        self.step = "S3 prefix list"
        service = "com.amazonaws.%s.s3" % self.region
        lists = _paginate(self.ec2, "describe_prefix_lists", "PrefixLists",
                          Filters=[{"Name": "prefix-list-name", "Values": [service]}])
        if not lists:
            raise BuildError("region %s has no prefix list %s; S3 grants need the S3 gateway endpoint"
                             % (self.region, service))
        cidrs = list(lists[0].get("Cidrs") or [])
        if not cidrs:
            # Some APIs leave the CIDRs out; the managed prefix list of the same name has them.
            managed = _paginate(self.ec2, "describe_managed_prefix_lists", "PrefixLists",
                                Filters=[{"Name": "prefix-list-name", "Values": [service]}])
            for pl in managed:
                cidrs += [e["Cidr"] for e in _paginate(self.ec2, "get_managed_prefix_list_entries", "Entries",
                                                       PrefixListId=pl["PrefixListId"])]
        if not cidrs:
            raise BuildError("could not read the CIDRs of prefix list %s, so the network ACL cannot allow S3; "
                             "check ec2:DescribePrefixLists permissions" % service)
        return {"id": lists[0]["PrefixListId"], "cidrs": sorted(set(cidrs))}

    # ---------------------------------------------------------------- security groups

    def _security_groups(self, s3_prefix_list: str | None) -> None:
        self.step = "security groups"
        vpc_id = self.result["vpc_id"]
        existing = {}
        if vpc_id:
            for g in _paginate(self.ec2, "describe_security_groups", "SecurityGroups",
                               Filters=self._drill_filter(vpc_id=vpc_id)):
                existing.setdefault(g["GroupName"], []).append(g)
        groups = {}

        def ensure(tier):
            gname = sg_name(self.drill_id, tier)
            group = self._one(existing.get(gname, []), "security groups named %s" % gname, "GroupId")
            if group is not None:
                self._ensure_ec2_tags(group["GroupId"], group.get("Tags"), "security group", gname)
                return group
            self._record("create security group %s" % gname)
            if self.check:
                return {"GroupId": None, "IpPermissions": [], "IpPermissionsEgress": [
                    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
            gid = self.ec2.create_security_group(
                VpcId=vpc_id, GroupName=gname,
                Description="drguard drill %s tier %s (default deny)" % (self.drill_id, tier),
                TagSpecifications=ec2_tag_specs("security-group", self.tags, gname))["GroupId"]
            with self._lock:
                self.created.append({"type": "security_group", "id": gid})
            # Read back: the new group carries AWS' default allow-all egress, which must go.
            return self.ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]

        tiers = workload_tiers(self.boundary)
        for tier, group in zip(tiers, _parallel(ensure, tiers), strict=True):
            groups[tier] = group
        ids = {tier: g["GroupId"] for tier, g in groups.items()}
        _parallel(lambda tier: self._sync_sg_rules(groups[tier], tier, ids, s3_prefix_list), tiers)
        self.result["security_groups"] = ids

    def _sync_sg_rules(self, group: dict, tier: str, ids: dict, s3_prefix_list: str | None) -> None:
        desired = desired_sg_rules(self.boundary, tier, ids, s3_prefix_list,
                                   self.result.get("ssm_endpoint_security_group_id"))
        self._sync_rules(group, sg_name(self.drill_id, tier), desired)

    def _sync_rules(self, group: dict, label: str, desired: dict) -> None:
        live = live_sg_rules(group)
        described = _rule_descriptions(group)
        gid = group["GroupId"]
        extra = sorted((r for r in live if r not in desired), key=repr)
        missing = sorted((r for r in desired if r not in live), key=repr)
        if extra or missing:
            self._record_diff("security_groups", label, sg_rules_view(live), sg_rules_view(desired))
        for direction in ("ingress", "egress"):
            # A rule is revoked as it stands, with its description (as amazon.aws' ec2_security_group does).
            revoke = [ip_permission(r, described.get(r)) for r in extra if r[0] == direction]
            add = [ip_permission(r, desired[r]) for r in missing if r[0] == direction]
            if revoke:
                self._record("revoke %d %s rule(s) from %s" % (len(revoke), direction, label))
                if not self.check:
                    fn = self.ec2.revoke_security_group_ingress if direction == "ingress" \
                        else self.ec2.revoke_security_group_egress
                    fn(GroupId=gid, IpPermissions=revoke)
            if add:
                self._record("authorize %d %s rule(s) on %s" % (len(add), direction, label))
                if not self.check:
                    fn = self.ec2.authorize_security_group_ingress if direction == "ingress" \
                        else self.ec2.authorize_security_group_egress
                    fn(GroupId=gid, IpPermissions=add)

    def _ssm_endpoint_group(self) -> None:
        """The SSM interface endpoints' group: tcp 443 in from the sandbox CIDR only, nothing out (declared only)."""
        self.step = "SSM endpoint security group"
        self.result["ssm_endpoint_security_group_id"] = None
        if not ssm_endpoints_declared(self.boundary):
            return
        vpc_id, gname = self.result["vpc_id"], self.names["ssm_sg"]
        found = []
        if vpc_id:
            found = [g for g in _paginate(self.ec2, "describe_security_groups", "SecurityGroups",
                                          Filters=self._drill_filter(vpc_id=vpc_id)) if g["GroupName"] == gname]
        group = self._one(found, "security groups named %s" % gname, "GroupId")
        if group is None:
            self._record("create security group %s" % gname)
            if self.check:
                return
            gid = self.ec2.create_security_group(
                VpcId=vpc_id, GroupName=gname,
                Description="drguard drill %s SSM interface endpoints (443 from the sandbox only)" % self.drill_id,
                TagSpecifications=ec2_tag_specs("security-group", self.tags, gname))["GroupId"]
            self.created.append({"type": "security_group", "id": gid})
            group = self.ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
        else:
            self._ensure_ec2_tags(group["GroupId"], group.get("Tags"), "security group", gname)
        self.result["ssm_endpoint_security_group_id"] = group["GroupId"]
        want = {("ingress", "tcp", 443, 443, "cidr", self.result["sandbox_cidr"]): "drguard sandbox to SSM endpoints"}
        self._sync_rules(group, gname, want)

    def _interface_endpoints(self) -> None:
        """ssm, ssmmessages, ec2messages and secretsmanager interface endpoints with private DNS, only when declared.

        In both sandbox subnets, in the endpoints' own group; secretsmanager's with a policy that allows reading
        the drill's runtime secrets only. Undeclared, the drill's own ones are deleted.
        """
        self.step = "SSM interface endpoints"
        vpc_id = self.result["vpc_id"]
        declared = ssm_endpoints_declared(self.boundary)
        ids = {}
        group = self.result.get("ssm_endpoint_security_group_id")
        subnets = [s for s in self.result.get("subnet_ids") or [] if s]
        for service, name in self.names["ssm_endpoints"].items():
            service_name = "com.amazonaws.%s.%s" % (self.region, service)
            existing = []
            if vpc_id:
                existing = [e for e in _paginate(self.ec2, "describe_vpc_endpoints", "VpcEndpoints",
                                                 Filters=self._drill_filter(name, vpc_id))
                            if e.get("State", "").lower() not in ("deleted", "deleting", "failed")]
            ep = self._one(existing, "endpoints named %s" % name, "VpcEndpointId")
            if ep is not None and (not declared or ep.get("ServiceName") != service_name
                                   or ep.get("VpcEndpointType") != "Interface" or not ep.get("PrivateDnsEnabled")):
                why = "not declared" if not declared else "not a %s interface endpoint with private DNS" % service_name
                self._record("delete endpoint %s (%s)" % (ep["VpcEndpointId"], why))
                if not self.check:
                    self.ec2.delete_vpc_endpoints(VpcEndpointIds=[ep["VpcEndpointId"]])
                ep = None
                if declared:
                    raise BuildError("endpoint %s named %s was %s and is being deleted; run the build again once "
                                     "it is gone" % (existing[0]["VpcEndpointId"], name, why))
            if not declared:
                continue
            policy = secrets_endpoint_policy(self.drill_id, self.region) if service == "secretsmanager" else None
            if ep is None:
                self._record("create %s interface endpoint %s" % (service, name))
                ep_id = None
                if not self.check:
                    ep_id = self.ec2.create_vpc_endpoint(
                        VpcEndpointType="Interface", VpcId=vpc_id, ServiceName=service_name, SubnetIds=subnets,
                        SecurityGroupIds=[group], PrivateDnsEnabled=True,
                        **({"PolicyDocument": json.dumps(policy)} if policy else {}),
                        TagSpecifications=ec2_tag_specs("vpc-endpoint", self.tags, name))["VpcEndpoint"][
                        "VpcEndpointId"]
                    self.created.append({"type": "vpc_endpoint", "id": ep_id})
                ids[service] = ep_id
                continue
            ep_id = ep["VpcEndpointId"]
            ids[service] = ep_id
            self._ensure_ec2_tags(ep_id, ep.get("Tags"), "endpoint", name)
            have_groups = {g.get("GroupId") for g in ep.get("Groups") or []}
            have_subnets = set(ep.get("SubnetIds") or [])
            changes = {}
            if group and have_groups != {group}:
                changes.update(AddSecurityGroupIds=[group] if group not in have_groups else [],
                               RemoveSecurityGroupIds=sorted(have_groups - {group}))
            if have_subnets != set(subnets):
                changes.update(AddSubnetIds=sorted(set(subnets) - have_subnets),
                               RemoveSubnetIds=sorted(have_subnets - set(subnets)))
            if policy and _policy_differs(ep.get("PolicyDocument") or "{}", policy):
                changes["PolicyDocument"] = json.dumps(policy)
            changes = {k: v for k, v in changes.items() if v}
            if changes:
                self._record("update endpoint %s (%s)" % (ep_id, ", ".join(sorted(changes))))
                if not self.check:
                    self.ec2.modify_vpc_endpoint(VpcEndpointId=ep_id, **changes)
        self.result["ssm_endpoint_ids"] = ids

    def _default_security_group(self) -> None:
        """The VPC's default security group: stripped of every rule (and tagged)."""
        self.step = "default security group"
        vpc_id = self.result["vpc_id"]
        self.result["default_security_group_id"] = None
        if not vpc_id:
            self._record("strip every rule from the new VPC's default security group")
            return
        found = _paginate(self.ec2, "describe_security_groups", "SecurityGroups",
                          Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                   {"Name": "group-name", "Values": ["default"]}])
        if not found:
            raise BuildError("VPC %s has no default security group to strip; AWS state is unexpected" % vpc_id)
        group = found[0]
        gid = group["GroupId"]
        self.result["default_security_group_id"] = gid
        self._ensure_ec2_tags(gid, group.get("Tags"), "security group", self.names["default_sg"])
        live = sorted(live_sg_rules(group), key=repr)
        if live:
            self._record_diff("security_groups", self.names["default_sg"], sg_rules_view(live), sg_rules_view(()))
        for direction in ("ingress", "egress"):
            revoke = [ip_permission(r) for r in live if r[0] == direction]
            if revoke:
                self._record("revoke %d %s rule(s) from the default security group %s"
                             % (len(revoke), direction, gid))
                if not self.check:
                    fn = self.ec2.revoke_security_group_ingress if direction == "ingress" \
                        else self.ec2.revoke_security_group_egress
                    fn(GroupId=gid, IpPermissions=revoke)

    # ---------------------------------------------------------------- network ACL

    def _network_acl(self, s3_cidrs: list) -> None:
        self.step = "network ACL"
        vpc_id, name = self.result["vpc_id"], self.names["nacl"]
        acl = None
        if vpc_id:
            acl = self._one(_paginate(self.ec2, "describe_network_acls", "NetworkAcls",
                                      Filters=self._drill_filter(name, vpc_id)), "network ACLs named %s" % name,
                            "NetworkAclId")
        if acl is None:
            self._record("create network ACL %s" % name)
            acl_id = None
            if not self.check:
                acl_id = self.ec2.create_network_acl(
                    VpcId=vpc_id, TagSpecifications=ec2_tag_specs("network-acl", self.tags, name))["NetworkAcl"][
                    "NetworkAclId"]
                self.created.append({"type": "network_acl", "id": acl_id})
            acl = {"NetworkAclId": acl_id, "Entries": [], "Associations": []}
        else:
            self._ensure_ec2_tags(acl["NetworkAclId"], acl.get("Tags"), "network ACL", name)
        acl_id = acl["NetworkAclId"]
        self.result["network_acl_id"] = acl_id

        desired = desired_nacl_entries(self.boundary, self.result["sandbox_cidr"], s3_cidrs)
        live = live_nacl_entries(acl)
        by_slot = {(e[0], e[1]): e for e in live}
        want_slots = {(e[0], e[1]): e for e in desired}
        creates, replaces, deletes = [], [], []
        for slot, entry in sorted(want_slots.items()):
            if slot not in by_slot:
                creates.append(entry)
            elif by_slot[slot] != entry:
                replaces.append(entry)
        deletes = [slot for slot in sorted(by_slot) if slot not in want_slots]
        if creates or replaces or deletes:
            self._record_diff("network_acl", name, nacl_entries_view(live), nacl_entries_view(desired))
        if creates:
            self._record("create %d network ACL entries in %s" % (len(creates), name))
        if replaces:
            self._record("replace %d network ACL entries in %s" % (len(replaces), name))
        if deletes:
            self._record("delete %d undeclared network ACL entries from %s" % (len(deletes), name))
        if not self.check:
            # Deletions first: an undeclared allow must not outlive the run, and its number may be reused.
            _parallel(lambda s: self.ec2.delete_network_acl_entry(NetworkAclId=acl_id, Egress=s[0],
                                                                  RuleNumber=s[1]), deletes)
            _parallel(lambda e: self.ec2.replace_network_acl_entry(**nacl_entry_args(acl_id, e)), replaces)
            _parallel(lambda e: self.ec2.create_network_acl_entry(**nacl_entry_args(acl_id, e)), creates)

        associated = {a.get("SubnetId") for a in acl.get("Associations") or []}
        for sid in self.result["subnet_ids"]:
            if sid is not None and sid in associated:
                continue
            self._record("associate network ACL %s with subnet %s" % (name, sid or "(planned)"))
            if self.check:
                continue
            current = _paginate(self.ec2, "describe_network_acls", "NetworkAcls",
                                Filters=[{"Name": "association.subnet-id", "Values": [sid]}])
            assoc = [a for a in (current[0].get("Associations") or []) if a.get("SubnetId") == sid] if current else []
            if not assoc:
                raise BuildError("subnet %s has no network ACL association to replace; AWS state is unexpected" % sid)
            self.ec2.replace_network_acl_association(AssociationId=assoc[0]["NetworkAclAssociationId"],
                                                     NetworkAclId=acl_id)

    # ---------------------------------------------------------------- S3 endpoint

    def _endpoint(self) -> None:
        self.step = "S3 gateway endpoint"
        self.result["s3_endpoint_id"] = None
        vpc_id, rt_id, name = self.result["vpc_id"], self.result["route_table_id"], self.names["endpoint"]
        service = "com.amazonaws.%s.s3" % self.region
        wanted = bool(self.boundary.s3_read or self.boundary.s3_write)
        existing = []
        if vpc_id:
            existing = [e for e in _paginate(self.ec2, "describe_vpc_endpoints", "VpcEndpoints",
                                             Filters=self._drill_filter(name, vpc_id))
                        if e.get("State", "").lower() not in ("deleted", "deleting", "failed")]
        ep = self._one(existing, "S3 endpoints named %s" % name, "VpcEndpointId")
        if not wanted:
            # No S3 grant: no path to S3 at all (tighter than an endpoint with an empty policy).
            if ep is not None:
                self._record("delete S3 endpoint %s (no S3 grant declared)" % ep["VpcEndpointId"])
                self._record_diff("s3_endpoint_policy", None, _policy(ep.get("PolicyDocument") or {}), {})
                if not self.check:
                    self.ec2.delete_vpc_endpoints(VpcEndpointIds=[ep["VpcEndpointId"]])
            return
        policy = endpoint_policy(self.boundary)
        if ep is None:
            self._record("create S3 gateway endpoint %s" % name)
            self._record_diff("s3_endpoint_policy", None, {}, policy)
            ep_id = None
            if not self.check:
                ep_id = self.ec2.create_vpc_endpoint(
                    VpcEndpointType="Gateway", VpcId=vpc_id, ServiceName=service, RouteTableIds=[rt_id],
                    PolicyDocument=json.dumps(policy),
                    TagSpecifications=ec2_tag_specs("vpc-endpoint", self.tags, name))["VpcEndpoint"]["VpcEndpointId"]
                self.created.append({"type": "vpc_endpoint", "id": ep_id})
            self.result["s3_endpoint_id"] = ep_id
            return
        ep_id = ep["VpcEndpointId"]
        self.result["s3_endpoint_id"] = ep_id
        if ep.get("ServiceName") != service or ep.get("VpcEndpointType", "Gateway") != "Gateway":
            raise BuildError("endpoint %s named %s is not an S3 gateway endpoint (%s); tear the drill down"
                             % (ep_id, name, ep.get("ServiceName")))
        self._ensure_ec2_tags(ep_id, ep.get("Tags"), "endpoint", name)
        changes = {}
        if _policy_differs(ep.get("PolicyDocument") or "{}", policy):
            changes["PolicyDocument"] = json.dumps(policy)
            self._record_diff("s3_endpoint_policy", None, _policy(ep.get("PolicyDocument") or {}), policy)
        rts = set(ep.get("RouteTableIds") or [])
        if rt_id not in rts:
            changes["AddRouteTableIds"] = [rt_id]
        if rts - {rt_id}:
            changes["RemoveRouteTableIds"] = sorted(rts - {rt_id})
        if changes:
            self._record("update S3 endpoint %s (%s)" % (ep_id, ", ".join(sorted(changes))))
            if not self.check:
                self.ec2.modify_vpc_endpoint(VpcEndpointId=ep_id, **changes)

    # ---------------------------------------------------------------- flow logs

    def _flow_log_prereqs(self) -> dict:
        """The drill's log group and delivery role (runs in a thread, alongside the EC2 work)."""
        group = self.names["log_group"]
        found = [g for g in _paginate(self.logs, "describe_log_groups", "logGroups", logGroupNamePrefix=group)
                 if g["logGroupName"] == group]
        arn = None
        if found:
            arn = found[0].get("arn")
            have = self.logs.list_tags_log_group(logGroupName=group).get("tags") or {}
            if have.get(TAG_DRILL_ID) != self.drill_id:
                raise BuildError("log group %s exists but does not belong to drill %s (its drguard:drill-id tag is "
                                 "%r); remove it or use another drill id" % (group, self.drill_id,
                                                                             have.get(TAG_DRILL_ID)))
            missing = {k: v for k, v in self.tags.items() if have.get(k) != v}
            if missing:
                self._record("tag log group %s" % group)
                if not self.check:
                    self.logs.tag_log_group(logGroupName=group, tags=missing)
            if found[0].get("retentionInDays") != LOG_RETENTION_DAYS:
                self._record("set retention of log group %s to %d days" % (group, LOG_RETENTION_DAYS))
                if not self.check:
                    self.logs.put_retention_policy(logGroupName=group, retentionInDays=LOG_RETENTION_DAYS)
        else:
            self._record("create log group %s" % group)
            if not self.check:
                self.logs.create_log_group(logGroupName=group, tags=dict(self.tags))
                with self._lock:
                    self.created.append({"type": "log_group", "id": group})
                self.logs.put_retention_policy(logGroupName=group, retentionInDays=LOG_RETENTION_DAYS)
                found = [g for g in _paginate(self.logs, "describe_log_groups", "logGroups",
                                              logGroupNamePrefix=group) if g["logGroupName"] == group]
                arn = found[0].get("arn") if found else None
                if not arn:
                    raise BuildError("log group %s was created but cannot be read back" % group)
        return {"log_group_arn": arn, "role_arn": self._flow_log_role(arn)}

    def _flow_log_role(self, log_group_arn: str | None) -> str | None:
        role_name = self.names["role"]
        policy_name = "deliver-flow-logs"
        trust = flow_logs_trust_policy()
        role = get_or_none(self.iam.get_role, "Role", RoleName=role_name)
        if role is None:
            self._record("create IAM role %s" % role_name)
            if self.check:
                return None
            role = self.iam.create_role(
                RoleName=role_name, Path="/drguard/", AssumeRolePolicyDocument=json.dumps(trust),
                Description="Delivers VPC flow logs of drill %s to its own log group" % self.drill_id,
                MaxSessionDuration=3600, Tags=ansible_dict_to_boto3_tag_list(self.tags))["Role"]
            with self._lock:
                self.created.append({"type": "iam_role", "id": role_name})
            current_policy = None
        else:
            have = boto3_tag_list_to_ansible_dict(_paginate(self.iam, "list_role_tags", "Tags", RoleName=role_name))
            if have.get(TAG_DRILL_ID) != self.drill_id:
                raise BuildError("IAM role %s exists but does not belong to drill %s (its drguard:drill-id tag is "
                                 "%r); remove it or use another drill id" % (role_name, self.drill_id,
                                                                             have.get(TAG_DRILL_ID)))
            missing = {k: v for k, v in self.tags.items() if have.get(k) != v}
            if missing:
                self._record("tag IAM role %s" % role_name)
                if not self.check:
                    self.iam.tag_role(RoleName=role_name, Tags=ansible_dict_to_boto3_tag_list(missing))
            if _policy_differs(role.get("AssumeRolePolicyDocument"), trust):
                self._record("reset trust policy of IAM role %s" % role_name)
                if not self.check:
                    self.iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))
            attached = _paginate(self.iam, "list_attached_role_policies", "AttachedPolicies", RoleName=role_name)
            if attached:
                raise BuildError("IAM role %s has managed policies attached (%s) that the drill did not grant; "
                                 "tear the drill down" % (role_name, ", ".join(p["PolicyArn"] for p in attached)))
            current_policy = None
            for pname in _paginate(self.iam, "list_role_policies", "PolicyNames", RoleName=role_name):
                doc = self.iam.get_role_policy(RoleName=role_name, PolicyName=pname)["PolicyDocument"]
                if pname == policy_name:
                    current_policy = doc
                    continue
                self._record("delete undeclared inline policy %s of IAM role %s" % (pname, role_name))
                if not self.check:
                    self.iam.delete_role_policy(RoleName=role_name, PolicyName=pname)
        if log_group_arn is None:  # check mode: the log group is only planned
            self._record("put inline policy %s on IAM role %s" % (policy_name, role_name))
            return role["Arn"]
        policy = flow_logs_role_policy(log_group_arn)
        if current_policy is None or _policy_differs(current_policy, policy):
            self._record("put inline policy %s on IAM role %s" % (policy_name, role_name))
            if not self.check:
                self.iam.put_role_policy(RoleName=role_name, PolicyName=policy_name,
                                         PolicyDocument=json.dumps(policy))
        return role["Arn"]

    def _flow_log(self, prereq: dict) -> None:
        self.step = "flow logs"
        vpc_id, name, group = self.result["vpc_id"], self.names["flow_log"], self.names["log_group"]
        self.result["flow_log_id"] = None
        existing = []
        if vpc_id:
            existing = _paginate(self.ec2, "describe_flow_logs", "FlowLogs",
                                 Filter=self._drill_filter(name) + [{"Name": "resource-id", "Values": [vpc_id]}])
        keep = None
        for fl in existing:
            good = (fl.get("TrafficType") == "ALL" and fl.get("LogGroupName") == group
                    and fl.get("LogDestinationType", "cloud-watch-logs") == "cloud-watch-logs"
                    and (prereq.get("role_arn") is None or fl.get("DeliverLogsPermissionArn") == prereq["role_arn"]))
            if good and keep is None:
                keep = fl
                continue
            self._record("delete flow log %s (not what the drill declares)" % fl["FlowLogId"])
            if not self.check:
                self.ec2.delete_flow_logs(FlowLogIds=[fl["FlowLogId"]])
        if keep is not None:
            self._ensure_ec2_tags(keep["FlowLogId"], keep.get("Tags"), "flow log", name)
            self.result["flow_log_id"] = keep["FlowLogId"]
            return
        self._record("create flow log %s (ALL traffic of the VPC into %s)" % (name, group))
        if self.check:
            return

        def create():
            resp = self.ec2.create_flow_logs(
                ResourceIds=[vpc_id], ResourceType="VPC", TrafficType="ALL", LogDestinationType="cloud-watch-logs",
                LogGroupName=group, DeliverLogsPermissionArn=prereq["role_arn"],
                TagSpecifications=ec2_tag_specs("vpc-flow-log", self.tags, name))
            unsuccessful = [ClientError({"Error": u.get("Error") or {}}, "CreateFlowLogs")
                            for u in resp.get("Unsuccessful") or []]
            unassumable = [e for e in unsuccessful if _role_not_assumable(e)]
            if unassumable and not resp.get("FlowLogIds"):
                raise unassumable[0]
            return resp

        # The delivery role was usually created a moment ago: until IAM has propagated it,
        # CreateFlowLogs answers "Unable to assume given IAM role" and creates nothing.
        resp = retry_while(create, _role_not_assumable, ROLE_PROPAGATION_WAIT)
        ids = resp.get("FlowLogIds") or []
        for fid in ids:
            self.created.append({"type": "flow_log", "id": fid})
        if resp.get("Unsuccessful") or len(ids) != 1:
            errors = "; ".join("%s: %s" % ((u.get("Error") or {}).get("Code"), (u.get("Error") or {}).get("Message"))
                               for u in resp.get("Unsuccessful") or [])
            raise BuildError("VPC flow logs could not be created for %s: %s" % (vpc_id, errors or "no id returned"))
        self.result["flow_log_id"] = ids[0]


def _parallel(fn, items: list) -> list:
    """``[fn(x) for x in items]`` in threads; the first exception is raised after all finish."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(WORKERS, len(items))) as pool:
        futures = [pool.submit(fn, i) for i in items]
    return [f.result() for f in futures]
