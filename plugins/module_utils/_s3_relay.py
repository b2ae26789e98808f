# Copyright: drguard maintainers
# Apache License 2.0
"""The S3 endpoint relay of the ``netns`` runtime: the embedded stand-in for the VPC's S3 gateway endpoint.

The world's S3 endpoint namespace holds one address (``_nft_policy.s3_endpoint``); the tiers reach
it on TCP 443 only when ``drill_boundary`` grants S3, by the router's ``s3_allow`` rule. Behind it,
connections must reach the drill's S3 endpoint (the emulator on the host's loopback, or the region's
S3), which no namespace can reach. :func:`start`:

1. a short-lived helper, run unprivileged inside the endpoint namespace (``_netns.workload_command``),
   binds and listens on the endpoint's address and port, and hands the listening socket over an
   inherited socket pair (``SCM_RIGHTS``), then exits;
2. the relay, a process of its own on the controller's side (root mode: under a fresh uid, no
   capabilities), accepts on that socket -- which stays in the endpoint namespace, so only what the
   router lets in reaches it -- and forwards each connection's bytes to one ``host:port`` fixed on
   its command line, never anywhere else.

No file system path is involved (nothing a workload could connect to). Its command line carries
:data:`MARKER` and the drill's prefix, so teardown and the reaper find it by name as well as by the
pid the runtime's state records (:func:`find`, :func:`stop`).

The client side runs inside the validation tier: this file imports nothing but the standard
library, and run as a program (``python -I -S s3_relay.py get``) it reads S3 objects through the
endpoint with the drill's session, signing each request itself (:func:`sign_get`, SigV4), and
writes them framed to stdout for ``_restore.restore_inside`` (:func:`get_main`).
"""

from __future__ import annotations

import array
import datetime
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from urllib.parse import quote
from urllib.parse import urlsplit

MARKER = "drguard-s3-relay"
MAX_CLIENTS = 32
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0

# The helper inside the endpoint namespace: bind, listen, hand the socket over fd argv[1], exit.
BIND_SOURCE = r"""
import socket, sys
fd, address, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((address, port))
s.listen(64)
chan = socket.socket(fileno=fd)
socket.send_fds(chan, [b"L"], [s.fileno()])
"""

# The relay: argv = MARKER, prefix, target host, target port, listening fd. Forwards bytes only.
RELAY_SOURCE = r"""
import selectors, socket, sys, threading
_marker, _prefix, host, port, fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
listener = socket.socket(fileno=fd)
slots = threading.BoundedSemaphore(%(clients)d)

def pump(client):
    try:
        upstream = socket.create_connection((host, port), timeout=%(connect)r)
    except OSError as exc:
        sys.stderr.write("cannot reach %%s:%%d (%%s)\n" %% (host, port, exc))
        client.close()
        slots.release()
        return
    sel = selectors.DefaultSelector()
    peer = {client: upstream, upstream: client}
    for s in peer:
        s.settimeout(%(idle)r)
        sel.register(s, selectors.EVENT_READ)
    open_ends = 2
    try:
        while open_ends:
            events = sel.select(%(idle)r)
            if not events:
                break
            for key, _ in events:
                src = key.fileobj
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(src)
                    open_ends -= 1
                    try:
                        peer[src].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                try:
                    peer[src].sendall(data)
                except OSError:
                    open_ends = 0
                    break
    finally:
        sel.close()
        client.close()
        upstream.close()
        slots.release()

sys.stderr.write("relaying to %%s:%%d\n" %% (host, port))
sys.stderr.flush()
while True:
    try:
        conn, _peer = listener.accept()
    except OSError:
        continue
    if not slots.acquire(blocking=False):
        conn.close()
        continue
    threading.Thread(target=pump, args=(conn,), daemon=True).start()
""" % {"clients": MAX_CLIENTS, "connect": CONNECT_TIMEOUT, "idle": IDLE_TIMEOUT}


class RelayError(Exception):
    """The relay cannot be planned or started; ``msg`` says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


def target(endpoint_url=None, region=None) -> dict:
    """Where the relay forwards and what the inside client must say: ``{"host", "port", "scheme", "netloc"}``.

    ``endpoint_url`` (the drill's ``drill_aws_endpoint_url``, the emulator) or, without it, the
    region's S3 endpoint ``https://s3.<region>.amazonaws.com``. ``netloc`` is the Host header
    (and, over https, the name the certificate is checked against) the inside client sends
    through the relay: the relay forwards bytes, never terminates TLS.
    """
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.username or parts.password:
            raise RelayError(f"endpoint_url {endpoint_url!r} is not a plain http(s)://host[:port] URL; pass the "
                             "drill's S3 endpoint as such.", field="endpoint_url")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RelayError(f"endpoint_url {endpoint_url!r} has an invalid port; fix drill_aws_endpoint_url.",
                             field="endpoint_url") from None
        return {"host": parts.hostname, "port": port, "scheme": parts.scheme, "netloc": parts.netloc}
    if not isinstance(region, str) or not region or not all(c.isalnum() or c == "-" for c in region):
        raise RelayError("neither an endpoint_url nor a valid region is given, so the S3 endpoint has nowhere to "
                         "relay to; pass the drill's region (drill_region).", field="region")
    host = f"s3.{region}.amazonaws.com"
    return {"host": host, "port": 443, "scheme": "https", "netloc": host}


def _cmdline(pid):
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")
    except (OSError, ValueError):
        return []


def is_relay(pid, prefix) -> bool:
    """True when ``pid`` is a live relay of the drill with ``prefix`` (marker and prefix on its command line)."""
    argv = _cmdline(pid)
    try:
        at = argv.index(MARKER.encode())
    except ValueError:
        return False
    return len(argv) > at + 1 and argv[at + 1] == prefix.encode() and _running(pid)


def _running(pid):
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def find(prefix) -> list:
    """Pids of every live relay of ``prefix`` on this host, found by name (the reaper's way)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_relay(int(entry), prefix):
            out.append(int(entry))
    return sorted(out)


def stop(prefix, pids=(), wait=5.0) -> list:
    """SIGKILL every relay of ``prefix`` (the recorded ``pids`` and any found by name); returns the pids killed."""
    victims = sorted({int(p) for p in pids if isinstance(p, int) and is_relay(p, prefix)} | set(find(prefix)))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    for pid in victims:
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)  # our own child: collect it
            except ChildProcessError:
                done = pid if not _running(pid) else 0
            if done == pid:
                break
            time.sleep(0.01)
    left = [p for p in victims if _running(p)]
    if left:
        raise RelayError(f"the S3 endpoint relay {left} of {prefix} did not exit after SIGKILL within {wait:g}s; "
                         "check it and run teardown again.", pids=left)
    return victims


def _listening_socket(netns, ns, endpoint, python, timeout=10.0):
    """A socket listening on ``address:port`` inside ``ns``, made there by an unprivileged helper."""
    address, port = endpoint
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        full, env, spec_fd = netns.workload_command(
            ns, [python, "-I", "-S", "-c", BIND_SOURCE, str(theirs.fileno()), address, str(port)])
        proc = subprocess.Popen(full, env=env, cwd="/", start_new_session=True, close_fds=True,
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        theirs.close()
        mine.settimeout(timeout)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(mine, 1, 1)
        except OSError:  # a timeout included
            fds = []
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _out, err = proc.communicate()
        if not fds:
            why = (err or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise RelayError(f"the S3 endpoint cannot listen on {address}:{port} in namespace {ns} ({why[0][:200]}); "
                             "check the runtime and retry.", namespace=ns)
        return fds[0]
    finally:
        mine.close()
        if theirs.fileno() != -1:
            theirs.close()


def start(netns, endpoint, to, prefix, *, log_path, python, uid=None) -> int:
    """Start the relay of ``prefix`` for ``endpoint`` (``{"ns", "address", "port"}``, the world's S3 endpoint)
    towards ``to`` (:func:`target`); its stderr goes to ``log_path`` (0600, no symlink followed).

    ``uid`` (root mode): the uid the relay runs under (``_netns.workload_uid()``); its
    capabilities go with root. Returns the relay's pid once it has written its first line.
    """
    listen_fd = _listening_socket(netns, endpoint["ns"], (endpoint["address"], endpoint["port"]), python)
    fds = array.array("i", [listen_fd])
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        os.close(listen_fd)
        raise
    try:
        argv = [python, "-I", "-S", "-c", RELAY_SOURCE, MARKER, prefix, to["host"], str(to["port"]), str(fds[0])]
        if uid is not None:  # as the namespace manager drops a workload: own uid, no capability, no_new_privs
            setpriv = netns.which("setpriv")
            if setpriv is None:
                raise RelayError("setpriv not found on PATH, so the S3 endpoint relay cannot run unprivileged; "
                                 "install util-linux (setpriv) and retry.")
            argv = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                    "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv]
        proc = subprocess.Popen(argv, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
                                start_new_session=True, close_fds=True, pass_fds=(listen_fd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    finally:
        os.close(listen_fd)
        os.close(log)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RelayError(f"the S3 endpoint relay exited at once (exit {proc.returncode}); see {log_path}.")
        if os.path.getsize(log_path) > 0:
            return proc.pid
        time.sleep(0.02)
    return proc.pid


# ---------------------------------------------------------------- the client inside the validation tier

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CHUNK = 1024 * 1024
REQUEST = "request.json"  # {"artifacts": [{"bucket", "key", "version_id", "size"}], "connect", "scheme", "netloc",
#                           "region"} in the workload's read-only directory
SESSION = "session.json"  # the drill's session (AWS_ACCESS_KEY_ID, ...), 0400 on the workload's tmpfs


def object_path(bucket, key):
    """The path-style request path of ``bucket``/``key`` (S3 encodes each byte once, keeps ``/``)."""
    return "/%s/%s" % (quote(bucket, safe=""), quote(key, safe="/~"))


def sign_get(*, netloc, path, query, region, session, now=None):
    """The headers of a SigV4-signed S3 ``GET`` of ``path`` with ``query`` (a dict), ``Host: netloc``.

    ``session``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optionally ``AWS_SESSION_TOKEN``.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {"host": netloc, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    if session.get("AWS_SESSION_TOKEN"):
        headers["x-amz-security-token"] = session["AWS_SESSION_TOKEN"]
    signed = ";".join(sorted(headers))
    canonical_query = "&".join("%s=%s" % (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
                               for k, v in sorted(query.items()))
    canonical = "\n".join(["GET", path, canonical_query] + ["%s:%s" % (k, headers[k].strip()) for k in sorted(headers)]
                          + ["", signed, EMPTY_SHA256])
    scope = "%s/%s/s3/aws4_request" % (day, region)
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + session["AWS_SECRET_ACCESS_KEY"]).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        session["AWS_ACCESS_KEY_ID"], scope, signed, signature)
    return headers


def _open(request, item, session):
    """The response to a GET of ``item`` through the endpoint (TLS to the real name when https)."""
    sock = socket.create_connection(tuple(request["connect"]), timeout=CONNECT_TIMEOUT)
    sock.settimeout(60)
    host = request["netloc"].rsplit(":", 1)[0] if not request["netloc"].startswith("[") else request["netloc"]
    if request["scheme"] == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    conn = http.client.HTTPConnection(request["netloc"], timeout=60)
    conn.sock = sock
    path = object_path(item["bucket"], item["key"])
    query = {"versionId": item["version_id"]} if item.get("version_id") else {}
    headers = sign_get(netloc=request["netloc"], path=path, query=query, region=request["region"], session=session)
    target = path + ("?versionId=" + quote(item["version_id"], safe="-_.~") if query else "")
    conn.request("GET", target, headers=headers)  # its own "host": http.client adds no second one
    return conn, conn.getresponse()


def _error_code(body):
    text = body.decode("utf-8", "replace")
    if "<Code>" in text and "</Code>" in text:
        return text.split("<Code>", 1)[1].split("</Code>", 1)[0][:80]
    return "no error code"


def get_main(out=None):
    """Inside the validation tier: GET every requested object, write ``{"index", "ok"}`` + exactly its bytes
    (or ``{"index", "error"}`` and stop) to stdout; the controller checks size and SHA-256 again."""
    out = out or sys.stdout.buffer
    with open(REQUEST, encoding="utf-8") as handle:
        request = json.load(handle)
    with open(SESSION, encoding="utf-8") as handle:
        session = json.load(handle)
    for index, item in enumerate(request["artifacts"]):
        try:
            conn, resp = _open(request, item, session)
        except (OSError, http.client.HTTPException) as exc:
            out.write(json.dumps({"index": index, "error": "S3 endpoint %s:%d not reachable (%s)" % (
                request["connect"][0], request["connect"][1], exc)}).encode() + b"\n")
            return 1
        if resp.status != 200:
            out.write(json.dumps({"index": index, "error": "S3 answered %d %s" % (
                resp.status, _error_code(resp.read(4096)))}).encode() + b"\n")
            return 1
        length = resp.getheader("Content-Length")
        if length is None or not length.isdigit() or int(length) != int(item["size"]):
            out.write(json.dumps({"index": index, "error": "S3 announced %s bytes, %d were verified" % (
                length, int(item["size"]))}).encode() + b"\n")
            return 1
        out.write(json.dumps({"index": index, "ok": True}).encode() + b"\n")
        left = int(item["size"])
        while left:
            chunk = resp.read(min(CHUNK, left))
            if not chunk:
                return 1  # the controller sees the short read
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        conn.close()
    out.write(json.dumps({"done": True}).encode() + b"\n")
    out.flush()
    return 0


def program() -> str:
    """This file's own source: what the validation tier runs (standard library only)."""
    module = sys.modules[__name__]
    loader = getattr(module, "__loader__", None)
    source = loader.get_source(__name__) if loader is not None and hasattr(loader, "get_source") else None
    if not source:
        import inspect  # noqa: PLC0415 - only the controller needs it
        source = inspect.getsource(module)
    return source


if __name__ == "__main__":
    # Run as a program inside the validation tier (not as an Ansible module): its exit code is the result.
    if sys.argv[1:] != ["get"]:
        sys.stderr.write("usage: s3_relay.py get\n")
        sys.exit(2)  # pylint: disable=ansible-bad-function
    sys.exit(get_main())  # pylint: disable=ansible-bad-function
