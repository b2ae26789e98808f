# Copyright: drguard maintainers
# Apache License 2.0
"""Restore verified artifacts and prove them usable (private backend of restore_artifacts, validate_restore).

* :func:`restore` - copy what ``verify_artifacts`` verified into a private directory,
  hashing every byte again while it is written (S3 objects by their pinned version).
* :func:`validate` - open each restored artifact by its content (docs/validation.md); the
  validators live in ``_workloads`` (standard library only, so they also run inside the
  sandbox) and are importable from here.

Both raise only :class:`RestoreError` (whose message is the task's), except botocore
errors that are not an S3 answer about one object.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

try:
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    ClientError = None

from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_chunks
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3
# The validators run inside the sandbox too, so they live in the standard-library-only _workloads;
# their names stay importable from here.
# pylint: disable=unused-import
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import COMPRESSIONS  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_MEMBERS  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_RATIO  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import DEFAULT_MAX_TOTAL_BYTES  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import Caps  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import Validation  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_sqlite  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_stream  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import check_tar  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import sniff  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import sqlite_uri  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate  # noqa: F401
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate_one  # noqa: F401
# pylint: enable=unused-import

RESTORED_MODE = 0o400


# --------------------------------------------------------------------------- restore
def safe_relative(name: str) -> str:
    """The artifact name as a relative path that cannot leave the restore directory."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    return os.path.join(*parts)


def _chunks(s3, source, version_id, size):
    """Chunks of the artifact, at most one byte past the verified size (never a full endless read)."""
    if is_s3(source):
        loc = parse_s3(source, "source")
        try:
            _resp, chunks = art.s3_get_chunks(s3, loc.bucket, loc.key, version_id or loc.version_id, size)
        except ClientError as exc:
            raise RestoreError("%s: %s" % (source, error_code(exc) or exc)) from None
        yield from chunks
        return
    with open(source, "rb") as handle:
        yield from art.file_chunks(handle, size)


def _checked_entry(entry: dict) -> tuple:
    """``(relative path, sha256, size, source)`` of a verified entry, or :class:`RestoreError`."""
    name = entry.get("name")
    if not entry.get("verified"):
        raise RestoreError("artifact %r was not verified; refusing to restore it" % (name,))
    rel = safe_relative(name)
    want_sha, want_size = entry.get("sha256"), entry.get("size")
    source = entry.get("source")
    if not want_sha or want_size is None or not source:
        raise RestoreError("artifact %r lacks sha256, size or source" % (name,))
    return rel, want_sha, int(want_size), source


def restore_one(s3, entry: dict, dest: str, chunks=None) -> dict:
    """Restore one verified entry under ``dest``; the bytes must match its sha256 and size exactly.

    ``chunks`` (an iterable of bytes) is where the bytes come from instead of the entry's source
    (the restore inside the validation tier hands them over); they are checked all the same.
    """
    name = entry.get("name")
    rel, want_sha, want_size, source = _checked_entry(entry)
    target = os.path.join(dest, rel)
    ensure_private_dir(os.path.dirname(target), parents=True)
    want = want_size

    def checked(chunks):
        digest, seen = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            seen += len(chunk)
            if seen > want:
                raise RestoreError("%s: longer than the verified %d bytes" % (name, want))
            yield chunk
        if seen != want or digest.hexdigest() != want_sha:
            raise RestoreError("%s: restored bytes differ from what was verified (size %d, sha256 %s)"
                               % (name, seen, digest.hexdigest()))

    # A raise inside checked() removes the temporary file: nothing unverified is left behind.
    if chunks is None:
        chunks = _chunks(s3, source, entry.get("version_id"), want)
    written = atomic_write_chunks(target, checked(chunks), RESTORED_MODE)
    out = {"name": name, "path": target, "sha256": want_sha, "size": written}
    # What the signed manifest declares about the artifact travels on to validate_restore.
    for key in ("kind", "expect"):
        if entry.get(key) is not None:
            out[key] = entry[key]
    return out


def restore(artifacts: list, dest: str, *, client, workers: int = 4, check_mode: bool = False) -> dict:
    """Restore every entry of ``artifacts`` under ``dest`` in parallel: ``{changed, restored, bytes_restored}``.

    ``client("s3")`` gives a retrying S3 client; it is only called when a source is in S3.
    In check mode only the restore directory is judged.
    """
    if workers < 1:
        raise RestoreError("workers must be at least 1")
    if not artifacts:
        raise RestoreError("artifacts is empty: nothing was verified, so nothing can be restored")
    try:
        if check_mode:
            check_private_dir(dest)
            return {"changed": True, "restored": [], "bytes_restored": 0}
        ensure_private_dir(dest, parents=True)
    except OSError as exc:
        raise RestoreError("Cannot use the restore directory: %s" % exc) from None
    need_s3 = any(is_s3(str(a.get("source", ""))) for a in artifacts)
    s3 = client("s3") if need_s3 else None
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            restored = list(pool.map(lambda e: restore_one(s3, e, dest), artifacts))
    except (RestoreError, LocationError, OSError) as exc:
        raise RestoreError("Restore failed: %s" % exc) from None
    return {"changed": True, "restored": restored, "bytes_restored": sum(r["size"] for r in restored)}


# --------------------------------------------------------------------------- restore inside the validation tier
INSIDE_TIMEOUT = 3600.0  # seconds the whole restore inside may take
INSIDE_PROGRAM = "s3_relay.py"
_HEADER_MAX = 4096


def _inside_request(remote, endpoint, to, region):
    items = []
    for entry in remote:
        loc = parse_s3(entry["source"], "source")
        items.append({"bucket": loc.bucket, "key": loc.key, "version_id": entry.get("version_id") or loc.version_id,
                      "size": int(entry["size"])})
    return {"artifacts": items, "connect": [endpoint[0], int(endpoint[1])], "scheme": to["scheme"],
            "netloc": to["netloc"], "region": region}


def _frames(stream, remote, ns):
    """``(entry, chunks)`` for each remote entry as the workload hands it over (header line, then its bytes)."""
    for index, entry in enumerate(remote):
        line = stream.readline(_HEADER_MAX)
        try:
            header = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("index") != index:
            raise RestoreError("the restore inside %s stopped before %s (no answer for it)" % (ns, entry["name"]))
        if not header.get("ok"):
            raise RestoreError("the restore inside %s could not read %s: %s"
                               % (ns, entry["name"], str(header.get("error"))[:300]))

        def chunks(left=int(entry["size"]), name=entry["name"]):
            while left:
                chunk = stream.read(min(1024 * 1024, left))
                if not chunk:
                    raise RestoreError("%s: the restore inside %s ended after fewer than the verified bytes"
                                       % (name, ns))
                left -= len(chunk)
                yield chunk
        yield entry, chunks()


def restore_inside(artifacts: list, dest: str, *, ns: str, endpoint: tuple, to: dict, region: str,
                   session: dict, python: str, timeout: float = INSIDE_TIMEOUT, check_mode: bool = False) -> dict:
    """:func:`restore`, with the S3 reads made inside namespace ``ns`` (the validation tier), unprivileged.

    The workload (a uid of its own, no capabilities, empty environment) gets ``_s3_relay``'s
    standard-library client, the request and the drill's ``session`` (0400, on its private tmpfs,
    never on argv or a disk), connects to the runtime's S3 endpoint ``endpoint`` (``(address, port)``)
    and signs for ``to["netloc"]`` (``_s3_relay.target``: the drill's S3 endpoint, reached through
    the relay; TLS to its real name over https). It hands each object's bytes back on stdout; here
    they are checked against the verified size and SHA-256 while they are written to ``dest``
    exactly as :func:`restore` writes them. Local (non-S3) sources are restored here, on the
    controller, from the read-only mount. ``{changed, restored, bytes_restored, inside}``.
    """
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415 - root-only helpers
    from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_relay  # noqa: PLC0415
    if not artifacts:
        raise RestoreError("artifacts is empty: nothing was verified, so nothing can be restored")
    for entry in artifacts:
        _checked_entry(entry)
    if not session or not session.get("AWS_ACCESS_KEY_ID") or not session.get("AWS_SECRET_ACCESS_KEY"):
        raise RestoreError("the restore inside %s needs the drill's session as explicit access_key, secret_key and "
                           "session_token; pass the drill's minted session (never the controller's own)" % ns)
    try:
        if check_mode:
            check_private_dir(dest)
            return {"changed": True, "restored": [], "bytes_restored": 0, "inside": ns}
        ensure_private_dir(dest, parents=True)
    except OSError as exc:
        raise RestoreError("Cannot use the restore directory: %s" % exc) from None
    remote = [e for e in artifacts if is_s3(str(e.get("source", "")))]
    done = {}
    try:
        for entry in artifacts:
            if not is_s3(str(entry.get("source", ""))):
                done[id(entry)] = restore_one(None, entry, dest)
        if remote:
            request = _inside_request(remote, endpoint, to, region)
            files = {INSIDE_PROGRAM: {"data": _s3_relay.program(), "mode": 0o444},
                     _s3_relay.REQUEST: {"data": json.dumps(request), "mode": 0o444},
                     _s3_relay.SESSION: {"data": json.dumps({k: v for k, v in session.items() if v}), "mode": 0o400}}
            inside = _run_inside(_netns, ns, python, files=files, remote=remote, dest=dest, timeout=timeout)
            for entry, item in inside:
                done[id(entry)] = item
    except (RestoreError, LocationError, OSError) as exc:
        raise RestoreError("Restore failed: %s" % exc) from None
    restored = [done[id(e)] for e in artifacts]
    return {"changed": True, "restored": restored, "bytes_restored": sum(r["size"] for r in restored), "inside": ns}


def _run_inside(netns, ns, python, *, files, remote, dest, timeout):
    """Run the inside client and yield ``(entry, restored item)`` as each object is written and checked."""
    try:
        full, env, spec_fd = netns.workload_command(
            ns, [python, "-I", "-S", os.path.join(netns.WORKLOAD_IN, INSIDE_PROGRAM), "get"], files=files,
            uid=netns.workload_uid() if os.geteuid() == 0 else None,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    except netns.NetnsError as exc:
        raise RestoreError("the restore inside %s could not run: %s" % (ns, exc.msg)) from None
    try:
        proc = subprocess.Popen(full, env=env, cwd="/", start_new_session=True, close_fds=True,
                                pass_fds=() if spec_fd is None else (spec_fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        if spec_fd is not None:
            os.close(spec_fd)
    errors = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read(64 * 1024)), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, _kill_group, (proc.pid,))
    timer.start()
    try:
        try:
            for entry, chunks in _frames(proc.stdout, remote, ns):
                yield entry, restore_one(None, entry, dest, chunks)
            last = proc.stdout.readline(_HEADER_MAX)
            if last.strip() != b'{"done": true}' or proc.wait(timeout=30) != 0:
                raise RestoreError("the restore inside %s did not finish cleanly (exit %s)" % (ns, proc.poll()))
        except RestoreError as exc:
            why = _stderr_tail(errors, reader)
            raise RestoreError("%s%s" % (exc, (" (%s)" % why) if why else "")) from None
        except subprocess.TimeoutExpired:
            raise RestoreError("the restore inside %s did not exit after handing over every artifact" % ns) from None
    finally:
        timer.cancel()
        _kill_group(proc.pid)
        proc.wait()
        proc.stdout.close()
        reader.join(2)
        proc.stderr.close()


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stderr_tail(errors, reader):
    """The workload's last stderr line (it carries no secret: the client prints none), once it has ended."""
    reader.join(2)
    text = b"".join(errors).decode("utf-8", "replace").strip()
    return text.splitlines()[-1][:300] if text else ""
