"""The netns runtime (plugins/module_utils/_runtime.py up/down), real namespaces, always cleaned up.

Root only (CI runs as root, with iproute2 and nftables installed by ``make venv``). Every test
uses a drill id of its own, so its prefix (``drg-<short>-``) is its own; the ``drill`` fixture
tears that prefix down even when the test fails. Traffic only ever goes between namespaces the
test's runtime created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import uuid

import pytest
from conftest import COLLECTIONS, run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import app_db_boundary

pytestmark = needs_root_and("ip", "nft", "setpriv")

RAW = app_db_boundary("10.213.0.0/16")
PYTHON = python_executable()

CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error: %s" % e)
"""


def connect(ns, address, port, timeout=1.0):
    proc = netns.run_in(ns, [PYTHON, "-I", "-S", "-c", CONNECT, address, str(port), str(timeout)], timeout=15)
    return proc.stdout.strip()


@pytest.fixture
def drill(tmp_path):
    drill_id = f"dr-test-{uuid.uuid4().hex[:12]}"
    out = tmp_path / "out"
    yield drill_id, str(out)
    netns.destroy(runtime.prefix_of(drill_id))
    _mtls_drill.destroy(drill_id)  # the drill's PKI, which the runtime made for its collector


def read_text(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def read_json(path):
    return json.loads(read_text(path))


def host_tables():
    return subprocess.run([shutil.which("nft"), "list", "tables"], capture_output=True, text=True,
                          check=True).stdout


def test_up_builds_the_world_and_down_leaves_nothing(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    result = runtime.up(boundary, drill_id, out, PYTHON)
    prefix = runtime.prefix_of(drill_id)
    assert result["changed"] is True
    assert result["prefix"] == prefix and result["backend"] == "netns"
    assert {u["tier"] for u in result["units"]} == {"app", "db", "validation"}
    assert result["rules"] > 0
    assert result["collector"] == {"address": "198.51.100.17", "port": 4317,
                                   "path": os.path.join(out, "telemetry.jsonl")}
    state = read_json(os.path.join(out, "runtime", "state.json"))
    assert state["prefix"] == prefix and state["state"] == "present"
    assert oct(os.stat(os.path.join(out, "runtime")).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(out, "runtime", "state.json")).st_mode & 0o777) == "0o600"
    # every listener process runs unprivileged
    for pid in result["processes"]:
        status = read_text(f"/proc/{pid}/status")
        assert "Uid:\t65534\t65534\t65534\t65534" in status
        assert "CapBnd:\t0000000000000000" in status

    removed = runtime.down(drill_id, out)
    assert removed["changed"] is True
    assert runtime.leftovers(prefix, result["processes"]) == {"namespaces": [], "tables": [], "mounts": [],
                                                               "processes": [], "holders": []}
    listed = subprocess.run([shutil.which("ip"), "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed
    assert prefix not in host_tables()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in result["processes"])
    assert read_json(os.path.join(out, "runtime", "state.json"))["state"] == "absent"
    # idempotent
    assert runtime.down(drill_id, out)["changed"] is False


def test_second_up_changes_nothing_and_keeps_the_listeners(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    first = runtime.up(boundary, drill_id, out, PYTHON)
    second = runtime.up(boundary, drill_id, out, PYTHON)
    assert second["changed"] is False
    assert second["processes"] == first["processes"]
    assert runtime.up(boundary, drill_id, out, PYTHON, check_mode=True)["changed"] is False


def test_a_dead_listener_is_restarted(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    first = runtime.up(boundary, drill_id, out, PYTHON)
    state = read_json(os.path.join(out, "runtime", "state.json"))
    victim = state["processes"][f"listeners:{first['units'][1]['ns']}"]["pid"]
    os.kill(victim, 9)
    assert runtime.up(boundary, drill_id, out, PYTHON, check_mode=True)["changed"] is True
    second = runtime.up(boundary, drill_id, out, PYTHON)
    assert second["changed"] is True
    assert victim not in second["processes"]


def test_listeners_reachable_per_rules_and_bait_never(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    result = runtime.up(boundary, drill_id, out, PYTHON)
    units = {u["tier"]: u for u in result["units"]}
    app, db = units["app"], units["db"]
    assert connect(app["ns"], db["address"], 5432) == "connected"  # the declared tier rule
    assert connect(app["ns"], "198.51.100.1", 443) == "connected"  # control plane egress
    assert connect(app["ns"], "198.51.100.17", 4317) == "connected"  # the telemetry collector
    assert connect(db["ns"], app["address"], 5432) == "timeout"  # no rule db -> app
    assert connect(app["ns"], db["address"], 1025) == "timeout"  # undeclared port on a declared peer
    for port in (5432, 443, 6514):
        assert connect(app["ns"], "10.0.0.1", port) == "timeout"
    hits = os.path.join(out, "runtime", "bait-hits.jsonl")
    assert os.path.getsize(hits) == 0
    # the bait does log a connection that reaches it (from inside production itself)
    prod = result["world"]["neighbours"]["production"]["ns"]
    assert connect(prod, "10.0.0.1", 6514) == "connected"
    line = json.loads(read_text(hits).splitlines()[0])
    assert (line["name"], line["address"], line["port"]) == ("log-intake", "10.0.0.1", 6514)


def test_unknown_tier_is_refused_before_anything_is_created(drill):
    drill_id, out = drill
    from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError  # noqa: PLC0415
    with pytest.raises(BoundaryError):
        parse_boundary(dict(RAW, tier_rules=[{"from": "app", "to": "cache", "protocol": "tcp", "ports": [1]}]))
    raw = dict(RAW, tiers=["app", "wan"], tier_rules=[])
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.up(parse_boundary(raw), drill_id, out, PYTHON)
    assert "'wan' is reserved" in err.value.msg
    assert not os.path.exists(out)
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []


def test_a_listener_that_cannot_come_up_is_named_and_nothing_is_left(drill, monkeypatch):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    monkeypatch.setattr(runtime, "LISTENER_SOURCE", "import sys; sys.exit(3)")
    monkeypatch.setattr(runtime, "READY_TIMEOUT", 1.0)
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.up(boundary, drill_id, out, PYTHON)
    assert " did not come up within 1s; see " in err.value.msg
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []


def test_module_present_idempotent_check_mode_and_absent(drill):
    drill_id, out = drill
    args = {"drill_id": drill_id, "boundary": RAW, "output_dir": out}
    planned = run_module("sandbox_runtime", args, check_mode=True)
    assert (planned.failed, planned["changed"]) == (False, True)
    assert not os.path.exists(out)  # check mode created nothing
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []
    first = run_module("sandbox_runtime", args)
    assert (first.failed, first["changed"], first["backend"]) == (False, True, "netns")
    assert [u["tier"] for u in first["units"]] == ["app", "db", "validation"]
    second = run_module("sandbox_runtime", args)
    assert (second["changed"], second["processes"]) == (False, first["processes"])
    gone = run_module("sandbox_runtime", {"drill_id": drill_id, "output_dir": out, "state": "absent"})
    assert (gone.failed, gone["changed"]) == (False, True)
    assert runtime.leftovers(runtime.prefix_of(drill_id), first["processes"]) == {
        "namespaces": [], "tables": [], "mounts": [], "processes": [], "holders": []}
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "output_dir": out, "state": "absent"})
    assert (again.failed, again["changed"]) == (False, False)


def test_module_none_and_ec2_backends(drill):
    drill_id, _ = drill
    none = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "none"})
    assert dict(none) == {"changed": False, "backend": "none", "units": [], "invocation": none["invocation"]}
    ec2 = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": RAW, "output_dir": "/x"})
    assert ec2["msg"] == ("sandbox_runtime: the ec2 runtime is reached through SSM interface endpoints, which the "
                          "boundary does not declare; set drill_boundary.ssm_endpoints true and build the network "
                          "again.")


def test_module_bad_input_fails_before_anything_is_created(drill):
    drill_id, out = drill
    bad = dict(RAW, tier_rules=[{"from": "app", "to": "cache", "protocol": "tcp", "ports": [5432]}])
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "boundary": bad, "output_dir": out})
    assert res["msg"] == ("sandbox_runtime: drill_boundary.tier_rules[0].to: 'cache' is not a declared tier "
                          "(app, db).")
    missing = run_module("sandbox_runtime", {"drill_id": drill_id, "boundary": RAW})
    assert missing["msg"] == ("sandbox_runtime: output_dir is required to start the netns runtime; pass the "
                              "drill's boundary and output directory.")
    assert not os.path.exists(out)
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []


def test_module_without_nft_fails_before_anything_is_created(drill, monkeypatch, tmp_path):
    drill_id, out = drill
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("ip", "setpriv"):  # everything but nft
        os.symlink(shutil.which(tool), bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "boundary": RAW, "output_dir": out})
    assert res["msg"] == ("the netns runtime cannot start: nft (package nftables) not found on PATH; install what is "
                          "missing (make venv as root installs iproute2 and nftables) and retry.")
    assert not os.path.exists(out)
    monkeypatch.undo()
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []



def test_state_records_the_prefix_before_anything_is_created_and_a_failed_build_leaves_nothing(drill, monkeypatch):
    drill_id, out = drill
    seen = {}
    real_create = netns.create

    def create_then_fail(plan):
        seen["state"] = read_json(os.path.join(out, "runtime", "state.json"))
        seen["namespaces_before"] = runtime.leftovers(plan["prefix"])["namespaces"]
        real_create(plan)
        raise netns.NetnsError("simulated failure after the namespaces were built; retry.")

    monkeypatch.setattr(netns, "create", create_then_fail)
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.up(parse_boundary(RAW), drill_id, out, PYTHON)
    assert err.value.msg == "simulated failure after the namespaces were built; retry."
    assert seen["state"]["prefix"] == runtime.prefix_of(drill_id)
    assert seen["state"]["state"] == "creating"
    assert seen["namespaces_before"] == []
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []
    assert read_json(os.path.join(out, "runtime", "state.json"))["state"] == "absent"


def test_state_of_another_drill_is_refused(drill):
    drill_id, out = drill
    os.makedirs(os.path.join(out, "runtime"), mode=0o700)
    with open(os.path.join(out, "runtime", "state.json"), "w", encoding="utf-8") as handle:
        json.dump({"prefix": "drg-000000-", "state": "present"}, handle)
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.up(parse_boundary(RAW), drill_id, out, PYTHON)
    assert err.value.msg == (f"{out}/runtime/state.json belongs to another drill's runtime (drg-000000-); use this "
                             "run's own output directory.")
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.down(drill_id, out)
    assert err.value.msg.startswith(f"the runtime state under {out} belongs to drg-000000-, not to drill {drill_id}")
    assert runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"] == []


def test_a_runtime_built_with_another_output_dir_is_refused_and_kept(drill, tmp_path):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    first = runtime.up(boundary, drill_id, out, PYTHON)
    other = str(tmp_path / "other")
    with pytest.raises(runtime.SandboxRuntimeError) as err:
        runtime.up(boundary, drill_id, other, PYTHON)
    prefix = runtime.prefix_of(drill_id)
    assert err.value.msg == (f"the runtime {prefix} already exists but {other}/runtime/state.json does not record it; "
                             "pass the output directory it was built with, or remove it first (state absent).")
    assert not os.path.exists(other)
    assert all(os.path.exists(f"/proc/{pid}") for pid in first["processes"])


# Rootless, as nobody: the runtime built twice, read back by runtime_verify, a privileged process
# in a tier found, then removed; what happened comes back as JSON.
ROOTLESS = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[5])  # the requirements (amazon.aws, cryptography) as the virtualenv has them
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as n
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as rt
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_verify as rv
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
drill_id, out, boundary = sys.argv[2], sys.argv[3], parse_boundary(json.loads(sys.argv[4]))
python = os.path.realpath(sys.executable)
plan = rt.full_plan(boundary, drill_id)
report = {}

def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as handle:
        return handle.read().split(b"\0")

try:
    first = rt.up(boundary, drill_id, out, python)
    second = rt.up(boundary, drill_id, out, python)
    report.update(first_changed=first["changed"], second_changed=second["changed"],
                  same_processes=first["processes"] == second["processes"], first_pids=first["processes"],
                  complete=rt.status(boundary, plan, out, python))
    live = rv.read_live(plan)
    report["tiers"] = {tier: [{"uids": p["uids"], "caps": sorted(set(p["caps"].values())), "nnp": p["no_new_privs"],
                               "listener": b"selectors" in b" ".join(cmdline(p["pid"]))} for p in procs]
                       for tier, procs in live["processes"].items()}
    report["findings"] = [f["code"] for f in rv.compare(boundary, plan, live)]
    n.spawn(plan["tiers"]["app"]["ns"], ["sleep", "300"], privileged=True)
    report["findings_privileged"] = sorted({f["code"] for f in rv.compare(boundary, plan, rv.read_live(plan))})
    report["while_up"] = rt.leftovers(plan["prefix"])
    got = n.run_in(plan["tiers"]["validation"]["ns"], [python, "-I", "-S", "-c", "print(open('x').read())"],
                   files={"x": {"data": "hello", "mode": 0o444}})
    report["files"] = [got.returncode, got.stdout.strip() or got.stderr.strip()[-300:]]
    # The recorded pid is the listener itself: killing it stops the listener, and up starts a new one.
    db = plan["tiers"]["db"]["ns"]
    victim = rt.read_state_file(out)["processes"]["listeners:" + db]["pid"]
    os.kill(victim, 9)
    for _ in range(200):
        if not n.host_pids(db):
            break
        time.sleep(0.025)
    report["left_in_db"] = n.host_pids(db)
    third = rt.up(boundary, drill_id, out, python)
    report["restarted"] = third["changed"] and rt.status(boundary, plan, out, python) and len(n.host_pids(db)) == 1
    # A process that entered the holder's user namespace and ended, not yet reaped by its parent (a
    # zombie holds no namespace of the drill and runs nothing): down must not wait for it.
    import subprocess
    target = n._holder_children(n.find_holders(plan["prefix"])[0]["pid"])[0]
    zombie = subprocess.Popen(["nsenter", "-t", str(target), "-U", "--preserve-credentials", "true"])
    time.sleep(0.3)
finally:
    started = time.monotonic()
    report["down"] = rt.down(drill_id, out)["changed"]
    report["down_seconds"] = time.monotonic() - started
    report["after"] = rt.leftovers(plan["prefix"], report.get("first_pids", ()))
    report["down_again"] = rt.down(drill_id, out)["changed"]
print(json.dumps(report))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3")
                    or subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                                       "unshare", "--user", "--map-root-user", "--net", "true"],
                                      check=False, capture_output=True).returncode != 0,
                    reason="rootless needs setpriv, /usr/bin/python3 and unprivileged user namespaces")
def test_rootless_up_is_idempotent_verified_and_down_leaves_nothing(drill):
    drill_id, _ = drill
    prefix = runtime.prefix_of(drill_id)
    base = tempfile.mkdtemp(prefix="drg-rootless-rt-")  # traversable, unlike pytest's tmp_path
    try:
        os.chmod(base, 0o755)  # noqa: S103 - nobody's own directory below
        out = os.path.join(base, "out")
        os.mkdir(out, 0o700)
        os.chown(out, 65534, 65534)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "env", "-i",
             f"PATH={os.environ['PATH']}", f"HOME={base}", "/usr/bin/python3", "-c", ROOTLESS, str(COLLECTIONS),
             drill_id, out, json.dumps(RAW), sysconfig.get_paths()["purelib"]], capture_output=True, text=True,
            timeout=180, cwd="/")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert report["first_changed"] is True and report["second_changed"] is False
    assert report["same_processes"] is True and report["complete"] is True
    # Each tier's one listener, found on the host from the holder's pid: the user's own uid, no capability.
    assert report["tiers"] == {t: [{"uids": [65534], "caps": [0], "nnp": True, "listener": True}]
                               for t in ("app", "db", "validation")}
    assert report["findings"] == []
    assert report["findings_privileged"] == ["runtime_tier_process_privileged"]
    assert report["while_up"]["holders"] and report["while_up"]["namespaces"] and report["while_up"]["tables"] == []
    assert report["left_in_db"] == [] and report["restarted"] is True
    assert report["files"] == [0, "hello"]  # a workload's files (read-only host, own tmpfs) work rootless too
    assert report["down"] is True and report["down_again"] is False and report["down_seconds"] < 5
    assert report["after"] == {"namespaces": [], "tables": [], "mounts": [], "processes": [], "holders": []}
    assert netns.find_holders(prefix) == []
