# Copyright: drguard maintainers
# Apache License 2.0
"""Mutual TLS between the drill's tiers: contexts, authorisation by identity, an echo server, probes.

- TLS 1.3 only, client certificates required, the drill's ``trust.pem`` (its CA, or the old
  and new CA during a CA rotation, each with its CRL: ``VERIFY_CRL_CHECK_LEAF``) as the only
  trust anchors, strict X.509 checks, no session tickets (a resumed session would skip the
  client certificate), TCP_NODELAY on every connection.
- Authorisation is by identity (docs/mtls.md): the peer's certificate is read from its DER
  by our own code (Python's ``ssl`` checks no URI SAN): cA false, KeyUsage digitalSignature,
  the EKU for its role, exactly one SAN and that one a URI, no NUL byte, the drill's trust
  domain, the path ``/tier/<tier>``, and ``tier_rules`` allowing that tier to reach this tier
  on this port. "Signed by our CA" alone is never enough.
- :func:`server_argv` is an mTLS echo server, a self-contained ``python -I -S -c`` program
  (standard library only) run unprivileged inside a tier's namespace. It writes one
  ``drguard.tls.handshake`` CloudEvent per handshake, accepted or refused (peer id, serial,
  reason, latency) to stdout as JSON lines, and reloads its identity and trust on SIGHUP
  (``drguard.tls.reload``) without touching open connections.
- :func:`client_argv` is the probe: a handshake and an application round trip (TLS 1.3 reports
  a refused client certificate only on the first read, so a probe that does not read proves
  nothing), or a soak (a connection held open while new handshakes are made) for rotation.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki

HANDSHAKE_TYPE = "drguard.tls.handshake"
RELOAD_TYPE = "drguard.tls.reload"
HANDSHAKE_TIMEOUT = 5.0
IDLE_TIMEOUT = 60.0

# Shared by the programs and this module: DER reading, identity judgement, reasons, contexts.
_SHARED_SOURCE = _pki.IDENTITY_SOURCE + r'''
import ssl as _ssl

CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
_URI_TAG = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String


def _tlv(buf, i):
    if i + 2 > len(buf):
        raise ValueError("truncated")
    tag, length = buf[i], buf[i + 1]
    i += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or i + n > len(buf):
            raise ValueError("bad length")
        length = int.from_bytes(buf[i:i + n], "big")
        i += n
    if i + length > len(buf):
        raise ValueError("truncated")
    return tag, buf[i:i + length], i + length


def _children(buf):
    out, i = [], 0
    while i < len(buf):
        tag, value, i = _tlv(buf, i)
        out.append((tag, value))
    return out


def _oid(raw):
    if not raw:
        raise ValueError("empty oid")
    parts = [str(min(raw[0] // 40, 2)), str(raw[0] - 40 * min(raw[0] // 40, 2))]
    value = 0
    for byte in raw[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


def leaf_facts(der):
    """serial (hex), ca, key usage digitalSignature, EKU OIDs (None: absent), SANs [(tag, bytes)]."""
    tag, cert, _ = _tlv(der, 0)
    tbs_tag, tbs = _children(cert)[0]
    items = _children(tbs)
    first = 1 if items[0][0] == 0xA0 else 0
    facts = {"serial": "%X" % int.from_bytes(items[first][1], "big"), "ca": False, "digital_signature": False,
             "eku": None, "sans": None}
    for tag, value in items:
        if tag != 0xA3:
            continue
        for _, ext in _children(_children(value)[0][1]):
            parts = _children(ext)
            oid, body = _oid(parts[0][1]), _tlv(parts[-1][1], 0)[1]
            if oid == "2.5.29.19":
                facts["ca"] = any(t == 0x01 and v != b"\x00" for t, v in _children(body))
            elif oid == "2.5.29.15":
                facts["digital_signature"] = len(body) > 1 and bool(body[1] & 0x80)
            elif oid == "2.5.29.37":
                facts["eku"] = [_oid(v) for _, v in _children(body)]
            elif oid == "2.5.29.17":
                facts["sans"] = _children(body)
    return facts


def printable(raw):
    """A URI for an event: ASCII with escapes, at most 200 characters."""
    return raw.decode("latin-1").encode("unicode_escape").decode("ascii")[:200]


def judge_peer(der, domain, purpose):
    """(tier, serial, peer_id, reason): reason None when the certificate is a valid identity."""
    try:
        facts = leaf_facts(der)
    except (ValueError, IndexError):
        return None, None, None, "certificate_malformed"
    serial = facts["serial"]
    if facts["ca"]:
        return None, serial, None, "ca_certificate"
    if not facts["digital_signature"]:
        return None, serial, None, "wrong_key_usage"
    if facts["eku"] is None or (CLIENT_AUTH if purpose == "client" else SERVER_AUTH) not in facts["eku"]:
        return None, serial, None, "wrong_purpose"
    sans = facts["sans"] or []
    if len(sans) != 1 or sans[0][0] != _URI_TAG:
        uris = [printable(v) for t, v in sans if t == _URI_TAG]
        return None, serial, (uris[0] if len(uris) == 1 else None), "san_not_one_uri"
    raw = sans[0][1]
    peer_id = printable(raw)
    if b"\x00" in raw:
        return None, serial, peer_id, "san_nul_byte"
    try:
        uri = raw.decode("ascii")
    except UnicodeDecodeError:
        return None, serial, peer_id, "not_spiffe"
    tier, reason = judge_uri(uri, domain)
    return tier, serial, peer_id, reason


def rule_allows(rules, src, dst, port):
    for rule in rules:
        if rule["from"] == src and rule["to"] == dst and any(a <= port <= b for a, b in rule["ports"]):
            return True
    return False


_VERIFY_REASONS = {2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",
                   7: "bad_signature", 9: "not_yet_valid", 10: "expired", 3: "crl_missing", 12: "crl_expired",
                   23: "revoked", 24: "ca_certificate", 26: "wrong_purpose", 47: "name_constraint_violation",
                   48: "name_constraint_violation", 49: "name_constraint_violation",
                   51: "name_constraint_violation", 53: "name_constraint_violation", 79: "invalid_ca",
                   84: "subject_name_empty", 85: "missing_key_identifier", 86: "missing_key_identifier",
                   87: "bad_san", 88: "bad_san", 89: "invalid_ca"}
_ALERT_REASONS = (("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_certificate"),
                  ("CERTIFICATE_REQUIRED", "no_client_certificate"),
                  ("UNKNOWN_CA", "unknown_ca"), ("CERTIFICATE_EXPIRED", "expired"),
                  ("CERTIFICATE_REVOKED", "revoked"), ("UNSUPPORTED_CERTIFICATE", "wrong_purpose"),
                  ("CERTIFICATE_UNKNOWN", "certificate_refused"), ("BAD_CERTIFICATE", "certificate_refused"),
                  ("PROTOCOL_VERSION", "protocol_version"), ("UNSUPPORTED_PROTOCOL", "protocol_version"),
                  ("WRONG_VERSION_NUMBER", "protocol_version"))


def ssl_reason(exc):
    code = getattr(exc, "verify_code", None)
    if code:
        return _VERIFY_REASONS.get(code, "verify_failed_%d" % code)
    text = ("%s %s" % (getattr(exc, "reason", "") or "", exc)).upper()
    for needle, reason in _ALERT_REASONS:
        if needle in text:
            return reason
    if isinstance(exc, _ssl.SSLEOFError) or isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "closed_by_peer"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timeout"
    return "handshake_failed"


def _context(server, identity, trust):
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER if server else _ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = _ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the URI SAN, judged by judge_peer
    ctx.verify_mode = _ssl.CERT_REQUIRED
    ctx.verify_flags |= _ssl.VERIFY_CRL_CHECK_LEAF | _ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=trust)
    if identity is not None:
        ctx.load_cert_chain(identity)
    if server:
        ctx.num_tickets = 0  # no resumption: every connection presents its certificate
    return ctx


def server_context(identity, trust):
    return _context(True, identity, trust)


def client_context(identity, trust):
    return _context(False, identity, trust)


def linger_close(sock):
    """Close without a reset: a reset would discard the TLS alert still in the peer's receive buffer (TLS 1.3
    shows a refused client certificate on the peer's first read)."""
    import socket as _socket
    try:
        sock.shutdown(_socket.SHUT_WR)
        sock.settimeout(1.0)
        while sock.recv(4096):
            pass
    except (OSError, ValueError):
        pass
    try:
        sock.close()
    except OSError:
        pass


def accept_peer(conn, ctx, cfg, local_serial, peer, port, timeout):
    """The server side of one connection: TCP_NODELAY, the TLS 1.3 handshake (client certificate required),
    the peer's identity judged (``judge_peer``) and authorised by ``cfg["rules"]`` for ``cfg["tier"]`` and
    ``port``. Returns ``(tls, event)``: the session (None when refused: then closed without a reset) and the
    handshake event's data (peer id, serial, accepted, reason, latency)."""
    import socket as _socket
    import time as _time
    start = _time.perf_counter()
    data = {"local_tier": cfg["tier"], "local_serial": local_serial, "port": port, "peer_address": peer[0],
            "peer_id": None, "peer_tier": None, "serial": None, "accepted": False, "reason": None}
    tls = conn
    try:
        conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        conn.settimeout(timeout)
        tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
    except (OSError, ValueError) as exc:
        data.update(reason=ssl_reason(exc), latency_ms=round((_time.perf_counter() - start) * 1000, 3))
        linger_close(tls)
        return None, data
    latency = round((_time.perf_counter() - start) * 1000, 3)
    tier, serial, peer_id, reason = judge_peer(tls.getpeercert(binary_form=True) or b"", cfg["domain"], "client")
    if reason is None and not rule_allows(cfg["rules"], tier, cfg["tier"], port):
        reason = "identity_not_allowed"
    data.update(peer_id=peer_id, peer_tier=tier, serial=serial, accepted=reason is None,
                reason=reason or "allowed", latency_ms=latency)
    if reason is not None:
        linger_close(tls)
        return None, data
    return tls, data


def own_serial(identity):
    import base64
    with open(identity, "rb") as handle:
        text = handle.read().decode("ascii", "replace")
    body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return leaf_facts(base64.b64decode("".join(body.split())))["serial"]
'''

_SERVER_MAIN = r'''
import datetime
import json
import selectors
import signal
import socket
import sys
import threading
import time
import uuid

_LOCK = threading.Lock()
_SLOTS = threading.BoundedSemaphore(256)  # connections served at once; one more is refused server_busy


def emit(cfg, type_, data):
    event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": cfg["source"], "type": type_,
             "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
             "datacontenttype": "application/json", "subject": cfg["tier"], "data": data}
    line = json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n"
    with _LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def handle(cfg, ctx, local_serial, conn, peer, port):
    try:
        serve(cfg, ctx, local_serial, conn, peer, port)
    finally:
        _SLOTS.release()


def serve(cfg, ctx, local_serial, conn, peer, port):
    tls, data = accept_peer(conn, ctx, cfg, local_serial, peer, port, cfg["handshake_timeout"])
    emit(cfg, "drguard.tls.handshake", data)
    if tls is None:
        return
    try:
        tls.settimeout(cfg["idle_timeout"])
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            tls.sendall(chunk)
    except OSError:
        pass
    finally:
        tls.close()


def main(argv):
    cfg = json.loads(argv[1])
    flags = {"reload": False, "stop": False}
    signal.signal(signal.SIGHUP, lambda *_: flags.__setitem__("reload", True))
    signal.signal(signal.SIGTERM, lambda *_: flags.__setitem__("stop", True))
    ctx = server_context(cfg["identity"], cfg["trust"])
    local_serial = own_serial(cfg["identity"])
    sel = selectors.DefaultSelector()
    for port in cfg["ports"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg["address"], port))
        sock.listen(128)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, port)
    sys.stderr.write("mtls server listening on %s ports %s serial %s\n" % (cfg["address"], cfg["ports"], local_serial))
    sys.stderr.flush()
    while not flags["stop"]:
        if flags["reload"]:
            flags["reload"] = False
            try:
                ctx, local_serial = server_context(cfg["identity"], cfg["trust"]), own_serial(cfg["identity"])
                emit(cfg, "drguard.tls.reload", {"local_tier": cfg["tier"], "ok": True, "serial": local_serial})
            except (OSError, ValueError, IndexError) as exc:
                emit(cfg, "drguard.tls.reload", {"local_tier": cfg["tier"], "ok": False, "serial": local_serial,
                                                  "reason": type(exc).__name__})
        for key, _ in sel.select(timeout=0.05):
            try:
                conn, peer = key.fileobj.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(True)
            if not _SLOTS.acquire(blocking=False):
                emit(cfg, "drguard.tls.handshake", {"local_tier": cfg["tier"], "local_serial": local_serial,
                                                     "port": key.data, "peer_address": peer[0], "peer_id": None,
                                                     "peer_tier": None, "serial": None, "accepted": False,
                                                     "reason": "server_busy", "latency_ms": 0.0})
                conn.close()
                continue
            threading.Thread(target=handle, args=(cfg, ctx, local_serial, conn, peer, key.data),
                             daemon=True).start()
    return 0


sys.exit(main(sys.argv))
'''

_CLIENT_MAIN = r'''
import json
import socket
import sys
import time


def connect(cfg):
    """One connection: TCP, TLS handshake, server identity; returns (tls or None, row)."""
    row = {"ok": False, "reason": None, "server_id": None, "server_serial": None}
    try:
        ctx = client_context(cfg.get("identity"), cfg["trust"])
    except (OSError, ValueError) as exc:
        row["reason"] = "identity_unreadable:" + type(exc).__name__
        return None, row
    start = time.perf_counter()  # connect_ms: TCP only; handshake_ms: TCP + TLS, from the same start
    try:
        sock = socket.create_connection((cfg["address"], cfg["port"]), timeout=cfg["timeout"])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        row["connect_ms"] = round((time.perf_counter() - start) * 1000, 3)
        tls = ctx.wrap_socket(sock)
    except (OSError, ValueError) as exc:
        row["reason"] = ssl_reason(exc)
        return None, row
    row["handshake_ms"] = round((time.perf_counter() - start) * 1000, 3)
    tier, serial, peer_id, reason = judge_peer(tls.getpeercert(binary_form=True) or b"", cfg["domain"], "server")
    row.update(server_id=peer_id, server_serial=serial)
    if reason is None and tier != cfg["expect_tier"]:
        reason = "server_identity_mismatch"
    if reason is not None:
        row["reason"] = "server_" + reason if not reason.startswith("server_") else reason
        tls.close()
        return None, row
    return tls, row


def round_trip(tls, payload):
    """Send one line and read it back: the read is where TLS 1.3 reports a refused client certificate."""
    start = time.perf_counter()
    try:
        tls.sendall(payload)
        got = b""
        while not got.endswith(b"\n"):
            chunk = tls.recv(65536)
            if not chunk:
                return "closed_by_peer", None
            got += chunk
    except (OSError, ValueError) as exc:
        return ssl_reason(exc), None
    if got != payload:
        return "echo_mismatch", None
    return None, round((time.perf_counter() - start) * 1000, 3)


def once(cfg):
    tls, row = connect(cfg)
    if tls is None:
        return row
    reason, rtt = round_trip(tls, cfg["payload"].encode() + b"\n")
    tls.close()
    row.update(ok=reason is None, reason=reason or "round_trip", round_trip_ms=rtt)
    return row


def soak(cfg):
    """A held connection with a round trip per tick, and a new handshake per tick, for cfg["duration"] s."""
    held, first = connect(cfg)
    out = {"held": {"serial": first["server_serial"], "round_trips": 0, "failures": []},
           "new": {"handshakes": 0, "failures": [], "serials": []}}
    if held is None:
        out["held"]["failures"].append(first["reason"])
        return out
    payload = cfg["payload"].encode() + b"\n"
    end = time.monotonic() + cfg["duration"]
    while time.monotonic() < end and soak_tick(held, cfg, payload, out):
        time.sleep(cfg["interval"])
    held.close()
    return out


def soak_tick(held, cfg, payload, out):
    """One tick of a soak into ``out``: a round trip on the held connection, then one new handshake (the
    server serials it sees, each change once). False once the held connection failed."""
    reason, _ = round_trip(held, payload)
    if reason:
        out["held"]["failures"].append(reason)
        return False
    out["held"]["round_trips"] += 1
    row = once(cfg)
    out["new"]["handshakes"] += 1
    if not row["ok"]:
        out["new"]["failures"].append(row["reason"])
    elif not out["new"]["serials"] or out["new"]["serials"][-1] != row["server_serial"]:
        out["new"]["serials"].append(row["server_serial"])
    return True


def main(argv):
    cfg = json.loads(argv[1])
    if cfg.get("mode") == "soak":
        print(json.dumps(soak(cfg), sort_keys=True))
    else:
        print(json.dumps([once(cfg) for _ in range(cfg.get("count", 1))], sort_keys=True))
    return 0


sys.exit(main(sys.argv))
'''

SERVER_SOURCE = _SHARED_SOURCE + _SERVER_MAIN
CLIENT_SOURCE = _SHARED_SOURCE + _CLIENT_MAIN
_CHECKS = {}
exec(compile(_SHARED_SOURCE, "<drguard mtls shared>", "exec"), _CHECKS)  # noqa: S102 - our own source text


class MtlsError(Exception):
    """An mTLS operation failed; ``msg`` is one sentence, ``detail`` the structured fields."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- authorisation

def normalise_rules(tier_rules) -> list:
    """``tier_rules`` (``TierRule`` objects or ``{from, to, protocol, ports}`` dicts) as the programs read
    them: TCP rules only, ``ports`` as ``[[start, end], ...]``."""
    out = []
    for rule in tier_rules or ():
        if isinstance(rule, dict):
            src, dst, protocol, ports = rule.get("from"), rule.get("to"), rule.get("protocol", "tcp"), rule.get("ports")
        else:
            src, dst, protocol, ports = rule.source, rule.dest, rule.protocol, rule.ports
        if protocol != "tcp":
            continue
        ranges = []
        for port in ports or ():
            if hasattr(port, "start"):
                ranges.append([port.start, port.end])
            elif isinstance(port, int) and not isinstance(port, bool):
                ranges.append([port, port])
            elif isinstance(port, str) and "-" in port:
                a, b = port.split("-", 1)
                ranges.append([int(a), int(b)])
            else:
                ranges.append([int(port), int(port)])
        out.append({"from": src, "to": dst, "ports": ranges})
    return out


def rule_destinations(rules) -> dict:
    """``{tier: [port, ...]}`` of :func:`normalise_rules`' ``rules``: every destination of a TCP tier rule
    and the ports it declares (both ends of each range), in declaration order."""
    out = {}
    for rule in rules:
        ports = out.setdefault(rule["to"], [])
        for start, end in rule["ports"]:
            for port in (start, end):
                if port not in ports:
                    ports.append(port)
    return out


def _der(peer_cert) -> bytes:
    if isinstance(peer_cert, (bytes, bytearray)):
        return bytes(peer_cert)
    return peer_cert.public_bytes(_pki.serialization.Encoding.DER)


def authorise(peer_cert, tier_rules, local_tier, port, *, drill_id, purpose="client"):
    """``(allowed, peer_tier, reason)`` for a peer certificate (DER bytes or a ``cryptography`` certificate)
    that TLS has already chained to the drill's CA: the same judgement the server program makes.

    ``reason`` is ``allowed`` or one of docs/mtls.md's reasons (``identity_not_allowed`` when the
    identity is valid but ``tier_rules`` does not let that tier reach ``local_tier`` on ``port``)."""
    tier, _serial, _peer_id, reason = _CHECKS["judge_peer"](_der(peer_cert), _pki.trust_domain(drill_id), purpose)
    if reason is None and not _CHECKS["rule_allows"](normalise_rules(tier_rules), tier, local_tier, port):
        reason = "identity_not_allowed"
    return reason is None, tier, reason or "allowed"


def peer_facts(peer_cert) -> dict:
    """What the programs read from a certificate's DER (serial, ca, EKU, SAN tags)."""
    return _CHECKS["leaf_facts"](_der(peer_cert))


# ---------------------------------------------------------------- programs

def _python(python):
    python = python or os.path.realpath(sys.executable)
    if not os.path.isabs(python):
        raise MtlsError("python %r must be an absolute path the namespace's unprivileged user can run" % (python,),
                        field="python")
    return python


def server_config(*, drill_id, tier, address, ports, tier_rules, identity, trust,
                  handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=IDLE_TIMEOUT) -> dict:
    """The echo server's configuration (paths, never key material)."""
    return {"domain": _pki.trust_domain(drill_id), "tier": _pki.spiffe_id(drill_id, tier).rsplit("/", 1)[1],
            "source": "/drguard/drill/%s/tier/%s" % (drill_id, tier), "address": address,
            "ports": [int(p) for p in ports], "rules": normalise_rules(tier_rules), "identity": identity,
            "trust": trust, "handshake_timeout": float(handshake_timeout), "idle_timeout": float(idle_timeout)}


def server_argv(config: dict, python=None) -> list:
    return [_python(python), "-I", "-S", "-c", SERVER_SOURCE, json.dumps(config, sort_keys=True)]


def client_config(*, drill_id, address, port, expect_tier, identity, trust, payload="ping", timeout=5.0,
                  mode="once", count=1, duration=3.0, interval=0.05) -> dict:
    """The probe's configuration; ``identity`` None sends no client certificate."""
    return {"domain": _pki.trust_domain(drill_id), "address": address, "port": int(port),
            "expect_tier": expect_tier, "identity": identity, "trust": trust, "payload": payload,
            "timeout": float(timeout), "mode": mode, "count": int(count), "duration": float(duration),
            "interval": float(interval)}


def client_argv(config: dict, python=None) -> list:
    return [_python(python), "-I", "-S", "-c", CLIENT_SOURCE, json.dumps(config, sort_keys=True)]


def shared_source() -> str:
    """The checks the programs share (DER reading, ``judge_peer``, ``rule_allows``, ``ssl_reason``, the
    contexts), standard library only: another program inside a tier (the db service) runs them with
    ``exec`` from a file of its workload, so it judges peers exactly as the mTLS servers do."""
    return _SHARED_SOURCE


def start_server(ns, config, *, events_path, stderr_path, python=None, wait=10.0) -> int:
    """Spawn the echo server unprivileged in ``ns``; returns its pid once it listens.

    Handshake events go to ``events_path`` (JSON lines), its status line to ``stderr_path``."""
    pid = _netns.spawn(ns, server_argv(config, python), env={}, stdout_path=events_path, stderr_path=stderr_path)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(stderr_path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            text = ""
        if "mtls server listening" in text:
            return pid
        if "Traceback" in text:
            break
        time.sleep(0.02)
    raise MtlsError("the mTLS server in %s did not start listening; read %s" % (ns, stderr_path), namespace=ns,
                    pid=pid)


def probe(ns, config, *, python=None) -> list:
    """Run the probe (``client_config``) unprivileged in ``ns``; returns its rows (mode ``once``) or soak
    summary. Raises :class:`MtlsError` when the probe itself did not run."""
    limit = config["timeout"] * 3 * config["count"] + (config["duration"] * 2 if config["mode"] == "soak" else 0) + 30
    try:
        proc = _netns.run_in(ns, client_argv(config, python), timeout=limit, env={})
    except _netns.NetnsError as exc:
        raise MtlsError("cannot run the mTLS probe in %s: %s" % (ns, exc.msg), namespace=ns) from None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise MtlsError("the mTLS probe in %s failed: %s" % (ns, tail[0]), namespace=ns) from None


def read_events(path, type_=HANDSHAKE_TYPE) -> list:
    """The server's events of ``type_`` from its JSON lines file, in order."""
    out = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    event = json.loads(line)
                    if event.get("type") == type_:
                        out.append(event)
    except FileNotFoundError:
        return []
    return out
