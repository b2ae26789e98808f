"""Molecule as role developers type it: from the repository root, virtualenv active, nothing else set.

No ANSIBLE_CONFIG, no ANSIBLE_COLLECTIONS_PATH, no tools/run_molecule.py: ``molecule list`` shows
every scenario, and ``molecule syntax -s <scenario>`` resolves the collection's roles, modules and
the ``group/drguard.sandbox.aws`` module_defaults group (it failed with "could not resolve the
module_defaults group drguard.sandbox.aws" before .config/molecule/config.yml). Only the syntax
check runs here; the full ``molecule test`` of each scenario is ``make molecule``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from run_molecule import scenarios  # noqa: E402

MOLECULE = Path(sys.executable).parent / "molecule"


def _user_env() -> dict:
    """A shell with the virtualenv activated and no Ansible settings of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    env["PATH"] = str(MOLECULE.parent) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(MOLECULE.parent.parent)
    env["NO_COLOR"] = "1"
    return env


def _molecule(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["molecule", *args], cwd=ROOT, env=_user_env(), capture_output=True, text=True,
                          timeout=300, check=False)


def test_molecule_list_from_the_root_shows_every_scenario():
    proc = _molecule("list", "--format", "plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = {m.group(1) for m in re.finditer(r"^\s*localhost\s+\S+\s+\S+\s+(\S+)", proc.stdout, re.M)}
    assert listed == set(scenarios()) and listed, proc.stdout


@pytest.mark.parametrize("scenario", scenarios())
def test_molecule_syntax_from_the_root_resolves_the_collection(scenario):
    proc = _molecule("syntax", "-s", scenario)
    out = proc.stdout + proc.stderr
    assert "could not resolve" not in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
