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

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils._restore import validate

ARGUMENT_SPEC = dict(
    restored=dict(type="list", elements="dict", required=True),
    min_rows=dict(type="int", default=1),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    outcome = validate(module.params["restored"], module.params["min_rows"])
    if not outcome.valid:
        module.fail_json(msg=outcome.message, valid=False, results=outcome.results)
    module.exit_json(changed=False, valid=True, results=outcome.results)


if __name__ == "__main__":
    main()
