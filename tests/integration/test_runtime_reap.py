"""The runtime reaper (plugins/module_utils/_runtime_reap.py, module runtime_reap) on real namespaces.

Root only for the tests that build runtimes (CI runs as root, with iproute2 and nftables). Each test
uses drill ids of its own and a runs directory of its own; every prefix it creates is destroyed at
the end even when it fails. Other runtimes on the host (other tests' drills) have no drill directory
under the test's runs directory, so the reaper must refuse them: the tests check that too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_reap as reaper
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import app_db_boundary

root_only = needs_root_and("ip", "nft", "setpriv")

RAW = app_db_boundary("10.214.0.0/16")
PYTHON = python_executable()
NOW = datetime.now(timezone.utc)


def stamp(when):
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id():
    return f"dr-reap-{uuid.uuid4().hex[:12]}"


def write_drill_state(root, name, expires_at, records=None):
    """What drill_context writes before anything is created: <root>/<drill_id>/state.json
    (``records``: another drill id than the directory's name)."""
    out = root / name
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = {"drill_id": records or name, "region": "us-east-1", "started_at": stamp(NOW - timedelta(hours=2)),
             "expires_at": expires_at}
    (out / "state.json").write_text(json.dumps(state))
    return str(out)


@pytest.fixture
def drills():
    """Drill ids to clean up: every prefix is destroyed at the end, whatever the test did."""
    made = []
    yield made
    for drill_id in made:
        netns.destroy(runtime.prefix_of(drill_id))
        _mtls_drill.destroy(drill_id)  # the drill's PKI, which the runtime made for its collector


def build(drills, root, expires_at):
    """A real runtime of a new drill whose directory under ``root`` records ``expires_at``."""
    drill_id = new_id()
    drills.append(drill_id)
    out = write_drill_state(root, drill_id, expires_at)
    runtime.up(parse_boundary(RAW), drill_id, out, PYTHON)
    return drill_id, out


def alive(drill_id):
    return runtime.leftovers(runtime.prefix_of(drill_id))["namespaces"]


def by_prefix(entries):
    return {e["prefix"]: e for e in entries}


# ---------------------------------------------------------------- proof (no root needed)


def test_drill_records_prove_only_a_drill_directory_named_after_its_own_state(tmp_path):
    good = new_id()
    write_drill_state(tmp_path, good, stamp(NOW))
    other = new_id()
    write_drill_state(tmp_path, other, stamp(NOW), records=new_id())  # records another drill than its name
    no_expiry = new_id()
    write_drill_state(tmp_path, no_expiry, "tomorrow")
    linked = new_id()
    real = tmp_path / "elsewhere"
    write_drill_state(real, linked, stamp(NOW))
    (tmp_path / linked).symlink_to(real / linked)  # a symlinked drill directory proves nothing
    state_link = new_id()
    (tmp_path / state_link).mkdir()
    (tmp_path / state_link / "state.json").symlink_to(real / linked / "state.json")
    (tmp_path / "not-a-drill").mkdir()  # no state.json: not a drill directory at all

    records, skipped = reaper.drill_records(str(tmp_path))
    assert records == {runtime.prefix_of(good): [{"drill_id": good, "expires_at": stamp(NOW),
                                                  "output_dir": str(tmp_path / good)}]}
    reasons = {os.path.basename(os.path.dirname(s["path"])): s["reason"] for s in skipped}
    assert set(reasons) == {other, no_expiry, state_link}
    assert "not " + other in reasons[other]
    assert "not RFC 3339" in reasons[no_expiry]
    assert "Too many levels of symbolic links" in reasons[state_link] or "ELOOP" in reasons[state_link]


def test_drill_records_of_a_missing_runs_directory_are_empty_and_a_relative_one_is_refused(tmp_path):
    assert reaper.drill_records(str(tmp_path / "none")) == ({}, [])
    with pytest.raises(reaper.RuntimeReapError, match="must be an absolute path"):
        reaper.drill_records("drill-runs")


def _colliding_ids():
    """Two drill ids whose prefixes (6 hex of SHA-256) collide, found by brute force (a birthday search)."""
    seen = {}
    for i in itertools.count():
        drill_id = f"dr-collide-{i}"
        short = hashlib.sha256(drill_id.encode()).hexdigest()[:6]
        if short in seen:
            return seen[short], drill_id
        seen[short] = drill_id


def test_judge_needs_one_expired_record_or_the_targeted_drill():
    past, future = stamp(NOW - timedelta(minutes=1)), stamp(NOW + timedelta(minutes=30))
    rec = {"drill_id": "dr-a1", "expires_at": past, "output_dir": "/runs/dr-a1"}
    assert reaper.judge("drg-000000-", [rec], NOW) == (rec, None)
    at_expiry = dict(rec, expires_at=stamp(NOW.replace(microsecond=0)))
    assert reaper.judge("drg-000000-", [at_expiry], NOW.replace(microsecond=0)) == (at_expiry, None)
    live = dict(rec, expires_at=future)
    assert reaper.judge("drg-000000-", [live], NOW)[1]["reason"] == "not_expired"
    assert reaper.judge("drg-000000-", [live], NOW, drill_id="dr-a1") == (live, None)
    assert reaper.judge("drg-000000-", [], NOW)[1]["reason"] == "no_proof"
    assert reaper.judge("drg-000000-", [], NOW, drill_id="dr-a1")[1]["reason"] == "no_proof"
    first, second = _colliding_ids()
    assert runtime.prefix_of(first) == runtime.prefix_of(second)
    both = [dict(rec, drill_id=first), dict(rec, drill_id=second)]
    refusal = reaper.judge(runtime.prefix_of(first), both, NOW)[1]
    assert refusal["reason"] == "ambiguous" and first in refusal["detail"] and second in refusal["detail"]
    assert reaper.judge(runtime.prefix_of(first), both, NOW, drill_id=second) == (both[1], None)


def test_bad_as_of_and_drill_id_fail_with_one_sentence(tmp_path):
    with pytest.raises(reaper.RuntimeReapError, match=r"as_of: timestamp '2026-11-30 21:00' has no time zone"):
        reaper.reap(str(tmp_path), as_of="2026-11-30 21:00")
    with pytest.raises(reaper.RuntimeReapError, match=r"drill_id: drill_id 'Bad_Id' is not valid"):
        reaper.reap(str(tmp_path), drill_id="Bad_Id")


# ---------------------------------------------------------------- real runtimes (root)


@root_only
def test_expired_drill_runtime_is_removed_and_proven_gone_others_refused(tmp_path, drills):
    expired, expired_out = build(drills, tmp_path, stamp(NOW - timedelta(minutes=5)))
    active, _ = build(drills, tmp_path, stamp(NOW + timedelta(hours=1)))
    orphan = new_id()  # a runtime of a drill whose directory is not under this runs directory
    drills.append(orphan)
    runtime.up(parse_boundary(RAW), orphan, str(tmp_path / "elsewhere" / orphan), PYTHON)
    pids = runtime.read_state_file(expired_out)["processes"]
    assert alive(expired) and alive(active) and alive(orphan)

    result = reaper.reap(str(tmp_path))
    p_expired, p_active, p_orphan = (runtime.prefix_of(d) for d in (expired, active, orphan))
    assert result["changed"] is True
    assert [e["prefix"] for e in result["removed"]] == [p_expired]
    assert result["removed"][0]["drill_id"] == expired and result["removed"][0]["output_dir"] == expired_out
    refused = by_prefix(result["refused"])
    assert refused[p_active]["reason"] == "not_expired" and refused[p_active]["drill_id"] == active
    assert refused[p_orphan]["reason"] == "no_proof"
    # Everything the host holds under another prefix is someone else's: refused, never removed.
    assert {e["prefix"] for e in result["removed"] + result["errors"]} == {p_expired}
    assert result["errors"] == []

    left = runtime.leftovers(p_expired, [p["pid"] for p in pids.values()])
    assert not any(left.values()), left
    assert runtime.read_state_file(expired_out)["state"] == "absent"
    assert alive(active) and alive(orphan), "a runtime without proof was touched"


@root_only
def test_check_mode_lists_and_removes_nothing_then_a_targeted_drill_goes_whatever_its_expiry(tmp_path, drills):
    expired, _ = build(drills, tmp_path, stamp(NOW - timedelta(minutes=5)))
    active, _ = build(drills, tmp_path, stamp(NOW + timedelta(hours=1)))

    dry = reaper.reap(str(tmp_path), check_mode=True)
    assert dry["changed"] is False and dry["removed"] == []
    assert runtime.prefix_of(expired) in by_prefix(dry["found"])
    assert runtime.prefix_of(active) not in by_prefix(dry["found"])
    assert by_prefix(dry["refused"])[runtime.prefix_of(active)]["reason"] == "not_expired"
    assert by_prefix(dry["found"])[runtime.prefix_of(expired)]["namespaces"] == sorted(alive(expired))
    assert alive(expired), "check mode removed a runtime"

    # A later as_of makes the active drill expired too.
    later = reaper.reap(str(tmp_path), as_of=stamp(NOW + timedelta(hours=2)), check_mode=True)
    assert {runtime.prefix_of(expired), runtime.prefix_of(active)} <= set(by_prefix(later["found"]))

    targeted = reaper.reap(str(tmp_path), drill_id=active)
    assert [e["drill_id"] for e in targeted["removed"]] == [active]
    assert targeted["refused"] == [], "the targeted reaper looks at no other prefix"
    assert alive(active) == [] and alive(expired), "only the targeted drill's runtime went"

    again = reaper.reap(str(tmp_path), drill_id=active)
    assert again["changed"] is False and again["found"] == [] and again["removed"] == []


@root_only
def test_drill_ids_reaps_several_targeted_drills_whatever_their_expiry_and_no_other(tmp_path, drills):
    """The reaper after a run of many drill hosts: their runtimes go in one call; a bare namespace of another
    prefix (half-built, bare ``ip netns add``, no proof) is not even looked at."""
    one, _ = build(drills, tmp_path, stamp(NOW + timedelta(hours=1)))
    two, _ = build(drills, tmp_path, stamp(NOW + timedelta(hours=1)))
    other = new_id()
    drills.append(other)
    write_drill_state(tmp_path, other, stamp(NOW - timedelta(minutes=1)))
    subprocess.run(["ip", "netns", "add", runtime.prefix_of(other) + "app"], check=True)
    result = reaper.reap(str(tmp_path), drill_ids=[one, two])
    assert sorted(e["drill_id"] for e in result["removed"]) == sorted([one, two])
    assert result["refused"] == []
    assert alive(one) == alive(two) == [] and alive(other)
    with pytest.raises(reaper.RuntimeReapError, match="drill_ids is empty"):
        reaper.reap(str(tmp_path), drill_ids=[])


@root_only
def test_a_half_built_runtime_of_a_killed_drill_is_reaped(tmp_path, drills):
    """A bare namespace of the prefix (a build killed half-way, no runtime state.json) still goes on the
    drill directory's proof."""
    drill_id = new_id()
    drills.append(drill_id)
    write_drill_state(tmp_path, drill_id, stamp(NOW - timedelta(minutes=1)))
    ns = runtime.prefix_of(drill_id) + "app"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    result = reaper.reap(str(tmp_path))
    assert [(e["prefix"], e["namespaces"]) for e in result["removed"]] == [(runtime.prefix_of(drill_id), [ns])]
    assert alive(drill_id) == []


@root_only
def test_module_reaps_reports_and_fails_when_a_removal_fails(tmp_path, drills):
    drill_id, out = build(drills, tmp_path, stamp(NOW - timedelta(minutes=5)))
    dry = run_module("runtime_reap", {"output_root": str(tmp_path)}, check_mode=True)
    assert not dry.failed, dry.get("msg")
    assert dry["changed"] is False and dry["counts"]["found"] >= 1 and alive(drill_id)

    # The runtime's own state names another drill's prefix: the removal is refused by down() and reported.
    state_path = os.path.join(out, "runtime", "state.json")
    with open(state_path, encoding="utf-8") as handle:
        state = json.load(handle)
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(dict(state, prefix="drg-000000-"), handle)
    bad = run_module("runtime_reap", {"output_root": str(tmp_path)})
    assert bad.failed
    assert bad["msg"].startswith("1 drill runtime(s) could not be removed (first: %s of drill %s: the runtime "
                                 "state under %s belongs to drg-000000-" % (runtime.prefix_of(drill_id), drill_id,
                                                                           out)), bad["msg"]
    assert [e["drill_id"] for e in bad["errors"]] == [drill_id] and alive(drill_id)

    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    ok = run_module("runtime_reap", {"output_root": str(tmp_path)})
    assert not ok.failed, ok.get("msg")
    assert ok["changed"] is True and [e["drill_id"] for e in ok["removed"]] == [drill_id]
    assert alive(drill_id) == []

    relative = run_module("runtime_reap", {"output_root": "drill-runs"})
    assert relative.failed and "must be an absolute path" in relative["msg"]
