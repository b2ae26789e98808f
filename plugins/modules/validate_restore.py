#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: validate_restore
short_description: Prove that restored backup artifacts are usable, not just intact
version_added: 0.1.0
description:
  - A digest proves the bytes are the ones that were signed; this module proves they
    restore into something usable. Each artifact is recognised by its content.
  - SQLite databases are opened read-only and must pass C(PRAGMA integrity_check); the
    tables and their row counts are returned.
  - Tar archives are read member by member; an absolute path, a C(..) component, a link
    or device entry is a failure (it could write outside the restore directory).
  - Anything else is C(raw) and counts as valid once restored (its digest was verified).
  - Each path is opened without following a symlink (a symlink or anything but a regular file fails), and SQLite
    gets a percent-encoded C(file:) URI, so an artifact name such as C(%2E%2E/x.db) opens exactly that file.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  restored:
    description: The C(restored) list returned by M(drguard.sandbox.restore_artifacts) (C(name), C(path)).
    type: list
    elements: dict
    required: true
  min_rows:
    description: Minimum total number of rows a restored SQLite database must hold.
    type: int
    default: 1
author:
  - drguard maintainers
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
"""

EXAMPLES = r"""
- name: Validate the restored backup set
  drguard.sandbox.validate_restore:
    restored: "{{ restore.restored }}"
"""

RETURN = r"""
valid:
  description: Whether every artifact validated.
  returned: always
  type: bool
results:
  description: One entry per artifact with C(name), C(kind), C(valid), C(detail) and kind-specific figures.
  returned: always
  type: list
  elements: dict
  sample: [{name: orders.sqlite, kind: sqlite, valid: true, detail: ok, tables: {orders: 500}}]
"""

import errno
import os
import sqlite3
import stat
import tarfile
from urllib.parse import quote

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils._artifacts import detect_kind

ARGUMENT_SPEC = dict(
    restored=dict(type="list", elements="dict", required=True),
    min_rows=dict(type="int", default=1),
)


class ValidateError(Exception):
    pass


def kind_of(path: str) -> str:
    """The artifact's kind from its first bytes; a symlink or anything but a regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValidateError("%s is a symlink; validate only the files restore_artifacts wrote" % path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValidateError("%s is not a regular file" % path)
        return detect_kind(handle.read(512))


def sqlite_uri(path: str) -> str:
    """A read-only SQLite URI for exactly ``path``.

    SQLite decodes %XX escapes and stops at '?' or '#' in a URI, so the path is
    percent-encoded: an artifact named ``%2E%2E/x.db`` must not open ``../x.db``.
    ``immutable=1``: the restored file is 0400 in a private directory and nothing
    writes it, so SQLite takes no locks and creates no -wal/-shm file beside it.
    """
    return "file:%s?mode=ro&immutable=1" % quote(os.path.abspath(path), safe="/")


def check_sqlite(path: str, min_rows: int) -> dict:
    con = sqlite3.connect(sqlite_uri(path), uri=True)
    try:
        verdict = [row[0] for row in con.execute("PRAGMA integrity_check")]
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        # Table names come from the database itself and are quoted as identifiers.
        counts = {t: con.execute('SELECT count(*) FROM "%s"' % t.replace('"', '""')).fetchone()[0]  # noqa: S608
                  for t in tables}
    finally:
        con.close()
    ok = verdict == ["ok"]
    total = sum(counts.values())
    if ok and total < min_rows:
        return {"valid": False, "detail": "only %d row(s), fewer than min_rows %d" % (total, min_rows),
                "tables": counts}
    return {"valid": ok, "detail": "ok" if ok else "integrity_check: %s" % "; ".join(verdict[:5]),
            "tables": counts}


def check_tar(path: str) -> dict:
    members = size = 0
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            name = info.name
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                return {"valid": False, "detail": "unsafe member path %r" % name, "members": members}
            if not (info.isfile() or info.isdir()):
                return {"valid": False, "detail": "member %r is a link or device" % name, "members": members}
            members += 1
            size += info.size
    if members == 0:
        return {"valid": False, "detail": "empty archive", "members": 0}
    return {"valid": True, "detail": "ok", "members": members, "bytes": size}


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    results = []
    for entry in module.params["restored"]:
        name, path = entry.get("name"), entry.get("path")
        try:
            kind = kind_of(path)
            if kind == "sqlite":
                outcome = check_sqlite(path, module.params["min_rows"])
            elif kind == "tar":
                outcome = check_tar(path)
            else:
                outcome = {"valid": True, "detail": "raw artifact; digest verified"}
        except (OSError, ValidateError, sqlite3.Error, tarfile.TarError, TypeError) as exc:
            kind, outcome = "unknown", {"valid": False, "detail": "cannot open: %s" % exc}
        results.append(dict(name=name, kind=kind, **outcome))
    valid = bool(results) and all(r["valid"] for r in results)
    if not valid:
        bad = ["%s (%s)" % (r["name"], r["detail"]) for r in results if not r["valid"]] or ["nothing restored"]
        module.fail_json(msg="Restored backup does not validate: %s" % ", ".join(bad), valid=False, results=results)
    module.exit_json(changed=False, valid=True, results=results)


if __name__ == "__main__":
    main()
