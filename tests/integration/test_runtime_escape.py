"""Escape tests: a compromised workload in a tier stays in.

Every attempt runs as the runtime runs a workload, through ``_netns.run_in`` in the ``app``
tier of a real drill (router ruleset translated from the boundary and applied, a production
neighbour holding a bait listener). Each attempt must fail with its specific error, and
afterwards the router's ruleset is the same as before and the boundary still holds: the
declared tier rule connects, production times out.

Root only (namespaces need it); skipped with the reason otherwise. Each test builds under a
prefix of its own and destroys it even when it fails. Traffic only ever goes between
namespaces the test created.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy as nft_policy
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import SYSTEM_PYTHON

pytestmark = needs_root_and("ip", "nft", "setpriv", "nsenter", "unshare", files=(SYSTEM_PYTHON,))

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DB_PORT = 5432
BAIT = "10.0.0.1"
EPERM_NETLINK = "Operation not permitted"

BOUNDARY = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]}],
    "ingress": [],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [DB_PORT]}],
}

SERVER = r"""
import select, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("ready", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    if select.select([s], [], [], 0.5)[0]:
        conn, _ = s.accept()
        conn.sendall(b"ok")
        conn.close()
"""

CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected" if c.recv(2) == b"ok" else "no-banner")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("error: %s" % e)
"""

# Runs each named attempt and prints {name: "ok" | errno name}.
ATTEMPTS = r"""
import ctypes, errno, json, os, socket, sys
router = sys.argv[1]
def setns():
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/run/netns/" + router, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
def sysctl(path, value):
    with open(path, "w") as handle:
        handle.write(value)
attempts = {
    "raw_icmp": lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "raw_packet": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
    "ipv6_bind": lambda: socket.socket(socket.AF_INET6).bind(("::1", 0)),
    "ipv6_connect": lambda: socket.socket(socket.AF_INET6).connect(("::1", 22)),
    "ipv6_reenable": lambda: sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "0"),
    "forwarding_on": lambda: sysctl("/proc/sys/net/ipv4/ip_forward", "1"),
    "setns_router": setns,
}
result = {}
for name in sys.argv[2:]:
    try:
        attempts[name]()
        result[name] = "ok"
    except OSError as exc:
        result[name] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(result))
"""


def _probe(ns, address, port, timeout):
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address, str(port), str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 10)
    return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def drill(tmp_path):
    """A drill's runtime: tiers, router ruleset, a production bait and a db listener (both unprivileged)."""
    boundary = parse_boundary(BOUNDARY)
    plan = nft_policy.address_plan(boundary, f"dr-escape-{uuid.uuid4().hex}")
    prefix = plan["prefix"]
    plan["world"] = {"ns": prefix + "wan", "neighbours": {
        "production": {"ns": prefix + "prod", "veth_host": prefix + "pw", "veth_peer": prefix + "pn",
                       "addresses": [BAIT]},
        "control_plane": {"ns": prefix + "cp", "veth_host": prefix + "cw", "veth_peer": prefix + "cn",
                          "addresses": ["198.51.100.1"]},
    }}
    try:
        netns.create(plan)
        router = plan["router"]["ns"]
        netns.apply_ruleset(router, nft_policy.router_ruleset(boundary, plan, plan["table"]))
        db = plan["tiers"]["db"]
        for ns, address in ((db["ns"], db["address"]), (prefix + "prod", BAIT)):
            out = tmp_path / f"{ns}.out"
            netns.spawn(ns, [SYSTEM_PYTHON, "-c", SERVER, address, str(DB_PORT)], stdout_path=str(out))
            deadline = time.monotonic() + 10
            while "ready" not in out.read_text():
                assert time.monotonic() < deadline, f"listener in {ns} did not start"
                time.sleep(0.05)
        plan["ruleset_before"] = netns._normalised(netns.read_ruleset(router))
        yield plan
    finally:
        netns.destroy(prefix)
        assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                check=True).stdout.split() if ns.startswith(prefix)]


def workload(plan, argv, **kwargs):
    """Run ``argv`` in the app tier exactly as the runtime runs a workload."""
    return netns.run_in(plan["tiers"]["app"]["ns"], argv, env={"PATH": PATH, **kwargs.pop("env", {})}, **kwargs)


def assert_boundary_holds(plan):
    """The router's rules are unchanged and still govern: the tier rule connects, production is dropped."""
    router = plan["router"]["ns"]
    assert netns._normalised(netns.read_ruleset(router)) == plan["ruleset_before"]
    assert [t for t in netns.read_ruleset(plan["tiers"]["app"]["ns"]) if "table" in t] == []
    app = plan["tiers"]["app"]["ns"]
    assert _probe(app, plan["tiers"]["db"]["address"], DB_PORT, 3) == "connected"
    assert _probe(app, BAIT, DB_PORT, 0.5) == "timeout"


def test_a_workload_cannot_flush_or_add_nft_rules_in_its_tier_or_the_router(drill):
    router = drill["router"]["ns"]
    attempts = {
        "flush own": ["nft", "flush", "ruleset"],
        "add table own": ["nft", "add", "table", "inet", "escape"],
        "flush router via ip netns exec": ["ip", "netns", "exec", router, "nft", "flush", "ruleset"],
        "flush router via nsenter": ["nsenter", f"--net=/run/netns/{router}", "nft", "flush", "ruleset"],
        "add accept in router via nsenter": ["nsenter", f"--net=/run/netns/{router}", "nft", "insert", "rule",
                                             "inet", drill["table"], "forward", "accept"],
    }
    expected = {
        "flush own": "Error: Could not process rule: Operation not permitted",
        "add table own": "Error: Could not process rule: Operation not permitted",
        "flush router via ip netns exec": f'setting the network namespace "{router}" failed: Operation not permitted',
        "flush router via nsenter": "nsenter: reassociate to namespace 'ns/net' failed: Operation not permitted",
        "add accept in router via nsenter":
            "nsenter: reassociate to namespace 'ns/net' failed: Operation not permitted",
    }
    seen = {}
    for name, argv in attempts.items():
        out = workload(drill, argv)
        assert out.returncode != 0, name
        seen[name] = out.stderr.strip().splitlines()[0]
    assert seen == expected
    assert_boundary_holds(drill)


def test_a_new_user_namespace_gives_a_workload_no_power_over_its_tier(drill):
    """Unprivileged user namespaces are allowed on this host: being root in one's own grants nothing here."""
    veth = drill["tiers"]["app"]["veth_peer"]
    for argv in (["unshare", "--user", "--map-root-user", "nft", "flush", "ruleset"],
                 ["unshare", "--user", "--map-root-user", "ip", "route", "add", "10.9.9.0/24", "dev", veth]):
        out = workload(drill, argv)
        assert out.returncode != 0 and EPERM_NETLINK in out.stderr, (argv, out.stderr)
    assert_boundary_holds(drill)


def test_a_workload_cannot_add_routes_or_addresses(drill):
    veth = drill["tiers"]["app"]["veth_peer"]
    state = netns.read_state(drill["prefix"])["namespaces"][drill["tiers"]["app"]["ns"]]
    for argv in (["ip", "route", "add", "10.0.0.0/16", "dev", veth],
                 ["ip", "route", "replace", "default", "dev", veth],
                 ["ip", "addr", "add", "10.0.0.99/32", "dev", veth],
                 ["ip", "link", "set", veth, "down"]):
        out = workload(drill, argv)
        assert (out.returncode, out.stderr.strip()) == (2, "RTNETLINK answers: Operation not permitted"), argv
    assert netns.read_state(drill["prefix"])["namespaces"][drill["tiers"]["app"]["ns"]] == state
    assert_boundary_holds(drill)


def test_a_workload_cannot_open_raw_sockets_use_ipv6_turn_it_back_on_or_enter_the_router(drill):
    names = ["raw_icmp", "raw_packet", "ipv6_bind", "ipv6_connect", "ipv6_reenable", "forwarding_on",
             "setns_router"]
    out = workload(drill, [SYSTEM_PYTHON, "-c", ATTEMPTS, drill["router"]["ns"], *names])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "raw_icmp": "EPERM", "raw_packet": "EPERM",
        "ipv6_bind": "EADDRNOTAVAIL", "ipv6_connect": "EADDRNOTAVAIL",
        "ipv6_reenable": "EACCES", "forwarding_on": "EACCES",
        "setns_router": "EPERM",
    }
    v6 = workload(drill, ["ip", "-6", "addr", "add", "fd00::1/64", "dev", drill["tiers"]["app"]["veth_peer"]])
    assert (v6.returncode, v6.stderr.strip()) == (2, "RTNETLINK answers: Operation not permitted")
    assert netns.read_sysctls(drill["tiers"]["app"]["ns"])["net.ipv6.conf.all.disable_ipv6"] == "1"
    assert_boundary_holds(drill)


def test_a_workload_cannot_reach_the_controllers_credentials(drill, monkeypatch):
    secret = f"controller-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACONTROLLER")
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret)
    folder = tempfile.mkdtemp(prefix="drg-escape-")
    try:
        os.chmod(folder, 0o755)  # noqa: S103 - the directory is open; the file's own mode must hold
        credentials = os.path.join(folder, "credentials")
        fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"[default]\naws_secret_access_key = {secret}\n".encode())
        os.close(fd)
        assert stat.S_IMODE(os.stat(credentials).st_mode) == 0o600
        # Reports names and outcomes only, never a value read, so a failing run prints no secret.
        code = (
            "import errno, json, os, sys\n"
            "environ = dict(v.split('=', 1) for v in open('/proc/self/environ').read().split('\\0') if v)\n"
            "reads = {}\n"
            "for path in sys.argv[2:]:\n"
            "    try:\n        reads[path] = 'readable, holds the secret: %s' % (sys.argv[1] in open(path).read())\n"
            "    except OSError as e:\n        reads[path] = errno.errorcode[e.errno]\n"
            "print(json.dumps({'environ': sorted(environ), 'secret_in_env': sys.argv[1] in environ.values(),\n"
            "                  'env_values': [environ.get('PATH'), environ.get('DRILL_SESSION')], 'reads': reads}))\n"
        )
        paths = [credentials, os.path.expanduser("~root/.aws/credentials"), f"/proc/{os.getpid()}/environ",
                 "/proc/1/environ"]
        # The secret travels in argv only as the needle to look for; the workload compares, never prints it.
        out = workload(drill, [SYSTEM_PYTHON, "-c", code, secret, *paths], env={"DRILL_SESSION": "minted"})
        assert out.returncode == 0, "the credential check could not run"
        seen = json.loads(out.stdout)
        assert seen["environ"] == ["DRILL_SESSION", "PATH"]
        assert seen["env_values"] == [PATH, "minted"] and seen["secret_in_env"] is False
        assert seen["reads"] == dict.fromkeys(paths, "EACCES")
    finally:
        shutil.rmtree(folder)
    assert_boundary_holds(drill)
