"""restore_artifacts and validate_restore against the emulator and local files."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import sqlite3
import stat
import tarfile
import uuid
from pathlib import Path

import pytest
from conftest import run_module


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sqlite_bytes(tmp_path, rows=3) -> bytes:
    path = tmp_path / ("db-%s.sqlite" % uuid.uuid4().hex)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [("x%d" % i,) for i in range(rows)])
    con.commit()
    con.close()
    return path.read_bytes()


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.fixture
def bucket(aws):
    s3 = aws("s3")
    name = "restore-%s" % uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return s3, name


def test_restore_from_s3_by_pinned_version_ignores_newer_version(bucket, tmp_path, module_runner):
    s3, name = bucket
    good = _sqlite_bytes(tmp_path)
    v1 = s3.put_object(Bucket=name, Key="set/db.sqlite", Body=good)["VersionId"]
    s3.put_object(Bucket=name, Key="set/db.sqlite", Body=b"shadowing newer version")
    entry = {"name": "db.sqlite", "verified": True, "sha256": _sha(good), "size": len(good),
             "source": "s3://%s/set/db.sqlite?versionId=%s" % (name, v1), "version_id": v1}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert not res.failed, res
    restored = res["restored"][0]
    assert Path(restored["path"]).read_bytes() == good
    assert res["bytes_restored"] == len(good)
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert not val.failed and val["results"][0]["kind"] == "sqlite" and val["results"][0]["tables"] == {"t": 3}


def test_restore_refuses_bytes_that_differ_from_what_was_verified(bucket, tmp_path, module_runner):
    s3, name = bucket
    v = s3.put_object(Bucket=name, Key="k", Body=b"hello world")["VersionId"]
    entry = {"name": "k", "verified": True, "sha256": _sha(b"hello worle"), "size": 11,
             "source": "s3://%s/k" % name, "version_id": v}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert res.failed and "differ" in res["msg"]
    assert os.listdir(tmp_path / "r") == []


def test_restore_stops_one_byte_past_the_verified_size(bucket, tmp_path, module_runner):
    s3, name = bucket
    v = s3.put_object(Bucket=name, Key="k", Body=b"x" * 4096)["VersionId"]
    entry = {"name": "k", "verified": True, "sha256": _sha(b"x" * 10), "size": 10,
             "source": "s3://%s/k" % name, "version_id": v}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert res.failed and "longer than" in res["msg"]


def test_restore_refuses_unverified_and_unsafe_entries(tmp_path, module_runner):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    base = {"verified": True, "sha256": _sha(b"abc"), "size": 3, "source": str(src), "version_id": None}
    res = module_runner("restore_artifacts", {"artifacts": [dict(base, name="a", verified=False)],
                                              "dest": str(tmp_path / "r")})
    assert res.failed and "not verified" in res["msg"]
    res = module_runner("restore_artifacts", {"artifacts": [dict(base, name="../escape")],
                                              "dest": str(tmp_path / "r2")})
    assert res.failed and "unsafe" in res["msg"]
    assert not (tmp_path / "escape").exists()


def test_restore_local_and_validate_tar(tmp_path, module_runner):
    body = _tar_bytes([("config/app.yml", b"a: 1\n", "file")])
    src = tmp_path / "files.tar"
    src.write_bytes(body)
    entry = {"name": "nested/files.tar", "verified": True, "sha256": _sha(body), "size": len(body),
             "source": str(src), "version_id": None}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert not res.failed, res
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert not val.failed and val["results"][0]["members"] == 1


@pytest.mark.parametrize("members,detail", [
    ([("../../etc/cron.d/x", b"x", "file")], "tar member '../../etc/cron.d/x' climbs out of the target with '..'"),
    ([("/abs", b"x", "file")], "tar member '/abs' has an absolute name"),
    ([("link", b"", "sym")], "tar member 'link' escapes the target through a symlink (to '/etc/passwd')"),
])
def test_validate_rejects_dangerous_tar(tmp_path, members, detail):
    path = tmp_path / "bad.tar"
    path.write_bytes(_tar_bytes(members))
    val = run_module("validate_restore", {"restored": [{"name": "bad.tar", "path": str(path)}]})
    assert val.failed and val["msg"] == "Restored backup does not validate: bad.tar (%s)" % detail
    assert sorted(os.listdir(tmp_path)) == ["bad.tar"]


def test_restore_passes_the_declared_kind_on_and_a_tar_gz_is_validated_as_a_tar(tmp_path, module_runner):
    body = gzip.compress(_tar_bytes([("config/app.yml", b"a: 1\n", "file")]))
    src = tmp_path / "files.tgz"
    src.write_bytes(body)
    entry = {"name": "files.tgz", "verified": True, "sha256": _sha(body), "size": len(body),
             "source": str(src), "version_id": None, "kind": "tar"}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert not res.failed, res
    assert res["restored"][0]["kind"] == "tar"
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert not val.failed, val
    got = val["results"][0]
    assert (got["kind"], got["compression"], got["declared_kind"], got["members"]) == ("tar", "gzip", "tar", 1)
    assert val["changed"] is False and sorted(os.listdir(tmp_path / "r")) == ["files.tgz"]


def test_restore_passes_sqlite_expectations_on_to_validation(tmp_path, module_runner):
    body = _sqlite_bytes(tmp_path, rows=3)
    src = tmp_path / "db.src"
    src.write_bytes(body)
    entry = {"name": "db.sqlite", "verified": True, "sha256": _sha(body), "size": len(body), "source": str(src),
             "version_id": None, "kind": "sqlite", "expect": {"tables": {"t": 4}}}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert not res.failed, res
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert val.failed
    assert val["results"][0]["detail"] == "table 't' has 3 row(s), but the manifest expects at least 4"


def test_validate_caps_are_options(tmp_path):
    path = tmp_path / "r" / "many.tar.xz"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(lzma.compress(_tar_bytes([("f%d" % i, b"x", "file") for i in range(5)])))
    restored = [{"name": "many.tar.xz", "path": str(path)}]
    val = run_module("validate_restore", {"restored": restored, "max_members": 4})
    assert val.failed and val["results"][0]["detail"] == "the archive has more than max_members 4 members"
    val = run_module("validate_restore", {"restored": restored, "max_total_bytes": 4})
    assert val["results"][0]["detail"] == "tar member 'f4' would bring the unpacked size past max_total_bytes 4"
    val = run_module("validate_restore", {"restored": restored, "max_ratio": 0})
    assert val.failed and val["msg"] == "max_ratio must be at least 1"
    val = run_module("validate_restore", {"restored": restored, "keep_extracted": True})
    assert not val.failed and val["changed"] is True
    kept = val["results"][0]["extracted_to"]
    assert sorted(os.listdir(kept)) == ["f%d" % i for i in range(5)]
    assert stat.S_IMODE(os.lstat(kept).st_mode) == 0o700


def test_validate_in_check_mode_extracts_nothing(tmp_path):
    path = tmp_path / "set.tar.bz2"
    path.write_bytes(bz2.compress(_tar_bytes([("a/b", b"x", "file")])))
    val = run_module("validate_restore", {"restored": [{"name": "set", "path": str(path)}], "keep_extracted": True},
                     check_mode=True)
    assert not val.failed and val["changed"] is False and val["results"][0]["members"] == 1
    assert os.listdir(tmp_path) == ["set.tar.bz2"]


def test_validate_rejects_corrupt_and_empty_sqlite(tmp_path):
    good = _sqlite_bytes(tmp_path, rows=50)
    corrupt = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        corrupt[i] ^= 0xFF
    path = tmp_path / "corrupt.sqlite"
    path.write_bytes(bytes(corrupt))
    val = run_module("validate_restore", {"restored": [{"name": "c", "path": str(path)}]})
    assert val.failed and not val["valid"]
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(_sqlite_bytes(tmp_path, rows=0))
    val = run_module("validate_restore", {"restored": [{"name": "e", "path": str(empty)}]})
    assert val.failed and "fewer than min_rows" in val["msg"]


# A directory readable by the group, as a umask of 027 would leave it.
LOOSE_DIR_MODE = 0o750


def test_restore_dest_that_is_a_symlink_is_refused_and_never_chmodded(tmp_path, module_runner):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, LOOSE_DIR_MODE)
    os.symlink(elsewhere, tmp_path / "r")
    entry = {"name": "a", "verified": True, "sha256": _sha(b"abc"), "size": 3, "source": str(src), "version_id": None}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert res.failed and "r is a symlink" in res["msg"], res
    assert os.listdir(elsewhere) == [] and stat.S_IMODE(os.stat(elsewhere).st_mode) == LOOSE_DIR_MODE


def test_restore_nested_directories_are_0700_under_umask_002(tmp_path, module_runner):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    entry = {"name": "x/y/a.bin", "verified": True, "sha256": _sha(b"abc"), "size": 3, "source": str(src),
             "version_id": None}
    old = os.umask(0o002)
    try:
        res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "new" / "r")})
    finally:
        os.umask(old)
    assert not res.failed, res
    dirs = [tmp_path / "new", tmp_path / "new" / "r", tmp_path / "new" / "r" / "x", tmp_path / "new" / "r" / "x" / "y"]
    assert [stat.S_IMODE(os.lstat(d).st_mode) for d in dirs] == [0o700] * 4
    assert stat.S_IMODE(os.lstat(res["restored"][0]["path"]).st_mode) == 0o400


def test_validate_opens_the_restored_sqlite_not_one_its_escaped_name_points_at(tmp_path, module_runner):
    """A signed artifact named %2E%2E/x.db must not make SQLite's URI parser open ../x.db."""
    restored_db = _sqlite_bytes(tmp_path, rows=3)
    src = tmp_path / "restored.src"
    src.write_bytes(restored_db)
    outside = tmp_path / "x.db"
    con = sqlite3.connect(outside)
    con.execute("CREATE TABLE outside_secret (v TEXT)")
    con.executemany("INSERT INTO outside_secret VALUES (?)", [("s%d" % i,) for i in range(7)])
    con.commit()
    con.close()
    entry = {"name": "%2E%2E/x.db", "verified": True, "sha256": _sha(restored_db), "size": len(restored_db),
             "source": str(src), "version_id": None}
    res = module_runner("restore_artifacts", {"artifacts": [entry], "dest": str(tmp_path / "r")})
    assert not res.failed, res
    assert res["restored"][0]["path"] == str(tmp_path / "r" / "%2E%2E" / "x.db")
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert not val.failed, val
    assert val["results"][0]["tables"] == {"t": 3}


@pytest.mark.parametrize("name", ["a?mode=rwc.db", "b#frag.db", "c%3F.db"])
def test_validate_opens_sqlite_whose_path_has_uri_characters(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_sqlite_bytes(tmp_path, rows=2))
    val = run_module("validate_restore", {"restored": [{"name": name, "path": str(path)}]})
    assert not val.failed, val
    assert val["results"][0]["tables"] == {"t": 2}


def test_validate_refuses_a_restored_path_that_is_a_symlink(tmp_path):
    real = tmp_path / "real.sqlite"
    real.write_bytes(_sqlite_bytes(tmp_path, rows=2))
    os.symlink(real, tmp_path / "link.sqlite")
    val = run_module("validate_restore", {"restored": [{"name": "link.sqlite", "path": str(tmp_path / "link.sqlite")}]})
    assert val.failed and "is a symlink" in val["results"][0]["detail"], val


def test_validate_nothing_restored_is_a_failure():
    assert run_module("validate_restore", {"restored": []}).failed


def test_restore_refuses_no_artifacts_and_no_workers_before_touching_dest(tmp_path, module_runner):
    from ansible_collections.drguard.sandbox.plugins.module_utils._restore import restore
    from ansible_collections.drguard.sandbox.plugins.module_utils._restore import RestoreError

    def no_client(service):
        raise AssertionError("no client is needed for %s" % service)

    with pytest.raises(RestoreError, match="artifacts is empty"):
        restore([], str(tmp_path / "r"), client=no_client)
    res = module_runner("restore_artifacts", {"artifacts": [{"name": "a"}], "dest": str(tmp_path / "r"),
                                              "workers": 0})
    assert res.failed and res["msg"] == "workers must be at least 1"
    assert not (tmp_path / "r").exists()


def test_signed_expectations_and_kinds_reach_validation_through_the_gate(tmp_path, module_runner):
    """sign_manifest -> verify_artifacts -> restore_artifacts -> validate_restore, all local."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers_artifacts import generate_key
    from helpers_artifacts import write_trust_policy

    key = generate_key("ed25519")
    key_path = key.write_private(str(tmp_path / "key.pem"))
    source = tmp_path / "set"
    source.mkdir()
    (source / "orders.sqlite").write_bytes(_sqlite_bytes(tmp_path, rows=3))
    (source / "files.tgz").write_bytes(gzip.compress(_tar_bytes([("config/app.yml", b"a: 1\n", "file")])))
    manifest = str(tmp_path / "manifest.dsse.json")
    signed = module_runner("sign_manifest", {"source": str(source), "dest": manifest, "backup_set": "orders-db",
                                             "sequence": 1, "ttl": 3600, "private_key_path": key_path,
                                             "expect": {"*.sqlite": {"tables": {"t": 4}}}})
    assert not signed.failed, signed
    verified = module_runner("verify_artifacts", {"manifest": manifest, "source": str(source),
                                                  "trust_policy": write_trust_policy(str(tmp_path / "trust.json"),
                                                                                     [key]),
                                                  "trusted_state": str(tmp_path / "state" / "trusted.json")})
    assert not verified.failed, verified
    kinds = {a["name"]: (a["kind"], a["expect"]) for a in verified["artifacts"]}
    assert kinds == {"orders.sqlite": ("sqlite", {"tables": {"t": 4}}), "files.tgz": ("tar", None)}
    restored = module_runner("restore_artifacts", {"artifacts": verified["artifacts"], "dest": str(tmp_path / "r")})
    assert not restored.failed, restored
    val = run_module("validate_restore", {"restored": restored["restored"]})
    assert val.failed
    results = {r["name"]: (r["kind"], r["valid"], r["detail"]) for r in val["results"]}
    assert results == {
        "orders.sqlite": ("sqlite", False, "table 't' has 3 row(s), but the manifest expects at least 4"),
        "files.tgz": ("tar", True, "ok")}


def test_sign_from_s3_detects_a_compressed_tar_in_the_pinned_version(bucket, tmp_path, module_runner):
    import base64
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers_artifacts import generate_key

    s3, name = bucket
    tgz = bz2.compress(_tar_bytes([("a.txt", b"a\n", "file")]))
    s3.put_object(Bucket=name, Key="set/files.bin", Body=tgz)
    s3.put_object(Bucket=name, Key="set/dump.gz", Body=gzip.compress(b"not a tar\n"))
    key_path = generate_key("ed25519").write_private(str(tmp_path / "key.pem"))
    dest = tmp_path / "m.dsse.json"
    signed = module_runner("sign_manifest", {"source": "s3://%s/set/" % name, "dest": str(dest), "backup_set": "b",
                                             "sequence": 1, "ttl": 60, "private_key_path": key_path})
    assert not signed.failed, signed
    payload = json.loads(base64.b64decode(json.loads(dest.read_bytes())["payload"]))
    assert {n: e["kind"] for n, e in payload["predicate"]["artifacts"].items()} == {"files.bin": "tar",
                                                                                    "dump.gz": "raw"}
