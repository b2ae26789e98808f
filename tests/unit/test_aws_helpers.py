"""Credentials passed to our modules never come back in their results."""

from __future__ import annotations

import json

from conftest import run_module


def test_minted_access_key_id_is_censored_in_the_invocation(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    res = run_module("restore_artifacts", {
        "artifacts": [{"name": "a", "verified": False, "sha256": "0" * 64, "size": 3, "source": str(src)}],
        "dest": str(tmp_path / "r"), "region": "us-east-1",
        "access_key": "ASIACANARYKEYID12345", "secret_key": "canary-secret", "session_token": "canary-token"})
    assert res.failed
    text = json.dumps(res)
    for canary in ("ASIACANARYKEYID12345", "canary-secret", "canary-token"):
        assert canary not in text
