"""Jobs run the way AWX runs them, from a plain checkout with the collection installed from its tarball.

The project is a ``git archive`` of HEAD (no ``.collections`` link, no ``make``); the collection is
built from it (``ansible-galaxy collection build``) and installed from that tarball into a
collection path of the test's own, offline (amazon.aws is the one the ``ansible`` package ships).
Then, against the emulator:

* ``ansible-playbook drill.yml`` (the root playbook importing ``drguard.sandbox.drill``) as users
  type it: the syntax check fails without the installed collection and passes with it, and a real
  drill passes and leaves nothing behind;
* ansible-runner - the engine AWX runs jobs with - runs ``drill.yml`` from a private data directory
  laid out as AWX lays it out (project, inventory, env/extravars, env/envvars): status successful, the
  ``playbook_on_stats`` event carries the ``set_stats`` figures (outcome passed, teardown remaining 0);
  the tampered backup ends with status failed, outcome halted and the figures still published;
* the same job through ``ansible-runner transmit | ansible-runner worker | ansible-runner process``
  (the stream that travels between AWX's control and execution nodes) gives the same result;
* no secret supplied to a job (the masking key, the masked secret's production value) is in any of
  the runner's artifacts (job events, stdout, status, command), in any encoding the leak test knows.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from drillkit import new_drill_id, remaining, seed_world
from test_secret_leaks import Scan

from emulator import child_env


ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _clean_env(extra: dict | None = None) -> dict:
    """The environment of a fresh shell on the node: no Ansible settings of this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "AWS_", "DRGUARD_", "MOLECULE_", "PYTEST_"))}
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """``git archive HEAD`` unpacked, and the collection built from it and installed from the tarball."""
    base = tmp_path_factory.mktemp("plain")
    project = base / "project"
    project.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive, check=True)
    assert not (project / ".collections").exists()
    collections = base / "collections"
    # Away from this checkout (its ansible.cfg would point at its .collections link).
    env = _clean_env({"ANSIBLE_LOCAL_TEMP": str(base / "tmp"), "ANSIBLE_COLLECTIONS_PATH": str(collections)})
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(base / "dist"),
                    str(project)], env=env, cwd=base, check=True, capture_output=True)
    (tarball,) = (base / "dist").glob("drguard-sandbox-*.tar.gz")
    proc = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", "--offline", "-p",
                           str(collections), str(tarball)], env=env, cwd=base, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = collections / "ansible_collections" / "drguard" / "sandbox"
    assert (installed / "MANIFEST.json").is_file() and not installed.is_symlink()
    return {"base": base, "project": project, "collections": collections, "tarball": tarball}


def _ansible_env(plain, emu=None, collections=None) -> dict:
    env = _clean_env({"ANSIBLE_COLLECTIONS_PATH": str(collections or plain["collections"]),
                      "ANSIBLE_LOCAL_TEMP": str(plain["base"] / "tmp"), "ANSIBLE_NOCOLOR": "1"})
    if emu is not None:
        env = child_env(emu.url, env)
    return env


def _drill_vars(world, out: Path, **extra) -> dict:
    return dict(world.drill_vars, drill_id=new_drill_id(), drill_output_root=str(out), **extra)


# ------------------------------------------------------------------ ansible-playbook, as users type it

def test_plain_checkout_resolves_the_collection_once_it_is_installed(plain, tmp_path):
    empty = tmp_path / "no-collections"
    empty.mkdir()
    cmd = [str(BIN / "ansible-playbook"), "drill.yml", "--syntax-check"]
    before = subprocess.run(cmd, cwd=plain["project"], env=_ansible_env(plain, collections=empty),
                            capture_output=True, text=True, check=False)
    assert before.returncode != 0 and "drguard.sandbox.drill" in before.stdout + before.stderr
    for playbook in ("drill.yml", "reap.yml"):
        proc = subprocess.run([str(BIN / "ansible-playbook"), playbook, "--syntax-check"], cwd=plain["project"],
                              env=_ansible_env(plain), capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Installed, the collection's playbooks run by name from anywhere.
    for name in ("drguard.sandbox.drill", "drguard.sandbox.reap"):
        proc = subprocess.run([str(BIN / "ansible-playbook"), name, "--syntax-check"], cwd=tmp_path,
                              env=_ansible_env(plain), capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_plain_checkout_drill_passes_against_the_emulator(plain, world, tmp_path):
    variables = _drill_vars(world, tmp_path / "runs")
    vars_file = tmp_path / "vars.yml"
    vars_file.write_text(yaml.safe_dump(variables))
    proc = subprocess.run([str(BIN / "ansible-playbook"), "drill.yml", "-e", "@%s" % vars_file],
                          cwd=plain["project"], env=_ansible_env(plain, world.emu), capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / variables["drill_id"] / "drill-report.json").read_text())
    assert report["outcome"] == "passed" and report["teardown"]["remaining"] == 0
    assert remaining(world.emu, variables["drill_id"]) == []


# ------------------------------------------------------------------ ansible-runner, as AWX runs jobs

def _private_data_dir(plain, emu, where: Path, variables: dict) -> Path:
    """A private data directory as AWX lays it out for a job of the synced project."""
    pdd = where / "pdd"
    pdd.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(plain["project"]), str(pdd / "project")], check=True)
    (pdd / "inventory").mkdir()
    (pdd / "inventory" / "hosts").write_text(
        "localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    (pdd / "env").mkdir()
    (pdd / "env" / "extravars").write_text(yaml.safe_dump(variables))
    # What AWX's credentials and execution environment give the job: the collection path, the endpoint.
    envvars = child_env(emu.url, {})
    envvars.update({"ANSIBLE_COLLECTIONS_PATH": str(plain["collections"]),
                    "ANSIBLE_LOCAL_TEMP": str(where / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"})
    (pdd / "env" / "envvars").write_text(yaml.safe_dump(envvars))
    (pdd / "env" / "settings").write_text(yaml.safe_dump({"suppress_ansible_output": True}))
    return pdd


def _events(artifacts: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((artifacts / "job_events").glob("*.json"))]


def _stats(events: list[dict]) -> dict:
    (stats,) = [e for e in events if e.get("event") == "playbook_on_stats"]
    return stats["event_data"].get("artifact_data") or {}


def _runner_run(pdd: Path, ident: str) -> Path:
    proc = subprocess.run([str(BIN / "ansible-runner"), "run", str(pdd), "-p", "drill.yml", "--ident", ident],
                          env=_clean_env(), capture_output=True, text=True, timeout=900, check=False)
    artifacts = pdd / "artifacts" / ident
    assert (artifacts / "status").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return artifacts


def _runner_stream(pdd: Path, where: Path, ident: str) -> Path:
    """``ansible-runner transmit | ansible-runner worker | ansible-runner process``."""
    worker_dir = where / "worker"
    worker_dir.mkdir()
    out = where / "processed"
    out.mkdir()
    env = _clean_env()
    transmit = subprocess.Popen([str(BIN / "ansible-runner"), "transmit", str(pdd), "-p", "drill.yml",
                                 "--ident", ident], stdout=subprocess.PIPE, env=env)
    worker = subprocess.Popen([str(BIN / "ansible-runner"), "worker", "--private-data-dir", str(worker_dir)],
                              stdin=transmit.stdout, stdout=subprocess.PIPE, env=env)
    transmit.stdout.close()
    process = subprocess.run([str(BIN / "ansible-runner"), "process", str(out), "--ident", ident],
                             stdin=worker.stdout, capture_output=True, text=True, timeout=900, env=env, check=False)
    worker.stdout.close()
    assert transmit.wait(60) == 0 and worker.wait(60) == 0, process.stdout[-3000:] + process.stderr[-3000:]
    artifacts = out / "artifacts" / ident
    assert (artifacts / "status").is_file(), process.stdout[-3000:] + process.stderr[-3000:]
    return artifacts


def _canaries(world) -> tuple[dict, dict]:
    """Drill variables with fresh secrets in them, and those secrets as canaries."""
    masking_key = "mk-canary-" + secrets.token_urlsafe(32)
    production = "ghp_" + secrets.token_hex(18)
    drill_secrets = [dict(s, value=production) if s.get("kind") == "masked" else s
                     for s in world.drill_vars.get("drill_secrets", [])]
    assert any(s.get("value") == production for s in drill_secrets), "the demo world has no masked secret"
    return ({"drill_masking_key": masking_key, "drill_secrets": drill_secrets},
            {"masking key": masking_key, "production value": production})


def _no_secret_in(artifacts: Path, canaries: dict) -> None:
    probe = Scan(canaries)
    probe.data("planted", json.dumps(canaries).encode())
    assert len({h.split(" as ")[0] for h in probe.hits}) == len(canaries), "self-check: canaries not found"
    scan = Scan(canaries)
    scan.tree(artifacts)
    assert scan.sources >= 3 and scan.bytes > 0
    assert scan.hits == []


@pytest.mark.parametrize("path", ["run", "transmit-worker-process"])
def test_runner_job_passes_and_publishes_the_drill_figures(plain, world, tmp_path, path):
    extra, canaries = _canaries(world)
    variables = _drill_vars(world, tmp_path / "runs", **extra)
    pdd = _private_data_dir(plain, world.emu, tmp_path, variables)
    ident = "job-" + path
    artifacts = _runner_run(pdd, ident) if path == "run" else _runner_stream(pdd, tmp_path, ident)
    events = _events(artifacts)
    assert (artifacts / "status").read_text() == "successful", (artifacts / "stdout").read_text()[-4000:]
    assert (artifacts / "rc").read_text() == "0"
    figures = _stats(events)["drill"]
    assert figures["outcome"] == "passed" and figures["teardown_remaining"] == 0, figures
    assert figures["drill_id"] == variables["drill_id"]
    assert remaining(world.emu, variables["drill_id"]) == []
    _no_secret_in(artifacts, canaries)


def test_runner_job_of_a_tampered_backup_halts_and_still_publishes_the_figures(plain, e2e_emulator, tmp_path):
    tampered = seed_world(e2e_emulator, tmp_path / "world", mode="tampered")
    extra, canaries = _canaries(tampered)
    variables = _drill_vars(tampered, tmp_path / "runs", **extra)
    pdd = _private_data_dir(plain, e2e_emulator, tmp_path, variables)
    artifacts = _runner_run(pdd, "job-tampered")
    assert (artifacts / "status").read_text() == "failed"
    figures = _stats(_events(artifacts))["drill"]
    assert figures["outcome"] == "halted" and figures["teardown_remaining"] == 0, figures
    assert remaining(e2e_emulator, variables["drill_id"]) == []
    _no_secret_in(artifacts, canaries)
