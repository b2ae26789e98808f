"""Atomic writes: all or nothing, private permissions."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write, atomic_write_chunks


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
