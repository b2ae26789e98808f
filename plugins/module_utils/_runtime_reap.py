# Copyright: drguard maintainers
# Apache License 2.0
"""The reaper's part for sandbox runtimes: remove what expired or killed drills left on this host.

A runtime leftover is a network namespace named ``drg-<6 hex>-<name>`` (``ip netns list``) or a
rootless holder marked ``drg-<6 hex>-holder``. Names carry a hash of the drill id, not the id,
so a leftover is removed only on proof found under the drill runs directory: a drill directory
``<output_root>/<drill_id>/`` whose ``state.json`` (written by ``drill_context`` before anything
is created) records that drill id, whose prefix (:func:`_runtime.prefix_of`) is the leftover's,
and whose ``expires_at`` is at or before ``as_of`` (or whose id is the one drill targeted). The
runtime is then removed with :func:`_runtime.down` and proven gone. A prefix without such proof
is reported as refused, with the reason, and never touched (docs/teardown.md).

Every failure of the whole run raises :class:`RuntimeReapError`; a prefix that cannot be removed
is an entry of ``errors`` and the others are still reaped.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

NAMESPACE = re.compile(r"^(drg-[0-9a-f]{6}-)[a-z0-9-]+$")
DRILL_STATE = "state.json"  # <output_root>/<drill_id>/state.json, drill_context's
MAX_STATE_BYTES = 64 * 1024

# Why a prefix is left alone.
NO_PROOF = "no_proof"  # no drill directory under output_root records a drill with this prefix
NOT_EXPIRED = "not_expired"  # its drill has not expired by as_of (and is not the drill targeted)
AMBIGUOUS = "ambiguous"  # more than one drill directory records a drill with this prefix


class RuntimeReapError(Exception):
    """The runtime reaper cannot run at all; ``msg`` says what to change."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


def _netns_mod():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415
    return _netns


def live_prefixes():
    """``{prefix: {"namespaces": [...], "holders": [pid, ...]}}`` of every drill runtime on this host."""
    netns = _netns_mod()
    found = {}
    try:
        names = netns._namespaces()  # noqa: SLF001  (the manager's own reading of ip netns list)
        holders = netns.find_holders()
    except netns.NetnsError as exc:
        raise RuntimeReapError(f"the namespaces of this host cannot be listed ({exc.msg}); check the host and run "
                               "the reaper again.") from None
    for name in names:
        m = NAMESPACE.match(name)
        if m:
            found.setdefault(m.group(1), {"namespaces": [], "holders": []})["namespaces"].append(name)
    for holder in holders:
        prefix = holder.get("prefix")
        if isinstance(prefix, str) and NAMESPACE.match(prefix + "holder"):
            found.setdefault(prefix, {"namespaces": [], "holders": []})["holders"].append(holder["pid"])
    return found


def _read_drill_state(path):
    """The drill's ``state.json``: a regular file (no symlink followed), small, one JSON object."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("not a regular file")
        raw = handle.read(MAX_STATE_BYTES + 1)
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError("larger than a drill's state")
    state = json.loads(raw.decode("utf-8"))
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    return state


def _check_root(output_root):
    if not isinstance(output_root, str) or not os.path.isabs(output_root):
        raise RuntimeReapError(f"output_root {output_root!r} must be an absolute path; pass the drill runs directory.")


def drill_records(output_root):
    """``({prefix: [record, ...]}, skipped)`` for the drill directories under ``output_root``.

    A record is ``{"drill_id", "expires_at", "output_dir"}``: the directory is named after the
    drill id its ``state.json`` records, the id is valid and the expiry is RFC 3339. Directories
    that hold no such state are listed in ``skipped`` (``{"path", "reason"}``) and prove nothing.
    """
    _check_root(output_root)
    try:
        entries = sorted(os.listdir(output_root))
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        raise RuntimeReapError(f"the drill runs directory {output_root} cannot be read ({exc.strerror}); pass a "
                               "directory the reaper may read.") from None
    records, skipped = {}, []
    for entry in entries:
        out_dir = os.path.join(output_root, entry)
        if os.path.islink(out_dir) or not os.path.isdir(out_dir):
            continue
        path = os.path.join(out_dir, DRILL_STATE)
        try:
            state = _read_drill_state(path)
            drill_id = validate_drill_id(state.get("drill_id"))
            if drill_id != entry:
                raise ValueError(f"it records drill {drill_id}, not {entry}")
            expires = parse_time(state.get("expires_at"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, UnicodeDecodeError, DrillError) as exc:
            skipped.append({"path": path, "reason": str(exc) or type(exc).__name__})
            continue
        records.setdefault(_runtime.prefix_of(drill_id), []).append(
            {"drill_id": drill_id, "expires_at": format_time(expires), "output_dir": out_dir})
    return records, skipped


def judge(prefix, records, as_of, drill_id=None):
    """``(record, None)`` when ``prefix`` may be removed on the proof of ``record``, else ``(None, refusal)``."""
    if drill_id is not None:
        mine = [r for r in records if r["drill_id"] == drill_id]
        if mine:
            return mine[0], None
    if not records:
        return None, {"reason": NO_PROOF, "detail": "no drill directory under the runs directory records a drill "
                                                    "with this prefix; remove it by hand once you know whose it is"}
    if len(records) > 1:
        return None, {"reason": AMBIGUOUS,
                      "detail": "drills %s all have this prefix; reap one of them by its drill id"
                                % ", ".join(r["drill_id"] for r in records)}
    record = records[0]
    if parse_time(record["expires_at"]) > as_of:
        return None, {"reason": NOT_EXPIRED, "drill_id": record["drill_id"],
                      "detail": "drill %s expires at %s, after %s" % (record["drill_id"], record["expires_at"],
                                                                      format_time(as_of))}
    return record, None


def reap(output_root, *, as_of=None, drill_id=None, check_mode=False, drill_ids=None):
    """Remove the runtimes of expired (or the targeted) drills; see the module docstring.

    Returns ``{"changed", "as_of", "found", "removed", "refused", "errors", "skipped", "counts"}``.
    ``found`` lists every prefix proven removable (in check mode: what would be removed);
    ``removed`` what was removed and proven gone; ``refused`` what was left alone, with its
    ``reason`` (``no_proof``, ``not_expired``, ``ambiguous``); ``errors`` the prefixes whose
    removal failed (``error``: the sentence of :func:`_runtime.down`).
    """
    _check_root(output_root)
    try:
        when = utcnow() if as_of is None else parse_time(as_of)
    except DrillError as exc:
        raise RuntimeReapError(f"as_of: {exc}; use for example 2026-11-29T05:00:00Z.") from None
    targets = None  # prefix -> the drill id it is reaped for (drill_id / drill_ids), None: by expiry
    ids = [drill_id] if drill_id is not None else drill_ids
    if ids is not None:
        if not ids:
            raise RuntimeReapError("drill_ids is empty and selects nothing; give at least one drill id.")
        try:
            targets = {_runtime.prefix_of(validate_drill_id(i)): i for i in ids}
        except DrillError as exc:
            raise RuntimeReapError(f"drill_id: {exc}.") from None
    live = live_prefixes()
    if targets is not None:
        live = {p: v for p, v in live.items() if p in targets}
    records, skipped = drill_records(output_root) if live else ({}, [])
    found, removed, refused, errors = [], [], [], []
    for prefix in sorted(live):
        entry = {"prefix": prefix, "namespaces": sorted(live[prefix]["namespaces"]),
                 "holders": sorted(live[prefix]["holders"])}
        record, refusal = judge(prefix, records.get(prefix, []), when, None if targets is None else targets[prefix])
        if refusal is not None:
            refused.append(dict(entry, **refusal))
            continue
        entry.update(drill_id=record["drill_id"], expires_at=record["expires_at"], output_dir=record["output_dir"])
        found.append(entry)
        if check_mode:
            continue
        try:
            result = _runtime.down(record["drill_id"], record["output_dir"])
            _mtls_drill.destroy(record["drill_id"])  # its PKI (CA keys) and delivered identities (docs/mtls.md)
        except (_runtime.SandboxRuntimeError, _pki.PkiError) as exc:
            errors.append(dict(entry, error=exc.msg))
            continue
        removed.append(dict(entry, removed=result.get("removed")))
    return {
        "changed": bool(removed),
        "as_of": format_time(when),
        "found": found,
        "removed": removed,
        "refused": refused,
        "errors": errors,
        "skipped": skipped,
        "counts": {"found": len(found), "removed": len(removed), "refused": len(refused), "errors": len(errors)},
    }
