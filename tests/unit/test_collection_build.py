"""The collection artifact: ``ansible-galaxy collection build`` ships the collection and no local state.

Two builds: one of a ``git archive`` of HEAD into which every kind of local state a checkout
accumulates has been planted (virtualenv, collection link, Ansible temp files, linters' and
pytest's caches, byte code, drill output, benchmark results, the emulator's directory, installed
project collections, ansible-test output, tarballs), whose member list must be exactly the
tracked files the artifact is meant to carry; and one of the working tree as it is, which must
carry none of those either.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GALAXY = shutil.which("ansible-galaxy", path=str(Path(sys.executable).parent)) or "ansible-galaxy"

# What a checkout accumulates: (path, is a directory of files).
LOCAL_STATE = [
    ".venv/bin/python3", ".venv/lib/python3.11/site-packages/x.py",
    ".ansible/tmp/ansible-local-1/payload.json", ".ansible/collections/ansible_collections/x/y/galaxy.yml",
    ".ruff_cache/0.6.0/123", ".pytest_cache/v/cache/lastfailed", ".mypy_cache/3.11/x.json",
    "plugins/modules/__pycache__/sweep.cpython-311.pyc", "plugins/module_utils/__pycache__/drill.cpython-311.pyc",
    "tests/unit/__pycache__/test_io.cpython-311-pytest-8.pyc", "roles/teardown/x.retry",
    "drill-runs/dr-20260101-abc/drill-report.json", "bench/results/drill.json", ".emulator/moto.log",
    "collections/ansible_collections/amazon/aws/galaxy.yml", "tests/output/junit/x.xml",
    "drguard-sandbox-0.1.0.tar.gz", "dist/drguard-sandbox-0.1.0.tar.gz", "context/Containerfile",
]
# Name patterns that are local state wherever they appear in a member path.
LOCAL_STATE_PARTS = {".venv", ".collections", ".ansible", ".ruff_cache", ".pytest_cache", ".mypy_cache",
                     "__pycache__", "drill-runs", ".emulator", ".git", ".ci", ".cache"}


def _build(src: Path, out: Path) -> list[str]:
    proc = subprocess.run([GALAXY, "collection", "build", "--force", "--output-path", str(out), str(src)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tarball,) = out.glob("drguard-sandbox-*.tar.gz")
    with tarfile.open(tarball) as tar:
        return sorted(m.name for m in tar.getmembers() if not m.isdir())


def _local_state(members: list[str]) -> list[str]:
    bad = []
    for name in members:
        parts = name.split("/")
        if (LOCAL_STATE_PARTS & set(parts) or name.endswith((".pyc", ".retry", ".tar.gz"))
                or name.startswith(("bench/results/", "collections/ansible_collections/", "tests/output/"))):
            bad.append(name)
    return bad


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or name.startswith(p.rstrip("/") + "/") for p in patterns)


@pytest.fixture(scope="module")
def galaxy():
    return yaml.safe_load((ROOT / "galaxy.yml").read_text())


def test_build_of_a_checkout_full_of_local_state_ships_exactly_the_tracked_files(tmp_path, galaxy):
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    tracked = subprocess.run(["tar", "-t"], input=archive, capture_output=True, check=True).stdout.decode().split("\n")
    tracked = sorted(t for t in tracked if t and not t.endswith("/"))
    # The checkout's own files as they are now (a file added since the last commit counts too).
    for rel in subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.split("\n"):
        if rel and (ROOT / rel).is_file() and not (ROOT / rel).is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
            if rel not in tracked:
                tracked.append(rel)
    tracked = [t for t in tracked if (src / t).is_file()]
    for rel in LOCAL_STATE:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("local state\n")
    (src / ".collections/ansible_collections/drguard").mkdir(parents=True)
    os.symlink("../../..", src / ".collections/ansible_collections/drguard/sandbox")

    members = _build(src, tmp_path / "dist")

    assert _local_state(members) == []
    # galaxy.yml itself becomes MANIFEST.json.
    expected = sorted({t for t in tracked if not _ignored(t, galaxy["build_ignore"]) and t != "galaxy.yml"}
                      | {"MANIFEST.json", "FILES.json"})
    assert members == expected
    # What a user installs: the collection's content is all there.
    for rel in ("MANIFEST.json", "README.md", "meta/runtime.yml", "playbooks/drill.yml", "playbooks/reap.yml",
                "plugins/modules/sweep.py", "roles/teardown/tasks/main.yml", "requirements.txt"):
        assert rel in members, rel


def test_build_of_the_working_tree_ships_no_local_state(tmp_path):
    members = _build(ROOT, tmp_path / "dist")
    assert members, "empty collection artifact"
    assert _local_state(members) == []


def test_galaxy_metadata_is_real(galaxy):
    text = (ROOT / "galaxy.yml").read_text()
    assert "example.invalid" not in text and "example.com" not in text
    for key in ("repository", "documentation", "homepage", "issues"):
        assert key not in galaxy or galaxy[key].startswith("https://"), (key, galaxy.get(key))
    runtime = yaml.safe_load((ROOT / "meta/runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")
    assert galaxy["dependencies"] == {"amazon.aws": ">=8.0.0"}
    # The project's collection requirements (what AWX installs on project sync) ask for the same amazon.aws.
    project = yaml.safe_load((ROOT / "collections/requirements.yml").read_text())
    by_name = {c["name"]: c for c in project["collections"]}
    assert by_name["amazon.aws"]["version"] == galaxy["dependencies"]["amazon.aws"]
    assert by_name["drguard.sandbox"] == {"name": "drguard.sandbox", "type": "dir", "source": "."}
    # The execution environment's image asks for the same amazon.aws.
    ee = ROOT / "execution-environment.yml"
    if ee.exists():
        image = {c["name"]: c for c in yaml.safe_load(ee.read_text())["dependencies"]["galaxy"]["collections"]}
        assert image["amazon.aws"]["version"] == galaxy["dependencies"]["amazon.aws"]
