"""The execution environment: execution-environment.yml (ansible-builder v3) renders offline.

``ansible-builder create`` writes the build context (Containerfile and ``_build/``) without a
container runtime or network. ``ansible-builder introspect`` is the step the image build runs
over the installed collections to collect their Python and system requirements; running it here
over the collection copied into the context proves the collection declares what it needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILDER = shutil.which("ansible-builder", path=str(Path(sys.executable).parent)) or shutil.which("ansible-builder")

pytestmark = pytest.mark.skipif(BUILDER is None, reason="ansible-builder is not installed (requirements-test.txt)")

def _floor(spec: str) -> str:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert match, "no >= floor in %r" % spec
    return match.group(1)


@pytest.fixture(scope="module")
def definition():
    return yaml.safe_load((ROOT / "execution-environment.yml").read_text())


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    out = tmp_path_factory.mktemp("ee") / "context"
    proc = subprocess.run(
        [BUILDER, "create", "-f", str(ROOT / "execution-environment.yml"), "-c", str(out),
         "--output-filename", "Containerfile", "-v", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No matches" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return out


def test_definition_is_builder_v3_and_core_floor_matches_runtime(definition):
    runtime = yaml.safe_load((ROOT / "meta/runtime.yml").read_text())
    assert definition["version"] == 3
    core = definition["dependencies"]["ansible_core"]["package_pip"]
    assert core.startswith("ansible-core")
    assert _floor(core) == _floor(runtime["requires_ansible"])
    assert definition["dependencies"]["ansible_runner"]["package_pip"].startswith("ansible-runner")


def test_collection_declares_its_dependencies_for_builder():
    meta = yaml.safe_load((ROOT / "meta/execution-environment.yml").read_text())
    assert meta["version"] == 1
    assert meta["dependencies"] == {"python": "requirements.txt", "system": "bindep.txt"}
    assert (ROOT / "bindep.txt").is_file() and (ROOT / "requirements.txt").is_file()


def test_create_renders_the_containerfile_with_core_floor_and_collection(context):
    text = (context / "Containerfile").read_text()
    runtime = yaml.safe_load((ROOT / "meta/runtime.yml").read_text())
    assert "ansible-core>=%s" % _floor(runtime["requires_ansible"]) in text
    assert "ansible-runner" in text
    assert "ansible-galaxy collection install" in text
    assert "/output/scripts/introspect" in text or "introspect" in text
    galaxy = yaml.safe_load((context / "_build/requirements.yml").read_text())
    by_name = {c["name"]: c for c in galaxy["collections"]}
    assert "amazon.aws" in by_name
    source = [c for c in galaxy["collections"] if c.get("type") == "dir"]
    assert len(source) == 1, galaxy
    # The collection is built from the source copied into the context, not downloaded.
    src = context / "_build" / source[0]["name"]
    assert yaml.safe_load((src / "galaxy.yml").read_text())["name"] == "sandbox"


def test_context_carries_every_tracked_file_the_collection_ships(context):
    galaxy = yaml.safe_load((context / "_build/requirements.yml").read_text())
    src = context / "_build" / next(c["name"] for c in galaxy["collections"] if c.get("type") == "dir")
    tracked = subprocess.run(["git", "ls-files", "plugins", "roles", "playbooks", "meta"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    tracked = [p for p in tracked if (ROOT / p).exists()]
    assert tracked
    missing = [p for p in tracked if not (src / p).is_file()]
    assert missing == []
    for name in ("galaxy.yml", "README.md", "requirements.txt", "bindep.txt", "meta/runtime.yml",
                 "meta/execution-environment.yml"):
        assert (src / name).is_file(), name
    # No local state rides along.
    assert not any(part in {".venv", ".collections", ".ansible", "drill-runs"}
                   for p in src.rglob("*") for part in p.relative_to(src).parts)


def test_introspect_finds_the_collections_python_and_system_requirements(context, tmp_path):
    galaxy = yaml.safe_load((context / "_build/requirements.yml").read_text())
    src = context / "_build" / next(c["name"] for c in galaxy["collections"] if c.get("type") == "dir")
    installed = tmp_path / "collections" / "ansible_collections" / "drguard" / "sandbox"
    shutil.copytree(src, installed)
    proc = subprocess.run([BUILDER, "introspect", "--sanitize", str(tmp_path / "collections")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = yaml.safe_load(proc.stdout[proc.stdout.index("python:"):]) if "python:" in proc.stdout else {}
    python = {re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0].lower() for line in found.get("python") or []}
    assert {"boto3", "botocore", "cryptography"} <= python
    system = {line.split()[0] for line in found.get("system") or []}
    for group in (("iproute", "iproute2"), ("nftables",), ("util-linux",), ("procps-ng", "procps"), ("python3",)):
        assert system & set(group), (group, system)


def test_galaxy_step_builds_the_collection_from_the_context_offline(context, tmp_path):
    """The image's `ansible-galaxy collection install -r requirements.yml` (run in /build) builds the
    collection from the copied source; amazon.aws, which needs Galaxy, is left out here."""
    galaxy = yaml.safe_load((context / "_build/requirements.yml").read_text())
    local = {"collections": [c for c in galaxy["collections"] if c.get("type") == "dir"]}
    (tmp_path / "req.yml").write_text(yaml.safe_dump(local))
    galaxy_bin = shutil.which("ansible-galaxy", path=str(Path(sys.executable).parent)) or "ansible-galaxy"
    # As in the image: no ansible.cfg and no collection of the checkout already on the path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "installed"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"))
    proc = subprocess.run(
        [galaxy_bin, "collection", "install", "--offline", "--no-deps", "-r", str(tmp_path / "req.yml"),
         "-p", str(tmp_path / "installed")],
        cwd=context / "_build", env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = tmp_path / "installed" / "ansible_collections" / "drguard" / "sandbox"
    assert (installed / "MANIFEST.json").is_file()
    for name in ("plugins/modules/drill_report.py", "meta/execution-environment.yml", "bindep.txt",
                 "requirements.txt", "playbooks/drill.yml"):
        assert (installed / name).is_file(), name
