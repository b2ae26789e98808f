# Copyright: drguard maintainers
# Apache License 2.0
"""The mtls phase on the ``ec2`` runtime: mTLS echo servers and handshake probes through SSM Run Command.

docs/mtls.md, "On AWS". Each tier's instance already holds its bundle (``ca.pem``, ``cert.pem``,
``key.pem``) in ``/run/drguard/tls``, fetched from the secret store by the instance itself in the
runtime phase (``_runtime_ec2.deliver_certificates``). This module sends only programs, paths and
public facts; no private key travels in an SSM parameter, an output or a result.

1. One SSM command per destination tier starts the mTLS echo server (``_mtls``'s server and its
   shared checks; only the TLS context differs: leaf and key in two files, CRLs checked when the bundle
   carries them) unprivileged, in the background, with a bounded lifetime (``timeout``), and prints a
   readiness line.
2. One SSM command per instance that runs cases: the handshake cases (every allowed pair with a
   round trip; no client certificate; a certificate of a CA minted on the instance for the probe;
   the destination's own identity, which ``tier_rules`` does not let reach itself, over loopback).
3. The CA rotation, then the leaf rotation (:class:`Rotation`): the phase mints its own CA in the controller's
   PKI store, and every new bundle goes into the tier's secret and is fetched again by the instance itself
   (only the secret's name travels), the server reloading on SIGHUP; an earlier leaf a case presents again is
   a copy kept on the instance that held it. The leaf rotation runs while a connection is held open.
4. One SSM command per instance used stops the server and the held connection and returns the server's
   handshake events (sent also when a step before failed: nothing stays running, and the lifetime ends it
   anyway); the controller's PKI store is destroyed.

A row is known only when its server confirmed it listened, the source's command ended ``Success``
with a readable result and the server's events came back; anything else is ``unknown`` (fail closed).
A rotation is proven only when each of its steps was confirmed by the instances (the certificate's and the
CA bundle's SHA-256, the server's reload with the issued serial, the held connection's result); otherwise
``rotated`` is false with the reason, and the phase fails. On the emulator no command runs, so every row is
``unknown`` and neither rotation is proven.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor

try:
    from cryptography import x509
except ImportError:  # _pki.HAS_CRYPTOGRAPHY
    x509 = None

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2

SERVER_DIR = "/run/drguard/mtls"  # on the instance: root's, 0700; the server's pid, log and events
READY_MARK = "drguard-mtls-ready"
EVENTS_MARK = "drguard-mtls-events"
READY_LINE = "mtls server listening"
SOAK_DIR = "/run/drguard/mtls-soak"  # on the source instance: root's, 0700; the held connection's pid, log, result
KEEP_PREFIX = "keep-"  # <CERT_DIR>/keep-<label>: an earlier leaf of the instance, for a rotation case
TRUST_MARK = "drguard-mtls-trust"
RELOAD_MARK = "drguard-mtls-reloaded"
SOAK_MARK = "drguard-mtls-soak"
SOAK_INTERVAL = 1.0  # seconds between the held connection's ticks: the server's events must fit in one SSM output
SSM_OUTPUT_LIMIT = 24000  # what GetCommandInvocation returns at most of a command's output
OPENSSL = "/usr/bin/openssl"
KEEP_LABEL = re.compile(r"[a-z0-9]{1,16}")
_NO_PROBE_LEAF = ("needs a certificate the drill's CA signs for the probe alone, with its key on the source instance; "
                  "only a tier's own bundle travels to an instance (through its secret)")
NOT_ON_EC2 = (
    ("expired", _NO_PROBE_LEAF),
    ("outside_trust_domain", _NO_PROBE_LEAF),
    ("wrong_eku", _NO_PROBE_LEAF),
    ("ca_true", _NO_PROBE_LEAF),
)

# The instance's bundle: leaf and key in two files; its CA bundle carries CRLs only once the phase's own CA
# issued them (the runtime phase's CA has none: its key was never kept).
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
    with open(trust, "rb") as handle:
        if b"-----BEGIN X509 CRL-----" in handle.read():
            # a bundle with CRLs (the phase's own CA after the CA rotation) is checked against them: a leaf
            # whose CA has no CRL in it is then refused (crl_missing), never accepted unchecked
            ctx.verify_flags |= _ssl.VERIFY_CRL_CHECK_LEAF
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

# Both client programs record the local address of the last connection they opened (rows are matched to the
# server's events by address and source port).
_RECORDING = r"""
_create_connection = socket.create_connection
_LAST = {}


def _recording_connection(*args, **kwargs):
    sock = _create_connection(*args, **kwargs)
    _LAST["local"] = sock.getsockname()[:2]
    return sock


socket.create_connection = _recording_connection
"""

_CLIENT_EC2_MAIN = r'''
import os as _os
import shutil as _shutil
import subprocess as _subprocess
import tempfile as _tempfile



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
    if case["identity"].startswith("keep-"):  # a copy of an earlier leaf of this instance (rotation cases)
        identity = [_os.path.join(d, case["identity"], "cert.pem"), _os.path.join(d, case["identity"], "key.pem")]
    else:
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

# The held connection of the leaf rotation (run unprivileged in the background on the source instance): one
# connection held open with a round trip per tick and one new handshake per tick, until SIGTERM or its
# lifetime (after SIGTERM one more tick); "soak holding" on stderr after the first tick, the result as one JSON line
# on stdout at the end.
_SOAK_EC2_MAIN = r"""
import os as _os
import signal as _signal

_STOP = {"stop": False}


def main_soak():
    spec = json.loads(sys.stdin.read())
    _signal.signal(_signal.SIGTERM, lambda *_: _STOP.__setitem__("stop", True))
    d = spec["tls_dir"]
    cfg = {"domain": spec["domain"], "address": spec["address"], "port": spec["port"],
           "expect_tier": spec["expect_tier"], "identity": [_os.path.join(d, "cert.pem"), _os.path.join(d, "key.pem")],
           "trust": _os.path.join(d, "ca.pem"), "payload": "soak", "timeout": spec["timeout"]}
    started = time.time()
    held, first = connect(cfg)
    out = {"held": {"serial": first["server_serial"], "round_trips": 0, "failures": [],
                    "local": list(_LAST.get("local") or [None, None])},
           "new": {"handshakes": 0, "failures": [], "serials": []}, "started": started}
    if held is None:
        out["held"]["failures"].append(first["reason"])
    payload = b"soak\n"
    end = time.monotonic() + spec["max_seconds"]
    while held is not None and time.monotonic() < end:
        last = _STOP["stop"]  # after SIGTERM, one more tick: a handshake after the rotation's last step
        if not soak_tick(held, cfg, payload, out):
            break
        if out["held"]["round_trips"] == 1:
            sys.stderr.write("soak holding serial %s\n" % first["server_serial"])
            sys.stderr.flush()
        if last:
            break
        time.sleep(spec["interval"])
    if held is not None:
        held.close()
    out["ended"] = time.time()
    print(json.dumps(out, sort_keys=True))
    return 0


sys.exit(main_soak())
"""

# Run as root on a server's instance after its bundle was fetched again: SIGHUP to the server (the child of its
# ``timeout``), then its next drguard.tls.reload event, as "drguard-mtls-reloaded <tier> ok <bool> serial <serial>".
_RELOAD_SOURCE = r"""
import json, os, signal, sys, time
d, tier = sys.argv[1], sys.argv[2]


def reloads():
    out = []
    try:
        with open(os.path.join(d, "events.jsonl"), encoding="utf-8") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("type") == "drguard.tls.reload":
                    out.append(event.get("data") or {})
    except FileNotFoundError:
        pass
    return out


before = len(reloads())
with open(os.path.join(d, "server.pid"), encoding="ascii") as handle:
    pid = int(handle.read())
with open("/proc/%d/task/%d/children" % (pid, pid), encoding="ascii") as handle:
    child = int(handle.read().split()[0])
os.kill(child, signal.SIGHUP)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    got = reloads()[before:]
    if got:
        print("%s %s ok %s serial %s" % ("drguard-mtls-reloaded", tier, "true" if got[-1].get("ok") is True else
                                         "false", got[-1].get("serial")))
        sys.exit(0)
    time.sleep(0.1)
sys.stderr.write("no drguard.tls.reload event within 10 s\n")
sys.exit(1)
"""


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
                 + _RECORDING + _CLIENT_EC2_MAIN)
SOAK_SOURCE = (_mtls.shared_source() + _EC2_CONTEXT + _strip_exit(_mtls._CLIENT_MAIN)  # noqa: SLF001
               + _RECORDING + _SOAK_EC2_MAIN)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---------------------------------------------------------------- the plan (pure)

def server_ports(boundary) -> dict:
    """``{tier: [port, ...]}``: every destination of a TCP tier rule and its ports (both ends of a range)."""
    return _mtls.rule_destinations(_mtls.normalise_rules(boundary.tier_rules))


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


def _stop_pid_line(pid_file: str) -> str:
    return ("if [ -s %s ]; then pid=\"$(cat %s)\"; kill -TERM \"$pid\" 2>/dev/null || true;"
            " for i in $(seq 1 25); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.2; done;"
            " kill -KILL \"$pid\" 2>/dev/null || true; fi" % (pid_file, pid_file))


def stop_commands(*, server_dir: str = SERVER_DIR, python: str = "/usr/bin/python3", soak_dir: str = SOAK_DIR,
                  tls_dir: str = _runtime_ec2.CERT_DIR) -> list:
    """Shell lines that stop the server and a held connection left running (TERM, then KILL), remove the copies
    of earlier leaves kept for the rotation cases, print the server's handshake events and remove its
    directory (sent to every instance the phase used; one without a server prints ``null`` events)."""
    d = shlex.quote(server_dir)
    return [
        _stop_pid_line("%s/soak.pid" % shlex.quote(soak_dir)), "rm -rf %s" % shlex.quote(soak_dir),
        "rm -rf %s/%s*" % (shlex.quote(tls_dir), KEEP_PREFIX),
        _stop_pid_line("%s/server.pid" % d),
        "%s -I -S -c \"$(echo %s | base64 -d)\" %s/events.jsonl" % (python, _b64(_COLLECT_SOURCE), d),
        "rm -rf %s" % d,
    ]


# ---------------------------------------------------------------- rotation on the instances (shell lines, no key)

def keep_lines(label: str, *, tls_dir: str = _runtime_ec2.CERT_DIR) -> list:
    """Copy the instance's current leaf and key into ``<tls_dir>/keep-<label>`` (0700, the workload's), before its
    bundle is fetched again: a rotation case presents that earlier leaf from this instance, so no key travels."""
    if not KEEP_LABEL.fullmatch(label):
        raise ValueError("keep label %r is not [a-z0-9]{1,16}" % label)
    t, keep = shlex.quote(tls_dir), shlex.quote("%s/%s%s" % (tls_dir, KEEP_PREFIX, label))
    return ["rm -rf %s" % keep, "install -d -m 0700 -o 65534 -g 65534 %s" % keep,
            "cp -p %s/cert.pem %s/key.pem %s/" % (t, t, keep)]


def trust_line(*, tls_dir: str = _runtime_ec2.CERT_DIR) -> str:
    """Print the SHA-256 of the CA bundle the instance now holds (``drguard-mtls-trust <hex>``)."""
    return "echo \"%s $(sha256sum %s/ca.pem | cut -d ' ' -f 1)\"" % (TRUST_MARK, shlex.quote(tls_dir))


def reload_lines(tier: str, *, server_dir: str = SERVER_DIR, python: str = "/usr/bin/python3") -> list:
    """SIGHUP the tier's server and print its reload event (``drguard-mtls-reloaded <tier> ok <bool> serial <s>``)."""
    program, where = _b64(_RELOAD_SOURCE), shlex.quote(server_dir)
    return ["%s -I -S -c \"$(echo %s | base64 -d)\" %s %s" % (python, program, where, shlex.quote(tier))]


def refetch_commands(secret: str, region: str, tier: str, *, keep: str | None = None,  # noqa: PLR0913
                     reload: bool = False, tls_dir: str = _runtime_ec2.CERT_DIR, server_dir: str = SERVER_DIR) -> list:
    """What an instance runs in a rotation step: keep a copy of its current leaf (``keep``), fetch its bundle again
    by name with its own role (``_runtime_ec2.fetch_commands``), print the CA bundle's SHA-256 and, on a server's
    instance (``reload``), SIGHUP the server and print its reload event. Only the secret's name travels."""
    kept = keep_lines(keep, tls_dir=tls_dir) if keep else []
    lines = ["set -eu"] + kept + _runtime_ec2.fetch_commands(secret, region)
    return lines + [trust_line(tls_dir=tls_dir)] + (reload_lines(tier, server_dir=server_dir) if reload else [])


def soak_spec(drill_id: str, address: str, port: int, expect_tier: str, *, timeout: float, max_seconds: int,
              tls_dir: str = _runtime_ec2.CERT_DIR, interval: float = SOAK_INTERVAL) -> dict:
    return {"domain": _pki.trust_domain(drill_id), "tls_dir": tls_dir, "address": address, "port": int(port),
            "expect_tier": expect_tier, "timeout": float(timeout), "max_seconds": int(max_seconds),
            "interval": float(interval)}


def soak_start_commands(spec: dict, *, lifetime: int, soak_dir: str = SOAK_DIR,
                        unprivileged: str = _runtime_ec2.UNPRIVILEGED, python: str = "/usr/bin/python3") -> list:
    """Start the held connection unprivileged in the background for at most ``lifetime`` seconds; print
    ``drguard-mtls-soak holding serial <serial>`` once it held its connection for a first tick (exit 1 otherwise)."""
    d = shlex.quote(soak_dir)
    return [
        "set -eu", "umask 077", "install -d -m 0700 %s" % d, _stop_pid_line("%s/soak.pid" % d),
        "rm -f %s/soak.json %s/soak.log %s/soak.pid" % (d, d, d),
        "echo %s | base64 -d | setsid timeout -s TERM -k 5 %d %s %s -I -S -c \"$(echo %s | base64 -d)\" "
        "> %s/soak.json 2> %s/soak.log &"
        % (_b64(json.dumps(spec, sort_keys=True)), int(lifetime), unprivileged, python, _b64(SOAK_SOURCE), d, d),
        "echo $! > %s/soak.pid" % d,
        "for i in $(seq 1 50); do grep -qs 'soak holding' %s/soak.log && break; sleep 0.2; done" % d,
        "grep -qs 'soak holding' %s/soak.log || { tail -c 400 %s/soak.log >&2; exit 1; }" % (d, d),
        "echo \"%s holding $(grep -o 'serial [0-9A-F]*' %s/soak.log | head -n 1)\"" % (SOAK_MARK, d),
    ]


def soak_stop_commands(*, soak_dir: str = SOAK_DIR) -> list:
    """End the held connection (TERM: it stops at its next tick and prints its result) and print that result
    (``drguard-mtls-soak-result <json>``)."""
    d = shlex.quote(soak_dir)
    return [_stop_pid_line("%s/soak.pid" % d),
            "echo \"%s-result $(tail -n 1 %s/soak.json 2>/dev/null)\"" % (SOAK_MARK, d),
            "rm -rf %s" % d]


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


def _marked_json(stdout: str, mark: str):
    """``(True, value)`` of the JSON after the first line starting ``<mark> ``; ``(False, None)`` when there is
    no such line or its JSON does not parse."""
    for line in (stdout or "").splitlines():
        if line.startswith(mark + " "):
            try:
                return True, json.loads(line[len(mark) + 1:])
            except ValueError:
                return False, None
    return False, None


def parse_events(stdout: str):
    """The server's handshake events (a list of dicts), or None when they did not come back whole."""
    found, out = _marked_json(stdout, EVENTS_MARK)
    if found and isinstance(out, list) and all(isinstance(e, dict) for e in out):
        return out
    return None


def parse_reloaded(stdout: str, tier: str):
    """``(ok, serial)`` of the server's reload event as printed by :func:`reload_lines`, or None."""
    for line in (stdout or "").splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[:3] == [RELOAD_MARK, tier, "ok"] and parts[4] == "serial":
            return parts[3] == "true", parts[5]
    return None


def parse_trust(stdout: str):
    """The SHA-256 (hex) of the CA bundle the instance holds, as printed by :func:`trust_line`, or None."""
    for line in (stdout or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == TRUST_MARK and re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            return parts[1]
    return None


def parse_soak_holding(stdout: str):
    """The serial the held connection saw first, or None when the soak did not say it held its connection."""
    for line in (stdout or "").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:3] == [SOAK_MARK, "holding", "serial"] and parts[3]:
            return parts[3]
    return None


def parse_soak(stdout: str):
    """The held connection's result (``held``, ``new``, ``started``, ``ended``), or None when it is not whole."""
    found, out = _marked_json(stdout, SOAK_MARK + "-result")
    if not found:
        return None
    try:
        ok = (isinstance(out["held"]["failures"], list) and isinstance(out["held"]["round_trips"], int)
              and isinstance(out["new"]["failures"], list) and isinstance(out["new"]["serials"], list)
              and isinstance(out["new"]["handshakes"], int) and isinstance(out["started"], (int, float))
              and isinstance(out["ended"], (int, float)))
    except (KeyError, TypeError):
        return None
    return out if ok else None


def _epoch(stamp) -> float | None:
    try:
        return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def judge_leaf_rotation(soak, events, *, old_serial: str, new_serial: str, steps: list) -> dict:
    """The leaf rotation's verdict from what came back (pure): the held connection's result, the server's
    handshake events (None: they did not come back) and the rotation's steps (each ``confirmed`` or not).

    ``rotated`` only when every step was confirmed, the held connection's result and the server's events came
    back, and a new handshake showed the new serial; ``dropped_connections`` / ``failed_handshakes`` are None
    when what they count did not come back (never 0 by default)."""
    out = {"rotated": False, "dropped_connections": None, "failed_handshakes": None, "new_serials": [],
           "held_round_trips": 0, "held_serial": None, "new_handshakes": 0, "old_serial": old_serial,
           "new_serial": new_serial, "steps": steps}
    reasons = ["step %s on %s: %s" % (st["step"], st["tier"], st["reason"]) for st in steps if not st["confirmed"]]
    if soak is None:
        reasons.append("the held connection's result did not come back")
    else:
        out.update(dropped_connections=1 if soak["held"]["failures"] else 0,
                   held_round_trips=soak["held"]["round_trips"], held_serial=soak["held"].get("serial"),
                   new_handshakes=soak["new"]["handshakes"], new_serials=list(soak["new"]["serials"]))
        if events is None:
            reasons.append("the server's handshake events did not come back")
        else:
            # as on netns: every handshake the server refused while the connection was held (an event without a
            # readable time counts as refused meanwhile: fail closed)
            refused = sum(1 for e in events if not e.get("accepted")
                          and (_epoch(e.get("time")) is None
                               or soak["started"] <= _epoch(e.get("time")) <= soak["ended"]))
            out["failed_handshakes"] = len(soak["new"]["failures"]) + refused
        if new_serial not in soak["new"]["serials"]:
            reasons.append("no new handshake during the rotation presented the new serial %s" % new_serial)
    if not reasons:
        out["rotated"] = True
    else:
        out["reason"] = "not proven: %s" % "; ".join(reasons)
    return out


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
        batch = case.get("batch", case["runs_on"])  # one client command per batch (a rotation case: its own)
        k = offsets.get(batch, 0)
        offsets[batch] = k + 1
        row = {"src": case["src"], "dst": case["dst"], "address": "%s:%d" % (case["address"], case["port"]),
               "layer": "mtls", "case": case["case"], "expected": case["expected"], "observed": None,
               "reason": None, "expected_reason": case["expected_reason"], "latency_ms": None, "peer_id": None,
               "serial": None, "server_serial": None}
        rows.append(row)
        server = servers.get(case["dst"]) or {"error": "no mTLS server for this tier"}
        client = clients.get(case.get("batch", case["runs_on"])) or {"error": "no instance for this tier"}
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


ROUNDS = 14  # sequential command rounds of the phase at most (start, cases, 3 CA steps, 3 probes, soak, 2 leaf
# steps, soak stop, rotated-out probe, stop): a server or held connection lives at most ROUNDS x command_timeout + 60


def _split_identity(data: bytes):
    """A store's ``tier-<tier>.pem`` (certificate, then key) as ``(cert_pem, key_pem)`` text."""
    text = data.decode("ascii")
    cut = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")
    return text[:cut], text[cut:]


def _pem_certs(text: str) -> list:
    return [x509.load_pem_x509_certificate(m.group(0).encode())
            for m in re.finditer(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text or "", re.S)]


class Rotation:
    """The CA rotation then the leaf rotation on the instances (docs/mtls.md, "On AWS"), driven from the controller.

    The phase mints its own CA in the controller's PKI store (``/dev/shm/drguard-<drill id>-mtls/pki``, destroyed
    when the phase ends); every bundle reaches its instance through its secret (``put_secret_value``) and the
    instance's own fetch (``_runtime_ec2.fetch_commands``); a server reloads on SIGHUP. Each step is confirmed by
    what the instances print (the certificate's and the CA bundle's SHA-256, the server's reload with the issued
    serial) or it is not, and an unconfirmed step makes its rotation not proven. The steps always run to the end,
    so that every tier's secret ends with the phase's CA, its CRL and a leaf of it."""

    def __init__(self, ssm, sm, drill_id, boundary, units, *, ready, timeout, command_timeout, lifetime,  # noqa: PLR0913
                 leaf_lifetime=_pki.DEFAULT_LEAF_LIFETIME, kw=None):
        self.ssm, self.sm, self.drill_id, self.units = ssm, sm, drill_id, units
        self.ready = ready  # {server tier: serial or None}
        self.timeout, self.command_timeout, self.lifetime = timeout, command_timeout, lifetime
        self.leaf_lifetime, self.kw = leaf_lifetime, kw or {}
        self.tiers = _runtime_ec2.runtime_tiers(boundary)
        self.servers = list(server_ports(boundary))
        self.by_tier = {u["tier"]: u.get("instance_id") for u in units}
        self.address = {u["tier"]: u.get("address") or "" for u in units}
        self.region = sm.meta.region_name
        self.root = _mtls_drill.root_dir(drill_id)
        self.store = _pki.Store(drill_id, os.path.join(self.root, "pki"))
        self.cases, self.clients, self.steps = [], {}, []
        self.held = {"result": None}

    # ------------------------------------------------------------ through the secret store and SSM
    def _secret(self, tier):
        return _runtime_ec2.certificate_secret_name(self.drill_id, tier)

    def read_bundles(self):
        out = {}
        for tier in self.tiers:
            try:
                out[tier] = json.loads(self.sm.get_secret_value(SecretId=self._secret(tier))["SecretString"])
                if not all(isinstance(out[tier].get(k), str) for k in ("ca_bundle", "cert", "key")):
                    return None, "the %s tier's bundle in secret %s is not readable" % (tier, self._secret(tier))
            except (_runtime_ec2.ClientError, ValueError, KeyError, TypeError, AttributeError):
                return None, "the %s tier's bundle in secret %s is not readable" % (tier, self._secret(tier))
        return out, None

    def deliver(self, name, bundles, *, keep=None, expect=None):
        """Put every tier's bundle in its secret, then have each instance fetch it again (and its server reload);
        records one step per tier. ``expect``: {server tier: the serial its reload must show}."""
        keep, expect = keep or {}, expect or {}
        for tier, bundle in bundles.items():
            self.sm.put_secret_value(SecretId=self._secret(tier), SecretString=json.dumps(bundle))

        def one(tier):
            iid = self.by_tier.get(tier)
            step = {"step": name, "tier": tier, "instance_id": iid, "confirmed": False}
            if not iid:
                return dict(step, reason="no instance for this tier")
            reload = tier in expect
            res = _command(self.ssm, iid, refetch_commands(self._secret(tier), self.region, tier,
                                                           keep=keep.get(tier), reload=reload),
                           timeout=self.command_timeout, comment="drguard mtls rotation", **self.kw)
            bundle = bundles[tier]
            sha = hashlib.sha256(bundle["cert"].encode()).hexdigest()
            if res["status"] != "Success":
                return dict(step, reason="%s" % _what(res, iid))
            if "delivered %s" % sha not in res["stdout"].split("\n"):
                return dict(step, reason="%s without confirming the certificate" % _what(res, iid))
            if parse_trust(res["stdout"]) != hashlib.sha256(bundle["ca_bundle"].encode()).hexdigest():
                return dict(step, reason="%s without confirming the CA bundle" % _what(res, iid))
            if reload:
                got = parse_reloaded(res["stdout"], tier)
                if got is None or got[0] is not True:
                    return dict(step, reason="%s without the server's reload" % _what(res, iid))
                if got[1] != expect[tier]:
                    return dict(step, reason="the server reloaded with serial %s, not the issued %s"
                                % (got[1], expect[tier]))
            return dict(step, confirmed=True, reason="confirmed by the instance")

        with ThreadPoolExecutor(max_workers=max(1, min(8, len(bundles)))) as pool:
            got = list(pool.map(one, list(bundles)))
        self.steps.extend(got)
        return got

    def probe(self, name, src, dst, port, identity, expected, reason, *, loopback=False):  # noqa: PLR0917
        """One rotation case, a client command of its own on the instance that holds ``identity``."""
        runs_on = dst if loopback else src
        case = {"case": name, "src": runs_on, "dst": dst, "port": port, "runs_on": runs_on, "batch": name,
                "address": "127.0.0.1" if loopback else self.address.get(dst, ""), "identity": identity,
                "expected": expected, "expected_reason": reason, "expect_tier": dst}
        self.cases.append(case)
        iid = self.by_tier.get(runs_on)
        if not iid:
            self.clients[name] = {"rows": None, "error": "no instance for this tier"}
            return
        res = _command(self.ssm, iid, client_commands(self.drill_id, [case], timeout=self.timeout),
                       timeout=self.command_timeout, comment="drguard mtls probes", **self.kw)
        rows = parse_client(res["stdout"], 1) if res["status"] == "Success" else None
        self.clients[name] = {"rows": rows, "error": None if rows is not None else
                              "%s with no handshake result in its output" % _what(res, iid)}

    # ------------------------------------------------------------ the rotations
    def _own(self, tier):
        with open(self.store.tier_file(tier), "rb") as handle:
            return _split_identity(handle.read())

    def _trust(self):
        with open(self.store.trust_file(), "rb") as handle:
            return handle.read().decode("ascii")

    def run(self, pair) -> tuple:
        """``(rotation, ca_rotation)`` before the rows are judged (see :meth:`finish`)."""
        src, dst, port = pair
        current, why = self.read_bundles()
        old_cas = {b["ca_bundle"] for b in (current or {}).values()}
        if current is not None and len(old_cas) != 1:
            why = "the tiers' bundles in the secret store do not share one CA bundle"
        certs = _pem_certs(next(iter(old_cas))) if current is not None and len(old_cas) == 1 else []
        if why is None and len(certs) != 1:
            why = "the runtime phase's CA bundle does not hold exactly one CA certificate"
        ttl = int((certs[0].not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) \
            if certs else 0
        if why is None and ttl < _pki.MIN_CA_LEFT:
            why = "the runtime phase's CA expires too soon for a new CA"
        if why is not None:
            reason = "not proven: %s; nothing was rotated" % why
            return ({"rotated": False, "reason": reason, "dropped_connections": None, "failed_handshakes": None,
                     "new_serials": [], "held_round_trips": 0, "steps": []},
                    {"rotated": False, "reason": reason, "old_ca": None, "new_ca": None,
                     "old_ca_key_destroyed": None, "steps": []})
        old_ca = certs[0]
        self.old_ca = _pki.serial_hex(old_ca)
        self.old_ca_key_stored = self._ca_key_stored(current, old_ca)
        lifetime = min(self.leaf_lifetime, ttl)
        _pki.destroy(self.root)  # a PKI left by an interrupted run of this phase: never reused
        self.store.present([t for t in self.tiers if t != _pki.VALIDATION_TIER], ttl, lifetime)
        state = self.store.state()
        self.new_ca = state["cas"][-1]
        leaf1 = {t: self._own(t) for t in self.tiers}
        serial1 = {t: state["leaves"][t]["serial"] for t in self.tiers}
        overlap = next(iter(old_cas)).rstrip("\n") + "\n" + _pki.cert_pem(self.store.ca_cert(self.new_ca)).decode()
        old_serial = {t: _pki.serial_hex(x509.load_pem_x509_certificate(current[t]["cert"].encode()))
                      for t in self.tiers}
        servers = [t for t in self.servers if self.ready.get(t)]  # a server that never listened is not reloaded
        # CA rotation: 1. the overlap bundle (old + new CA) with the leaves of the old CA, everywhere first
        self.ca_steps = self.deliver("ca_overlap_trust", {t: dict(current[t], ca_bundle=overlap) for t in self.tiers},
                                     keep={src: "ca0"}, expect={t: old_serial[t] for t in servers})
        # 2. the leaves of the new CA
        new_leaves = {t: {"ca_bundle": overlap, "cert": leaf1[t][0], "key": leaf1[t][1]} for t in self.tiers}
        self.ca_steps += self.deliver("ca_new_leaves", new_leaves, expect={t: serial1[t] for t in servers})
        self.probe("old_ca_leaf_during_overlap", src, dst, port, KEEP_PREFIX + "ca0", "allow", "round_trip")
        # 3. the new CA only, with its CRL: the old CA is no longer trusted anywhere
        trust = self._trust()
        retired = {t: {"ca_bundle": trust, "cert": leaf1[t][0], "key": leaf1[t][1]} for t in self.tiers}
        self.ca_steps += self.deliver("ca_retire_old", retired, expect={t: serial1[t] for t in servers})
        self.probe("after_ca_rotation", src, dst, port, "own", "allow", "round_trip")
        self.probe("old_ca_leaf_after_retirement", src, dst, port, KEEP_PREFIX + "ca0", "deny", "unknown_ca")
        self.expected_server_serial = serial1[dst]
        # Leaf rotation under the new CA, with a connection held open from src to dst meanwhile
        leaf_steps = [self._start_soak(src, dst, port)]
        state = self.store.state()
        self.store.write_leaf(state, self.store.issuing_ca(state), dst, lifetime)
        self.store.write_trust(state)
        self.store.save(state)
        new_cert, new_key = self._own(dst)
        self.new_serial = self.store.state()["leaves"][dst]["serial"]
        leaf_steps += self.deliver("leaf_new", {dst: {"ca_bundle": trust, "cert": new_cert, "key": new_key}},
                                   keep={dst: "rotated"}, expect={dst: self.new_serial} if dst in servers else {})
        self.store.retire()  # the superseded leaf revoked in the CA's CRL
        trust = self._trust()
        leaf_steps += self.deliver("leaf_revoke_old", {t: {"ca_bundle": trust, "cert": self._own(t)[0],
                                                           "key": self._own(t)[1]} for t in self.tiers},
                                   expect={t: self.store.state()["leaves"][t]["serial"] for t in servers})
        leaf_steps.append(self._stop_soak(src))
        self.leaf_steps, self.old_serial, self.pair = leaf_steps, serial1[dst], "%s->%s:%d" % (src, dst, port)
        self.probe("rotated_out_leaf", dst, dst, port, KEEP_PREFIX + "rotated", "deny", "revoked", loopback=True)
        return None, None

    def _start_soak(self, src, dst, port):
        iid = self.by_tier.get(src)
        step = {"step": "held_connection", "tier": src, "instance_id": iid, "confirmed": False}
        if not iid:
            return dict(step, reason="no instance for this tier")
        spec = soak_spec(self.drill_id, self.address.get(dst, ""), port, dst, timeout=self.timeout,
                         max_seconds=self.lifetime)
        res = _command(self.ssm, iid, soak_start_commands(spec, lifetime=self.lifetime + 10),
                       timeout=self.command_timeout, comment="drguard mtls held connection", **self.kw)
        serial = parse_soak_holding(res["stdout"]) if res["status"] == "Success" else None
        self.steps.append(dict(step, confirmed=serial is not None,
                               reason="holding, server serial %s" % serial if serial else
                               "%s without the held connection's first round trip" % _what(res, iid)))
        return self.steps[-1]

    def _stop_soak(self, src):
        iid = self.by_tier.get(src)
        step = {"step": "held_connection_result", "tier": src, "instance_id": iid, "confirmed": False}
        if not iid:
            return dict(step, reason="no instance for this tier")
        res = _command(self.ssm, iid, soak_stop_commands(), timeout=self.command_timeout,
                       comment="drguard mtls held connection", **self.kw)
        self.held["result"] = parse_soak(res["stdout"]) if res["status"] == "Success" else None
        self.steps.append(dict(step, confirmed=self.held["result"] is not None,
                               reason="result read" if self.held["result"] is not None else
                               "%s without the held connection's result" % _what(res, iid)))
        return self.steps[-1]

    def _ca_key_stored(self, bundles, ca) -> bool:
        """True when a private key in the drill's secrets or in the controller's PKI directory is the CA's."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        mine = ca.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        keys = [b["key"].encode() for b in bundles.values()]
        if os.path.isdir(self.store.dir):
            for name in os.listdir(self.store.dir):
                if name.endswith(".key"):
                    with open(os.path.join(self.store.dir, name), "rb") as handle:
                        keys.append(handle.read())
        for pem in keys:
            try:
                key = serialization.load_pem_private_key(pem, None)
            except (ValueError, TypeError):
                continue
            if key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo) == mine:
                return True
        return False

    def finish(self, rows, events) -> tuple:
        """The verdicts, once the rows are judged and the server's events (of the rotated tier) came back."""
        by_case = {r["case"]: r for r in rows}
        ca_reasons = ["step %s on %s: %s" % (st["step"], st["tier"], st["reason"])
                      for st in self.ca_steps if not st["confirmed"]]
        dst = self.pair.split("->")[1].split(":")[0]
        if not self.ready.get(dst):
            ca_reasons.insert(0, "the mTLS server of tier %s did not confirm it listened" % dst)
        ca_reasons += ["case %s has %s" % (c, by_case[c]["reason"]) for c in
                       ("old_ca_leaf_during_overlap", "after_ca_rotation", "old_ca_leaf_after_retirement")
                       if c in by_case and by_case[c]["observed"] == "unknown"]
        after = by_case.get("after_ca_rotation") or {}
        if after.get("observed") == "allow" and after.get("server_serial") != self.expected_server_serial:
            ca_reasons.append("after the CA rotation the server presented serial %s, not the issued %s"
                              % (after.get("server_serial"), self.expected_server_serial))
        ca = {"rotated": not ca_reasons, "old_ca": self.old_ca, "new_ca": self.new_ca,
              # the runtime phase's CA key lived only in that module's memory (_runtime_ec2.ensure_certificates):
              # true when no private key of the drill's secrets or of the PKI directory is that CA's
              "old_ca_key_destroyed": not self.old_ca_key_stored,
              "old_ca_key_check": "never stored: no private key in the drill's secrets or in the controller's PKI "
                                  "directory is the runtime phase's CA key (it was made in memory only)"
              if not self.old_ca_key_stored else "a stored private key is the runtime phase's CA key",
              "new_server_serial": after.get("server_serial"), "steps": self.ca_steps}
        if ca_reasons:
            ca["reason"] = "not proven: %s" % "; ".join(ca_reasons)
        leaf = judge_leaf_rotation(self.held["result"], events, old_serial=self.old_serial,
                                   new_serial=self.new_serial, steps=self.leaf_steps)
        leaf["pair"] = self.pair
        return leaf, ca


def run(ssm, sm, drill_id: str, boundary, units: list, *, timeout: float = 5.0, command_timeout: float = 60,
        leaf_lifetime: int = _pki.DEFAULT_LEAF_LIFETIME, **kw) -> dict:
    """The mtls phase on the ec2 runtime (see the module docstring); the netns phase's result shape."""
    dests = server_ports(boundary)
    if not dests:
        return {"changed": False, "skipped": True, "backend": "ec2", "rows": [], "violations": [], "unexpected": [],
                "handshakes": [], "note": "drill_boundary declares no tcp tier rule: no tier-to-tier call to "
                                          "secure, no mTLS server started"}
    cases = plan_cases(drill_id, boundary, units)
    by_tier = {u["tier"]: u.get("instance_id") for u in units}
    lifetime = int(ROUNDS * command_timeout + 60)
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

    pair = next(((c["src"], c["dst"], c["port"]) for c in cases if c["case"] == "allowed"), None)
    rotation = Rotation(ssm, sm, drill_id, boundary, units, ready={}, timeout=timeout, command_timeout=command_timeout,
                        lifetime=lifetime, leaf_lifetime=leaf_lifetime, kw=kw)
    early = (None, None)
    try:
        for tier, got in zip(dests, pool.map(start, dests), strict=True):
            servers[tier].update(got)
        for tier, got in zip(by_runner, pool.map(client, by_runner), strict=True):
            clients[tier] = got
        rotation.ready = {t: servers[t].get("ready") for t in dests}
        early = rotation.run(pair)
    finally:
        # every server that may run is stopped, and the held connection and the kept leaves on the rotation's
        # instances removed, also after a failure above; their lifetime ends them regardless
        started = [t for t in dests if by_tier.get(t) and servers[t].get("sent", True)]
        for tier, got in zip(started, pool.map(stop, started), strict=True):
            servers[tier].update(got)
        others = [t for t in dict.fromkeys(pair[:2]) if t not in started and by_tier.get(t)]
        list(pool.map(stop, others))
        pool.shutdown()
        # the phase's CA key and leaves on the controller: overwritten and removed now (nothing renews on ec2)
        pki_destroyed = _mtls_drill.destroy(drill_id)
    rows = build_rows(cases + rotation.cases, servers, dict(clients, **rotation.clients))
    if early[0] is not None:
        leaf_rotation, ca_rotation = early
    else:
        leaf_rotation, ca_rotation = rotation.finish(rows, servers.get(pair[1], {}).get("events"))
        ca_rotation["new_ca_key_destroyed"] = bool(pki_destroyed) and not os.path.lexists(rotation.root)
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
        "rotation": leaf_rotation, "ca_rotation": ca_rotation,
        "pki_destroyed": _mtls_drill.root_dir(drill_id) if pki_destroyed else None,
        "note": "no telemetry collector on AWS: the handshakes are in this result and the report only",
    }
