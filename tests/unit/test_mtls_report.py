"""The report's ``mtls`` section (docs/report.md): built from runtime_mtls's result, rendered in drill-report.md."""

from __future__ import annotations

from ansible_collections.drguard.sandbox.plugins.module_utils import report

ROW = {"src": "app", "dst": "db", "address": "10.0.0.2:5432", "layer": "mtls", "case": "allowed", "expected": "allow",
       "observed": "allow", "reason": "round_trip", "expected_reason": "round_trip", "latency_ms": 3.1,
       "peer_id": "spiffe://d.drguard.internal/tier/app", "serial": "AB", "server_serial": "CD"}
REFUSED = dict(ROW, case="no_client_certificate", expected="deny", observed="deny", reason="no_client_certificate",
               expected_reason="no_client_certificate", peer_id=None, serial=None)


def result():
    return {"skipped": False, "trust_domain": "d.drguard.internal",
            "ca": {"serial": "01", "sha256": "ff" * 32, "not_before": "2026-01-01T00:00:00Z",
                   "not_after": "2026-01-01T01:00:00Z"},
            "servers": [{"tier": "db", "address": "10.0.0.2", "ports": [5432]}],
            "rows": [ROW, REFUSED], "violations": [], "unexpected": [],
            "handshakes": [{"local_tier": "db", "port": 5432, "peer_id": ROW["peer_id"], "peer_tier": "app",
                            "serial": "AB", "accepted": True, "reason": "allowed", "latency_ms": 2.0,
                            "local_serial": "CD", "peer_address": "10.0.0.1", "time": "t"},
                           {"local_tier": "db", "port": 5432, "peer_id": None, "peer_tier": None, "serial": None,
                            "accepted": False, "reason": "no_client_certificate", "latency_ms": 1.0,
                            "local_serial": "CD", "peer_address": "10.0.0.1", "time": "t"}],
            "rotation": {"rotated": True, "dropped_connections": 0, "failed_handshakes": 0,
                         "new_serials": ["CD", "EF"], "held_round_trips": 40, "pair": "app->db:5432"},
            "ca_rotation": {"rotated": True, "old_ca": "01", "new_ca": "02", "old_ca_key_destroyed": True},
            "telemetry": {"sent": 2, "acknowledged": 2}}


def test_section_carries_ca_handshakes_and_rotation():
    section = report.mtls_section(result())
    assert section["ca"] == {"serial": "01", "sha256": "ff" * 32, "not_after": "2026-01-01T01:00:00Z"}
    assert [(h["peer_id"], h["serial"], h["accepted"], h["reason"]) for h in section["handshakes"]] == [
        (ROW["peer_id"], "AB", True, "allowed"), (None, None, False, "no_client_certificate")]
    assert section["counts"] == {"handshakes": 2, "accepted": 1, "refused": 1,
                                 "by_reason": {"allowed": 1, "no_client_certificate": 1}}
    assert section["rotation"]["rotated"] is True and section["rotation"]["dropped_connections"] == 0
    assert section["ca_rotation"]["old_ca_key_destroyed"] is True
    assert section["probes"] == [ROW, REFUSED] and section["violations"] == 0


def test_no_section_when_the_phase_did_not_run_and_a_note_when_skipped():
    assert report.mtls_section(None) is None
    skipped = report.mtls_section({"skipped": True, "note": "no tcp tier rule", "rows": []})
    assert skipped == {"skipped": True, "note": "no tcp tier rule"}


def test_rendered_in_markdown():
    text = report.render_markdown({"drill_id": "d", "outcome": "passed", "started_at": "s", "finished_at": "f",
                                   "seconds": 1, "phases": [], "mtls": report.mtls_section(result())})
    assert "## mTLS between the tiers" in text
    assert "| no_client_certificate | app | db | deny | deny | no_client_certificate |" in text
    assert "dropped connections 0" in text and "old CA key destroyed True" in text


def test_the_db_services_handshakes_are_counted_apart_from_the_phases():
    db = [{"local_tier": "db", "port": 5432, "peer_id": ROW["peer_id"], "peer_tier": "app", "serial": "AB",
           "accepted": True, "reason": "allowed", "latency_ms": 2.5, "time": "t"},
          {"local_tier": "db", "port": 5432, "peer_id": None, "peer_tier": None, "serial": None,
           "accepted": False, "reason": "no_client_certificate", "latency_ms": 0.7, "time": "t"},
          {"local_tier": "db", "port": 5432, "peer_id": None, "peer_tier": None, "serial": None,
           "accepted": False, "reason": "no_client_certificate", "latency_ms": 0.6, "time": "t"}]
    section = report.mtls_section(dict(result(), service_handshakes=db))
    assert section["counts"]["handshakes"] == 2  # the phase's own, unchanged
    assert section["service_counts"] == {"handshakes": 3, "accepted": 1, "refused": 2,
                                         "by_reason": {"allowed": 1, "no_client_certificate": 2}}
    assert [h["serial"] for h in section["service_handshakes"]] == ["AB", None, None]
    text = report.render_markdown({"drill_id": "d", "outcome": "passed", "started_at": "s", "finished_at": "f",
                                   "seconds": 1, "phases": [], "mtls": section})
    assert "Tier services (the db service): 3 handshake(s): 1 accepted, 2 refused (allowed 1, " \
           "no_client_certificate 2)." in text
    assert report.mtls_section(result())["service_counts"]["handshakes"] == 0
