"""Network namespaces for the ``netns`` sandbox runtime: build, rule, read back, destroy.

A small manager that shells out to ``ip`` (``ip -j`` JSON) and ``nft`` (``nft -j``); it never
touches the host's own interfaces, routes or rules. Everything it creates carries one prefix,
``drg-<short drill id>-``, so ``destroy(prefix)`` (teardown, the reaper) finds it again after
a kill. Every function is idempotent and raises :class:`NetnsError` only.

The plan (plain dicts and strings, as produced by the policy translator's ``address_plan``)::

    {
      "router": {"ns": "drg-ab12cd-router"},
      "tiers": {
        "<tier>": {
          "ns": "drg-ab12cd-app",        # the tier's namespace
          "veth_host": "drg-ab12cd-1r",  # veth end in the router namespace (holds the gateway)
          "veth_peer": "drg-ab12cd-1t",  # veth end in the tier namespace (holds the address)
          "subnet": "10.77.1.0/24",      # the link's subnet
          "address": "10.77.1.2",        # the tier's address (plain, or with the subnet's length)
          "gateway": "10.77.1.1",        # the router's address on that link: the tier's default route
        },
        ...
      },
    }

Names: ``[a-z0-9-]``, all starting with the same ``drg-<short>-`` prefix; device names at
most 15 characters (IFNAMSIZ), namespace names at most 63. Every tier's traffic leaves through
its default route into the router namespace, which forwards (``net.ipv4.ip_forward=1``) and
is where a drill's forwarding ruleset belongs.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

IFNAMSIZ = 15
NS_NAME_MAX = 63
_NAME = re.compile(r"^[a-z0-9-]+$")
_PREFIX = re.compile(r"^drg-[a-z0-9]+-$")
_PLAN_PREFIX = re.compile(r"^(drg-[a-z0-9]+-)")
_TABLE = re.compile(r"^\s*table\s+(ip|ip6|inet|arp|bridge|netdev)\s+([A-Za-z_][A-Za-z0-9_./-]*)\s*\{", re.MULTILINE)
_TOOLS = (("ip", "iproute2"), ("nft", "nftables"))
_ROOTLESS_TOOLS = (("unshare", "util-linux"), ("nsenter", "util-linux"), ("setpriv", "util-linux"))
_TIMEOUT = 30


class NetnsError(Exception):
    """What went wrong, in one sentence, with structured fields in ``detail``."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


# ---------------------------------------------------------------- running ip and nft


_SBIN = "/usr/sbin:/sbin"  # where Debian installs nft: on root's PATH, not on a normal user's


def which(name):
    """``name`` on PATH; not root, else in /usr/sbin or /sbin (a normal user's PATH has neither, and
    nft lives there; root's PATH is taken as it is)."""
    found = shutil.which(name)
    if found is None and os.geteuid() != 0:
        found = shutil.which(name, path=_SBIN)
    return found


def _tool(name):
    path = which(name)
    if path is None:
        package = dict(_TOOLS).get(name, name)
        raise NetnsError(
            f"{name} not found on PATH; install {package} (make venv as root does) and retry.",
            missing=[f"{name} (package {package})"],
        )
    return path


def _run(argv, input_text=None, check=True, what=None):
    try:
        proc = subprocess.run(_through_holder(argv), input=input_text, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{what or argv[0]} did not finish within {_TIMEOUT}s; check the host and retry.",
                         command=argv[:4]) from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(
            f"{what or ' '.join(argv[:5])} failed: {'; '.join(err[:3]) or 'exit ' + str(proc.returncode)}.",
            command=argv[:6], rc=proc.returncode,
        )
    return proc


def _ip_json(*args, ns=None):
    argv = [_tool("ip"), "-j"] + (["-n", ns] if ns else []) + list(args)
    out = _run(argv).stdout.strip()
    return json.loads(out) if out else []


def _namespaces():
    if os.geteuid() != 0 and _current() is None:
        return []  # not root and no holder: this user has no namespaces (root's are not its own)
    return sorted(item["name"] for item in _ip_json("netns", "list"))


# ---------------------------------------------------------------- preflight


def _userns_allowed(proc="/proc"):
    """``(True, "")`` when this user can create user namespaces here, else ``(False, why)``."""
    def read(path, default):
        try:
            with open(os.path.join(proc, path)) as handle:
                return handle.read().strip()
        except OSError:
            return default

    if read("sys/kernel/unprivileged_userns_clone", "1") != "1":
        return False, "kernel.unprivileged_userns_clone is 0 (set it to 1)"
    if read("sys/user/max_user_namespaces", "0") in ("", "0"):
        return False, "user.max_user_namespaces is 0 (set it above 0)"
    if read("sys/kernel/apparmor_restrict_unprivileged_userns", "0") != "0":
        return False, "kernel.apparmor_restrict_unprivileged_userns is 1 (set it to 0)"
    unshare = shutil.which("unshare")
    if unshare is None:
        return False, "unshare (package util-linux) not found on PATH"
    try:
        probe = subprocess.run([unshare, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"],
                               capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return False, "unshare --user did not finish"
    if probe.returncode != 0:
        status = read("self/status", "")
        if "Operation not permitted" in probe.stderr and re.search(r"^Seccomp:\s*2$", status, re.MULTILINE):
            return False, ("a seccomp filter on this process refuses to create them (a container runtime's default "
                           "profile does; run the drill under a profile that allows unshare and clone with "
                           "CLONE_NEWUSER)")
        return False, f"unshare --user failed ({probe.stderr.strip()[:120]})"
    return True, ""


def preflight():
    """Check, before anything is created, that namespaces and nftables can be used here.

    Returns ``{"root": bool, "mode": "root" | "rootless", "ip": path, "nft": path}``: as root the
    manager works directly; otherwise, where this user may create user namespaces, rootless
    (through a holder process, see :func:`start_holder`). Raises :class:`NetnsError` naming every
    missing piece (``detail["missing"]``): root or unprivileged user namespaces (and which sysctl
    forbids them), the ``ip`` / ``nft`` tools (and ``unshare`` / ``nsenter`` / ``setpriv`` when
    rootless), ``ip -j``, the kernel's nf_tables.
    """
    missing, clauses = [], []
    root = os.geteuid() == 0
    if not root:
        allowed, why = _userns_allowed()
        if not allowed:
            missing.append("root or unprivileged user namespaces")
            clauses.append("not running as root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN) and unprivileged "
                           f"user namespaces are not available: {why}")
    wanted = _TOOLS if root else _TOOLS + _ROOTLESS_TOOLS
    paths = {name: which(name) for name, _package in wanted}
    tools = [f"{name} (package {package})" for name, package in wanted if paths[name] is None]
    if tools:
        missing.extend(tools)
        clauses.append(f"{', '.join(tools)} not found on PATH")
    if not missing:
        probe = _run_plain([paths["ip"], "-j", "link", "show", "dev", "lo"])
        try:
            json.loads(probe.stdout)
        except ValueError:
            missing.append("ip -j")
            clauses.append("ip gives no JSON output (iproute2 4.14 or newer is needed)")
        inside = [] if root else [paths["unshare"], "--user", "--map-root-user", "--net"]
        tables = _run_plain(inside + [paths["nft"], "list", "tables"])
        if tables.returncode != 0:
            missing.append("nf_tables")
            clauses.append(f"the kernel has no usable nf_tables (nft list tables: {tables.stderr.strip()[:120]})")
    if missing:
        if tools:
            advice = "install what is missing (make venv as root installs iproute2 and nftables) and retry."
        elif missing == ["root or unprivileged user namespaces"]:
            advice = ("run it as root, or allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1, "
                      "user.max_user_namespaces above 0, kernel.apparmor_restrict_unprivileged_userns=0), and retry.")
        else:
            advice = "fix that and retry."
        raise NetnsError(f"the netns runtime cannot start: {'; '.join(clauses)}; {advice}", missing=missing)
    return {"root": root, "mode": "root" if root else "rootless", "ip": paths["ip"], "nft": paths["nft"]}


def _run_plain(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, -9, "", f"did not finish within {_TIMEOUT}s")


# ---------------------------------------------------------------- rootless: the holder
#
# Without root, every namespace of a drill lives inside one user namespace held open by a
# holder process: ``unshare --user --map-root-user --net --mount --pid --fork --mount-proc
# --kill-child`` running ``sh`` (argv marker ``<prefix>holder``), which mounts a tmpfs on /run
# (so ``ip netns`` has a /run/netns of its own), hides the user's credential files, prints
# ``ready`` and sleeps. Every ip / nft / workload call enters its user, mount, network and pid
# namespaces (``nsenter -t <its child> -U -m -n -p --preserve-credentials``): one choke point,
# :func:`_through_holder`. Killing the holder kills its pid namespace, and with it every process,
# mount and network namespace of the drill. The holder is found again by its marker
# (:func:`find_holders`), so another process (a later module, the reaper) needs no memory.

_HOLDER_MARK = re.compile(r"^(drg-[a-z0-9]+-)holder$")
_HOLDERS = {}  # prefix -> {"pid": unshare's pid, "target": the pid namespace's init (the child)}
_LOCAL = threading.local()
_HOLDER_SCRIPT = """set -e
mount -t tmpfs -o mode=0755,size=4m drg-run /run
mkdir -p /run/netns
for path in "$@"; do
  if [ -d "$path" ] && [ ! -L "$path" ]; then mount -t tmpfs -o mode=0700,size=64k drg-hidden "$path"
  elif [ -f "$path" ] && [ ! -L "$path" ]; then mount --bind /dev/null "$path"; fi
done
echo ready
exec sleep infinity
"""
_CREDENTIAL_ENV = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
_CREDENTIAL_DIRS = (".aws", ".ssh", ".ansible", ".config", ".docker", ".kube", ".gnupg")


def _current():
    return getattr(_LOCAL, "holder", None)


def _through_holder(argv):
    holder = _current()
    if holder is None:
        return list(argv)
    return [_tool("nsenter"), "-t", str(holder["target"]), "-U", "-m", "-n", "-p", "--preserve-credentials",
            "--", *argv]


def _read(path, binary=False):
    try:
        with open(path, "rb" if binary else "r") as handle:
            return handle.read()
    except OSError:
        return None


def _holder_children(pid):
    raw = _read(f"/proc/{pid}/task/{pid}/children") or ""
    return [int(p) for p in raw.split() if p.isdigit()]


def find_holders(prefix=None):
    """Rootless holders alive on this host: ``[{"pid", "prefix", "uid"}]``, found by their argv marker.

    Not root: only this user's own. ``prefix`` narrows to one drill.
    """
    if prefix is not None:
        check_prefix(prefix)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        raw = _read(f"/proc/{entry}/cmdline", binary=True)
        if not raw:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if not argv or os.path.basename(argv[0]) != "unshare":
            continue
        marks = [m.group(1) for m in (_HOLDER_MARK.match(a) for a in argv) if m]
        if not marks or (prefix is not None and marks[0] != prefix):
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if os.geteuid() != 0 and uid != os.geteuid():
            continue
        found.append({"pid": int(entry), "prefix": marks[0], "uid": uid})
    return sorted(found, key=lambda h: h["pid"])


def _use(prefix):
    """Make this thread's calls go through ``prefix``'s holder (rootless) or directly (root)."""
    if os.geteuid() == 0:
        _LOCAL.holder = None
        return None
    holder = _HOLDERS.get(prefix)
    if holder is not None and _holder_children(holder["pid"]) != [holder["target"]]:
        del _HOLDERS[prefix]  # gone (or not ours any more): look again
        holder = None
    if holder is None:
        alive = find_holders(prefix)
        for item in alive:
            children = _holder_children(item["pid"])
            if len(children) == 1:
                holder = _HOLDERS[prefix] = {"pid": item["pid"], "target": children[0]}
                break
    _LOCAL.holder = holder
    return holder


def start_holder(prefix, wait=10.0):
    """Start ``prefix``'s rootless holder (idempotent: an alive one is reused); returns its pid.

    Hidden from everything that runs through it (a tmpfs or ``/dev/null`` mounted over them in its
    mount namespace): ``~/.aws``, ``~/.ssh``, ``~/.ansible``, ``~/.config``, ``~/.docker``,
    ``~/.kube``, ``~/.gnupg`` and the files ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``,
    ``AWS_WEB_IDENTITY_TOKEN_FILE`` name. Its own pid namespace hides the controller's processes.
    """
    check_prefix(prefix)
    if os.geteuid() == 0:
        raise NetnsError("start_holder is for rootless mode; as root the namespaces are created directly.",
                         prefix=prefix)
    holder = _use(prefix)
    if holder is not None:
        return holder["pid"]
    home = os.path.expanduser("~")
    hidden = [os.path.join(home, d) for d in _CREDENTIAL_DIRS] if home not in ("", "/") else []
    hidden += [os.environ[k] for k in _CREDENTIAL_ENV if os.environ.get(k, "").startswith("/")]
    argv = [_tool("unshare"), "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc",
            "--propagation", "private", "--kill-child", "--", _tool("sh"), "-c", _HOLDER_SCRIPT,
            f"{prefix}holder", *hidden]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/", start_new_session=True, close_fds=True, env={"PATH": os.environ.get("PATH", "")})
    deadline = time.monotonic() + wait
    line = b""
    import select  # noqa: PLC0415 - only the rootless path needs it
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        if select.select([proc.stdout], [], [], 0.1)[0]:
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                break
            line += chunk
    if line.strip() != b"ready":
        _kill_group(proc.pid)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.wait(timeout=5) is not None else ""
        raise NetnsError(f"the rootless holder for {prefix} did not start ({err[:160] or 'no ready signal'}); "
                         "check that unprivileged user namespaces work here (unshare -Urn true) and retry.",
                         prefix=prefix)
    proc.stdout.close()
    proc.stderr.close()
    _SPAWNED[proc.pid] = proc
    children = _holder_children(proc.pid)
    if len(children) != 1:
        _kill_group(proc.pid)
        raise NetnsError(f"the rootless holder for {prefix} has {len(children)} children instead of one; "
                         "run destroy and retry.", prefix=prefix)
    _HOLDERS[prefix] = {"pid": proc.pid, "target": children[0]}
    _LOCAL.holder = _HOLDERS[prefix]
    return proc.pid


def _ns_inodes(pid):
    out = {}
    for kind in ("user", "pid", "net", "mnt"):
        try:
            out[kind] = os.stat(f"/proc/{pid}/ns/{kind}").st_ino
        except OSError:
            pass
    return out


def _stop_holder(prefix, holder, wait):
    """SIGKILL the holder (its pid namespace dies with it) and prove nothing of it remains."""
    inodes = _ns_inodes(holder["target"])
    netns_inodes = set()
    if _current() is holder:
        script = "cd /run/netns && for f in *; do [ -e \"$f\" ] && stat -L -c '%i' \"$f\"; done; true"
        listed = _run([_tool("sh"), "-c", script], check=False).stdout
        netns_inodes = {int(i) for i in listed.split() if i.isdigit()}
    members = [pid for pid in _all_pids() if inodes.get("pid") and _ns_inodes(pid).get("pid") == inodes["pid"]]
    _kill_group(holder["pid"])
    try:
        os.kill(holder["pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    watched = {inodes.get("user"), inodes.get("pid"), inodes.get("mnt"), inodes.get("net")} | netns_inodes
    watched.discard(None)
    deadline = time.monotonic() + wait
    while True:
        _reap()
        # A zombie (ended, not yet reaped by its parent) still shows its user and pid namespace but
        # runs nothing and holds no other namespace of the drill: it does not count as alive.
        left = [pid for pid in _all_pids() if watched & set(_ns_inodes(pid).values()) and _alive(pid)]
        if _alive(holder["pid"]):
            left.append(holder["pid"])
        if not left:
            break
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {sorted(set(left))} of {prefix}'s rootless holder are still alive "
                             f"{wait:g}s after SIGKILL; check them and run teardown again.", prefix=prefix,
                             pids=sorted(set(left)))
        time.sleep(0.05)
    _HOLDERS.pop(prefix, None)
    if _current() is holder:
        _LOCAL.holder = None
    return sorted(set(members) | {holder["pid"]})


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _alive(pid):
    """Running (a zombie, dead and waiting for its parent to collect it, does not count)."""
    stat_line = _read(f"/proc/{pid}/stat") or ""
    return bool(stat_line) and stat_line.rsplit(")", 1)[-1].split()[:1] != ["Z"]


# ---------------------------------------------------------------- running workloads inside


UNPRIVILEGED_UID = 65534
UNPRIVILEGED_GID = 65534
_SETPRIV_ARGS = (f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_GID}", "--clear-groups",
                 "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs")
# Rootless: the user namespace maps one uid (the invoking user's, as 0), so there is no other uid to
# switch to; the workload keeps uid 0 of the holder's namespace and loses every capability the
# same way (securebits noroot: exec gives uid 0 no capability back).
_SETPRIV_ROOTLESS_ARGS = ("--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
                          "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env(env):
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise NetnsError("env must be a mapping of variable names to strings; fix the call.", field="env")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise NetnsError(f"env variable name {key!r} is not a valid name ([A-Za-z_][A-Za-z0-9_]*); "
                             "fix the call.", field="env")
        if not isinstance(value, str) or "\0" in value:
            raise NetnsError(f"env variable {key} must be a string without NUL bytes; fix the call.", field="env")
    return dict(env)


def _exec_argv(ns, argv, privileged, spec_fd=None, uid=None):
    """``ip netns exec <ns> [prelude] [setpriv ... --] <argv>`` after validating ``ns`` and ``argv``.

    With ``spec_fd`` (a memfd holding a :func:`_files_spec`) the privileged prelude runs first: a
    mount namespace of its own (``unshare --mount``), the workload's tmpfs, then ``setpriv``.
    """
    _check_ns(ns, use=True)
    if (not isinstance(argv, (list, tuple)) or not argv
            or not all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise NetnsError("argv must be a non-empty list of strings; fix the call.", field="argv")
    if privileged:
        if spec_fd is not None:
            raise NetnsError("files are for unprivileged workloads only; drop privileged or files.", field="files")
        return _through_holder([_tool("ip"), "netns", "exec", ns, *argv])
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise NetnsError("setpriv not found on PATH, so nothing can run unprivileged inside a namespace; "
                         "install util-linux (setpriv) and retry.", missing=["setpriv (package util-linux)"])
    if _current() is None:
        drop = _SETPRIV_ARGS if uid is None else (f"--reuid={uid}", f"--regid={uid}", *_SETPRIV_ARGS[2:])
    else:
        drop = _SETPRIV_ROOTLESS_ARGS
    workload = [setpriv, *drop, "--", *argv]
    if spec_fd is not None:
        prelude = [_tool("unshare"), "--mount", "--propagation", "private", "--",
                   os.path.realpath(sys.executable), "-I", "-S", "-c", _PRELUDE, str(spec_fd)]
        return _through_holder([_tool("ip"), "netns", "exec", ns, *prelude, *workload])
    return _through_holder([_tool("ip"), "netns", "exec", ns, *workload])


# ---------------------------------------------------------------- files for a workload
#
# A workload gets files through a private mount namespace: the prelude below runs as root inside
# ``ip netns exec <ns> unshare --mount --propagation private``, mounts a size-capped tmpfs on /run
# (nothing of it reaches the host's mount table) and private, size-capped ones on /tmp, /var/tmp and
# /dev/shm (a workload cannot fill or plant files in the host's), puts the files into WORKLOAD_IN owned
# by the workload's uid, makes WORKLOAD_IN read-only (a read-only bind of itself), adds the writable
# WORKLOAD_SCRATCH when asked, remounts the rest of the host read-only, then execs setpriv. The spec
# (names, modes, sources, inline data such as secrets) comes on a memfd, never on argv or a disk; the
# prelude closes it before exec.

WORKLOAD_ROOT = "/run/drguard"
WORKLOAD_IN = WORKLOAD_ROOT + "/in"
WORKLOAD_SCRATCH = WORKLOAD_ROOT + "/work"
FILE_MODES = (0o400, 0o444, 0o600)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_TMPFS_SLACK = 1024 * 1024  # directories, inodes and rounding on top of the files' bytes
TMP_BYTES = 16 * 1024 * 1024  # each of the workload's private /tmp, /var/tmp, /dev/shm
_PRELUDE = r"""
import base64, json, os, shutil, stat, subprocess, sys
fd = int(sys.argv[1])
with os.fdopen(fd, "rb") as handle:
    spec = json.loads(handle.read())
def fail(what):
    sys.stderr.write("drguard workload set-up: %s\n" % what)
    sys.exit(125)
def run(*argv):
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        fail("%s failed (%s)" % (" ".join(argv[:3]), proc.stderr.strip()[:200]))
mount, uid, gid = spec["mount"], spec["uid"], spec["gid"]
sources = {}  # opened before anything is mounted over the paths they live under (/run, /tmp, ...)
for item in spec["files"]:
    if "source" in item:
        try:
            src = os.open(item["source"], os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            fail("cannot open %s (%s)" % (item["source"], exc.strerror))
        if not stat.S_ISREG(os.fstat(src).st_mode):
            fail("%s is not a regular file" % item["source"])
        sources[item["name"]] = src
run(mount, "-t", "tmpfs", "-o", "size=%d,mode=0755,nosuid,nodev,noexec" % spec["size"], "drguard-workload", "/run")
os.mkdir("/run/drguard", 0o755)
inside = "/run/drguard/in"
os.mkdir(inside, 0o700)
try:
    for item in spec["files"]:
        path = os.path.join(inside, item["name"])
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out, "wb") as target:
            if item["name"] in sources:
                with os.fdopen(sources[item["name"]], "rb") as source:
                    shutil.copyfileobj(source, target, 1024 * 1024)
            else:
                target.write(base64.b64decode(item["data"]))
        os.chown(path, uid, gid)
        os.chmod(path, item["mode"])
except OSError as exc:
    fail("cannot copy %s in (%s)" % (item["name"], exc.strerror))
for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        run(mount, "-t", "tmpfs", "-o", "size=%d,mode=1777,nosuid,nodev,noexec" % spec["tmp_size"], "drguard-tmp", tmp)
os.chown(inside, uid, gid)
os.chmod(inside, 0o500)
run(mount, "--bind", inside, inside)
run(mount, "-o", "remount,bind,ro,nosuid,nodev,noexec", inside)
if spec["scratch"]:
    os.mkdir("/run/drguard/work", 0o700)
    os.chown("/run/drguard/work", uid, gid)
# Everything else of the host read-only for the workload: each mount of this namespace remounted
# read-only (per-mount flags only; nosuid, nodev, noexec and the atime flags kept), except its own
# tmpfs mounts. Shadowed mounts are unreachable and skipped: those under /run, and those under a
# path mounted again later (ip netns exec mounts a new /sys; rootless, the old one's submounts
# stay listed under it, and remounting them by path fails).
keep, done = ("/run", "/tmp", "/var/tmp", "/dev/shm"), set()
with open("/proc/self/mountinfo") as handle:
    mounts = [line.split() for line in handle]
points = [fields[4].encode().decode("unicode_escape") for fields in mounts]
for index, fields in enumerate(mounts):
    point = points[index]
    options = fields[5].split(",")
    if point in done or point in keep or point.startswith("/run/") or "ro" in options:
        continue
    if any(later != point and point.startswith(later.rstrip("/") + "/") for later in points[index + 1:]):
        continue
    done.add(point)
    flags = [o for o in options if o in ("nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime",
                                         "strictatime")]
    run(mount, "-o", ",".join(["remount", "bind", "ro"] + flags), point)
os.chdir(spec["cwd"])
argv = sys.argv[2:]
os.execve(argv[0], argv, spec["env"])  # exactly the caller's env (not this interpreter's locale coercion)
"""


def _files_spec(files, scratch, uid):
    """Check ``files`` and build the prelude's spec: ``{"files", "size", "scratch", ...}``."""
    if not isinstance(scratch, int) or scratch < 0:
        raise NetnsError("scratch must be a number of bytes (0 for none); fix the call.", field="files")
    if not isinstance(files, dict) or not (files or scratch):
        raise NetnsError("files must be a mapping of file names to {source | data, mode}, not empty unless a "
                         "scratch is asked for; fix the call.", field="files")
    items, total = [], 0
    for name, item in sorted(files.items()):
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise NetnsError(f"files: {name!r} is not a plain file name ([A-Za-z0-9._-], no path); fix the call.",
                             field="files")
        if not isinstance(item, dict) or ("source" in item) == ("data" in item):
            raise NetnsError(f"files[{name}] needs either source (a path on the controller) or data; fix the call.",
                             field="files")
        mode = item.get("mode", 0o400)
        if mode not in FILE_MODES:
            raise NetnsError(f"files[{name}]: mode must be one of {', '.join(oct(m) for m in FILE_MODES)}; "
                             "fix the call.", field="files")
        entry = {"name": name, "mode": mode}
        if "source" in item:
            source = item["source"]
            if not isinstance(source, str) or not os.path.isabs(source):
                raise NetnsError(f"files[{name}]: source {source!r} must be an absolute path; fix the call.",
                                 field="files")
            try:
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise NetnsError(f"files[{name}]: source {source} is not a regular file that can be read "
                                 f"({exc.strerror}); pass the restored file itself.", field="files") from None
            try:
                info = os.fstat(fd)
            finally:
                os.close(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NetnsError(f"files[{name}]: source {source} is not a regular file; pass the restored file "
                                 "itself.", field="files")
            entry["source"], size = source, info.st_size
        else:
            data = item["data"]
            raw = data.encode() if isinstance(data, str) else data
            if not isinstance(raw, bytes):
                raise NetnsError(f"files[{name}]: data must be text or bytes; fix the call.", field="files")
            entry["data"], size = base64.b64encode(raw).decode(), len(raw)
        items.append(entry)
        total += size + 4096
    owner = (UNPRIVILEGED_UID if uid is None else uid) if _current() is None else 0
    return {"files": items, "scratch": scratch, "size": total + scratch + _TMPFS_SLACK, "tmp_size": TMP_BYTES,
            "uid": owner,
            "gid": owner, "cwd": WORKLOAD_IN, "mount": _tool("mount")}


def _spec_fd(spec):
    """A memfd holding ``spec`` (memory only, never a disk), rewound, for the prelude to read."""
    fd = os.memfd_create("drguard-workload", 0)
    try:
        os.write(fd, json.dumps(spec).encode())
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_uid(uid):
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or not 1000 <= uid < 2 ** 31):
        raise NetnsError(f"uid {uid!r} must be a number from 1000 to 2^31-1; pass workload_uid() or nothing.",
                         field="uid")


def workload_uid():
    """A fresh uid for one workload (root mode): no file and no other process of the host has it, so
    no other workload (65534 or another drill's) can read its memory, environment or files."""
    return WORKLOAD_UID_BASE + secrets.randbelow(WORKLOAD_UID_SPAN)


WORKLOAD_UID_BASE = 2_000_000_000
WORKLOAD_UID_SPAN = 100_000_000


def workload_command(ns, argv, *, files=None, scratch=0, uid=None, env=None, privileged=False):
    """Everything :func:`run_in` / :func:`spawn` check and build, for a caller that starts the process
    itself (bounded output reading, say): ``(command line, environment, spec fd or None)``.

    Start it with ``subprocess.Popen(command, env=environment, cwd="/", start_new_session=True,
    close_fds=True, pass_fds=(spec_fd,) if spec_fd is not None else ())`` and close ``spec_fd``
    right after (also when the start fails).
    """
    _check_uid(uid)
    _check_ns(ns, use=True)
    clean = _check_env(env)
    spec = None if files is None else dict(_files_spec(files, scratch, uid), env=clean)
    spec_fd = None if spec is None else _spec_fd(spec)
    try:
        full = _exec_argv(ns, argv, privileged, spec_fd, uid)
    except NetnsError:
        if spec_fd is not None:
            os.close(spec_fd)
        raise
    return full, clean, spec_fd


def _popen_inside(ns, argv, *, privileged, files, scratch, uid, env, **kwargs):
    """:func:`workload_command`, started; returns ``(argv, Popen)``."""
    full, clean, spec_fd = workload_command(ns, argv, files=files, scratch=scratch, uid=uid, env=env,
                                            privileged=privileged)
    try:
        proc = subprocess.Popen(full, env=clean, cwd="/", start_new_session=True, close_fds=True,
                                pass_fds=() if spec_fd is None else (spec_fd,), **kwargs)
    finally:
        if spec_fd is not None:
            os.close(spec_fd)
    return full, proc


def run_in(ns, argv, *, input_text=None, timeout=_TIMEOUT, env=None, privileged=False, files=None, scratch=0,
           uid=None):
    """Run ``argv`` inside namespace ``ns`` and wait for it; returns the ``subprocess.CompletedProcess``.

    Unprivileged unless ``privileged=True`` (for the project's own set-up commands only): uid
    and gid 65534, no supplementary groups, empty inheritable, ambient and bounding capability
    sets, ``no_new_privs``. The environment is exactly ``env`` (nothing of the caller's own),
    the working directory ``/``, stdin ``input_text`` (text) or empty. The exit code is the
    caller's to judge; a run longer than ``timeout`` seconds is killed (its whole process
    group) and raises :class:`NetnsError` with ``detail["timed_out"]``.

    ``files`` (``{name: {"source": absolute path} | {"data": text or bytes}, "mode": 0o400 |
    0o444 | 0o600}``) are put into :data:`WORKLOAD_IN`, a read-only directory on a tmpfs of the
    workload's own mount namespace, owned by its uid; ``scratch`` bytes give it the writable
    :data:`WORKLOAD_SCRATCH` on the same size-capped tmpfs; the working directory is then
    :data:`WORKLOAD_IN`. Nothing of it is visible on the host and it vanishes with the process.
    ``uid`` (root mode, from :func:`workload_uid`) runs it under a uid of its own instead of 65534.
    """
    full, proc = _popen_inside(ns, argv, privileged=privileged, files=files, scratch=scratch, uid=uid, env=env,
                               stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        out, err = proc.communicate(input=input_text or "", timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise NetnsError(f"{argv[0]} in namespace {ns} did not finish within {timeout:g}s and was killed; "
                         "check the command or give it a longer timeout.", namespace=ns, timed_out=True) from None
    return subprocess.CompletedProcess(full, proc.returncode, out, err)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _open_output(path, field):
    """Open ``path`` for writing as 0600 without following a symlink; its directory must exist."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise NetnsError(f"{field} {path!r} must be an absolute path; fix the call.", field=field)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent) or os.path.islink(parent):
        raise NetnsError(f"{field} {path} is not inside an existing directory (a real one, not a symlink); "
                         "create the directory first.", field=field)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise NetnsError(f"{field} {path} cannot be opened for writing ({exc.strerror}); "
                         "pass a regular file path that is not a symlink.", field=field) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NetnsError(f"{field} {path} is not a regular file; pass a regular file path.", field=field)
    os.fchmod(fd, 0o600)
    return fd


_SPAWNED = {}


def spawn(ns, argv, *, env=None, stdout_path=None, stderr_path=None, privileged=False, files=None, scratch=0,
          uid=None):
    """Start ``argv`` inside namespace ``ns`` in the background; returns its pid.

    Same confinement and clean environment as :func:`run_in`. The process gets a session of
    its own (no controlling terminal, not killed with the caller's process group), stdin from
    ``/dev/null``, stdout / stderr to the files given (opened here, by the caller, as 0600,
    never through a symlink, truncated; their directory must exist) or ``/dev/null``. The pid
    is the workload's own (``ip netns exec`` and ``setpriv`` exec, they do not fork), so it
    shows in ``ip netns pids``; :func:`destroy` kills it with everything else of the prefix.
    ``files``, ``scratch`` and ``uid`` as for :func:`run_in` (the prelude execs too: same pid).
    """
    # Bad calls are refused before any output file is opened (and truncated).
    _exec_argv(ns, argv, privileged)
    _check_env(env)
    _check_uid(uid)
    if files is not None:
        _files_spec(files, scratch, uid)
    fds = []
    try:
        for path, field in ((stdout_path, "stdout_path"), (stderr_path, "stderr_path")):
            fds.append(subprocess.DEVNULL if path is None else _open_output(path, field))
        _full, proc = _popen_inside(ns, argv, privileged=privileged, files=files, scratch=scratch, uid=uid,
                                    env=env, stdin=subprocess.DEVNULL,
                                    stdout=fds[0], stderr=fds[1])
    finally:
        for fd in fds:
            if fd != subprocess.DEVNULL:
                os.close(fd)
    _reap()
    _SPAWNED[proc.pid] = proc  # kept so it is reaped (poll) instead of lingering as a zombie
    return proc.pid if _current() is None else _workload_pid(proc)


def _workload_pid(proc, wait=5.0):
    """Rootless: nsenter forks to enter the holder's pid namespace, so the workload is its one child;
    that child's pid, so a signal to it reaches the workload (nsenter waits for it and ends with it)."""
    deadline = time.monotonic() + wait
    while proc.poll() is None and time.monotonic() < deadline:
        children = _holder_children(proc.pid)
        if children:
            return children[0]
        time.sleep(0.002)
    return proc.pid


def _reap():
    """Collect the exit status of spawned processes that ended (so none lingers as a zombie)."""
    for pid, proc in list(_SPAWNED.items()):
        if proc.poll() is not None:
            del _SPAWNED[pid]


# ---------------------------------------------------------------- plan validation


def _check_name(value, field, limit, prefix=None):
    if not isinstance(value, str) or not value:
        raise NetnsError(f"{field} must be a non-empty name; fix the plan.", field=field)
    if not _NAME.match(value):
        raise NetnsError(f"{field} {value!r} may use only [a-z0-9-]; fix the plan.", field=field)
    if len(value) > limit:
        raise NetnsError(f"{field} {value!r} is longer than {limit} characters; shorten it in the plan.",
                         field=field)
    if prefix is not None and not value.startswith(prefix):
        raise NetnsError(f"{field} {value!r} does not start with the plan's prefix {prefix!r}, so teardown "
                         "would not find it; fix the plan.", field=field)


def check_prefix(prefix):
    """Validate a drill's prefix (``drg-<short>-``): the unit of cleanup, never wider."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise NetnsError(f"prefix {prefix!r} is not one drill's prefix (drg-<short id>-, [a-z0-9]); "
                         "pass the prefix recorded in the drill's state.", prefix=prefix)
    return prefix


def validate_plan(plan):
    """Check a plan's shape, names and addresses; returns ``(prefix, normalised tiers)``."""
    if not isinstance(plan, dict) or not isinstance(plan.get("router"), dict) or not plan.get("tiers"):
        raise NetnsError("the plan needs a router and at least one tier; fix the plan.", field="plan")
    router = plan["router"].get("ns")
    _check_name(router, "router.ns", NS_NAME_MAX)
    match = _PLAN_PREFIX.match(router)
    if not match:
        raise NetnsError(f"router.ns {router!r} does not start with drg-<short id>-; fix the plan.",
                         field="router.ns")
    prefix = match.group(1)
    tiers, seen, subnets = {}, {router}, []
    for tier, spec in sorted(plan["tiers"].items()):
        base = f"tiers.{tier}"
        if not isinstance(spec, dict):
            raise NetnsError(f"{base} must be a mapping; fix the plan.", field=base)
        _check_name(spec.get("ns"), f"{base}.ns", NS_NAME_MAX, prefix)
        for dev in ("veth_host", "veth_peer"):
            _check_name(spec.get(dev), f"{base}.{dev}", IFNAMSIZ, prefix)
        for field in ("ns", "veth_host", "veth_peer"):
            if spec[field] in seen:
                raise NetnsError(f"{base}.{field} {spec[field]!r} is used twice; fix the plan.",
                                 field=f"{base}.{field}")
            seen.add(spec[field])
        try:
            subnet = ipaddress.IPv4Network(spec.get("subnet"), strict=True)
        except (ValueError, TypeError):
            raise NetnsError(f"{base}.subnet {spec.get('subnet')!r} is not an IPv4 network; fix the plan.",
                             field=f"{base}.subnet") from None
        if subnet.prefixlen > 30:
            raise NetnsError(f"{base}.subnet {subnet} has no room for two hosts; fix the plan.",
                             field=f"{base}.subnet")
        if any(subnet.overlaps(other) for other in subnets):
            raise NetnsError(f"{base}.subnet {subnet} overlaps another tier's; fix the plan.",
                             field=f"{base}.subnet")
        subnets.append(subnet)
        hosts = {}
        for field in ("address", "gateway"):
            raw = spec.get(field)
            try:
                iface = ipaddress.IPv4Interface(raw if "/" in str(raw) else f"{raw}/{subnet.prefixlen}")
            except (ValueError, TypeError):
                raise NetnsError(f"{base}.{field} {raw!r} is not an IPv4 address; fix the plan.",
                                 field=f"{base}.{field}") from None
            if iface.network != subnet or iface.ip in (subnet.network_address, subnet.broadcast_address):
                raise NetnsError(f"{base}.{field} {raw} is not inside subnet {subnet} as a host; fix the plan.",
                                 field=f"{base}.{field}")
            hosts[field] = iface.ip
        if hosts["address"] == hosts["gateway"]:
            raise NetnsError(f"{base}.gateway {hosts['gateway']} is the same as the tier's address; fix the plan.",
                             field=f"{base}.gateway")
        tiers[tier] = dict(spec, subnet=str(subnet), address=str(hosts["address"]),
                           gateway=str(hosts["gateway"]), prefixlen=subnet.prefixlen)
    return prefix, router, tiers


WAN_ADDRESS = "169.254.0.1"  # the wan end of every neighbour's veth (/32), the neighbours' default gateway


def validate_world(plan, prefix, tiers):
    """Check the plan's embedded world (``uplink`` + ``world``); returns it normalised, or ``None``.

    Only a plan holding both ``uplink`` and ``world`` has a world (an ``uplink`` alone is left
    unbuilt). Names: under the plan's prefix, ``[a-z0-9-]``, devices within IFNAMSIZ, none used
    twice (tiers included). Addresses: the uplink's ``gateway`` (router end) and ``address`` (wan
    end) distinct hosts of its subnet, inside ``sandbox_cidr``; every neighbour address a unique
    IPv4 address outside the sandbox CIDR and not the wan's own ``169.254.0.1``.
    """
    if not (isinstance(plan.get("uplink"), dict) and isinstance(plan.get("world"), dict)):
        return None
    world, up = plan["world"], plan["uplink"]
    try:
        sandbox = ipaddress.IPv4Network(plan.get("sandbox_cidr"), strict=True)
    except (ValueError, TypeError):
        raise NetnsError(f"sandbox_cidr {plan.get('sandbox_cidr')!r} is not an IPv4 network; the wan routes it "
                         "back through the uplink, fix the plan.", field="sandbox_cidr") from None
    seen = {plan["router"]["ns"]} | {t[f] for t in tiers.values() for f in ("ns", "veth_host", "veth_peer")}

    def name(value, field, limit):
        _check_name(value, field, limit, prefix)
        if value in seen:
            raise NetnsError(f"{field} {value!r} is used twice; fix the plan.", field=field)
        seen.add(value)

    name(world.get("ns"), "world.ns", NS_NAME_MAX)
    name(up.get("veth_host"), "uplink.veth_host", IFNAMSIZ)
    name(up.get("veth_peer"), "uplink.veth_peer", IFNAMSIZ)
    try:
        subnet = ipaddress.IPv4Network(up.get("subnet"), strict=True)
    except (ValueError, TypeError):
        raise NetnsError(f"uplink.subnet {up.get('subnet')!r} is not an IPv4 network; fix the plan.",
                         field="uplink.subnet") from None
    if subnet.prefixlen > 30 or not subnet.subnet_of(sandbox):
        raise NetnsError(f"uplink.subnet {subnet} must hold two hosts inside the sandbox CIDR {sandbox}; "
                         "fix the plan.", field="uplink.subnet")
    if any(subnet.overlaps(ipaddress.IPv4Network(t["subnet"])) for t in tiers.values()):
        raise NetnsError(f"uplink.subnet {subnet} overlaps a tier's subnet; fix the plan.", field="uplink.subnet")
    hosts = {}
    for field in ("address", "gateway"):
        try:
            host = ipaddress.IPv4Address(str(up.get(field)).split("/", maxsplit=1)[0])
        except ValueError:
            raise NetnsError(f"uplink.{field} {up.get(field)!r} is not an IPv4 address; fix the plan.",
                             field=f"uplink.{field}") from None
        if host not in subnet or host in (subnet.network_address, subnet.broadcast_address):
            raise NetnsError(f"uplink.{field} {host} is not a host of uplink.subnet {subnet}; fix the plan.",
                             field=f"uplink.{field}")
        hosts[field] = host
    if hosts["address"] == hosts["gateway"]:
        raise NetnsError(f"uplink.gateway {hosts['gateway']} is the same as uplink.address; fix the plan.",
                         field="uplink.gateway")
    neighbours, used = {}, {}
    raw = world.get("neighbours")
    if not isinstance(raw, dict):
        raise NetnsError("world.neighbours must be a mapping of neighbour kinds; fix the plan.",
                         field="world.neighbours")
    for kind, spec in sorted(raw.items()):
        base = f"world.neighbours.{kind}"
        if not isinstance(spec, dict):
            raise NetnsError(f"{base} must be a mapping; fix the plan.", field=base)
        name(spec.get("ns"), f"{base}.ns", NS_NAME_MAX)
        name(spec.get("veth_host"), f"{base}.veth_host", IFNAMSIZ)
        name(spec.get("veth_peer"), f"{base}.veth_peer", IFNAMSIZ)
        addresses = spec.get("addresses")
        if not isinstance(addresses, (list, tuple)) or not addresses:
            raise NetnsError(f"{base}.addresses must list at least one address; fix the plan.",
                             field=f"{base}.addresses")
        clean = []
        for value in addresses:
            try:
                address = ipaddress.IPv4Address(value)
            except ValueError:
                raise NetnsError(f"{base}.addresses: {value!r} is not an IPv4 address; fix the plan.",
                                 field=f"{base}.addresses") from None
            if address in sandbox or str(address) == WAN_ADDRESS or address.is_loopback or address.is_multicast \
                    or address.is_unspecified or address == ipaddress.IPv4Address("255.255.255.255"):
                raise NetnsError(f"{base}.addresses: {address} must be a unicast address outside the sandbox "
                                 f"CIDR {sandbox} and not {WAN_ADDRESS}; fix the plan.", field=f"{base}.addresses")
            if str(address) in used:
                raise NetnsError(f"{base}.addresses: {address} is also {used[str(address)]}'s; every neighbour "
                                 "address must be unique, fix the plan.", field=f"{base}.addresses")
            used[str(address)] = kind
            clean.append(str(address))
        neighbours[kind] = dict(spec, addresses=clean)
    return {"ns": world["ns"], "sandbox_cidr": str(sandbox), "neighbours": neighbours,
            "uplink": dict(up, address=str(hosts["address"]), gateway=str(hosts["gateway"]),
                           subnet=str(subnet), prefixlen=subnet.prefixlen)}


# ---------------------------------------------------------------- create


def create(plan):
    """Build the router namespace and one namespace per tier, joined by veth pairs.

    Idempotent: what exists is kept, addresses and routes are replaced, a half-built veth
    pair is rebuilt. Returns ``{"changed": bool, "state": read_state(prefix), "mode": "root" |
    "rootless", "holder_pid": int | None}``. The plan is validated and :func:`preflight` passes
    before anything is created. Not root: everything is built inside the drill's rootless holder
    (:func:`start_holder`, started here when it is not alive).
    """
    prefix, router, tiers = validate_plan(plan)
    world = validate_world(plan, prefix, tiers)
    mode = preflight()["mode"]
    holder = start_holder(prefix) if mode == "rootless" else None
    before = read_state(prefix)
    existing = set(_namespaces())
    ip = _tool("ip")
    namespaces = [router] + [t["ns"] for t in tiers.values()]
    if world:
        namespaces += [world["ns"]] + [n["ns"] for n in world["neighbours"].values()]
    for ns in namespaces:
        if ns not in existing:
            _run([ip, "netns", "add", ns], what=f"creating namespace {ns}")
        _run([ip, "-n", ns, "link", "set", "lo", "up"])
    _sysctl_forward(router, True)
    for spec in tiers.values():
        host, peer, ns = spec["veth_host"], spec["veth_peer"], spec["ns"]
        _ensure_veth(router, host, ns, peer)
        plen = spec["prefixlen"]
        _set_only_address(router, host, f"{spec['gateway']}/{plen}")
        _set_only_address(ns, peer, f"{spec['address']}/{plen}")
        _run([ip, "-n", router, "link", "set", host, "up"])
        _run([ip, "-n", ns, "link", "set", peer, "up"])
        _run([ip, "-n", ns, "route", "replace", "default", "via", spec["gateway"], "dev", peer])
        harden_tier(ns)
    if world:
        _create_world(router, world)
    after = read_state(prefix)
    return {"changed": after != before, "state": after, "mode": mode, "holder_pid": holder}


def _ensure_veth(outer, host, inner, peer):
    """A veth pair created inside ``outer`` with its peer moved straight into ``inner`` (never in the
    host namespace); a half-built pair (one end missing) is rebuilt."""
    ip = _tool("ip")
    host_links = {link["ifname"] for link in _ip_json("link", "show", ns=outer)}
    peer_links = {link["ifname"] for link in _ip_json("link", "show", ns=inner)}
    if host in host_links and peer not in peer_links:
        _run([ip, "-n", outer, "link", "del", host])
        host_links.discard(host)
    if host not in host_links:
        if peer in peer_links:
            _run([ip, "-n", inner, "link", "del", peer])
        _run([ip, "-n", outer, "link", "add", host, "type", "veth", "peer", "name", peer, "netns", inner],
             what=f"creating veth pair {host}/{peer}")


def _create_world(router, world):
    """The wan namespace behind the router's uplink and the neighbours joined to it (see :func:`validate_world`)."""
    ip = _tool("ip")
    wan, up = world["ns"], world["uplink"]
    _ensure_veth(router, up["veth_host"], wan, up["veth_peer"])
    _set_only_address(router, up["veth_host"], f"{up['gateway']}/{up['prefixlen']}")
    _set_only_address(wan, up["veth_peer"], f"{up['address']}/{up['prefixlen']}")
    _run([ip, "-n", router, "link", "set", up["veth_host"], "up"])
    _run([ip, "-n", wan, "link", "set", up["veth_peer"], "up"])
    _run([ip, "-n", router, "route", "replace", "default", "via", up["address"], "dev", up["veth_host"]])
    _run([ip, "-n", wan, "route", "replace", world["sandbox_cidr"], "via", up["gateway"], "dev", up["veth_peer"]])
    _sysctl_forward(wan, True)
    for spec in world["neighbours"].values():
        near, far, ns = spec["veth_host"], spec["veth_peer"], spec["ns"]
        _ensure_veth(wan, near, ns, far)
        _set_only_address(wan, near, f"{WAN_ADDRESS}/32")
        _set_only_address(ns, far, *(f"{a}/32" for a in spec["addresses"]))
        _run([ip, "-n", wan, "link", "set", near, "up"])
        _run([ip, "-n", ns, "link", "set", far, "up"])
        _run([ip, "-n", ns, "route", "replace", "default", "via", WAN_ADDRESS, "dev", far, "onlink"])
        wanted = {f"{a}/32" for a in spec["addresses"]}
        for route in _ip_json("-4", "route", "show", "dev", near, ns=wan):
            dst = route["dst"] if "/" in route["dst"] else f"{route['dst']}/32"
            if dst not in wanted:
                _run([ip, "-n", wan, "route", "del", route["dst"], "dev", near])
        for address in spec["addresses"]:
            _run([ip, "-n", wan, "route", "replace", f"{address}/32", "dev", near])
        allow_low_ports(ns)


def _set_only_address(ns, dev, *cidrs):
    ip = _tool("ip")
    links = _ip_json("addr", "show", "dev", dev, ns=ns)
    for info in (links[0].get("addr_info", []) if links else []):
        if info.get("family") == "inet" and f"{info['local']}/{info['prefixlen']}" not in cidrs:
            _run([ip, "-n", ns, "addr", "del", f"{info['local']}/{info['prefixlen']}", "dev", dev])
    for cidr in cidrs:
        _run([ip, "-n", ns, "addr", "replace", cidr, "dev", dev])


def _sysctl_forward(ns, on):
    _set_sysctls(ns, {"net.ipv4.ip_forward": "1" if on else "0"}, "enabling forwarding")


_TIER_SYSCTLS = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
_LISTEN_SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "0"}
SYSCTLS = ("net.ipv4.ip_forward", *_TIER_SYSCTLS, *_LISTEN_SYSCTLS)


def _set_sysctls(ns, values, what):
    """Write per-namespace sysctls (``/proc/sys/net`` is the namespace's own) in one privileged call."""
    script = "".join(f"echo {value} > /proc/sys/{key.replace('.', '/')} && " for key, value in values.items())
    _run([_tool("ip"), "netns", "exec", ns, "sh", "-c", script + "true"], what=f"{what} in {ns}")


def harden_tier(ns):
    """A tier namespace: IPv6 off (``net.ipv6.conf.{all,default}.disable_ipv6=1``) and low ports
    listenable unprivileged (``net.ipv4.ip_unprivileged_port_start=0``). :func:`create` calls it
    for every tier; idempotent."""
    _check_ns(ns)
    _set_sysctls(ns, {**_TIER_SYSCTLS, **_LISTEN_SYSCTLS}, "hardening the tier")


def allow_low_ports(ns):
    """Let an unprivileged workload in ``ns`` listen on any port (``ip_unprivileged_port_start=0``);
    :func:`create` calls it for tiers and neighbours; idempotent."""
    _check_ns(ns)
    _set_sysctls(ns, _LISTEN_SYSCTLS, "allowing unprivileged low ports")


def read_sysctls(ns):
    """The namespace's values of :data:`SYSCTLS` (forwarding, IPv6 off, unprivileged port start), as strings."""
    _check_ns(ns)
    paths = [f"/proc/sys/{key.replace('.', '/')}" for key in SYSCTLS]
    out = _run([_tool("ip"), "netns", "exec", ns, "cat", *paths], what=f"reading the sysctls of {ns}").stdout
    values = out.split()
    if len(values) != len(SYSCTLS):
        raise NetnsError(f"the sysctls of {ns} could not be read ({len(values)} of {len(SYSCTLS)} values); "
                         "check the kernel.", namespace=ns)
    return dict(zip(SYSCTLS, values, strict=True))


# ---------------------------------------------------------------- rules


def _check_ns(ns, use=True):
    _check_name(ns, "namespace", NS_NAME_MAX)
    match = _PLAN_PREFIX.match(ns)
    if not match:
        raise NetnsError(f"namespace {ns!r} is not a drill namespace (drg-<short id>-...); pass one of the "
                         "drill's namespaces.", namespace=ns)
    if use:
        _use(match.group(1))
    if ns not in _namespaces():
        raise NetnsError(f"namespace {ns} does not exist; create the plan first.", namespace=ns)


def apply_ruleset(ns, text):
    """Apply an nft ruleset inside namespace ``ns`` in one transaction (``nft -f -``).

    Each ``table <family> <name> {`` the text declares is replaced as a whole (declared,
    deleted and rebuilt in the same transaction), so re-applying is idempotent and a
    rejected ruleset leaves the previous one untouched. Returns ``{"changed": bool}``:
    whether the rules differ from before (rule handles and counter values ignored).
    Re-applying resets the table's counters: read them first when they matter.
    """
    _check_ns(ns)
    if not isinstance(text, str) or not text.strip():
        raise NetnsError("the ruleset is empty; pass the translated nft ruleset.", namespace=ns)
    before = _normalised(read_ruleset(ns))
    reset = "".join(f"table {fam} {name}\ndelete table {fam} {name}\n"
                    for fam, name in dict.fromkeys(_TABLE.findall(text)))
    proc = _run([_tool("ip"), "netns", "exec", ns, _tool("nft"), "-f", "-"], input_text=reset + text, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise NetnsError(f"nft rejected the ruleset for namespace {ns} (nothing was changed): "
                         f"{'; '.join(lines[:2])}; fix the ruleset.", namespace=ns, rc=proc.returncode)
    return {"changed": _normalised(read_ruleset(ns)) != before}


def read_ruleset(ns):
    """The live ruleset of namespace ``ns``: ``nft -j list ruleset``'s ``nftables`` list (metainfo dropped)."""
    _check_ns(ns)
    out = _run([_tool("ip"), "netns", "exec", ns, _tool("nft"), "-j", "list", "ruleset"],
               what=f"reading the ruleset of {ns}").stdout
    try:
        items = json.loads(out)["nftables"]
    except (ValueError, KeyError):
        raise NetnsError(f"nft -j gave no JSON ruleset for {ns}; install an nftables built with JSON support.",
                         namespace=ns) from None
    return [item for item in items if "metainfo" not in item]


def _normalised(items):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("handle", "packets", "bytes")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(items)


# ---------------------------------------------------------------- state and destroy


def read_state(prefix):
    """What exists under ``prefix``, read back from the kernel.

    ``{"prefix", "namespaces": {ns: {"ip_forward": bool, "links": {ifname: {"up", "addresses"}},
    "routes": [{"dst", "dev", "gateway"}]}}, "host_links": [names in the host namespace]}``
    (loopback left out; IPv4 addresses and main-table routes).
    """
    check_prefix(prefix)
    _use(prefix)
    ip = _tool("ip")
    namespaces = {}
    for ns in (n for n in _namespaces() if n.startswith(prefix)):
        links = {}
        for link in _ip_json("addr", "show", ns=ns):
            if link["ifname"] == "lo":
                continue
            links[link["ifname"].split("@")[0]] = {
                "up": "UP" in link.get("flags", []),
                "addresses": sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                                    if a.get("family") == "inet"),
            }
        routes = sorted(({"dst": r["dst"], "dev": r.get("dev"), "gateway": r.get("gateway")}
                         for r in _ip_json("-4", "route", "show", ns=ns)), key=lambda r: r["dst"])
        forward = _run([ip, "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
        namespaces[ns] = {"ip_forward": forward == "1", "links": links, "routes": routes}
    return {"prefix": prefix, "namespaces": namespaces, "host_links": _host_links(prefix)}


def _host_links(prefix):
    if os.geteuid() != 0 and _current() is None:
        return []
    return sorted(link["ifname"] for link in _ip_json("link", "show") if link["ifname"].startswith(prefix))


def _pids_in(names):
    """Pids of every process whose network namespace is one of ``names`` (what ``ip netns pids`` reads,
    for all of them in one pass over /proc)."""
    inodes = set()
    for ns in names:
        try:
            inodes.add(os.stat(os.path.join("/run/netns", ns)).st_ino)
        except OSError:
            continue
    if not inodes:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _pids(ns):
    out = _run([_tool("ip"), "netns", "pids", ns], check=False).stdout
    return sorted(int(p) for p in out.split() if p.isdigit())


def host_pids(ns):
    """The processes in ``ns`` as pids of the caller's own ``/proc``. Rootless, ``ip netns pids``
    lists pids of the holder's pid namespace: each is matched to the process whose ``NSpid`` holds
    it at the holder's level and whose parents lead into the holder's pid namespace."""
    _check_ns(ns)
    inner = set(_pids(ns))
    holder = _current()
    if holder is None or not inner:
        return sorted(inner)
    pidns = _ns_inodes(holder["target"]).get("pid")
    level = len(_nspid(holder["target"])) - 1
    out = []
    for pid in _all_pids():
        nspid = _nspid(pid)
        if level < 1 or len(nspid) <= level or nspid[level] not in inner:
            continue
        walk, seen = pid, set()
        while walk > 1 and walk not in seen and _ns_inodes(walk).get("pid") != pidns:
            seen.add(walk)
            walk = _ppid(walk)
        if walk > 1 and _ns_inodes(walk).get("pid") == pidns:
            out.append(pid)
    return sorted(out)


def _nspid(pid):
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:] if p.isdigit()]
    return []


def _ppid(pid):
    stat_line = _read(f"/proc/{pid}/stat") or ""
    fields = stat_line.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def destroy(prefix, wait=10.0):
    """Remove everything under ``prefix``: processes inside, namespaces, host links; prove none remain.

    Idempotent. Returns ``{"changed", "removed": {"namespaces", "host_links", "pids"}}``;
    raises :class:`NetnsError` naming whatever is still there afterwards. Rootless: SIGKILLs the
    drill's holder (found by its marker), whose pid namespace takes every process, mount and
    namespace of the drill with it, and proves that no process is left in any of its namespaces.
    As root it also stops a rootless holder left under the prefix (the reaper's case).
    """
    check_prefix(prefix)
    if os.geteuid() != 0:
        return _destroy_rootless(prefix, wait)
    ip = _tool("ip")
    names = [n for n in _namespaces() if n.startswith(prefix)]
    host_links = _host_links(prefix)
    killed = []
    deadline = time.monotonic() + wait
    pids = _pids_in(names)
    while pids:  # every process of every namespace first, then the namespaces in one ip -batch
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                if pid not in killed:
                    killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} in the namespaces of {prefix} did not exit after SIGKILL within "
                             f"{wait:g}s; check them and run teardown again.", prefix=prefix, pids=pids)
        time.sleep(0.02)
        pids = _pids_in(names)
    if names:
        _run([ip, "-force", "-batch", "-"], input_text="".join(f"netns del {ns}\n" for ns in names), check=False)
    for link in host_links:
        _run([ip, "link", "del", link], check=False)
    for item in find_holders(prefix):
        killed.extend(_stop_holder(prefix, {"pid": item["pid"], "target": (_holder_children(item["pid"]) or [0])[0]},
                                   wait))
    _reap()
    remaining = [n for n in _namespaces() if n.startswith(prefix)] + _host_links(prefix)
    if remaining:
        raise NetnsError(f"{len(remaining)} object(s) under {prefix} remain after destroy "
                         f"({', '.join(remaining)}); remove them by hand or run teardown again.",
                         prefix=prefix, remaining=remaining)
    return {
        "changed": bool(names or host_links),
        "removed": {"namespaces": sorted(names), "host_links": host_links, "pids": sorted(killed)},
    }


def _destroy_rootless(prefix, wait):
    holder = _use(prefix)
    if holder is None:
        return {"changed": False, "removed": {"namespaces": [], "host_links": [], "pids": []}}
    before = read_state(prefix)
    killed = _stop_holder(prefix, holder, wait)
    left = find_holders(prefix)
    if left:
        raise NetnsError(f"the rootless holder of {prefix} is still there after destroy (pids "
                         f"{[h['pid'] for h in left]}); kill it and run teardown again.", prefix=prefix)
    return {"changed": True,
            "removed": {"namespaces": sorted(before["namespaces"]), "host_links": before["host_links"],
                        "pids": killed}}
