"""drguard.sandbox.drill_teardown: every teardown step in one module run, each whatever happened before."""

from __future__ import annotations

import os
import secrets
import shutil

import pytest

EXPIRES = "2099-01-01T00:00:00Z"


def _id() -> str:
    return "td-%s" % secrets.token_hex(5)


@pytest.fixture
def drill(module_runner, tmp_path):
    """A drill with a minted role, tmpfs secrets and local data on disk."""
    drill_id = _id()
    minted = module_runner("mint_credentials", {"drill_id": drill_id, "expires_at": EXPIRES,
                                               "resources": {"secrets_prefix": "drguard/%s/" % drill_id}})
    assert not minted.failed, minted.get("msg")
    tmpfs_dir = "/dev/shm/drguard-test-%s" % drill_id
    made = module_runner("drill_secrets", {"drill_id": drill_id, "expires_at": EXPIRES, "store": "tmpfs",
                                           "tmpfs_dir": tmpfs_dir,
                                           "secrets": [{"name": "orders-db", "kind": "synthetic_db"}]})
    assert not made.failed, made.get("msg")
    restore = tmp_path / "restore"
    (restore / "nested").mkdir(parents=True)
    (restore / "nested" / "orders.db").write_bytes(b"rows")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (restore / "link").symlink_to(outside)
    yield {"id": drill_id, "role": minted["role_name"], "tmpfs_dir": tmpfs_dir, "restore": str(restore),
           "outside": outside}
    shutil.rmtree(tmpfs_dir, ignore_errors=True)
    module_runner("sweep", {"drill_id": drill_id, "fail_on_remaining": False})


def _roles(aws):
    return {r["RoleName"] for r in aws("iam").list_roles(PathPrefix="/drguard/")["Roles"]}


def test_every_step_runs_and_nothing_remains(module_runner, aws, drill):
    out = module_runner("drill_teardown", {"drill_id": drill["id"], "secret_store": "tmpfs",
                                           "tmpfs_dir": drill["tmpfs_dir"], "remove_paths": [drill["restore"]]})
    assert not out.failed, out.get("msg")
    steps = out["steps"]
    assert list(steps) == ["revoke", "runtime", "secrets", "local_data", "backup_mount", "sweep"]
    assert {k: s["status"] for k, s in steps.items()} == {
        "revoke": "ok", "runtime": "skipped", "secrets": "ok", "local_data": "ok", "backup_mount": "skipped",
        "sweep": "ok"}
    assert steps["revoke"]["changed"] is True and steps["revoke"]["revoked_at"]
    assert steps["secrets"]["secrets"] == ["orders-db"]
    assert steps["local_data"]["removed"] == [drill["restore"]]
    assert out["remaining"] == 0 and out["remaining_resources"] == []
    assert any(r["type"] == "iam_role" and r["id"] == drill["role"] for r in out["sweep"]["deleted"])
    assert drill["role"] not in _roles(aws)
    assert not os.path.exists(drill["tmpfs_dir"]) and not os.path.exists(drill["restore"])
    # The symlink inside the restored data went, never what it pointed at.
    assert drill["outside"].read_text() == "keep me"

    again = module_runner("drill_teardown", {"drill_id": drill["id"], "remove_paths": [drill["restore"]]})
    assert not again.failed and again["changed"] is False and again["remaining"] == 0


def test_a_failed_step_does_not_stop_the_others(module_runner, aws, drill):
    # /proc/self/status cannot be removed: the local-data step fails (after removing what it can);
    # secrets, revocation and the sweep still run, and the failure names the step.
    out = module_runner("drill_teardown", {"drill_id": drill["id"], "secret_store": "tmpfs",
                                           "tmpfs_dir": drill["tmpfs_dir"],
                                           "remove_paths": [drill["restore"], "/proc/self/status"]})
    assert out.failed
    assert out["msg"].startswith("Teardown of drill %s is incomplete: removing its local data failed: could not "
                                 "remove /proc/self/status" % drill["id"])
    assert out["steps"]["local_data"]["status"] == "failed"
    assert [out["steps"][s]["status"] for s in ("revoke", "secrets", "sweep")] == ["ok", "ok", "ok"]
    assert out["remaining"] == 0 and drill["role"] not in _roles(aws)
    assert not os.path.exists(drill["restore"]) and not os.path.exists(drill["tmpfs_dir"])


@pytest.mark.parametrize(("args", "message"), [
    ({"drill_id": "Not A Drill"}, "drill_id 'not a drill' is not valid"),
    ({"drill_id": "td-0123456789", "remove_paths": ["relative/restore"]}, "remove_paths must be absolute"),
    ({"drill_id": "td-0123456789", "timeout": 0}, "timeout must be a positive number"),
])
def test_bad_input_fails_before_anything_is_done(module_runner, aws, drill, args, message):
    out = module_runner("drill_teardown", dict(args, remove_paths=args.get("remove_paths", [drill["restore"]])))
    assert out.failed and message in out["msg"].lower()
    assert "steps" not in out
    assert os.path.exists(drill["restore"]) and drill["role"] in _roles(aws)


def test_check_mode_removes_nothing(module_runner, aws, drill):
    out = module_runner("drill_teardown", {"drill_id": drill["id"], "secret_store": "tmpfs",
                                           "tmpfs_dir": drill["tmpfs_dir"], "remove_paths": [drill["restore"]]},
                        check_mode=True)
    assert not out.failed, out.get("msg")
    assert out["changed"] is True
    assert os.path.exists(drill["restore"]) and os.path.exists(drill["tmpfs_dir"])
    assert drill["role"] in _roles(aws)
    assert any(r["type"] == "iam_role" and r["id"] == drill["role"] for r in out["sweep"]["found"])


RUNTIME_BOUNDARY = {"sandbox_cidr": "10.231.0.0/16", "production_cidrs": ["10.0.0.0/16"],
                    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
                    "tiers": ["app"]}


@pytest.mark.skipif(os.geteuid() != 0, reason="the netns runtime needs root here")
def test_the_runtime_step_removes_the_sandbox_runtime_and_proves_it_gone(module_runner, aws, drill, tmp_path):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
    from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
    from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

    out_dir = str(tmp_path / "out")
    prefix = _runtime.prefix_of(drill["id"])
    try:
        built = _runtime.up(parse_boundary(RUNTIME_BOUNDARY), drill["id"], out_dir, python_executable())
        assert built["prefix"] == prefix and _runtime.leftovers(prefix)["namespaces"]
        out = module_runner("drill_teardown", {"drill_id": drill["id"], "runtime_backend": "netns",
                                               "output_dir": out_dir})
        assert not out.failed, out.get("msg")
        assert out["steps"]["runtime"]["status"] == "ok" and out["steps"]["runtime"]["prefix"] == prefix
        assert _runtime.leftovers(prefix, built["processes"]) == {"namespaces": [], "tables": [], "mounts": [],
                                                                   "processes": [], "holders": []}
        assert _runtime.read_state_file(out_dir)["state"] == "absent"
        # Nothing left to remove the second time; the step still proves it.
        again = module_runner("drill_teardown", {"drill_id": drill["id"], "runtime_backend": "netns",
                                                 "output_dir": out_dir})
        assert not again.failed and again["steps"]["runtime"]["changed"] is False
    finally:
        _runtime.down(drill["id"])
