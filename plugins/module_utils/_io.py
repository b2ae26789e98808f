# Copyright: drguard maintainers
# Apache License 2.0
"""Private files and directories for everything the drill writes.

Directories are 0700 and files 0600 (or stricter), whatever the caller's umask.
``ensure_private_dir`` never follows a symlink and refuses a directory owned by
another user; an existing directory of ours with group or other bits is tightened
to 0700 through a descriptor opened with ``O_NOFOLLOW``, so a symlink swapped in
meanwhile is never chmodded. Only the directories named here are judged: the
ancestors of an existing path are the caller's choice.

Atomic writes: a 0600 temp file in the target directory, then rename. Nothing
half-written survives a crash, and nobody else can read it meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile

PRIVATE_DIR_MODE = 0o700


class PrivateDirError(OSError):
    """A directory the drill would write into is unsafe: a symlink, not a directory, or not ours."""


def check_private_dir(path: str):
    """Judge ``path`` without changing anything: its lstat result, or None when it does not exist.

    Raises ``PrivateDirError`` when ``path`` is a symlink (never followed), not a
    directory, or owned by another user than the one running the drill. Group or
    other permission bits are left to ``ensure_private_dir``, which tightens them.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    _judge(path, info)
    return info


def _judge(path: str, info) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise PrivateDirError("%s is a symlink; refusing to follow it, so remove it or use a real directory" % path)
    if not stat.S_ISDIR(info.st_mode):
        raise PrivateDirError("%s exists and is not a directory; remove it or choose another path" % path)
    if info.st_uid != os.geteuid():
        raise PrivateDirError("%s is owned by uid %d, not by the user running the drill (uid %d); use a directory "
                              "of your own" % (path, info.st_uid, os.geteuid()))


def ensure_private_dir(path: str, *, parents: bool = False) -> None:
    """Make ``path`` a directory with mode 0700 owned by the current user, or raise ``PrivateDirError``.

    A missing directory is created (with its missing ancestors when ``parents``,
    each one 0700 too); an existing one must be a real directory of ours (see
    ``check_private_dir``) and its group/other bits are removed. Safe when several
    workers create the same directory at once.
    """
    path = os.path.abspath(path)
    if parents:
        parent = os.path.dirname(path)
        if parent != path and not os.path.lexists(parent):
            ensure_private_dir(parent, parents=True)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    info = check_private_dir(path)
    if info is None:
        raise FileNotFoundError(errno.ENOENT, "directory vanished while it was being created", path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PrivateDirError("%s was replaced while it was being checked; refusing to use it" % path) from None
        raise
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise PrivateDirError("%s was replaced while it was being checked; refusing to use it" % path)
        _judge(path, opened)
        if stat.S_IMODE(opened.st_mode) != PRIVATE_DIR_MODE:
            os.fchmod(fd, PRIVATE_DIR_MODE)
    finally:
        os.close(fd)


def atomic_write_chunks(path: str, chunks, mode: int = 0o600) -> int:
    """Write the byte chunks of ``chunks`` to ``path`` atomically with permissions ``mode``.

    A missing directory is created 0700 (``ensure_private_dir``); an existing one is
    used as it is. If iterating ``chunks`` raises (a failed download, a digest that
    does not match), the temporary file is removed and ``path`` is untouched.
    Returns the bytes written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        ensure_private_dir(directory, parents=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                written += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
            # On the descriptor: the name could be swapped for a symlink, the open file cannot.
            os.fchmod(handle.fileno(), mode)
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
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically with permissions ``mode``."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)
