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
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns

_MISSING = [tool for tool in ("ip", "nft", "unshare") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason=(
        "network namespaces need root and ip/nft/unshare on PATH "
        f"(euid {os.geteuid()}, missing: {', '.join(_MISSING) or 'nothing'}); make venv as root installs them"
    ),
)

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
    assert netns.preflight() == {"root": True, "ip": shutil.which("ip"), "nft": shutil.which("nft")}


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


@pytest.mark.skipif(shutil.which("runuser") is None or not os.path.exists("/usr/bin/python3"),
                    reason="needs runuser and /usr/bin/python3 to run the preflight as the nobody user")
def test_preflight_as_non_root_says_root_is_needed_and_creates_nothing(prefix):
    # The module alone (it needs only the standard library), where nobody can read it.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(netns.__file__, os.path.join(tmp, "_netns.py"))
        os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)  # noqa: S103 - nobody reads it
        os.chmod(os.path.join(tmp, "_netns.py"), stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        out = _run_as_nobody(tmp, prefix)
    result = json.loads(out.stdout or "{}")
    assert result.get("missing") == ["root"], out.stderr
    assert result["msg"].startswith("the netns runtime cannot start: not running as root (ip netns needs CAP_SYS_ADMIN")
    assert result["msg"].endswith("; run it as root and retry.")
    assert host_names(prefix) == ([], [])


def _run_as_nobody(tmp, prefix):
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import _netns as n\n"
        "try:\n    n.create(json.loads(sys.argv[2]))\nexcept n.NetnsError as e:\n"
        "    print(json.dumps({'msg': str(e), 'missing': e.detail.get('missing')}))\n"
    )
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"PATH={os.environ['PATH']}", "/usr/bin/python3", "-c", code,
         tmp, json.dumps(make_plan(prefix))],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
