"""The drill's artifact gate end to end: who writes the trusted state, and what it then refuses.

The drill verifies with its read-only session and never writes the trusted state from it;
after a fully passed verification the controller records the manifest, so rollback
protection advances: a later drill offered an older (lower-sequence) manifest halts.
"""

from __future__ import annotations

import json

import yaml
from drillkit import remaining, run_drill, seed_world


def _seed_with_older_manifest(emu, out):
    """The demo world (sequence 42), plus the same backup set signed earlier as sequence 41."""
    world = seed_world(emu, out, also_sign=(41,))
    older = yaml.safe_load((out / "sign-vars-41.yml").read_text())
    return world, older["sign_backup_set"], older["sign_dest"]


def test_controller_records_the_trusted_state_and_an_older_manifest_is_then_refused(e2e_emulator, tmp_path):
    world, backup_set, older_manifest = _seed_with_older_manifest(e2e_emulator, tmp_path / "world")
    state_path = tmp_path / "world" / "trusted-state.json"
    backup = dict(world.drill_vars["drill_backup"], backup_set=backup_set)
    assert not state_path.exists()

    passed = run_drill(world, tmp_path / "runs", extra={"drill_backup": backup})
    assert passed.rc == 0, passed.stdout[-4000:]
    assert passed.report["outcome"] == "passed" and passed.report["artifacts"]["verified"] is True
    # Recorded by the controller's step, after the verification passed.
    assert "Phase verify: record the accepted manifest in the trusted state (controller credentials)" \
        in passed.stdout
    state = json.loads(state_path.read_text())
    assert list(state) == [backup_set] and state[backup_set]["sequence"] == 42
    manifest = passed.report["artifacts"]["manifest"]
    assert state[backup_set]["manifest_sha256"] == manifest["sha256"]

    before = state_path.read_bytes()
    older = run_drill(world, tmp_path / "runs", extra={"drill_backup": dict(backup, manifest=older_manifest)})
    assert older.rc != 0
    report = older.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "verify", report.get("error")
    assert [(f["name"], f["reason"]) for f in report["artifacts"]["failures"]] == [(None, "rollback")]
    assert report["artifacts"]["failures"][0]["detail"] == \
        "sequence 41 of %s is lower than the trusted sequence 42" % backup_set
    assert not (older.output_dir / "restore").exists()
    assert state_path.read_bytes() == before
    assert report["teardown"]["remaining"] == 0
    for run in (passed, older):
        assert remaining(world.emu, run.drill_id) == []


def test_manifest_for_another_backup_set_halts_the_drill(e2e_emulator, tmp_path, world):
    backup = dict(world.drill_vars["drill_backup"], backup_set="payments-db", trusted_state=None)
    backup = {k: v for k, v in backup.items() if v is not None}
    run = run_drill(world, tmp_path, extra={"drill_backup": backup})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "verify", report.get("error")
    failures = report["artifacts"]["failures"]
    assert [(f["name"], f["reason"]) for f in failures] == [(None, "manifest_malformed")]
    assert "but backup set 'payments-db' is expected" in failures[0]["detail"]
    assert report["teardown"]["remaining"] == 0
    assert remaining(world.emu, run.drill_id) == []
