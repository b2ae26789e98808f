# Copyright: drguard maintainers
# Apache License 2.0
"""A drill's whole teardown in one process: the backend of ``drguard.sandbox.drill_teardown``.

The steps, in this order, each running whatever happened to the one before (its failure is
recorded, never raised)::

    revoke        deny every session of the drill role issued so far (``_minter``)
    runtime       remove the sandbox runtime - processes, namespaces, rules - and prove it gone (``_runtime``),
                  then destroy the drill's PKI (CA keys) and delivered identities (``_mtls_drill``)
    secrets       remove the drill's secrets from its store (``_secrets``)
    local_data    remove the local files and directories the drill wrote
    backup_mount  withdraw the read-only mount of a local backup set (``_backup_access``)
    sweep         delete every resource of the drill that proves it is the drill's, and look again (``_sweep``)

Revocation comes first so that nothing can use the drill's identity while the rest goes. One
process instead of one Ansible task per step: each module task costs ~0.5 s of start-up alone.
"""

from __future__ import annotations

import os
import shutil
import stat
import time

from ansible_collections.amazon.aws.plugins.module_utils.exceptions import AnsibleAWSError

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _sweep
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import POLICY_NAME
from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import backup_access
from ansible_collections.drguard.sandbox.plugins.module_utils._minter import Minter
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import Secrets
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

STEPS = ("revoke", "runtime", "secrets", "local_data", "backup_mount", "sweep")

# What each step is called in the failure message.
_LABELS = {
    "revoke": "revoking its credentials failed",
    "runtime": "removing its sandbox runtime failed",
    "secrets": "removing its secrets failed",
    "local_data": "removing its local data failed",
    "backup_mount": "withdrawing the backup access failed",
    "sweep": "the sweep failed",
}


class TeardownError(ValueError):
    """The teardown's options are invalid; nothing was done."""


def _message(exc: BaseException) -> str:
    if isinstance(exc, AnsibleAWSError):
        cause = getattr(exc, "exception", None)
        return "%s: %s" % (exc.message, describe_error(cause)) if cause is not None else str(exc.message)
    return describe_error(exc)


def remove_paths(paths: list, check_mode: bool = False) -> list:
    """Remove each path (file, symlink - never followed - or directory tree); return what was removed."""
    removed, problems = [], []
    for path in paths:
        if not os.path.isabs(path):
            problems.append("%s is not an absolute path" % path)
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append("%s: %s" % (path, exc.strerror or exc))
            continue
        if not check_mode:
            try:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                problems.append("%s: %s" % (exc.filename or path, exc.strerror or exc))
                continue
        removed.append(path)
    if problems:
        raise OSError("could not remove " + "; ".join(problems))
    return removed


class Teardown:
    """Run the steps for ``params`` (``drill_teardown``'s options).

    ``client(service, **kwargs)`` returns a retrying AWS client; ``run_command`` is the module's.
    """

    def __init__(self, params: dict, *, client, run_command, region=None, check_mode=False,  # noqa: PLR0913
                 hide=None, warn=None):
        self.p = params
        self.client = client
        self.run_command = run_command
        self.region = region
        self.check_mode = check_mode
        self.hide = hide
        self.warn = warn

    def check(self) -> None:
        try:
            validate_drill_id(self.p["drill_id"])
        except DrillError as exc:
            raise TeardownError("%s." % exc) from None
        if self.p["timeout"] <= 0:
            raise TeardownError("timeout must be a positive number of seconds, got %d." % self.p["timeout"])
        if self.p["output_dir"] is not None and not os.path.isabs(self.p["output_dir"]):
            raise TeardownError("output_dir must be an absolute path, got %s." % self.p["output_dir"])
        bad = [p for p in self.p["remove_paths"] if not os.path.isabs(p)]
        if bad:
            raise TeardownError("remove_paths must be absolute paths; not absolute: %s." % ", ".join(bad))

    # ---------------------------------------------------------------- steps
    def revoke(self):
        if not self.p["revoke_credentials"]:
            return None
        minter = Minter(self.p["drill_id"], self.client, region=self.region, check_mode=self.check_mode,
                        diff=False, hide=self.hide)
        out = minter.revoked()
        return {"changed": out["changed"], "role_name": out["role_name"], "revoked_at": out.get("revoked_at")}

    def runtime(self):
        if self.p["runtime_backend"] == "ec2" and not self.check_mode and _mtls_drill.destroy(self.p["drill_id"]):
            # the mtls phase's PKI (its CA key), left only by a kill: the phase destroys it when it ends
            return {"changed": True, "pki_destroyed": _mtls_drill.root_dir(self.p["drill_id"])}
        if self.p["runtime_backend"] != "netns":
            return None  # none: nothing ran; ec2: the instances are tagged resources, the sweep deletes them
        if self.check_mode:
            return {"changed": bool(_runtime.leftovers(_runtime.prefix_of(self.p["drill_id"]))["namespaces"])}
        # The drill's PKI (CA keys included) and every tier's delivered identity: overwritten, removed, proven gone
        # (by _runtime.down, which made its CA for the collector, and again here).
        pki = _mtls_drill.root_dir(self.p["drill_id"])
        existed = os.path.lexists(pki)
        out = _runtime.down(self.p["drill_id"], self.p["output_dir"])
        destroyed = _mtls_drill.destroy(self.p["drill_id"]) or existed
        if os.path.lexists(pki):
            raise OSError("the drill's PKI directory %s is still there after teardown; remove it by hand" % pki)
        return {"changed": out["changed"] or destroyed, "prefix": out["prefix"], "removed": out["removed"],
                "pki_destroyed": pki if destroyed else None}

    def secrets(self):
        if not self.p["secret_store"]:
            return None
        params = {"drill_id": self.p["drill_id"], "state": "absent", "store": self.p["secret_store"],
                  "tmpfs_dir": self.p["tmpfs_dir"], "secrets": [], "expires_at": None, "masking_key": None,
                  "reader_role_arn": None}
        out = Secrets(params, self.client, region=self.region, check_mode=self.check_mode, hide=self.hide,
                      warn=self.warn).run()
        return {"changed": out["changed"], "store": out["store"],
                "secrets": [s["name"] for s in out.get("secrets", [])], "skipped": out.get("skipped", [])}

    def local_data(self):
        if not self.p["remove_paths"]:
            return None
        removed = remove_paths(self.p["remove_paths"], self.check_mode)
        return {"changed": bool(removed), "removed": removed}

    def backup_mount(self):
        source = self.p["backup_source"]
        if not source or source.startswith("s3://"):
            # On S3 the read-only policy lives on the drill role: revoked above, deleted by the sweep.
            return None
        params = {"state": "absent", "source": source, "path": self.p["backup_path"], "role_name": None,
                  "policy_name": POLICY_NAME}
        out = backup_access(params, iam=lambda: self.client("iam"), run_command=self.run_command,
                            check_mode=self.check_mode)
        return {"changed": out["changed"]}

    def sweep(self):
        result, failure = _sweep.run(self.client, drill_id=self.p["drill_id"], timeout=self.p["timeout"],
                                     check_mode=self.check_mode)
        if failure:
            raise _SweepFailed(failure, result)
        return result

    # ---------------------------------------------------------------- all
    def run(self) -> tuple:
        """Every step; returns ``(result, failure)`` - ``failure`` names every failed step, or is None."""
        self.check()
        started = time.monotonic()
        steps, failed, sweep = {}, [], None
        for name in STEPS:
            t0 = time.monotonic()
            try:
                out = getattr(self, name)()
            except _SweepFailed as exc:
                sweep = exc.result
                steps[name] = {"status": "failed", "error": exc.message}
                failed.append("%s: %s" % (_LABELS[name], exc.message))
            except Exception as exc:  # noqa: BLE001 - every step runs whatever the one before did; reported below
                steps[name] = {"status": "failed", "error": _message(exc)}
                failed.append("%s: %s" % (_LABELS[name], _message(exc)))
            else:
                if out is None:
                    steps[name] = {"status": "skipped"}
                else:
                    if name == "sweep":
                        sweep = out
                    steps[name] = dict(out, status="ok") if name != "sweep" else {"status": "ok"}
            steps[name]["seconds"] = round(time.monotonic() - t0, 3)
        counts = (sweep or {}).get("counts")
        result = {
            "changed": any(s.get("changed") for s in steps.values()) or bool(sweep and sweep.get("changed")),
            "steps": steps,
            "sweep": sweep or {},
            "deleted": counts["deleted"] if counts else 0,
            # Unknown (the sweep itself failed before counting) is not zero: the report fails closed on it.
            "remaining": counts["remaining"] if counts else None,
            "remaining_resources": (sweep or {}).get("remaining", []),
            "seconds": round(time.monotonic() - started, 3),
        }
        failure = None
        if failed:
            failure = "Teardown of drill %s is incomplete: %s" % (self.p["drill_id"], "; ".join(failed))
        return result, failure


class _SweepFailed(Exception):
    def __init__(self, message, result):
        super().__init__(message)
        self.message = message
        self.result = result
