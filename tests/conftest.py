"""Shared pytest fixtures: the embedded emulator and in-process module runs.

Modules are exercised for real: their ``main()`` runs in this process with real
boto3 against a real moto server on 127.0.0.1 (no hand-made boto3 mocks).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / ".collections"
sys.path.insert(0, str(COLLECTIONS))
sys.path.insert(0, str(ROOT / "tools"))

from emulator import Emulator, child_env  # noqa: E402

REGION = "us-east-1"


@pytest.fixture(scope="session")
def emulator():
    """One moto server for the test session (per xdist worker)."""
    with Emulator() as emu:
        yield emu


@pytest.fixture
def fresh_emulator():
    """A moto server of the test's own (for IAM enforcement and other global switches)."""
    with Emulator() as emu:
        yield emu


@pytest.fixture
def aws_env(emulator, monkeypatch):
    """Point boto3 and amazon.aws at the session emulator for this test."""
    for key, value in child_env(emulator.url, {}).items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return emulator


@pytest.fixture
def aws(aws_env):
    """``aws("ec2")`` -> a boto3 client on the emulator."""
    return aws_env.client


class ModuleResult(dict):
    @property
    def failed(self) -> bool:
        return bool(self.get("failed"))


def run_module(name: str, args: dict, check_mode: bool = False) -> ModuleResult:
    """Run ``drguard.sandbox.<name>`` in-process and return its JSON result.

    Uses ansible-core's own test hook for module arguments, so argument-spec
    validation, no_log handling and exit_json/fail_json behave exactly as in a play.
    """
    from ansible.module_utils.common import warnings as module_warnings
    from ansible.module_utils.testing import patch_module_args

    # Warnings are process-global in ansible-core; start each run with none.
    for attr in ("_global_warnings", "_global_deprecations"):
        store = getattr(module_warnings, attr, None)
        if hasattr(store, "clear"):
            store.clear()

    mod = importlib.import_module("ansible_collections.drguard.sandbox.plugins.modules." + name)
    mod = importlib.reload(mod)
    args = dict(args)
    if check_mode:
        args["_ansible_check_mode"] = True
    out = io.StringIO()
    # A module runs in a process of its own, never the controller's: once any test imported controller code
    # (ansible.errors, ansible.utils.display, ...), ansible-core would send the module's warnings to the
    # controller's display instead of into its result.
    from ansible.module_utils import _internal as module_internal
    was_controller, module_internal.is_controller = module_internal.is_controller, False
    with patch_module_args(args), contextlib.redirect_stdout(out):
        try:
            mod.main()
        except SystemExit:
            pass
        finally:
            module_internal.is_controller = was_controller
    text = out.getvalue().strip()
    try:
        return ModuleResult(json.loads(text.splitlines()[-1] if text else "{}"))
    except json.JSONDecodeError:
        raise AssertionError("module %s printed no JSON result: %r" % (name, text)) from None


@pytest.fixture
def module_runner(aws_env):
    return run_module


def ansible_env(emu: Emulator | None = None, extra: dict | None = None) -> dict:
    """Environment for an ansible-playbook subprocess (optionally on an emulator)."""
    env = child_env(emu.url) if emu else dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_LOCAL_TEMP": str(ROOT / ".ansible" / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    })
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def e2e_emulator():
    """An emulator for end-to-end drills (one per xdist worker)."""
    with Emulator() as emu:
        yield emu


@pytest.fixture(scope="session")
def world(e2e_emulator, tmp_path_factory):
    """A seeded demo world (production VPC, signed backup set) in ``e2e_emulator``."""
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    from drillkit import seed_world

    return seed_world(e2e_emulator, tmp_path_factory.mktemp("world"))
