# Copyright: drguard maintainers
# Apache License 2.0
"""The drill's isolated telemetry pipeline: CloudEvents 1.0 as JSON lines, collector and sender.

- :func:`cloud_event` builds one event (``specversion`` 1.0, unique ``id``, RFC 3339 UTC
  ``time``, ``datacontenttype`` application/json); :func:`encode_events` turns a list of them
  into the JSON lines a sender reads.
- :func:`collector_argv` is the collector: a self-contained ``python -c`` program (standard
  library only) that runs unprivileged inside the telemetry namespace, accepts many senders
  over TCP, judges each newline-delimited event, writes each valid one as one JSON line to
  its stdout (the caller points stdout at ``<output_dir>/telemetry.jsonl``) with the
  ``receivedat`` extension attribute, records each invalid one as a
  ``drguard.telemetry.rejected`` line without its content, and answers every line with one
  acknowledgement (``ok`` or ``rejected <reason>``), sent only after the line is written.
- :func:`sender_argv` is the sender: JSON lines on stdin to the collector; exit 0 only when
  every event was acknowledged ``ok``, otherwise exit 1 with one line on stderr.
- :func:`summarise` counts the collector's file for the report; a line the collector cannot
  have written counts as corrupt (fail closed), it is never skipped.

The checks the collector applies are written once (``_SHARED_SOURCE``): the collector runs
them as part of its program text and this module executes the same text for
:func:`validate_event`, :func:`cloud_event` and :func:`summarise`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat
import sys
import uuid

from ansible_collections.drguard.sandbox.plugins.module_utils import _io
from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets

# Limits of the collector (docs/runtime.md, "Telemetry").
MAX_LINE = 64 * 1024  # bytes of one event line as sent
MAX_TOTAL = 64 * 1024 * 1024  # bytes the collector writes in all; past it, events are rejected collector_full
MAX_CONNECTIONS = 64  # concurrent senders; one more is answered "rejected collector_busy"
IDLE_TIMEOUT = 30.0  # seconds a sender may stay silent before the collector closes its connection
CONNECT_TIMEOUT = 10.0  # seconds the sender keeps trying to connect (the collector may be starting)
READ_TIMEOUT = 10.0  # seconds the sender waits for any one acknowledgement

HANDSHAKE_TIMEOUT = 5.0  # seconds a sender has for the TLS handshake

REJECTED_TYPE = "drguard.telemetry.rejected"
REFUSED_TYPE = "drguard.telemetry.refused"  # a connection refused by the TLS handshake or the identity check
COLLECTOR = "telemetry"  # the collector's identity: spiffe://<drill id>.drguard.internal/telemetry
CONTROL_PLANE = "control-plane"  # the drill's own identity as a sender: spiffe://<...>/control-plane
_IN_IDENTITY = _netns.WORKLOAD_IN + "/identity.pem"
_IN_TRUST = _netns.WORKLOAD_IN + "/trust.pem"
COLLECTOR_EVENT_SOURCE = "/drguard/telemetry/collector"
# A line of the collector's file is at most one event re-encoded as ASCII plus receivedat.
_MAX_FILE_LINE = 8 * MAX_LINE

# Shared by the collector program and this module: the one definition of a valid event.
_SHARED_SOURCE = r'''
import datetime as _dt
import json as _json
import re as _re

MAX_LINE = 65536
RESERVED_PREFIX = "drguard.telemetry."
_TIME = _re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
_TYPE = _re.compile(r"^drguard\.[a-z0-9][a-z0-9_.-]*$")
_EXTENSION = _re.compile(r"^[a-z0-9]{1,20}$")
_REQUIRED = ("specversion", "id", "source", "type", "time")
_STRINGS = ("id", "source", "type", "time", "subject", "dataschema", "datacontenttype")
_KNOWN = frozenset(("specversion", "data", "data_base64") + _STRINGS)
_MAX_ATTRIBUTE = 1024


class _Duplicate(ValueError):
    pass


def _pairs(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(key)
        obj[key] = value
    return obj


def _no_constant(name):
    raise ValueError(name)


def now_rfc3339():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def loads_strict(raw):
    """bytes -> (value, None) or (None, reason): UTF-8, one JSON value, no NaN, no duplicate key."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    try:
        return _json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant), None
    except _Duplicate:
        return None, "duplicate_key"
    except RecursionError:
        return None, "too_deep"
    except ValueError:
        return None, "not_json"


def check_event(obj):
    """The reason ``obj`` is not a valid drguard CloudEvent, or None when it is one."""
    if not isinstance(obj, dict):
        return "not_object"
    for name in _REQUIRED:
        if name not in obj:
            return "missing_attribute:" + name
    if obj["specversion"] != "1.0":
        return "specversion_not_1.0"
    for name in _STRINGS:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str) or not value or len(value) > _MAX_ATTRIBUTE:
                return "bad_attribute:" + name
    if not _TYPE.match(obj["type"]):
        return "type_not_drguard"
    if not _TIME.match(obj["time"]):
        return "bad_attribute:time"
    if obj.get("datacontenttype", "application/json") != "application/json":
        return "bad_attribute:datacontenttype"
    if "data_base64" in obj:
        return "bad_attribute:data_base64"
    for name, value in obj.items():
        if name in _KNOWN:
            continue
        if not _EXTENSION.match(name) or isinstance(value, float) or not isinstance(value, (str, int)):
            return "bad_extension"
    try:
        _json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return "not_utf8"
    except RecursionError:
        return "too_deep"
    return None


def parse_line(raw):
    """One line as a sender sent it (bytes, no newline) -> (event, None) or (None, reason)."""
    if len(raw) > MAX_LINE:
        return None, "line_too_long"
    if not raw.strip():
        return None, "empty"
    obj, reason = loads_strict(raw)
    if reason is None:
        reason = check_event(obj)
    if reason is None and obj["type"].startswith(RESERVED_PREFIX):
        reason = "type_reserved"
    return (None, reason) if reason else (obj, None)


def dumps_line(obj):
    return _json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii") + b"\n"
'''

_COLLECTOR_MAIN = r'''
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

REJECTED_TYPE = "drguard.telemetry.rejected"
SOURCE = "/drguard/telemetry/collector"


def rejected_record(reason, size, count=1):
    return {"specversion": "1.0", "id": uuid.uuid4().hex, "source": SOURCE, "type": REJECTED_TYPE,
            "time": now_rfc3339(), "datacontenttype": "application/json",
            "data": {"reason": reason, "bytes": size, "count": count}}


REFUSED_TYPE = "drguard.telemetry.refused"


def refused_record(data):
    return {"specversion": "1.0", "id": uuid.uuid4().hex, "source": SOURCE, "type": REFUSED_TYPE,
            "time": now_rfc3339(), "datacontenttype": "application/json", "data": data}


def judge_sender(der, tls):
    """(peer_id, serial, reason): reason None for a tier of this drill's plan or one of its services."""
    tier, serial, peer_id, reason = judge_peer(der, tls["domain"], "client")
    if reason == "bad_identity_path" and peer_id in tls["services"]:
        return peer_id, serial, None
    if reason is None and tier not in tls["tiers"]:
        reason = "identity_not_allowed"
    return peer_id, serial, reason


def main(argv):
    address, port, max_total, max_conns, idle = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    tls_cfg = json.loads(argv[5])
    try:
        ctx = server_context(tls_cfg["identity"], tls_cfg["trust"])
    except (OSError, ValueError) as exc:
        sys.stderr.write("telemetry collector: cannot load its identity %s and trust %s (%s); start it with the "
                         "drill's telemetry credentials\n" % (tls_cfg["identity"], tls_cfg["trust"],
                                                              type(exc).__name__))
        sys.exit(2)
    out = sys.stdout.buffer
    lock = threading.Lock()
    state = {"written": 0, "dropped_full": 0, "broken": False}
    stop = threading.Event()
    slots = threading.BoundedSemaphore(max_conns)
    threads = []

    def write(line):
        # Under lock: a line is written whole and flushed before anyone is told it was written.
        if state["broken"]:
            return False
        try:
            out.write(line)
            out.flush()
        except OSError as exc:
            state["broken"] = True
            sys.stderr.write("telemetry collector: cannot write events (%s); rejecting everything from now on\n"
                             % exc.strerror)
            sys.stderr.flush()
            return False
        state["written"] += len(line)
        return True

    def fits(line):
        if state["written"] + len(line) > max_total:
            state["dropped_full"] += 1
            return False
        return True

    def judge(raw, size, sender):
        event, reason = (None, "line_too_long") if raw is None else parse_line(raw)
        with lock:
            if state["broken"]:
                return b"rejected write_failed\n"
            if event is not None:
                event["receivedat"] = now_rfc3339()
                event["receivedfrom"] = sender
                line = dumps_line(event)
                if not fits(line):
                    return b"rejected collector_full\n"
                return b"ok\n" if write(line) else b"rejected write_failed\n"
            line = dumps_line(rejected_record(reason, size))
            if fits(line):
                write(line)
            return ("rejected %s\n" % reason).encode("ascii")

    def refuse(peer, reason, peer_id=None, serial=None):
        with lock:
            line = dumps_line(refused_record({"reason": reason, "peer_address": peer, "peer_id": peer_id,
                                              "serial": serial}))
            if fits(line):
                write(line)

    def handshake(conn, peer):
        """The TLS session of an authorised sender, else None (the refusal recorded, never an event)."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(tls_cfg["handshake_timeout"])
        try:
            if not conn.recv(1, socket.MSG_PEEK):
                return None  # closed before sending a byte: a bare TCP connect (the probes' connect row)
        except OSError as exc:
            refuse(peer, ssl_reason(exc))
            return None
        tls = conn
        try:
            tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            refuse(peer, ssl_reason(exc))
            linger_close(tls)
            return None
        peer_id, serial, reason = judge_sender(tls.getpeercert(binary_form=True) or b"", tls_cfg)
        if reason is not None:
            refuse(peer, reason, peer_id, serial)
            linger_close(tls)
            return None
        return tls, peer_id

    def serve(conn, peer):
        try:
            session = handshake(conn, peer)
            if session is None:
                return
            conn, sender = session
            conn.settimeout(idle)
            reader = conn.makefile("rb")
            while not stop.is_set():
                raw = reader.readline(MAX_LINE + 2)
                if not raw:
                    break
                size = len(raw)
                if len(raw) > MAX_LINE + 1 and not raw.endswith(b"\n"):
                    # Too long: skip to the end of the line, so the next line is judged on its own.
                    while raw and not raw.endswith(b"\n"):
                        raw = reader.readline(MAX_LINE + 2)
                        size += len(raw)
                    conn.sendall(judge(None, size, sender))
                    continue
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                conn.sendall(judge(raw, size, sender))
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            slots.release()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((address, port))
        server.listen(128)
    except OSError as exc:
        sys.stderr.write("telemetry collector: cannot listen on %s:%d (%s); is the address on a device of this "
                         "namespace and the port free?\n" % (address, port, exc.strerror or exc))
        sys.exit(2)
    server.settimeout(0.2)
    sys.stderr.write("telemetry collector listening on %s:%d\n" % (address, port))
    sys.stderr.flush()
    while not stop.is_set():
        try:
            conn, peer = server.accept()
        except (socket.timeout, InterruptedError):
            continue
        except OSError:
            if stop.is_set():
                break
            time.sleep(0.05)
            continue
        if not slots.acquire(blocking=False):
            with lock:  # counted, so the report shows a sender was turned away
                line = dumps_line(rejected_record("collector_busy", 0))
                if fits(line):
                    write(line)
            try:
                conn.close()  # no TLS session to answer in: the sender sees the connection closed
            except OSError:
                pass
            continue
        thread = threading.Thread(target=serve, args=(conn, peer[0]), daemon=True)
        thread.start()
        threads[:] = [t for t in threads if t.is_alive()] + [thread]
    server.close()
    deadline = time.monotonic() + 2.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        if state["dropped_full"] and not state["broken"]:
            write(dumps_line(rejected_record("collector_full", 0, state["dropped_full"])))
        try:
            out.flush()
        except OSError:
            pass
        os._exit(0)


main(sys.argv[1:])
'''

_SENDER_MAIN = r'''
import json
import socket
import sys
import time

BATCH = 64  # events sent before their acknowledgements are read (one TLS session is never used by two threads)


def fail(message, summary):
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stderr.write("telemetry sender: " + message + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(1)


def main(argv):
    address, port, connect_timeout, read_timeout = argv[0], int(argv[1]), float(argv[2]), float(argv[3])
    tls_cfg = json.loads(argv[4])
    where = "%s:%d" % (address, port)
    lines = [line for line in sys.stdin.buffer.read().split(b"\n") if line.strip()]
    summary = {"sent": len(lines), "acknowledged": 0, "rejected": []}
    if not lines:
        sys.stdout.write(json.dumps({"sent": 0, "acknowledged": 0}) + "\n")
        return
    try:
        ctx = client_context(tls_cfg["identity"], tls_cfg["trust"])
    except (OSError, ValueError) as exc:
        fail("cannot load this sender's identity %s and trust %s (%s); send with the drill's telemetry credentials"
             % (tls_cfg["identity"], tls_cfg["trust"], type(exc).__name__), summary)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                fail("cannot connect to the collector at %s within %gs (%s); is it running?"
                     % (where, connect_timeout, exc.strerror or exc), summary)
            time.sleep(0.1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(read_timeout)
    try:
        tls = ctx.wrap_socket(sock)
    except (OSError, ValueError) as exc:
        fail("the TLS handshake with the collector at %s failed (%s); the collector was busy, refused this sender or "
             "is not the drill's: see its file and log" % (where, ssl_reason(exc)), summary)
    tier, serial, peer_id, reason = judge_peer(tls.getpeercert(binary_form=True) or b"", tls_cfg["domain"], "server")
    if not (reason == "bad_identity_path" and peer_id == tls_cfg["collector_id"]):
        tls.close()
        fail("the collector at %s presented %s, not the drill's telemetry identity %s (%s); nothing was sent"
             % (where, peer_id, tls_cfg["collector_id"], reason or "server_identity_mismatch"), summary)
    reader = tls.makefile("rb")
    answered = 0
    problem = None
    try:
        while answered < len(lines) and problem is None:
            batch = lines[answered:answered + BATCH]
            tls.sendall(b"".join(line + b"\n" for line in batch))
            for _ in batch:
                ack = reader.readline(256)
                if not ack:
                    problem = "the collector closed the connection; a refused sender is recorded in its file"
                    break
                ack = ack.decode("ascii", "replace").strip()
                answered += 1
                if ack == "ok":
                    summary["acknowledged"] += 1
                else:
                    reason = ack[len("rejected "):] if ack.startswith("rejected ") else "bad acknowledgement"
                    summary["rejected"].append({"event": answered, "reason": reason})
    except socket.timeout:
        problem = "no acknowledgement within %gs" % read_timeout
    except (OSError, ValueError) as exc:
        why = ssl_reason(exc)
        problem = ("the collector refused this sender (%s)" % why if why not in ("handshake_failed", "closed_by_peer")
                   else "the connection failed (%s)" % (getattr(exc, "strerror", None) or exc))
    try:
        tls.close()
    except OSError:
        pass
    missing = len(lines) - summary["acknowledged"]
    if missing:
        parts = []
        if summary["rejected"]:
            first = summary["rejected"][0]
            parts.append("%d rejected (first: event %d, %s)" % (len(summary["rejected"]), first["event"],
                                                                 first["reason"]))
        if answered < len(lines):
            parts.append("%d unanswered (%s)" % (len(lines) - answered, problem or "no answer"))
        del summary["rejected"][20:]
        fail("%d of %d event(s) not acknowledged by the collector at %s: %s; see the collector's file."
             % (missing, len(lines), where, "; ".join(parts)), summary)
    del summary["rejected"]
    sys.stdout.write(json.dumps(summary) + "\n")


main(sys.argv[1:])
'''

# TLS 1.3 contexts, reasons and the identity judgement are the mTLS programs' own (docs/mtls.md).
COLLECTOR_SOURCE = _mtls._SHARED_SOURCE + _SHARED_SOURCE + _COLLECTOR_MAIN  # noqa: SLF001
SENDER_SOURCE = _mtls._SHARED_SOURCE + _SENDER_MAIN  # noqa: SLF001

# The collector's checks, executed here from the very text the collector runs (one definition).
_CHECKS: dict = {}
exec(compile(_SHARED_SOURCE, "<_telemetry shared checks>", "exec"), _CHECKS)  # noqa: S102


class TelemetryError(Exception):
    """What went wrong, in one sentence, with structured fields in ``detail``."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


def validate_event(obj):
    """The reason ``obj`` is not a valid drguard CloudEvent (e.g. ``missing_attribute:time``), or None.

    The same checks as the collector's, except that the collector also refuses the
    ``drguard.telemetry.`` types, which are its own.
    """
    return _CHECKS["check_event"](obj)


def cloud_event(type, source, subject, data, *, time=None, id=None):
    """One CloudEvents 1.0 event: ``specversion``, ``id`` (a fresh UUID unless given), ``source``,
    ``type`` (``drguard.<...>``), RFC 3339 UTC ``time`` (now unless given), ``datacontenttype``
    application/json, ``subject`` (omitted when None) and ``data`` (any JSON value).

    Raises :class:`TelemetryError` naming the attribute when the event would be rejected.
    """
    event = {"specversion": "1.0", "id": id if id is not None else str(uuid.uuid4()), "source": source,
             "type": type, "time": time if time is not None else _CHECKS["now_rfc3339"](),
             "datacontenttype": "application/json"}
    if subject is not None:
        event["subject"] = subject
    event["data"] = data
    reason = validate_event(event)
    if reason is None and type.startswith(_CHECKS["RESERVED_PREFIX"]):
        reason = "type_reserved"
    if reason is None and len(_CHECKS["dumps_line"](event)) > MAX_LINE:
        reason = "line_too_long"
    if reason:
        raise TelemetryError(f"telemetry event of type {type!r} is not valid ({reason}); the type must start "
                             "with 'drguard.', source, id and subject must be non-empty strings, time RFC 3339, "
                             f"data plain JSON, the whole event at most {MAX_LINE} bytes.", reason=reason)
    return event


def encode_events(events):
    """The JSON lines a sender reads on stdin (one event per line); raises on an invalid event."""
    lines = []
    for index, event in enumerate(events):
        reason = validate_event(event)
        if reason is None and len(_CHECKS["dumps_line"](event)) > MAX_LINE:
            reason = "line_too_long"
        if reason:
            raise TelemetryError(f"telemetry event {index + 1} is not valid ({reason}); build events with "
                                 "cloud_event.", index=index, reason=reason)
        lines.append(_CHECKS["dumps_line"](event).decode("ascii"))
    return "".join(lines)


def check_endpoint(address, port):
    """``(address, port)`` as argv strings; raises :class:`TelemetryError` naming the bad field."""
    try:
        ip = ipaddress.ip_address(address)
    except (TypeError, ValueError):
        raise TelemetryError(f"telemetry address {address!r} is not an IP address; pass the collector's "
                             "address from the plan.", field="address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise TelemetryError(f"telemetry port {port!r} is not a port number (1-65535); pass the declared "
                             "telemetry port.", field="port")
    return str(ip), str(port)


def _python(python):
    if not isinstance(python, str) or not os.path.isabs(python):
        raise TelemetryError(f"python {python!r} must be the absolute path of an interpreter the namespace's "
                             "unprivileged user can run.", field="python")
    return python


def _tls_paths(identity, trust):
    for field, path in (("identity", identity), ("trust", trust)):
        if not isinstance(path, str) or not os.path.isabs(path):
            raise TelemetryError(f"{field} {path!r} must be the absolute path of a PEM file the process can read "
                                 "(the drill's telemetry credentials).", field=field)
    return identity, trust


def collector_argv(python, address, port, *, drill_id, tiers, identity=None, trust=None, max_total=MAX_TOTAL,
                   max_connections=MAX_CONNECTIONS, idle_timeout=IDLE_TIMEOUT, handshake_timeout=HANDSHAKE_TIMEOUT):
    """The collector's command line: ``python -I -S -c COLLECTOR_SOURCE <address> <port> ... <tls>``.

    TLS 1.3 with client certificates required: ``identity`` (its leaf and key, the drill service
    ``telemetry``) and ``trust`` (the drill's CA and its CRL) default to the files a spawn with
    :meth:`Channel.collector_files` puts into the workload's ``/run/drguard/in``. A sender is
    authorised when its identity is one of ``tiers`` of drill ``drill_id`` or its control plane;
    every other connection that sent a byte is refused and recorded as a ``drguard.telemetry.refused``
    line. Spawn it (unprivileged) in the telemetry namespace with stdout to
    ``<output_dir>/telemetry.jsonl``; it prints ``telemetry collector listening on ...`` to
    stderr once bound, and exits 0 on SIGTERM after flushing.
    """
    addr, port_text = check_endpoint(address, port)
    if not (isinstance(max_total, int) and max_total > 0 and isinstance(max_connections, int)
            and max_connections > 0 and idle_timeout > 0 and handshake_timeout > 0):
        raise TelemetryError("collector limits must be positive numbers; fix the call.", field="limits")
    identity, trust = _tls_paths(identity or _IN_IDENTITY, trust or _IN_TRUST)
    try:
        names = _pki.tier_list(tiers)
        tls = {"domain": _pki.trust_domain(drill_id), "tiers": names, "identity": identity, "trust": trust,
               "services": [_pki.service_id(drill_id, CONTROL_PLANE)], "handshake_timeout": float(handshake_timeout)}
    except _pki.PkiError as exc:
        raise TelemetryError(f"the collector cannot be configured: {exc.msg}", **exc.detail) from None
    return [_python(python), "-I", "-S", "-c", COLLECTOR_SOURCE, addr, port_text, str(max_total),
            str(max_connections), f"{float(idle_timeout):g}", json.dumps(tls, sort_keys=True)]


def sender_argv(python, address, port, *, drill_id, identity=None, trust=None, connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT):
    """The sender's command line: ``python -I -S -c SENDER_SOURCE <address> <port> ... <tls>``.

    Run it with :func:`encode_events` on stdin. It presents ``identity`` (its leaf and key),
    trusts ``trust`` only, and sends nothing unless the collector presents the drill's
    ``telemetry`` identity. Exit 0 and ``{"sent": n, "acknowledged": n}`` on stdout when every
    event was acknowledged ``ok``; otherwise exit 1, the same summary plus ``rejected`` (event
    number and reason, at most 20) on stdout and one line on stderr. It keeps trying to connect
    for ``connect_timeout`` seconds and waits at most ``read_timeout`` seconds for any one
    acknowledgement. ``identity`` / ``trust`` default to the files :func:`deliver` hands in.
    """
    addr, port_text = check_endpoint(address, port)
    if not (connect_timeout > 0 and read_timeout > 0):
        raise TelemetryError("sender timeouts must be positive; fix the call.", field="timeouts")
    identity, trust = _tls_paths(identity or _IN_IDENTITY, trust or _IN_TRUST)
    try:
        tls = {"domain": _pki.trust_domain(drill_id), "identity": identity, "trust": trust,
               "collector_id": _pki.service_id(drill_id, COLLECTOR)}
    except _pki.PkiError as exc:
        raise TelemetryError(f"the sender cannot be configured: {exc.msg}", **exc.detail) from None
    return [_python(python), "-I", "-S", "-c", SENDER_SOURCE, addr, port_text, f"{float(connect_timeout):g}",
            f"{float(read_timeout):g}", json.dumps(tls, sort_keys=True)]


class Channel:
    """The telemetry channel's credentials of one drill, on its tmpfs beside the PKI (docs/runtime.md).

    ``<mTLS root>/telemetry/`` (0700, files 0600): ``trust.pem`` (the drill's CA and its CRL as
    they were when the channel was made), ``collector.pem`` (the ``telemetry`` service's leaf and
    key), one sender leaf per namespace that sends (``control-plane.pem`` for the control plane,
    ``tier-<tier>.pem`` per tier) and ``channel.json`` (namespace -> file, serials; no key).
    The leaves are issued once by the drill's CA and live as long as it: the collector reads its
    credentials once, when it starts (they are copied into its private mount), so it keeps this
    bundle when the ``mtls`` phase rotates the tiers' leaves or the CA.
    """

    def __init__(self, drill_id, root=None):
        from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill  # noqa: PLC0415 - a cycle
        try:
            _pki.trust_domain(drill_id)
        except _pki.PkiError as exc:
            raise TelemetryError(f"the telemetry channel needs a valid drill id: {exc.msg}", **exc.detail) from None
        self.drill_id = drill_id
        self.root = root or _mtls_drill.root_dir(drill_id)
        self.dir = os.path.join(self.root, "telemetry")
        self.store = _pki.Store(drill_id, os.path.join(self.root, "pki"))

    def _path(self, name):
        return os.path.join(self.dir, name)

    def read(self):
        """``channel.json`` or None when the channel was not made."""
        try:
            with open(self._path("channel.json"), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TelemetryError(f"the telemetry channel {self.dir} cannot be read ({exc}); remove the runtime "
                                 "and start it again.", dir=self.dir) from None

    def ensure(self, plan, ttl):
        """The drill's CA (made here, valid ``ttl`` seconds, when the drill has none yet) and the channel's
        files for ``plan``'s namespaces; idempotent. Returns True when something was written."""
        tiers = list(plan["tiers"])
        senders = {plan["tiers"][t]["ns"]: "tier-%s.pem" % t for t in tiers}
        cp = plan.get("world", {}).get("neighbours", {}).get("control_plane")
        if cp:
            senders[cp["ns"]] = CONTROL_PLANE + ".pem"
        current = self.read()
        if (current and current.get("drill_id") == self.drill_id and current.get("senders") == senders
                and all(os.path.isfile(self._path(n)) for n in [*senders.values(), "collector.pem", "trust.pem"])):
            return False
        try:
            self._make_root()
            state = self.store.state()
            if not state["cas"]:
                self.store.prepare()
                self.store.add_ca(state, int(ttl))
                self.store.write_trust(state)
                self.store.save(state)
            ca = self.store.issuing_ca(state)
            lifetime = int((ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc))
                           .total_seconds())
            _io.ensure_private_dir(self.dir, parents=False)
            with open(self.store.trust_file(), "rb") as handle:
                _pki.write_private(self._path("trust.pem"), handle.read())
            serials = {}
            leaves = {"collector.pem": _pki.issue_service_leaf(ca, self.drill_id, COLLECTOR, lifetime)}
            if cp:
                leaves[CONTROL_PLANE + ".pem"] = _pki.issue_service_leaf(ca, self.drill_id, CONTROL_PLANE, lifetime)
            for tier in tiers:
                leaves["tier-%s.pem" % tier] = _pki.issue_leaf(ca, self.drill_id, tier, lifetime)
            for name, leaf in sorted(leaves.items()):
                _pki.write_private(self._path(name), _pki.cert_pem(leaf.cert) + _pki.key_pem(leaf.key))
                serials[name] = _pki.serial_hex(leaf.cert)
            _io.atomic_write_json(self._path("channel.json"), {
                "drill_id": self.drill_id, "senders": senders, "serials": serials,
                "ca": _pki.serial_hex(ca.cert)})
        except (_pki.PkiError, OSError) as exc:
            raise TelemetryError(f"the telemetry channel of drill {self.drill_id} cannot be made in {self.dir}: "
                                 f"{getattr(exc, 'msg', None) or exc}; check the tmpfs and retry.", dir=self.dir) \
                from None
        return True

    def _make_root(self):
        """The drill's mTLS directory on a tmpfs, ours and a real directory (its mode is the mtls phase's)."""
        try:
            _secrets.require_tmpfs(self.root)
        except _secrets.SecretError as exc:
            raise TelemetryError(f"the drill's telemetry credentials must be on a tmpfs: {exc}", dir=self.root) \
                from None
        try:
            os.mkdir(self.root, 0o700)
        except FileExistsError:
            info = os.lstat(self.root)
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise TelemetryError(f"{self.root} exists and is not a directory of this user; remove it and retry.",
                                     dir=self.root) from None

    def _files(self, name):
        return {"identity.pem": {"source": self._path(name), "mode": 0o400},
                "trust.pem": {"source": self._path("trust.pem"), "mode": 0o400}}

    def collector_files(self):
        """The collector's ``files`` for ``_netns.spawn`` (read-only copies in its private mount)."""
        if self.read() is None:
            raise TelemetryError(f"drill {self.drill_id} has no telemetry channel in {self.dir}; start the runtime "
                                 "(sandbox_runtime) first.", dir=self.dir)
        return self._files("collector.pem")

    def sender_files(self, ns):
        """The ``files`` of a sender in namespace ``ns``: the leaf of that namespace's identity and the trust."""
        channel = self.read()
        if channel is None:
            raise TelemetryError(f"drill {self.drill_id} has no telemetry channel in {self.dir}; start the runtime "
                                 "(sandbox_runtime) first.", dir=self.dir, namespace=ns)
        name = channel["senders"].get(ns)
        if name is None:
            raise TelemetryError(f"namespace {ns} has no telemetry identity of drill {self.drill_id}; send from the "
                                 "control plane or a tier of the drill.", namespace=ns)
        return self._files(name)


def drill_prefix(drill_id):
    """``drg-<short>-``: the prefix of every namespace of the drill (as ``address_plan`` names them)."""
    return _nft_policy.drill_prefix(drill_id)


def build_events(drill_id, specs):
    """Events for the drill from short specs ``{type, subject?, data?, source?, time?, id?}``.

    ``source`` defaults to ``/drguard/drill/<drill_id>``. Raises :class:`TelemetryError`
    naming the spec (1-based) and the reason when one is invalid.
    """
    events = []
    for index, spec in enumerate(specs, start=1):
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise TelemetryError(f"event {index} needs a type (a string starting with 'drguard.'); fix events.",
                                 index=index, reason="missing_attribute:type")
        try:
            events.append(cloud_event(spec["type"], spec.get("source") or f"/drguard/drill/{drill_id}",
                                      spec.get("subject"), spec.get("data"), time=spec.get("time"),
                                      id=spec.get("id")))
        except TelemetryError as exc:
            raise TelemetryError(f"event {index}: {exc.msg}", index=index, **exc.detail) from None
    return events


def deliver(ns, events, address, port, *, drill_id, python=None, connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT, channel=None):
    """Send ``events`` to the collector from namespace ``ns``, unprivileged (``_netns.run_in``), over mTLS.

    The sender presents the leaf of ``ns``'s identity in drill ``drill_id``'s telemetry channel
    (:class:`Channel`: the control plane's or the tier's), handed in as read-only files of its
    private mount, never on argv or in its environment.

    Returns ``{"sent": n, "acknowledged": n}`` when every event was acknowledged; otherwise
    raises :class:`TelemetryError` with the sender's one-line reason and ``sent``,
    ``acknowledged``, ``rejected`` in ``detail``. ``python`` defaults to this interpreter's
    real file (the venv's symlink resolved).
    """
    argv = sender_argv(python or os.path.realpath(sys.executable), address, port, drill_id=drill_id,
                       connect_timeout=connect_timeout, read_timeout=read_timeout)
    text = encode_events(events)
    files = (channel or Channel(drill_id)).sender_files(ns)
    try:
        proc = _netns.run_in(ns, argv, input_text=text, timeout=connect_timeout + read_timeout * 3 + 30, env={},
                             files=files)
    except _netns.NetnsError as exc:
        raise TelemetryError(f"cannot run the telemetry sender in namespace {ns}: {exc.msg}", namespace=ns,
                             **exc.detail) from None
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        sent, acknowledged = int(summary["sent"]), int(summary["acknowledged"])
        rejected = list(summary.get("rejected", []))
    except (ValueError, KeyError, IndexError, TypeError):
        sent, acknowledged, rejected = len(events), 0, []
    if proc.returncode != 0 or acknowledged != len(events):
        why = ((proc.stderr or "").strip().splitlines() or [f"the sender exited {proc.returncode}"])[-1]
        raise TelemetryError(why.removeprefix("telemetry sender: ").rstrip(".") + ".", namespace=ns, sent=sent,
                             acknowledged=acknowledged, rejected=rejected)
    return {"sent": sent, "acknowledged": acknowledged}


def _lines(fh):
    """(line number, bytes without the newline, complete) for each line, none longer than the cap."""
    number = 0
    while True:
        raw = fh.readline(_MAX_FILE_LINE + 1)
        if not raw:
            return
        number += 1
        if len(raw) > _MAX_FILE_LINE:
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(_MAX_FILE_LINE + 1)
            yield number, None, True
            continue
        complete = raw.endswith(b"\n")
        yield number, raw[:-1] if complete else raw, complete


def _judge_file_line(raw, complete):
    """(kind, type or reason, count) of one line of the collector's file."""
    if raw is None:
        return "corrupt", "line_too_long", 0
    if not complete:
        return "corrupt", "truncated", 0
    obj, reason = _CHECKS["loads_strict"](raw)
    if reason is None:
        reason = validate_event(obj)
    if reason:
        return "corrupt", reason, 0
    if obj["type"] == REJECTED_TYPE:
        data = obj.get("data")
        data = data if isinstance(data, dict) else {}
        count = data.get("count")
        if (obj["source"] != COLLECTOR_EVENT_SOURCE or not isinstance(data.get("reason"), str)
                or isinstance(count, bool) or not isinstance(count, int) or count < 1):
            return "corrupt", "bad_rejected_record", 0
        return "rejected", data["reason"], count
    if obj["type"] == REFUSED_TYPE:
        data = obj.get("data")
        if obj["source"] != COLLECTOR_EVENT_SOURCE or not isinstance(data, dict) or not isinstance(data.get("reason"),
                                                                                                   str):
            return "corrupt", "bad_refused_record", 0
        return "refused", data["reason"], 1
    if obj["type"].startswith(_CHECKS["RESERVED_PREFIX"]):
        return "corrupt", "type_reserved", 0
    if "receivedat" not in obj:
        return "corrupt", "not_received", 0
    return "event", obj["type"], 1


def summarise(path):
    """Count the collector's file: ``{"events", "by_type", "rejected", "rejected_reasons", "refused",
    "refused_reasons", "corrupt", "corrupt_lines"}``.

    ``rejected`` counts events the collector refused (by reason in ``rejected_reasons``);
    ``refused`` counts connections it refused (TLS handshake or identity, by reason in
    ``refused_reasons``): nothing they sent is in the file;
    ``corrupt`` counts lines the collector cannot have written (not JSON, not a valid event,
    no ``receivedat``, cut short): they are reported, never skipped; ``corrupt_lines`` lists
    the first 20 as ``{"line": n, "reason": ...}``. A missing file, a symlink or anything
    but a regular file raises :class:`TelemetryError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise TelemetryError(f"telemetry file {path} cannot be read ({exc.strerror}); the collector did not run "
                             "or wrote elsewhere.", path=str(path)) from None
    summary = {"events": 0, "by_type": {}, "rejected": 0, "rejected_reasons": {}, "refused": 0,
               "refused_reasons": {}, "corrupt": 0, "corrupt_lines": []}
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TelemetryError(f"telemetry file {path} is not a regular file; point the collector's stdout "
                             "at a file in the run's output directory.", path=str(path))
    with os.fdopen(fd, "rb") as fh:
        for number, raw, complete in _lines(fh):
            kind, what, count = _judge_file_line(raw, complete)
            if kind == "event":
                summary["events"] += 1
                summary["by_type"][what] = summary["by_type"].get(what, 0) + 1
            elif kind == "rejected":
                summary["rejected"] += count
                summary["rejected_reasons"][what] = summary["rejected_reasons"].get(what, 0) + count
            elif kind == "refused":
                summary["refused"] += 1
                summary["refused_reasons"][what] = summary["refused_reasons"].get(what, 0) + 1
            else:
                summary["corrupt"] += 1
                if len(summary["corrupt_lines"]) < 20:
                    summary["corrupt_lines"].append({"line": number, "reason": what})
    return summary
