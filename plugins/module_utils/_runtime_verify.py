# Copyright: drguard maintainers
# Apache License 2.0
"""Read the live ``netns`` runtime back and judge it against ``drill_boundary`` (docs/runtime.md).

:func:`read_live` reads what exists under the drill's prefix (namespaces, links, addresses,
routes, forwarding), the router's nft ruleset, every tier's own ruleset and IPv6 settings;
:func:`compare` (pure) judges that snapshot against the boundary and its plan; :func:`verify`
does both. Findings are ``{code, resource, detail}`` like ``boundary_verify``'s; the router
ruleset is judged by ``_nft_policy.verify_ruleset``. Anything that cannot be read is a
``runtime_unreadable`` finding: the runtime then counts as not isolated (fail closed).
"""

from __future__ import annotations


from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import FINDING_CODES as RULESET_CODES
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import verify_ruleset

WAN_LINK_ADDRESS = "169.254.0.1/32"  # the wan end of every neighbour's veth

# The codes compare() adds to the ruleset verifier's (docs/runtime.md explains each).
STATE_CODES = (
    "runtime_namespace_missing", "runtime_namespace_unexpected", "runtime_link_missing",
    "runtime_link_unexpected", "runtime_address_mismatch", "runtime_route_missing", "runtime_route_unexpected",
    "runtime_tier_forwarding", "runtime_tier_ruleset", "runtime_ipv6_enabled", "runtime_host_link",
    "runtime_tier_process_privileged",
)
FINDING_CODES = RULESET_CODES + STATE_CODES

_IPV6_SCRIPT = ("if [ -d /proc/sys/net/ipv6 ]; then grep -H . /proc/sys/net/ipv6/conf/*/disable_ipv6; "
                "else echo absent; fi")


def _finding(code, resource, detail):
    return {"code": code, "resource": resource, "detail": detail}


def _tool(name):
    path = _netns.which(name)
    if path is None:
        raise _netns.NetnsError(f"{name} not found on PATH; install it and retry.")
    return path


def _read_ipv6(ns):
    """``{"sysctl": {conf: value}, "addresses": [...]}`` of ``ns``; ``sysctl`` None when the kernel has no IPv6."""
    proc = _netns.run_in(ns, [_tool("sh"), "-c", _IPV6_SCRIPT], privileged=True, timeout=15, env={})
    if proc.returncode != 0:
        raise _netns.NetnsError(f"the IPv6 settings of {ns} could not be read (exit {proc.returncode}).")
    sysctl = None
    if proc.stdout.strip() != "absent":
        sysctl = {}
        for line in proc.stdout.splitlines():
            path, _sep, value = line.rpartition(":")
            sysctl[path.split("/")[-2]] = value.strip()
    addr = _netns.run_in(ns, [_tool("ip"), "-6", "-o", "addr", "show"], privileged=True, timeout=15, env={})
    if addr.returncode != 0:
        raise _netns.NetnsError(f"the IPv6 addresses of {ns} could not be read (exit {addr.returncode}).")
    addresses = [part for line in addr.stdout.splitlines() for i, part in enumerate(line.split())
                 if i > 0 and line.split()[i - 1] == "inet6"]
    return {"sysctl": sysctl, "addresses": addresses}


def _read_processes(ns):
    """Every process inside ``ns``: ``{"pid", "uids", "caps": {"CapInh", ..., "CapAmb": int}, "no_new_privs"}``.

    A capability set missing from ``/proc/<pid>/status`` reads as full (fail closed).
    """
    processes = []
    for pid in _netns.host_pids(ns):  # rootless: translated from the holder's pid namespace
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended between the listing and the read
        except OSError as exc:
            raise _netns.NetnsError(f"the status of process {pid} in {ns} could not be read "
                                    f"({exc.strerror}).") from None
        processes.append({
            "pid": pid,
            "uids": sorted({int(u) for u in fields.get("Uid", "0").split()}),
            "caps": {k: int(fields.get(k, "ffffffffffffffff").strip(), 16)
                     for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            "no_new_privs": fields.get("NoNewPrivs", "0").strip() == "1",
        })
    return processes


def read_live(plan):
    """What exists under the plan's prefix, read from the kernel; reading errors are kept, never raised.

    ``{"state": _netns.read_state(prefix) or None, "router_ruleset": list or None,
    "tier_rulesets": {tier: list}, "ipv6": {tier: dict}, "processes": {tier: list}, "errors": [(resource, message)]}``
    (a tier whose read failed is missing from its mapping and named in ``errors``).
    """
    live = {"state": None, "router_ruleset": None, "tier_rulesets": {}, "ipv6": {}, "processes": {}, "errors": []}
    prefix = plan["prefix"]
    try:
        live["state"] = _netns.read_state(prefix)
    except _netns.NetnsError as exc:
        live["errors"].append((prefix, exc.msg))
        return live
    present = set(live["state"]["namespaces"])
    router = plan["router"]["ns"]
    if router in present:
        try:
            live["router_ruleset"] = _netns.read_ruleset(router)
        except _netns.NetnsError as exc:
            live["errors"].append((router, exc.msg))
    for tier, spec in plan["tiers"].items():
        if spec["ns"] not in present:
            continue
        try:
            live["tier_rulesets"][tier] = _netns.read_ruleset(spec["ns"])
        except _netns.NetnsError as exc:
            live["errors"].append((spec["ns"], exc.msg))
        try:
            live["ipv6"][tier] = _read_ipv6(spec["ns"])
        except _netns.NetnsError as exc:
            live["errors"].append((spec["ns"], exc.msg))
        try:
            live["processes"][tier] = _read_processes(spec["ns"])
        except _netns.NetnsError as exc:
            live["errors"].append((spec["ns"], exc.msg))
    return live


def _expected(plan, world):
    """``{ns: {"links": {dev: [addresses]}, "routes": {(dst, dev, gateway)} or None}}`` the plan builds."""
    def cidr(address, subnet):
        return "%s/%s" % (address, subnet.split("/")[1])

    router_links, router_routes = {}, set()
    out = {}
    for spec in plan["tiers"].values():
        router_links[spec["veth_host"]] = [cidr(spec["gateway"], spec["subnet"])]
        router_routes.add((spec["subnet"], spec["veth_host"], None))
        out[spec["ns"]] = {
            "links": {spec["veth_peer"]: [cidr(spec["address"], spec["subnet"])]},
            "routes": {(spec["subnet"], spec["veth_peer"], None), ("default", spec["veth_peer"], spec["gateway"])},
        }
    if world:
        up = plan["uplink"]
        router_links[up["veth_host"]] = [cidr(up["gateway"], up["subnet"])]
        router_routes |= {(up["subnet"], up["veth_host"], None), ("default", up["veth_host"], up["address"])}
        wan_links = {up["veth_peer"]: [cidr(up["address"], up["subnet"])]}
        for spec in plan["world"]["neighbours"].values():
            wan_links[spec["veth_host"]] = [WAN_LINK_ADDRESS]
            out[spec["ns"]] = {"links": {spec["veth_peer"]: sorted(a + "/32" for a in spec["addresses"])},
                               "routes": None}
        out[plan["world"]["ns"]] = {"links": wan_links, "routes": None}
    out[plan["router"]["ns"]] = {"links": router_links, "routes": router_routes}
    return out


def compare(boundary, plan, live, *, world=True):
    """Findings for the live snapshot ``live`` (:func:`read_live`) against ``boundary`` and ``plan``.

    ``world``: whether the embedded world (``plan["world"]``: the wan and neighbour namespaces)
    belongs to the runtime. Routes are checked in the router and every tier (exactly the
    connected subnets and the default route via the planned gateway); the world's
    namespaces are checked for presence, links and addresses.
    """
    findings = [_finding("runtime_unreadable", res, f"{msg} The runtime counts as not isolated (fail closed).")
                for res, msg in live["errors"]]
    state = live["state"]
    if state is None:
        return findings
    expected = _expected(plan, world)
    tiers_by_ns = {spec["ns"]: tier for tier, spec in plan["tiers"].items()}
    for link in state["host_links"]:
        findings.append(_finding("runtime_host_link", link,
                                 f"the host namespace holds link {link} with the drill's prefix: a tier could "
                                 "reach the host through it; run teardown and build the runtime again"))
    for ns in sorted(set(state["namespaces"]) - set(expected)):
        findings.append(_finding("runtime_namespace_unexpected", ns,
                                 f"namespace {ns} carries the drill's prefix but the plan has no such namespace; "
                                 "remove it (ip netns del) or run teardown"))
    for ns, want in sorted(expected.items()):
        have = state["namespaces"].get(ns)
        if have is None:
            findings.append(_finding("runtime_namespace_missing", ns,
                                     f"namespace {ns} of the plan does not exist; build the runtime again"))
            continue
        findings += _links(ns, want["links"], have["links"])
        if want["routes"] is not None:
            findings += _routes(ns, want["routes"], have["routes"])
        tier = tiers_by_ns.get(ns)
        if tier is None:
            continue
        if have["ip_forward"]:
            findings.append(_finding("runtime_tier_forwarding", ns,
                                     f"IPv4 forwarding is on in tier {tier}: it could route for other namespaces; "
                                     "set net.ipv4.ip_forward=0 there or build the runtime again"))
        findings += _tier_ruleset(ns, tier, live["tier_rulesets"].get(tier, []))
        findings += _ipv6(ns, tier, live["ipv6"].get(tier))
        findings += _privileged(ns, tier, live.get("processes", {}).get(tier) or [])
    router = plan["router"]["ns"]
    if router in state["namespaces"] and live["router_ruleset"] is not None:
        findings += verify_ruleset(boundary, plan, live["router_ruleset"])
    return sorted(findings, key=lambda f: (f["code"], f["resource"]))


def _links(ns, want, have):
    findings = []
    for dev, addresses in sorted(want.items()):
        if dev not in have:
            findings.append(_finding("runtime_link_missing", f"{ns} {dev}",
                                     f"link {dev} is missing from {ns}; build the runtime again"))
        elif sorted(have[dev]["addresses"]) != sorted(addresses):
            findings.append(_finding("runtime_address_mismatch", f"{ns} {dev}",
                                     f"{dev} in {ns} holds {', '.join(have[dev]['addresses']) or 'no address'}, "
                                     f"the plan says {', '.join(addresses)}; build the runtime again"))
    for dev in sorted(set(have) - set(want)):
        findings.append(_finding("runtime_link_unexpected", f"{ns} {dev}",
                                 f"{ns} holds link {dev} the plan does not have "
                                 f"({', '.join(have[dev]['addresses']) or 'no address'}): traffic could bypass "
                                 "the router's rules; remove it"))
    return findings


def _routes(ns, want, have):
    findings = []
    live = {(r["dst"], r["dev"], r["gateway"]) for r in have}
    for dst, dev, gateway in sorted(live - want, key=str):
        findings.append(_finding("runtime_route_unexpected", f"{ns} route {dst}",
                                 f"{ns} routes {dst} via {gateway or 'a direct link'} dev {dev}, which the plan "
                                 "does not have (a tier routes only via its gateway); remove the route"))
    for dst, dev, gateway in sorted(want - live, key=str):
        findings.append(_finding("runtime_route_missing", f"{ns} route {dst}",
                                 f"{ns} has no route {dst} via {gateway or 'a direct link'} dev {dev}; build the "
                                 "runtime again"))
    return findings


def _tier_ruleset(ns, tier, items):
    tables = [b for item in items or () for kind, b in item.items() if kind == "table"]
    return [_finding("runtime_tier_ruleset", f"{ns} {t.get('family')} {t.get('name')}",
                     f"tier {tier} holds nft table {t.get('family')} {t.get('name')}: the rules that confine a "
                     "tier must live in the router, where it cannot reach them; remove the table")
            for t in tables]


def _ipv6(ns, tier, info):
    if info is None:
        return []  # the read failed: already a runtime_unreadable finding
    if info["sysctl"] is None:
        return []  # the kernel has no IPv6 at all
    # "default" only seeds devices created later, and a tier cannot create one (no CAP_NET_ADMIN).
    on = sorted(conf for conf, value in info["sysctl"].items() if conf != "default" and value != "1")
    if not on and not info["addresses"]:
        return []
    what = []
    if on:
        what.append("disable_ipv6 is off for %s" % ", ".join(on))
    if info["addresses"]:
        what.append("it holds IPv6 address(es) %s" % ", ".join(info["addresses"]))
    return [_finding("runtime_ipv6_enabled", ns,
                     f"IPv6 is on in tier {tier} ({'; '.join(what)}); the runtime is IPv4-only: set "
                     "net.ipv6.conf.all.disable_ipv6=1 there or build the runtime again")]


def _privileged(ns, tier, processes):
    findings = []
    for proc in processes:
        what = []
        if 0 in proc["uids"]:
            what.append("runs as root")
        held = sorted(k for k, v in proc["caps"].items() if v)
        if held:
            what.append("holds capabilities (%s)" % ", ".join(held))
        if not proc["no_new_privs"]:
            what.append("may gain privileges (no_new_privs off)")
        if what:
            findings.append(_finding("runtime_tier_process_privileged", f"{ns} pid {proc['pid']}",
                                     f"process {proc['pid']} in tier {tier} {'; '.join(what)}: a compromised "
                                     "workload could change its namespace or leave it; run everything inside a "
                                     "tier through _netns.run_in / spawn (unprivileged) and kill this one"))
    return findings


def verify(boundary, plan, *, world=True):
    """Read the live runtime of ``plan`` and judge it: ``{"findings", "isolated", "checked"}``."""
    live = read_live(plan)
    findings = compare(boundary, plan, live, world=world)
    state = live["state"] or {"namespaces": {}}
    checked = {
        "namespaces": len(state["namespaces"]),
        "links": sum(len(n["links"]) for n in state["namespaces"].values()),
        "routes": sum(len(n["routes"]) for n in state["namespaces"].values()),
        "router_rules": sum(1 for item in live["router_ruleset"] or () if "rule" in item),
        "tier_rulesets": len(live["tier_rulesets"]),
        "tier_processes": sum(len(p) for p in live["processes"].values()),
    }
    return {"findings": findings, "isolated": not findings, "checked": checked}
