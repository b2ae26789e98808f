"""_netns: real network namespaces, veth pairs and nftables, probed with real TCP; always cleaned up.

Root only (CI runs as root, with iproute2 and nftables installed by ``make venv``). Every test
works under a prefix of its own (``drg-t<random>-``), so two xdist workers never meet, and the
``prefix`` fixture destroys by that prefix even when the test fails. Traffic only ever goes
between namespaces these tests create.
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
from netns_kit import needs_root_and
from netns_kit import SYSTEM_PYTHON

pytestmark = needs_root_and("ip", "nft", "unshare")

TIERS = ("app", "db", "validation")
ALLOWED_PORT = 15432
DROPPED_PORT = 16379

# A listener on the tier's own address, bounded in time: prints "ready" once bound.
SERVER = r"""
import select, socket, sys, time
addr, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
socks = []
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(8)
    socks.append(s)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    readable, _, _ = select.select(socks, [], [], 0.5)
    for s in readable:
        conn, _ = s.accept()
        conn.sendall(b"ok")
        conn.close()
"""

# One TCP connect with a timeout; prints exactly what happened.
CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("connected" if c.recv(2) == b"ok" else "no-banner")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error: %s" % e)
"""


def make_plan(prefix):
    tiers = {}
    for i, name in enumerate(TIERS, start=1):
        tiers[name] = {
            "ns": f"{prefix}{name}",
            "veth_host": f"{prefix}{i}r",
            "veth_peer": f"{prefix}{i}t",
            "subnet": f"10.250.{i}.0/24",
            "address": f"10.250.{i}.2",
            "gateway": f"10.250.{i}.1",
        }
    return {"router": {"ns": f"{prefix}router"}, "tiers": tiers}


def ruleset(table):
    """Forwarding in the router: app may reach db on ALLOWED_PORT, nothing else crosses."""
    return f"""
table inet {table} {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        ip saddr 10.250.1.0/24 ip daddr 10.250.2.2 tcp dport {ALLOWED_PORT} accept
    }}
}}
"""


def host_names(prefix):
    """Namespaces and host links carrying the prefix, read with ip itself (not through _netns)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    namespaces = sorted(line.split()[0] for line in listed.splitlines() if line.startswith(prefix))
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    return namespaces, sorted(link["ifname"] for link in links if link["ifname"].startswith(prefix))


def probe(ns, address, port, timeout=1.5):
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address, str(port), str(timeout)],
        capture_output=True, text=True, timeout=timeout + 10,
    )
    return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def prefix():
    value = f"drg-t{uuid.uuid4().hex[:5]}-"
    assert host_names(value) == ([], [])
    try:
        yield value
    finally:
        netns.destroy(value)
        assert host_names(value) == ([], []), f"left behind under {value}"


@pytest.fixture
def listeners():
    """Start listeners inside namespaces; each is killed and reaped whatever happens."""
    procs = []

    def start(ns, address, *ports):
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, address, *map(str, ports)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "ready", proc.stderr.read() if proc.poll() is not None else line
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def test_create_builds_router_tiers_veths_addresses_and_routes_exactly(prefix):
    plan = make_plan(prefix)
    result = netns.create(plan)
    assert result["changed"] is True
    state = netns.read_state(prefix)
    router = plan["router"]["ns"]
    expected = {
        router: {
            "ip_forward": True,
            "links": {
                t["veth_host"]: {"up": True, "addresses": [f"{t['gateway']}/24"]} for t in plan["tiers"].values()
            },
            "routes": sorted(
                [{"dst": t["subnet"], "dev": t["veth_host"], "gateway": None} for t in plan["tiers"].values()],
                key=lambda r: r["dst"],
            ),
        },
    }
    for t in plan["tiers"].values():
        expected[t["ns"]] = {
            "ip_forward": False,
            "links": {t["veth_peer"]: {"up": True, "addresses": [f"{t['address']}/24"]}},
            "routes": sorted(
                [
                    {"dst": "default", "dev": t["veth_peer"], "gateway": t["gateway"]},
                    {"dst": t["subnet"], "dev": t["veth_peer"], "gateway": None},
                ],
                key=lambda r: r["dst"],
            ),
        }
    assert state == {"prefix": prefix, "namespaces": expected, "host_links": []}
    assert result["state"] == state
    # Idempotent: a second run changes nothing and says so.
    again = netns.create(plan)
    assert again["changed"] is False
    assert netns.read_state(prefix) == state


def test_ruleset_lets_the_allowed_port_connect_and_drops_the_other(prefix, listeners):
    plan = make_plan(prefix)
    netns.create(plan)
    app, db, validation = (plan["tiers"][t]["ns"] for t in TIERS)
    db_address = plan["tiers"]["db"]["address"]
    listeners(db, db_address, ALLOWED_PORT, DROPPED_PORT)
    # Without rules both ports connect through the router: the path itself works.
    assert probe(app, db_address, ALLOWED_PORT) == "connected"
    assert probe(app, db_address, DROPPED_PORT) == "connected"

    table = prefix + "router"
    applied = netns.apply_ruleset(plan["router"]["ns"], ruleset(table))
    assert applied["changed"] is True
    assert probe(app, db_address, ALLOWED_PORT) == "connected"
    assert probe(app, db_address, DROPPED_PORT) == "timeout"
    # The rule is bound to the app subnet: the validation tier may not use it.
    assert probe(validation, db_address, ALLOWED_PORT) == "timeout"

    rules = netns.read_ruleset(plan["router"]["ns"])
    tables = [item["table"] for item in rules if "table" in item]
    assert [(t["family"], t["name"]) for t in tables] == [("inet", table)]
    chains = [item["chain"] for item in rules if "chain" in item]
    assert [(c["name"], c["hook"], c["policy"]) for c in chains] == [("forward", "forward", "drop")]
    assert len([item for item in rules if "rule" in item]) == 2

    # Applying the same text again replaces the table atomically: same rules, not twice as many.
    again = netns.apply_ruleset(plan["router"]["ns"], ruleset(table))
    assert again["changed"] is False
    assert len([item for item in netns.read_ruleset(plan["router"]["ns"]) if "rule" in item]) == 2
    assert probe(app, db_address, ALLOWED_PORT) == "connected"
    assert probe(app, db_address, DROPPED_PORT) == "timeout"


def test_a_rejected_ruleset_changes_nothing(prefix):
    plan = make_plan(prefix)
    netns.create(plan)
    router = plan["router"]["ns"]
    table = prefix + "router"
    netns.apply_ruleset(router, ruleset(table))
    before = netns.read_ruleset(router)
    broken = ruleset(table).replace("policy drop;", "policy drop;\n        tcp dport 1 nosuchverb")
    with pytest.raises(netns.NetnsError) as err:
        netns.apply_ruleset(router, broken)
    assert err.value.detail["namespace"] == router
    assert "nft rejected the ruleset" in str(err.value)
    assert netns.read_ruleset(router) == before


def test_the_translated_boundary_applies_and_its_tier_rule_is_the_only_way_in(listeners):
    """The policy translator's plan and ruleset, built and applied here, probed, and verified as read back."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy as nft_policy
    from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

    boundary = parse_boundary({
        "sandbox_cidr": "10.213.0.0/16",
        "production_cidrs": ["10.0.0.0/16"],
        "egress": [],
        "ingress": [],
        "tiers": ["app", "db"],
        "tier_rules": [{"from": "app", "to": "db", "ports": [ALLOWED_PORT]}],
    })
    plan = nft_policy.address_plan(boundary, f"dr-netns-test-{uuid.uuid4().hex}")
    assert host_names(plan["prefix"]) == ([], [])
    try:
        netns.create(plan)
        router = plan["router"]["ns"]
        text = nft_policy.router_ruleset(boundary, plan, plan["table"])
        assert netns.apply_ruleset(router, text)["changed"] is True
        db = plan["tiers"]["db"]
        listeners(db["ns"], db["address"], ALLOWED_PORT, DROPPED_PORT)
        # Counted traffic between two applies: the rules are the same, so nothing changed.
        assert probe(plan["tiers"]["app"]["ns"], db["address"], DROPPED_PORT, timeout=0.3) == "timeout"
        assert netns.apply_ruleset(router, text)["changed"] is False
        assert probe(plan["tiers"]["app"]["ns"], db["address"], ALLOWED_PORT) == "connected"
        assert probe(plan["tiers"]["app"]["ns"], db["address"], DROPPED_PORT) == "timeout"
        assert probe(plan["tiers"]["validation"]["ns"], db["address"], ALLOWED_PORT) == "timeout"
        assert nft_policy.verify_ruleset(boundary, plan, netns.read_ruleset(router)) == []
    finally:
        netns.destroy(plan["prefix"])
        assert host_names(plan["prefix"]) == ([], [])


def test_destroy_kills_processes_and_leaves_nothing(prefix, listeners):
    plan = make_plan(prefix)
    netns.create(plan)
    netns.apply_ruleset(plan["router"]["ns"], ruleset(prefix + "router"))
    server = listeners(plan["tiers"]["db"]["ns"], plan["tiers"]["db"]["address"], ALLOWED_PORT)
    expected_ns = sorted([plan["router"]["ns"], *(t["ns"] for t in plan["tiers"].values())])
    assert host_names(prefix)[0] == expected_ns

    result = netns.destroy(prefix)
    assert result["changed"] is True
    assert result["removed"]["namespaces"] == expected_ns
    assert server.pid in result["removed"]["pids"]
    assert server.wait(timeout=5) == -9
    assert host_names(prefix) == ([], [])
    assert netns.read_state(prefix) == {"prefix": prefix, "namespaces": {}, "host_links": []}
    # Idempotent.
    assert netns.destroy(prefix)["changed"] is False


def test_destroy_refuses_a_prefix_that_is_not_one_drill(prefix):
    for bad in ("drg-", "drg", "", "drg-Ab-", "eth", "drg-a b-"):
        with pytest.raises(netns.NetnsError) as err:
            netns.destroy(bad)
        assert err.value.detail["prefix"] == bad


def _bin_without(tmp_path, *absent):
    """A PATH directory offering ip and nft, minus the tools named."""
    tmp_path.mkdir(exist_ok=True)
    for tool in ("ip", "nft"):
        if tool not in absent:
            os.symlink(shutil.which(tool), tmp_path / tool)
    return str(tmp_path)


def test_preflight_names_a_missing_nft_and_create_builds_nothing(prefix, tmp_path, monkeypatch):
    plan = make_plan(prefix)
    monkeypatch.setenv("PATH", _bin_without(tmp_path / "bin", "nft"))
    with pytest.raises(netns.NetnsError) as err:
        netns.preflight()
    assert err.value.detail["missing"] == ["nft (package nftables)"]
    assert str(err.value) == (
        "the netns runtime cannot start: nft (package nftables) not found on PATH; "
        "install what is missing (make venv as root installs iproute2 and nftables) and retry."
    )
    with pytest.raises(netns.NetnsError) as err:
        netns.create(plan)
    assert err.value.detail["missing"] == ["nft (package nftables)"]
    monkeypatch.undo()
    assert host_names(prefix) == ([], [])


def test_preflight_names_both_tools_when_both_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _bin_without(tmp_path / "bin", "ip", "nft"))
    with pytest.raises(netns.NetnsError) as err:
        netns.preflight()
    assert err.value.detail["missing"] == ["ip (package iproute2)", "nft (package nftables)"]


def test_preflight_passes_as_root_with_the_tools():
    assert netns.preflight() == {"root": True, "mode": "root", "ip": shutil.which("ip"), "nft": shutil.which("nft")}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("veth_host", "{p}1rxxxxxxxx", "longer than 15"),
        ("veth_peer", "{p}1T", "[a-z0-9-]"),
        ("ns", "{p}app_x", "[a-z0-9-]"),
        ("ns", "{other}app", "does not start with the plan's prefix"),
        ("address", "10.250.9.2", "not inside subnet"),
        ("gateway", "10.250.1.2", "same as"),
    ],
)
def test_a_bad_plan_fails_before_anything_is_created(prefix, field, value, reason):
    plan = make_plan(prefix)
    other = "drg-o" + prefix[5:]  # a foreign prefix the fixture would not clean: cleaned here
    plan["tiers"]["app"][field] = value.format(p=prefix, other=other)
    try:
        with pytest.raises(netns.NetnsError) as err:
            netns.create(plan)
        assert reason in str(err.value)
        assert err.value.detail["field"] == f"tiers.app.{field}"
        assert host_names(prefix) == ([], []) and host_names(other) == ([], [])
    finally:
        netns.destroy(other)


_AS_NOBODY = shutil.which("runuser") is not None and os.path.exists("/usr/bin/python3")


@pytest.mark.skipif(not _AS_NOBODY, reason="needs runuser and /usr/bin/python3 to run as the nobody user")
def test_preflight_without_root_or_user_namespaces_names_both_and_creates_nothing(prefix):
    # This host allows unprivileged user namespaces, so the "not allowed" verdict is forced here;
    # the sysctl reading behind it is tested on its own below.
    patch = "n._userns_allowed = lambda proc='/proc': (False, 'user.max_user_namespaces is 0 (set it above 0)')\n"
    out = _run_as_nobody(prefix, patch)
    result = json.loads(out.stdout or "{}")
    assert result.get("missing") == ["root or unprivileged user namespaces"], out.stderr
    assert result["msg"] == (
        "the netns runtime cannot start: not running as root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN) "
        "and unprivileged user namespaces are not available: user.max_user_namespaces is 0 (set it above 0); "
        "run it as root, or allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1, "
        "user.max_user_namespaces above 0, kernel.apparmor_restrict_unprivileged_userns=0), and retry."
    )
    assert host_names(prefix) == ([], []) and netns.find_holders(prefix) == []


@pytest.mark.parametrize(("files", "reason"), [
    ({"kernel/unprivileged_userns_clone": "0"}, "kernel.unprivileged_userns_clone is 0 (set it to 1)"),
    ({"user/max_user_namespaces": "0"}, "user.max_user_namespaces is 0 (set it above 0)"),
    ({"kernel/apparmor_restrict_unprivileged_userns": "1"},
     "kernel.apparmor_restrict_unprivileged_userns is 1 (set it to 0)"),
    ({}, ""),
])
def test_userns_allowed_names_the_sysctl_that_forbids_user_namespaces(tmp_path, files, reason):
    values = {"kernel/unprivileged_userns_clone": "1", "user/max_user_namespaces": "100",
              "kernel/apparmor_restrict_unprivileged_userns": "0", **files}
    for name, value in values.items():
        path = tmp_path / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    assert netns._userns_allowed(str(tmp_path)) == (not reason, reason)


def _run_as_nobody(prefix, code, home=None, timeout=60):
    """Run ``code`` as nobody with the module alone (standard library only) importable as ``n``."""
    head = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import _netns as n\n"
        "prefix, plan = sys.argv[2], json.loads(sys.argv[3])\n"
    )
    tail = (
        "try:\n    n.create(plan)\nexcept n.NetnsError as e:\n"
        "    print(json.dumps({'msg': str(e), 'missing': e.detail.get('missing')}))\n"
    ) if "n.create" not in code else ""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(netns.__file__, os.path.join(tmp, "_netns.py"))
        os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)  # noqa: S103 - nobody reads it
        os.chmod(os.path.join(tmp, "_netns.py"), stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={os.environ['PATH']}",
             f"HOME={home or '/nonexistent'}", "/usr/bin/python3", "-c", head + code + tail, tmp, prefix,
             json.dumps(make_plan(prefix))],
            capture_output=True, text=True, timeout=timeout, cwd="/",
        )


# Rootless, as nobody: build, rule, probe, try to escape, destroy; report what happened as JSON.
ROOTLESS = r"""
import os, shutil, tempfile, time
report = {"preflight": n.preflight()}
out = None
app, db, router = plan["tiers"]["app"]["ns"], plan["tiers"]["db"]["ns"], plan["router"]["ns"]
db_address = plan["tiers"]["db"]["address"]
try:
    created = n.create(plan)
    report["created"] = {"mode": created["mode"], "holder": created["holder_pid"] is not None,
                         "namespaces": sorted(created["state"]["namespaces"])}
    report["again_changed"] = n.create(plan)["changed"]
    report["holders"] = [h["prefix"] for h in n.find_holders()]
    report["sysctls"] = n.read_sysctls(app)
    n.apply_ruleset(router, RULESET)
    out = tempfile.mkdtemp(prefix="drg-rootless-")
    n.spawn(db, [PY, "-c", SERVER, db_address, str(ALLOWED), str(DROPPED)], stdout_path=out + "/listener")
    deadline = time.monotonic() + 10
    while "ready" not in open(out + "/listener").read() and time.monotonic() < deadline:
        time.sleep(0.05)
    def probe(port, timeout):
        return n.run_in(app, [PY, "-c", CLIENT, db_address, str(port), str(timeout)]).stdout.strip()
    report["probes"] = {"allowed": probe(ALLOWED, 3), "dropped": probe(DROPPED, 0.5)}
    who = n.run_in(app, [PY, "-c", WHOAMI], env={"ONLY": "this"})
    report["whoami"] = json.loads(who.stdout)
    path = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    report["escape"] = {
        "nft flush": n.run_in(app, ["nft", "flush", "ruleset"], env=path).stderr.strip().splitlines()[:1],
        "nft flush router": n.run_in(app, ["nsenter", "--net=/run/netns/" + router, "nft", "flush", "ruleset"],
                                     env=path).stderr.strip().splitlines()[:1],
        "route add": n.run_in(app, ["ip", "route", "add", "10.9.9.0/24", "dev", plan["tiers"]["app"]["veth_peer"]],
                              env=path).stderr.strip().splitlines()[:1],
        "credentials": n.run_in(app, [PY, "-c", READ, os.path.join(os.environ["HOME"], ".aws", "credentials"),
                                      "/proc/%d/environ" % os.getpid()]).stdout.strip(),
    }
    report["ruleset_rules"] = len([i for i in n.read_ruleset(router) if "rule" in i])
    report["probes_after"] = {"allowed": probe(ALLOWED, 3), "dropped": probe(DROPPED, 0.5)}
finally:
    destroyed = n.destroy(prefix)
    report["destroyed"] = {"changed": destroyed["changed"], "namespaces": destroyed["removed"]["namespaces"],
                           "pids": len(destroyed["removed"]["pids"])}
    report["holders_after"] = n.find_holders(prefix)
    report["state_after"] = n.read_state(prefix)
    if out:
        shutil.rmtree(out, ignore_errors=True)
print(json.dumps(report))
"""

READ = r"""
import errno, sys
out = []
for path in sys.argv[1:]:
    try:
        open(path).read()
        out.append("readable")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(" ".join(out))
"""


@pytest.mark.skipif(not _AS_NOBODY or not netns._userns_allowed()[0],
                    reason="rootless needs runuser, /usr/bin/python3 and unprivileged user namespaces")
def test_rootless_as_nobody_builds_rules_probes_confines_and_destroys_to_nothing(prefix):
    import pathlib

    home = pathlib.Path(tempfile.mkdtemp(prefix="drg-nobody-home-"))  # traversable, unlike pytest's tmp_path
    credentials = home / ".aws" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text("[default]\naws_secret_access_key = controller-secret\n")
    os.chmod(credentials, 0o600)
    os.chmod(home, 0o755)  # noqa: S103 - nobody's home
    subprocess.run(["chown", "-R", "nobody", str(home)], check=True)
    # Without the holder, nobody (the controller here) reads its own credentials: hiding them is what counts.
    assert subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(credentials)], capture_output=True,
                          text=True, check=False).returncode == 0
    consts = (f"PY = {SYSTEM_PYTHON!r}\nSERVER = {SERVER!r}\nCLIENT = {CLIENT!r}\nWHOAMI = {WHOAMI!r}\n"
              f"READ = {READ!r}\nALLOWED, DROPPED = {ALLOWED_PORT}, {DROPPED_PORT}\n"
              f"RULESET = {ruleset(prefix + 'router')!r}\n")
    try:
        out = _run_as_nobody(prefix, consts + ROOTLESS, home=str(home), timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        report = json.loads(out.stdout)
    finally:
        netns.destroy(prefix)  # as root this also stops a holder the run left behind
        shutil.rmtree(home)
    names = sorted([f"{prefix}router", *(f"{prefix}{t}" for t in TIERS)])
    assert report["preflight"]["mode"] == "rootless" and report["preflight"]["root"] is False
    assert report["created"] == {"mode": "rootless", "holder": True, "namespaces": names}
    assert report["again_changed"] is False
    assert report["holders"] == [prefix]
    assert report["sysctls"]["net.ipv6.conf.all.disable_ipv6"] == "1"
    assert report["probes"] == {"allowed": "connected", "dropped": "timeout"}
    # uid 0 of the holder's user namespace (the only uid it maps), and no capability at all.
    assert report["whoami"]["caps"] == NO_CAPS and report["whoami"]["no_new_privs"] == "1"
    assert report["whoami"]["env"] == {"ONLY": "this"} and report["whoami"]["cwd"] == "/"
    assert report["escape"] == {
        "nft flush": ["Error: Could not process rule: Operation not permitted"],
        "nft flush router": ["nsenter: reassociate to namespace 'ns/net' failed: Operation not permitted"],
        "route add": ["RTNETLINK answers: Operation not permitted"],
        # ~/.aws is hidden by the holder; the controller's /proc entry is outside the holder's pid namespace.
        "credentials": "ENOENT ENOENT",
    }
    assert report["ruleset_rules"] == 2
    assert report["probes_after"] == {"allowed": "connected", "dropped": "timeout"}
    assert report["destroyed"]["changed"] is True and report["destroyed"]["namespaces"] == names
    assert report["destroyed"]["pids"] >= 3  # the holder, its child and the listener at least
    assert report["holders_after"] == []
    assert report["state_after"] == {"prefix": prefix, "namespaces": {}, "host_links": []}
    assert netns.find_holders(prefix) == []
    assert subprocess.run(["pgrep", "-u", "nobody", "-f", f"{prefix}holder"], check=False).returncode == 1


# ---------------------------------------------------------------- run_in / spawn


# What a workload sees of itself: ids, groups, capability sets, no_new_privs, environment, cwd.
WHOAMI = r"""
import json, os
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
print(json.dumps({
    "uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups(),
    "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "no_new_privs": status["NoNewPrivs"].strip(), "cwd": os.getcwd(),
    # The environment as exec'd (Python's own locale coercion adds LC_CTYPE to os.environ later).
    "env": dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\0") if v),
}))
"""

NO_CAPS = {k: "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


@pytest.fixture
def one_tier(prefix):
    plan = make_plan(prefix)
    netns.create(plan)
    return plan


def test_run_in_runs_unprivileged_with_no_caps_no_new_privs_and_only_the_given_env(one_tier, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "controller-secret")
    monkeypatch.chdir("/tmp")
    ns = one_tier["tiers"]["app"]["ns"]
    out = netns.run_in(ns, [SYSTEM_PYTHON, "-c", WHOAMI], env={"DRILL_TOKEN": "minted"})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["uid"] == [65534, 65534, 65534]
    assert seen["gid"] == [65534, 65534, 65534]
    assert seen["groups"] == []
    assert seen["caps"] == NO_CAPS
    assert seen["no_new_privs"] == "1"
    assert seen["env"] == {"DRILL_TOKEN": "minted"}
    assert seen["cwd"] == "/"
    # It really ran inside the tier: the tier's veth is the only non-loopback link it sees.
    links = netns.run_in(ns, ["ip", "-j", "link", "show"], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert sorted(link["ifname"] for link in json.loads(links.stdout)) == sorted(
        ["lo", one_tier["tiers"]["app"]["veth_peer"]])


def test_run_in_passes_stdin_and_returns_the_exit_code(one_tier):
    ns = one_tier["tiers"]["db"]["ns"]
    code = "import sys; data = sys.stdin.read(); print(data.upper()); sys.exit(3)"
    out = netns.run_in(ns, [SYSTEM_PYTHON, "-c", code], input_text="hello")
    assert (out.returncode, out.stdout.strip()) == (3, "HELLO")


def test_run_in_returns_output_that_is_not_utf8_replaced_not_as_a_crash(one_tier):
    code = "import sys; sys.stdout.buffer.write(b'ok \\xff\\n'); sys.stderr.buffer.write(b'\\xfe')"
    out = netns.run_in(one_tier["tiers"]["app"]["ns"], [SYSTEM_PYTHON, "-c", code])
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok \ufffd\n", "\ufffd")


def test_run_in_privileged_keeps_root_for_the_projects_own_setup(one_tier):
    out = netns.run_in(one_tier["router"]["ns"], [SYSTEM_PYTHON, "-c", WHOAMI], privileged=True)
    seen = json.loads(out.stdout)
    assert seen["uid"] == [0, 0, 0]
    assert seen["caps"]["CapEff"] != "0000000000000000"
    assert seen["env"] == {}


def test_run_in_kills_a_run_past_its_timeout(one_tier):
    ns = one_tier["tiers"]["app"]["ns"]
    started = time.monotonic()
    with pytest.raises(netns.NetnsError) as err:
        netns.run_in(ns, [SYSTEM_PYTHON, "-c", "import time; time.sleep(30)"], timeout=1)
    assert time.monotonic() - started < 10
    assert err.value.detail == {"namespace": ns, "timed_out": True}
    assert netns._pids(ns) == []


@pytest.mark.parametrize(("ns", "argv", "env", "reason"), [
    ("eth0", ["true"], None, "not a drill namespace"),
    ("drg-zzzzz-none", ["true"], None, "does not exist"),
    ("{app}", [], None, "argv must be a non-empty list"),
    ("{app}", "true", None, "argv must be a non-empty list"),
    ("{app}", ["true"], {"A=B": "x"}, "not a valid name"),
    ("{app}", ["true"], {"A": 1}, "must be a string"),
])
def test_run_in_refuses_bad_calls(one_tier, ns, argv, env, reason):
    with pytest.raises(netns.NetnsError) as err:
        netns.run_in(ns.format(app=one_tier["tiers"]["app"]["ns"]), argv, env=env)
    assert reason in str(err.value)


def test_spawn_detaches_writes_0600_files_unprivileged_and_destroy_kills_it(one_tier, tmp_path):
    ns = one_tier["tiers"]["app"]["ns"]
    out_path, err_path = tmp_path / "out.jsonl", tmp_path / "err.log"
    code = WHOAMI + "import sys, time; sys.stdout.flush(); print('to-stderr', file=sys.stderr, flush=True)\n"
    code += "time.sleep(60)"
    pid = netns.spawn(ns, [SYSTEM_PYTHON, "-c", code], env={"ONLY": "this"},
                      stdout_path=str(out_path), stderr_path=str(err_path))
    deadline = time.monotonic() + 10
    while not out_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = json.loads(out_path.read_text())
    assert (seen["uid"], seen["caps"], seen["no_new_privs"], seen["env"]) == (
        [65534] * 3, NO_CAPS, "1", {"ONLY": "this"})
    assert err_path.read_text() == "to-stderr\n"
    for path in (out_path, err_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    assert netns._pids(ns) == [pid]  # the pid is the workload's own, inside the namespace
    assert os.getsid(pid) == pid  # a session of its own
    assert pid in netns.destroy(one_tier["router"]["ns"][: -len("router")])["removed"]["pids"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_spawn_refuses_a_symlink_a_missing_directory_and_a_relative_path(one_tier, tmp_path):
    ns = one_tier["tiers"]["app"]["ns"]
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    cases = [(str(tmp_path / "link"), "cannot be opened"), (str(tmp_path / "nodir" / "out"), "existing directory"),
             ("out.log", "absolute path")]
    for path, reason in cases:
        with pytest.raises(netns.NetnsError) as err:
            netns.spawn(ns, ["true"], stdout_path=path)
        assert reason in str(err.value) and err.value.detail["field"] == "stdout_path"
    assert target.read_text() == "keep"
    assert netns._pids(ns) == []


def test_create_hardens_every_tier_ipv6_off_and_low_ports_open_but_not_the_router(one_tier):
    hardened = {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.disable_ipv6": "1",
                "net.ipv6.conf.default.disable_ipv6": "1", "net.ipv4.ip_unprivileged_port_start": "0"}
    for spec in one_tier["tiers"].values():
        assert netns.read_sysctls(spec["ns"]) == hardened
        # An unprivileged workload may listen on port 443 in its tier, and has no IPv6 at all.
        code = ("import socket\ns = socket.socket(); s.bind(('0.0.0.0', 443)); print('bound')\n"
                "try:\n    socket.socket(socket.AF_INET6).bind(('::1', 0)); print('v6')\n"
                "except OSError as e:\n    print('v6 errno', e.errno)\n")
        out = netns.run_in(spec["ns"], [SYSTEM_PYTHON, "-c", code])
        assert out.stdout.split("\n", 2)[:2] == ["bound", "v6 errno 99"], out.stderr  # EADDRNOTAVAIL
    router = netns.read_sysctls(one_tier["router"]["ns"])
    assert router["net.ipv4.ip_forward"] == "1"
    assert router["net.ipv4.ip_unprivileged_port_start"] == "1024"


# ---------------------------------------------------------------- the embedded world (wan, neighbours)

WORLD_BOUNDARY = {
    "sandbox_cidr": "10.213.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]},
               {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
    "ingress": [],
    "tiers": ["app", "db"],
    "tier_rules": [],
}


def world_of(plan, neighbours):
    """The contract's world, by hand: ``neighbours`` maps a kind to (short name, letter, addresses)."""
    prefix = plan["prefix"]
    return {"ns": f"{prefix}wan", "neighbours": {
        kind: {"ns": prefix + short, "veth_host": f"{prefix}{x}w", "veth_peer": f"{prefix}{x}n", "addresses": addrs}
        for kind, (short, x, addrs) in neighbours.items()}}


def translated_world_plan():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy as nft_policy
    from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

    boundary = parse_boundary(WORLD_BOUNDARY)
    plan = nft_policy.address_plan(boundary, f"dr-netns-world-{uuid.uuid4().hex}")
    plan["world"] = world_of(plan, {"production": ("prod", "p", ["10.0.0.1"]),
                                    "control_plane": ("cp", "c", ["198.51.100.1"]),
                                    "telemetry": ("tel", "t", ["198.51.100.17"])})
    return boundary, plan


@pytest.fixture
def world():
    boundary, plan = translated_world_plan()
    assert host_names(plan["prefix"]) == ([], [])
    try:
        yield boundary, plan
    finally:
        netns.destroy(plan["prefix"])
        assert host_names(plan["prefix"]) == ([], [])


@pytest.fixture
def spawned_listener(tmp_path):
    """A listener started with netns.spawn (unprivileged): waits until it reports ``ready``."""
    def start(ns, address, *ports):
        out = tmp_path / f"listener-{ns}-{address}.out"
        netns.spawn(ns, [SYSTEM_PYTHON, "-c", SERVER, address, *map(str, ports)], stdout_path=str(out),
                    stderr_path=str(out) + ".err")
        deadline = time.monotonic() + 10
        while "ready" not in out.read_text():
            assert time.monotonic() < deadline, (tmp_path / (out.name + ".err")).read_text()
            time.sleep(0.05)
    return start


def test_create_builds_the_wan_uplink_and_neighbours_exactly_and_idempotently(world):
    _, plan = world
    result = netns.create(plan)
    assert result["changed"] is True
    state = result["state"]["namespaces"]
    p, up = plan["prefix"], plan["uplink"]
    assert sorted(state) == sorted([f"{p}router", f"{p}app", f"{p}db", f"{p}validation", f"{p}wan",
                                    f"{p}prod", f"{p}cp", f"{p}tel"])
    router = state[f"{p}router"]
    assert router["links"][up["veth_host"]] == {"up": True, "addresses": [f"{up['gateway']}/28"]}
    assert {"dst": "default", "dev": up["veth_host"], "gateway": up["address"]} in router["routes"]
    wan = state[f"{p}wan"]
    assert wan["ip_forward"] is True
    assert wan["links"] == {
        up["veth_peer"]: {"up": True, "addresses": [f"{up['address']}/28"]},
        f"{p}pw": {"up": True, "addresses": ["169.254.0.1/32"]},
        f"{p}cw": {"up": True, "addresses": ["169.254.0.1/32"]},
        f"{p}tw": {"up": True, "addresses": ["169.254.0.1/32"]},
    }
    assert wan["routes"] == sorted([
        {"dst": "10.213.0.0/16", "dev": up["veth_peer"], "gateway": up["gateway"]},
        {"dst": up["subnet"], "dev": up["veth_peer"], "gateway": None},
        {"dst": "10.0.0.1", "dev": f"{p}pw", "gateway": None},
        {"dst": "198.51.100.1", "dev": f"{p}cw", "gateway": None},
        {"dst": "198.51.100.17", "dev": f"{p}tw", "gateway": None},
    ], key=lambda r: r["dst"])
    assert state[f"{p}prod"] == {"ip_forward": False,
                                 "links": {f"{p}pn": {"up": True, "addresses": ["10.0.0.1/32"]}},
                                 "routes": [{"dst": "default", "dev": f"{p}pn", "gateway": "169.254.0.1"}]}
    assert netns.read_sysctls(f"{p}prod")["net.ipv4.ip_unprivileged_port_start"] == "0"
    assert result["state"]["host_links"] == [] and host_names(p)[1] == []
    again = netns.create(plan)
    assert again["changed"] is False
    assert again["state"] == result["state"]


def test_a_tier_reaches_neighbours_until_the_router_ruleset_governs_it(world, spawned_listener):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _nft_policy as nft_policy

    boundary, plan = world
    netns.create(plan)
    p = plan["prefix"]
    spawned_listener(f"{p}prod", "10.0.0.1", 5432, 443)
    spawned_listener(f"{p}cp", "198.51.100.1", 443, 8443)
    spawned_listener(f"{p}tel", "198.51.100.17", 4317)
    app = plan["tiers"]["app"]["ns"]
    # No ruleset: every neighbour is reachable through router and wan, both ways of the path work.
    for address, port in (("10.0.0.1", 5432), ("10.0.0.1", 443), ("198.51.100.1", 443), ("198.51.100.1", 8443),
                          ("198.51.100.17", 4317)):
        assert probe(app, address, port) == "connected", (address, port)
    netns.apply_ruleset(plan["router"]["ns"], nft_policy.router_ruleset(boundary, plan, plan["table"]))
    assert probe(app, "10.0.0.1", 5432, timeout=0.5) == "timeout"
    assert probe(app, "10.0.0.1", 443, timeout=0.5) == "timeout"
    assert probe(app, "198.51.100.1", 443) == "connected"
    assert probe(app, "198.51.100.1", 8443, timeout=0.5) == "timeout"
    assert probe(plan["tiers"]["validation"]["ns"], "198.51.100.17", 4317) == "connected"
    assert nft_policy.verify_ruleset(boundary, plan, netns.read_ruleset(plan["router"]["ns"])) == []


@pytest.mark.parametrize(("edit", "field", "reason"), [
    (lambda plan: plan["world"]["neighbours"]["production"].update(addresses=["198.51.100.1"]),
     "world.neighbours.production.addresses", "must be unique"),
    (lambda plan: plan["world"]["neighbours"]["production"].update(addresses=["10.213.0.9"]),
     "world.neighbours.production.addresses", "outside the sandbox CIDR"),
    (lambda plan: plan["world"]["neighbours"]["production"].update(addresses=["169.254.0.1"]),
     "world.neighbours.production.addresses", "outside the sandbox CIDR"),
    (lambda plan: plan["world"]["neighbours"]["production"].update(addresses=[]),
     "world.neighbours.production.addresses", "at least one address"),
    (lambda plan: plan["world"]["neighbours"]["telemetry"].update(veth_host=plan["prefix"] + "pw"),
     "world.neighbours.telemetry.veth_host", "used twice"),
    (lambda plan: plan["world"]["neighbours"]["telemetry"].update(ns="drg-other-tel"),
     "world.neighbours.telemetry.ns", "does not start with the plan's prefix"),
    (lambda plan: plan["world"].update(ns=plan["prefix"] + "wan-" + "x" * 60),
     "world.ns", "longer than 63"),
    (lambda plan: plan["uplink"].update(gateway=plan["uplink"]["address"]), "uplink.gateway", "same as"),
    (lambda plan: plan["uplink"].update(veth_peer=plan["prefix"] + "uplink-peer"), "uplink.veth_peer",
     "longer than 15"),
    (lambda plan: plan.update(sandbox_cidr="10.213.0.1/16"), "sandbox_cidr", "not an IPv4 network"),
])
def test_a_bad_world_fails_before_anything_is_created(edit, field, reason):
    _, plan = translated_world_plan()
    edit(plan)
    try:
        with pytest.raises(netns.NetnsError) as err:
            netns.create(plan)
        assert reason in str(err.value)
        assert err.value.detail["field"] == field
        assert host_names(plan["prefix"]) == ([], [])
    finally:
        netns.destroy(plan["prefix"])


@pytest.mark.skipif(not _AS_NOBODY or not netns._userns_allowed()[0],
                    reason="rootless needs runuser, /usr/bin/python3 and unprivileged user namespaces")
def test_a_rootless_drill_left_behind_is_found_by_its_marker_and_removed_by_roots_destroy(prefix):
    # nobody builds and exits without destroying (a killed drill): the holder outlives it.
    out = _run_as_nobody(prefix, "r = n.create(plan)\nprint(json.dumps(r['holder_pid']))\n")
    assert out.returncode == 0, out.stderr[-2000:]
    holder = json.loads(out.stdout)
    found = netns.find_holders(prefix)
    assert [(h["pid"], h["prefix"], h["uid"]) for h in found] == [(holder, prefix, 65534)]
    # The reaper's case: root, with no memory of the drill, destroys by prefix.
    result = netns.destroy(prefix)
    assert holder in result["removed"]["pids"]
    assert netns.find_holders(prefix) == []
    assert not netns._alive(holder)
