# Copyright: drguard maintainers
# Apache License 2.0
"""The drill boundary policy, declared once as data (docs/boundary-policy.md).

``parse_boundary(raw)`` validates a user's ``drill_boundary`` and returns a
:class:`Boundary`. Builders (``sandbox_network``) translate it into AWS resources;
verifiers (``boundary_verify``) read live state and compare it with the same
:class:`Boundary`. This file holds only the policy, never a translation, so build
and verify cannot share a shortcut.

Schema (every key not listed is an error)::

    sandbox_cidr: 10.213.0.0/16        # optional: picked per drill when absent
    production_cidrs: [10.0.0.0/16]    # required, always denied
    ingress:                           # who may reach the sandbox (control plane)
      - {cidr: 192.0.2.0/28, protocol: tcp, ports: [22, "8000-8100"], description: ...}
    egress:                            # where the sandbox may go (control plane, telemetry)
      - {cidr: 198.51.100.0/28, protocol: tcp, ports: [443], description: ...}
      - {cidr: 198.51.100.16/28, ports: [4317], kind: telemetry}   # kind: control_plane (default)
    fallback:                          # failover paths (a DR site, a secondary region), never production
      - {cidr: 203.0.113.0/28, protocol: tcp, ports: [443], description: ...}
    control_plane_route:               # optional: the one route allowed to leave the VPC
      {cidr: 192.0.2.0/28, target: tgw-0123...}
    tiers: [app, db]                   # micro-segmentation tiers (default: [app, db])
    tier_rules:                        # tier-to-tier traffic inside the sandbox
      - {from: app, to: db, protocol: tcp, ports: [5432]}
    s3_read:  [{bucket: backups, prefix: orders/}]   # via the S3 gateway endpoint
    s3_write: [{bucket: telemetry, prefix: dr-.../}]
    quotas: {nacl_rules_per_direction: 40}          # optional: AWS quotas this account raised
    ssm_endpoints: true                # optional (default false): the ec2 runtime's SSM interface endpoints
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from dataclasses import field

from ansible_collections.drguard.sandbox.plugins.module_utils._quotas import parse_quotas
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import BUCKET_RE
from ansible_collections.drguard.sandbox.plugins.module_utils._quotas import QuotaError

PROTOCOLS = ("tcp", "udp")
GATEWAY_PREFIXES = ("tgw-", "pcx-", "vgw-")
GATEWAY_RE = re.compile(r"^(tgw|pcx|vgw)-[0-9a-f]{8,17}$")
TIER_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
DEFAULT_TIERS = ("app", "db")
SANDBOX_PREFIX_MIN = 16
SANDBOX_PREFIX_MAX = 24
_ALL_IPV4 = ipaddress.ip_network("0.0.0.0/0")

# What an egress destination is for: the control plane (the default) or the drill's one telemetry collector.
EGRESS_KINDS = ("control_plane", "telemetry")
FALLBACK_KIND = "fallback"  # the kind of every drill_boundary.fallback rule

_TOP_KEYS = {"sandbox_cidr", "production_cidrs", "ingress", "egress", "fallback", "control_plane_route",
             "tiers", "tier_rules", "s3_read", "s3_write", "quotas", "ssm_endpoints"}
_RULE_KEYS = {"cidr", "protocol", "ports", "description"}
_EGRESS_KEYS = _RULE_KEYS | {"kind"}
_TIER_RULE_KEYS = {"from", "to", "protocol", "ports", "description"}
_S3_KEYS = {"bucket", "prefix"}


class BoundaryError(ValueError):
    """The declared boundary is invalid; the message says what and how to fix it."""


@dataclass(frozen=True)
class PortRange:
    start: int
    end: int

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else "%d-%d" % (self.start, self.end)


@dataclass(frozen=True)
class Rule:
    """Traffic allowed between the sandbox and ``cidr`` (direction given by the list).

    ``kind`` is ``control_plane`` or ``telemetry`` for egress (``control_plane`` for
    ingress) and ``fallback`` for a ``drill_boundary.fallback`` path.
    """
    cidr: ipaddress.IPv4Network
    protocol: str
    ports: tuple
    description: str = ""
    kind: str = "control_plane"

    def allows(self, cidr, protocol: str, start: int, end: int) -> bool:
        """True when this rule covers traffic to/from all of ``cidr`` on ``start..end``."""
        net = ipaddress.ip_network(cidr, strict=False)
        return (net.version == 4 and net.subnet_of(self.cidr) and protocol == self.protocol
                and any(p.covers(start, end) for p in self.ports))


@dataclass(frozen=True)
class TierRule:
    source: str
    dest: str
    protocol: str
    ports: tuple
    description: str = ""


@dataclass(frozen=True)
class S3Grant:
    bucket: str
    prefix: str

    @property
    def object_arn(self) -> str:
        return "arn:aws:s3:::%s/%s*" % (self.bucket, self.prefix)

    @property
    def bucket_arn(self) -> str:
        return "arn:aws:s3:::%s" % self.bucket


@dataclass(frozen=True)
class Boundary:
    sandbox_cidr: ipaddress.IPv4Network | None
    production_cidrs: tuple
    ingress: tuple = ()
    egress: tuple = ()
    control_plane_route: dict | None = None
    tiers: tuple = DEFAULT_TIERS
    tier_rules: tuple = ()
    s3_read: tuple = ()
    s3_write: tuple = ()
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    fallback: tuple = ()

    def overlaps_production(self, cidr) -> list:
        """The production CIDRs that ``cidr`` overlaps (empty list: none)."""
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version != 4:
            return []
        return [p for p in self.production_cidrs if net.overlaps(p)]

    def with_sandbox_cidr(self, cidr) -> Boundary:
        net = _cidr(cidr, "sandbox_cidr")
        _check_sandbox(net, self.production_cidrs)
        if self.control_plane_route and net.overlaps(ipaddress.ip_network(self.control_plane_route["cidr"])):
            raise BoundaryError("drill_boundary.sandbox_cidr: %s overlaps the control_plane_route CIDR %s"
                                % (net, self.control_plane_route["cidr"]))
        for rule in self.fallback:
            if net.overlaps(rule.cidr):
                raise BoundaryError("drill_boundary.sandbox_cidr: %s overlaps the fallback CIDR %s; choose a "
                                    "sandbox CIDR outside every fallback path" % (net, rule.cidr))
        raw = dict(self.raw, sandbox_cidr=str(net))
        return Boundary(net, self.production_cidrs, self.ingress, self.egress,
                        self.control_plane_route, self.tiers, self.tier_rules,
                        self.s3_read, self.s3_write, raw, self.fallback)

    def to_dict(self) -> dict:
        """The normalized policy as plain data (for reports and returns)."""
        def rule(r):
            return {"cidr": str(r.cidr), "protocol": r.protocol,
                    "ports": [str(p) for p in r.ports], "description": r.description}
        return {
            "sandbox_cidr": str(self.sandbox_cidr) if self.sandbox_cidr else None,
            "production_cidrs": [str(p) for p in self.production_cidrs],
            "ingress": [rule(r) for r in self.ingress],
            "egress": [dict(rule(r), kind=r.kind) for r in self.egress],
            "fallback": [rule(r) for r in self.fallback],
            "control_plane_route": dict(self.control_plane_route) if self.control_plane_route else None,
            "tiers": list(self.tiers),
            "tier_rules": [{"from": t.source, "to": t.dest, "protocol": t.protocol,
                            "ports": [str(p) for p in t.ports], "description": t.description}
                           for t in self.tier_rules],
            "s3_read": [{"bucket": g.bucket, "prefix": g.prefix} for g in self.s3_read],
            "s3_write": [{"bucket": g.bucket, "prefix": g.prefix} for g in self.s3_write],
        }


def _cidr(value, where: str) -> ipaddress.IPv4Network:
    if not isinstance(value, str) or not value.strip():
        raise BoundaryError("%s: expected an IPv4 CIDR such as 10.0.0.0/16, got %r" % (where, value))
    text = value.strip()
    if "/" not in text:
        raise BoundaryError("%s: %r has no prefix length; write it as a CIDR such as %s/32"
                            % (where, text, text))
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BoundaryError("%s: %r is not a valid CIDR" % (where, text)) from None
    if net.version != 4:
        raise BoundaryError("%s: %r is IPv6; the boundary is IPv4-only (IPv6 is denied outright)"
                            % (where, text))
    if str(net) != text:
        raise BoundaryError("%s: %r has host bits set; did you mean %s?" % (where, text, net))
    return net


def _ports(value, where: str) -> tuple:
    if not isinstance(value, list) or not value:
        raise BoundaryError("%s.ports: give a non-empty list of ports or 'from-to' ranges" % where)
    out = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            start = end = item
        elif isinstance(item, str) and re.match(r"^\d+(-\d+)?$", item.strip()):
            parts = item.strip().split("-")
            start, end = int(parts[0]), int(parts[-1])
        else:
            raise BoundaryError("%s.ports: %r is not a port or a 'from-to' range" % (where, item))
        if not (1 <= start <= end <= 65535):
            raise BoundaryError("%s.ports: %r is outside 1-65535 or reversed" % (where, item))
        out.append(PortRange(start, end))
    return tuple(out)


def _protocol(value, where: str) -> str:
    proto = "tcp" if value is None else value
    if proto not in PROTOCOLS:
        raise BoundaryError("%s.protocol: %r is not one of %s (all-protocol rules are not allowed)"
                            % (where, value, ", ".join(PROTOCOLS)))
    return proto


def _keys(item, allowed: set, where: str) -> None:
    if not isinstance(item, dict):
        raise BoundaryError("%s: expected a mapping, got %r" % (where, type(item).__name__))
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise BoundaryError("%s: unknown key(s) %s; allowed: %s"
                            % (where, ", ".join(unknown), ", ".join(sorted(allowed))))


def _list(raw: dict, key: str) -> list:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BoundaryError("drill_boundary.%s: expected a list" % key)
    return value


def _rules(raw: dict, key: str, production: tuple, sandbox) -> tuple:
    out = []
    for i, item in enumerate(_list(raw, key)):
        where = "drill_boundary.%s[%d]" % (key, i)
        _keys(item, _EGRESS_KEYS if key == "egress" else _RULE_KEYS, where)
        if "cidr" not in item:
            raise BoundaryError("%s: 'cidr' is required" % where)
        net = _cidr(item["cidr"], where + ".cidr")
        hits = [str(p) for p in production if net.overlaps(p)]
        if hits:
            raise BoundaryError("%s: %s overlaps production CIDR(s) %s; traffic to or from "
                                "production is never allowed" % (where, net, ", ".join(hits)))
        if sandbox is not None and net.overlaps(sandbox):
            raise BoundaryError("%s.cidr: %s overlaps the sandbox CIDR %s; %s rules name peers outside the "
                                "sandbox (traffic inside it is governed by tier_rules)" % (where, net, sandbox, key))
        ports = _ports(item.get("ports"), where)
        if key == "fallback":
            _fallback_off_dns(item["ports"], ports, where)
        out.append(Rule(net, _protocol(item.get("protocol"), where), ports, str(item.get("description", "")),
                        _kind(item, key, where)))
    if key == "egress":
        _one_telemetry(out)
    return tuple(out)


DNS_PORT = 53


def _fallback_off_dns(texts: list, ports: tuple, where: str) -> None:
    """DNS to the outside is always dropped, so a fallback on port 53 could never be proven reachable."""
    for text, port in zip(texts, ports, strict=True):
        if port.covers(DNS_PORT, DNS_PORT):
            raise BoundaryError("%s.ports: %s covers port 53 (DNS), but DNS to the outside is always dropped "
                                "(names resolve inside the sandbox only), so that fallback could never be "
                                "proven; declare the DR site's other ports" % (where, text))


def _kind(item: dict, key: str, where: str) -> str:
    if key == "fallback":
        return FALLBACK_KIND
    kind = item.get("kind")
    if kind is None:
        return "control_plane"
    if kind not in EGRESS_KINDS:
        raise BoundaryError("%s.kind: %r is not one of %s; mark the telemetry collector's destination "
                            "kind: telemetry and leave control-plane destinations without a kind"
                            % (where, kind, ", ".join(EGRESS_KINDS)))
    return kind


def _one_telemetry(egress: list) -> None:
    """The drill has one isolated telemetry collector, so one egress rule names it."""
    seen = [i for i, r in enumerate(egress) if r.kind == "telemetry"]
    if len(seen) > 1:
        raise BoundaryError("drill_boundary.egress[%d].kind: a second telemetry destination, but the drill sends "
                            "its telemetry to one collector (drill_boundary.egress[%d]); list its ports in that one "
                            "rule, or declare this destination without kind: telemetry" % (seen[1], seen[0]))


def _s3(raw: dict, key: str) -> tuple:
    out = []
    for i, item in enumerate(_list(raw, key)):
        where = "drill_boundary.%s[%d]" % (key, i)
        _keys(item, _S3_KEYS, where)
        bucket = item.get("bucket")
        if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
            raise BoundaryError("%s.bucket: %r is not a valid S3 bucket name" % (where, bucket))
        prefix = item.get("prefix", "") or ""
        if not isinstance(prefix, str) or "*" in prefix or "?" in prefix:
            raise BoundaryError("%s.prefix: %r must be a plain key prefix without wildcards"
                                % (where, prefix))
        # A prefix names a folder: "orders" grants orders/..., never orders-payroll/...
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out.append(S3Grant(bucket, prefix))
    return tuple(out)


def _check_sandbox(net: ipaddress.IPv4Network, production: tuple) -> None:
    if not (SANDBOX_PREFIX_MIN <= net.prefixlen <= SANDBOX_PREFIX_MAX):
        raise BoundaryError("drill_boundary.sandbox_cidr: %s must be between /%d and /%d"
                            % (net, SANDBOX_PREFIX_MIN, SANDBOX_PREFIX_MAX))
    hits = [str(p) for p in production if net.overlaps(p)]
    if hits:
        raise BoundaryError("drill_boundary.sandbox_cidr: %s overlaps production CIDR(s) %s; "
                            "choose a sandbox CIDR outside production, or omit it to have one "
                            "picked" % (net, ", ".join(hits)))


def parse_boundary(raw) -> Boundary:
    """Validate ``raw`` (the user's ``drill_boundary``) and return a :class:`Boundary`.

    Raises :class:`BoundaryError` with one sentence naming the offending key.
    """
    if not isinstance(raw, dict):
        raise BoundaryError("drill_boundary must be a mapping, got %s" % type(raw).__name__)
    _keys(raw, _TOP_KEYS, "drill_boundary")

    prod_raw = raw.get("production_cidrs")
    if not isinstance(prod_raw, list) or not prod_raw:
        raise BoundaryError("drill_boundary.production_cidrs: list every production CIDR "
                            "(at least one); they are denied explicitly")
    production = tuple(_cidr(c, "drill_boundary.production_cidrs[%d]" % i)
                       for i, c in enumerate(prod_raw))
    if list(ipaddress.collapse_addresses(production)) == [_ALL_IPV4]:
        raise BoundaryError("drill_boundary.production_cidrs: %s cover all of IPv4, which leaves no address for "
                            "the sandbox or any allowed peer; list the production networks themselves"
                            % ", ".join(str(p) for p in production))

    sandbox = None
    if raw.get("sandbox_cidr"):
        sandbox = _cidr(raw["sandbox_cidr"], "drill_boundary.sandbox_cidr")
        _check_sandbox(sandbox, production)

    ingress = _rules(raw, "ingress", production, sandbox)
    egress = _rules(raw, "egress", production, sandbox)
    fallback = _rules(raw, "fallback", production, sandbox)

    route = raw.get("control_plane_route")
    if route is not None:
        where = "drill_boundary.control_plane_route"
        _keys(route, {"cidr", "target"}, where)
        rnet = _cidr(route.get("cidr"), where + ".cidr")
        hits = [str(p) for p in production if rnet.overlaps(p)]
        if hits:
            raise BoundaryError("%s.cidr: %s overlaps production CIDR(s) %s" % (where, rnet, ", ".join(hits)))
        if sandbox is not None and rnet.overlaps(sandbox):
            raise BoundaryError("%s.cidr: %s overlaps the sandbox CIDR %s" % (where, rnet, sandbox))
        target = route.get("target")
        if not isinstance(target, str) or not GATEWAY_RE.fullmatch(target):
            raise BoundaryError("%s.target: %r must be a transit gateway (tgw-), peering "
                                "connection (pcx-) or virtual private gateway (vgw-) id"
                                % (where, target))
        route = {"cidr": str(rnet), "target": target}

    tiers_raw = raw.get("tiers")
    if tiers_raw is not None and not isinstance(tiers_raw, list):
        raise BoundaryError("drill_boundary.tiers: expected a list of tier names")
    tiers = tuple(DEFAULT_TIERS if tiers_raw is None else tiers_raw)
    if not tiers:
        raise BoundaryError("drill_boundary.tiers: give at least one tier name")
    for t in tiers:
        if not isinstance(t, str) or not TIER_RE.fullmatch(t):
            raise BoundaryError("drill_boundary.tiers: %r is not a valid tier name "
                                "(lowercase letters, digits, hyphens)" % (t,))
    if len(set(tiers)) != len(tiers):
        raise BoundaryError("drill_boundary.tiers: tier names must be unique")

    tier_rules = []
    for i, item in enumerate(_list(raw, "tier_rules")):
        where = "drill_boundary.tier_rules[%d]" % i
        _keys(item, _TIER_RULE_KEYS, where)
        for end in ("from", "to"):
            if item.get(end) not in tiers:
                raise BoundaryError("%s.%s: %r is not a declared tier (%s)"
                                    % (where, end, item.get(end), ", ".join(tiers)))
        tier_rules.append(TierRule(item["from"], item["to"], _protocol(item.get("protocol"), where),
                                   _ports(item.get("ports"), where), str(item.get("description", ""))))

    try:
        parse_quotas(raw.get("quotas"))  # raised AWS quotas (docs/boundary-policy.md, "Limits")
    except QuotaError as exc:
        raise BoundaryError(str(exc)) from None

    s3_read, s3_write = _s3(raw, "s3_read"), _s3(raw, "s3_write")
    _check_read_only(s3_read, s3_write)
    if not isinstance(raw.get("ssm_endpoints", False), bool):
        raise BoundaryError("drill_boundary.ssm_endpoints: %r is not true or false; set it true only for the ec2 "
                            "runtime (docs/runtime.md)" % (raw.get("ssm_endpoints"),))
    boundary = Boundary(sandbox, production, ingress, egress, route, tiers, tuple(tier_rules),
                        s3_read, s3_write, dict(raw), fallback)
    if sandbox is None and not _free_candidates(boundary):
        raise BoundaryError("drill_boundary.production_cidrs: %s leave no free /16 in %s for the sandbox; declare "
                            "drill_boundary.sandbox_cidr outside production (for example 192.168.0.0/16)"
                            % (", ".join(str(p) for p in production), " or ".join(str(r) for r in _CANDIDATE_RANGES)))
    return boundary


# The interface endpoints of the ec2 runtime: SSM Run Command reaches its instances through the first three;
# each instance fetches its tier's certificates from the drill's secret store through secretsmanager, whose
# endpoint policy allows only reading drill runtime secrets (docs/runtime.md, docs/mtls.md "On AWS").
SSM_ENDPOINT_SERVICES = ("ssm", "ssmmessages", "ec2messages", "secretsmanager")


def ssm_endpoints_declared(boundary: Boundary) -> bool:
    """Whether ``drill_boundary.ssm_endpoints`` is true: the network gets (and the verifier accepts) the ec2
    runtime's interface endpoints (:data:`SSM_ENDPOINT_SERVICES`), a group for them and the ``validation`` tier's
    group (docs/runtime.md)."""
    return (boundary.raw or {}).get("ssm_endpoints") is True


def _check_read_only(s3_read: tuple, s3_write: tuple) -> None:
    """A write grant must not reach anything a read grant covers: backups stay read-only."""
    for w, wg in enumerate(s3_write):
        for r, rg in enumerate(s3_read):
            if wg.bucket == rg.bucket and (wg.prefix.startswith(rg.prefix) or rg.prefix.startswith(wg.prefix)):
                raise BoundaryError("drill_boundary.s3_write[%d]: s3://%s/%s overlaps drill_boundary.s3_read[%d] "
                                    "(s3://%s/%s), and backups must stay read-only; write to another bucket or "
                                    "a prefix the read grants do not cover"
                                    % (w, wg.bucket, wg.prefix, r, rg.bucket, rg.prefix))


# Where a sandbox CIDR is picked from when none is declared: /16s of RFC 1918 space.
_CANDIDATE_RANGES = (ipaddress.ip_network("10.64.0.0/10"), ipaddress.ip_network("172.16.0.0/12"))


def _candidates():
    for second in range(64, 256):
        yield ipaddress.ip_network("10.%d.0.0/16" % second)
    for second in range(16, 32):
        yield ipaddress.ip_network("172.%d.0.0/16" % second)


def _free_candidates(boundary: Boundary, avoid_nets=()) -> list:
    """The candidate /16s overlapping no production CIDR, declared peer, control-plane route or ``avoid_nets``."""
    # Never swallow the control plane or any declared peer.
    taken = list(boundary.production_cidrs) + [r.cidr for r in boundary.ingress + boundary.egress + boundary.fallback]
    if boundary.control_plane_route:
        taken.append(ipaddress.ip_network(boundary.control_plane_route["cidr"]))
    taken += [a for a in avoid_nets if a.version == 4]
    return [c for c in _candidates() if not any(c.overlaps(t) for t in taken)]


def pick_sandbox_cidr(boundary: Boundary, drill_id: str, avoid=()) -> ipaddress.IPv4Network:
    """A /16 for the drill that overlaps no production CIDR and nothing in ``avoid``.

    The choice is derived from ``drill_id``, so re-running a drill picks the same
    CIDR (idempotence) while different drills spread out.
    """
    if boundary.sandbox_cidr is not None:
        return boundary.sandbox_cidr
    try:
        avoid_nets = [ipaddress.ip_network(a, strict=False) for a in avoid]
    except ValueError as exc:
        raise BoundaryError("pick_sandbox_cidr: invalid CIDR to avoid: %s" % exc) from None
    free = _free_candidates(boundary, avoid_nets)
    if not free:
        raise BoundaryError("no free /16 left for the sandbox; declare drill_boundary.sandbox_cidr")
    digest = int.from_bytes(hashlib.sha256(drill_id.encode()).digest()[:4], "big")
    return free[digest % len(free)]
