"""A whole drill as an unprivileged user: the embedded netns runtime rootless (docs/runtime.md, "Rootless").

The controller (the checkout's own ``.venv/bin/ansible-playbook``) runs as ``nobody`` with a
home, an output root and an Ansible temp directory of its own; the emulator is the test's
(root's), on 127.0.0.1 in the host namespace, which the controller shares. The checkout and its
``.venv`` stay root-owned and are only read. A venv whose base interpreter lives in a directory
the user cannot enter (pyenv under a 0700 ``/root``) cannot be run by another user
(docs/runtime.md, "Rootless"): the test then shows the user that interpreter, read-only, in a
private mount namespace of the drill's own (a tmpfs over the closed directory, the interpreter's
prefix bound back into it); nothing of the host's permissions changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT

from drillkit import ANSIBLE_PLAYBOOK, remaining, run_drill, seed_world

ANSIBLE_BIN = str(Path(ANSIBLE_PLAYBOOK).parent)

USER_UID = USER_GID = 65534  # nobody
# A normal user's PATH on Debian (/etc/profile, login.defs): no sbin directories, where nft lives.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
SETPRIV = ("setpriv", f"--reuid={USER_UID}", f"--regid={USER_GID}", "--clear-groups", "--")
# Run as root in a private mount namespace: $1 (the interpreter's prefix) stays reachable under $3
# (the directory the user cannot enter) by way of $2, then the rest of argv runs.
EXPOSE = ('set -e; mount --bind "$1" "$2"; mount -t tmpfs -o mode=0755,size=1m drg-expose "$3"; '
          'mkdir -p "$1"; mount -o bind,ro "$2" "$1"; shift 3; exec "$@"')


def _as_user(argv, **kwargs):
    return subprocess.run([*SETPRIV, *argv], capture_output=True, text=True, check=False, **kwargs)


def _closed_ancestor(path):
    """The first directory on ``path`` the user cannot enter, or None."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        if _as_user(["test", "-x", str(Path(*parts[:i]))]).returncode != 0:
            return Path(*parts[:i])
    return None


def _why_not():
    if os.geteuid() != 0:
        return "the harness switches to the nobody user: run as root"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing"
    if _as_user(["unshare", "--user", "--map-root-user", "--net", "true"]).returncode != 0:
        return "unprivileged user namespaces are not allowed here"
    if _as_user(["test", "-r", str(ROOT / "plugins" / "module_utils" / "_runtime.py")]).returncode != 0:
        return f"the checkout {ROOT} is not readable by other users"
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture
def user_dir():
    """A directory the user owns (pytest's tmp_path is root's 0700 tree, not traversable by another user)."""
    path = Path(tempfile.mkdtemp(prefix="drg-rootless-"))
    os.chmod(path, 0o755)  # noqa: S103 - the parent of the user's own 0700 directories
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def _user_world(emulator, base):
    """A seeded world whose files (trust policy, trusted state) the user owns."""
    return seed_world(emulator, base / "world")


def _user_env(base):
    home, tmp = base / "home", base / "home" / ".ansible-local"
    for path in (home, tmp, base / "runs"):
        path.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["chown", "-R", f"{USER_UID}:{USER_GID}", str(base)], check=True)
    return {"HOME": str(home), "USER": "nobody", "LOGNAME": "nobody", "PATH": f"{ANSIBLE_BIN}:{USER_PATH}",
            "ANSIBLE_LOCAL_TEMP": str(tmp), "ANSIBLE_REMOTE_TEMP": str(home / ".ansible-remote")}


def _user_command(base):
    """``ansible-playbook`` of the checkout's venv as the user (see the module's docstring)."""
    interpreter = Path(os.path.realpath(sys.executable))
    closed = _closed_ancestor(interpreter)
    if closed is None:
        return (*SETPRIV, ANSIBLE_PLAYBOOK)
    stage = base / "interpreter"
    stage.mkdir(exist_ok=True)
    return ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", EXPOSE, "expose",
            sys.base_prefix, str(stage), str(closed), *SETPRIV, ANSIBLE_PLAYBOOK)


def _traces(prefix):
    """What of ``prefix`` is visible on the host, as root and as the user."""
    ps = subprocess.run(["ps", "-eo", "pid,user,args"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    mounts = Path("/proc/mounts").read_text()
    user_ps = _as_user(["ps", "-u", str(USER_UID), "-o", "pid,args"]).stdout
    user_netns = _as_user(["ip", "netns", "list"]).stdout
    return {
        "root_ps": [line for line in ps.splitlines() if prefix in line],
        "root_netns": [line for line in netns.splitlines() if prefix in line],
        "root_tables": [line for line in tables.splitlines() if prefix in line],
        "mounts": [line for line in mounts.splitlines() if prefix in line],
        "run_netns": [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else []) if prefix in n],
        "user_ps": [line for line in user_ps.splitlines() if prefix in line],
        "user_netns": [line for line in user_netns.splitlines() if prefix in line],
    }


def test_a_drill_passes_rootless_and_leaves_nothing(e2e_emulator, user_dir):
    world = _user_world(e2e_emulator, user_dir)
    env = _user_env(user_dir)
    started = time.monotonic()
    run = run_drill(world, user_dir / "runs", env_extra=env, command=_user_command(user_dir))
    seconds = time.monotonic() - started
    prefix = "drg-%s-" % hashlib.sha256(run.drill_id.encode()).hexdigest()[:6]
    assert run.rc == 0, run.stdout[-5000:] + run.stderr[-2000:]
    report = run.report
    assert report["outcome"] == "passed", report.get("error")
    runtime = report["runtime"]
    assert runtime["backend"] == "netns" and runtime["prefix"] == prefix
    assert runtime["isolated"] is True and runtime["findings"] == []
    rows = runtime["probes"]
    assert rows and runtime["violations"] == 0
    assert [r for r in rows if r["observed"] != r["expected"]] == []
    assert {r["expected"] for r in rows} == {"allow", "deny"}
    assert runtime["counters"]["delta"]["production_drop"] >= sum(
        1 for r in rows if "production" in (r["src"], r["dst"]))
    telemetry = report["telemetry"]
    assert telemetry["by_type"].get("drguard.probe.result") == len(rows), telemetry
    assert telemetry["by_type"].get("drguard.phase.finished", 0) > 0, telemetry
    assert telemetry["rejected"] == 0 and telemetry["corrupt"] == 0, telemetry
    assert report["teardown"]["remaining"] == 0
    # Everything the drill wrote is the user's, and the bait stayed untouched.
    owners = {p.stat().st_uid for p in run.output_dir.rglob("*")} | {run.output_dir.stat().st_uid}
    assert owners == {USER_UID}
    assert (run.output_dir / "runtime" / "bait-hits.jsonl").read_text() == ""
    assert json.loads((run.output_dir / "runtime" / "state.json").read_text())["state"] == "absent"
    assert _traces(prefix) == {k: [] for k in ("root_ps", "root_netns", "root_tables", "mounts", "run_netns",
                                               "user_ps", "user_netns")}
    assert remaining(world.emu, run.drill_id) == []
    print(f"rootless drill: {seconds:.1f}s wall")  # noqa: T201 - the figure, read with -s


# A seccomp filter that refuses new user namespaces, as a container runtime's default profile does
# (x86_64): unshare(2) and clone(2) with CLONE_NEWUSER fail with EPERM, clone3 with ENOSYS (callers
# fall back to clone). Installed with no_new_privs by the process itself, then argv[1:] is executed.
NO_USERNS = r"""
import ctypes, os, struct, sys
prog = [(0x20, 0, 0, 4), (0x15, 0, 9, 0xC000003E), (0x20, 0, 0, 0), (0x15, 6, 0, 435), (0x15, 1, 0, 272),
        (0x15, 0, 5, 56), (0x20, 0, 0, 16), (0x54, 0, 0, 0x10000000), (0x15, 2, 0, 0), (0x06, 0, 0, 0x50001),
        (0x06, 0, 0, 0x50026), (0x06, 0, 0, 0x7FFF0000)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Prog(len(prog), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is written for x86_64")
def test_without_user_namespaces_the_drill_fails_before_anything_is_created_naming_what_it_needs(
        e2e_emulator, user_dir):
    world = _user_world(e2e_emulator, user_dir)
    env = _user_env(user_dir)
    command = (*_user_command(user_dir), )
    blocked = (*command[:-1], sys.executable, "-c", NO_USERNS)
    # The simulation is real: under the filter the user cannot create a user namespace.
    probe = subprocess.run([*blocked, shutil.which("unshare"), "--user", "--map-root-user", "true"],
                           capture_output=True, text=True, check=False, env=env)
    assert probe.returncode != 0 and "Operation not permitted" in probe.stderr, probe.stderr
    run = run_drill(world, user_dir / "runs", env_extra=env, command=(*blocked, command[-1]))
    prefix = "drg-%s-" % hashlib.sha256(run.drill_id.encode()).hexdigest()[:6]
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "failed"
    assert "the netns runtime cannot start: not running as root" in report["error"], report["error"]
    assert ("unprivileged user namespaces are not available: a seccomp filter on this process refuses to create "
            "them") in report["error"], report["error"]
    assert "run it as root, or allow unprivileged user namespaces" in report["error"]
    # Nothing was created: no phase ran, nothing in the emulator, nothing on the host.
    assert "Phase network" not in run.stdout
    assert [p["name"] for p in report["phases"]] == ["teardown"], report["phases"]
    assert remaining(world.emu, run.drill_id) == []
    assert not (run.output_dir / "runtime").exists()
    assert _traces(prefix) == {k: [] for k in ("root_ps", "root_netns", "root_tables", "mounts", "run_netns",
                                               "user_ps", "user_netns")}
