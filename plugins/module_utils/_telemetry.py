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

import ipaddress
import json
import os
import stat
import sys
import uuid

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy

# Limits of the collector (docs/runtime.md, "Telemetry").
MAX_LINE = 64 * 1024  # bytes of one event line as sent
MAX_TOTAL = 64 * 1024 * 1024  # bytes the collector writes in all; past it, events are rejected collector_full
MAX_CONNECTIONS = 64  # concurrent senders; one more is answered "rejected collector_busy"
IDLE_TIMEOUT = 30.0  # seconds a sender may stay silent before the collector closes its connection
CONNECT_TIMEOUT = 10.0  # seconds the sender keeps trying to connect (the collector may be starting)
READ_TIMEOUT = 10.0  # seconds the sender waits for any one acknowledgement

REJECTED_TYPE = "drguard.telemetry.rejected"
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


def main(argv):
    address, port, max_total, max_conns, idle = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
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

    def judge(raw, size):
        event, reason = (None, "line_too_long") if raw is None else parse_line(raw)
        with lock:
            if state["broken"]:
                return b"rejected write_failed\n"
            if event is not None:
                event["receivedat"] = now_rfc3339()
                line = dumps_line(event)
                if not fits(line):
                    return b"rejected collector_full\n"
                return b"ok\n" if write(line) else b"rejected write_failed\n"
            line = dumps_line(rejected_record(reason, size))
            if fits(line):
                write(line)
            return ("rejected %s\n" % reason).encode("ascii")

    def serve(conn):
        try:
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
                    conn.sendall(judge(None, size))
                    continue
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                conn.sendall(judge(raw, size))
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
            conn, _ = server.accept()
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
                conn.sendall(b"rejected collector_busy\n")
                conn.close()
            except OSError:
                pass
            continue
        thread = threading.Thread(target=serve, args=(conn,), daemon=True)
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
import threading
import time


def fail(message, summary):
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stderr.write("telemetry sender: " + message + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(1)


def main(argv):
    address, port, connect_timeout, read_timeout = argv[0], int(argv[1]), float(argv[2]), float(argv[3])
    where = "%s:%d" % (address, port)
    lines = [line for line in sys.stdin.buffer.read().split(b"\n") if line.strip()]
    summary = {"sent": len(lines), "acknowledged": 0, "rejected": []}
    if not lines:
        sys.stdout.write(json.dumps({"sent": 0, "acknowledged": 0}) + "\n")
        return
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
    sock.settimeout(read_timeout)
    errors = []

    def send():
        try:
            for line in lines:
                sock.sendall(line + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(str(exc.strerror or exc))

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    reader = sock.makefile("rb")
    answered = 0
    problem = None
    try:
        while answered < len(lines):
            ack = reader.readline(256)
            if not ack:
                problem = "the collector closed the connection"
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
    except OSError as exc:
        problem = "the connection failed (%s)" % (exc.strerror or exc)
    writer.join(1.0)
    sock.close()
    missing = len(lines) - summary["acknowledged"]
    if missing:
        parts = []
        if summary["rejected"]:
            first = summary["rejected"][0]
            parts.append("%d rejected (first: event %d, %s)" % (len(summary["rejected"]), first["event"],
                                                                 first["reason"]))
        if answered < len(lines):
            why = problem or (errors[0] if errors else "no answer")
            parts.append("%d unanswered (%s)" % (len(lines) - answered, why))
        del summary["rejected"][20:]
        fail("%d of %d event(s) not acknowledged by the collector at %s: %s; see the collector's file."
             % (missing, len(lines), where, "; ".join(parts)), summary)
    del summary["rejected"]
    sys.stdout.write(json.dumps(summary) + "\n")


main(sys.argv[1:])
'''

COLLECTOR_SOURCE = _SHARED_SOURCE + _COLLECTOR_MAIN
SENDER_SOURCE = _SENDER_MAIN

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


def collector_argv(python, address, port, *, max_total=MAX_TOTAL, max_connections=MAX_CONNECTIONS,
                   idle_timeout=IDLE_TIMEOUT):
    """The collector's command line: ``python -I -S -c COLLECTOR_SOURCE <address> <port> ...``.

    Spawn it (unprivileged) in the telemetry namespace with stdout to
    ``<output_dir>/telemetry.jsonl``; it prints ``telemetry collector listening on ...`` to
    stderr once bound, and exits 0 on SIGTERM after flushing.
    """
    addr, port_text = check_endpoint(address, port)
    if not (isinstance(max_total, int) and max_total > 0 and isinstance(max_connections, int)
            and max_connections > 0 and idle_timeout > 0):
        raise TelemetryError("collector limits must be positive numbers; fix the call.", field="limits")
    return [_python(python), "-I", "-S", "-c", COLLECTOR_SOURCE, addr, port_text, str(max_total),
            str(max_connections), f"{float(idle_timeout):g}"]


def sender_argv(python, address, port, *, connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT):
    """The sender's command line: ``python -I -S -c SENDER_SOURCE <address> <port> ...``.

    Run it with :func:`encode_events` on stdin. Exit 0 and ``{"sent": n, "acknowledged": n}``
    on stdout when every event was acknowledged ``ok``; otherwise exit 1, the same summary
    plus ``rejected`` (event number and reason, at most 20) on stdout and one line on stderr.
    It keeps trying to connect for ``connect_timeout`` seconds and waits at most
    ``read_timeout`` seconds for any one acknowledgement.
    """
    addr, port_text = check_endpoint(address, port)
    if not (connect_timeout > 0 and read_timeout > 0):
        raise TelemetryError("sender timeouts must be positive; fix the call.", field="timeouts")
    return [_python(python), "-I", "-S", "-c", SENDER_SOURCE, addr, port_text, f"{float(connect_timeout):g}",
            f"{float(read_timeout):g}"]


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


def deliver(ns, events, address, port, *, python=None, connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT):
    """Send ``events`` to the collector from namespace ``ns``, unprivileged (``_netns.run_in``).

    Returns ``{"sent": n, "acknowledged": n}`` when every event was acknowledged; otherwise
    raises :class:`TelemetryError` with the sender's one-line reason and ``sent``,
    ``acknowledged``, ``rejected`` in ``detail``. ``python`` defaults to this interpreter's
    real file (the venv's symlink resolved).
    """
    argv = sender_argv(python or os.path.realpath(sys.executable), address, port,
                       connect_timeout=connect_timeout, read_timeout=read_timeout)
    text = encode_events(events)
    try:
        proc = _netns.run_in(ns, argv, input_text=text, timeout=connect_timeout + read_timeout * 3 + 30, env={})
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
    if obj["type"].startswith(_CHECKS["RESERVED_PREFIX"]):
        return "corrupt", "type_reserved", 0
    if "receivedat" not in obj:
        return "corrupt", "not_received", 0
    return "event", obj["type"], 1


def summarise(path):
    """Count the collector's file: ``{"events", "by_type", "rejected", "rejected_reasons", "corrupt",
    "corrupt_lines"}``.

    ``rejected`` counts events the collector refused (by reason in ``rejected_reasons``);
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
    summary = {"events": 0, "by_type": {}, "rejected": 0, "rejected_reasons": {}, "corrupt": 0,
               "corrupt_lines": []}
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
            else:
                summary["corrupt"] += 1
                if len(summary["corrupt_lines"]) < 20:
                    summary["corrupt_lines"].append({"line": number, "reason": what})
    return summary
