"""Atomic writes: all or nothing, private permissions."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils._io import (
    PrivateDirError,
    atomic_write,
    atomic_write_chunks,
    atomic_write_json,
    check_private_dir,
    ensure_private_dir,
)


def test_chunks_written_with_mode(tmp_path):
    path = tmp_path / "a"
    assert atomic_write_chunks(str(path), [b"ab", b"cd"], 0o400) == 4
    assert path.read_bytes() == b"abcd"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400


def test_failure_mid_stream_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a"
    atomic_write(str(path), b"old")

    def broken():
        yield b"new"
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError):
        atomic_write_chunks(str(path), broken())
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a"]


# -- private directories: 0700, owned by us, never through a symlink ---------------------------
FOREIGN_UID = 4242
# A directory readable by the group, as a umask of 027 would leave it.
LOOSE_DIR_MODE = 0o750


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_dir_and_its_new_parents_are_0700_under_umask_002(tmp_path, umask_002):
    path = tmp_path / "a" / "b" / "c"
    ensure_private_dir(str(path), parents=True)
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", path)] == [0o700, 0o700, 0o700]
    assert os.lstat(path).st_uid == os.geteuid()


def test_private_dir_without_parents_refuses_a_missing_parent(tmp_path):
    with pytest.raises(FileNotFoundError):
        ensure_private_dir(str(tmp_path / "missing" / "c"))
    assert not (tmp_path / "missing").exists()


def test_existing_own_dir_with_group_and_other_bits_is_tightened(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    os.chmod(path, LOOSE_DIR_MODE)
    ensure_private_dir(str(path))
    assert _mode(path) == 0o700


def test_symlink_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.chmod(target, LOOSE_DIR_MODE)
    os.symlink(target, tmp_path / "link")
    with pytest.raises(PrivateDirError, match="is a symlink"):
        ensure_private_dir(str(tmp_path / "link"))
    assert _mode(target) == LOOSE_DIR_MODE and os.listdir(target) == []


def test_dangling_symlink_is_refused_and_nothing_created(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(PrivateDirError, match="is a symlink"):
        ensure_private_dir(str(tmp_path / "link"), parents=True)
    assert not (tmp_path / "nowhere").exists()


def test_non_directory_is_refused(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(PrivateDirError, match="is not a directory"):
        ensure_private_dir(str(tmp_path / "f"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_directory_owned_by_another_user_is_refused_and_not_tightened(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir()
    os.chmod(path, LOOSE_DIR_MODE)
    os.chown(path, FOREIGN_UID, FOREIGN_UID)
    with pytest.raises(PrivateDirError, match="owned by uid %d" % FOREIGN_UID):
        ensure_private_dir(str(path))
    with pytest.raises(PrivateDirError, match="owned by uid %d" % FOREIGN_UID):
        check_private_dir(str(path))
    assert _mode(path) == LOOSE_DIR_MODE


def test_check_private_dir_judges_without_creating_or_tightening(tmp_path):
    assert check_private_dir(str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing").exists()
    path = tmp_path / "out"
    path.mkdir()
    os.chmod(path, LOOSE_DIR_MODE)
    assert stat.S_ISDIR(check_private_dir(str(path)).st_mode)
    assert _mode(path) == LOOSE_DIR_MODE
    os.symlink(path, tmp_path / "link")
    with pytest.raises(PrivateDirError, match="is a symlink"):
        check_private_dir(str(tmp_path / "link"))


def test_atomic_write_creates_missing_directories_0700_and_files_0600(tmp_path, umask_002):
    path = tmp_path / "new" / "deeper" / "report.json"
    atomic_write_json(str(path), {"a": 1})
    assert [_mode(p) for p in (tmp_path / "new", tmp_path / "new" / "deeper", path)] == [0o700, 0o700, 0o600]


def test_atomic_write_refuses_a_symlinked_missing_directory(tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(PrivateDirError, match="is a symlink"):
        atomic_write(str(tmp_path / "link" / "f"), b"x")
    assert not (tmp_path / "nowhere").exists()
