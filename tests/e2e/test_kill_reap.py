"""A drill killed with SIGKILL mid-provisioning leaves tagged resources; reap.yml removes them all."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import yaml
from conftest import ROOT, ansible_env
from drillkit import ANSIBLE_PLAYBOOK, new_drill_id, remaining



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
