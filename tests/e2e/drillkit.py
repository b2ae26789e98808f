"""End-to-end helpers: seed a demo world in an emulator, run a drill against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import yaml
from conftest import ROOT, ansible_env

from emulator import Emulator, child_env

ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")


@dataclass
class World:
    emu: Emulator
    dir: Path
    drill_vars: dict
    info: dict


def new_drill_id() -> str:
    from ansible_collections.drguard.sandbox.plugins.module_utils.drill import new_drill_id as _new
    return _new()


def seed_world(emu: Emulator, out: Path, mode: str = "passing", also_sign: tuple = ()) -> World:
    """Seed production + a signed backup set in ``emu`` (tools/seed_demo.py + sign_backup.yml).

    ``also_sign``: further sequences of the same backup set to sign (before the key is
    deleted), each to ``<dest with -42. replaced by -<sequence>.>``; their vars files are
    ``sign-vars-<sequence>.yml`` in ``out``.
    """
    env = child_env(emu.url)
    subprocess.run([sys.executable, str(ROOT / "tools" / "seed_demo.py"), "--out", str(out), "--mode", mode,
                    "--drill-id", "dr-placeholder"], env=env, check=True, capture_output=True, cwd=ROOT)
    info = json.loads((out / "world.json").read_text())
    sign_vars = yaml.safe_load((out / "sign-vars.yml").read_text())
    var_files = [out / "sign-vars.yml"]
    for sequence in also_sign:
        extra = dict(sign_vars, sign_sequence=sequence,
                     sign_dest=sign_vars["sign_dest"].replace("-%s." % sign_vars["sign_sequence"], "-%s." % sequence))
        var_files.append(out / ("sign-vars-%s.yml" % sequence))
        var_files[-1].write_text(yaml.safe_dump(extra))
    try:
        for var_file in var_files:
            proc = subprocess.run([ANSIBLE_PLAYBOOK, "playbooks/sign_backup.yml", "-e", "@%s" % var_file],
                                  env=ansible_env(emu), cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    finally:
        subprocess.run(["rm", "-rf", info["key_dir"]], check=False)
    drill_vars = yaml.safe_load((out / "drill-vars.yml").read_text())
    drill_vars.pop("drill_id")
    return World(emu, out, drill_vars, info)


@dataclass
class DrillRun:
    rc: int
    stdout: str
    stderr: str
    drill_id: str
    output_dir: Path

    @property
    def report(self) -> dict:
        return json.loads((self.output_dir / "drill-report.json").read_text())


def run_drill(world: World, out_root: Path, extra: dict | None = None, env_extra: dict | None = None,
              drop: tuple = (), args: tuple = (), command: tuple = (ANSIBLE_PLAYBOOK,)) -> DrillRun:
    """Run playbooks/drill.yml against the world's emulator; return its exit code and report.

    ``command``: what runs the playbook (e.g. another user's ``setpriv ... python -m ansible playbook``)."""
    drill_id = new_drill_id()
    variables = dict(world.drill_vars, drill_id=drill_id, drill_output_root=str(out_root))
    for key in drop:
        variables.pop(key, None)
    variables.update(extra or {})
    vars_file = out_root / ("vars-%s.yml" % drill_id)
    out_root.mkdir(parents=True, exist_ok=True)
    vars_file.write_text(yaml.safe_dump(variables))
    proc = subprocess.run([*command, "playbooks/drill.yml", "-e", "@%s" % vars_file, *args],
                          env=ansible_env(world.emu, env_extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    return DrillRun(proc.returncode, proc.stdout, proc.stderr, drill_id, out_root / drill_id)


def emulator_session() -> boto3.session.Session:
    """A boto3 session with the emulator's fake keys (pass ``endpoint_url`` to its clients)."""
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1")


def remaining(emu: Emulator, drill_id: str) -> list:
    """What tools/leftovers.py finds of ``drill_id`` in ``emu``."""
    from leftovers import leftovers

    return leftovers(drill_id, emulator_session(), endpoint_url=emu.url)


def runtime_prefix(drill_id: str) -> str:
    """The drill's runtime name prefix ``drg-<short>-``."""
    from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import prefix_of

    return prefix_of(drill_id)


def runtime_remaining(drill_id: str, pids=()) -> dict:
    """What of the drill's runtime is left on this host (``_runtime.leftovers``): every list empty when nothing."""
    from ansible_collections.drguard.sandbox.plugins.module_utils._runtime import leftovers

    return leftovers(runtime_prefix(drill_id), pids)


def path_without(*tools: str) -> str:
    """This process's PATH without the directories that hold any of ``tools`` (a host where they are missing)."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.access(os.path.join(d, t), os.X_OK) for t in tools)]
    return os.pathsep.join([str(Path(sys.executable).parent)] + kept)


@dataclass
class MultiRun:
    rc: int
    stdout: str
    stderr: str
    reports: dict  # host -> its drill-report.json (hosts whose drill wrote one)

    def recap(self) -> dict:
        """The play recap: host -> {"ok": n, "failed": n, ...}."""
        rows = {}
        for line in self.stdout.split("PLAY RECAP", 1)[-1].splitlines():
            name, sep, counts = line.partition(" : ")
            if sep:
                rows[name.strip()] = {k: int(v) for k, v in (kv.split("=") for kv in counts.split())}
        return rows


def run_drills(world: World, out_root: Path, hosts: dict, forks: int = 8, env_extra: dict | None = None,
               args: tuple = ()) -> MultiRun:
    """Run playbooks/drill.yml once for many drills: one inventory host per drill in the group ``drills``.

    ``hosts``: host name -> that drill's own variables (the world's drill variables are the group's).
    """
    out_root.mkdir(parents=True, exist_ok=True)
    group_vars = dict(world.drill_vars, drill_output_root=str(out_root), ansible_connection="local",
                      ansible_python_interpreter="{{ ansible_playbook_python }}")
    inventory = out_root / "drills.yml"
    inventory.write_text(yaml.safe_dump({"drills": {"hosts": {h: dict(v) for h, v in hosts.items()},
                                                    "vars": group_vars}}))
    env = ansible_env(world.emu, {"ANSIBLE_SHOW_CUSTOM_STATS": "true", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json",
                                  **(env_extra or {})})
    proc = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(inventory), "-f", str(forks), "playbooks/drill.yml", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    reports = {}
    for path in out_root.glob("*/drill-report.json"):
        report = json.loads(path.read_text())
        host = next((h for h in hosts if report.get("drill_id") == hosts[h].get("drill_id")), None)
        reports[host or report["drill_id"]] = report
    return MultiRun(proc.returncode, proc.stdout, proc.stderr, reports)
