"""quarantine_artifact and drill_alert against the emulator and local files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import read_jsonl

QUARANTINE_TAGS = {"drguard:drill-id", "drguard:quarantine-reason", "drguard:observed-sha256",
                   "drguard:quarantined-at"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _drill_id() -> str:
    return "dr-qt-%s" % uuid.uuid4().hex[:10]


def _lock_bucket(s3, name, default_retention=True):
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    if default_retention:
        s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
    return name


def _failure(name, reason, source, version_id=None, sha=None, size=None, detail="test"):
    return {"name": name, "reason": reason, "detail": detail, "source": source, "version_id": version_id,
            "observed_sha256": sha, "observed_size": size}


def _tags(s3, bucket, key, version_id=None):
    kwargs = {"Bucket": bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    return {t["Key"]: t["Value"] for t in s3.get_object_tagging(**kwargs)["TagSet"]}


def _all_keys(s3, bucket):
    out = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        out += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
    return out


@pytest.fixture
def s3_setup(aws, tmp_path):
    """A COMPLIANCE default-retention versioned backup bucket and a separate Object Lock quarantine bucket."""
    s3 = aws("s3")
    suffix = uuid.uuid4().hex[:10]
    src = _lock_bucket(s3, "qt-src-%s" % suffix)
    qbucket = _lock_bucket(s3, "qt-quar-%s" % suffix)
    good, bad = b"good backup bytes" * 10, b"tampered bytes"
    v1 = s3.put_object(Bucket=src, Key="set/orders.sqlite", Body=bad, ChecksumAlgorithm="SHA256")["VersionId"]
    # A newer version must not be what gets quarantined.
    v2 = s3.put_object(Bucket=src, Key="set/orders.sqlite", Body=good, ChecksumAlgorithm="SHA256")["VersionId"]
    s3.put_object_tagging(Bucket=src, Key="set/orders.sqlite", VersionId=v1,
                          Tagging={"TagSet": [{"Key": "team", "Value": "dba"}]},
                          ChecksumAlgorithm="SHA256")
    return {"s3": s3, "src": src, "q": qbucket, "bad": bad, "good": good, "v1": v1, "v2": v2,
            "sink": str(tmp_path / "out" / "alerts.jsonl")}


def test_s3_quarantine_exact_version_legal_hold_tags_record_alert_idempotent(s3_setup, module_runner):
    st, drill = s3_setup, _drill_id()
    s3 = st["s3"]
    source = "s3://%s/set/orders.sqlite?versionId=%s" % (st["src"], st["v1"])
    failure = _failure("orders.sqlite", "digest_mismatch", source, st["v1"], _sha(st["bad"]), len(st["bad"]),
                       detail="sha256 differs from the manifest")
    args = {"failures": [failure], "drill_id": drill, "quarantine": "s3://%s/drills/" % st["q"],
            "alert_sink": {"path": st["sink"]}}

    # Check mode: nothing written, no alert.
    before = _all_keys(s3, st["q"])
    res = module_runner("quarantine_artifact", args, check_mode=True)
    assert not res.failed, res
    assert res["changed"] is True
    assert res["alerts"] == []
    assert res["records"][0]["action"] == "would_quarantine"
    assert _all_keys(s3, st["q"]) == before
    assert not os.path.exists(st["sink"])
    assert _tags(s3, st["src"], "set/orders.sqlite", st["v1"]) == {"team": "dba"}

    res = module_runner("quarantine_artifact", args)
    assert not res.failed, res
    assert res["changed"] is True
    rec = res["records"][0]
    key = "drills/%s/orders.sqlite" % drill
    assert rec["copied"] is True and rec["original"] == "preserved" and rec["legal_hold"] == "ON"
    assert rec["quarantine_location"].startswith("s3://%s/%s?versionId=" % (st["q"], key))
    assert rec["version_id"] == st["v1"]

    # The copy is the exact failing version, under legal hold, tagged.
    copy_version = rec["quarantine_location"].split("?versionId=")[1]
    body = s3.get_object(Bucket=st["q"], Key=key, VersionId=copy_version)["Body"].read()
    assert body == st["bad"]
    assert s3.get_object_legal_hold(Bucket=st["q"], Key=key, VersionId=copy_version)["LegalHold"]["Status"] == "ON"
    ctags = _tags(s3, st["q"], key, copy_version)
    assert set(ctags) >= QUARANTINE_TAGS
    assert ctags["drguard:drill-id"] == drill
    assert ctags["drguard:quarantine-reason"] == "digest_mismatch"
    assert ctags["drguard:observed-sha256"] == _sha(st["bad"])

    # The source version is tagged (its own tags kept) and not deleted; the newer version untouched.
    stags = _tags(s3, st["src"], "set/orders.sqlite", st["v1"])
    assert stags["team"] == "dba" and stags["drguard:drill-id"] == drill
    assert stags["drguard:quarantine-reason"] == "digest_mismatch"
    assert stags["drguard:quarantined-at"].endswith("Z")
    assert s3.get_object(Bucket=st["src"], Key="set/orders.sqlite", VersionId=st["v1"])["Body"].read() == st["bad"]
    assert "drguard:drill-id" not in _tags(s3, st["src"], "set/orders.sqlite", st["v2"])
    assert sorted(v for k, v in _all_keys(s3, st["src"])) == sorted([st["v1"], st["v2"]])

    # The record beside the copy, under legal hold.
    record_key = "drills/%s/orders.sqlite@digest_mismatch.json" % drill
    stored = json.loads(s3.get_object(Bucket=st["q"], Key=record_key)["Body"].read())
    assert stored["reason"] == "digest_mismatch" and stored["source"] == source
    assert stored["alert_id"] == res["alerts"][0]
    assert s3.head_object(Bucket=st["q"], Key=record_key)["ObjectLockLegalHoldStatus"] == "ON"

    # The alert: CloudEvents attributes and the quarantine payload.
    events = read_jsonl(st["sink"])
    assert len(events) == 1
    ev = events[0]
    assert ev["specversion"] == "1.0" and ev["type"] == "drguard.artifact.quarantined"
    assert ev["source"] == "drguard.sandbox/%s" % drill and ev["id"] == res["alerts"][0]
    assert ev["subject"] == "orders.sqlite"
    for field in ("drill_id", "name", "reason", "detail", "source", "version_id", "observed_sha256",
                  "quarantine_location", "record"):
        assert field in ev["data"], field
    assert ev["data"]["quarantine_location"] == rec["quarantine_location"]
    assert ev["data"]["record"]["record_location"] == "s3://%s/%s" % (st["q"], record_key)
    assert stat.S_IMODE(os.stat(st["sink"]).st_mode) == 0o600

    # Idempotent: same failure again changes nothing, emits nothing, copies nothing.
    keys = _all_keys(s3, st["q"])
    again = module_runner("quarantine_artifact", args)
    assert not again.failed, again
    assert again["changed"] is False and again["alerts"] == []
    assert again["records"][0]["action"] == "unchanged"
    assert _all_keys(s3, st["q"]) == keys
    assert len(read_jsonl(st["sink"])) == 1


def test_s3_manifest_level_missing_and_unsafe_names(s3_setup, module_runner):
    st, drill = s3_setup, _drill_id()
    s3 = st["s3"]
    manifest = b'{"payloadType": "x"}'
    mv = s3.put_object(Bucket=st["src"], Key="set/manifest.dsse.json", Body=manifest,
                       ChecksumAlgorithm="SHA256")["VersionId"]
    unsafe = ["../../escape", "/abs/path", "a\\b", "nul\x00byte", "..", "@manifest", "x@digest_mismatch.json"]
    s3.put_object(Bucket=st["src"], Key="set/../../escape", Body=b"u", ChecksumAlgorithm="SHA256")
    failures = [
        _failure(None, "signature_invalid", "s3://%s/set/manifest.dsse.json?versionId=%s" % (st["src"], mv), mv),
        _failure(None, "threshold_not_met", "s3://%s/set/manifest.dsse.json?versionId=%s" % (st["src"], mv), mv),
        _failure("gone.tar", "artifact_missing", "s3://%s/set/gone.tar" % st["src"]),
        _failure("orders.sqlite", "artifact_missing",
                 "s3://%s/set/orders.sqlite?versionId=nosuchversion" % st["src"], "nosuchversion"),
    ] + [_failure(n, "unsafe_name", "s3://%s/set/manifest.dsse.json?versionId=%s" % (st["src"], mv), mv)
         for n in unsafe]
    # Defensive: an unsafe name whose source is an object of its own still never names a key.
    failures.append(_failure("../../evil", "digest_mismatch", "s3://%s/set/../../escape" % st["src"]))
    prefix = "q/%s/" % uuid.uuid4().hex[:6]
    args = {"failures": failures, "drill_id": drill, "quarantine": "s3://%s/%s" % (st["q"], prefix),
            "alert_sink": {"path": st["sink"]}}
    res = module_runner("quarantine_artifact", args)
    assert not res.failed, res
    assert len(res["records"]) == len(failures) and len(res["alerts"]) == len(failures)

    # Manifest-level: the manifest object itself is copied once, with one record per reason.
    base = "%s%s/" % (prefix, drill)
    mrec = res["records"][0]
    assert mrec["name"] is None and mrec["copied"] is True
    assert mrec["quarantine_location"].startswith("s3://%s/%s@manifest?versionId=" % (st["q"], base))
    assert s3.get_object(Bucket=st["q"], Key=base + "@manifest")["Body"].read() == manifest
    assert res["records"][1]["quarantine_location"] == mrec["quarantine_location"]
    mtags = _tags(s3, st["src"], "set/manifest.dsse.json", mv)
    assert mtags["drguard:quarantine-reason"] == "signature_invalid+threshold_not_met+unsafe_name"

    # Missing: record and alert, no copy.
    for rec in res["records"][2:4]:
        assert rec["copied"] is False and rec["quarantine_location"] is None and rec["original"] == "missing"
    keys = [k for k, _ in _all_keys(s3, st["q"]) if k.startswith(base)]
    assert base + "gone.tar@artifact_missing.json" in keys
    assert base + "gone.tar" not in keys
    assert base + "orders.sqlite@artifact_missing.json" in keys
    assert base + "orders.sqlite" not in keys

    # Unsafe names: every key is one plain segment under the drill's prefix.
    for key in keys:
        leaf = key[len(base):]
        assert key.startswith(base) and "/" not in leaf and "\\" not in leaf and "\x00" not in leaf
        assert leaf not in (".", "..") and not leaf.startswith(".")
    # Unsafe names: the evidence is the manifest (one shared copy), each name has its own record.
    unsafe_recs = [r for r in res["records"] if r["reason"] == "unsafe_name"]
    assert {r["quarantine_location"] for r in unsafe_recs} == {mrec["quarantine_location"]}
    assert len({r["record_location"] for r in unsafe_recs}) == len(unsafe)
    for r in unsafe_recs:
        assert r["record_location"].startswith("s3://%s/%s" % (st["q"], base))
    # The artifact named "@manifest" did not collide with the manifest-level records.
    assert base + "%40manifest@unsafe_name.json" in keys
    assert [k for k in keys if k.startswith(base + "@manifest")] == [base + "@manifest"] + sorted(
        base + "@manifest@%s.json" % r for r in ("signature_invalid", "threshold_not_met"))
    evil = res["records"][-1]
    assert evil["quarantine_location"].startswith("s3://%s/%s%%2E.%%2F..%%2Fevil?versionId=" % (st["q"], base))

    types = [e["type"] for e in read_jsonl(st["sink"])]
    assert types == ["drguard.artifact.quarantined"] * len(failures)


def test_bad_input_fails_before_anything(s3_setup, module_runner, tmp_path):
    st = s3_setup
    sink = str(tmp_path / "bad" / "alerts.jsonl")
    ok = _failure("a", "digest_mismatch", "s3://%s/set/orders.sqlite" % st["src"])
    cases = [
        ({"failures": [dict(ok, reason="oops")]}, "reason"),
        ({"failures": [dict(ok, source="relative/path")]}, "absolute"),
        ({"failures": [dict(ok, version_id="a", source=ok["source"] + "?versionId=b")]}, "contradicts"),
        ({"quarantine": "s3://%s/q/" % st["src"]}, "also holds a failing source"),
    ]
    for extra, needle in cases:
        args = {"failures": [ok], "drill_id": _drill_id(), "quarantine": "s3://%s/q/" % st["q"],
                "alert_sink": {"path": sink}}
        args.update(extra)
        res = module_runner("quarantine_artifact", args)
        assert res.failed and needle in res["msg"], (needle, res)
    # A quarantine bucket without Object Lock is refused.
    plain = "qt-plain-%s" % uuid.uuid4().hex[:8]
    st["s3"].create_bucket(Bucket=plain)
    res = module_runner("quarantine_artifact", {"failures": [ok], "drill_id": _drill_id(),
                                                "quarantine": "s3://%s/" % plain, "alert_sink": {"path": sink}})
    assert res.failed and "Object Lock" in res["msg"]
    assert not os.path.exists(sink)


def test_local_quarantine_moves_file_private_modes_and_is_idempotent(tmp_path, module_runner):
    drill = _drill_id()
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "db.sqlite").write_bytes(b"corrupt")
    (backup / "ok.tar").write_bytes(b"fine")
    os.symlink("/etc/passwd", backup / "link.tar")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"not a backup")
    os.symlink(outside, backup / "dirlink")
    qdir = tmp_path / "quarantine"
    sink = str(tmp_path / "out" / "alerts.jsonl")
    failures = [
        _failure("db.sqlite", "digest_mismatch", str(backup / "db.sqlite"), sha=_sha(b"corrupt"), size=7),
        _failure("../../etc/passwd", "unsafe_name", str(backup) + "/../../etc/passwd"),
        _failure("link.tar", "metadata_mismatch", str(backup / "link.tar")),
        _failure("missing.tar", "artifact_missing", str(backup / "missing.tar")),
        _failure("dirlink/f", "digest_mismatch", str(backup / "dirlink" / "f")),
    ]
    args = {"failures": failures, "drill_id": drill, "quarantine": str(qdir), "alert_sink": {"path": sink}}

    res = module_runner("quarantine_artifact", args, check_mode=True)
    assert not res.failed and res["changed"] is True and res["alerts"] == []
    assert (backup / "db.sqlite").exists() and not qdir.exists() and not os.path.exists(sink)

    res = module_runner("quarantine_artifact", args)
    assert not res.failed, res
    ddir = qdir / drill
    assert stat.S_IMODE(os.stat(ddir).st_mode) == 0o700
    moved = ddir / "db.sqlite"
    assert moved.read_bytes() == b"corrupt" and not (backup / "db.sqlite").exists()
    assert stat.S_IMODE(os.stat(moved).st_mode) == 0o400
    rec_path = ddir / "db.sqlite@digest_mismatch.json"
    assert stat.S_IMODE(os.stat(rec_path).st_mode) == 0o600
    rec = json.loads(rec_path.read_text())
    assert rec["original"] == "moved" and rec["quarantined_sha256"] == _sha(b"corrupt")
    assert rec["quarantine_location"] == str(moved)

    # The unsafe path and the symlink were recorded but never touched or followed.
    by_name = {r["name"]: r for r in res["records"]}
    assert by_name["../../etc/passwd"]["copied"] is False
    assert by_name["../../etc/passwd"]["original"] == "untouched"
    assert by_name["link.tar"]["copied"] is False and os.path.islink(backup / "link.tar")
    assert by_name["missing.tar"]["original"] == "missing"
    assert by_name["dirlink/f"]["original"] == "untouched" and (outside / "f").read_bytes() == b"not a backup"
    assert (backup / "ok.tar").exists()
    for entry in os.listdir(ddir):
        assert os.path.realpath(ddir / entry).startswith(str(ddir) + "/")
        assert not entry.startswith(".")
    assert (ddir / "%2E.%2F..%2Fetc%2Fpasswd@unsafe_name.json").exists()
    events = read_jsonl(sink)
    assert [e["id"] for e in events] == res["alerts"] or sorted(e["id"] for e in events) == sorted(res["alerts"])
    assert len(events) == len(failures)

    again = module_runner("quarantine_artifact", args)
    assert not again.failed and again["changed"] is False and again["alerts"] == []
    assert len(read_jsonl(sink)) == len(failures)


def test_parallel_workers_share_a_fresh_local_quarantine_directory(tmp_path, module_runner):
    """Regression (CI, 2026-11-29): workers racing to create the drill's quarantine directory
    got FileExistsError and one failure went unquarantined."""
    for round_ in range(3):  # a fresh drill directory each round, so the race is run again
        backup = tmp_path / ("backup-%d" % round_)
        backup.mkdir()
        failures = []
        for i in range(24):
            (backup / ("a%02d.bin" % i)).write_bytes(b"bad %d" % i)
            failures.append(_failure("a%02d.bin" % i, "digest_mismatch", str(backup / ("a%02d.bin" % i))))
        drill = _drill_id()
        sink = str(tmp_path / ("alerts-%d.jsonl" % round_))
        res = module_runner("quarantine_artifact", {"failures": failures, "drill_id": drill, "workers": 8,
                                                    "quarantine": str(tmp_path / "q"), "alert_sink": {"path": sink}})
        assert not res.failed, res.get("msg")
        assert all(r["copied"] and r["original"] == "moved" for r in res["records"]), res["records"]
        assert len(read_jsonl(sink)) == len(failures)
        assert len(os.listdir(tmp_path / "q" / drill)) == 2 * len(failures)  # each copy and its record


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_local_quarantine_directory_that_is_not_a_directory_is_refused(tmp_path, module_runner, planted):
    drill = _drill_id()
    (tmp_path / "bad.bin").write_bytes(b"bad")
    qroot, elsewhere = tmp_path / "q", tmp_path / "elsewhere"
    qroot.mkdir()
    elsewhere.mkdir()
    if planted == "symlink":
        os.symlink(elsewhere, qroot / drill)
    else:
        (qroot / drill).write_bytes(b"")
    res = module_runner("quarantine_artifact", {
        "failures": [_failure("bad.bin", "digest_mismatch", str(tmp_path / "bad.bin"))], "drill_id": drill,
        "quarantine": str(qroot), "alert_sink": {"path": str(tmp_path / "alerts.jsonl")}})
    assert res.failed and ("symlink" if planted == "symlink" else "not a directory") in res["msg"], res.get("msg")
    assert (tmp_path / "bad.bin").read_bytes() == b"bad" and os.listdir(elsewhere) == []


# A directory readable by the group, as a umask of 027 would leave it.
LOOSE_DIR_MODE = 0o750


def _quarantine_one(tmp_path, module_runner, qroot, check_mode=False):
    (tmp_path / "bad.bin").write_bytes(b"bad")
    return module_runner("quarantine_artifact", {
        "failures": [_failure("bad.bin", "digest_mismatch", str(tmp_path / "bad.bin"))], "drill_id": _drill_id(),
        "quarantine": str(qroot), "alert_sink": {"path": str(tmp_path / "alerts.jsonl")}}, check_mode=check_mode)


def test_local_quarantine_root_that_is_a_symlink_is_refused(tmp_path, module_runner):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, LOOSE_DIR_MODE)
    os.symlink(elsewhere, tmp_path / "q")
    for check_mode in (True, False):
        res = _quarantine_one(tmp_path, module_runner, tmp_path / "q", check_mode)
        assert res.failed and "q is a symlink" in res["msg"], res.get("msg")
    assert (tmp_path / "bad.bin").read_bytes() == b"bad"
    assert os.listdir(elsewhere) == [] and stat.S_IMODE(os.stat(elsewhere).st_mode) == LOOSE_DIR_MODE


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_local_quarantine_root_owned_by_another_user_is_refused(tmp_path, module_runner):
    qroot = tmp_path / "q"
    qroot.mkdir()
    os.chown(qroot, 4242, 4242)
    res = _quarantine_one(tmp_path, module_runner, qroot)
    assert res.failed and "owned by uid 4242" in res["msg"], res.get("msg")
    assert (tmp_path / "bad.bin").read_bytes() == b"bad" and os.listdir(qroot) == []


def test_local_quarantine_root_is_created_0700_with_its_parents_under_umask_002(tmp_path, module_runner):
    old = os.umask(0o002)
    try:
        res = _quarantine_one(tmp_path, module_runner, tmp_path / "new" / "q")
    finally:
        os.umask(old)
    assert not res.failed, res.get("msg")
    assert [stat.S_IMODE(os.lstat(p).st_mode) for p in (tmp_path / "new", tmp_path / "new" / "q")] == [0o700, 0o700]


def test_local_quarantine_root_of_ours_with_group_bits_is_tightened(tmp_path, module_runner):
    qroot = tmp_path / "q"
    qroot.mkdir()
    os.chmod(qroot, LOOSE_DIR_MODE)
    res = _quarantine_one(tmp_path, module_runner, qroot)
    assert not res.failed, res.get("msg")
    assert stat.S_IMODE(os.lstat(qroot).st_mode) == 0o700


def test_local_source_on_read_only_mount_is_copied_and_kept(tmp_path, module_runner):
    if os.geteuid() != 0:
        pytest.skip("needs root to create a read-only bind mount")
    import subprocess

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a.bin").write_bytes(b"bad")
    subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        drill = _drill_id()
        res = module_runner("quarantine_artifact", {
            "failures": [_failure("a.bin", "size_mismatch", str(mnt / "a.bin"))], "drill_id": drill,
            "quarantine": str(tmp_path / "q"), "alert_sink": {"path": str(tmp_path / "alerts.jsonl")}})
        assert not res.failed, res
        rec = res["records"][0]
        assert rec["original"] == "kept" and rec["copied"] is True and "could not be removed" in rec["note"]
        assert (tmp_path / "q" / drill / "a.bin").read_bytes() == b"bad"
        assert (mnt / "a.bin").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_drill_alert_emits_event_and_refuses_secrets(tmp_path, module_runner):
    drill = _drill_id()
    sink = str(tmp_path / "alerts.jsonl")
    preview = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.drill.halted", "data": {"a": 1},
                                            "alert_sink": {"path": sink}}, check_mode=True)
    assert not preview.failed and preview["event"]["type"] == "drguard.drill.halted"
    assert not os.path.exists(sink)
    res = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.boundary.violated",
                                        "subject": "vpc-123", "data": {"findings": [{"code": "egress_open"}]},
                                        "alert_sink": {"path": sink}})
    assert not res.failed, res
    ev = res["event"]
    assert read_jsonl(sink) == [ev]
    assert ev["type"] == "drguard.boundary.violated" and ev["source"] == "drguard.sandbox/%s" % drill

    for data, needle in (({"db_password": "hunter2"}, "data.db_password"),
                         ({"x": {"aws_secret_access_key": "abc"}}, "data.x.aws_secret_access_key"),
                         ({"pem": "-----BEGIN PRIVATE KEY-----\nMII"}, "data.pem")):
        bad = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.drill.halted", "data": data,
                                            "alert_sink": {"path": sink}})
        assert bad.failed and needle in bad["msg"], bad
        assert "hunter2" not in json.dumps(bad) and "MII" not in bad["msg"]
    bad = module_runner("drill_alert", {"drill_id": drill, "type": "prod.alert", "alert_sink": {"path": sink}})
    assert bad.failed and "drguard." in bad["msg"]
    assert len(read_jsonl(sink)) == 1


def test_drill_alert_aws_sinks_only_when_tagged_for_the_drill(aws, tmp_path, module_runner):
    drill = _drill_id()
    sns, logs = aws("sns"), aws("logs")
    mine = sns.create_topic(Name="alerts-%s" % drill, Tags=[{"Key": "drguard:drill-id", "Value": drill}])["TopicArn"]
    prod = sns.create_topic(Name="prod-%s" % drill)["TopicArn"]
    group = "/drguard/%s" % drill
    logs.create_log_group(logGroupName=group, tags={"drguard:drill-id": drill})
    bus = aws("events").create_event_bus(Name="bus-%s" % drill, Tags=[{"Key": "drguard:drill-id", "Value": drill}])
    assert bus["EventBusArn"]
    sink = str(tmp_path / "alerts.jsonl")

    res = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.drill.halted", "data": {"phase": "verify"},
                                        "alert_sink": {"path": sink, "sns_topic_arn": mine, "log_group_name": group,
                                                       "event_bus_name": "bus-%s" % drill}})
    assert not res.failed, res
    messages = logs.get_log_events(logGroupName=group, logStreamName="drguard-alerts")["events"]
    assert [json.loads(m["message"])["id"] for m in messages] == [res["event"]["id"]]

    res = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.drill.halted", "data": {},
                                        "alert_sink": {"path": sink, "sns_topic_arn": prod}})
    assert res.failed and "not tagged" in res["msg"]
    res = module_runner("drill_alert", {"drill_id": drill, "type": "drguard.drill.halted", "data": {},
                                        "alert_sink": {"path": sink, "event_bus_name": "default"}})
    assert res.failed and "not tagged" in res["msg"]
    assert len(read_jsonl(sink)) == 1


@pytest.mark.parametrize("name", ["../x", "/abs", "a\\b", "nul\x00", ".", "..", ".hidden", "a/../../b", "@manifest",
                                  "x@digest_mismatch.json", "%2E%2E", "é/ü", "x" * 600, ""])
def test_leaf_is_one_safe_segment(name):
    from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import leaf_for

    leaf = leaf_for(name)
    assert leaf and "/" not in leaf and "\\" not in leaf and "\x00" not in leaf
    assert not leaf.startswith(".") and "@" not in leaf.lstrip("@")
    assert len(leaf) <= 200
    assert leaf != leaf_for(None) or name is None


def test_leaves_do_not_collide():
    from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import leaf_for

    names = [None, "", "@manifest", "a/b", "a%2Fb", "a_b", ".a", "%2Ea", "x" * 600, "x" * 599 + "y"]
    assert len({leaf_for(n) for n in names}) == len(names)


def test_s3_source_into_local_quarantine(s3_setup, tmp_path, module_runner):
    st, drill = s3_setup, _drill_id()
    source = "s3://%s/set/orders.sqlite?versionId=%s" % (st["src"], st["v1"])
    args = {"failures": [_failure("orders.sqlite", "size_mismatch", source, st["v1"])], "drill_id": drill,
            "quarantine": str(tmp_path / "q"), "alert_sink": {"path": st["sink"]}}
    res = module_runner("quarantine_artifact", args)
    assert not res.failed, res
    copy = tmp_path / "q" / drill / "orders.sqlite"
    assert copy.read_bytes() == st["bad"] and stat.S_IMODE(os.stat(copy).st_mode) == 0o400
    assert res["records"][0]["quarantined_sha256"] == _sha(st["bad"])
    assert _tags(st["s3"], st["src"], "set/orders.sqlite", st["v1"])["drguard:quarantine-reason"] == "size_mismatch"
    assert module_runner("quarantine_artifact", args)["changed"] is False


def test_local_manifest_into_s3_quarantine(s3_setup, tmp_path, module_runner):
    st, drill = s3_setup, _drill_id()
    manifest = tmp_path / "manifest.dsse.json"
    manifest.write_bytes(b'{"payloadType": "bad"}')
    args = {"failures": [_failure(None, "manifest_malformed", str(manifest))], "drill_id": drill,
            "quarantine": "s3://%s/m/" % st["q"], "alert_sink": {"path": st["sink"]}}
    res = module_runner("quarantine_artifact", args)
    assert not res.failed, res
    key = "m/%s/@manifest" % drill
    assert st["s3"].get_object(Bucket=st["q"], Key=key)["Body"].read() == manifest.read_bytes()
    assert st["s3"].get_object_legal_hold(Bucket=st["q"], Key=key)["LegalHold"]["Status"] == "ON"
    assert res["records"][0]["original"] == "kept" and manifest.exists()
    assert module_runner("quarantine_artifact", args)["changed"] is False


def test_verify_artifacts_failures_are_quarantined_as_is(aws, tmp_path, module_runner):
    """End to end with the real gate: verify_artifacts' failures go into quarantine_artifact unchanged."""
    from helpers_artifacts import artifacts_for
    from helpers_artifacts import create_locked_bucket
    from helpers_artifacts import generate_key
    from helpers_artifacts import make_statement
    from helpers_artifacts import sample_files
    from helpers_artifacts import sign_statement
    from helpers_artifacts import upload_set
    from helpers_artifacts import write_trust_policy

    from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf

    s3 = aws("s3")
    bucket, qbucket = create_locked_bucket(s3), create_locked_bucket(s3)
    prefix = "set-%s/" % uuid.uuid4().hex[:8]
    files = sample_files(prefix)
    versions = upload_set(s3, bucket, prefix, files)
    signed = dict(files)
    body = bytearray(files["orders.sqlite"])
    body[100] ^= 1  # the manifest signs other bytes: digest_mismatch
    signed["orders.sqlite"] = bytes(body)
    artifacts = artifacts_for(signed, versions)
    artifacts.append(mf.Artifact("../evil", "ab" * 32, 3, "raw", None))
    key = generate_key("ed25519")
    envelope = sign_statement(make_statement("set-" + prefix.strip("/"), 1, artifacts), [key])
    mkey = "manifests/%s.dsse.json" % prefix.strip("/")
    mversion = s3.put_object(Bucket=bucket, Key=mkey, Body=envelope, ChecksumAlgorithm="SHA256")["VersionId"]
    verify = module_runner("verify_artifacts", {
        "manifest": "s3://%s/%s" % (bucket, mkey), "source": "s3://%s/%s" % (bucket, prefix),
        "trust_policy": write_trust_policy(str(tmp_path / "trust.json"), [key]), "workers": 2})
    assert verify.failed and verify["failures"], verify
    reasons = {(f["name"], f["reason"]) for f in verify["failures"]}
    assert ("orders.sqlite", "digest_mismatch") in reasons and ("../evil", "unsafe_name") in reasons

    drill = _drill_id()
    sink = str(tmp_path / "alerts.jsonl")
    res = module_runner("quarantine_artifact", {"failures": verify["failures"], "drill_id": drill,
                                                "quarantine": "s3://%s/q/" % qbucket, "alert_sink": {"path": sink}})
    assert not res.failed, res
    assert len(res["records"]) == len(verify["failures"]) == len(read_jsonl(sink))
    by_reason = {r["reason"]: r for r in res["records"]}
    copy = by_reason["digest_mismatch"]["quarantine_location"]
    ckey, cversion = copy[len("s3://%s/" % qbucket):].split("?versionId=")
    assert ckey == "q/%s/orders.sqlite" % drill
    assert s3.get_object(Bucket=qbucket, Key=ckey, VersionId=cversion)["Body"].read() == files["orders.sqlite"]
    assert by_reason["digest_mismatch"]["version_id"] == versions["orders.sqlite"]
    # The unsafe name's evidence is the manifest version that listed it.
    evidence = by_reason["unsafe_name"]["quarantine_location"]
    ekey, eversion = evidence[len("s3://%s/" % qbucket):].split("?versionId=")
    assert ekey == "q/%s/@manifest" % drill
    assert s3.get_object(Bucket=qbucket, Key=ekey, VersionId=eversion)["Body"].read() == envelope
    assert _tags(s3, bucket, mkey, mversion)["drguard:quarantine-reason"] == "unsafe_name"


def test_conflicting_copy_is_never_overwritten_and_lost_tags_are_restored(s3_setup, module_runner):
    st, drill = s3_setup, _drill_id()
    s3 = st["s3"]
    v1_source = "s3://%s/set/orders.sqlite?versionId=%s" % (st["src"], st["v1"])
    base = {"drill_id": drill, "quarantine": "s3://%s/c/" % st["q"], "alert_sink": {"path": st["sink"]}}
    res = module_runner("quarantine_artifact", dict(base, failures=[
        _failure("orders.sqlite", "digest_mismatch", v1_source, st["v1"])]))
    assert not res.failed, res

    # Someone strips the quarantine tags from the source version: a rerun puts them back.
    s3.put_object_tagging(Bucket=st["src"], Key="set/orders.sqlite", VersionId=st["v1"],
                          Tagging={"TagSet": [{"Key": "team", "Value": "dba"}]}, ChecksumAlgorithm="SHA256")
    again = module_runner("quarantine_artifact", dict(base, failures=[
        _failure("orders.sqlite", "digest_mismatch", v1_source, st["v1"])]))
    assert not again.failed and again["changed"] is True and again["alerts"] == []
    assert _tags(s3, st["src"], "set/orders.sqlite", st["v1"])["drguard:drill-id"] == drill

    # The same name from another version is a conflict: reported, alerted, nothing overwritten.
    copies = _all_keys(s3, st["q"])
    other = "s3://%s/set/orders.sqlite?versionId=%s" % (st["src"], st["v2"])
    res = module_runner("quarantine_artifact", dict(base, failures=[
        _failure("orders.sqlite", "size_mismatch", other, st["v2"])]))
    assert res.failed and "refusing to overwrite evidence" in res["msg"], res
    assert res["errors"][0]["reasons"] == ["size_mismatch"]
    assert _all_keys(s3, st["q"]) == copies
    assert "drguard:drill-id" not in _tags(s3, st["src"], "set/orders.sqlite", st["v2"])
    assert read_jsonl(st["sink"])[-1]["type"] == "drguard.artifact.quarantine_failed"


def test_source_key_is_taken_literally_up_to_a_trailing_version_id():
    """verify_artifacts builds sources with s3_uri(), which does not escape keys: '?', '#', '%' and '+'
    in a key (an unlisted object can be named anything) belong to the key, only a trailing ?versionId=
    is a query."""
    from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import parse_source
    from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import QuarantineError

    src = parse_source({"source": "s3://backups/set/odd?name#x%41+y.bin?versionId=v%2B1"}, 0)
    assert (src.bucket, src.key, src.version_id) == ("backups", "set/odd?name#x%41+y.bin", "v+1")
    src = parse_source({"source": "s3://backups/set/a?b=c", "version_id": "v2"}, 0)
    assert (src.key, src.version_id) == ("set/a?b=c", "v2")
    for bad in ("s3://Bad_Bucket/k", "s3://backups/", "s3://backups?versionId=v"):
        with pytest.raises(QuarantineError, match="is not s3://bucket/key"):
            parse_source({"source": bad}, 0)


def test_unlisted_object_with_query_characters_in_its_key_is_quarantined(s3_setup, module_runner):
    st, drill = s3_setup, _drill_id()
    key = "set/odd?name#1.bin"
    version = st["s3"].put_object(Bucket=st["src"], Key=key, Body=b"stray", ChecksumAlgorithm="SHA256")["VersionId"]
    source = "s3://%s/%s?versionId=%s" % (st["src"], key, version)
    res = module_runner("quarantine_artifact", {
        "failures": [_failure("odd?name#1.bin", "unlisted_artifact", source, version)], "drill_id": drill,
        "quarantine": "s3://%s/u/" % st["q"], "alert_sink": {"path": st["sink"]}})
    assert not res.failed, res
    rec = res["records"][0]
    assert rec["copied"] is True and rec["version_id"] == version
    ckey, cversion = rec["quarantine_location"][len("s3://%s/" % st["q"]):].split("?versionId=")
    assert ckey == "u/%s/odd%%3Fname%%231.bin" % drill
    assert st["s3"].get_object(Bucket=st["q"], Key=ckey, VersionId=cversion)["Body"].read() == b"stray"


def test_source_version_that_is_a_delete_marker_is_recorded_as_missing(s3_setup, module_runner):
    """S3 answers 405 MethodNotAllowed for a version id that is a delete marker: the object version is
    not there (a record and an alert, no copy), not an access problem that fails the quarantine."""
    st, drill = s3_setup, _drill_id()
    key = "set/deleted.bin"
    st["s3"].put_object(Bucket=st["src"], Key=key, Body=b"x", ChecksumAlgorithm="SHA256")
    marker = st["s3"].delete_object(Bucket=st["src"], Key=key)["VersionId"]
    source = "s3://%s/%s?versionId=%s" % (st["src"], key, marker)
    res = module_runner("quarantine_artifact", {
        "failures": [_failure("deleted.bin", "artifact_missing", source, marker)], "drill_id": drill,
        "quarantine": "s3://%s/d/" % st["q"], "alert_sink": {"path": st["sink"]}})
    assert not res.failed, res
    rec = res["records"][0]
    assert rec["copied"] is False and rec["original"] == "missing" and rec["quarantine_location"] is None
    assert len(read_jsonl(st["sink"])) == 1


def test_source_swapped_for_a_symlink_before_the_move_is_never_chmodded(tmp_path, module_runner, monkeypatch):
    """The source is judged a regular file, then replaced by a symlink before the rename: the moved
    symlink must not be followed when the quarantined copy is made read-only."""
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"not evidence")
    os.chmod(victim, 0o644)
    backup = tmp_path / "backup"
    backup.mkdir()
    source = backup / "db.sqlite"
    source.write_bytes(b"corrupt")
    real_rename = os.rename

    def swap_then_rename(src, dst, *args, **kwargs):
        if str(src) == str(source):
            os.unlink(src)
            os.symlink(victim, src)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", swap_then_rename)
    res = module_runner("quarantine_artifact", {
        "failures": [_failure("db.sqlite", "digest_mismatch", str(source))], "drill_id": _drill_id(),
        "quarantine": str(tmp_path / "q"), "alert_sink": {"path": str(tmp_path / "alerts.jsonl")}})
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    assert victim.read_bytes() == b"not evidence"
    assert res.failed and "symlink" in res["msg"], res
