# Copyright: drguard maintainers
# Apache License 2.0
"""Live probes of the ``netns`` runtime: real packets, both ways, judged against ``drill_boundary``.

- :func:`probe_matrix` (pure) lists every probe the boundary implies (docs/runtime.md,
  "Live probes"): from every tier to every production bait (deny), to the control plane,
  telemetry and fallback paths on their declared ports (allow), the S3 endpoint on 443 when
  S3 is granted (allow; port 80 deny), every declared tier rule
  (allow), an undeclared port on a declared peer and every undeclared tier pair (deny), DNS
  to the outside (deny); and into the sandbox: from the control plane on each ingress port
  (allow) and from production on the same ports (deny).
- :func:`run_probes` sends them: one unprivileged process per source namespace
  (``_netns.run_in``), its probes concurrent in threads, and reads the router table's named
  counters before and after (the production drop counter must rise with the production rows).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import BAIT
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import DNS_PORT
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import SandboxRuntimeError
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import port_ends
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import undeclared_port as _undeclared_port

S3_UNDECLARED_PORT = 80  # the S3 endpoint on a port the boundary does not open (plain HTTP to S3)

# Codes of the violations run_probes reports (docs/runtime.md, "Live probes").
VIOLATION_CODES = (
    "production_reachable", "undeclared_reachable", "dns_reachable", "declared_blocked",
    "fallback_blocked", "production_drop_not_counted", "counters_unreadable", "probe_failed",
)

# Runs inside one source namespace, unprivileged: reads {"timeout", "probes": [...]} on stdin,
# probes all at once (one thread each), prints one JSON list of results in the same order.
PROBE_SOURCE = r"""
import errno, json, socket, sys, threading, time
spec = json.load(sys.stdin)
timeout = float(spec["timeout"])
out = [None] * len(spec["probes"])
DNS_QUERY = bytes.fromhex("d7a901000001000000000000076578616d706c650000010001")

def tcp(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((p["bind"], 0))
        s.settimeout(timeout)
        try:
            s.connect((p["host"], p["port"]))
            return "allow", "connected"
        except socket.timeout:
            return "deny", "timed out"
        except ConnectionRefusedError:
            return "allow", "refused (reached the peer)"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return "deny", "unreachable (%s)" % (exc.strerror or exc.errno)
            return "deny", "connect failed (%s)" % (exc.strerror or exc.errno)
    finally:
        s.close()

def udp(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((p["bind"], 0))
        s.connect((p["host"], p["port"]))
        payload = DNS_QUERY if p["port"] == 53 else b"drguard-probe\n"
        end = time.monotonic() + timeout
        for attempt in (0, 1):
            s.send(payload)
            s.settimeout(max(0.01, (end - time.monotonic()) / (2 - attempt)))
            try:
                s.recv(4096)
                return "allow", "reply"
            except socket.timeout:
                continue
            except ConnectionRefusedError:
                return "allow", "refused (reached the peer)"
        return "deny", "no reply"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "deny", "unreachable (%s)" % (exc.strerror or exc.errno)
        return "deny", "send failed (%s)" % (exc.strerror or exc.errno)
    finally:
        s.close()

def one(i, p):
    start = time.monotonic()
    try:
        observed, reason = (tcp if p["protocol"] == "tcp" else udp)(p)
    except Exception as exc:
        observed, reason = "error", "probe error (%s)" % exc
    out[i] = {"observed": observed, "reason": reason,
              "latency_ms": round((time.monotonic() - start) * 1000, 1)}

threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(spec["probes"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


class ProbeError(Exception):
    """The probes cannot be planned or run; the message says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- the matrix (pure)


def _neighbour(plan, kind):
    world = plan.get("world")
    if not isinstance(world, dict) or not isinstance(world.get("neighbours"), dict):
        raise ProbeError("the plan has no embedded world (plan['world']); build the plan with _runtime.full_plan.")
    return world["neighbours"].get(kind)


def _address_in(plan, kind, cidr):
    """The address of neighbour ``kind`` inside ``cidr`` (the world plants one in every declared CIDR)."""
    spec = _neighbour(plan, kind) or {}
    for address in spec.get("addresses", ()):
        if ipaddress.ip_address(address) in cidr:
            return address
    raise ProbeError(f"the plan's {kind} neighbour has no address in {cidr}; build the plan from the same "
                     "boundary (_runtime.full_plan).", kind=kind, cidr=str(cidr))


def undeclared_port(boundary, tier):
    """The port the world's tier listens on undeclared (``_runtime.undeclared_port``), as a :class:`ProbeError`."""
    try:
        return _undeclared_port(boundary, tier)
    except SandboxRuntimeError as exc:
        raise ProbeError(exc.msg, **exc.detail) from None


def _row(src, dst, address, port, flow):
    protocol, expected, src_address = flow
    return {"src": src, "dst": dst, "address": f"{address}:{port}", "layer": "l4", "expected": expected,
            "observed": None, "reason": None, "latency_ms": None, "protocol": protocol,
            "src_address": src_address}


def probe_matrix(boundary, plan):
    """Every probe ``boundary`` implies for the runtime of ``plan`` (address plan plus ``world``).

    Rows follow the report's probe row (``src``, ``dst``, ``address`` ``ip:port``, ``layer``
    ``l4``, ``expected``; ``observed``, ``reason``, ``latency_ms`` still ``None``) plus
    ``protocol`` and ``src_address`` (the address the probe is sent from). Port ranges are
    probed at their first and last port. Port 53 is left out of the allow rows: DNS to the
    outside is dropped before any declared allow, and the ``dns`` row proves it. Raises
    :class:`ProbeError` when the plan has no embedded world or lacks an address the boundary needs.
    """
    tiers = list(plan["tiers"])
    addr = {t: plan["tiers"][t]["address"] for t in tiers}
    production = (_neighbour(plan, "production") or {}).get("addresses") or []
    if not production:
        raise ProbeError("the plan's world has no production address; build the plan with _runtime.full_plan.")
    bait = [port for port, _name in BAIT]
    for port in ([p for r in boundary.egress for p in port_ends(r.ports)]
                 + [p for t in boundary.tier_rules for p in port_ends(t.ports)]
                 + [item["port"] for item in plan["world"].get("listeners", ())
                    if item.get("kind") == "production" and item.get("protocol", "tcp") == "tcp"]):
        if port not in bait:
            bait.append(port)

    outward = []  # (dst, address, port, protocol, expected) from every tier
    for a in production:
        outward += [("production", a, port, "tcp", "deny") for port in bait]
    for r in boundary.egress:
        kind = "telemetry" if r.kind == "telemetry" else "control_plane"
        a = _address_in(plan, kind, r.cidr)
        outward += [(kind, a, port, r.protocol, "allow") for port in port_ends(r.ports) if port != DNS_PORT]
    for r in boundary.fallback:
        a = _address_in(plan, "fallback", r.cidr)
        outward += [("fallback", a, port, r.protocol, "allow") for port in port_ends(r.ports) if port != DNS_PORT]
    # The S3 endpoint (drill_boundary.s3_read / s3_write): every tier reaches it on its one port, as
    # every tier's security group reaches the S3 prefix list on tcp 443 on AWS, and no other port.
    s3 = plan["world"].get("s3_endpoint")
    if s3:
        outward += [("s3_endpoint", s3["address"], s3["port"], "tcp", "allow"),
                    ("s3_endpoint", s3["address"], S3_UNDECLARED_PORT, "tcp", "deny")]
    cp = (_neighbour(plan, "control_plane") or {}).get("addresses") or []
    dns_target = cp[0] if cp else plan["uplink"]["address"]

    rows = []
    declared_pairs = {(t.source, t.dest) for t in boundary.tier_rules}
    for src in tiers:
        rows += [_row(src, dst, a, port, (proto, exp, addr[src])) for dst, a, port, proto, exp in outward]
        rows.append(_row(src, "dns", dns_target, DNS_PORT, ("udp", "deny", addr[src])))
        for t in boundary.tier_rules:
            if t.source == src:
                rows += [_row(src, t.dest, addr[t.dest], port, (t.protocol, "allow", addr[src]))
                         for port in port_ends(t.ports)]
        for dst in tiers:
            if dst == src:
                continue
            if (src, dst) in declared_pairs:
                rows.append(_row(src, dst, addr[dst], undeclared_port(boundary, dst), ("tcp", "deny", addr[src])))
                continue
            ports = [(port, t.protocol) for t in boundary.tier_rules if t.dest == dst for port in port_ends(t.ports)]
            for port, proto in (list(dict.fromkeys(ports)) or [(undeclared_port(boundary, dst), "tcp")]):
                rows.append(_row(src, dst, addr[dst], port, (proto, "deny", addr[src])))
    for r in boundary.ingress:
        cp_address = _address_in(plan, "control_plane", r.cidr)
        for dst in tiers:
            for port in port_ends(r.ports):
                rows.append(_row("control_plane", dst, addr[dst], port, (r.protocol, "allow", cp_address)))
                rows.append(_row("production", dst, addr[dst], port, (r.protocol, "deny", production[0])))
    unique = {}  # two rules naming the same flow give one row
    for row in rows:
        unique.setdefault((row["src"], row["dst"], row["address"], row["protocol"], row["src_address"]), row)
    return list(unique.values())


# ---------------------------------------------------------------- running them


def _source_ns(plan, src):
    if src in plan["tiers"]:
        return plan["tiers"][src]["ns"]
    spec = _neighbour(plan, src)
    if not spec or not spec.get("ns"):
        raise ProbeError(f"the plan has no namespace for probe source {src!r}; build the plan with "
                         "_runtime.full_plan.", src=src)
    return spec["ns"]


def python_executable():
    """The interpreter probes run with inside a namespace (the real file, not a venv's symlink)."""
    return os.path.realpath(sys.executable)


def read_counters(plan):
    """The router table's named counters: ``{name: {"packets": n, "bytes": n}}`` (privileged read)."""
    nft = _netns.which("nft")
    if nft is None:
        raise ProbeError("nft not found on PATH; install nftables (make venv as root does) and retry.")
    table = plan["table"]
    try:
        proc = _netns.run_in(plan["router"]["ns"], [nft, "-j", "list", "counters", "table", "inet", table],
                             privileged=True, timeout=15)
    except _netns.NetnsError as exc:
        raise ProbeError(f"the counters of table inet {table} could not be read: {exc.msg}") from None
    if proc.returncode != 0:
        raise ProbeError(f"the counters of table inet {table} could not be read: "
                         f"{(proc.stderr or '').strip()[:200] or 'exit %d' % proc.returncode}.", table=table)
    try:
        items = json.loads(proc.stdout)["nftables"]
        return {c["counter"]["name"]: {"packets": int(c["counter"]["packets"]), "bytes": int(c["counter"]["bytes"])}
                for c in items if "counter" in c and c["counter"].get("table") == table}
    except (ValueError, KeyError, TypeError):
        raise ProbeError(f"nft gave no readable counters for table inet {table}.", table=table) from None


def _run_namespace(ns, probes, timeout):
    spec = {"timeout": timeout, "probes": probes}
    try:
        proc = _netns.run_in(ns, [python_executable(), "-I", "-S", "-c", PROBE_SOURCE],
                             input_text=json.dumps(spec), timeout=timeout * 2 + 15, env={})
    except _netns.NetnsError as exc:
        return None, exc.msg
    if proc.returncode != 0:
        return None, "the probe process in %s exited %d: %s" % (ns, proc.returncode,
                                                                (proc.stderr or "").strip()[-200:])
    try:
        results = json.loads(proc.stdout)
        if not isinstance(results, list) or len(results) != len(probes):
            raise ValueError("wrong length")
        return results, None
    except ValueError:
        return None, "the probe process in %s printed no result list" % ns


def _violation(row):
    if row["observed"] == row["expected"]:
        return None
    if row["expected"] == "allow":
        return "fallback_blocked" if row["dst"] == "fallback" else "declared_blocked"
    if "production" in (row["src"], row["dst"]):
        return "production_reachable"
    if row["dst"] == "dns":
        return "dns_reachable"
    return "undeclared_reachable"


def run_probes(rows, plan, timeout=1.0):
    """Send every probe of ``rows`` for real and judge it; returns ``{rows, counters, violations, summary}``.

    One unprivileged process per source namespace (``_netns.run_in``: uid 65534, no
    capabilities), all namespaces at once, each probing concurrently. A TCP probe is
    ``allow`` when it connects or is refused (a reset means the packet reached the peer),
    ``deny`` when it times out or is unreachable; a UDP probe is ``allow`` when a reply (or
    an ICMP port unreachable) comes back. A probe that could not run is ``error`` and a
    violation (fail closed). The router table's named counters are read before and after;
    ``production_drop`` must rise by at least the number of production rows. ``counters``
    holds packet counts per counter name: ``before``, ``after`` and ``delta``.
    Violations: ``{"code", "detail"}`` plus the row (``row`` index) when one row is at fault.
    """
    if not isinstance(timeout, (int, float)) or not 0.05 <= timeout <= 30:
        raise ProbeError(f"timeout {timeout!r} must be between 0.05 and 30 seconds; pass a number of seconds.")
    rows = [dict(r) for r in rows]
    groups = {}
    for i, row in enumerate(rows):
        ns = _source_ns(plan, row["src"])
        host, port = row["address"].rsplit(":", 1)
        groups.setdefault(ns, []).append((i, {"host": host, "port": int(port), "protocol": row["protocol"],
                                              "bind": row["src_address"]}))
    violations = []
    try:
        before = read_counters(plan)
    except ProbeError as exc:
        before = None
        violations.append({"code": "counters_unreadable", "detail": exc.msg})

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(groups)))) as pool:
        futures = {ns: pool.submit(_run_namespace, ns, [p for _index, p in items], timeout)
                   for ns, items in groups.items()}
    for ns, items in groups.items():
        results, error = futures[ns].result()
        for k, (i, _probe) in enumerate(items):
            if results is None:
                rows[i].update(observed="error", reason=f"probe did not run ({error})", latency_ms=None)
            else:
                rows[i].update(results[k])

    after = None
    if before is not None:
        try:
            after = read_counters(plan)
        except ProbeError as exc:
            violations.append({"code": "counters_unreadable", "detail": exc.msg})

    for i, row in enumerate(rows):
        if row["observed"] == "error":
            violations.append({"code": "probe_failed", "row": i, "detail": _describe(row)})
            continue
        code = _violation(row)
        if code == "fallback_blocked":
            row["reason"] = f"fallback_blocked ({row['reason']})"
        if code:
            violations.append({"code": code, "row": i, "detail": _describe(row)})

    delta = None
    if before is not None and after is not None:
        delta = {name: after[name]["packets"] - before.get(name, {}).get("packets", 0) for name in after}
        production_rows = sum(1 for r in rows if "production" in (r["src"], r["dst"]))
        counted = delta.get("production_drop")
        if counted is None or counted < production_rows:
            violations.append({"code": "production_drop_not_counted",
                               "detail": f"the production_drop counter rose by {counted} packet(s) during "
                                         f"{production_rows} production probe(s); production traffic was not "
                                         "dropped by the drill's production rule"})
    summary = {"rows": len(rows), "allow": sum(1 for r in rows if r["observed"] == "allow"),
               "deny": sum(1 for r in rows if r["observed"] == "deny"), "violations": len(violations)}

    def packets(counters):
        return None if counters is None else {name: c["packets"] for name, c in counters.items()}

    return {"rows": rows, "counters": {"before": packets(before), "after": packets(after), "delta": delta},
            "violations": violations, "summary": summary}


def send_events(rows, plan, drill_id, address, port):
    """Send every row as a ``drguard.probe.result`` event to the collector at ``address:port``.

    The drill is the control plane, so the sender runs in the control-plane neighbour's
    namespace, unprivileged. Returns ``{"sent", "acknowledged"}`` and, when not every event
    was acknowledged, ``error`` (one sentence); never raises for a delivery problem.
    """
    source = f"/drguard/drill/{drill_id}/probes"
    try:
        events = [_telemetry.cloud_event("drguard.probe.result", source, f"{r['src']}->{r['dst']} {r['address']}",
                                         {k: r[k] for k in r if k != "src_address"}) for r in rows]
        return _telemetry.deliver(_source_ns(plan, "control_plane"), events, address, port,
                                  drill_id=drill_id, python=python_executable())
    except ProbeError as exc:
        return {"sent": 0, "acknowledged": 0, "error": exc.msg}
    except _telemetry.TelemetryError as exc:
        return {"sent": exc.detail.get("sent", 0), "acknowledged": exc.detail.get("acknowledged", 0),
                "error": exc.msg}


def _describe(row):
    return (f"{row['src']} -> {row['dst']} {row['protocol']} {row['address']}: expected {row['expected']}, "
            f"observed {row['observed']} ({row['reason']})")
