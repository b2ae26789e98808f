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
import json
import os
import signal
import time

from ansible_collections.drguard.sandbox.plugins.module_utils import _io
from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_relay
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import NftPolicyError
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import drill_prefix
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import address_plan
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import router_ruleset
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import verify_ruleset

WAN_ADDRESS = "169.254.0.1"  # the wan end of every neighbour's veth; never a neighbour address
BAIT = ((5432, "db"), (443, "webhook"), (6514, "log-intake"))  # production bait listeners (TCP)
DNS_PORT = 53
UNDECLARED_FROM = 1025  # a tier's undeclared port: the lowest above 1024 not declared for it

# kind -> (namespace suffix, veth letter); the order is the order addresses are handed out.
NEIGHBOURS = (("production", "prod", "p"), ("control_plane", "cp", "c"), ("telemetry", "tel", "t"),
              ("fallback", "fb", "f"))
WAN = "wan"
# The S3 endpoint neighbour (drill_boundary.s3_read / s3_write only): namespace suffix, veth letter.
S3_NEIGHBOUR = ("s3", "s3", "s")


class SandboxRuntimeError(Exception):
    """The runtime cannot be planned, built or removed; ``msg`` says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- the embedded world (pure)


def port_ends(ports):
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
                + [(r.cidr, r) for r in boundary.egress if r.kind == "control_plane"])
    if kind == "telemetry":
        return [(r.cidr, r) for r in boundary.egress if r.kind == "telemetry"]
    return [(r.cidr, r) for r in boundary.fallback]


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
    "port"} or None, "s3_endpoint": {"address", "port", "ns"} or None}``. A neighbour holds one address
    in every CIDR of its kind (the first host
    not already another neighbour's; a ``/32`` is its own address); a kind with no CIDR declared
    has no neighbour (``fallback`` only when ``drill_boundary.fallback`` is declared); the ``s3``
    neighbour holds the address plan's ``s3_endpoint`` (only when S3 is granted). Raises
    :class:`SandboxRuntimeError` when a CIDR has no free host or a tier's name is taken by the world.
    """
    prefix = plan["prefix"]
    reserved = {prefix + WAN} | {prefix + suffix for _tier, suffix, _letter in NEIGHBOURS + (S3_NEIGHBOUR,)}
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
    s3_endpoint = None
    if plan.get("s3_endpoint"):  # the address plan's, chosen outside every declared CIDR
        kind, suffix, letter = S3_NEIGHBOUR
        s3_endpoint = dict(plan["s3_endpoint"], ns=prefix + suffix)
        neighbours[kind] = {"ns": prefix + suffix, "veth_host": f"{prefix}{letter}w",
                            "veth_peer": f"{prefix}{letter}n", "addresses": [s3_endpoint["address"]]}

    listeners, seen = [], set()

    def listen(kind, name, ns, address, *, protocol, port):
        key = (ns, address, protocol, port)
        if key not in seen:
            seen.add(key)
            listeners.append({"kind": kind, "name": name, "ns": ns, "address": address, "protocol": protocol,
                              "port": port})

    prod = neighbours["production"]
    bait = list(BAIT)
    for port in ([p for r in boundary.egress for p in port_ends(r.ports)]
                 + [p for t in boundary.tier_rules for p in port_ends(t.ports)]):
        if port not in [b for b, _what in bait]:
            bait.append((port, "bait"))
    for address in prod["addresses"]:
        for port, name in bait:
            listen("production", name, prod["ns"], address, protocol="tcp", port=port)

    if "control_plane" in neighbours:
        cp = neighbours["control_plane"]
        for _cidr, rule in _cidrs(boundary, "control_plane"):
            if rule is not None:
                address = at[("control_plane", str(rule.cidr))]
                for port in port_ends(rule.ports):
                    listen("control_plane", "control-plane", cp["ns"], address, protocol=rule.protocol, port=port)
        for address in cp["addresses"]:
            listen("control_plane", "dns", cp["ns"], address, protocol="udp", port=DNS_PORT)

    telemetry = None
    if "telemetry" in neighbours:
        tel = neighbours["telemetry"]
        rule = _cidrs(boundary, "telemetry")[0][1]
        if rule.protocol != "tcp":
            raise SandboxRuntimeError(
                f"drill_boundary.egress[{list(boundary.egress).index(rule)}]: the telemetry collector listens on TCP, "
                f"so a {rule.protocol} telemetry destination would never be reached; declare it with protocol tcp.",
                field="egress")
        address = at[("telemetry", str(rule.cidr))]
        telemetry = {"address": address, "port": rule.ports[0].start}
        listen("telemetry", "collector", tel["ns"], address, protocol=rule.protocol, port=telemetry["port"])
        for port in port_ends(rule.ports):
            listen("telemetry", "telemetry", tel["ns"], address, protocol=rule.protocol, port=port)

    if "fallback" in neighbours:
        fb = neighbours["fallback"]
        for _cidr, rule in _cidrs(boundary, "fallback"):
            for port in port_ends(rule.ports):
                listen("fallback", "fallback", fb["ns"], at[("fallback", str(rule.cidr))],
                       protocol=rule.protocol, port=port)

    if s3_endpoint is not None:
        listen("s3", "s3-endpoint", s3_endpoint["ns"], s3_endpoint["address"], protocol="tcp",
               port=s3_endpoint["port"])

    for tier, spec in plan["tiers"].items():
        ports = [(p, r.protocol) for r in boundary.ingress for p in port_ends(r.ports)]
        ports += [(p, t.protocol) for t in boundary.tier_rules if t.dest == tier for p in port_ends(t.ports)]
        ports.append((undeclared_port(boundary, tier), "tcp"))
        for port, protocol in ports:
            listen("tier", tier, spec["ns"], spec["address"], protocol=protocol, port=port)

    return {"ns": prefix + WAN, "neighbours": neighbours, "listeners": listeners, "telemetry": telemetry,
            "s3_endpoint": s3_endpoint}


def full_plan(boundary, drill_id):
    """:func:`address_plan` plus ``world`` (:func:`world_plan`): what ``_netns.create`` builds and the probes use."""
    try:
        plan = address_plan(boundary, drill_id)
    except NftPolicyError as exc:
        raise SandboxRuntimeError(str(exc).rstrip(".") + ".") from None
    plan["world"] = world_plan(boundary, plan)
    return plan


# ---------------------------------------------------------------- build and teardown (root)

STATE_FILE = "state.json"  # <output_dir>/runtime/state.json: the prefix, written before anything is created
BAIT_HITS = "bait-hits.jsonl"  # <output_dir>/runtime/bait-hits.jsonl: one line per accepted bait connection
TELEMETRY_FILE = "telemetry.jsonl"  # <output_dir>/telemetry.jsonl: the collector's events
READY_TIMEOUT = 10.0  # seconds every listener has to come up
RELAY_KEY = "s3_relay"  # state.json processes: the S3 endpoint's relay (_s3_relay)
RELAY_LOG = "s3-relay.log"  # <output_dir>/runtime/s3-relay.log: the relay's stderr
PKI_TTL = 7200  # seconds the drill's CA is valid when the runtime makes it and no TTL is given (drill_pki's default)

# One unprivileged process per namespace serves all of its listeners (TCP accept-and-close, UDP echo).
# Production bait writes one JSON line per accepted connection to its stdout (bait-hits.jsonl).
LISTENER_SOURCE = r"""
import json, selectors, socket, sys, time
spec = json.loads(sys.argv[1])
sel = selectors.DefaultSelector()
for item in spec:
    kind = socket.SOCK_STREAM if item["protocol"] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((item["address"], item["port"]))
    except OSError as exc:
        sys.stderr.write("cannot listen on %s:%d/%s (%s)\n" % (item["address"], item["port"], item["protocol"],
                                                             exc.strerror))
        sys.exit(2)
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, item)
sys.stderr.write("listening on %d socket(s)\n" % len(spec))
sys.stderr.flush()
out = sys.stdout
while True:
    for key, _ in sel.select():
        item, s = key.data, key.fileobj
        try:
            if item["protocol"] == "tcp":
                conn, peer = s.accept()
                if item["kind"] == "production":
                    out.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "name": item["name"], "address": item["address"], "port": item["port"],
                                          "peer": "%s:%d" % peer}) + "\n")
                    out.flush()
                conn.close()
            else:
                data, peer = s.recvfrom(2048)
                s.sendto(data[:512] or b"ok", peer)
        except OSError:
            pass
"""


def _netns_mod():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415
    return _netns


def prefix_of(drill_id):
    """The drill's name prefix ``drg-<short>-`` (the same as :func:`address_plan`'s), from the drill id alone."""
    if not isinstance(drill_id, str) or not drill_id:
        raise SandboxRuntimeError("drill_id must be a non-empty string; pass the drill's id.")
    return drill_prefix(drill_id)


def _runtime_dir(output_dir):
    if not isinstance(output_dir, str) or not os.path.isabs(output_dir):
        raise SandboxRuntimeError(f"output_dir {output_dir!r} must be an absolute path; pass the run's output "
                                  "directory.")
    return os.path.join(output_dir, "runtime")


def read_state_file(output_dir):
    """The runtime's ``state.json`` under ``output_dir`` (``None`` when there is none)."""
    path = os.path.join(_runtime_dir(output_dir), STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SandboxRuntimeError(f"{path} cannot be read ({exc}); remove it only after checking "
                                  "nothing of the drill runs any more.") from None


def _write_state(output_dir, state):
    rdir = _runtime_dir(output_dir)
    try:
        _io.ensure_private_dir(output_dir, parents=True)
        _io.ensure_private_dir(rdir)
        _io.atomic_write_json(os.path.join(rdir, STATE_FILE), state)
    except OSError as exc:
        raise SandboxRuntimeError(f"the runtime state cannot be written under {rdir} ({exc}); pass an output "
                                  "directory the drill owns.") from None


def _sockets(netns, ns, python):
    """``{(protocol, address, port)}`` bound in ``ns`` (TCP listening, UDP bound), read from its /proc/net."""
    script = ("import sys\n"
              "for proto, path, st in (('tcp', '/proc/net/tcp', '0A'), ('udp', '/proc/net/udp', '07')):\n"
              "    for line in open(path).read().splitlines()[1:]:\n"
              "        f = line.split()\n"
              "        if f[3] == st:\n"
              "            a, p = f[1].split(':')\n"
              "            ip = '.'.join(str(int(a[i:i + 2], 16)) for i in (6, 4, 2, 0))\n"
              "            print(proto, ip, int(p, 16))\n")
    proc = netns.run_in(ns, [python, "-I", "-S", "-c", script], timeout=15)
    if proc.returncode != 0:
        raise SandboxRuntimeError(f"the sockets of namespace {ns} cannot be read ({proc.stderr.strip()[:160]}); "
                                  "check the namespace and retry.", namespace=ns)
    out = set()
    for line in proc.stdout.splitlines():
        proto, ip, port = line.split()
        out.add((proto, ip, int(port)))
    return out


def _alive(netns, ns, pid, *, relay_of=None):
    """True when ``pid`` runs inside namespace ``ns`` (rootless too: pids as the host sees them).

    ``relay_of`` (a prefix): ``pid`` is that drill's S3 endpoint relay, which runs on the controller's
    side and only holds a socket of ``ns`` (``_s3_relay``): it is judged by name instead."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if relay_of is not None:
        return _s3_relay.is_relay(pid, relay_of)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return pid in netns.host_pids(ns)


def _groups(plan, relay=False):
    """``{ns: [listener, ...]}`` served by one listener process each (the collector runs on its own;
    with ``relay`` the S3 endpoint's relay serves the ``s3`` listener)."""
    groups = {}
    for item in plan["world"]["listeners"]:
        if item["kind"] == "telemetry" and item["name"] == "collector":
            continue
        if relay and item["kind"] == "s3":
            continue
        groups.setdefault(item["ns"], []).append(item)
    return groups


def _keep_aside(path):
    """Move a non-empty evidence file aside (``<path>.<n>``) before a restart truncates it; returns the new name."""
    try:
        if os.path.getsize(path) == 0:
            return None
    except FileNotFoundError:
        return None
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    os.rename(path, f"{path}.{n}")
    return f"{path}.{n}"


def _start_processes(netns, plan, output_dir, python, previous, *, drill_id=None, pki_ttl=None, s3_target=None):
    """Start every listener process (and the collector) not already alive; returns (processes, started).

    The collector speaks mTLS: the drill's telemetry channel (``_telemetry.Channel``: the drill's CA,
    made here valid ``pki_ttl`` seconds when the drill has none yet, and the channel's leaves) is
    made first, and its identity and trust reach the collector as read-only files of its private mount."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry  # noqa: PLC0415
    rdir = _runtime_dir(output_dir)
    processes, started = {}, []
    prod_ns = plan["world"]["neighbours"]["production"]["ns"]
    s3 = plan["world"].get("s3_endpoint")
    relay = s3 is not None and s3_target is not None
    old_relay = (previous or {}).get(RELAY_KEY, {})
    if old_relay and not (relay and old_relay.get("target") == _target_text(s3_target)):
        _s3_relay.stop(plan["prefix"], [old_relay.get("pid")])  # relaying elsewhere (or no longer): replaced
        old_relay = {}
    for ns, items in sorted(_groups(plan, relay).items()):
        key = f"listeners:{ns}"
        old = (previous or {}).get(key, {})
        if _alive(netns, ns, old.get("pid")):
            processes[key] = old
            continue
        stdout = None
        if ns == prod_ns:
            stdout = os.path.join(rdir, BAIT_HITS)
            _keep_aside(stdout)
        spec = [{k: x[k] for k in ("kind", "name", "address", "protocol", "port")} for x in items]
        pid = netns.spawn(ns, [python, "-I", "-S", "-c", LISTENER_SOURCE, json.dumps(spec)],
                          stdout_path=stdout, stderr_path=os.path.join(rdir, f"{ns[len(plan['prefix']):]}.log"))
        processes[key] = {"ns": ns, "pid": pid, "role": "listeners"}
        started.append(key)
    tel = plan["world"]["telemetry"]
    if tel is not None:
        ns = plan["world"]["neighbours"]["telemetry"]["ns"]
        key = "collector"
        old = (previous or {}).get(key, {})
        if _alive(netns, ns, old.get("pid")):
            processes[key] = old
        else:
            path = os.path.join(output_dir, TELEMETRY_FILE)
            try:
                channel = _telemetry.Channel(drill_id)
                channel.ensure(plan, PKI_TTL if pki_ttl is None else pki_ttl)
                argv = _telemetry.collector_argv(python, tel["address"], tel["port"], drill_id=drill_id,
                                                 tiers=list(plan["tiers"]))
                files = channel.collector_files()
            except _telemetry.TelemetryError as exc:
                raise SandboxRuntimeError(f"the telemetry collector cannot be started: {exc}") from None
            _keep_aside(path)
            pid = netns.spawn(ns, argv, stdout_path=path, stderr_path=os.path.join(rdir, "collector.log"), files=files)
            processes[key] = {"ns": ns, "pid": pid, "role": "collector"}
            started.append(key)
    if relay:
        if _alive(netns, s3["ns"], old_relay.get("pid"), relay_of=plan["prefix"]):
            processes[RELAY_KEY] = old_relay
        else:
            # A plain listener on the endpoint (the runtime was built without a target) gives way to the relay.
            plain = (previous or {}).get(f"listeners:{s3['ns']}", {})
            deadline = time.monotonic() + READY_TIMEOUT
            while _alive(netns, s3["ns"], plain.get("pid")) and time.monotonic() < deadline:
                os.kill(plain["pid"], signal.SIGKILL)
                time.sleep(0.02)
            uid = netns.workload_uid() if os.geteuid() == 0 else None
            try:
                pid = _s3_relay.start(netns, s3, s3_target, plan["prefix"], log_path=os.path.join(rdir, RELAY_LOG),
                                      python=python, uid=uid)
            except _s3_relay.RelayError as exc:
                raise SandboxRuntimeError(exc.msg, **exc.detail) from None
            processes[RELAY_KEY] = {"ns": s3["ns"], "pid": pid, "role": "s3_relay",
                                    "target": _target_text(s3_target), "uid": uid}
            started.append(RELAY_KEY)
    return processes, started


def s3_target(boundary, params):
    """Where the S3 endpoint relays (``_s3_relay.target``) from a module's AWS options (``endpoint_url``,
    ``region``); ``None`` when S3 is not granted or neither option is set (a plain listener then holds the
    endpoint for the probes, and nothing can be restored through it)."""
    if not (boundary.s3_read or boundary.s3_write) or not (params.get("endpoint_url") or params.get("region")):
        return None
    try:
        return _s3_relay.target(params.get("endpoint_url"), params.get("region"))
    except _s3_relay.RelayError as exc:
        raise SandboxRuntimeError(exc.msg, **exc.detail) from None


def _target_text(target):
    return None if target is None else f"{target['host']}:{target['port']}"


def _wait_ready(netns, plan, python, output_dir, timeout=None):
    """Wait until every listener of the plan is bound; a clear error names the first that is not."""
    timeout = READY_TIMEOUT if timeout is None else timeout
    wanted = {}
    for item in plan["world"]["listeners"]:
        wanted.setdefault(item["ns"], []).append(item)
    deadline = time.monotonic() + timeout
    pending = dict(wanted)
    while True:
        for ns in list(pending):
            bound = _sockets(netns, ns, python)
            missing = [x for x in pending[ns] if (x["protocol"], x["address"], x["port"]) not in bound]
            if missing:
                pending[ns] = missing
            else:
                del pending[ns]
        if not pending:
            return
        if time.monotonic() > deadline:
            ns, items = sorted(pending.items())[0]
            x = items[0]
            log = "collector.log" if x["name"] == "collector" else f"{ns[len(plan['prefix']):]}.log"
            raise SandboxRuntimeError(
                f"the {x['kind']} listener {x['name']} on {x['address']}:{x['port']}/{x['protocol']} in namespace "
                f"{ns} did not come up within {timeout:g}s; see {os.path.join(_runtime_dir(output_dir), log)} "
                "and retry.", namespace=ns, listener=x)
        time.sleep(0.05)


def _rules(netns, router, table):
    return sum(1 for item in netns.read_ruleset(router)
               if "rule" in item and item["rule"].get("table") == table)


def _result(plan, processes, rules, output_dir, changed):
    tel = plan["world"]["telemetry"]
    s3 = plan["world"].get("s3_endpoint")
    relay = (processes or {}).get(RELAY_KEY) or {}
    return {
        "changed": changed,
        "backend": "netns",
        "prefix": plan["prefix"],
        "table": plan["table"],
        "units": [{"tier": t, "ns": s["ns"], "address": s["address"]} for t, s in plan["tiers"].items()],
        "world": plan["world"],
        "listeners": len(plan["world"]["listeners"]),
        "rules": rules,
        "collector": None if tel is None else {"address": tel["address"], "port": tel["port"],
                                               "path": os.path.join(output_dir, TELEMETRY_FILE)},
        "processes": sorted(p["pid"] for p in processes.values()),
        # Where the tiers reach S3 (drill_boundary.s3_read / s3_write) and where the relay forwards to.
        "s3_endpoint": None if s3 is None else {"address": s3["address"], "port": s3["port"], "ns": s3["ns"],
                                                "relay": relay.get("target")},
    }


def prepare(boundary, drill_id):
    """Everything that can be refused before anything is created: the plan, its names, the host (root, ip, nft)."""
    netns = _netns_mod()
    plan = full_plan(boundary, drill_id)
    try:
        prefix, _router, tiers = netns.validate_plan(plan)
        netns.validate_world(plan, prefix, tiers)
        netns.preflight()
    except netns.NetnsError as exc:
        raise SandboxRuntimeError(exc.msg, **exc.detail) from None
    return plan


def status(boundary, plan, output_dir, python, s3_target=None):
    """Whether the runtime of ``plan`` is complete: namespaces, a compliant ruleset, live processes, bound listeners
    (and the S3 endpoint's relay towards ``s3_target`` when one is given and S3 is granted)."""
    netns = _netns_mod()
    state = read_state_file(output_dir) or {}
    try:
        live = netns.read_state(plan["prefix"])
        wanted = {plan["router"]["ns"], plan["world"]["ns"]} | {t["ns"] for t in plan["tiers"].values()} \
            | {n["ns"] for n in plan["world"]["neighbours"].values()}
        if set(live["namespaces"]) != wanted:
            return False
        if verify_ruleset(boundary, plan, netns.read_ruleset(plan["router"]["ns"])):
            return False
        for key, proc in (state.get("processes") or {}).items():
            if not _alive(netns, proc.get("ns"), proc.get("pid"),
                          relay_of=plan["prefix"] if key == RELAY_KEY else None):
                return False
        relay = s3_target is not None and plan["world"].get("s3_endpoint") is not None
        if set(state.get("processes") or {}) != set(_expected_processes(plan, relay)):
            return False
        if relay and (state["processes"][RELAY_KEY].get("target") != _target_text(s3_target)):
            return False
        _wait_ready(netns, plan, python, output_dir, timeout=0)
    except (netns.NetnsError, SandboxRuntimeError):
        return False
    return True


def _expected_processes(plan, relay=False):
    keys = [f"listeners:{ns}" for ns in _groups(plan, relay)]
    return keys + (["collector"] if plan["world"]["telemetry"] is not None else []) + ([RELAY_KEY] if relay else [])


def _namespaces(plan):
    return sorted({plan["router"]["ns"], plan["world"]["ns"]} | {t["ns"] for t in plan["tiers"].values()}
                  | {n["ns"] for n in plan["world"]["neighbours"].values()})


def up(boundary, drill_id, output_dir, python, *, check_mode=False, pki_ttl=None, s3_target=None):
    """Build (or complete) the drill's ``netns`` runtime and return the runtime result (docs/runtime.md).

    Refused before anything is created when the plan, the names or the host do not allow it
    (:func:`prepare`). Then ``<output_dir>/runtime/state.json`` records the prefix, the
    namespaces are built (``_netns.create``), the router ruleset is applied unless the live one
    already verifies against ``boundary`` (so a second run keeps the counters), every listener
    process not alive is started unprivileged, and every listener must be bound within
    :data:`READY_TIMEOUT` seconds. Idempotent: ``changed`` is false when nothing had to be done.
    A failure after creation began removes everything of the prefix again before it raises.
    The drill's PKI gets its CA here (valid ``pki_ttl`` seconds, :data:`PKI_TTL` by default) when it
    has none yet: the collector speaks mTLS from the start. With S3 granted and ``s3_target``
    (``_s3_relay.target``: the drill's S3 endpoint), the S3 endpoint neighbour relays to it
    (``_s3_relay.start``); without a target a plain listener holds the endpoint (probes only).
    """
    netns = _netns_mod()
    plan = prepare(boundary, drill_id)
    rdir = _runtime_dir(output_dir)
    previous = read_state_file(output_dir) if os.path.isdir(rdir) else None
    if previous and previous.get("prefix") not in (None, plan["prefix"]):
        raise SandboxRuntimeError(f"{os.path.join(rdir, STATE_FILE)} belongs to another drill's runtime "
                                  f"({previous.get('prefix')}); use this run's own output directory.")
    if not (previous and previous.get("state") != "absent") and leftovers(plan["prefix"])["namespaces"]:
        raise SandboxRuntimeError(f"the runtime {plan['prefix']} already exists but {os.path.join(rdir, STATE_FILE)} "
                                  "does not record it; pass the output directory it was built with, or remove it "
                                  "first (state absent).", prefix=plan["prefix"])
    if check_mode:
        complete = status(boundary, plan, output_dir, python, s3_target)
        return _result(plan, (previous or {}).get("processes") or {}, None, output_dir, not complete)
    state = {"backend": "netns", "drill_id": drill_id, "prefix": plan["prefix"], "table": plan["table"],
             "namespaces": _namespaces(plan), "state": "creating",
             "processes": (previous or {}).get("processes") or {}}
    _write_state(output_dir, state)  # before anything exists: teardown and the reaper find the prefix after a kill
    try:
        created = netns.create(plan)
        router = plan["router"]["ns"]
        rules_changed = False
        if verify_ruleset(boundary, plan, netns.read_ruleset(router)):
            netns.apply_ruleset(router, router_ruleset(boundary, plan, plan["table"]))
            rules_changed = True
            findings = verify_ruleset(boundary, plan, netns.read_ruleset(router))
            if findings:
                raise SandboxRuntimeError(f"the router ruleset read back after applying it does not match "
                                          f"drill_boundary ({findings[0]['code']}: {findings[0]['detail']}); "
                                          "report this as a bug.", findings=findings)
        processes, started = _start_processes(netns, plan, output_dir, python, state["processes"], drill_id=drill_id,
                                              pki_ttl=pki_ttl, s3_target=s3_target)
        state["processes"] = processes
        _write_state(output_dir, state)
        _wait_ready(netns, plan, python, output_dir)
        rules = _rules(netns, router, plan["table"])
    except (netns.NetnsError, SandboxRuntimeError, OSError) as exc:
        error = exc if isinstance(exc, SandboxRuntimeError) else SandboxRuntimeError(
            getattr(exc, "msg", None) or f"the runtime could not be built: {exc}; check the host and retry.",
            **getattr(exc, "detail", {}))
        try:
            down(drill_id, output_dir)
        except SandboxRuntimeError as cleanup:
            error.detail["cleanup"] = cleanup.msg
        raise error from None
    state["state"] = "present"
    _write_state(output_dir, state)
    return _result(plan, processes, rules, output_dir, created["changed"] or rules_changed or bool(started))


def leftovers(prefix, pids=()):
    """What of ``prefix`` still exists: namespaces (``ip netns``), nft tables of the host, mounts
    (``/proc/mounts``), processes among ``pids`` still running, rootless holders of the prefix (any
    user's as root, this user's otherwise). Empty lists: nothing remains.

    Rootless, the drill's namespaces and tables exist only inside its holder (whose network
    namespace plays the host's part): they are read there while a holder lives; without one
    there is nowhere for them to be (the host's own tables are root's, unreadable and untouched).
    """
    netns = _netns_mod()
    netns.check_prefix(prefix)
    out = {"namespaces": [], "tables": [], "mounts": [], "processes": [], "holders": []}
    try:
        out["holders"] = [h["pid"] for h in netns.find_holders(prefix)]
        netns._use(prefix)  # noqa: SLF001  (rootless: through the holder while it lives)
        out["namespaces"] = [n for n in netns._namespaces() if n.startswith(prefix)]  # noqa: SLF001
        tables = ""
        if os.geteuid() == 0 or netns._current() is not None:  # noqa: SLF001
            nft = netns._tool("nft")  # noqa: SLF001
            tables = netns._run([nft, "list", "tables"]).stdout  # noqa: SLF001
    except netns.NetnsError as exc:
        raise SandboxRuntimeError(f"what remains of {prefix} cannot be read ({exc.msg}); check the host.") from None
    out["tables"] = [line.split()[-1] for line in tables.splitlines() if line.split()[-1:]
                     and line.split()[-1].startswith(prefix)]
    with open("/proc/mounts", encoding="utf-8") as handle:
        out["mounts"] = [line.split()[1] for line in handle if prefix in line.split()[1]]
    for pid in pids:
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except (OSError, ValueError):
            continue
        # One of ours (listeners, collector, a workload run from its files), not a recycled pid.
        if b"selectors" in cmdline or b"telemetry" in cmdline or b"/run/drguard/in/" in cmdline:
            out["processes"].append(int(pid))
    # The S3 endpoint's relay runs on the controller's side: found by its name and the prefix.
    out["processes"] = sorted(set(out["processes"]) | set(_s3_relay.find(prefix)))
    return out


def down(drill_id, output_dir=None):
    """Remove the drill's runtime (processes, namespaces, veths, the router table with its namespace)
    and prove it gone (:func:`leftovers`); idempotent. ``{"changed", "prefix", "removed"}``."""
    netns = _netns_mod()
    prefix = prefix_of(drill_id)
    state = None
    if output_dir is not None and os.path.isdir(_runtime_dir(output_dir)):
        state = read_state_file(output_dir)
        if state and state.get("prefix") != prefix:
            raise SandboxRuntimeError(f"the runtime state under {output_dir} belongs to {state.get('prefix')}, not "
                                      f"to drill {drill_id} ({prefix}); pass the drill's own output directory.")
    pids = [p.get("pid") for p in ((state or {}).get("processes") or {}).values()]
    try:
        relays = _s3_relay.stop(prefix, pids)  # on the controller's side: destroy does not see it
        removed = netns.destroy(prefix)
    except _s3_relay.RelayError as exc:
        raise SandboxRuntimeError(exc.msg, **exc.detail) from None
    except netns.NetnsError as exc:
        raise SandboxRuntimeError(exc.msg, **exc.detail) from None
    removed["removed"]["pids"] = sorted(set(removed["removed"]["pids"]) | set(relays))
    remaining = leftovers(prefix, pids)
    if any(remaining.values()):
        names = [f"{k}: {', '.join(map(str, v))}" for k, v in remaining.items() if v]
        raise SandboxRuntimeError(f"the runtime of {prefix} is not gone after teardown ({'; '.join(names)}); "
                                  "remove them by hand or run teardown again.", remaining=remaining)
    if state is not None and state.get("state") != "absent":
        state.update(state="absent", processes={})
        _write_state(output_dir, state)
    # The runtime made the drill's PKI (its CA, the telemetry channel): overwritten and removed with it.
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill  # noqa: PLC0415 - a cycle
    pki = _mtls_drill.destroy(drill_id)
    return {"changed": removed["changed"] or pki or bool(relays), "prefix": prefix, "removed": removed["removed"]}
