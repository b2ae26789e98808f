"""validate_restore's validators: compressed archives, safe tar extraction, SQLite expectations (no emulator)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import sqlite3
import stat
import tarfile
import zlib

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _restore as R

COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


def _tar(members, *, fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar built member by member: (name, body or None, {TarInfo attributes})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, body, attrs in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            for key, value in attrs.items():
                setattr(info, key, value)
            if body is not None:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _file(name, body=b"data\n", **attrs):
    return (name, body, attrs)


def _tree(root) -> set:
    """Every path under ``root`` (lstat, never followed): what exists on the filesystem."""
    out = set()
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(base, n), root))
    return out


@pytest.fixture
def restore_dir(tmp_path):
    d = tmp_path / "restore"
    d.mkdir(mode=0o700)
    return d


def _validate(restore_dir, name, data, entry=None, **kwargs):
    path = restore_dir / name
    path.write_bytes(data)
    os.chmod(path, 0o400)
    return R.validate([dict({"name": name, "path": str(path)}, **(entry or {}))], **kwargs)


def _one(restore_dir, name, data, entry=None, **kwargs):
    return _validate(restore_dir, name, data, entry, **kwargs).results[0]


# --------------------------------------------------------------------------- compressed archives

@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_tar_is_recognised_by_content_and_validated_as_a_tar(restore_dir, compression):
    data = COMPRESS[compression](_tar([_file("etc/app.yml", b"a: 1\n"), _file("data/rows.csv", b"1,2\n" * 100)]))
    # The name says nothing: the content decides.
    result = _one(restore_dir, "backup.bin", data)
    assert (result["kind"], result["compression"], result["valid"], result["members"]) == \
        ("tar", compression, True, 2)
    assert result["bytes"] == len(b"a: 1\n") + 400


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_tar_with_an_unsafe_member_is_refused_even_when_declared_raw(restore_dir, compression):
    data = COMPRESS[compression](_tar([_file("../../escape")]))
    result = _one(restore_dir, "set.tgz", data, {"kind": "raw"})
    assert result["kind"] == "tar" and not result["valid"]
    assert result["detail"] == "tar member '../../escape' climbs out of the target with '..'"


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_compressed_stream_that_is_not_a_tar_is_decompressed_to_its_end(restore_dir, compression):
    body = b"".join(b"INSERT INTO t VALUES (%d, '%s');\n" % (i, os.urandom(8).hex().encode()) for i in range(1000))
    result = _one(restore_dir, "dump.sql.z", COMPRESS[compression](body))
    assert (result["kind"], result["compression"], result["valid"], result["bytes"]) == \
        ("compressed", compression, True, len(body))


def test_truncated_gzip_stream_is_invalid_with_its_reason(restore_dir):
    data = gzip.compress(os.urandom(64 * 1024))
    result = _one(restore_dir, "dump.gz", data[: len(data) // 2])
    assert result["kind"] == "compressed" and not result["valid"]
    assert result["detail"].startswith("the gzip stream is truncated or corrupt: ")


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
def test_stream_corrupt_right_after_its_magic_is_invalid_with_its_reason(restore_dir, compression):
    data = COMPRESS[compression](b"x" * 1000)
    keep = {"gzip": 10, "bzip2": 4, "xz": 12}[compression]
    result = _one(restore_dir, "broken", data[:keep] + b"\xff" * 64)
    assert (result["kind"], result["valid"]) == ("compressed", False)
    assert result["detail"].startswith("the %s stream is truncated or corrupt: " % compression), result


def test_compressed_stream_bomb_is_stopped_by_the_ratio_cap_before_it_is_all_read(restore_dir):
    unpacked = 64 * 1024 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    data = b"".join(packer.compress(bytes(1024 * 1024)) for _ in range(unpacked // (1024 * 1024))) + packer.flush()
    result = _one(restore_dir, "bomb.gz", data, caps=R.Caps(max_ratio=100))
    assert not result["valid"]
    assert result["detail"].startswith("the gzip stream decompresses to more than max_ratio 100 times its "
                                       "compressed size; stopped after ")
    assert result["read_bytes"] <= 100 * len(data) + 1024 * 1024 < unpacked


# --------------------------------------------------------------------------- safe extraction

UNSAFE = {
    "absolute": ([_file("/etc/cron.d/x")], "tar member '/etc/cron.d/x' has an absolute name"),
    "dotdot": ([_file("a/../../x")], "tar member 'a/../../x' climbs out of the target with '..'"),
    "symlink_escape": ([("up", None, {"type": tarfile.SYMTYPE, "linkname": "sub/../.."})],
                       "tar member 'up' escapes the target through a symlink (to 'sub/../..')"),
    "symlink_absolute": ([("pw", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})],
                         "tar member 'pw' escapes the target through a symlink (to '/etc/passwd')"),
    "symlink_chain": ([("d", None, {"type": tarfile.SYMTYPE, "linkname": "."}),
                       ("d/out", None, {"type": tarfile.SYMTYPE, "linkname": "../.."})],
                      "tar member 'd/out' escapes the target through a symlink (to '../..')"),
    "hardlink_escape": ([_file("ok"), ("hl", None, {"type": tarfile.LNKTYPE, "linkname": "../outside"})],
                        "tar member 'hl' escapes the target through a hard link (to '../outside')"),
    "device": ([("dev", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
               "tar member 'dev' is a device"),
    "block_device": ([("disk", None, {"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0})],
                     "tar member 'disk' is a device"),
    "fifo": ([("pipe", None, {"type": tarfile.FIFOTYPE})], "tar member 'pipe' is a fifo"),
    "setuid": ([_file("bin/sh", mode=0o4755)], "tar member 'bin/sh' has setuid, setgid or sticky bits (mode 4755)"),
    "setgid": ([_file("bin/x", mode=0o2755)], "tar member 'bin/x' has setuid, setgid or sticky bits (mode 2755)"),
    "sticky": ([("tmp", None, {"type": tarfile.DIRTYPE, "mode": 0o1777})],
               "tar member 'tmp' has setuid, setgid or sticky bits (mode 1777)"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_member_is_refused_with_its_reason_and_nothing_is_written(tmp_path, restore_dir, case):
    members, reason = UNSAFE[case]
    data = gzip.compress(_tar(members))
    before = _tree(tmp_path)
    outcome = _validate(restore_dir, "bad.tar.gz", data)
    result = outcome.results[0]
    assert not outcome.valid and result["detail"] == reason
    assert _tree(tmp_path) == before | {"restore/bad.tar.gz"}
    assert not (tmp_path / "outside").exists() and not (tmp_path / "x").exists()


def test_a_member_written_after_an_unsafe_one_never_lands(tmp_path, restore_dir):
    data = _tar([_file("first.txt"), _file("../second.txt")])
    result = _one(restore_dir, "set.tar", data)
    assert result["detail"] == "tar member '../second.txt' climbs out of the target with '..'"
    assert result["members"] == 1
    assert _tree(tmp_path) == {"restore", "restore/set.tar"}


def test_member_count_cap(restore_dir):
    data = _tar([_file("f%d" % i) for i in range(4)])
    result = _one(restore_dir, "many.tar", data, caps=R.Caps(max_members=3))
    assert result["detail"] == "the archive has more than max_members 3 members"
    assert _one(restore_dir, "few.tar", data, caps=R.Caps(max_members=4))["valid"]


def test_total_size_cap_is_judged_from_the_header_before_the_member_is_written(tmp_path, restore_dir):
    data = _tar([_file("small", b"x" * 600), _file("big", b"y" * 600)])
    result = _one(restore_dir, "big.tar", data, caps=R.Caps(max_total_bytes=1000))
    assert result["detail"] == "tar member 'big' would bring the unpacked size past max_total_bytes 1000"
    assert _tree(tmp_path) == {"restore", "restore/big.tar"}


def test_ratio_bomb_is_refused_from_its_header_without_decompressing_it(tmp_path, restore_dir):
    unpacked = 64 * 1024 * 1024
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=9) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = unpacked
        tar.addfile(info, io.BytesIO(bytes(unpacked)))
    data = buf.getvalue()
    assert unpacked / len(data) > 200
    result = _one(restore_dir, "bomb.tar.gz", data)
    assert result["detail"] == "tar member 'zeros' would bring the compression ratio past max_ratio 200"
    assert result["read_bytes"] < 1024 * 1024
    assert _tree(tmp_path) == {"restore", "restore/bomb.tar.gz"}


def test_safe_archive_is_extracted_privately_inside_the_restore_dir_when_kept(restore_dir):
    data = gzip.compress(_tar([
        ("conf", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
        _file("conf/app.yml", b"a: 1\n"),
        ("conf/current", None, {"type": tarfile.SYMTYPE, "linkname": "app.yml"}),
        ("conf/again", None, {"type": tarfile.LNKTYPE, "linkname": "conf/app.yml"}),
        _file("run.sh", b"#!/bin/sh\n", mode=0o755),
    ]))
    result = _one(restore_dir, "set.tar.gz", data, keep=True)
    assert result["valid"], result
    root = result["extracted_to"]
    assert os.path.dirname(root) == str(restore_dir)
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(os.path.join(root, "conf")).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(os.path.join(root, "run.sh")).st_mode) == 0o600
    with open(os.path.join(root, "conf", "current"), "rb") as handle:
        assert handle.read() == b"a: 1\n"
    assert os.readlink(os.path.join(root, "conf", "current")) == "app.yml"
    assert os.stat(os.path.join(root, "conf", "again")).st_ino == os.stat(os.path.join(root, "conf/app.yml")).st_ino


def test_archive_of_dot_with_a_repeated_member_extracts_its_last_copy(restore_dir):
    # As `tar -C dir -czf set.tgz .` writes it, then the same file appended once more.
    data = gzip.compress(_tar([(".", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
                               ("./conf", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
                               _file("./conf/app.yml", b"old\n"), _file("./conf/app.yml", b"new\n")]))
    result = _one(restore_dir, "set.tgz", data, keep=True)
    assert result["valid"] and result["members"] == 4, result
    with open(os.path.join(result["extracted_to"], "conf", "app.yml"), "rb") as handle:
        assert handle.read() == b"new\n"


def test_hard_link_to_nothing_extracted_before_is_refused(tmp_path, restore_dir):
    data = _tar([("hl", None, {"type": tarfile.LNKTYPE, "linkname": "later"}), _file("later")])
    result = _one(restore_dir, "set.tar", data)
    assert result["detail"] == "tar member 'hl' is a hard link to 'later', which is not a file extracted before"
    assert _tree(tmp_path) == {"restore", "restore/set.tar"}


def test_a_file_member_never_replaces_a_directory(tmp_path, restore_dir):
    data = _tar([_file("conf/app.yml"), _file("conf")])
    result = _one(restore_dir, "set.tar", data)
    assert result["detail"] == "tar member 'conf' would replace a directory"
    assert _tree(tmp_path) == {"restore", "restore/set.tar"}


def test_extraction_is_removed_unless_kept_and_check_mode_writes_nothing(tmp_path, restore_dir):
    data = _tar([_file("a/b.txt")])
    assert _one(restore_dir, "set.tar", data)["valid"]
    assert _tree(tmp_path) == {"restore", "restore/set.tar"}
    result = _one(restore_dir, "set2.tar", data, extract=False)
    assert result["valid"] and result["members"] == 1 and "extracted_to" not in result
    assert _tree(tmp_path) == {"restore", "restore/set.tar", "restore/set2.tar"}


def test_empty_archive_declared_tar_is_invalid(restore_dir):
    # An empty tar is only zero blocks: nothing in it says tar, so a manifest calling it one is wrong.
    result = _one(restore_dir, "empty.tar.xz", lzma.compress(_tar([])), {"kind": "tar"})
    assert result["detail"] == "the manifest declares kind tar, but the content is an xz stream that is not a tar"


def test_caps_below_one_are_refused(restore_dir):
    with pytest.raises(R.RestoreError, match="^max_ratio must be at least 1$"):
        _validate(restore_dir, "a.tar", _tar([_file("a")]), caps=R.Caps(max_ratio=0))


# --------------------------------------------------------------------------- declared kind

@pytest.mark.parametrize("declared,data,content", [
    ("tar", b"just some bytes", "neither a tar archive nor a SQLite database"),
    ("tar", gzip.compress(b"not a tar"), "a gzip stream that is not a tar"),
    ("sqlite", bz2.compress(b"not a database"), "a bzip2 stream that is not a tar"),
    ("sqlite", _tar([_file("a")]), "a tar archive"),
], ids=["bytes-declared-tar", "gzip-declared-tar", "bzip2-declared-sqlite", "tar-declared-sqlite"])
def test_declared_kind_must_agree_with_the_content(restore_dir, declared, data, content):
    result = _one(restore_dir, "x", data, {"kind": declared})
    assert not result["valid"]
    assert result["detail"] == "the manifest declares kind %s, but the content is %s" % (declared, content)


# --------------------------------------------------------------------------- SQLite

def _db(tmp_path, tables: dict) -> bytes:
    path = tmp_path / "src.sqlite"
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    for table, rows in tables.items():
        quoted = '"%s"' % table.replace('"', '""')
        con.execute("CREATE TABLE %s (id INTEGER PRIMARY KEY, v TEXT)" % quoted)
        con.executemany("INSERT INTO %s (v) VALUES (?)" % quoted, [("x" * 50,)] * rows)  # noqa: S608
    con.commit()
    con.close()
    return path.read_bytes()


def test_sqlite_satisfied_expectation_passes(tmp_path, restore_dir):
    data = _db(tmp_path, {"orders": 5, "audit": 0})
    result = _one(restore_dir, "db.sqlite", data, {"kind": "sqlite", "expect": {"tables": {"orders": 5, "audit": 0}}})
    assert result["valid"] and result["tables"] == {"orders": 5, "audit": 0}


def test_sqlite_missing_table_fails(tmp_path, restore_dir):
    data = _db(tmp_path, {"orders": 5})
    result = _one(restore_dir, "db.sqlite", data, {"kind": "sqlite", "expect": {"tables": {"customers": 0}}})
    assert result["detail"] == "table 'customers' is missing, but the manifest expects it"


def test_sqlite_too_few_rows_fails(tmp_path, restore_dir):
    data = _db(tmp_path, {"orders": 5})
    result = _one(restore_dir, "db.sqlite", data, {"kind": "sqlite", "expect": {"tables": {"orders": 6}}})
    assert result["detail"] == "table 'orders' has 5 row(s), but the manifest expects at least 6"


def test_sqlite_table_name_from_the_manifest_is_never_sql(tmp_path, restore_dir):
    data = _db(tmp_path, {"orders": 5})
    evil = 'orders" WHERE 0 UNION SELECT 99 --'
    result = _one(restore_dir, "db.sqlite", data, {"kind": "sqlite", "expect": {"tables": {evil: 1}}})
    assert result["detail"] == "table %r is missing, but the manifest expects it" % evil


def test_sqlite_table_with_a_quote_in_its_name_is_counted(tmp_path, restore_dir):
    data = _db(tmp_path, {'we"ird': 2})
    result = _one(restore_dir, "db.sqlite", data, {"kind": "sqlite", "expect": {"tables": {'we"ird': 2}}})
    assert result["valid"] and result["tables"] == {'we"ird': 2}


def test_sqlite_corrupt_page_fails_integrity_check(tmp_path, restore_dir):
    data = bytearray(_db(tmp_path, {"orders": 400}))
    page = int.from_bytes(data[16:18], "big")
    # Page 3 is a leaf of orders' b-tree: scribble over its cell content, keep its header.
    for i in range(2 * page + 200, 3 * page - 8):
        data[i] ^= 0x5A
    result = _one(restore_dir, "db.sqlite", bytes(data), {"kind": "sqlite"})
    assert not result["valid"]
    assert result["detail"] == "the SQLite database is corrupt: database disk image is malformed"


def test_sqlite_integrity_check_must_say_exactly_ok(tmp_path, restore_dir):
    data = bytearray(_db(tmp_path, {"orders": 40}))
    data[36:40] = (3).to_bytes(4, "big")  # the header claims three free pages; there are none
    result = _one(restore_dir, "db.sqlite", bytes(data), {"kind": "sqlite"})
    assert result["detail"].startswith("integrity_check: ") and "freelist" in result["detail"], result


def test_expectation_on_a_non_sqlite_content_fails(restore_dir):
    result = _one(restore_dir, "x.tar", _tar([_file("a")]), {"kind": "raw", "expect": {"tables": {"t": 1}}})
    assert result["detail"] == ("the manifest declares expectations for a SQLite database, but the content is tar")
