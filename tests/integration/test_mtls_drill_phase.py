"""The mtls phase's backend (``_mtls_drill.Phase``) on a real netns runtime: it proves what docs/mtls.md says
and leaves the runtime exactly as it was built (the plain listener back on the tier rule's port, no server
left, ``runtime/state.json`` without them), so the probes before and the db service after are unaffected.

Root only. Each test builds a runtime under a drill id of its own and removes it, and its PKI, even when it fails.
"""

from __future__ import annotations

import os
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import app_db_boundary

pytestmark = needs_root_and("ip", "nft", "setpriv")

PYTHON = python_executable()
RAW = app_db_boundary("10.216.0.0/16")


@pytest.fixture
def drill(tmp_path):
    drill_id = f"dr-mtlsph-{uuid.uuid4().hex[:10]}"
    out = str(tmp_path / "out")
    try:
        yield drill_id, out
    finally:
        netns.destroy(runtime.prefix_of(drill_id))
        _mtls_drill.destroy(drill_id)
        assert not os.path.exists(_mtls_drill.root_dir(drill_id))


def test_phase_proves_mtls_and_gives_the_runtime_back_as_built(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    built = runtime.up(boundary, drill_id, out, PYTHON)
    plan = runtime.full_plan(boundary, drill_id)
    before = runtime.read_state_file(out)["processes"]
    result = _mtls_drill.Phase(boundary, drill_id, out, python=PYTHON, ttl=3600,
                               telemetry=built["collector"]).run()
    assert result["violations"] == [] and result["unexpected"] == []
    assert {r["case"] for r in result["rows"]} >= {"allowed", "no_client_certificate", "rotated_out_leaf",
                                                  "old_ca_leaf_after_retirement"}
    assert result["rotation"]["dropped_connections"] == 0 and result["rotation"]["failed_handshakes"] == 0
    assert result["telemetry"]["acknowledged"] == len(result["handshakes"]) + result["reloads"]
    assert result["servers"] == [{"tier": "db", "address": plan["tiers"]["db"]["address"], "ports": [5432]}]
    # Given back: no mtls server recorded or alive, the db tier's plain listener restarted with all its ports,
    # every other process untouched, and the runtime complete as the runtime itself judges it.
    after = runtime.read_state_file(out)["processes"]
    assert set(after) == set(before)
    db_key = "listeners:%s" % plan["tiers"]["db"]["ns"]
    assert {k: v for k, v in after.items() if k != db_key} == {k: v for k, v in before.items() if k != db_key}
    assert ("tcp", plan["tiers"]["db"]["address"], 5432) in runtime._sockets(netns, plan["tiers"]["db"]["ns"], PYTHON)
    assert runtime.status(boundary, plan, out, PYTHON) is True
    # No key material in the result.
    assert "PRIVATE KEY" not in repr(result) and "BEGIN" not in repr(result)


def test_a_server_accepting_an_identity_tier_rules_does_not_allow_is_a_violation(drill):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    runtime.up(boundary, drill_id, out, PYTHON)
    result = _mtls_drill.Phase(boundary, drill_id, out, python=PYTHON, ttl=3600,
                               inject_allow=[{"from": "validation", "to": "db", "ports": [5432]}]).run()
    assert [(r["case"], r["expected"], r["observed"], r["reason"]) for r in result["violations"]] == [
        ("identity_not_allowed:validation", "deny", "allow", "round_trip")]


def test_the_reaper_destroys_the_pki_of_a_drill_killed_in_the_mtls_phase(tmp_path):
    import json  # noqa: PLC0415

    from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_reap  # noqa: PLC0415
    drill_id = f"dr-mtlsrp-{uuid.uuid4().hex[:10]}"
    root = tmp_path / "runs"
    out = root / drill_id
    out.mkdir(parents=True)
    (out / "state.json").write_text(json.dumps({"drill_id": drill_id, "expires_at": "2026-01-01T00:00:00Z"}))
    try:
        boundary = parse_boundary(RAW)
        runtime.up(boundary, drill_id, str(out), PYTHON)
        phase = _mtls_drill.Phase(boundary, drill_id, str(out), python=PYTHON, ttl=3600)
        phase.make_root()
        phase.store.present(["app", "db"], 3600)
        phase.deliver()
        phase.start_servers()  # ... and the controller is killed here: no teardown
        assert os.path.exists(os.path.join(phase.store.dir, "ca-%s.key" % phase.store.state()["cas"][0]))
        result = _runtime_reap.reap(str(root))
        assert [e["drill_id"] for e in result["removed"]] == [drill_id]
        assert not os.path.lexists(_mtls_drill.root_dir(drill_id))
    finally:
        netns.destroy(runtime.prefix_of(drill_id))
        _mtls_drill.destroy(drill_id)
