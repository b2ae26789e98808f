"""The restore inside the validation tier, through the runtime's S3 endpoint (docs/runtime.md,
"Restore and validation inside"), against the emulator.

Root only, like the other runtime tests: a real runtime with its embedded world under a drill id of
the test's own, torn down (and proven gone) even when the test fails. Traffic only goes between
namespaces the test created, and from the relay to the emulator on the host's loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _probes
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _s3_relay
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and

pytestmark = needs_root_and("ip", "nft", "setpriv", "unshare", "mount")

REGION = "us-east-1"
RAW = {
    "sandbox_cidr": "10.215.0.0/16",
    "production_cidrs": ["10.0.0.0/16"],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
    "s3_read": [{"bucket": "backups", "prefix": "set/"}],
}
# The drill's session: explicit options, never the controller's environment (the emulator takes any key).
SESSION = {"access_key": "AKIAINSIDE0000000001", "secret_key": "inside-secret-" + uuid.uuid4().hex,
           "session_token": "inside-token-" + uuid.uuid4().hex}


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _drill_id():
    return f"dr-20261201010000-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def built(emulator, aws_env, tmp_path):
    """A runtime with S3 granted, its endpoint relaying to the emulator; torn down and proven gone afterwards."""
    drill_id, out = _drill_id(), str(tmp_path / "out")
    boundary = parse_boundary(RAW)
    result = None
    try:
        result = runtime.up(boundary, drill_id, out, python_executable(),
                            s3_target=_s3_relay.target(emulator.url, REGION))
        yield {"drill_id": drill_id, "out": out, "boundary": boundary, "result": result}
    finally:
        runtime.down(drill_id, out)
        prefix = runtime.prefix_of(drill_id)
        assert runtime.leftovers(prefix) == {"namespaces": [], "tables": [], "mounts": [], "processes": [],
                                             "holders": []}
        assert _s3_relay.find(prefix) == []


@pytest.fixture
def objects(aws):
    s3 = aws("s3")
    name = "inside-%s" % uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    entries = []
    for key, body in (("set/orders.sqlite", os.urandom(3 * 1024 * 1024 + 17)), ("set/a b+ü.txt", b"hello inside\n")):
        version = s3.put_object(Bucket=name, Key=key, Body=body)["VersionId"]
        s3.put_object(Bucket=name, Key=key, Body=b"a newer version the restore must not take")
        entries.append({"name": key.split("/")[-1].replace(" ", "_"), "verified": True, "sha256": _sha(body),
                        "size": len(body), "source": "s3://%s/%s" % (name, key), "version_id": version,
                        "kind": "raw", "_body": body})
    return entries


def _args(built, entries, dest, **extra):
    s3 = built["result"]["s3_endpoint"]
    return dict({"artifacts": [{k: v for k, v in e.items() if k != "_body"} for e in entries], "dest": str(dest),
                 "namespace": built["result"]["prefix"] + "validation",
                 "s3_endpoint": "%s:%d" % (s3["address"], s3["port"]), "region": REGION}, **SESSION, **extra)


def test_the_runtime_result_names_the_endpoint_and_its_relay(built, emulator):
    s3 = built["result"]["s3_endpoint"]
    host, port = emulator.url.split("//")[1].split(":")
    assert s3 == {"address": "198.18.0.1", "port": 443, "ns": built["result"]["prefix"] + "s3",
                  "relay": f"{host}:{port}"}
    state = runtime.read_state_file(built["out"])
    relay = state["processes"]["s3_relay"]
    assert relay["role"] == "s3_relay" and _s3_relay.is_relay(relay["pid"], built["result"]["prefix"])
    # Unprivileged on the controller's side: its own uid, no capabilities.
    status = Path(f"/proc/{relay['pid']}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(relay["uid"])} and int(relay["uid"]) >= 2_000_000_000
    assert next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1] == "0" * 16
    # A second build keeps it.
    again = runtime.up(built["boundary"], built["drill_id"], built["out"], python_executable(),
                       s3_target=_s3_relay.target(emulator.url, REGION))
    assert again["changed"] is False and again["s3_endpoint"]["relay"] == s3["relay"]


def test_restore_inside_the_validation_tier_gives_the_pinned_bytes(built, objects, tmp_path):
    dest = tmp_path / "restore"
    res = run_module("restore_artifacts", _args(built, objects, dest, endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
    assert not res.failed, res
    assert res["inside"] == built["result"]["prefix"] + "validation"
    for entry, item in zip(objects, res["restored"], strict=True):
        path = Path(item["path"])
        assert path.parent == dest and path.read_bytes() == entry["_body"]
        assert item["sha256"] == entry["sha256"] and item["size"] == entry["size"]
        assert oct(path.stat().st_mode & 0o777) == "0o400"
    assert res["bytes_restored"] == sum(e["size"] for e in objects)
    # No secret of the session anywhere in the result.
    text = json.dumps(res)
    assert SESSION["secret_key"] not in text and SESSION["session_token"] not in text
    # The restored files are what validate_restore opens next (the validate phase's contract).
    val = run_module("validate_restore", {"restored": res["restored"]})
    assert not val.failed and [r["kind"] for r in val["results"]] == ["raw", "raw"]


def test_restore_inside_refuses_bytes_that_differ_from_what_was_verified(built, objects, tmp_path):
    bad = [dict(objects[1], sha256=_sha(b"something else"))]
    res = run_module("restore_artifacts", _args(built, bad, tmp_path / "r", endpoint_url=os.environ["AWS_URL"]))
    assert res.failed and "restored bytes differ from what was verified" in res["msg"]
    assert not (tmp_path / "r" / bad[0]["name"]).exists()


def test_restore_inside_needs_the_drills_session_not_the_controllers(built, objects, tmp_path):
    args = _args(built, objects, tmp_path / "r", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in SESSION:
        del args[key]
    res = run_module("restore_artifacts", args)
    assert res.failed and "needs the drill's session as explicit access_key" in res["msg"]
    assert not (tmp_path / "r").exists()


def test_restore_inside_without_an_s3_endpoint_is_refused_before_anything(built, objects, tmp_path):
    args = _args(built, objects, tmp_path / "r")
    del args["s3_endpoint"]
    res = run_module("restore_artifacts", args)
    assert res.failed and res["msg"].startswith("s3_endpoint is required with namespace")
    assert run_module("restore_artifacts", dict(args, s3_endpoint="198.18.0.1"))["msg"].startswith(
        "s3_endpoint '198.18.0.1' is not address:port")


def test_the_probes_see_the_endpoint_open_on_443_only(built):
    boundary = built["boundary"]
    plan = runtime.full_plan(boundary, built["drill_id"])
    rows = [r for r in _probes.probe_matrix(boundary, plan) if r["dst"] == "s3_endpoint"]
    outcome = _probes.run_probes(rows, plan)
    seen = {(r["src"], r["address"], r["expected"], r["observed"]) for r in outcome["rows"]}
    assert seen == {(t, f"198.18.0.1:{p}", e, e) for t in ("app", "db", "validation")
                    for p, e in ((443, "allow"), (80, "deny"))}
    assert outcome["violations"] == []


def test_a_relay_left_out_of_the_state_is_still_found_and_removed(built):
    prefix = built["result"]["prefix"]
    state = runtime.read_state_file(built["out"])
    pid = state["processes"].pop("s3_relay")["pid"]
    runtime._write_state(built["out"], state)  # noqa: SLF001 - a kill between start and the state write
    assert runtime.leftovers(prefix)["processes"] == [pid]
    runtime.down(built["drill_id"], built["out"])
    assert not os.path.exists(f"/proc/{pid}") or not _s3_relay.is_relay(pid, prefix)


def test_without_the_declaration_no_endpoint_exists_and_the_tier_cannot_reach_one(emulator, aws_env, objects,
                                                                                     tmp_path):
    drill_id, out = _drill_id(), str(tmp_path / "out")
    raw = {k: v for k, v in RAW.items() if k != "s3_read"}
    prefix = runtime.prefix_of(drill_id)
    try:
        result = runtime.up(parse_boundary(raw), drill_id, out, python_executable(),
                            s3_target=_s3_relay.target(emulator.url, REGION))
        assert result["s3_endpoint"] is None
        assert prefix + "s3" not in runtime.leftovers(prefix)["namespaces"]
        assert _s3_relay.find(prefix) == []
        res = run_module("restore_artifacts", dict(_args({"result": dict(result, s3_endpoint={
            "address": "198.18.0.1", "port": 443})}, objects[1:], tmp_path / "r"),
            endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
        assert res.failed
        assert "could not read a_b+ü.txt: S3 endpoint 198.18.0.1:443 not reachable (timed out)" in res["msg"]
    finally:
        runtime.down(drill_id, out)
    assert runtime.leftovers(prefix) == {"namespaces": [], "tables": [], "mounts": [], "processes": [],
                                         "holders": []}


def test_a_rule_injected_to_open_another_endpoint_port_is_seen_by_verify_and_probes(built):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns  # noqa: PLC0415
    from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_verify  # noqa: PLC0415
    boundary = built["boundary"]
    plan = runtime.full_plan(boundary, built["drill_id"])
    assert [f["code"] for f in _runtime_verify.verify(boundary, plan)["findings"]] == []
    nft = shutil.which("nft")
    done = netns.run_in(plan["router"]["ns"], [nft, "insert", "rule", "inet", plan["table"], "forward",
                                               "ip", "daddr", "198.18.0.1", "tcp", "dport", "80", "accept"],
                        privileged=True)
    assert done.returncode == 0, done.stderr
    assert "runtime_rule_undeclared" in [f["code"] for f in _runtime_verify.verify(boundary, plan)["findings"]]
    rows = [r for r in _probes.probe_matrix(boundary, plan) if r["dst"] == "s3_endpoint"]
    outcome = _probes.run_probes(rows, plan)
    assert sorted((v["code"], outcome["rows"][v["row"]]["address"]) for v in outcome["violations"]) == [
        ("undeclared_reachable", "198.18.0.1:80")] * 3  # from every tier


def test_the_endpoint_of_an_undeclared_boundary_is_a_finding(built):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_verify  # noqa: PLC0415
    # The same live runtime judged against a boundary without S3: its endpoint namespace is not the plan's.
    raw = {k: v for k, v in RAW.items() if k != "s3_read"}
    boundary = parse_boundary(raw)
    plan = runtime.full_plan(boundary, built["drill_id"])
    found = _runtime_verify.verify(boundary, plan)["findings"]
    assert ("runtime_namespace_unexpected", built["result"]["prefix"] + "s3") in {(f["code"], f["resource"])
                                                                                  for f in found}
    assert "runtime_rule_undeclared" in [f["code"] for f in found]


def test_a_local_source_is_restored_on_the_controller_next_to_the_s3_ones(built, objects, tmp_path, emulator):
    local = tmp_path / "mount" / "notes.txt"
    local.parent.mkdir()
    local.write_bytes(b"from the read-only mount\n")
    entry = {"name": "notes.txt", "verified": True, "sha256": _sha(local.read_bytes()), "size": local.stat().st_size,
             "source": str(local), "version_id": None}
    args = _args(built, [entry, *objects[1:]], tmp_path / "r", endpoint_url=emulator.url)
    res = run_module("restore_artifacts", args)
    assert not res.failed, res
    assert [Path(r["path"]).read_bytes() for r in res["restored"]] == [local.read_bytes(), objects[1]["_body"]]


def test_another_target_replaces_the_relay_and_no_target_gives_a_plain_listener(built, emulator):
    prefix = built["result"]["prefix"]
    first = runtime.read_state_file(built["out"])["processes"]["s3_relay"]["pid"]
    moved = runtime.up(built["boundary"], built["drill_id"], built["out"], python_executable(),
                       s3_target=_s3_relay.target("http://127.0.0.1:9"))
    assert moved["changed"] is True and moved["s3_endpoint"]["relay"] == "127.0.0.1:9"
    second = runtime.read_state_file(built["out"])["processes"]["s3_relay"]["pid"]
    assert second != first and _s3_relay.find(prefix) == [second]
    plain = runtime.up(built["boundary"], built["drill_id"], built["out"], python_executable())
    assert plain["s3_endpoint"]["relay"] is None and _s3_relay.find(prefix) == []
    assert "s3_relay" not in runtime.read_state_file(built["out"])["processes"]
    # The endpoint is still there for the probes (a plain listener), and the relay comes back on request.
    rows = [r for r in _probes.probe_matrix(built["boundary"], runtime.full_plan(built["boundary"], built["drill_id"]))
            if r["dst"] == "s3_endpoint"]
    assert _probes.run_probes(rows, runtime.full_plan(built["boundary"], built["drill_id"]))["violations"] == []
    back = runtime.up(built["boundary"], built["drill_id"], built["out"], python_executable(),
                      s3_target=_s3_relay.target(emulator.url, REGION))
    assert back["s3_endpoint"]["relay"] == built["result"]["s3_endpoint"]["relay"]
