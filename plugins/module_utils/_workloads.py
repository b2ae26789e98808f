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
  ``mode=ro&immutable=1``, one SQL ``SELECT`` per line over TCP, JSON rows back; anything but a
  single read-only ``SELECT`` is refused (docs/runtime.md, "Restore and validation inside").
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


def _client(conn, path, slots):
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
        slots.release()


def serve_db(path: str, address: str, port: int) -> None:
    """Serve ``path`` read-only on ``address:port`` (TCP, one query per line) until killed."""
    open_readonly(path).execute("SELECT count(*) FROM sqlite_master").fetchone()  # a database, or fail now
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(64)
    sys.stderr.write("db service on %s:%d\n" % (address, port))
    sys.stderr.flush()
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    while True:
        conn, _peer = server.accept()
        if not slots.acquire(blocking=False):
            conn.sendall(b'{"ok": false, "error": "busy"}\n')
            conn.close()
            continue
        threading.Thread(target=_client, args=(conn, path, slots), daemon=True).start()


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
    sys.stderr.write("usage: validate | serve-db <file> <address> <port>\n")
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


def service_files(path: str, database: str = "db.sqlite") -> dict:
    """The db service's files: this program and the restored database (read-only copies)."""
    return {PROGRAM: {"data": program(), "mode": 0o444}, database: {"source": os.path.abspath(path), "mode": 0o400}}


SERVICE_KEY = "service:db"  # the db service's entry in the runtime's state.json processes
SERVICE_LOG = "db-service.log"  # <output_dir>/runtime/db-service.log: the service's stderr
SERVICE_READY = 10.0


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


def start_db_service(boundary, drill_id: str, output_dir: str, database: str, *, python: str, tier=None,
                     port=None) -> dict:
    """Serve the restored ``database`` read-only in the db tier on the tier rule's port.

    The runtime's plain listener already holds that port, so the service replaces it: the tier's
    listener process is restarted without that one port, and the service (a uid of its own, no
    capabilities, the database a read-only copy on its tmpfs) takes the port; both must be bound
    within 10 s. ``state.json`` records the new pids, so teardown and the reaper find them.
    Idempotent: a service already alive is kept. ``{"changed", "tier", "client_tier", "address",
    "port", "pid", "address_port"}``.
    """
    import time  # noqa: PLC0415
    netns, runtime = _netns(), _runtime()
    plan = runtime.full_plan(boundary, drill_id)
    state = runtime.read_state_file(output_dir)
    if not state or state.get("prefix") != plan["prefix"] or state.get("state") != "present":
        raise RestoreError("the runtime of drill %s is not present under %s; start it first (sandbox_runtime)."
                           % (drill_id, output_dir))
    target = db_target(boundary, plan, tier, port)
    out = dict(target, address_port="%s:%d" % (target["address"], target["port"]))
    out.pop("ns")
    processes = state.get("processes") or {}
    old = processes.get(SERVICE_KEY) or {}
    if runtime._alive(netns, target["ns"], old.get("pid")):  # noqa: SLF001
        return dict(out, changed=False, pid=old["pid"])
    if not _openable(database):
        raise RestoreError("the database %s is not a regular file; pass the restored SQLite file." % database)
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
                          files=service_files(database), uid=uid, stderr_path=os.path.join(rdir, SERVICE_LOG))
        processes[SERVICE_KEY] = {"ns": target["ns"], "pid": pid, "role": "db", "port": target["port"]}
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
    return dict(out, changed=True, pid=pid)


def query_db(ns: str, address_port: str, sql: str, *, python: str, timeout: float = 5.0) -> dict:
    """One query to the db service from namespace ``ns`` (unprivileged): the service's JSON answer, or
    ``{"ok": false, "error": "unreachable: ..."}`` when no connection was made."""
    host, port = address_port.rsplit(":", 1)
    code = ("import json, socket, sys\n"
            "try:\n"
            "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
            "    c.sendall(sys.stdin.read().encode() + b'\\n')\n"
            "    print(c.makefile('rb').readline().decode().strip())\n"
            "except OSError as exc:\n"
            "    print(json.dumps({'ok': False, 'error': 'unreachable: %s' % (exc.strerror or exc)}))\n")
    proc = _netns().run_in(ns, [python, "-I", "-S", "-c", code, host, port, str(timeout)], input_text=sql,
                           timeout=timeout + 15)
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
