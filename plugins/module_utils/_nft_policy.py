# Copyright: drguard maintainers
# Apache License 2.0
"""nftables for the ``netns`` runtime, translated from ``drill_boundary`` (docs/runtime.md).

Three pure functions, no root, no ``nft`` call:

- :func:`address_plan` gives every tier (``drill_boundary.tiers`` plus ``validation``) a
  ``/28`` of the sandbox CIDR, the router's and the tier's address in it, and the names of
  the namespaces, veth ends and table, all ``drg-<short>-...``.
- :func:`router_ruleset` writes the ``nft -f`` text of the one table the drill owns in the
  router namespace. Every rule lives there, in the router: a tier namespace holds no
  table, so a process inside a tier (even root inside it) cannot loosen its own rules.
  This is also why there is no per-tier ruleset function.
- :func:`verify_ruleset` judges a live ``nft -j list ruleset`` (read back from the router
  namespace) against the same :class:`Boundary`: it reads what each accept allows, never
  compares text with what :func:`router_ruleset` produced.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json

from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import Boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import PortRange
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import Rule
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import pick_sandbox_cidr

VALIDATION_TIER = "validation"
ROUTER = "router"
TIER_PREFIXLEN = 28
IFNAMSIZ = 15  # usable characters of a Linux interface name
MAX_LINKS = 1000  # "drg-" + 6 + "-" + up to 3 digits + "r" fits IFNAMSIZ
DNS_PORT = 53
CHAINS = ("forward", "input", "output")

# One named counter per rule class, in the table the drill owns.
COUNTERS = ("production_drop", "ipv6_drop", "established_allow", "dns_drop", "egress_allow",
            "ingress_allow", "tier_allow", "fallback_allow", "s3_allow", "default_drop")

# The S3 endpoint of the embedded world (drill_boundary.s3_read / s3_write): the netns stand-in for the
# VPC's S3 gateway endpoint, one address of the benchmarking range (RFC 2544, never routed on the
# internet) on TCP 443, the port the AWS security groups open towards the S3 prefix list.
S3_ENDPOINT_RANGE = "198.18.0.0/15"
S3_ENDPOINT_PORT = 443

# Every code verify_ruleset() can emit. docs/runtime.md explains each one.
FINDING_CODES = (
    "runtime_unreadable", "runtime_table_missing", "runtime_table_unexpected", "runtime_chain_missing",
    "runtime_chain_unexpected", "runtime_policy_not_drop", "runtime_production_not_dropped_first",
    "runtime_ipv6_not_dropped", "runtime_dns_not_dropped", "runtime_rule_undeclared",
    "runtime_rule_unsupported", "runtime_rule_missing", "runtime_counter_missing", "runtime_fallback_blocked",
)

_ANY4 = ipaddress.ip_network("0.0.0.0/0")
_ALL_PORTS = ((1, 65535),)
_ESTABLISHED = frozenset({"established", "related"})


class NftPolicyError(ValueError):
    """The boundary cannot be laid out as a netns runtime; the message says what to change."""


# --- the address plan ---------------------------------------------------------------

def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def drill_prefix(drill_id: str) -> str:
    """``drg-<short>-``: the prefix of every namespace, device and table of the drill's runtime."""
    return "drg-%s-" % _hex(drill_id, 6)


def address_plan(boundary: Boundary, drill_id: str) -> dict:
    """The deterministic addressing and naming of a drill's netns runtime.

    ``boundary`` is the parsed policy (``boundary.parse_boundary``). The sandbox CIDR is
    ``boundary.sandbox_cidr`` or the one ``pick_sandbox_cidr`` derives from ``drill_id``.
    Tier *i* (declared tiers in order, then ``validation``) gets the *i*-th ``/28``: its
    first host is the router's end (the tier's ``gateway``), its second the tier's
    ``address``. The last ``/28`` is the router's uplink. Every name starts with
    ``drg-<short>-`` (``short``: 6 hex of the drill id's SHA-256, so two drills never share
    a device name) and uses ``[a-z0-9-]`` only; device names are at most 15 characters
    (veth ends ``drg-<short>-<i>r`` in the router, ``drg-<short>-<i>t`` in the tier).
    This is the plan shape ``_netns.create`` takes (``router.ns``, ``tiers.<tier>``).
    Raises :class:`NftPolicyError` when the tiers do not fit.
    """
    if not isinstance(drill_id, str) or not drill_id:
        raise NftPolicyError("address_plan: give the drill id (a non-empty string)")
    if ROUTER in boundary.tiers:
        raise NftPolicyError("drill_boundary.tiers: %r is reserved for the router namespace; "
                             "rename that tier" % ROUTER)
    try:
        sandbox = pick_sandbox_cidr(boundary, drill_id)
    except BoundaryError as exc:
        raise NftPolicyError(str(exc)) from None
    tiers = tuple(boundary.tiers) + (() if VALIDATION_TIER in boundary.tiers else (VALIDATION_TIER,))
    blocks = list(sandbox.subnets(new_prefix=TIER_PREFIXLEN))
    if len(tiers) + 1 > min(len(blocks), MAX_LINKS):
        raise NftPolicyError("drill_boundary.sandbox_cidr: %s holds %d /%d blocks, %d are needed "
                             "(one per tier, validation and the uplink); use a larger sandbox CIDR or "
                             "fewer tiers" % (sandbox, len(blocks), TIER_PREFIXLEN, len(tiers) + 1))
    prefix = drill_prefix(drill_id)
    short = prefix[len("drg-"):-1]
    out_tiers = {}
    for i, tier in enumerate(tiers):
        hosts = list(blocks[i].hosts())
        out_tiers[tier] = {"ns": prefix + tier, "veth_host": "%s%dr" % (prefix, i),
                           "veth_peer": "%s%dt" % (prefix, i), "subnet": str(blocks[i]),
                           "address": str(hosts[1]), "gateway": str(hosts[0])}
    up = list(blocks[-1].hosts())
    s3 = s3_endpoint(boundary, sandbox)
    return {
        "drill_id": drill_id,
        "short": short,
        "prefix": prefix,
        "sandbox_cidr": str(sandbox),
        "table": prefix + ROUTER,
        "router": {"ns": prefix + ROUTER},
        "tiers": out_tiers,
        # The router's way out (control plane, telemetry): router end and host end.
        "uplink": {"veth_host": prefix + "ur", "veth_peer": prefix + "ut", "subnet": str(blocks[-1]),
                   "address": str(up[1]), "gateway": str(up[0])},
        # The world's S3 endpoint, only when drill_boundary grants S3 (s3_read / s3_write).
        "s3_endpoint": s3,
    }


def s3_declared(boundary: Boundary) -> bool:
    """Whether ``drill_boundary`` grants S3 (``s3_read`` or ``s3_write``): the tiers then reach the S3 endpoint."""
    return bool(boundary.s3_read or boundary.s3_write)


def s3_endpoint(boundary: Boundary, sandbox) -> dict | None:
    """``{"address", "port"}`` of the world's S3 endpoint, or ``None`` when no S3 is granted.

    The address is the first host of :data:`S3_ENDPOINT_RANGE` that lies in no production,
    sandbox, egress, ingress or fallback CIDR (so no other rule ever covers it); the port is
    :data:`S3_ENDPOINT_PORT`. Raises :class:`NftPolicyError` when the declared CIDRs cover the
    whole range.
    """
    if not s3_declared(boundary):
        return None
    taken = [ipaddress.ip_network(sandbox)] + list(boundary.production_cidrs) + [
        r.cidr for r in tuple(boundary.egress) + tuple(boundary.ingress) + tuple(boundary.fallback)]
    for net in ipaddress.ip_network(S3_ENDPOINT_RANGE).subnets(new_prefix=24):
        if any(net.overlaps(t) for t in taken):
            continue
        return {"address": str(next(net.hosts())), "port": S3_ENDPOINT_PORT}
    raise NftPolicyError("drill_boundary: the declared CIDRs cover all of %s, where the embedded world's S3 "
                         "endpoint lives; declare narrower CIDRs" % S3_ENDPOINT_RANGE)


# --- the ruleset ----------------------------------------------------------------------

def _addrs(nets) -> str:
    items = [str(n) if n.prefixlen < 32 else str(n.network_address) for n in nets]
    return items[0] if len(items) == 1 else "{ %s }" % ", ".join(items)


def _ports(ports) -> str:
    items = [str(p) for p in ports]
    return items[0] if len(items) == 1 else "{ %s }" % ", ".join(items)


def _names(names) -> str:
    quoted = ['"%s"' % n for n in names]
    return quoted[0] if len(quoted) == 1 else "{ %s }" % ", ".join(quoted)


def _tier(plan: dict, name: str) -> dict:
    if name in plan["tiers"]:
        return plan["tiers"][name]
    raise NftPolicyError("address plan has no tier %r; build the plan from the same boundary" % name)


def _fallback_rules(boundary: Boundary) -> tuple:
    """The declared fallback paths (``drill_boundary.fallback``), egress-shaped ``boundary.Rule`` objects.

    :func:`router_ruleset` lets them out from every tier under ``fallback_allow``;
    :func:`verify_ruleset` accepts them as declared and reports one the live rules do not
    let through as ``runtime_fallback_blocked``.
    """
    return tuple(boundary.fallback)


def _s3_rule(plan: dict):
    """The S3 endpoint of ``plan`` (:func:`s3_endpoint`) as an egress-shaped ``boundary.Rule``, or ``None``.

    Every tier reaches it, as every tier's security group reaches the S3 prefix list on AWS
    (``_network_build.desired_sg_rules``).
    """
    s3 = plan.get("s3_endpoint")
    if not s3:
        return None
    return Rule(ipaddress.ip_network(s3["address"] + "/32"), "tcp", (PortRange(s3["port"], s3["port"]),),
                kind="s3", description="drguard S3 endpoint")


def router_ruleset(boundary: Boundary, plan: dict, table_name: str) -> str:
    """The ``nft -f`` text of the drill's table in the router namespace (nftables 1.0.6).

    Order in every chain: production CIDRs dropped in both directions
    (``production_drop``), IPv6 dropped (``ipv6_drop``), then in ``forward`` only:
    established/related accepted, DNS to outside the sandbox dropped, declared egress,
    ingress, tier rules and fallback paths accepted, the rest dropped (``default_drop``)
    under a ``policy drop``. The text starts by deleting the table it defines, so one
    ``nft -f`` replaces it atomically and touches nothing else.
    """
    sandbox = ipaddress.ip_network(plan["sandbox_cidr"])
    prod = _addrs(boundary.production_cidrs)
    tier_devs = [t["veth_host"] for t in plan["tiers"].values()]
    uplink = plan["uplink"]["veth_host"]

    def allow(iif, src, dst, rule, counter):
        return ('iifname %s ip saddr %s ip daddr %s %s dport %s counter name "%s" accept'
                % (_names(iif), src, dst, rule.protocol, _ports(rule.ports), counter))

    head = [
        "ip daddr %s counter name \"production_drop\" drop" % prod,
        "ip saddr %s counter name \"production_drop\" drop" % prod,
        "meta nfproto ipv6 counter name \"ipv6_drop\" drop",
    ]
    forward = head + [
        "ct state established,related counter name \"established_allow\" accept",
        "ip daddr != %s meta l4proto { tcp, udp } th dport %d counter name \"dns_drop\" drop"
        % (sandbox, DNS_PORT),
    ]
    forward += [allow(tier_devs, sandbox, _addrs([r.cidr]), r, "egress_allow") for r in boundary.egress]
    forward += [allow([uplink], _addrs([r.cidr]), sandbox, r, "ingress_allow") for r in boundary.ingress]
    for tr in boundary.tier_rules:
        src, dst = _tier(plan, tr.source), _tier(plan, tr.dest)
        forward.append(allow([src["veth_host"]], src["subnet"], dst["subnet"], tr, "tier_allow"))
    forward += [allow(tier_devs, sandbox, _addrs([r.cidr]), r, "fallback_allow")
                for r in _fallback_rules(boundary)]
    s3 = _s3_rule(plan)
    if s3 is not None:
        forward.append(allow(tier_devs, sandbox, _addrs([s3.cidr]), s3, "s3_allow"))
    tail = ["counter name \"default_drop\" drop"]

    lines = ["table inet %s" % table_name, "delete table inet %s" % table_name,
             "table inet %s {" % table_name]
    for name in COUNTERS:
        lines += ["\tcounter %s {" % name, "\t\tpackets 0 bytes 0", "\t}"]
    for chain, rules in (("forward", forward + tail), ("input", head + tail), ("output", head + tail)):
        lines += ["\tchain %s {" % chain,
                  "\t\ttype filter hook %s priority 0; policy drop;" % chain]
        lines += ["\t\t" + r for r in rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- the verifier ----------------------------------------------------------------------

class _Unreadable(Exception):
    pass


def _finding(code: str, resource: str, detail: str) -> dict:
    return {"code": code, "resource": resource, "detail": detail}


def _nets(value) -> list:
    """IPv4 networks an nft JSON address value stands for."""
    if isinstance(value, str):
        return [ipaddress.ip_network(value, strict=False)]
    if isinstance(value, dict) and "prefix" in value:
        p = value["prefix"]
        return [ipaddress.ip_network("%s/%s" % (p["addr"], p["len"]), strict=False)]
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(a) for a in value["range"])
        return list(ipaddress.summarize_address_range(lo, hi))
    if isinstance(value, dict) and "set" in value and isinstance(value["set"], list):
        return [n for v in value["set"] for n in _nets(v)]
    raise _Unreadable("address %r" % (value,))


def _port_ranges(value) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        return [(value, value)]
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        if isinstance(lo, int) and isinstance(hi, int):
            return [(lo, hi)]
    if isinstance(value, dict) and "set" in value and isinstance(value["set"], list):
        return [r for v in value["set"] for r in _port_ranges(v)]
    raise _Unreadable("port %r" % (value,))


def _words(value) -> set:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    if isinstance(value, dict) and isinstance(value.get("set"), list):
        return {w for v in value["set"] for w in _words(v)}
    raise _Unreadable("value %r" % (value,))


class _Rule:
    """What one live rule matches and does, read from its ``expr`` list.

    ``None`` for a dimension means "not restricted". A negated match restricts nothing
    we can prove, so it reads as unrestricted (an accept is judged as allowing more).
    ``narrowed`` is true when a match we do not model narrows the rule (harmless for an
    accept, but a drop so narrowed cannot be counted as dropping everything it names).
    """

    def __init__(self, expr):
        if not isinstance(expr, list):
            raise _Unreadable("rule expr is not a list")
        self.saddr = self.daddr = self.protos = self.dports = self.sports = None
        self.ct = None
        self.families = None  # None: both; else {"ipv4"} / {"ipv6"}
        self.not_daddr = None  # "ip daddr != X" on a drop: everything outside X
        self.narrowed = False
        self.verdict = None
        self.counter = None
        self.unsupported = []
        for item in expr:
            if not isinstance(item, dict) or len(item) != 1:
                raise _Unreadable("expression %r" % (item,))
            (kind, body), = item.items()
            if kind == "match":
                self._match(body)
            elif kind == "counter":
                self.counter = body if isinstance(body, str) else None
            elif kind in ("accept", "drop"):
                self.verdict = kind
            elif kind == "reject":
                self.verdict = "drop"
            elif kind in ("log", "limit", "comment"):
                pass
            else:  # jump, goto, vmap, queue, nat, mangle, set, ...: not judged, not trusted
                self.unsupported.append(kind)

    def _match(self, body):
        if not isinstance(body, dict) or not {"op", "left", "right"} <= set(body):
            raise _Unreadable("match %r" % (body,))
        op, left, right = body["op"], body["left"], body["right"]
        if op not in ("==", "!=", "in"):
            raise _Unreadable("match operator %r" % (op,))
        if not isinstance(left, dict) or len(left) != 1:
            raise _Unreadable("match left %r" % (left,))
        (lkind, lbody), = left.items()
        negated = op == "!="
        if lkind == "payload" and isinstance(lbody, dict) and "field" in lbody:
            proto, fld = lbody.get("protocol"), lbody["field"]
            if proto == "ip" and fld in ("saddr", "daddr"):
                self._family({"ipv4"})
                nets = _nets(right)
                if negated:
                    if fld == "daddr":
                        self.not_daddr = nets
                    self.narrowed = True
                else:
                    setattr(self, fld, nets)
                return
            if proto == "ip6":
                self._family({"ipv6"})
                self.narrowed = True
                return
            if proto in ("tcp", "udp", "th") and fld in ("dport", "sport"):
                if proto != "th":
                    self._protos({proto})
                if negated:
                    self.narrowed = True
                else:
                    setattr(self, fld + "s", _port_ranges(right))
                return
        if lkind == "meta" and isinstance(lbody, dict):
            key = lbody.get("key")
            if key == "nfproto":
                if not negated:
                    self._family(_words(right))
                else:
                    self.narrowed = True
                return
            if key == "l4proto":
                if not negated:
                    self._protos(_words(right))
                else:
                    self.narrowed = True
                return
            if key in ("iifname", "oifname", "iif", "oif"):
                self.narrowed = True  # interface matches only narrow (anti-spoofing)
                return
        if lkind == "ct" and isinstance(lbody, dict) and lbody.get("key") == "state" and "dir" not in lbody:
            if not negated:
                self.ct = _words(right)
            else:
                self.narrowed = True
            return
        self.narrowed = True  # a match we do not model: it can only narrow

    def _family(self, fams):
        self.families = set(fams) if self.families is None else self.families & set(fams)

    def _protos(self, protos):
        self.protos = set(protos) if self.protos is None else self.protos & set(protos)

    @property
    def established_only(self) -> bool:
        return self.ct is not None and self.ct <= _ESTABLISHED

    @property
    def ipv4_only(self) -> bool:
        return self.families is not None and "ipv6" not in self.families

    def drops_all(self, field: str, nets) -> bool:
        """A drop of every packet whose ``field`` is in ``nets``, whatever else it carries."""
        mine = getattr(self, field)
        others = [getattr(self, f) for f in ("saddr", "daddr") if f != field]
        return (self.verdict == "drop" and not self.unsupported and not self.narrowed
                and mine is not None and all(o is None for o in others)
                and self.protos is None and self.dports is None and self.sports is None
                and self.ct is None
                and all(any(n.subnet_of(m) for m in mine) for n in nets))

    def touches(self, nets) -> bool:
        """Could this rule match a packet to or from ``nets``?"""
        return any(fld is None or any(n.overlaps(m) for n in nets for m in fld)
                   for fld in (self.saddr, self.daddr))


def _covered(ranges, declared) -> bool:
    return all(any(p.covers(lo, hi) for p in declared) for lo, hi in ranges)


def _parse(live_json):
    if isinstance(live_json, list):  # the bare item list (``_netns.read_ruleset``), never from text
        live_json = {"nftables": live_json}
    elif isinstance(live_json, (str, bytes)):
        try:
            live_json = json.loads(live_json)
        except ValueError as exc:
            raise _Unreadable("not JSON (%s)" % exc) from None
    if not isinstance(live_json, dict) or not isinstance(live_json.get("nftables"), list):
        raise _Unreadable("no top-level 'nftables' list")
    items = []
    for item in live_json["nftables"]:
        if not isinstance(item, dict) or len(item) != 1:
            raise _Unreadable("ruleset item %r" % (item,))
        (kind, body), = item.items()
        if not isinstance(body, dict):
            raise _Unreadable("%s is not an object" % kind)
        items.append((kind, body))
    return items


def verify_ruleset(boundary: Boundary, plan: dict, live_json) -> list:
    """Findings ``{code, resource, detail}`` for the live router ruleset (empty: compliant).

    ``live_json`` is ``nft -j list ruleset`` of the router namespace, as text, parsed, or
    the bare list of its items.
    Anything unparseable is ``runtime_unreadable`` (fail closed). The table named
    ``plan["table"]`` (family ``inet``) must hold base chains forward/input/output with
    ``policy drop``; in each, every accept that could touch production must come after
    drops of all production CIDRs in both directions, IPv6 must be dropped before any
    accept that is not IPv4-only, and each accept must be within a declared flow
    (egress, ingress, a tier rule, a fallback path) or accept only established/related
    traffic. Each declared flow must be allowed by some live accept.
    """
    table = plan["table"]
    try:
        items = _parse(live_json)
        return _verify(boundary, plan, table, items)
    except _Unreadable as exc:
        return [_finding("runtime_unreadable", "inet %s" % table,
                         "the live nft ruleset could not be read: %s; the runtime counts as not isolated "
                         "(re-read it with 'nft -j list ruleset' in the router namespace)" % exc)]
    except (KeyError, TypeError, ValueError) as exc:
        return [_finding("runtime_unreadable", "inet %s" % table,
                         "the live nft ruleset has an unexpected shape (%s: %s); the runtime counts as "
                         "not isolated" % (type(exc).__name__, exc))]


def _flows(boundary: Boundary, plan: dict) -> list:
    """Declared (class, description, src nets, dst nets, protocol, port ranges)."""
    sandbox = [ipaddress.ip_network(plan["sandbox_cidr"])]
    subnet = {name: [ipaddress.ip_network(t["subnet"])] for name, t in plan["tiers"].items()}
    flows = []
    for r in boundary.egress:
        flows.append(("egress_allow", "egress to %s %s/%s" % (r.cidr, r.protocol, ",".join(map(str, r.ports))),
                      sandbox, [r.cidr], r.protocol, r.ports))
    for r in boundary.ingress:
        flows.append(("ingress_allow", "ingress from %s %s/%s" % (r.cidr, r.protocol, ",".join(map(str, r.ports))),
                      [r.cidr], sandbox, r.protocol, r.ports))
    for t in boundary.tier_rules:
        flows.append(("tier_allow", "tier %s -> %s %s/%s" % (t.source, t.dest, t.protocol, ",".join(map(str, t.ports))),
                      subnet[t.source], subnet[t.dest], t.protocol, t.ports))
    for i, r in enumerate(_fallback_rules(boundary)):
        flows.append(("fallback_allow", "fallback to %s %s/%s (drill_boundary.fallback[%d])"
                      % (r.cidr, r.protocol, ",".join(map(str, r.ports)), i), sandbox, [r.cidr], r.protocol, r.ports))
    # The S3 endpoint only when the boundary grants S3: the address comes from the same boundary, so a plan
    # that carries an endpoint the boundary does not declare gets no flow (its accept is undeclared).
    s3 = _s3_rule(plan) if s3_declared(boundary) else None
    if s3 is not None and plan.get("s3_endpoint") == s3_endpoint(boundary, plan["sandbox_cidr"]):
        flows.append(("s3_allow", "S3 endpoint %s tcp/%s (drill_boundary.s3_read / s3_write)"
                      % (s3.cidr.network_address, s3.ports[0]), sandbox, [s3.cidr], "tcp", s3.ports))
    return flows


def _within(rule: _Rule, flow) -> bool:
    """Everything ``rule`` accepts is inside the declared ``flow`` (other matches only narrow)."""
    _kind, _text, src, dst, proto, ports = flow
    return (rule.saddr is not None and rule.daddr is not None and rule.ipv4_only
            and all(any(n.subnet_of(s) for s in src) for n in rule.saddr)
            and all(any(n.subnet_of(d) for d in dst) for n in rule.daddr)
            and rule.protos == {proto} and rule.dports is not None and _covered(rule.dports, ports))


def _allows(rule: _Rule, flow) -> bool:
    """``rule`` accepts all of the declared ``flow`` (interface matches aside)."""
    _kind, _text, src, dst, proto, ports = flow
    return (rule.verdict == "accept" and not rule.unsupported and (rule.ct is None or "new" in rule.ct)
            and (rule.families is None or "ipv4" in rule.families)
            and (rule.saddr is None or all(any(s.subnet_of(n) for n in rule.saddr) for s in src))
            and (rule.daddr is None or all(any(d.subnet_of(n) for n in rule.daddr) for d in dst))
            and (rule.protos is None or proto in rule.protos)
            and rule.sports is None
            and (rule.dports is None or all(any(lo <= p.start and p.end <= hi for lo, hi in rule.dports)
                                            for p in ports)))


def _may_drop(rule: _Rule, flow) -> bool:
    """``rule`` is a drop that could match a packet of ``flow`` (a narrowing match we do not model still could)."""
    _kind, _text, src, dst, proto, ports = flow
    return (rule.verdict == "drop" and not rule.unsupported
            and (rule.families is None or "ipv4" in rule.families)
            and (rule.ct is None or "new" in rule.ct)
            and (rule.saddr is None or any(n.overlaps(s) for n in rule.saddr for s in src))
            and (rule.daddr is None or any(n.overlaps(d) for n in rule.daddr for d in dst))
            and (rule.not_daddr is None or not all(any(d.subnet_of(n) for n in rule.not_daddr) for d in dst))
            and (rule.protos is None or proto in rule.protos)
            and (rule.dports is None or any(lo <= p.end and p.start <= hi for lo, hi in rule.dports for p in ports)))


def _fallback_blocked(rules: list, flow) -> str | None:
    """Why the forward chain does not let all of a declared fallback ``flow`` through (None: it does).

    Each declared port range is walked through the rules in order, as the kernel does: an
    accept of all of it lets it through; a drop that could match it first blocks it.
    """
    judged = [r for r in rules if not r.unsupported]  # unsupported rules are findings of their own
    for port in flow[5]:
        one = flow[:5] + ((port,),)
        for i, rule in enumerate(rules):
            if rule.unsupported:
                continue
            if _allows(rule, one):
                break
            if _may_drop(rule, one):
                if any(_allows(r, one) for r in judged[judged.index(rule) + 1:]):
                    return "is dropped by rule %d of chain forward before any rule accepts it" % (i + 1)
                return "is not allowed by any live rule"
        else:
            return "is not allowed by any live rule"
    return None


def _dns_dropped(rule: _Rule, sandbox) -> bool:
    """A drop of TCP and UDP port 53 to everything outside the sandbox."""
    return (rule.verdict == "drop" and not rule.unsupported and rule.saddr is None and rule.daddr is None
            and rule.ct is None and rule.sports is None
            and (rule.protos is None or {"tcp", "udp"} <= rule.protos)
            and rule.dports is not None and any(lo <= DNS_PORT <= hi for lo, hi in rule.dports)
            and (rule.not_daddr is None or all(n.subnet_of(sandbox) for n in rule.not_daddr)))


def _verify(boundary: Boundary, plan: dict, table: str, items) -> list:
    findings = []
    res = "inet %s" % table
    tables = [(b.get("family"), b.get("name")) for k, b in items if k == "table"]
    for fam, name in tables:
        if (fam, name) != ("inet", table):
            findings.append(_finding("runtime_table_unexpected", "%s %s" % (fam, name),
                                     "the router namespace holds a table the drill does not own; remove it "
                                     "(only inet %s may filter the drill's traffic)" % table))
    if ("inet", table) not in tables:
        return findings + [_finding("runtime_table_missing", res,
                                    "the drill's table is not in the router namespace; apply the ruleset again")]

    def mine(b):
        return b.get("family") == "inet" and b.get("table") == table

    chains = {b["name"]: b for k, b in items if k == "chain" and mine(b)}
    counters = {b["name"] for k, b in items if k == "counter" and mine(b)}
    rules = {}
    for k, b in items:
        if k == "rule" and mine(b):
            rules.setdefault(b["chain"], []).append(_Rule(b["expr"]))

    s3_flow = any(f[0] == "s3_allow" for f in _flows(boundary, plan))
    for name in COUNTERS:
        if name == "s3_allow" and not s3_flow:
            continue  # a runtime without S3 has no rule to count with it (and tables made before it lack it)
        if name not in counters:
            findings.append(_finding("runtime_counter_missing", "%s counter %s" % (res, name),
                                     "the named counter %s is missing; apply the ruleset again" % name))
    for name, chain in sorted(chains.items()):
        if name not in CHAINS or chain.get("hook") != name:
            findings.append(_finding("runtime_chain_unexpected", "%s chain %s" % (res, name),
                                     "chain %s (hook %s) is not one the policy defines; remove it"
                                     % (name, chain.get("hook"))))

    sandbox = ipaddress.ip_network(plan["sandbox_cidr"])
    flows = _flows(boundary, plan)
    prod = list(boundary.production_cidrs)
    for name in CHAINS:
        where = "%s chain %s" % (res, name)
        chain = chains.get(name)
        if chain is None or chain.get("hook") != name or chain.get("type") != "filter":
            findings.append(_finding("runtime_chain_missing", where,
                                     "the base chain %s (type filter, hook %s) is missing; apply the ruleset "
                                     "again" % (name, name)))
            continue
        if chain.get("policy") != "drop":
            findings.append(_finding("runtime_policy_not_drop", where,
                                     "chain policy is %r, not drop: traffic no rule names is let through; "
                                     "apply the ruleset again" % chain.get("policy")))
        findings += _judge_chain(name, where, rules.get(name, []), prod=prod, sandbox=sandbox, flows=flows)
    return findings


def _judge_chain(name, where, rules, *, prod, sandbox, flows) -> list:
    findings = []
    dropped = {"daddr": False, "saddr": False}
    ipv6_dropped = dns_dropped = False
    reported = set()
    for i, rule in enumerate(rules):
        at = "%s rule %d" % (where, i + 1)
        if rule.unsupported:
            findings.append(_finding("runtime_rule_unsupported", at,
                                     "the rule uses %s, which the verifier cannot judge; remove it"
                                     % ", ".join(rule.unsupported)))
            continue
        for fld, done in dropped.items():
            dropped[fld] = done or rule.drops_all(fld, prod)
        if (rule.verdict == "drop" and rule.families == {"ipv6"} and not rule.narrowed
                and rule.saddr is None and rule.daddr is None and rule.protos is None
                and rule.dports is None and rule.ct is None):
            ipv6_dropped = True
        if _dns_dropped(rule, sandbox):
            dns_dropped = True
        if rule.verdict != "accept":
            continue
        if not all(dropped.values()) and rule.touches(prod) and "prod" not in reported:
            reported.add("prod")
            findings.append(_finding("runtime_production_not_dropped_first", at,
                                     "an accept that can match production traffic comes before production "
                                     "(%s) is dropped in both directions; production drops must come first"
                                     % ", ".join(map(str, prod))))
        if not rule.ipv4_only and not ipv6_dropped and "ipv6" not in reported:
            reported.add("ipv6")
            findings.append(_finding("runtime_ipv6_not_dropped", at,
                                     "an accept that can match IPv6 comes before IPv6 is dropped; drop "
                                     "'meta nfproto ipv6' first"))
        if rule.established_only:
            continue
        if (not dns_dropped and rule.dports is not None and any(lo <= DNS_PORT <= hi for lo, hi in rule.dports)
                and (rule.daddr is None or any(not n.subnet_of(sandbox) for n in rule.daddr))
                and "dns" not in reported):
            reported.add("dns")
            findings.append(_finding("runtime_dns_not_dropped", at,
                                     "an accept lets DNS (port 53) leave the sandbox before DNS to outside is "
                                     "dropped; drop it first"))
        if name != "forward" or not any(_within(rule, f) for f in flows):
            findings.append(_finding("runtime_rule_undeclared", at,
                                     "an accept (%s) allows traffic no declared egress, ingress, tier rule or "
                                     "fallback path allows; remove it" % _describe(rule)))
    if "ipv6" not in reported and not ipv6_dropped:
        findings.append(_finding("runtime_ipv6_not_dropped", where,
                                 "no rule drops IPv6 ('meta nfproto ipv6 drop'); apply the ruleset again"))
    if not all(dropped.values()) and "prod" not in reported:
        findings.append(_finding("runtime_rule_missing", where,
                                 "production (%s) is not dropped explicitly in both directions; apply the "
                                 "ruleset again" % ", ".join(map(str, prod))))
    if name == "forward":
        accepts = [r for r in rules if r.verdict == "accept" and not r.unsupported]
        if not any(r.established_only for r in accepts):
            findings.append(_finding("runtime_rule_missing", where,
                                     "no rule accepts established/related traffic; replies to declared "
                                     "flows are dropped; apply the ruleset again"))
        for flow in flows:
            if flow[0] == "fallback_allow":
                why = _fallback_blocked(rules, flow)
                if why:
                    findings.append(_finding("runtime_fallback_blocked", where,
                                             "the declared %s %s: the failover path is blocked; apply the "
                                             "ruleset again" % (flow[1], why)))
                continue
            if not any(_allows(r, flow) for r in accepts):
                findings.append(_finding("runtime_rule_missing", where,
                                         "the declared %s is not allowed by any live rule; apply the ruleset "
                                         "again" % flow[1]))
    return findings


def _describe(rule: _Rule) -> str:
    def nets(v):
        return "any" if v is None else ",".join(map(str, v))

    def ports(v):
        return "any" if v is None else ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in v)
    return "from %s to %s proto %s dport %s" % (nets(rule.saddr), nets(rule.daddr),
                                                "any" if rule.protos is None else ",".join(sorted(rule.protos)),
                                                ports(rule.dports))
