"""End to end: phase validate's db service answers mTLS only, and its refusals reach the drill's collector
(docs/mtls.md, "Tier services over mTLS"). Root only (the netns runtime)."""

from __future__ import annotations

import json
import os

import pytest
from drillkit import run_drill

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the netns runtime needs root")

# The user's command as it was written before the db tier spoke mTLS: plain TCP to DRGUARD_DB_ADDRESS.
PLAIN = r"""
import json, os, socket, sys
host, _sep, port = os.environ["DRGUARD_DB_ADDRESS"].rpartition(":")
with socket.create_connection((host, int(port)), timeout=10) as conn:
    conn.sendall(b"SELECT count(*) FROM orders\n")
    line = conn.makefile("rb").readline()
try:
    ok = json.loads(line).get("ok") is True
except ValueError:
    ok = False
print("answered" if ok else "no answer over plain TCP")
sys.exit(0 if ok else 1)
"""


def test_a_plain_tcp_command_gets_no_answer_and_the_refusal_reaches_the_collector(world, tmp_path):
    validation = dict(world.drill_vars["drill_validation"], argv=["python3", "-c", PLAIN])
    run = run_drill(world, tmp_path, extra={"drill_validation": validation})
    assert run.rc != 0
    report = run.report
    assert report["outcome"] == "failed"
    assert [p["name"] for p in report["phases"] if p["status"] == "failed"] == ["validate"]
    served = [json.loads(line) for line in (run.output_dir / "runtime" / "db-service-events.jsonl")
              .read_text().splitlines() if line.strip()]
    refused = [e for e in served if e["type"] == "drguard.tls.handshake"]
    assert len(refused) == 1 and refused[0]["data"]["accepted"] is False
    assert refused[0]["data"]["reason"] in {"protocol_version", "handshake_failed"}
    assert refused[0]["data"]["peer_id"] is None and refused[0]["data"]["local_tier"] == "db"
    # The phase failed, and still the refusal went to the drill's collector.
    received = {json.loads(line)["id"] for line in (run.output_dir / "telemetry.jsonl").read_text().splitlines()}
    assert refused[0]["id"] in received
    assert report["teardown"]["remaining"] == 0
