# Copyright: drguard maintainers
# Apache License 2.0
"""The mtls phase on the ``ec2`` runtime: mTLS echo servers and handshake probes through SSM Run Command.

docs/mtls.md, "On AWS". Each tier's instance already holds its bundle (``ca.pem``, ``cert.pem``,
``key.pem``) in ``/run/drguard/tls``, fetched from the secret store by the instance itself in the
runtime phase (``_runtime_ec2.deliver_certificates``). This module sends only programs, paths and
public facts; no private key travels in an SSM parameter, an output or a result.

1. One SSM command per destination tier starts the mTLS echo server (``_mtls``'s server and its
   shared checks; only the TLS context differs: the instance's bundle has no CRL) unprivileged, in
   the background, with a bounded lifetime (``timeout``), and prints a readiness line.
2. One SSM command per instance that runs cases: the handshake cases (every allowed pair with a
   round trip; no client certificate; a certificate of a CA minted on the instance for the probe;
   the destination's own identity, which ``tier_rules`` does not let reach itself, over loopback).
3. One SSM command per server stops it and returns its handshake events (sent also when a step
   before failed: nothing stays running, and the lifetime ends it anyway).

A row is known only when its server confirmed it listened, the source's command ended ``Success``
with a readable result and the server's events came back; anything else is ``unknown`` (fail closed).
On the emulator no command runs, so every row is ``unknown``. Rotation is not driven on ``ec2``:
``rotation`` and ``ca_rotation`` say ``rotated: false`` with the reason, so the phase fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from concurrent.futures import ThreadPoolExecutor

try:
    from cryptography import x509
except ImportError:  # _pki.HAS_CRYPTOGRAPHY
    x509 = None

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2

SERVER_DIR = "/run/drguard/mtls"  # on the instance: root's, 0700; the server's pid, log and events
READY_MARK = "drguard-mtls-ready"
EVENTS_MARK = "drguard-mtls-events"
READY_LINE = "mtls server listening"
SSM_OUTPUT_LIMIT = 24000  # what GetCommandInvocation returns at most of a command's output
OPENSSL = "/usr/bin/openssl"
NOT_ON_EC2 = (
    ("expired", "needs a leaf signed by the drill's CA, whose key never leaves the controller's memory on ec2"),
    ("outside_trust_domain", "needs a foreign identity signed by the drill's CA, whose key never leaves the "
                             "controller's memory on ec2"),
    ("wrong_eku", "needs a leaf signed by the drill's CA, whose key never leaves the controller's memory on ec2"),
    ("ca_true", "needs a certificate signed by the drill's CA, whose key never leaves the controller's memory on "
                "ec2"),
    ("rotated_out_leaf", "leaf rotation is not driven on ec2"),
    ("old_ca_leaf_during_overlap", "CA rotation is not driven on ec2"),
    ("after_ca_rotation", "CA rotation is not driven on ec2"),
    ("old_ca_leaf_after_retirement", "CA rotation is not driven on ec2"),
)
ROTATION_REASON = ("leaf rotation is not driven on the ec2 backend (no renewal into the instances' servers yet): "
                   "not proven, so the phase fails rather than pass on what it did not observe")
CA_ROTATION_REASON = ("CA rotation is not driven on the ec2 backend: not proven, so the phase fails rather than pass "
                      "on what it did not observe")

# The instance's bundle: leaf and key in two files, the CA without a CRL (nothing is revoked on ec2).
# Replaces the shared _context (looked up when called) and wraps accept_peer with the peer's source port, so
# that a client's row and the server's event are matched by address and port, not by order.
_EC2_CONTEXT = r'''

def _context(server, identity, trust):
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER if server else _ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = _ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_REQUIRED
    ctx.verify_flags |= _ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=trust)
    if identity is not None:
        ctx.load_cert_chain(identity[0], identity[1])
    if server:
        ctx.num_tickets = 0
    return ctx


_own_serial_file = own_serial


def own_serial(identity):
    return _own_serial_file(identity[0])


_accept_peer = accept_peer


def accept_peer(conn, ctx, cfg, local_serial, peer, port, timeout):
    tls, data = _accept_peer(conn, ctx, cfg, local_serial, peer, port, timeout)
    data["peer_port"] = peer[1]
    return tls, data
'''

_CLIENT_EC2_MAIN = r'''
import os as _os
import shutil as _shutil
import subprocess as _subprocess
import tempfile as _tempfile

_create_connection = socket.create_connection
_LAST = {}


def _recording_connection(*args, **kwargs):
    sock = _create_connection(*args, **kwargs)
    _LAST["local"] = sock.getsockname()[:2]
    return sock


socket.create_connection = _recording_connection


def mint_foreign(spec, uri, work):
    """A CA of its own and a leaf for ``uri`` made here with openssl: the key never leaves this instance."""
    ext = _os.path.join(work, "ext.cnf")
    with open(ext, "w") as handle:
        handle.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:%s\n" % uri)
    ossl, p = spec["openssl"], lambda name: _os.path.join(work, name)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [[ossl, "req", "-x509", "-new"] + curve + ["-keyout", p("ca.key"), "-out", p("ca.pem"), "-days", "1",
             "-subj", "/CN=drguard probe foreign CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             [ossl, "req", "-new"] + curve + ["-keyout", p("leaf.key"), "-out", p("leaf.csr"), "-subj", "/"],
             [ossl, "x509", "-req", "-in", p("leaf.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"),
              "-set_serial", "0x%s" % _os.urandom(8).hex(), "-days", "1", "-extfile", ext, "-out", p("leaf.pem")]]
    for argv in steps:
        _subprocess.run(argv, check=True, stdin=_subprocess.DEVNULL, stdout=_subprocess.DEVNULL,
                        stderr=_subprocess.DEVNULL, timeout=30, env={"PATH": "/usr/bin:/bin"})
    return [p("leaf.pem"), p("leaf.key")]


def run_case(spec, case, foreign):
    d = spec["tls_dir"]
    identity = {"own": [_os.path.join(d, "cert.pem"), _os.path.join(d, "key.pem")], "none": None,
                "foreign": foreign}[case["identity"]]
    cfg = {"domain": spec["domain"], "address": case["address"], "port": case["port"],
           "expect_tier": case["expect_tier"], "identity": identity, "trust": _os.path.join(d, "ca.pem"),
           "payload": "ping %s" % case["case"], "timeout": spec["timeout"]}
    _LAST.clear()
    row = once(cfg)
    row["local"] = list(_LAST.get("local") or [None, None])
    return row


def main_ec2():
    spec = json.loads(sys.stdin.read())
    work = _tempfile.mkdtemp(prefix="drguard-mtls-")
    foreign, out = None, []
    try:
        for case in spec["cases"]:
            if case["identity"] == "foreign" and foreign is None:
                try:
                    foreign = mint_foreign(spec, case["foreign_uri"], work)
                except (OSError, _subprocess.SubprocessError) as exc:
                    out.append({"ok": False, "reason": "mint_failed:" + type(exc).__name__, "local": [None, None]})
                    continue
            out.append(run_case(spec, case, foreign))
    finally:
        _shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, sort_keys=True))
    return 0


sys.exit(main_ec2())
'''

# Run as root on the instance: the server's events as one compact line (data and time only).
_COLLECT_SOURCE = r'''
import json, sys
out = []
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                event = json.loads(line)
                if event.get("type") == "drguard.tls.handshake":
                    out.append(dict(event["data"], time=event.get("time")))
except FileNotFoundError:
    out = None
print("%s " + json.dumps(out, sort_keys=True, separators=(",", ":")))
''' % EVENTS_MARK


def _strip_exit(source: str) -> str:
    tail = "\nsys.exit(main(sys.argv))\n"
    if not source.endswith(tail):
        raise RuntimeError("_mtls's program no longer ends with its sys.exit line; update _mtls_ec2")
    return source[:-len(tail)] + "\n"


SERVER_SOURCE = _mtls.shared_source() + _EC2_CONTEXT + _mtls._SERVER_MAIN  # noqa: SLF001 - one server, one source
CLIENT_SOURCE = (_mtls.shared_source() + _EC2_CONTEXT + _strip_exit(_mtls._CLIENT_MAIN)  # noqa: SLF001
                 + _CLIENT_EC2_MAIN)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---------------------------------------------------------------- the plan (pure)

def server_ports(boundary) -> dict:
    """``{tier: [port, ...]}``: every destination of a TCP tier rule and its ports (both ends of a range)."""
    out = {}
    for rule in _mtls.normalise_rules(boundary.tier_rules):
        ports = out.setdefault(rule["to"], [])
        for start, end in rule["ports"]:
            for port in (start, end):
                if port not in ports:
                    ports.append(port)
    return out


def plan_cases(drill_id: str, boundary, units: list) -> list:
    """The handshake cases on ec2, each ``{case, src, dst, port, address, runs_on, identity, expected,
    expected_reason, expect_tier}`` (``identity``: ``own``, ``none`` or ``foreign``).

    Every allowed (source, destination, port) of ``tier_rules`` with the source's identity; against the
    first allowed pair: no client certificate, a certificate of a CA minted on the source instance
    (``another_drill_ca``), and, on the destination over loopback, its own identity when ``tier_rules`` does
    not let the destination reach itself (``identity_not_allowed:<tier>``)."""
    rules = _mtls.normalise_rules(boundary.tier_rules)
    by_tier = {u["tier"]: u for u in units}
    pairs = []
    for rule in rules:
        for start, end in rule["ports"]:
            for port in dict.fromkeys((start, end)):
                if (rule["from"], rule["to"], port) not in pairs:
                    pairs.append((rule["from"], rule["to"], port))

    def case(name, src, dst, port, identity, expected, reason, runs_on=None, address=None):  # noqa: PLR0917
        return {"case": name, "src": src, "dst": dst, "port": port, "runs_on": runs_on or src,
                "address": address or (by_tier.get(dst) or {}).get("address") or "", "identity": identity,
                "expected": expected, "expected_reason": reason, "expect_tier": dst}

    cases = [case("allowed", s, d, p, "own", "allow", "round_trip") for s, d, p in pairs]
    if pairs:
        src, dst, port = pairs[0]
        cases.append(case("no_client_certificate", src, dst, port, "none", "deny", "no_client_certificate"))
        other = "dr-other-%s" % drill_id[-8:].lower().replace("_", "-")
        foreign = case("another_drill_ca", src, dst, port, "foreign", "deny", "unknown_ca")
        foreign["foreign_uri"] = _pki.spiffe_id(other, src)
        cases.append(foreign)
        if not _mtls._CHECKS["rule_allows"](rules, dst, dst, port):  # noqa: SLF001 - the servers' own judgement
            cases.append(case("identity_not_allowed:%s" % dst, dst, dst, port, "own", "deny", "identity_not_allowed",
                              runs_on=dst, address="127.0.0.1"))
    return cases


def omitted_cases() -> list:
    """The netns phase's cases that do not run on ec2, each with why (docs/mtls.md, "On AWS")."""
    return [{"case": name, "reason": why} for name, why in NOT_ON_EC2]


# ---------------------------------------------------------------- the commands (shell lines, no key material)

# Every address of the instance: its tier's security group decides who reaches it, and loopback carries the
# identity_not_allowed case.
ANY_ADDRESS = "0.0.0.0"  # noqa: S104


def server_commands(drill_id: str, tier: str, ports: list, tier_rules, *, lifetime: int,  # noqa: PLR0913
                    tls_dir: str = _runtime_ec2.CERT_DIR, server_dir: str = SERVER_DIR, address: str = ANY_ADDRESS,
                    unprivileged: str = _runtime_ec2.UNPRIVILEGED, python: str = "/usr/bin/python3") -> list:
    """Shell lines (run by SSM as root) that start ``tier``'s mTLS echo server unprivileged in the background for
    at most ``lifetime`` seconds, on ``ports`` of ``address``, with the instance's own bundle, and print
    ``drguard-mtls-ready <tier> serial <serial>`` once it listens (exit 1 otherwise)."""
    config = _mtls.server_config(drill_id=drill_id, tier=tier, address=address, ports=ports,
                                 tier_rules=tier_rules, identity=[tls_dir + "/cert.pem", tls_dir + "/key.pem"],
                                 trust=tls_dir + "/ca.pem")
    d = shlex.quote(server_dir)
    return [
        "set -eu", "umask 077", "install -d -m 0700 %s" % d,
        # an earlier server of this phase (a retried run) would hold the ports
        "if [ -s %s/server.pid ]; then kill -TERM \"$(cat %s/server.pid)\" 2>/dev/null || true; sleep 1; fi" % (d, d),
        "rm -f %s/events.jsonl %s/server.log %s/server.pid" % (d, d, d),
        "setsid timeout -s TERM -k 5 %d %s %s -I -S -c \"$(echo %s | base64 -d)\" \"$(echo %s | base64 -d)\" "
        "> %s/events.jsonl 2> %s/server.log < /dev/null &"
        % (int(lifetime), unprivileged, python, _b64(SERVER_SOURCE), _b64(json.dumps(config, sort_keys=True)), d, d),
        "echo $! > %s/server.pid" % d,
        "for i in $(seq 1 50); do grep -qs '%s' %s/server.log && break; sleep 0.2; done" % (READY_LINE, d),
        "grep -qs '%s' %s/server.log || { tail -c 400 %s/server.log >&2; exit 1; }" % (READY_LINE, d, d),
        "echo \"%s %s $(grep -o 'serial [0-9A-F]*' %s/server.log | head -n 1)\"" % (READY_MARK, tier, d),
    ]


def client_spec(drill_id: str, cases: list, *, timeout: float, tls_dir: str = _runtime_ec2.CERT_DIR,
                openssl: str = OPENSSL) -> dict:
    """The client program's input: paths and public facts only."""
    keep = ("case", "address", "port", "expect_tier", "identity", "foreign_uri")
    return {"domain": _pki.trust_domain(drill_id), "tls_dir": tls_dir, "timeout": float(timeout), "openssl": openssl,
            "cases": [{k: c[k] for k in keep if k in c} for c in cases]}


def client_commands(drill_id: str, cases: list, *, timeout: float) -> list:
    """One shell line running the handshake cases unprivileged (``_runtime_ec2.unprivileged_command``)."""
    return [_runtime_ec2.unprivileged_command(CLIENT_SOURCE, client_spec(drill_id, cases, timeout=timeout))]


def stop_commands(*, server_dir: str = SERVER_DIR, python: str = "/usr/bin/python3") -> list:
    """Shell lines that stop the server (TERM, then KILL), print its handshake events and remove its directory."""
    d = shlex.quote(server_dir)
    return [
        "if [ -s %s/server.pid ]; then pid=\"$(cat %s/server.pid)\"; kill -TERM \"$pid\" 2>/dev/null || true;"
        " for i in $(seq 1 25); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.2; done;"
        " kill -KILL \"$pid\" 2>/dev/null || true; fi" % (d, d),
        "%s -I -S -c \"$(echo %s | base64 -d)\" %s/events.jsonl" % (python, _b64(_COLLECT_SOURCE), d),
        "rm -rf %s" % d,
    ]


# ---------------------------------------------------------------- reading the outputs (pure)

def parse_ready(stdout: str, tier: str):
    """The server's serial from its readiness line, or None when it did not say it listened."""
    for line in (stdout or "").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == [READY_MARK, tier] and parts[2] == "serial" and parts[3]:
            return parts[3]
    return None


def parse_client(stdout: str, count: int):
    """The client's rows (a list of ``count`` dicts), or None when its output is not that."""
    lines = [line for line in (stdout or "").splitlines() if line.strip()]
    try:
        out = json.loads(lines[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(out, list) or len(out) != count or not all(isinstance(r, dict) for r in out):
        return None
    return out


def parse_events(stdout: str):
    """The server's handshake events (a list of dicts), or None when they did not come back whole."""
    for line in (stdout or "").splitlines():
        if line.startswith(EVENTS_MARK + " "):
            try:
                out = json.loads(line[len(EVENTS_MARK) + 1:])
            except ValueError:
                return None
            if isinstance(out, list) and all(isinstance(e, dict) for e in out):
                return out
            return None
    return None


def _unknown(row, why):
    row.update(observed="unknown", reason="no result (%s)" % why, latency_ms=None, peer_id=None, serial=None,
               server_serial=None)
    return row


def build_rows(cases: list, servers: dict, clients: dict) -> list:
    """Rows of layer ``mtls`` in the netns phase's shape, from what came back.

    ``servers``: ``{tier: {"ready": serial or None, "events": [...] or None, "error": str}}``;
    ``clients``: ``{runs_on tier: {"rows": [...] or None, "error": str}}`` (rows in the order of that tier's
    cases). A row is ``unknown`` unless its server listened, its client's result and its server's events
    came back; its ``reason`` is the server's own (matched by the client's address and port)."""
    offsets, rows = {}, []
    for case in cases:
        k = offsets.get(case["runs_on"], 0)
        offsets[case["runs_on"]] = k + 1
        row = {"src": case["src"], "dst": case["dst"], "address": "%s:%d" % (case["address"], case["port"]),
               "layer": "mtls", "case": case["case"], "expected": case["expected"], "observed": None,
               "reason": None, "expected_reason": case["expected_reason"], "latency_ms": None, "peer_id": None,
               "serial": None, "server_serial": None}
        rows.append(row)
        server = servers.get(case["dst"]) or {"error": "no mTLS server for this tier"}
        client = clients.get(case["runs_on"]) or {"error": "no instance for this tier"}
        if not server.get("ready"):
            _unknown(row, server.get("error") or "the server did not confirm it listened")
            continue
        if client.get("rows") is None:
            _unknown(row, client.get("error") or "no client result")
            continue
        if server.get("events") is None:
            _unknown(row, server.get("events_error") or "the server's handshake events did not come back")
            continue
        got = client["rows"][k]
        local = got.get("local") or [None, None]
        event = next((e for e in server["events"] if local[1] is not None and e.get("port") == case["port"]
                      and e.get("peer_address") == local[0] and e.get("peer_port") == local[1]), {})
        row.update(observed="allow" if got.get("ok") else "deny",
                   reason="round_trip" if got.get("ok") else (event.get("reason") or got.get("reason")),
                   latency_ms=got.get("handshake_ms", event.get("latency_ms")), peer_id=event.get("peer_id"),
                   serial=event.get("serial"), server_serial=got.get("server_serial"))
    return rows


# ---------------------------------------------------------------- through SSM

def _command(ssm, iid: str, commands: list, *, timeout: float, comment: str, **kw) -> dict:
    """``_runtime_ec2.run_command`` on one instance, its output kept whole (up to the 24000 characters
    GetCommandInvocation returns; the default cut is 2000): the servers' events need more."""
    return _runtime_ec2.run_command(ssm, [iid], commands, timeout=timeout, comment=comment,
                                    output_limit=SSM_OUTPUT_LIMIT, **kw)[0]


def _what(res, iid) -> str:
    return "SSM command %s on %s ended %s" % (res["command_id"], iid, res["status"])


def public_bundles(sm, drill_id: str, tiers: list) -> dict:
    """``{tier: {"cert": pem, "ca": pem}}`` read from the secret store; the key is dropped at once."""
    out = {}
    for tier in tiers:
        try:
            bundle = json.loads(sm.get_secret_value(
                SecretId=_runtime_ec2.certificate_secret_name(drill_id, tier))["SecretString"])
            out[tier] = {"cert": bundle["cert"], "ca": bundle["ca_bundle"]}
        except (_runtime_ec2.ClientError, ValueError, KeyError, TypeError):
            continue
    return out


def _describe(pem: str, drill_id: str = None) -> dict:
    cert = x509.load_pem_x509_certificate(pem.encode())
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    out = {"serial": _pki.serial_hex(cert), "sha256": hashlib.sha256(cert.public_bytes(
        _pki.serialization.Encoding.DER)).hexdigest(), "not_before": cert.not_valid_before_utc.strftime(fmt),
        "not_after": cert.not_valid_after_utc.strftime(fmt)}
    if drill_id:
        out["spiffe_id"] = None
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
            out["spiffe_id"] = uris[0] if len(uris) == 1 else None
        except x509.ExtensionNotFound:
            pass
    return out


def run(ssm, sm, drill_id: str, boundary, units: list, *, timeout: float = 5.0, command_timeout: float = 60,
        **kw) -> dict:
    """The mtls phase on the ec2 runtime (see the module docstring); the netns phase's result shape."""
    dests = server_ports(boundary)
    if not dests:
        return {"changed": False, "skipped": True, "backend": "ec2", "rows": [], "violations": [], "unexpected": [],
                "handshakes": [], "note": "drill_boundary declares no tcp tier rule: no tier-to-tier call to "
                                          "secure, no mTLS server started"}
    cases = plan_cases(drill_id, boundary, units)
    by_tier = {u["tier"]: u.get("instance_id") for u in units}
    lifetime = int(3 * command_timeout + 60)
    servers = {t: {"ready": None, "events": None} for t in dests}
    clients = {}
    by_runner = {}
    for c in cases:
        by_runner.setdefault(c["runs_on"], []).append(c)
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(dests) + len(by_runner))))

    def start(tier):
        iid = by_tier.get(tier)
        if not iid:
            return {"error": "no instance for this tier"}
        res = _command(ssm, iid, server_commands(drill_id, tier, dests[tier], boundary.tier_rules, lifetime=lifetime),
                       timeout=command_timeout, comment="drguard mtls server", **kw)
        serial = parse_ready(res["stdout"], tier) if res["status"] == "Success" else None
        return {"ready": serial, "sent": True, "error": None if serial else
                "%s without the server's readiness line" % _what(res, iid)}

    def client(tier):
        iid = by_tier.get(tier)
        if not iid:
            return {"rows": None, "error": "no instance for this tier"}
        res = _command(ssm, iid, client_commands(drill_id, by_runner[tier], timeout=timeout),
                       timeout=command_timeout, comment="drguard mtls probes", **kw)
        rows = parse_client(res["stdout"], len(by_runner[tier])) if res["status"] == "Success" else None
        return {"rows": rows, "error": None if rows is not None else
                "%s with no handshake result in its output" % _what(res, iid)}

    def stop(tier):
        iid = by_tier.get(tier)
        res = _command(ssm, iid, stop_commands(), timeout=command_timeout, comment="drguard mtls stop", **kw)
        events = parse_events(res["stdout"]) if res["status"] == "Success" else None
        return {"events": events, "events_error": None if events is not None else
                "%s with no handshake events in its output" % _what(res, iid)}

    try:
        for tier, got in zip(dests, pool.map(start, dests), strict=True):
            servers[tier].update(got)
        for tier, got in zip(by_runner, pool.map(client, by_runner), strict=True):
            clients[tier] = got
    finally:
        # every server that may run is stopped, also after a failure above; its lifetime ends it regardless
        started = [t for t in dests if by_tier.get(t) and servers[t].get("sent", True)]
        for tier, got in zip(started, pool.map(stop, started), strict=True):
            servers[tier].update(got)
        pool.shutdown()
    rows = build_rows(cases, servers, clients)
    bundles = public_bundles(sm, drill_id, _runtime_ec2.runtime_tiers(boundary))
    cas = {b["ca"] for b in bundles.values()}
    handshakes = [dict(e) for t in sorted(servers) for e in servers[t].get("events") or []]
    return {
        "changed": True, "skipped": False, "backend": "ec2", "trust_domain": _pki.trust_domain(drill_id),
        "ca": _describe(next(iter(cas))) if len(cas) == 1 else None,
        "leaves": {t: _describe(b["cert"], drill_id) for t, b in sorted(bundles.items())},
        "servers": [{"tier": t, "address": (next((u for u in units if u["tier"] == t), {}) or {}).get("address"),
                     "instance_id": by_tier.get(t), "ports": p, "serial": servers[t].get("ready"),
                     "reason": servers[t].get("error") or servers[t].get("events_error")}
                    for t, p in sorted(dests.items())],
        "rows": rows, "violations": [r for r in rows if r["observed"] != r["expected"]],
        "unexpected": [r for r in rows if r["observed"] == r["expected"] and r["reason"] != r["expected_reason"]],
        "handshakes": handshakes, "omitted": omitted_cases(),
        "rotation": {"rotated": False, "reason": ROTATION_REASON, "dropped_connections": None,
                     "failed_handshakes": None, "new_serials": [], "held_round_trips": 0},
        "ca_rotation": {"rotated": False, "reason": CA_ROTATION_REASON, "old_ca": None, "new_ca": None,
                        "old_ca_key_destroyed": None},
        "note": "no telemetry collector on AWS: the handshakes are in this result and the report only",
    }
