"""A drill killed with SIGKILL leaves tagged resources and, from the runtime phase on, its sandbox runtime
(namespaces, listener processes, workloads); reap.yml removes them all: cloud by tag, the runtime on the
proof of the drill's own directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from conftest import ROOT, ansible_env
from drillkit import ANSIBLE_PLAYBOOK, new_drill_id, remaining, runtime_prefix, runtime_remaining



def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (ansible's workers call setsid, so killpg misses them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the playbook and everything it started, as a lost controller would be.

    Freeze the tree first (SIGSTOP until no new process appears), so nothing forks a
    module process between the scan and the kill.
    """
    frozen: set[int] = set()
    while True:
        tree = {pid, *_descendants(pid)}
        if tree <= frozen:
            break
        for victim in tree - frozen:
            try:
                os.kill(victim, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= tree
    for victim in frozen:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_mid_provisioning_then_reap(world, tmp_path):
    drill_id = new_drill_id()
    variables = dict(world.drill_vars, drill_id=drill_id, drill_output_root=str(tmp_path), drill_ttl_minutes=5)
    vars_file = tmp_path / "vars.yml"
    vars_file.write_text(yaml.safe_dump(variables))
    proc = subprocess.Popen([ANSIBLE_PLAYBOOK, "playbooks/drill.yml", "-e", "@%s" % vars_file],
                            env=ansible_env(world.emu), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ec2 = world.emu.client("ec2")
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:drguard:drill-id", "Values": [drill_id]}])["Vpcs"]
            if vpcs:
                break
            assert proc.poll() is None, "drill ended before provisioning started"
            time.sleep(0.05)
        else:
            raise AssertionError("the drill never started provisioning")
    finally:
        _kill_tree(proc.pid)
        proc.wait()

    left = remaining(world.emu, drill_id)
    assert left, "SIGKILL should have left tagged resources behind"
    assert not (tmp_path / drill_id / "drill-report.json").exists()

    as_of = (datetime.now(timezone.utc) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    dry = subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/reap.yml", "-e", "reap_region=us-east-1",
                          "-e", "reap_dry_run=true", "-e", "reap_as_of=%s" % as_of],
                         env=ansible_env(world.emu), cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert len(remaining(world.emu, drill_id)) == len(left), "dry run deleted something"

    reap = subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/reap.yml", "-e", "reap_region=us-east-1",
                           "-e", "reap_as_of=%s" % as_of],
                          env=ansible_env(world.emu), cwd=ROOT, capture_output=True, text=True)
    assert reap.returncode == 0, reap.stdout[-3000:]
    assert remaining(world.emu, drill_id) == []


def _cmdline(pid: int) -> bytes:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _kill_while(world, out, module: str, timeout: float = 300) -> str:
    """Start a drill and SIGKILL it while ``drguard.sandbox.<module>`` runs (its AnsiballZ process is alive
    under the playbook); return the drill id."""
    drill_id = new_drill_id()
    variables = dict(world.drill_vars, drill_id=drill_id, drill_output_root=str(out), drill_ttl_minutes=5)
    vars_file = out / "vars.yml"
    vars_file.write_text(yaml.safe_dump(variables))
    proc = subprocess.Popen([ANSIBLE_PLAYBOOK, "playbooks/drill.yml", "-e", "@%s" % vars_file],
                            env=ansible_env(world.emu), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = ("AnsiballZ_%s.py" % module).encode()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(marker in _cmdline(pid) for pid in _descendants(proc.pid)):
                break
            assert proc.poll() is None, "the drill ended before %s ran" % module
            time.sleep(0.01)
        else:
            raise AssertionError("the drill never reached %s" % module)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    return drill_id


def _reap(world, out, *extra):
    as_of = (datetime.now(timezone.utc) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/reap.yml", "-e", "reap_region=us-east-1",
                           "-e", "reap_as_of=%s" % as_of, "-e", "reap_output_root=%s" % out, *extra],
                          env=ansible_env(world.emu), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _recorded_pids(out, drill_id):
    state = json.loads((out / drill_id / "runtime" / "state.json").read_text())
    return [p["pid"] for p in (state.get("processes") or {}).values()]


@pytest.mark.skipif(os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ip", "nft", "setpriv")),
                    reason="the netns runtime needs root and ip, nft and setpriv on PATH")
@pytest.mark.parametrize("phase,module", [("probes", "runtime_probe"), ("validate", "secret_exec")])
def test_sigkill_inside_the_sandbox_then_reap_leaves_nothing(world, tmp_path, phase, module):
    """Killed while the probes run in the tiers, or while the user's validation command runs inside the
    sandbox: the runtime stays behind (namespaces, listeners), and reap.yml removes it with the cloud."""
    drill_id = _kill_while(world, tmp_path, module)
    assert not (tmp_path / drill_id / "drill-report.json").exists(), "the drill was not killed mid-%s" % phase
    pids = _recorded_pids(tmp_path, drill_id)
    left = runtime_remaining(drill_id, pids)
    assert left["namespaces"] and left["processes"], "SIGKILL should have left the runtime behind: %s" % left
    cloud = remaining(world.emu, drill_id)
    assert cloud, "SIGKILL should have left tagged resources behind"

    dry = _reap(world, tmp_path, "-e", "reap_dry_run=true")
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert "runtime %s drill=%s" % (runtime_prefix(drill_id), drill_id) in dry.stdout
    assert runtime_remaining(drill_id, pids)["namespaces"] == left["namespaces"], "the dry run removed something"
    assert len(remaining(world.emu, drill_id)) == len(cloud), "the dry run deleted something"

    reap = _reap(world, tmp_path)
    assert reap.returncode == 0, reap.stdout[-3000:]
    assert remaining(world.emu, drill_id) == []
    after = runtime_remaining(drill_id, pids)
    assert not any(after.values()), after
    assert json.loads((tmp_path / drill_id / "runtime" / "state.json").read_text())["state"] == "absent"
