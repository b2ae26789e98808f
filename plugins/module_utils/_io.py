# Copyright: drguard maintainers
# Apache License 2.0
"""Atomic file writes: a 0600 temp file in the target directory, then rename.

Nothing half-written survives a crash, and nobody else can read it meanwhile.
"""

from __future__ import annotations

import json
import os
import tempfile


def atomic_write_chunks(path: str, chunks, mode: int = 0o600) -> int:
    """Write the byte chunks of ``chunks`` to ``path`` atomically with permissions ``mode``.

    If iterating ``chunks`` raises (a failed download, a digest that does not match),
    the temporary file is removed and ``path`` is untouched. Returns the bytes written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return written


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``."""
    atomic_write_chunks(path, (data,), mode)


def atomic_write_json(path: str, obj, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)
