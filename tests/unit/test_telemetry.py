"""_telemetry: event shape and validation, summarise (corrupt lines fail closed), and the collector
and sender programs run for real on 127.0.0.1 inside a network namespace of the test's own.

The socket tests need root (``ip netns add``) and are skipped with the reason otherwise; the
namespace is deleted in a ``finally``. Nothing listens on the host's own loopback.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry as tel

PY = sys.executable
PORT = 4317


def ev(i=0, **over):
    event = tel.cloud_event("drguard.probe.result", "/drguard/drill/t", "app", {"i": i})
    event.update(over)
    return event


def line(obj):
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- events


def test_cloud_event_has_the_cloudevents_1_0_attributes_a_fresh_id_and_utc_time():
    a = tel.cloud_event("drguard.phase.finished", "/drguard/drill/d1", "network", {"seconds": 1.5})
    b = tel.cloud_event("drguard.phase.finished", "/drguard/drill/d1", "network", {"seconds": 1.5})
    assert set(a) == {"specversion", "id", "source", "type", "time", "datacontenttype", "subject", "data"}
    assert a["specversion"] == "1.0" and a["datacontenttype"] == "application/json"
    assert a["type"] == "drguard.phase.finished" and a["subject"] == "network" and a["data"] == {"seconds": 1.5}
    assert a["id"] != b["id"] and uuid.UUID(a["id"])
    assert a["time"].endswith("Z")
    when = datetime.datetime.fromisoformat(a["time"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 5
    assert tel.validate_event(a) is None


def test_cloud_event_keeps_a_given_time_and_id_and_omits_a_missing_subject():
    e = tel.cloud_event("drguard.validation.output", "/s", None, [1, 2], time="2026-01-02T03:04:05Z", id="x-1")
    assert e["time"] == "2026-01-02T03:04:05Z" and e["id"] == "x-1" and "subject" not in e


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"type": "phase.finished"}, "type_not_drguard"),
    ({"type": "drguard.telemetry.rejected"}, "type_reserved"),
    ({"source": ""}, "bad_attribute:source"),
    ({"subject": ""}, "bad_attribute:subject"),
    ({"time": "yesterday"}, "bad_attribute:time"),
    ({"id": ""}, "bad_attribute:id"),
    ({"data": float("nan")}, "not_utf8"),
    ({"data": "\ud800"}, "not_utf8"),
    ({"data": "x" * tel.MAX_LINE}, "line_too_long"),
])
def test_cloud_event_refuses_what_the_collector_would_reject(kwargs, reason):
    args = {"type": "drguard.phase.finished", "source": "/s", "subject": "x", "data": {}}
    extra = {k: kwargs.pop(k) for k in ("time", "id") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(tel.TelemetryError) as err:
        tel.cloud_event(args["type"], args["source"], args["subject"], args["data"], **extra)
    assert err.value.detail["reason"] == reason


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda e: [1, 2], "not_object"),
    (lambda e: {k: v for k, v in e.items() if k != "time"}, "missing_attribute:time"),
    (lambda e: {k: v for k, v in e.items() if k != "specversion"}, "missing_attribute:specversion"),
    (lambda e: {**e, "specversion": "0.3"}, "specversion_not_1.0"),
    (lambda e: {**e, "specversion": 1.0}, "specversion_not_1.0"),
    (lambda e: {**e, "type": "com.example.x"}, "type_not_drguard"),
    (lambda e: {**e, "type": 7}, "bad_attribute:type"),
    (lambda e: {**e, "source": None}, "bad_attribute:source"),
    (lambda e: {**e, "datacontenttype": "text/plain"}, "bad_attribute:datacontenttype"),
    (lambda e: {**e, "data_base64": "AA=="}, "bad_attribute:data_base64"),
    (lambda e: {**e, "Bad-Name": "x"}, "bad_extension"),
    (lambda e: {**e, "nested": {"a": 1}}, "bad_extension"),
    (lambda e: {**e, "ratio": 0.5}, "bad_extension"),
    (lambda e: {**e, "traceparent": "00-ab-cd-01", "attempt": 2}, None),
])
def test_validate_event_names_the_exact_reason(mutate, reason):
    assert tel.validate_event(mutate(ev())) == reason


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty"),
    (b"   ", "empty"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"{not json", "not_json"),
    (b'{"a": 1} {"b": 2}', "not_json"),
    (b'{"a": NaN}', "not_json"),
    (b'{"a": 1, "a": 2}', "duplicate_key"),
    (b"[" * 5000 + b"]" * 5000, "too_deep"),
    (b"x" * (tel.MAX_LINE + 1), "line_too_long"),
    (b'"just a string"', "not_object"),
])
def test_the_collectors_line_parser_names_the_exact_reason(raw, reason):
    assert tel._CHECKS["parse_line"](raw) == (None, reason)


def test_the_collector_refuses_events_of_its_own_reserved_types():
    raw = line(ev(type="drguard.telemetry.rejected"))
    assert tel._CHECKS["parse_line"](raw) == (None, "type_reserved")
    assert tel._CHECKS["parse_line"](line(ev()))[1] is None


def test_the_collectors_line_cap_is_the_modules():
    assert tel._CHECKS["MAX_LINE"] == tel.MAX_LINE
    assert f"\nMAX_LINE = {tel.MAX_LINE}\n" in tel.COLLECTOR_SOURCE


def test_encode_events_writes_one_ascii_line_per_event_and_refuses_an_invalid_one():
    events = [ev(0), ev(1, data={"name": "caf\u00e9 \U0001f600"})]
    text = tel.encode_events(events)
    assert text.isascii() and text.count("\n") == 2
    assert [json.loads(x) for x in text.splitlines()] == events
    with pytest.raises(tel.TelemetryError) as err:
        tel.encode_events([ev(0), {"type": "x"}])
    assert err.value.detail == {"index": 1, "reason": "missing_attribute:specversion"}


C_ARGS = {"drill_id": "dr-20260101000000-abc123", "tiers": ["app"]}
S_ARGS = {"drill_id": "dr-20260101000000-abc123"}


@pytest.mark.parametrize(("call", "field"), [
    (lambda: tel.collector_argv(PY, "localhost", PORT, **C_ARGS), "address"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", 0, **C_ARGS), "port"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", True, **C_ARGS), "port"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", "4317", **C_ARGS), "port"),
    (lambda: tel.collector_argv("python3", "127.0.0.1", PORT, **C_ARGS), "python"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", PORT, identity="collector.pem", **C_ARGS), "identity"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", PORT, trust="trust.pem", **C_ARGS), "trust"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", PORT, drill_id="Not A Drill", tiers=["app"]), "drill_id"),
    (lambda: tel.collector_argv(PY, "127.0.0.1", PORT, drill_id=C_ARGS["drill_id"], tiers=["App"]), "tiers"),
    (lambda: tel.sender_argv(PY, "127.0.0.1; rm", PORT, **S_ARGS), "address"),
    (lambda: tel.sender_argv(PY, "127.0.0.1", PORT, read_timeout=0, **S_ARGS), "timeouts"),
    (lambda: tel.sender_argv(PY, "127.0.0.1", PORT, identity="../id.pem", **S_ARGS), "identity"),
])
def test_argv_builders_refuse_bad_input(call, field):
    with pytest.raises(tel.TelemetryError) as err:
        call()
    assert err.value.detail["field"] == field


def test_collector_and_sender_argv_run_isolated_python_with_their_own_source():
    argv = tel.collector_argv("/usr/bin/python3", "10.0.0.7", 4317, max_total=1000, max_connections=3,
                              idle_timeout=5, **C_ARGS)
    assert argv[:-1] == ["/usr/bin/python3", "-I", "-S", "-c", tel.COLLECTOR_SOURCE, "10.0.0.7", "4317", "1000", "3",
                         "5"]
    domain = "dr-20260101000000-abc123.drguard.internal"
    # Paths only: the credentials reach the process as files of its private mount, never on argv.
    assert json.loads(argv[-1]) == {
        "domain": domain, "tiers": ["app", "validation"], "identity": "/run/drguard/in/identity.pem",
        "trust": "/run/drguard/in/trust.pem", "services": [f"spiffe://{domain}/control-plane"],
        "handshake_timeout": 5.0}
    argv = tel.sender_argv("/usr/bin/python3", "10.0.0.7", 4317, connect_timeout=2, read_timeout=3, **S_ARGS)
    assert argv[:-1] == ["/usr/bin/python3", "-I", "-S", "-c", tel.SENDER_SOURCE, "10.0.0.7", "4317", "2", "3"]
    assert json.loads(argv[-1]) == {"domain": domain, "identity": "/run/drguard/in/identity.pem",
                                     "trust": "/run/drguard/in/trust.pem",
                                     "collector_id": f"spiffe://{domain}/telemetry"}


# ---------------------------------------------------------------- summarise


def collector_line(event):
    return json.dumps({**event, "receivedat": "2026-01-01T00:00:00.000001Z"}, separators=(",", ":")) + "\n"


def rejected_line(reason, count=1, source=tel.COLLECTOR_EVENT_SOURCE):
    return json.dumps({"specversion": "1.0", "id": uuid.uuid4().hex, "source": source,
                       "type": tel.REJECTED_TYPE, "time": "2026-01-01T00:00:00Z",
                       "data": {"reason": reason, "bytes": 10, "count": count}}) + "\n"


def test_summarise_counts_events_by_type_and_rejections_by_reason(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    path.write_text(collector_line(ev(1)) + collector_line(ev(2, type="drguard.phase.finished"))
                    + rejected_line("not_json") + collector_line(ev(3)) + rejected_line("collector_full", 4))
    assert tel.summarise(str(path)) == {
        "events": 3, "by_type": {"drguard.probe.result": 2, "drguard.phase.finished": 1},
        "rejected": 5, "rejected_reasons": {"not_json": 1, "collector_full": 4},
        "refused": 0, "refused_reasons": {}, "corrupt": 0, "corrupt_lines": []}


def test_summarise_counts_every_line_the_collector_cannot_have_written_as_corrupt(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    good = collector_line(ev(0))
    path.write_text(
        good
        + "not json at all\n"                                          # 2
        + json.dumps(ev(1)) + "\n"                                     # 3: never received (no receivedat)
        + rejected_line("not_json", source="/somebody/else")           # 4: a forged rejection
        + collector_line(ev(2, type="drguard.telemetry.status"))       # 5: a reserved type
        + collector_line(ev(3, specversion="0.3"))                     # 6
        + "\n"                                                         # 7: empty
        + "x" * (8 * tel.MAX_LINE + 10) + "\n"                         # 8: longer than any event
        + good
        + good[:40]                                                    # 10: cut short
    )
    got = tel.summarise(str(path))
    assert got["events"] == 2 and got["rejected"] == 0 and got["corrupt"] == 8
    assert got["corrupt_lines"] == [
        {"line": 2, "reason": "not_json"}, {"line": 3, "reason": "not_received"},
        {"line": 4, "reason": "bad_rejected_record"}, {"line": 5, "reason": "type_reserved"},
        {"line": 6, "reason": "specversion_not_1.0"}, {"line": 7, "reason": "not_json"},
        {"line": 8, "reason": "line_too_long"}, {"line": 10, "reason": "truncated"}]


def test_summarise_of_an_empty_file_is_zero(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    path.write_bytes(b"")
    assert tel.summarise(str(path)) == {"events": 0, "by_type": {}, "rejected": 0, "rejected_reasons": {},
                                        "refused": 0, "refused_reasons": {}, "corrupt": 0, "corrupt_lines": []}


def test_summarise_refuses_a_missing_file_a_symlink_and_a_directory(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text(collector_line(ev()))
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    for path in (tmp_path / "missing.jsonl", link, tmp_path):
        with pytest.raises(tel.TelemetryError) as err:
            tel.summarise(str(path))
        assert err.value.detail["path"] == str(path)


# ---------------------------------------------------------------- the programs, in a namespace

_ROOT = os.geteuid() == 0 and shutil.which("ip") is not None
netns_only = pytest.mark.skipif(not _ROOT, reason="the collector tests bind inside a network namespace of their "
                                "own, which needs root and ip (iproute2); euid %d" % os.geteuid())


CREDS = {}  # the telemetry channel of the module's drill (credentials of the collector and its senders)
OTHER = {}  # another drill's channel
TIERS = ["app"]


def _channel(drill_id):
    root = f"/dev/shm/drguard-test-{uuid.uuid4().hex[:8]}-mtls"
    channel = tel.Channel(drill_id, root=root)
    channel.ensure({"tiers": {"app": {"ns": "drg-t-app"}, "db": {"ns": "drg-t-db"},
                              "validation": {"ns": "drg-t-val"}},
                    "world": {"neighbours": {"control_plane": {"ns": "drg-t-cp"}}}}, 600)
    path = channel._path
    return root, {"drill_id": drill_id, "path": path,
                  "collector": {"drill_id": drill_id, "tiers": TIERS, "identity": path("collector.pem"),
                                "trust": path("trust.pem")}}


@pytest.fixture(scope="module", autouse=True)
def channels():
    """Two drills' telemetry channels on /dev/shm (root: the socket tests only); always destroyed."""
    if not _ROOT:
        yield
        return
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
    roots = []
    try:
        for target, drill_id in ((CREDS, "dr-20260101000000-telemt"), (OTHER, "dr-20260101000000-othert")):
            root, creds = _channel(drill_id)
            roots.append(root)
            target.update(creds)
        yield
    finally:
        for root in roots:
            _pki.destroy(root)
        assert not any(os.path.lexists(root) for root in roots)


@pytest.fixture
def ns():
    name = f"drg-t{uuid.uuid4().hex[:5]}-tel"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def collector(ns, tmp_path):
    """Start a collector in ``ns`` on 127.0.0.1; returns (process, output path); always stopped."""
    procs = []

    def start(**limits):
        out = tmp_path / f"telemetry-{len(procs)}.jsonl"
        with open(out, "wb") as fh:
            argv = tel.collector_argv(PY, "127.0.0.1", PORT, **CREDS["collector"], **limits)
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                    stdout=fh, stderr=subprocess.PIPE)
        procs.append(proc)
        ready = proc.stderr.readline().decode()
        assert ready == f"telemetry collector listening on 127.0.0.1:{PORT}\n", ready + proc.stderr.read().decode()
        return proc, out

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.stderr.close()


def send(ns, text, connect_timeout=5, read_timeout=5, sender="control-plane.pem", creds=None):
    creds = creds or CREDS
    argv = tel.sender_argv(PY, "127.0.0.1", PORT, drill_id=creds["drill_id"], identity=creds["path"](sender),
                           trust=creds["path"]("trust.pem"), connect_timeout=connect_timeout,
                           read_timeout=read_timeout)
    return subprocess.run(["ip", "netns", "exec", ns, *argv],
                          input=text.encode() if isinstance(text, str) else text, capture_output=True, timeout=60)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    return proc.wait(10)


@netns_only
def test_every_acknowledged_event_is_already_in_the_file_with_receivedat(ns, collector):
    proc, out = collector()
    events = [ev(i) for i in range(50)]
    res = send(ns, tel.encode_events(events))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"sent": 50, "acknowledged": 50}
    written = [json.loads(x) for x in out.read_text().splitlines()]  # before the collector stops
    assert [e["id"] for e in written] == [e["id"] for e in events]
    assert all(tel.validate_event(e) is None and e["receivedat"].endswith("Z") for e in written)
    assert stop(proc) == 0
    assert tel.summarise(str(out)) == {"events": 50, "by_type": {"drguard.probe.result": 50}, "rejected": 0,
                                       "rejected_reasons": {}, "refused": 0, "refused_reasons": {}, "corrupt": 0,
                                       "corrupt_lines": []}


@netns_only
def test_invalid_lines_are_rejected_by_reason_without_their_content_and_the_sender_fails(ns, collector):
    proc, out = collector()
    bait = "SECRET-LOOKING-BAIT-" + uuid.uuid4().hex
    text = (tel.encode_events([ev(0)])
            + json.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "com.bait", "time": "x",
                          "data": bait}) + "\n"
            + bait + "\n"
            + '{"a": 1, "a": "' + bait + '"}\n'
            + tel.encode_events([ev(1)]))
    res = send(ns, text)
    assert res.returncode == 1
    summary = json.loads(res.stdout)
    assert summary["acknowledged"] == 2 and summary["sent"] == 5
    assert summary["rejected"] == [{"event": 2, "reason": "type_not_drguard"}, {"event": 3, "reason": "not_json"},
                                   {"event": 4, "reason": "duplicate_key"}]
    assert res.stderr.decode().count("\n") == 1
    assert "3 of 5 event(s) not acknowledged" in res.stderr.decode() and "event 2, type_not_drguard" in \
        res.stderr.decode()
    assert stop(proc) == 0
    content = out.read_text()
    assert bait not in content
    got = tel.summarise(str(out))
    assert (got["events"], got["rejected"], got["corrupt"]) == (2, 3, 0)
    assert got["rejected_reasons"] == {"type_not_drguard": 1, "not_json": 1, "duplicate_key": 1}


@netns_only
def test_the_collector_writes_only_ascii_json_whatever_it_is_sent(ns, collector):
    proc, out = collector()
    text = (tel.encode_events([ev(0, data={"s": "caf\u00e9 \U0001f600 \u2028"})]).encode()
            + b'{"x": "\xc3\x28"}\n'       # invalid UTF-8
            + line(ev(1, data="SURROGATE")).replace(b"SURROGATE", b"\\ud800") + b"\n"  # a lone surrogate
            + b"\x00\x01\x02\n"
            + b"\r\n")  # blank: the sender does not send it
    res = send(ns, text)
    assert res.returncode == 1
    assert json.loads(res.stdout)["rejected"] == [{"event": 2, "reason": "not_utf8"},
                                                  {"event": 3, "reason": "not_utf8"},
                                                  {"event": 4, "reason": "not_json"}]
    assert stop(proc) == 0
    raw = out.read_bytes()
    assert raw.isascii()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(json.loads(x) for x in lines[:-1])
    assert json.loads(lines[0])["data"]["s"] == "caf\u00e9 \U0001f600 \u2028"
    assert tel.summarise(str(out))["rejected"] == 3


@netns_only
def test_a_line_over_the_cap_is_rejected_and_the_next_line_still_counts(ns, collector):
    proc, out = collector()
    text = tel.encode_events([ev(0)]) + "x" * (3 * tel.MAX_LINE) + "\n" + tel.encode_events([ev(1)])
    res = send(ns, text)
    assert res.returncode == 1
    assert json.loads(res.stdout)["rejected"] == [{"event": 2, "reason": "line_too_long"}]
    assert stop(proc) == 0
    got = tel.summarise(str(out))
    assert (got["events"], got["rejected_reasons"]) == (2, {"line_too_long": 1})


@netns_only
def test_past_the_total_cap_events_are_rejected_and_counted_when_the_collector_stops(ns, collector):
    sender = json.dumps(f"spiffe://{CREDS['drill_id']}.drguard.internal/control-plane")
    # receivedat adds 43 bytes and receivedfrom the sender's identity: three fit, a fourth does not
    one = len(tel.encode_events([ev(0)])) + 60 + len(',"receivedfrom":' + sender)
    proc, out = collector(max_total=3 * one)
    res = send(ns, tel.encode_events([ev(i) for i in range(6)]))
    assert res.returncode == 1
    summary = json.loads(res.stdout)
    assert summary["acknowledged"] == 3
    assert {r["reason"] for r in summary["rejected"]} == {"collector_full"} and len(summary["rejected"]) == 3
    assert stop(proc) == 0
    got = tel.summarise(str(out))
    assert (got["events"], got["rejected"], got["rejected_reasons"]) == (3, 3, {"collector_full": 3})


@netns_only
def test_a_sender_past_the_connection_cap_is_refused(ns, collector):
    proc, out = collector(max_connections=1)
    holder = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c",
                               "import socket,sys,time; s=socket.create_connection(('127.0.0.1', %d)); "
                               "print('held', flush=True); time.sleep(20)" % PORT],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(0.3)
        res = send(ns, tel.encode_events([ev(0)]))
        assert res.returncode == 1
        # Closed before any TLS session: the sender's handshake fails, the collector counts it.
        assert json.loads(res.stdout) == {"sent": 1, "acknowledged": 0, "rejected": []}
        assert "the TLS handshake with the collector at 127.0.0.1:4317 failed (closed_by_peer)" in \
            res.stderr.decode()
    finally:
        holder.kill()
        holder.wait(10)
    assert stop(proc) == 0
    assert tel.summarise(str(out))["rejected_reasons"] == {"collector_busy": 1}  # the refused connection


@netns_only
def test_an_event_is_acknowledged_only_once_it_is_written(ns):
    # The collector's stdout is a pipe nobody reads: once it is full the collector's write blocks,
    # and no event may be acknowledged that is not already complete in the pipe.
    argv = tel.collector_argv(PY, "127.0.0.1", PORT, **CREDS["collector"])
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"listening" in proc.stderr.readline()
        events = [ev(i, data={"pad": "x" * 400}) for i in range(400)]  # about 200 KiB, the pipe holds 64 KiB
        res = send(ns, tel.encode_events(events), read_timeout=1)
        assert res.returncode == 1 and "unanswered (no acknowledgement within 1s)" in res.stderr.decode()
        acknowledged = json.loads(res.stdout)["acknowledged"]
        os.set_blocking(proc.stdout.fileno(), False)
        in_pipe = os.read(proc.stdout.fileno(), 1 << 20)
        complete = [json.loads(x)["id"] for x in in_pipe.split(b"\n")[:-1]]
        assert 0 < acknowledged <= len(complete) < len(events)
        assert complete[:acknowledged] == [e["id"] for e in events[:acknowledged]]
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@netns_only
def test_a_collector_that_cannot_write_rejects_every_event_as_write_failed(ns):
    with open("/dev/full", "wb") as full:
        argv = tel.collector_argv(PY, "127.0.0.1", PORT, **CREDS["collector"])
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=full, stderr=subprocess.PIPE)
    try:
        assert b"listening" in proc.stderr.readline()
        res = send(ns, tel.encode_events([ev(0), ev(1)]))
        assert res.returncode == 1
        assert json.loads(res.stdout)["rejected"] == [{"event": 1, "reason": "write_failed"},
                                                      {"event": 2, "reason": "write_failed"}]
        assert stop(proc) == 0
        assert proc.stderr.read().decode().startswith("telemetry collector: cannot write events")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


@netns_only
def test_the_sender_fails_with_one_line_when_no_collector_listens(ns):
    started = time.monotonic()
    res = send(ns, tel.encode_events([ev(0)]), connect_timeout=1)
    assert res.returncode == 1
    assert time.monotonic() - started < 10
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "cannot connect to the collector at 127.0.0.1:4317 within 1s" in err
    assert json.loads(res.stdout) == {"sent": 1, "acknowledged": 0, "rejected": []}


@netns_only
def test_a_sender_with_nothing_to_send_succeeds_without_connecting(ns):
    res = send(ns, "\n\n", connect_timeout=1)
    assert res.returncode == 0 and json.loads(res.stdout) == {"sent": 0, "acknowledged": 0}


@netns_only
def test_the_sender_gives_up_on_a_silent_collector_within_its_read_timeout(ns):
    # A peer that accepts and never answers: the sender must not hang.
    silent = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c",
                               "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(); "
                               "c,_=s.accept(); print('ok', flush=True); time.sleep(30)" % PORT],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        started = time.monotonic()
        res = send(ns, tel.encode_events([ev(0)]), read_timeout=1)
        assert time.monotonic() - started < 10
        assert res.returncode == 1
        assert "the TLS handshake with the collector at 127.0.0.1:4317 failed (timeout)" in res.stderr.decode()
    finally:
        silent.kill()
        silent.wait(10)


@netns_only
def test_sigterm_stops_the_collector_with_exit_0_and_a_complete_file(ns, collector):
    proc, out = collector()
    assert send(ns, tel.encode_events([ev(i) for i in range(20)])).returncode == 0
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 5
    assert out.read_bytes().endswith(b"\n") and tel.summarise(str(out))["events"] == 20


# ---------------------------------------------------------------- mTLS: who may send

def refused(out):
    """The collector's refusal records (type drguard.telemetry.refused) in its file."""
    return [json.loads(x)["data"] for x in out.read_text().splitlines()
            if json.loads(x)["type"] == "drguard.telemetry.refused"]


def raw_client(ns, *, identity=None, trust=None, tls=True, payload=b"", minimum=None):
    """A client made by hand (no sender program): plain TCP or TLS with or without a certificate; returns
    what it read, or the error it got reading (TLS 1.3 shows a refused certificate on the first read)."""
    code = f"""
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", {PORT}), timeout=5)
if {tls!r}:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations({trust!r})
    if {minimum!r}:
        ctx.maximum_version = getattr(ssl.TLSVersion, {minimum!r})
    if {identity!r}:
        ctx.load_cert_chain({identity!r})
    try:
        s = ctx.wrap_socket(s)
    except (OSError, ValueError) as exc:
        print("handshake:" + type(exc).__name__); sys.exit(0)
if not {payload!r}:
    s.close(); print("closed"); sys.exit(0)
try:
    s.sendall({payload!r})
    print("read:" + repr(s.recv(100)))
except (OSError, ValueError) as exc:
    print("error:" + type(exc).__name__)
"""
    return subprocess.run(["ip", "netns", "exec", ns, PY, "-I", "-S", "-c", code], capture_output=True, text=True,
                          timeout=60).stdout.strip()


@netns_only
def test_an_accepted_senders_events_land_with_its_identity(ns, collector):
    proc, out = collector()
    for sender in ("control-plane.pem", "tier-app.pem", "tier-validation.pem"):
        res = send(ns, tel.encode_events([ev(0)]), sender=sender)
        assert res.returncode == 0, res.stderr
    assert stop(proc) == 0
    domain = CREDS["drill_id"] + ".drguard.internal"
    assert [json.loads(x)["receivedfrom"] for x in out.read_text().splitlines()] == [
        f"spiffe://{domain}/control-plane", f"spiffe://{domain}/tier/app", f"spiffe://{domain}/tier/validation"]
    assert tel.summarise(str(out))["refused"] == 0


@netns_only
def test_a_sender_of_another_drill_is_refused_unknown_ca_and_nothing_of_it_lands(ns, collector):
    proc, out = collector()
    # Its own leaf and key, with this drill's trust: it reaches the collector's verdict.
    creds = dict(CREDS, path=lambda name: OTHER["path"](name) if name != "trust.pem" else CREDS["path"](name))
    res = send(ns, tel.encode_events([ev(0, data="FROM-THE-OTHER-DRILL")]), creds=creds)
    assert res.returncode == 1 and json.loads(res.stdout)["acknowledged"] == 0
    assert "the collector refused this sender (unknown_ca)" in res.stderr.decode()
    assert stop(proc) == 0
    assert "FROM-THE-OTHER-DRILL" not in out.read_text()
    assert refused(out) == [{"reason": "unknown_ca", "peer_address": "127.0.0.1", "peer_id": None, "serial": None}]
    got = tel.summarise(str(out))
    assert (got["events"], got["refused"], got["refused_reasons"]) == (0, 1, {"unknown_ca": 1})


@netns_only
def test_a_sender_without_a_certificate_is_refused_and_nothing_of_it_lands(ns, collector):
    proc, out = collector()
    got = raw_client(ns, trust=CREDS["path"]("trust.pem"), payload=tel.encode_events([ev(0)]).encode())
    assert got.startswith("error:"), got  # the alert, on the first read
    assert stop(proc) == 0
    assert refused(out) == [{"reason": "no_client_certificate", "peer_address": "127.0.0.1", "peer_id": None,
                             "serial": None}]
    assert tel.summarise(str(out))["events"] == 0


@netns_only
def test_a_plain_tcp_sender_and_tls_1_2_are_refused_and_a_bare_connect_leaves_no_trace(ns, collector):
    proc, out = collector()
    plain = raw_client(ns, tls=False, payload=tel.encode_events([ev(0, data="PLAIN-TEXT-EVENT")]).encode())
    assert plain in ("read:b''", "error:ConnectionResetError"), plain  # never an "ok"
    old = raw_client(ns, identity=CREDS["path"]("control-plane.pem"), trust=CREDS["path"]("trust.pem"),
                     minimum="TLSv1_2", payload=b"x\n")
    assert old.startswith(("handshake:", "error:")), old
    assert raw_client(ns, tls=False) == "closed"  # connect, send nothing, close: the probes' "connect" row
    assert stop(proc) == 0
    assert "PLAIN-TEXT-EVENT" not in out.read_text()
    assert [r["reason"] for r in refused(out)] == ["protocol_version", "protocol_version"]
    assert tel.summarise(str(out))["events"] == 0


@netns_only
def test_an_identity_of_this_drill_outside_the_plans_tiers_or_not_a_sender_is_refused(ns, collector):
    proc, out = collector()  # tiers: app (and validation)
    domain = CREDS["drill_id"] + ".drguard.internal"
    for sender in ("tier-db.pem", "collector.pem"):
        res = send(ns, tel.encode_events([ev(0)]), sender=sender)
        assert res.returncode == 1 and json.loads(res.stdout)["acknowledged"] == 0
    assert stop(proc) == 0
    assert [(r["reason"], r["peer_id"]) for r in refused(out)] == [
        ("identity_not_allowed", f"spiffe://{domain}/tier/db"), ("bad_identity_path", f"spiffe://{domain}/telemetry")]
    assert all(r["serial"] for r in refused(out))
    assert tel.summarise(str(out))["events"] == 0


@netns_only
def test_the_sender_sends_nothing_to_a_collector_that_is_not_the_drills_telemetry_identity(ns, tmp_path):
    # A collector presenting a tier's leaf of the drill: the sender refuses it before sending a byte.
    out = tmp_path / "impostor.jsonl"
    creds = dict(CREDS["collector"], identity=CREDS["path"]("tier-app.pem"))
    with open(out, "wb") as fh:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *tel.collector_argv(PY, "127.0.0.1", PORT, **creds)],
                                stdout=fh, stderr=subprocess.PIPE)
    try:
        assert b"listening" in proc.stderr.readline()
        res = send(ns, tel.encode_events([ev(0)]))
        assert res.returncode == 1
        assert "presented spiffe://%s.drguard.internal/tier/app, not the drill's telemetry identity" % (
            CREDS["drill_id"]) in res.stderr.decode()
        assert stop(proc) == 0
        assert tel.summarise(str(out))["events"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_summarise_counts_refusals_apart_and_a_forged_refusal_as_corrupt(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    record = {"specversion": "1.0", "id": "1", "source": tel.COLLECTOR_EVENT_SOURCE, "type": tel.REFUSED_TYPE,
              "time": "2026-01-01T00:00:00Z", "data": {"reason": "unknown_ca", "peer_address": "10.0.0.1",
                                                       "peer_id": None, "serial": None}}
    path.write_text(json.dumps(record) + "\n" + json.dumps(dict(record, source="/drguard/drill/x")) + "\n"
                    + collector_line(ev(0)))
    got = tel.summarise(str(path))
    assert (got["events"], got["refused"], got["refused_reasons"]) == (1, 1, {"unknown_ca": 1})
    assert got["corrupt_lines"] == [{"line": 2, "reason": "bad_refused_record"}]


# ---------------------------------------------------------------- drill_telemetry (no packet sent)

DRILL = "dr-20260101000000-abc123"


def test_drill_prefix_is_the_address_plans_prefix():
    from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import address_plan
    from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

    boundary = parse_boundary({"sandbox_cidr": "10.9.0.0/16", "production_cidrs": ["10.0.0.0/16"], "egress": [],
                               "ingress": [], "tiers": ["app"], "tier_rules": []})
    assert tel.drill_prefix(DRILL) == address_plan(boundary, DRILL)["prefix"]


def test_build_events_fills_source_and_names_the_bad_spec():
    built = tel.build_events(DRILL, [{"type": "drguard.phase.finished", "subject": "restore", "data": {"s": 1}},
                                     {"type": "drguard.validation.output", "source": "/x",
                                      "time": "2026-01-01T00:00:00Z"}])
    assert [e["source"] for e in built] == [f"/drguard/drill/{DRILL}", "/x"]
    assert built[1]["time"] == "2026-01-01T00:00:00Z" and "subject" not in built[1] and built[1]["data"] is None
    with pytest.raises(tel.TelemetryError) as err:
        tel.build_events(DRILL, [{"type": "drguard.ok"}, {"type": "phase.finished"}])
    assert err.value.detail == {"index": 2, "reason": "type_not_drguard"} and err.value.msg.startswith("event 2:")


def module_args(**over):
    args = {"drill_id": DRILL, "namespace": tel.drill_prefix(DRILL) + "cp", "address": "198.51.100.17",
            "port": 4317, "events": [{"type": "drguard.phase.finished", "subject": "network", "data": {"s": 1.5}}]}
    args.update(over)
    return args


def test_drill_telemetry_check_mode_builds_the_events_and_sends_nothing():
    res = run_module("drill_telemetry", module_args(), check_mode=True)
    assert not res.get("failed"), res
    assert res["changed"] is True and res["sent"] == 0 and res["acknowledged"] == 0
    (event,) = res["events"]
    assert event["type"] == "drguard.phase.finished" and event["source"] == f"/drguard/drill/{DRILL}"
    assert tel.validate_event(event) is None


@pytest.mark.parametrize(("over", "says"), [
    ({"namespace": "drg-ffffff-cp"}, "is not one of drill"),
    ({"events": [{"type": "com.example.x"}]}, "(type_not_drguard)"),
    ({"events": [{"type": "drguard.telemetry.rejected"}]}, "(type_reserved)"),
    ({"address": "collector.local"}, "is not an IP address"),
    ({"port": 70000}, "is not a port number"),
    ({"connect_timeout": 0}, "is outside 0.1-120 seconds"),
])
def test_drill_telemetry_refuses_bad_input_before_sending(over, says):
    res = run_module("drill_telemetry", module_args(**over))  # not check mode: it must fail before sending
    assert res.get("failed") is True and says in res["msg"], res
    assert "sent" not in res
