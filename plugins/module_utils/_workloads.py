# Copyright: drguard maintainers
# Apache License 2.0
"""What runs inside the sandbox: the restore validators and the db tier's read-only query service.

Standard library only, on purpose: this file's own source is the program a workload runs
(:func:`program`, put into the workload's read-only tmpfs and run as ``python -I -S
<file> <command>``), so the validators judge a restored artifact the same way inside a tier
as on the controller (``_restore`` imports them from here).

* :func:`validate` - open each restored artifact by its content (docs/validation.md): SQLite
  read-only with ``PRAGMA integrity_check`` and the manifest's ``expect.tables``; tar (plain or
  gzip / bzip2 / xz) safely extracted member by member within :class:`Caps`; any other
  compressed stream decompressed to its end within the caps; anything else ``raw``.
* :func:`serve_db` - the db tier's service: a restored SQLite database opened
  ``mode=ro&immutable=1``, one SQL ``SELECT`` per line over mutual TLS 1.3 (the peer authorised by
  its SPIFFE identity against ``tier_rules``, every handshake an event; the leaf renewed while it
  runs), JSON rows back; anything but a single read-only ``SELECT`` is refused (docs/runtime.md,
  "Restore and validation inside"; docs/mtls.md).
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import re
import shutil
import socket
import sqlite3
import stat
import sys
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from urllib.parse import quote


class RestoreError(Exception):
    """A restore or validation that cannot go on; the message says what was wrong."""


# --------------------------------------------------------------------------- validate
#: The compressed formats :func:`sniff` recognises, by their magic bytes.
COMPRESSIONS = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00"}

DEFAULT_MAX_MEMBERS = 100_000
DEFAULT_MAX_TOTAL_BYTES = 10 * 1024 ** 3
DEFAULT_MAX_RATIO = 200

# Tar headers, pax records and padding around the members' own bytes; a stream that
# decompresses past max_total_bytes plus this is stopped even before a member claims it.
METADATA_ALLOWANCE = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_TAR_MAGIC = b"ustar"


@dataclass
class Caps:
    """Limits on what one archive or compressed stream may unpack to (validate_restore's options)."""
    max_members: int = DEFAULT_MAX_MEMBERS
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_ratio: int = DEFAULT_MAX_RATIO

    def check(self) -> None:
        for name in ("max_members", "max_total_bytes", "max_ratio"):
            if getattr(self, name) < 1:
                raise RestoreError("%s must be at least 1" % name)


class Refused(Exception):
    """An artifact does not validate; the message is the one specific reason."""


def _compression(head: bytes):
    if head.startswith(COMPRESSIONS["bzip2"]) and len(head) > 3 and head[3:4] in b"123456789":
        return "bzip2"
    for name in ("gzip", "xz"):
        if head.startswith(COMPRESSIONS[name]):
            return name
    return None


def _decompressor(compression: str, handle):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if compression == "bzip2":
        return bz2.BZ2File(handle, mode="rb")
    return lzma.LZMAFile(handle, mode="rb")


def _is_tar_header(block: bytes) -> bool:
    return len(block) >= 262 and block[257:262] == _TAR_MAGIC


def sniff(handle) -> tuple:
    """``(kind, compression)`` of the open binary ``handle`` from its first bytes (it is read from the start).

    ``kind`` is ``sqlite``, ``tar``, ``compressed`` (a gzip, bzip2 or xz stream that is not a
    tar) or ``raw``; ``compression`` is ``gzip``, ``bzip2``, ``xz`` or None. A compressed
    stream is opened only far enough to read one tar header (512 bytes of output); a stream
    that is corrupt right at its start is ``compressed`` (its validation says why).
    """
    handle.seek(0)
    head = handle.read(512)
    if head.startswith(b"SQLite format 3\x00"):
        return "sqlite", None
    compression = _compression(head)
    if compression is None:
        return ("tar" if _is_tar_header(head) else "raw"), None
    handle.seek(0)
    try:
        block = _decompressor(compression, handle).read(512)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
        block = b""
    return ("tar" if _is_tar_header(block) else "compressed"), compression


def _open_regular(path: str):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RestoreError("%s is a symlink; validate only the files restore_artifacts wrote" % path) from None
        raise
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise RestoreError("%s is not a regular file" % path)
    return handle


class _Capped(io.RawIOBase):
    """A decompressed stream that counts what it gives and stops once the caps are passed.

    The ratio is judged against the whole compressed size (known before reading), so a
    bomb stops after at most ``max_ratio`` times its own size, never after all of it.
    """

    def __init__(self, source, compressed_size: int, caps: Caps, what: str, allowance: int = 0):
        super().__init__()
        self.source, self.read_bytes = source, 0
        self.ratio_limit = caps.max_ratio * max(compressed_size, 1)
        self.total_limit = caps.max_total_bytes + allowance
        self.caps, self.what = caps, what

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self.source.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self.ratio_limit:
            raise Refused("%s decompresses to more than max_ratio %d times its compressed size; stopped after "
                          "%d bytes" % (self.what, self.caps.max_ratio, self.read_bytes))
        if self.read_bytes > self.total_limit:
            raise Refused("%s unpacks to more than max_total_bytes %d; stopped after %d bytes"
                          % (self.what, self.caps.max_total_bytes, self.read_bytes))
        buffer[:len(data)] = data
        return len(data)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class _Extraction:
    """Checks every tar member before anything of it is written, then writes it under ``root`` (or nowhere).

    ``root`` is a fresh 0700 directory (None in check mode: members are read, not written).
    Each refusal is a :class:`Refused` naming the member and the one rule it breaks.
    """

    def __init__(self, root, archive_size: int, caps: Caps):
        self.root = os.path.realpath(root) if root else None
        self.archive_size, self.caps = archive_size, caps
        self.members = self.total = 0

    def check(self, info) -> None:
        name = info.name
        if "\x00" in name or not name:
            raise Refused("tar member %r has an empty name or a NUL byte" % name)
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise Refused("tar member %r has an absolute name" % name)
        if "\\" in name:
            raise Refused("tar member %r contains a backslash" % name)
        if ".." in name.split("/"):
            raise Refused("tar member %r climbs out of the target with '..'" % name)
        if info.ischr() or info.isblk():
            raise Refused("tar member %r is a device" % name)
        if info.isfifo():
            raise Refused("tar member %r is a fifo" % name)
        if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise Refused("tar member %r is of an unsupported type %r" % (name, info.type))
        if info.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            raise Refused("tar member %r has setuid, setgid or sticky bits (mode %04o)" % (name, info.mode & 0o7777))
        self.members += 1
        if self.members > self.caps.max_members:
            raise Refused("the archive has more than max_members %d members" % self.caps.max_members)
        if self.total + info.size > self.caps.max_total_bytes:
            raise Refused("tar member %r would bring the unpacked size past max_total_bytes %d"
                          % (name, self.caps.max_total_bytes))
        if info.offset_data + info.size > self.caps.max_ratio * max(self.archive_size, 1):
            raise Refused("tar member %r would bring the compression ratio past max_ratio %d"
                          % (name, self.caps.max_ratio))
        self.total += info.size
        self.check_links(info)

    def _resolve(self, rel: str) -> str:
        # Against the root as it is on disk: symlinks extracted before are followed.
        base = self.root or "/nonexistent-root"
        return os.path.realpath(os.path.join(base, rel))

    def check_links(self, info) -> None:
        name = info.name.rstrip("/")
        base = self.root or "/nonexistent-root"
        if info.issym():
            target = info.linkname
            if not target or target.startswith("/") or not _inside(
                    base, self._resolve(os.path.join(os.path.dirname(name), target))):
                raise Refused("tar member %r escapes the target through a symlink (to %r)" % (name, target))
        if info.islnk():
            target = info.linkname
            if not target or target.startswith("/") or not _inside(base, self._resolve(target)):
                raise Refused("tar member %r escapes the target through a hard link (to %r)" % (name, target))
        parent = self._resolve(os.path.dirname(name)) if os.path.dirname(name) else base
        if not _inside(base, parent):
            raise Refused("tar member %r would be written through a symlink outside the target" % name)

    def write(self, tar, info) -> None:
        """Write one checked member; in check mode only read its bytes."""
        if self.root is None:
            if info.isreg():
                source = tar.extractfile(info)
                while source.read(_CHUNK):
                    pass
            return
        # The standard library's own data filter where this Python has it (3.11.4 and later): a second
        # opinion after the checks above, which alone already refuse everything it would.
        data_filter = getattr(tarfile, "data_filter", None)
        try:
            if data_filter is not None:
                data_filter(info, self.root)
        except getattr(tarfile, "FilterError", ()) as exc:
            raise Refused("tar member %r is refused by the tar data filter: %s" % (info.name, exc)) from None
        name = info.name.rstrip("/")
        target = os.path.join(self.root, name)
        self._parents(os.path.dirname(name))
        if info.isdir():
            if not os.path.isdir(target) or os.path.islink(target):
                self._clear(target, info.name)
                os.mkdir(target, 0o700)
            return
        self._clear(target, info.name)
        if info.issym():
            os.symlink(info.linkname, target)
        elif info.islnk():
            source = os.path.join(self.root, info.linkname)
            if not os.path.lexists(source) or not stat.S_ISREG(os.lstat(source).st_mode):
                raise Refused("tar member %r is a hard link to %r, which is not a file extracted before"
                              % (info.name, info.linkname))
            os.link(source, target, follow_symlinks=False)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(info)
                while True:
                    chunk = source.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)

    def _parents(self, rel: str) -> None:
        path = self.root
        for part in [p for p in rel.split("/") if p not in ("", ".")]:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                self._clear(path, rel)
                os.mkdir(path, 0o700)
            if not _inside(self.root, os.path.realpath(path)):
                raise Refused("tar member directory %r leads outside the target" % rel)

    @staticmethod
    def _clear(path: str, name: str) -> None:
        # A later member of the same name replaces the earlier one; a directory is never removed.
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise Refused("tar member %r would replace a directory" % name)
        os.unlink(path)


def check_tar(path: str, caps: Caps | None = None, *, compression=None, extract: bool = True,
              keep: bool = False, scratch: str | None = None) -> dict:
    """Extract a (possibly compressed) tar archive safely, member by member, into a private directory.

    The directory is a fresh 0700 one beside the archive, inside the restore directory;
    every member is checked (name, type, mode bits, links against the root, caps) before
    anything of it is written. On any refusal the directory is removed whole; on success it
    is removed too unless ``keep``. ``extract=False`` (check mode) reads without writing.
    ``scratch`` puts the directory there instead (inside the sandbox the archive lies on a
    read-only mount).
    """
    caps = caps or Caps()
    size = os.lstat(path).st_size
    where = scratch or os.path.dirname(os.path.abspath(path))
    root = tempfile.mkdtemp(prefix=".extract-", dir=where) if extract else None
    extraction = _Extraction(root, size, caps)
    what = "the %s stream of the archive" % compression if compression else "the archive"
    ok, counted = False, None
    try:
        with _open_regular(path) as handle:
            stream = _decompressor(compression, handle) if compression else handle
            counted = _Capped(stream, size, caps, what, METADATA_ALLOWANCE)
            with tarfile.open(fileobj=io.BufferedReader(counted, 64 * 1024), mode="r|") as tar:
                for info in tar:
                    extraction.check(info)
                    extraction.write(tar, info)
        if extraction.members == 0:
            raise Refused("the archive is empty")
        ok = True
    except Refused as exc:
        return {"valid": False, "detail": str(exc), "members": extraction.members, "compression": compression,
                "read_bytes": counted.read_bytes if counted else 0}
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        return {"valid": False, "detail": "%s is truncated or corrupt: %s" % (what, exc),
                "members": extraction.members, "compression": compression,
                "read_bytes": counted.read_bytes if counted else 0}
    finally:
        if root and not (ok and keep):
            shutil.rmtree(root, ignore_errors=True)
    out = {"valid": True, "detail": "ok", "members": extraction.members, "bytes": extraction.total,
           "compression": compression, "read_bytes": counted.read_bytes}
    if root and keep:
        out["extracted_to"] = root
    return out


def check_stream(path: str, compression: str, caps: Caps | None = None) -> dict:
    """Decompress a gzip, bzip2 or xz stream to its end within the caps (its own checksum is verified)."""
    caps = caps or Caps()
    size = os.lstat(path).st_size
    what = "the %s stream" % compression
    capped = None
    try:
        with _open_regular(path) as handle:
            capped = _Capped(_decompressor(compression, handle), size, caps, what)
            while capped.read(_CHUNK):
                pass
    except Refused as exc:
        return {"valid": False, "detail": str(exc), "compression": compression,
                "read_bytes": capped.read_bytes if capped else 0}
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        return {"valid": False, "detail": "%s is truncated or corrupt: %s" % (what, exc), "compression": compression}
    return {"valid": True, "detail": "ok", "compression": compression, "bytes": capped.read_bytes,
            "read_bytes": capped.read_bytes}


def sqlite_uri(path: str) -> str:
    """A read-only SQLite URI for exactly ``path``.

    SQLite decodes %XX escapes and stops at '?' or '#' in a URI, so the path is
    percent-encoded: an artifact named ``%2E%2E/x.db`` must not open ``../x.db``.
    ``immutable=1``: the restored file is 0400 in a private directory and nothing
    writes it, so SQLite takes no locks and creates no -wal/-shm file beside it.
    """
    return "file:%s?mode=ro&immutable=1" % quote(os.path.abspath(path), safe="/")


def _quote_identifier(name: str) -> str:
    return '"%s"' % name.replace('"', '""')


def check_sqlite(path: str, min_rows: int, expect: dict | None = None) -> dict:
    """``PRAGMA integrity_check`` (exactly ``ok``), row counts, and the manifest's ``expect.tables`` when given.

    Table names are counted only when ``sqlite_master`` lists them, and always as quoted
    identifiers: a name from the manifest never reaches SQL as anything but a table name.
    """
    con = sqlite3.connect(sqlite_uri(path), uri=True)
    try:
        try:
            verdict = [row[0] for row in con.execute("PRAGMA integrity_check")]
            tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            counts = {t: con.execute("SELECT count(*) FROM %s" % _quote_identifier(t)).fetchone()[0]  # noqa: S608
                      for t in tables}
        except sqlite3.DatabaseError as exc:
            return {"valid": False, "detail": "the SQLite database is corrupt: %s" % exc}
    finally:
        con.close()
    if verdict != ["ok"]:
        return {"valid": False, "detail": "integrity_check: %s" % "; ".join(str(v) for v in verdict[:5]),
                "tables": counts}
    for table, least in sorted(((expect or {}).get("tables") or {}).items()):
        if table not in counts:
            return {"valid": False, "tables": counts,
                    "detail": "table %r is missing, but the manifest expects it" % table}
        if counts[table] < least:
            return {"valid": False, "tables": counts,
                    "detail": "table %r has %d row(s), but the manifest expects at least %d"
                              % (table, counts[table], least)}
    total = sum(counts.values())
    if total < min_rows:
        return {"valid": False, "detail": "only %d row(s), fewer than min_rows %d" % (total, min_rows),
                "tables": counts}
    return {"valid": True, "detail": "ok", "tables": counts}


def _declared_problem(declared, kind: str, compression) -> str | None:
    """Why the manifest's declared kind disagrees with the content, or None.

    A declared ``tar`` or ``sqlite`` must be what the content is. A declared ``raw`` is
    validated as what the content is (manifests signed before compressed tars were
    recognised call them raw): a declaration never switches a check off.
    """
    if declared in (None, "raw") or declared == kind:
        return None
    article = "an" if compression == "xz" else "a"
    what = {"compressed": "%s %s stream that is not a tar" % (article, compression), "tar": "a tar archive",
            "sqlite": "a SQLite database", "raw": "neither a tar archive nor a SQLite database"}[kind]
    return "the manifest declares kind %s, but the content is %s" % (declared, what)


def validate_one(entry: dict, min_rows: int, caps: Caps | None = None, *, extract: bool = True,
                 keep: bool = False, scratch: str | None = None) -> dict:
    """``{name, kind, valid, detail, ...}`` for one restored entry; a file that cannot be opened is invalid.

    ``entry`` may carry the manifest's ``kind`` and ``expect`` (restore_artifacts passes
    them on from verify_artifacts).
    """
    name, path = entry.get("name"), entry.get("path")
    declared, expect = entry.get("kind"), entry.get("expect")
    try:
        with _open_regular(path) as handle:
            kind, compression = sniff(handle)
    except (OSError, RestoreError, TypeError) as exc:
        return {"name": name, "kind": "unknown", "valid": False, "detail": "cannot open: %s" % exc}
    problem = _declared_problem(declared, kind, compression)
    if problem:
        outcome = {"valid": False, "detail": problem}
    elif expect and kind != "sqlite":
        outcome = {"valid": False, "detail": "the manifest declares expectations for a SQLite database, but the "
                                             "content is %s" % kind}
    else:
        try:
            if kind == "sqlite":
                outcome = check_sqlite(path, min_rows, expect)
            elif kind == "tar":
                outcome = check_tar(path, caps, compression=compression, extract=extract, keep=keep,
                                    scratch=scratch)
            elif kind == "compressed":
                outcome = check_stream(path, compression, caps)
            else:
                outcome = {"valid": True, "detail": "raw artifact; digest verified"}
        except (OSError, RestoreError, sqlite3.Error) as exc:
            outcome = {"valid": False, "detail": "cannot open: %s" % exc}
    if declared is not None:
        outcome["declared_kind"] = declared
    return dict(name=name, kind=kind, **outcome)


@dataclass
class Validation:
    """Whether every restored artifact validated, and one result per artifact."""
    valid: bool
    results: list

    @property
    def message(self) -> str:
        """The task's failure message when something did not validate."""
        bad = ["%s (%s)" % (r["name"], r["detail"]) for r in self.results if not r["valid"]] or ["nothing restored"]
        return "Restored backup does not validate: %s" % ", ".join(bad)


def validate(restored: list, min_rows: int = 1, caps: Caps | None = None, *, extract: bool = True,
             keep: bool = False, scratch: str | None = None) -> Validation:
    """Validate every entry of ``restored``; nothing restored is not valid.

    ``extract=False`` (check mode) reads archives without writing them; ``keep`` leaves a
    valid archive's extraction in place (its ``extracted_to``).
    """
    caps = caps or Caps()
    caps.check()
    results = [validate_one(entry, min_rows, caps, extract=extract, keep=keep, scratch=scratch)
               for entry in restored]
    return Validation(bool(results) and all(r["valid"] for r in results), results)


# --------------------------------------------------------------------------- the db tier's service
MAX_QUERY = 4096  # bytes of one query line
MAX_ROWS = 1000  # rows sent back for one query (``truncated`` says when there were more)
MAX_CLIENTS = 16  # concurrent connections; one more is answered with an error and closed
IDLE_SECONDS = 30.0  # a client silent this long is disconnected
# sqlite3 authorizer action codes a single read-only SELECT needs (sqlite3.h): SELECT, READ, FUNCTION.
_ALLOWED_ACTIONS = frozenset((21, 20, 31))


def _authorise(action, *_args):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def open_readonly(path: str):
    """The restored database, read-only twice over: ``mode=ro&immutable=1`` and an authorizer that
    allows a ``SELECT`` reading tables and calling functions, nothing else (no PRAGMA, ATTACH, write)."""
    con = sqlite3.connect(sqlite_uri(path), uri=True, check_same_thread=False)
    con.execute("PRAGMA query_only = ON")
    con.set_authorizer(_authorise)
    return con


def _cell(value):
    return value.hex() if isinstance(value, bytes) else value


def answer(con, line: str) -> dict:
    """One query line -> ``{"ok": true, "columns", "rows", "truncated"}`` or ``{"ok": false, "error"}``."""
    sql = line.strip()
    if not re.match(r"(?is)^\s*select\b", sql):
        return {"ok": False, "error": "only a single SELECT is answered"}
    try:
        cursor = con.execute(sql)
        rows = cursor.fetchmany(MAX_ROWS + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError) as exc:
        return {"ok": False, "error": "refused: %s" % exc}
    columns = [d[0] for d in cursor.description or ()]
    return {"ok": True, "columns": columns, "rows": [[_cell(v) for v in r] for r in rows[:MAX_ROWS]],
            "truncated": len(rows) > MAX_ROWS}


HANDSHAKE_SECONDS = 5.0  # a TLS handshake longer than this is refused (timeout)
RENEW_POLL = 0.5  # seconds between two looks at the renewed identity files
HANDSHAKE_TYPE = "drguard.tls.handshake"
RELOAD_TYPE = "drguard.tls.reload"
TLS_SHARED = "mtls_shared.py"  # the mTLS checks (_mtls' shared source), run with exec: standard library only
TLS_CONFIG = "tls.json"  # {domain, tier, source, rules, server_id}: paths and policy, never key material
IDENTITY_FILE = "identity.pem"  # the leaf and its key in one file (0400)
TRUST_FILE = "trust.pem"  # the drill's CA bundle and CRLs (0444)


def _load_shared() -> dict:
    """The mTLS checks shared with the mTLS servers (docs/mtls.md): contexts, ``judge_peer``, ``rule_allows``."""
    shared = {}
    with open(os.path.join(INSIDE_DIR, TLS_SHARED), encoding="utf-8") as handle:
        exec(compile(handle.read(), "<drguard mtls shared>", "exec"), shared)  # noqa: S102 - our own source
    return shared


class _Tls:
    """The service's TLS state: the server context of its current leaf, reloaded when the controller
    renews the leaf (new files in the scratch, or SIGHUP); connections already open keep theirs."""

    def __init__(self, cfg, shared):
        self.cfg, self.shared = cfg, shared
        self.lock, self.out = threading.Lock(), threading.Lock()
        self.ctx = self.serial = self.seen = None
        self.load(initial=True)

    @staticmethod
    def paths():
        """``(trust, identity)``: the renewed copies in the scratch when the controller wrote them."""
        out = []
        for name in (TRUST_FILE, IDENTITY_FILE):
            renewed = os.path.join(SCRATCH_DIR, name)
            out.append(renewed if os.path.isfile(renewed) else os.path.join(INSIDE_DIR, name))
        return tuple(out)

    def stamp(self):
        return tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in self.paths())

    def load(self, initial=False):
        stamp = self.stamp()
        trust, identity = self.paths()
        try:
            ctx, serial = self.shared["server_context"](identity, trust), self.shared["own_serial"](identity)
        except (OSError, ValueError, IndexError) as exc:
            if initial:
                raise
            self.seen = stamp  # judged once; the next change is looked at again
            self.emit(RELOAD_TYPE, {"local_tier": self.cfg["tier"], "ok": False, "serial": self.serial,
                                    "reason": type(exc).__name__})
            return
        with self.lock:
            self.ctx, self.serial, self.seen = ctx, serial, stamp
        self.emit(RELOAD_TYPE, {"local_tier": self.cfg["tier"], "ok": True, "serial": serial, "initial": initial})

    def current(self):
        with self.lock:
            return self.ctx, self.serial

    def watch(self, wake):
        """Reload on SIGHUP (``wake``) or when the renewed files change; runs in a thread of its own."""
        while True:
            hup = wake.wait(RENEW_POLL)
            wake.clear()
            try:
                changed = self.stamp() != self.seen
            except OSError:
                changed = False
            if hup or changed:
                self.load()

    def emit(self, type_, data):
        import datetime  # noqa: PLC0415
        import uuid  # noqa: PLC0415
        event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": self.cfg["source"], "type": type_,
                 "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                 "datacontenttype": "application/json", "subject": self.cfg["tier"], "data": data}
        line = json.dumps(event, sort_keys=True, ensure_ascii=True) + "\n"
        with self.out:
            sys.stdout.write(line)
            sys.stdout.flush()


def _queries(conn, path) -> None:
    """Answer one query per line on ``conn`` (plain or TLS) until the client closes or goes idle."""
    try:
        conn.settimeout(IDLE_SECONDS)
        con = open_readonly(path)
        reader = conn.makefile("rb")
        while True:
            raw = reader.readline(MAX_QUERY + 1)
            if not raw:
                break
            if len(raw) > MAX_QUERY and not raw.endswith(b"\n"):
                conn.sendall(b'{"ok": false, "error": "query longer than %d bytes"}\n' % MAX_QUERY)
                break
            reply = answer(con, raw.decode("utf-8", "replace"))
            conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
    except (OSError, sqlite3.Error):
        pass
    finally:
        conn.close()


def _client(conn, peer, port, path, slots, tls):  # noqa: PLR0917 - a thread's target
    """One connection: TCP_NODELAY, the TLS 1.3 handshake (client certificate required), the peer's
    identity judged by the mTLS servers' own ``accept_peer``, one handshake event; then the queries."""
    try:
        ctx, local_serial = tls.current()
        sock, data = tls.shared["accept_peer"](conn, ctx, tls.cfg, local_serial, peer, port, HANDSHAKE_SECONDS)
        tls.emit(HANDSHAKE_TYPE, data)
        if sock is None:
            return
        _queries(sock, path)
    finally:
        slots.release()


def serve_db(path: str, address: str, port: int) -> None:
    """Serve ``path`` read-only on ``address:port`` over mutual TLS (one query per line) until killed.

    The TLS identity, trust and policy are the workload's files (:data:`TLS_CONFIG`,
    :data:`IDENTITY_FILE`, :data:`TRUST_FILE`); without them the service does not start: it never
    serves plain TCP. Every handshake is a ``drguard.tls.handshake`` event on stdout."""
    import signal  # noqa: PLC0415
    try:
        with open(os.path.join(INSIDE_DIR, TLS_CONFIG), encoding="utf-8") as handle:
            cfg = json.load(handle)
        tls = _Tls(cfg, _load_shared())
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise SystemExit("db service: no usable TLS identity (%s); it serves over mTLS only" % exc) from None
    open_readonly(path).execute("SELECT count(*) FROM sqlite_master").fetchone()  # a database, or fail now
    wake = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: wake.set())
    threading.Thread(target=tls.watch, args=(wake,), daemon=True).start()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(64)
    sys.stderr.write("db service on %s:%d (mTLS, serial %s)\n" % (address, port, tls.current()[1]))
    sys.stderr.flush()
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    while True:
        conn, peer = server.accept()
        if not slots.acquire(blocking=False):
            tls.emit(HANDSHAKE_TYPE, {"local_tier": cfg["tier"], "local_serial": tls.current()[1], "port": port,
                                      "peer_address": peer[0], "peer_id": None, "peer_tier": None, "serial": None,
                                      "accepted": False, "reason": "server_busy", "latency_ms": 0.0})
            conn.close()
            continue
        threading.Thread(target=_client, args=(conn, peer, port, path, slots, tls), daemon=True).start()


def _query(argv) -> int:
    """``query <address> <port> <timeout>``: one SQL line from stdin to the db service, its JSON answer on
    stdout. Over mTLS with this workload's identity when its files hold one (:data:`TLS_CONFIG`), the
    server's identity checked; else plain TCP (which the service refuses)."""
    host, port, timeout = argv[0], int(argv[1]), float(argv[2])
    sql = sys.stdin.read().strip().encode() + b"\n"
    shared = cfg = None
    if os.path.exists(os.path.join(INSIDE_DIR, TLS_CONFIG)):
        shared = _load_shared()
        with open(os.path.join(INSIDE_DIR, TLS_CONFIG), encoding="utf-8") as handle:
            cfg = json.load(handle)
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        sys.stdout.write(json.dumps({"ok": False, "error": "unreachable: %s" % (exc.strerror or exc)}) + "\n")
        return 0
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if shared is not None:
            ctx = shared["client_context"](os.path.join(INSIDE_DIR, IDENTITY_FILE),
                                           os.path.join(INSIDE_DIR, TRUST_FILE))
            conn = ctx.wrap_socket(conn)
            _tier, serial, peer_id, reason = shared["judge_peer"](conn.getpeercert(binary_form=True) or b"",
                                                                  cfg["domain"], "server")
            if reason is None and peer_id != cfg["server_id"]:
                reason = "server_identity_mismatch"
            if reason is not None:
                sys.stdout.write(json.dumps({"ok": False, "error": "server refused: %s" % reason}) + "\n")
                return 0
        conn.sendall(sql)
        line = conn.makefile("rb").readline()
    except (OSError, ValueError) as exc:
        why = shared["ssl_reason"](exc) if shared is not None else (getattr(exc, "strerror", None) or str(exc))
        sys.stdout.write(json.dumps({"ok": False, "error": "refused: %s" % why}) + "\n")
        return 0
    finally:
        conn.close()
    if not line:
        sys.stdout.write(json.dumps({"ok": False, "error": "closed_by_peer"}) + "\n")
        return 0
    try:
        answer_ = json.loads(line)
    except ValueError:
        answer_ = {"ok": False, "error": "not a db service answer"}
    if shared is not None and isinstance(answer_, dict):
        answer_["server_serial"] = serial
    sys.stdout.write(json.dumps(answer_) + "\n")
    return 0


# --------------------------------------------------------------------------- inside: entry point
INSIDE_DIR = "/run/drguard/in"  # _netns.WORKLOAD_IN: the workload's read-only files
SCRATCH_DIR = "/run/drguard/work"  # _netns.WORKLOAD_SCRATCH: its writable, size-capped scratch
REQUEST = "request.json"


def _validate_inside() -> int:
    with open(os.path.join(INSIDE_DIR, REQUEST), encoding="utf-8") as handle:
        request = json.load(handle)
    restored = [dict(e, path=os.path.join(INSIDE_DIR, e["file"])) for e in request["restored"]]
    caps = Caps(**request["caps"])
    try:
        outcome = validate(restored, request["min_rows"], caps, extract=request.get("extract", True),
                           scratch=SCRATCH_DIR if os.path.isdir(SCRATCH_DIR) else None)
    except RestoreError as exc:
        sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
        return 2
    for result in outcome.results:
        result.pop("extracted_to", None)
    sys.stdout.write(json.dumps({"valid": outcome.valid, "results": outcome.results}) + "\n")
    return 0


def main(argv) -> int:
    """``validate`` (reads ``request.json`` from the workload's files) or ``serve-db <file> <address> <port>``."""
    if argv[:1] == ["validate"] and len(argv) == 1:
        return _validate_inside()
    if argv[:1] == ["serve-db"] and len(argv) == 4:
        serve_db(os.path.join(INSIDE_DIR, argv[1]), argv[2], int(argv[3]))
        return 0
    if argv[:1] == ["query"] and len(argv) == 4:
        return _query(argv[1:])
    sys.stderr.write("usage: validate | serve-db <file> <address> <port> | query <address> <port> <timeout>\n")
    return 64


# --------------------------------------------------------------------------- the controller's side
# These run on the controller only: they import the namespace manager when called, never at import,
# so this file stays a standard-library program inside.
PROGRAM = "workloads.py"  # the file name of program() in a workload's files
SCRATCH_SLACK = 16 * 1024 * 1024  # directories and per-file pages of an extraction, on top of its bytes
INSIDE_TIMEOUT = 3600


def _netns():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415
    return _netns


def _openable(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, TypeError):
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def scratch_bytes(restored: list, caps: Caps) -> int:
    """Room for the largest extraction the caps allow (archives are extracted one at a time)."""
    sizes = [os.lstat(e["path"]).st_size for e in restored if _openable(e.get("path"))]
    largest = max(sizes, default=0)
    return min(caps.max_total_bytes, caps.max_ratio * max(largest, 1)) + SCRATCH_SLACK


def validate_inside(ns: str, restored: list, min_rows: int = 1, caps: Caps | None = None, *, python: str,
                    extract: bool = True, timeout: float = INSIDE_TIMEOUT) -> Validation:
    """:func:`validate`, run inside namespace ``ns`` (the validation tier) as an unprivileged workload.

    Each restored file is copied read-only (0400) into the workload's tmpfs, extractions go to its
    size-capped scratch, and the workload runs under a uid of its own with an empty environment;
    the results come back as JSON on stdout and are the ones :func:`validate` gives on the
    controller. An entry that cannot be opened as a regular file is judged on the controller
    (it fails there before any of its content is read).
    """
    netns = _netns()
    caps = caps or Caps()
    caps.check()
    if not restored:
        return Validation(False, [])
    inside, files, order = [], {PROGRAM: {"data": program(), "mode": 0o444}}, []
    for index, entry in enumerate(restored):
        if not _openable(entry.get("path")):
            order.append(("here", validate_one(entry, min_rows, caps, extract=False)))
            continue
        name = "artifact-%d" % index
        files[name] = {"source": os.path.abspath(entry["path"]), "mode": 0o400}
        inside.append({k: v for k, v in dict(entry, file=name).items() if k != "path"})
        order.append(("inside", None))
    results = []
    if inside:
        request = {"restored": inside, "min_rows": min_rows, "extract": extract,
                   "caps": {"max_members": caps.max_members, "max_total_bytes": caps.max_total_bytes,
                            "max_ratio": caps.max_ratio}}
        files[REQUEST] = {"data": json.dumps(request), "mode": 0o444}
        try:
            proc = netns.run_in(ns, [python, "-I", "-S", os.path.join(INSIDE_DIR, PROGRAM), "validate"],
                                files=files, scratch=scratch_bytes(restored, caps) if extract else 0,
                                uid=netns.workload_uid() if os.geteuid() == 0 else None, timeout=timeout)
        except netns.NetnsError as exc:
            raise RestoreError("validation inside %s could not run: %s" % (ns, exc.msg)) from None
        try:
            answer_ = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer_ = None
        if proc.returncode != 0 or not isinstance(answer_, dict) or "results" not in answer_:
            why = (answer_ or {}).get("error") if isinstance(answer_, dict) else None
            why = why or (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
            raise RestoreError("validation inside %s failed: %s" % (ns, why[:300]))
        results = list(answer_["results"])
    merged = [result if where == "here" else results.pop(0) for where, result in order]
    return Validation(bool(merged) and all(r["valid"] for r in merged), merged)


def service_argv(python: str, address: str, port: int, database: str = "db.sqlite") -> list:
    """The db service's command line inside its tier (its files: :func:`service_files`)."""
    return [python, "-I", "-S", os.path.join(INSIDE_DIR, PROGRAM), "serve-db", database, address, str(port)]


def service_files(path: str, database: str = "db.sqlite", tls: dict | None = None) -> dict:
    """The db service's files: this program, the restored database (read-only copies) and its TLS material
    (``tls``: ``{"config": dict, "identity": path, "trust": path}``; the key only ever as a 0400 file)."""
    files = {PROGRAM: {"data": program(), "mode": 0o444}, database: {"source": os.path.abspath(path), "mode": 0o400}}
    if tls is not None:
        files.update(tls_files(tls))
    return files


def tls_files(tls: dict) -> dict:
    """A workload's mTLS files: the shared checks, its configuration, its identity (0400) and trust (0444)."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls  # noqa: PLC0415
    return {TLS_SHARED: {"data": _mtls.shared_source(), "mode": 0o444},
            TLS_CONFIG: {"data": json.dumps(tls["config"], sort_keys=True), "mode": 0o444},
            IDENTITY_FILE: {"source": tls["identity"], "mode": 0o400},
            TRUST_FILE: {"source": tls["trust"], "mode": 0o444}}


SERVICE_KEY = "service:db"  # the db service's entry in the runtime's state.json processes
SERVICE_LOG = "db-service.log"  # <output_dir>/runtime/db-service.log: the service's stderr
SERVICE_EVENTS = "db-service-events.jsonl"  # <output_dir>/runtime/: its handshake and reload events (stdout)
SERVICE_READY = 10.0
SERVICE_SCRATCH = 1024 * 1024  # the service's scratch: where the controller puts its renewed identity


def _runtime():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime  # noqa: PLC0415
    return _runtime


def db_target(boundary, plan, tier=None, port=None) -> dict:
    """Where the db service listens: the destination of the first TCP tier rule (towards ``tier`` when
    given) on its first port (or ``port``, which that rule must declare); the rule's source is the tier
    the user's command runs in. ``{"tier", "client_tier", "ns", "address", "port"}``."""
    rules = [r for r in boundary.tier_rules if r.protocol == "tcp" and (tier is None or r.dest == tier)]
    if not rules:
        towards = " towards tier %s" % tier if tier else ""
        raise RestoreError("drill_boundary declares no tcp tier rule%s, so no tier may reach a db service; declare "
                           "one (for example app -> db tcp 5432) or validate without a db tier." % towards)
    rule = rules[0]
    chosen = rule.ports[0].start if port is None else port
    if not any(p.start <= chosen <= p.end for p in rule.ports):
        raise RestoreError("port %d is not declared by the tier rule %s -> %s; pick one of its ports."
                           % (chosen, rule.source, rule.dest))
    spec = plan["tiers"][rule.dest]
    return {"tier": rule.dest, "client_tier": rule.source, "ns": spec["ns"], "address": spec["address"],
            "port": chosen}


def _kill(pid, wait=10.0) -> None:
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        _netns()._reap()  # noqa: SLF001 - collect it if the manager started it in this process
        time.sleep(0.02)
    raise RestoreError("process %d did not exit after SIGKILL; check it and run teardown." % pid)


def _pki_phase(boundary, drill_id, output_dir, python, ttl, lifetime):  # noqa: PLR0917
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill  # noqa: PLC0415
    return _mtls_drill.Phase(boundary, drill_id, output_dir, python=python, ttl=ttl, leaf_lifetime=lifetime)


def _issue(phase, *, fresh=True) -> list:
    """The drill's PKI (the runtime's CA; one leaf per tier, renewed from half-life on) delivered to every
    tier's directory; returns the store's actions. ``fresh`` False: never make a PKI that is not there."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    if not fresh and not phase.store.exists():
        raise RestoreError("the drill's PKI is gone (%s); nothing to renew." % phase.store.dir)
    try:
        phase.make_root()
        actions = phase.store.present([t for t in phase.tiers if t != _pki.VALIDATION_TIER], phase.ttl,
                                      phase.lifetime)
        phase.deliver()
    except (_mtls_drill.MtlsDrillError, _pki.PkiError) as exc:
        raise RestoreError("the db service's TLS identity could not be issued: %s" % exc.msg) from None
    return actions


def tls_config(boundary, drill_id: str, tier: str, server_tier: str) -> dict:
    """What a workload of ``tier`` needs besides its files to speak mTLS to ``server_tier``: the trust domain,
    its own tier and event source, the TCP ``tier_rules`` and the server identity it expects."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    return {"domain": _pki.trust_domain(drill_id), "tier": tier,
            "source": "/drguard/drill/%s/tier/%s" % (drill_id, tier),
            "rules": _mtls.normalise_rules(boundary.tier_rules), "server_id": _pki.spiffe_id(drill_id, server_tier)}


def client_tls(boundary, drill_id: str, output_dir: str, tier: str, server_tier: str) -> dict:
    """A client tier's delivered identity and trust (controller paths, never their content) and ids."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    phase = _pki_phase(boundary, drill_id, output_dir, None, 60, _pki.DEFAULT_LEAF_LIFETIME)
    return {"identity": phase.identity(tier), "trust": os.path.join(phase.tier_dir(tier), _pki.TRUST_FILE),
            "client_id": _pki.spiffe_id(drill_id, tier), "server_id": _pki.spiffe_id(drill_id, server_tier),
            "config": tls_config(boundary, drill_id, tier, server_tier)}


def start_db_service(boundary, drill_id: str, output_dir: str, database: str, *, python: str, tier=None,
                     port=None, ttl: int = 3600, leaf_lifetime: int | None = None) -> dict:
    """Serve the restored ``database`` read-only in the db tier on the tier rule's port, over mutual TLS.

    The runtime's plain listener already holds that port, so the service replaces it: the tier's
    listener process is restarted without that one port, and the service (a uid of its own, no
    capabilities, the database a read-only copy on its tmpfs) takes the port; both must be bound
    within 10 s. ``state.json`` records the new pids, so teardown and the reaper find them.
    The db tier's leaf (the drill's PKI, issued or renewed here) reaches the service as 0400 files
    of its workload only; its handshake events go to ``<output_dir>/runtime/db-service-events.jsonl``.
    Idempotent: a service already alive is kept (its leaf renewed when past half-life).
    ``{"changed", "tier", "client_tier", "address", "port", "pid", "address_port", "tls"}``.
    """
    import time  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    netns, runtime = _netns(), _runtime()
    plan = runtime.full_plan(boundary, drill_id)
    state = runtime.read_state_file(output_dir)
    if not state or state.get("prefix") != plan["prefix"] or state.get("state") != "present":
        raise RestoreError("the runtime of drill %s is not present under %s; start it first (sandbox_runtime)."
                           % (drill_id, output_dir))
    target = db_target(boundary, plan, tier, port)
    out = dict(target, address_port="%s:%d" % (target["address"], target["port"]))
    out.pop("ns")
    lifetime = leaf_lifetime or _pki.DEFAULT_LEAF_LIFETIME
    tls = client_tls(boundary, drill_id, output_dir, target["client_tier"], target["tier"])
    out["tls"] = {k: tls[k] for k in ("identity", "trust", "client_id", "server_id")}
    processes = state.get("processes") or {}
    old = processes.get(SERVICE_KEY) or {}
    if runtime._alive(netns, target["ns"], old.get("pid")):  # noqa: SLF001
        renewed = renew_db_service(boundary, drill_id, output_dir, python=python, ttl=ttl, leaf_lifetime=lifetime)
        return dict(out, changed=renewed["renewed"], pid=old["pid"], renewal=renewed)
    if not _openable(database):
        raise RestoreError("the database %s is not a regular file; pass the restored SQLite file." % database)
    phase = _pki_phase(boundary, drill_id, output_dir, python, ttl, lifetime)
    _issue(phase)
    server = {"config": tls_config(boundary, drill_id, target["tier"], target["tier"]),
              "identity": phase.identity(target["tier"]),
              "trust": os.path.join(phase.tier_dir(target["tier"]), _pki.TRUST_FILE)}
    rdir = os.path.join(output_dir, "runtime")
    key = "listeners:%s" % target["ns"]
    taken = ("tcp", target["address"], target["port"])
    rest = [x for x in plan["world"]["listeners"]
            if x["ns"] == target["ns"] and (x["protocol"], x["address"], x["port"]) != taken]
    listener = processes.get(key) or {}
    if runtime._alive(netns, target["ns"], listener.get("pid")):  # noqa: SLF001
        _kill(listener["pid"])
    try:
        if rest:
            spec = [{k: x[k] for k in ("kind", "name", "address", "protocol", "port")} for x in rest]
            pid = netns.spawn(target["ns"], [python, "-I", "-S", "-c", runtime.LISTENER_SOURCE, json.dumps(spec)],
                              stderr_path=os.path.join(rdir, "%s.log" % target["ns"][len(plan["prefix"]):]))
            processes[key] = {"ns": target["ns"], "pid": pid, "role": "listeners"}
        uid = netns.workload_uid() if os.geteuid() == 0 else None
        pid = netns.spawn(target["ns"], service_argv(python, target["address"], target["port"]),
                          files=service_files(database, tls=server), scratch=SERVICE_SCRATCH, uid=uid,
                          stdout_path=os.path.join(rdir, SERVICE_EVENTS), stderr_path=os.path.join(rdir, SERVICE_LOG))
        processes[SERVICE_KEY] = {"ns": target["ns"], "pid": pid, "role": "db", "port": target["port"],
                                  "events_sent": 0}
    except netns.NetnsError as exc:
        raise RestoreError("the db service could not be started in %s: %s" % (target["ns"], exc.msg)) from None
    finally:
        state["processes"] = processes
        runtime._write_state(output_dir, state)  # noqa: SLF001 - the runtime's own record of its processes
    wanted = {(x["protocol"], x["address"], x["port"]) for x in rest} | {taken}
    deadline = time.monotonic() + SERVICE_READY
    while True:
        missing = wanted - runtime._sockets(netns, target["ns"], python)  # noqa: SLF001
        if not missing:
            break
        if time.monotonic() > deadline or not runtime._alive(netns, target["ns"], pid):  # noqa: SLF001
            raise RestoreError("the db service on %s did not come up within %gs (%s not bound); see %s."
                               % (out["address_port"], SERVICE_READY,
                                  ", ".join("%s:%d/%s" % (a, p, proto) for proto, a, p in sorted(missing)),
                                  os.path.join(rdir, SERVICE_LOG)))
        time.sleep(0.05)
    return dict(out, changed=True, pid=pid, serial=phase.store.state()["leaves"][target["tier"]]["serial"])


def service_events(output_dir: str, type_: str = HANDSHAKE_TYPE) -> list:
    """The db service's events of ``type_`` (``None``: all) from its JSON lines file, in order."""
    out = []
    try:
        with open(os.path.join(output_dir, "runtime", SERVICE_EVENTS), encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    event = json.loads(line)
                    if type_ is None or event.get("type") == type_:
                        out.append(event)
    except FileNotFoundError:
        return []
    return out


def _service_serial(output_dir):
    """The serial the live service presents: that of its last successful (re)load."""
    loads = [e["data"] for e in service_events(output_dir, RELOAD_TYPE) if e["data"].get("ok")]
    return loads[-1]["serial"] if loads else None


def _push(pid: int, phase, tier: str) -> None:
    """Put the tier's delivered trust, then identity, into the live service's scratch (its own mount
    namespace, reached through ``/proc/<pid>/root``), each written under a fresh name and renamed,
    never through a link; then SIGHUP. Root only: rootless, the pid is nsenter's, not the service's."""
    import secrets  # noqa: PLC0415
    import signal  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    if os.geteuid() != 0:
        raise RestoreError("renewing the db service's leaf needs root (rootless, its pid is nsenter's); run the "
                           "drill as root or with a leaf_lifetime longer than the drill.")
    scratch = "/proc/%d/root%s" % (pid, SCRATCH_DIR)
    dfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(dfd)
        for name, source in ((TRUST_FILE, os.path.join(phase.tier_dir(tier), _pki.TRUST_FILE)),
                             (IDENTITY_FILE, phase.identity(tier))):
            with open(source, "rb") as handle:
                data = handle.read()
            tmp = ".%s.%s" % (name, secrets.token_hex(8))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400,
                         dir_fd=dfd)
            try:
                os.write(fd, data)
                os.fchown(fd, info.st_uid, info.st_gid)
                os.fchmod(fd, 0o400 if name == IDENTITY_FILE else 0o444)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)
    os.kill(pid, signal.SIGHUP)


def renew_db_service(boundary, drill_id: str, output_dir: str, *, python: str, ttl: int = 3600,
                     leaf_lifetime: int | None = None, wait: float = 10.0) -> dict:
    """Renew the drill's leaves past half-life and hand the db tier's current leaf to the live service.

    The service reloads (a ``drguard.tls.reload`` event with the new serial): new handshakes present
    it, connections opened before keep theirs. ``{"renewed", "serial", "previous", "actions"}``."""
    import time  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    netns, runtime = _netns(), _runtime()
    plan = runtime.full_plan(boundary, drill_id)
    state = runtime.read_state_file(output_dir) or {}
    entry = (state.get("processes") or {}).get(SERVICE_KEY) or {}
    if not runtime._alive(netns, entry.get("ns"), entry.get("pid")):  # noqa: SLF001
        raise RestoreError("the db service of drill %s is not running; start it (runtime_service)." % drill_id)
    target = db_target(boundary, plan)
    phase = _pki_phase(boundary, drill_id, output_dir, python, ttl, leaf_lifetime or _pki.DEFAULT_LEAF_LIFETIME)
    actions = _issue(phase, fresh=False)
    current = phase.store.state()["leaves"][target["tier"]]["serial"]
    previous = _service_serial(output_dir)
    if previous == current:
        return {"renewed": False, "serial": current, "previous": previous, "actions": actions}
    _push(entry["pid"], phase, target["tier"])
    deadline = time.monotonic() + wait
    while _service_serial(output_dir) != current:
        if time.monotonic() > deadline:
            raise RestoreError("the db service did not load its renewed leaf %s within %gs; see %s."
                               % (current, wait, os.path.join(output_dir, "runtime", SERVICE_EVENTS)))
        time.sleep(0.05)
    return {"renewed": True, "serial": current, "previous": previous, "actions": actions}


def next_renewal(drill_id: str, tier: str) -> float:
    """Seconds until ``tier``'s current leaf of the drill reaches half-life (0 when past it)."""
    import datetime  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    store = _pki.Store(drill_id, os.path.join(_mtls_drill.root_dir(drill_id), "pki"))
    due = _pki.renewal_time(store.leaf_cert(tier))
    return max(0.0, (due - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def keep_renewed(boundary, drill_id: str, output_dir: str, *, python: str, seconds: float, ttl: int = 3600,
                 leaf_lifetime: int | None = None, step: float = 1.0) -> dict:
    """The background renewer: renew the db service's leaf at each half-life for ``seconds``, or until the
    service or the drill's PKI is gone (teardown). ``{"renewals": [serial, ...], "stopped": why}``."""
    import time  # noqa: PLC0415
    netns, runtime = _netns(), _runtime()
    target = db_target(boundary, runtime.full_plan(boundary, drill_id))
    end, renewals = time.monotonic() + seconds, []
    while True:
        state = runtime.read_state_file(output_dir) or {}
        entry = (state.get("processes") or {}).get(SERVICE_KEY) or {}
        if not runtime._alive(netns, entry.get("ns"), entry.get("pid")):  # noqa: SLF001
            return {"renewals": renewals, "stopped": "service_gone"}
        if time.monotonic() >= end:
            return {"renewals": renewals, "stopped": "time"}
        try:
            due = next_renewal(drill_id, target["tier"])
        except (OSError, ValueError, KeyError):
            return {"renewals": renewals, "stopped": "pki_gone"}
        if due <= 0:
            got = renew_db_service(boundary, drill_id, output_dir, python=python, ttl=ttl, leaf_lifetime=leaf_lifetime)
            if got["renewed"]:
                renewals.append(got["serial"])
            continue
        time.sleep(min(step, due, max(0.0, end - time.monotonic())))


def flush_events(output_dir: str, telemetry: dict, *, drill_id: str, python: str, plan) -> dict:
    """Send the db service's events not sent yet to the drill's collector (from the control plane's
    namespace, as the mTLS phase sends its servers'); ``{"sent", "acknowledged"}`` or ``{"error", ...}``."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _pki  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry  # noqa: PLC0415
    runtime = _runtime()
    state = runtime.read_state_file(output_dir) or {}
    entry = (state.get("processes") or {}).get(SERVICE_KEY)
    events = service_events(output_dir, None)
    done = (entry or {}).get("events_sent", 0)
    fresh = events[done:]
    if not fresh:
        return {"sent": 0, "acknowledged": 0}
    cp = plan["world"]["neighbours"].get("control_plane")
    ns = cp["ns"] if cp else plan["tiers"][_pki.VALIDATION_TIER]["ns"]
    try:
        got = _telemetry.deliver(ns, fresh, telemetry["address"], int(telemetry["port"]), drill_id=drill_id,
                                 python=python)
    except _telemetry.TelemetryError as exc:
        return {"error": exc.msg, "sent": exc.detail.get("sent"), "acknowledged": exc.detail.get("acknowledged")}
    if entry is not None:
        entry["events_sent"] = done + len(fresh)
        runtime._write_state(output_dir, state)  # noqa: SLF001
    return got


def query_db(ns: str, address_port: str, sql: str, *, python: str, timeout: float = 5.0,
             tls: dict | None = None) -> dict:
    """One query to the db service from namespace ``ns`` (unprivileged, a uid of its own): the service's JSON
    answer (with the ``server_serial`` it presented), or ``{"ok": false, "error": "unreachable: ..." |
    "refused: <reason>" | "server refused: <reason>"}``. ``tls`` (:func:`client_tls`): the tier's identity;
    without it the client speaks plain TCP, which the service refuses."""
    host, port = address_port.rsplit(":", 1)
    netns = _netns()
    files = {PROGRAM: {"data": program(), "mode": 0o444}}
    if tls is not None:
        files.update(tls_files(tls))
    proc = netns.run_in(ns, [python, "-I", "-S", os.path.join(INSIDE_DIR, PROGRAM), "query", host, port,
                             str(timeout)], input_text=sql, timeout=timeout + 15, files=files,
                        uid=netns.workload_uid() if os.geteuid() == 0 else None)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": "no answer (%s)" % proc.stderr.strip()[:200]}


def program() -> str:
    """This module's own source: the program a workload runs (it imports nothing but the standard library)."""
    module = sys.modules[__name__]
    loader = getattr(module, "__loader__", None)
    source = loader.get_source(__name__) if loader is not None and hasattr(loader, "get_source") else None
    if not source:  # the file, or the zip Ansible ships modules in, answers through its loader above
        import inspect  # noqa: PLC0415 - only the controller needs it
        source = inspect.getsource(module)
    return source


if __name__ == "__main__":
    # Run as a program inside the sandbox (not as an Ansible module): its exit code is the result.
    sys.exit(main(sys.argv[1:]))  # pylint: disable=ansible-bad-function
