"""CloudEvents 1.0 alerts: shape, validation, secrets, the alerts.jsonl sink."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
import time
import uuid
from datetime import datetime

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import alerts
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time

DRILL = "dr-20261129050000-a1b2c3"
REQUIRED = {"specversion", "id", "source", "type"}


def test_event_has_cloudevents_1_0_attributes():
    ev = alerts.build_event(DRILL, "drguard.artifact.quarantined", "orders.sqlite", {"reason": "digest_mismatch"})
    assert set(ev) >= REQUIRED
    assert ev["specversion"] == "1.0"
    assert uuid.UUID(ev["id"]).version == 4
    assert ev["source"] == "drguard.sandbox/" + DRILL
    assert ev["type"] == "drguard.artifact.quarantined"
    assert ev["subject"] == "orders.sqlite"
    assert ev["datacontenttype"] == "application/json"
    assert ev["data"] == {"reason": "digest_mismatch"}
    # RFC 3339 UTC, Z suffix, parseable.
    assert ev["time"].endswith("Z")
    assert abs((parse_time(ev["time"]) - datetime.now(parse_time(ev["time"]).tzinfo)).total_seconds()) < 3600
    # Extension attribute names: lowercase letters and digits only (CloudEvents 1.0).
    for name in set(ev) - REQUIRED - {"time", "subject", "datacontenttype", "data"}:
        assert name.isalnum() and name.islower() and len(name) <= 20, name
    assert json.loads(alerts.encode_event(ev)) == ev


def test_ids_are_unique_and_subject_optional():
    a = alerts.build_event(DRILL, "drguard.drill.halted", None, {})
    b = alerts.build_event(DRILL, "drguard.drill.halted", None, {})
    assert a["id"] != b["id"] and "subject" not in a


@pytest.mark.parametrize("bad", ["artifact.quarantined", "drguard.", "drguard.Upper", "prod.drguard.x", "", None,
                                 "drguard.x y"])
def test_type_must_be_a_drguard_type(bad):
    with pytest.raises(alerts.AlertError, match="drguard"):
        alerts.build_event(DRILL, bad, None, {})


def test_bad_drill_id_and_data_are_refused():
    with pytest.raises(ValueError, match="drill_id"):
        alerts.build_event("../prod", "drguard.x", None, {})
    with pytest.raises(alerts.AlertError, match="mapping"):
        alerts.build_event(DRILL, "drguard.x", None, ["list"])
    with pytest.raises(alerts.AlertError, match="JSON"):
        alerts.build_event(DRILL, "drguard.x", None, {"n": float("nan")})


@pytest.mark.parametrize("data,path", [
    ({"password": "x"}, "data.password"),
    ({"nested": {"DB_Secret": "x"}}, "data.nested.DB_Secret"),
    ({"items": [{"session_token": "x"}]}, "data.items[0].session_token"),
    ({"api-key": "x"}, "data.api-key"),
    ({"note": "-----BEGIN RSA PRIVATE KEY-----\nabc"}, "data.note"),
    ({"note": "key AKIAABCDEFGHIJKLMNOP leaked"}, "data.note"),
])
def test_secrets_are_refused_naming_the_key_never_the_value(data, path):
    with pytest.raises(alerts.AlertError) as err:
        alerts.build_event(DRILL, "drguard.x", None, data)
    assert path in str(err.value)
    assert "abc" not in str(err.value) and "AKIAABCDEFGHIJKLMNOP" not in str(err.value)


def test_ordinary_drill_data_passes():
    alerts.check_no_secrets({"findings": [{"code": "egress_open", "detail": "0.0.0.0/0 on 443"}],
                             "observed_sha256": "ab" * 32, "keyid": "cd" * 32})


def test_append_jsonl_creates_0600_file_in_0700_dir_and_appends(tmp_path):
    path = tmp_path / "run" / "alerts.jsonl"
    events = [alerts.build_event(DRILL, "drguard.drill.phase", None, {"i": i}) for i in range(3)]
    for ev in events:
        alerts.append_jsonl(str(path), ev)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == events
    assert alerts.read_jsonl(str(path)) == events


def test_append_jsonl_creates_every_missing_parent_0700_under_umask_002(tmp_path):
    path = tmp_path / "runs" / "dr-1" / "out" / "alerts.jsonl"
    old = os.umask(0o002)
    try:
        alerts.append_jsonl(str(path), alerts.build_event(DRILL, "drguard.x", None, {}))
    finally:
        os.umask(old)
    dirs = [tmp_path / "runs", tmp_path / "runs" / "dr-1", path.parent]
    assert [stat.S_IMODE(os.lstat(d).st_mode) for d in dirs] == [0o700] * 3
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_append_jsonl_refuses_a_dangling_symlink_as_its_directory(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(alerts.AlertError, match="symlink"):
        alerts.append_jsonl(str(tmp_path / "out" / "alerts.jsonl"), alerts.build_event(DRILL, "drguard.x", None, {}))
    assert not (tmp_path / "nowhere").exists()


def test_a_bad_drill_id_is_an_alert_error():
    with pytest.raises(alerts.AlertError, match="drill_id"):
        alerts.AlertSink("../prod", {"path": "/x/alerts.jsonl"})


def test_append_jsonl_tightens_an_existing_file_and_keeps_its_lines(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"old": true}\n')
    os.chmod(path, 0o644)
    alerts.append_jsonl(str(path), alerts.build_event(DRILL, "drguard.x", None, {}))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert alerts.read_jsonl(str(path))[0] == {"old": True}
    assert len(alerts.read_jsonl(str(path))) == 2


def test_append_jsonl_refuses_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.log"
    target.write_text("")
    link = tmp_path / "alerts.jsonl"
    os.symlink(target, link)
    with pytest.raises(alerts.AlertError, match="symlink"):
        alerts.append_jsonl(str(link), alerts.build_event(DRILL, "drguard.x", None, {}))
    assert target.read_text() == ""


def _append_in_pieces(path, writer, count, pad, piece):
    """Append ``count`` events, each line handed to the kernel ``piece`` bytes at a time.

    POSIX lets a write to a regular file return short (a signal, a full quota, a network
    file system), and append_jsonl then loops: only its lock keeps the rest of the line
    from landing after another writer's bytes. Small pieces and a yield between them make
    that window wide, so the test fails when the locking is gone.
    """
    real_write = os.write

    def short_write(fd, data):
        written = real_write(fd, bytes(data[:piece]))
        time.sleep(0)
        return written

    alerts.os.write = short_write  # this process (a forked child) or this test only
    try:
        def one_thread(t):
            for i in range(count):
                alerts.append_jsonl(path, alerts.build_event(
                    DRILL, "drguard.x", None, {"w": writer, "t": t, "i": i, "pad": pad}))
        threads = [threading.Thread(target=one_thread, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        alerts.os.write = real_write


def test_concurrent_appends_never_interleave(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    pad = "x" * 70000  # far above PIPE_BUF, and written in 4 KiB pieces below
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_in_pieces, args=(path, w, 10, pad, 4096)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    with open(path, "rb") as handle:
        raw = handle.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b"", "the file must end with a complete line"
    events = []
    for number, line in enumerate(lines[:-1]):
        try:
            events.append(json.loads(line))
        except ValueError:
            pytest.fail("line %d is not one whole event: writers interleaved (%d bytes)" % (number, len(line)))
    assert all(e["data"]["pad"] == pad for e in events)
    # 4 processes x 2 threads x 10 events, each exactly once.
    assert sorted((e["data"]["w"], e["data"]["t"], e["data"]["i"]) for e in events) == [
        (w, t, i) for w in range(4) for t in range(2) for i in range(10)]


def test_parse_sink():
    assert alerts.parse_sink({"path": "/x/alerts.jsonl"})["sns_topic_arn"] is None
    with pytest.raises(alerts.AlertError, match="path"):
        alerts.parse_sink({})
    with pytest.raises(alerts.AlertError, match="unknown"):
        alerts.parse_sink({"path": "/x", "webhook": "https://prod"})
    with pytest.raises(alerts.AlertError, match="ARN"):
        alerts.parse_sink({"path": "/x", "sns_topic_arn": "prod-topic"})


def test_sink_with_aws_destination_needs_a_client(tmp_path):
    with pytest.raises(alerts.AlertError, match="client"):
        alerts.AlertSink(DRILL, {"path": str(tmp_path / "a.jsonl"), "log_group_name": "/g"})
    sink = alerts.AlertSink(DRILL, {"path": str(tmp_path / "a.jsonl")})
    ev = sink.emit("drguard.drill.halted", "verify", {"phase": "verify"})
    assert alerts.read_jsonl(str(tmp_path / "a.jsonl")) == [ev]
