#!/usr/bin/env python3
"""Embedded AWS emulator (moto in server mode) on 127.0.0.1, on a free port.

The only place in the repository that starts or stops the emulator. Everything else
(make, pytest fixtures, Molecule create/destroy) goes through this file, so no
process is ever left running:

* ``run -- CMD...``   start, run CMD with the emulator's environment, stop. The
                      emulator dies with this process even on SIGKILL (PDEATHSIG).
* ``start --state F`` start detached (Molecule create); writes pid/port/env to F.
                      A detached emulator stops itself after ``--ttl`` seconds.
* ``stop --state F``  stop what ``start`` started (Molecule destroy). Idempotent.
* ``env --state F``   print ``export`` lines for a started emulator.
* ``serve``           the server process itself (internal).

Python callers use :class:`Emulator` (a context manager).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL us when our parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def emulator_env(url: str, region: str = DEFAULT_REGION) -> dict[str, str]:
    """The environment that points boto3, amazon.aws and our modules at ``url``."""
    return {
        # boto3 >= 1.28 reads AWS_ENDPOINT_URL; amazon.aws' endpoint_url reads AWS_URL.
        "AWS_ENDPOINT_URL": url,
        "AWS_URL": url,
        "DRGUARD_EMULATOR_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
    }


# Variables that would send a child somewhere other than the emulator.
_SCRUB = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
          "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN",
          "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
          "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def child_env(url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in _SCRUB:
        env.pop(key, None)
    env.update(emulator_env(url, env.get("DRGUARD_EMULATOR_REGION", DEFAULT_REGION)))
    # No instance-metadata probing: there is no EC2 here, and it costs seconds.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


class Emulator:
    """A moto server process on 127.0.0.1 on a free port.

    ``die_with_parent`` (default) makes the kernel kill the server if this Python
    process dies, however it dies.
    """

    def __init__(self, die_with_parent: bool = True, ttl: float | None = None,
                 extra_env: dict[str, str] | None = None):
        self.die_with_parent = die_with_parent
        self.ttl = ttl
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("emulator not started")
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return emulator_env(self.url)

    def client(self, service: str, key: str | None = None, secret: str | None = None, token: str | None = None,
               region: str = DEFAULT_REGION, *, config=None):
        """A boto3 client on this emulator (the fake root keys unless ``key``/``secret`` are given)."""
        import boto3  # only callers that want a client pay for the import

        fake = emulator_env(self.url)
        return boto3.client(service, region_name=region, endpoint_url=self.url,
                            aws_access_key_id=key or fake["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=secret or fake["AWS_SECRET_ACCESS_KEY"], aws_session_token=token,
                            config=config)

    def start(self, timeout: float = 60.0) -> Emulator:
        fd, port_file = tempfile.mkstemp(prefix="drguard-emulator-", suffix=".port")
        os.close(fd)
        os.unlink(port_file)
        cmd = [sys.executable, os.path.abspath(__file__), "serve", "--port-file", port_file]
        if self.ttl:
            cmd += ["--ttl", str(self.ttl)]
        env = dict(os.environ)
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
            start_new_session=not self.die_with_parent,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"emulator exited early with code {self.proc.returncode}")
                with contextlib.suppress(FileNotFoundError, ValueError):
                    self.port = int(Path(port_file).read_text().strip())
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("emulator did not start within %ss" % timeout)
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(port_file)
        return self

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=2):
                return
            time.sleep(0.05)
        raise RuntimeError("emulator did not answer")

    def reset(self) -> None:
        """Forget every resource (moto's own reset API)."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def enforce_iam(self, after_actions: int = 0) -> None:
        """Turn IAM enforcement on after ``after_actions`` more unauthenticated calls."""
        req = urllib.request.Request(
            self.url + "/moto-api/reset-auth", method="POST",
            data=str(after_actions).encode(), headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10):
            pass

    def relax_iam(self) -> None:
        """Turn IAM enforcement back off (for all practical purposes)."""
        self.enforce_iam(10**9)

    def calls(self, reset: bool = False) -> dict:
        """AWS API calls the emulator has served: ``{"total": N, "by_service": {...}}``."""
        req = urllib.request.Request(self.url + "/__drguard/calls", method="DELETE" if reset else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _CallCounter:
    """WSGI middleware: counts AWS API calls per service (for bench/, not for tests).

    ``GET /__drguard/calls`` returns ``{"total": N, "by_service": {...}}``;
    ``DELETE`` resets the counters. The service is read from the SigV4 credential scope.
    """

    def __init__(self, app):
        import collections
        import threading

        self.app = app
        self.calls = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/__drguard/calls":
            with self.lock:
                if environ.get("REQUEST_METHOD") == "DELETE":
                    self.calls.clear()
                body = json.dumps({"total": sum(self.calls.values()), "by_service": dict(self.calls)}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if not path.startswith("/moto-api"):
            auth = environ.get("HTTP_AUTHORIZATION", "")
            scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/") if "Credential=" in auth else []
            service = scope[3] if len(scope) > 3 else "unsigned"
            with self.lock:
                self.calls[service] += 1
        return self.app(environ, start_response)


def _serve(args: argparse.Namespace) -> int:
    import threading

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _CallCounter(DomainDispatcherApplication(create_backend_app))
    server = make_server(HOST, 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    tmp = args.port_file + ".tmp"
    Path(tmp).write_text(str(port))
    os.replace(tmp, args.port_file)

    stopping = []
    def _stop(*_):
        stopping.append(True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deadline = time.monotonic() + args.ttl if args.ttl else None
    while not stopping:
        if deadline and time.monotonic() > deadline:
            break
        time.sleep(0.2)
    server.shutdown()
    return 0


def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        print("emulator.py run: nothing to run (usage: run -- CMD ...)", file=sys.stderr)
        return 2
    with Emulator() as emu:
        child = subprocess.Popen(cmd, env=child_env(emu.url))

        def _forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        signal.signal(signal.SIGTERM, _forward)
        signal.signal(signal.SIGINT, _forward)
        return child.wait()


def _start(args: argparse.Namespace) -> int:
    state = Path(args.state)
    if state.exists():
        _stop(args)
    emu = Emulator(die_with_parent=False, ttl=args.ttl).start()
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"pid": emu.proc.pid, "port": emu.port, "url": emu.url,
                                 "env": emu.env}))
    print(emu.url)
    return 0


def _stop(args: argparse.Namespace) -> int:
    state = Path(args.state)
    if not state.exists():
        return 0
    data = json.loads(state.read_text())
    pid = int(data["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    state.unlink()
    return 0


def _env(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.state).read_text())
    for key, value in data["env"].items():
        print(f"export {key}={value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--port-file", required=True)
    p.add_argument("--ttl", type=float, default=None)
    p = sub.add_parser("run")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    for name in ("start", "stop", "env"):
        p = sub.add_parser(name)
        p.add_argument("--state", required=True)
        if name == "start":
            p.add_argument("--ttl", type=float, default=3600.0,
                           help="seconds after which a detached emulator stops itself")
    args = parser.parse_args(argv)
    return {"serve": _serve, "run": _run, "start": _start, "stop": _stop, "env": _env}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
