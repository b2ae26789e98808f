# Copyright: drguard maintainers
# Apache License 2.0
"""The ``netns`` sandbox runtime: the embedded world, its listeners, build and teardown (docs/runtime.md).

- :func:`world_plan` / :func:`full_plan` are pure: from ``drill_boundary`` and the address
  plan they lay out the "wan" namespace behind the router's uplink, the neighbour
  namespaces (production bait, control plane, telemetry, fallback), the addresses each
  holds and every listener the runtime starts. No root, no ``ip`` call.
- :func:`up` / :func:`down` build and remove a drill's runtime through the namespace
  manager (``_netns``): namespaces, the router's nft table, one unprivileged listener
  process per namespace, the telemetry collector.

Every failure raises :class:`SandboxRuntimeError` (one sentence: what was wrong, what to do).
"""

from __future__ import annotations

import ipaddress

from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import NftPolicyError
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import address_plan

WAN_ADDRESS = "169.254.0.1"  # the wan end of every neighbour's veth; never a neighbour address
BAIT = ((5432, "db"), (443, "webhook"), (6514, "log-intake"))  # production bait listeners (TCP)
DNS_PORT = 53
UNDECLARED_FROM = 1025  # a tier's undeclared port: the lowest above 1024 not declared for it

# kind -> (namespace suffix, veth letter); the order is the order addresses are handed out.
NEIGHBOURS = (("production", "prod", "p"), ("control_plane", "cp", "c"), ("telemetry", "tel", "t"),
              ("fallback", "fb", "f"))
WAN = "wan"


class SandboxRuntimeError(Exception):
    """The runtime cannot be planned, built or removed; ``msg`` says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- the embedded world (pure)


def _kind(rule):
    return getattr(rule, "kind", "control_plane") or "control_plane"


def _fallback(boundary):
    return tuple(getattr(boundary, "fallback", ()) or ())


def _ends(ports):
    """First and last port of each declared range, once each, in declaration order."""
    out = []
    for p in ports:
        for port in (p.start, p.end):
            if port not in out:
                out.append(port)
    return out


def _cidrs(boundary, kind):
    """The CIDRs (with the rule that declares each, or None) a neighbour of ``kind`` must hold an address in."""
    if kind == "production":
        return [(c, None) for c in boundary.production_cidrs]
    if kind == "control_plane":
        return ([(r.cidr, None) for r in boundary.ingress]
                + [(r.cidr, r) for r in boundary.egress if _kind(r) == "control_plane"])
    if kind == "telemetry":
        return [(r.cidr, r) for r in boundary.egress if _kind(r) == "telemetry"]
    return [(r.cidr, r) for r in _fallback(boundary)]


def _pick(cidr, kind, mine, taken):
    """The neighbour's address in ``cidr``: one it already holds there, else the first free host."""
    for address in mine:
        if ipaddress.IPv4Address(address) in cidr:
            return address
    wan = ipaddress.IPv4Address(WAN_ADDRESS)
    for host in cidr.hosts():
        if host != wan and str(host) not in taken:
            return str(host)
    raise SandboxRuntimeError(
        f"drill_boundary: the {kind} CIDR {cidr} has no free host left for the embedded world's {kind} "
        f"neighbour (every host is already another neighbour's); declare a larger or separate CIDR.",
        kind=kind, cidr=str(cidr))


def undeclared_port(boundary, tier):
    """The lowest port above 1024 that neither an ingress rule nor a tier rule towards ``tier`` declares."""
    ranges = [p for r in boundary.ingress for p in r.ports]
    ranges += [p for t in boundary.tier_rules if t.dest == tier for p in t.ports]
    port = UNDECLARED_FROM
    while any(p.start <= port <= p.end for p in ranges):
        port = min(p.end for p in ranges if p.start <= port <= p.end) + 1
    if port > 65535:
        raise SandboxRuntimeError(f"drill_boundary: every port above 1024 is declared for tier {tier}, so no "
                                  "undeclared port is left to listen on; narrow the declared port ranges.",
                                  tier=tier)
    return port


def world_plan(boundary, plan):
    """The embedded world of ``plan`` (an :func:`address_plan`): ``plan["world"]``, pure.

    ``{"ns": "drg-<short>-wan", "neighbours": {kind: {"ns", "veth_host", "veth_peer", "addresses"}},
    "listeners": [{"kind", "name", "ns", "address", "protocol", "port"}], "telemetry": {"address",
    "port"} or None}``. A neighbour holds one address in every CIDR of its kind (the first host
    not already another neighbour's; a ``/32`` is its own address); a kind with no CIDR declared
    has no neighbour (``fallback`` only when ``drill_boundary.fallback`` is declared). Raises
    :class:`SandboxRuntimeError` when a CIDR has no free host or a tier's name is taken by the world.
    """
    prefix = plan["prefix"]
    reserved = {prefix + WAN} | {prefix + suffix for _, suffix, _ in NEIGHBOURS}
    for tier, spec in plan["tiers"].items():
        if spec["ns"] in reserved:
            raise SandboxRuntimeError(
                f"drill_boundary.tiers: {tier!r} is reserved for a namespace of the embedded world "
                f"({', '.join(sorted(n[len(prefix):] for n in reserved))}); rename that tier.", tier=tier)

    taken = {}  # address -> kind, unique across the world
    neighbours, at = {}, {}  # at[(kind, cidr)] -> the neighbour's address for that CIDR
    for kind, suffix, letter in NEIGHBOURS:
        mine = []
        for cidr, _rule in _cidrs(boundary, kind):
            address = _pick(cidr, kind, mine, taken)
            at[(kind, str(cidr))] = address
            if address not in mine:
                mine.append(address)
                taken[address] = kind
        if mine:
            neighbours[kind] = {"ns": prefix + suffix, "veth_host": f"{prefix}{letter}w",
                                "veth_peer": f"{prefix}{letter}n", "addresses": mine}

    listeners, seen = [], set()

    def listen(kind, name, ns, address, *, protocol, port):
        key = (ns, address, protocol, port)
        if key not in seen:
            seen.add(key)
            listeners.append({"kind": kind, "name": name, "ns": ns, "address": address, "protocol": protocol,
                              "port": port})

    prod = neighbours["production"]
    bait = list(BAIT)
    for port in ([p for r in boundary.egress for p in _ends(r.ports)]
                 + [p for t in boundary.tier_rules for p in _ends(t.ports)]):
        if port not in [b for b, _ in bait]:
            bait.append((port, "bait"))
    for address in prod["addresses"]:
        for port, name in bait:
            listen("production", name, prod["ns"], address, protocol="tcp", port=port)

    if "control_plane" in neighbours:
        cp = neighbours["control_plane"]
        for _cidr, rule in _cidrs(boundary, "control_plane"):
            if rule is not None:
                address = at[("control_plane", str(rule.cidr))]
                for port in _ends(rule.ports):
                    listen("control_plane", "control-plane", cp["ns"], address, protocol=rule.protocol, port=port)
        for address in cp["addresses"]:
            listen("control_plane", "dns", cp["ns"], address, protocol="udp", port=DNS_PORT)

    telemetry = None
    if "telemetry" in neighbours:
        tel = neighbours["telemetry"]
        rule = _cidrs(boundary, "telemetry")[0][1]
        address = at[("telemetry", str(rule.cidr))]
        telemetry = {"address": address, "port": rule.ports[0].start}
        listen("telemetry", "collector", tel["ns"], address, protocol=rule.protocol, port=telemetry["port"])
        for port in _ends(rule.ports):
            listen("telemetry", "telemetry", tel["ns"], address, protocol=rule.protocol, port=port)

    if "fallback" in neighbours:
        fb = neighbours["fallback"]
        for _cidr, rule in _cidrs(boundary, "fallback"):
            for port in _ends(rule.ports):
                listen("fallback", "fallback", fb["ns"], at[("fallback", str(rule.cidr))],
                       protocol=rule.protocol, port=port)

    for tier, spec in plan["tiers"].items():
        ports = [(p, r.protocol) for r in boundary.ingress for p in _ends(r.ports)]
        ports += [(p, t.protocol) for t in boundary.tier_rules if t.dest == tier for p in _ends(t.ports)]
        ports.append((undeclared_port(boundary, tier), "tcp"))
        for port, protocol in ports:
            listen("tier", tier, spec["ns"], spec["address"], protocol=protocol, port=port)

    return {"ns": prefix + WAN, "neighbours": neighbours, "listeners": listeners, "telemetry": telemetry}


def full_plan(boundary, drill_id):
    """:func:`address_plan` plus ``world`` (:func:`world_plan`): what ``_netns.create`` builds and the probes use."""
    try:
        plan = address_plan(boundary, drill_id)
    except NftPolicyError as exc:
        raise SandboxRuntimeError(str(exc).rstrip(".") + ".") from None
    plan["world"] = world_plan(boundary, plan)
    return plan
