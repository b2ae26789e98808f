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
    restore into something usable. Each artifact is recognised by its content (magic bytes,
    never its name). See C(docs/validation.md).
  - SQLite databases are opened read-only and must pass C(PRAGMA integrity_check) (exactly C(ok));
    the tables and their row counts are returned. When the manifest declares C(expect.tables)
    for the artifact, each table must exist with at least the declared number of rows.
  - Tar archives, plain or compressed with gzip, bzip2 or xz, are extracted member by member into
    a fresh private directory (0700) beside the archive inside the restore directory. Every member
    is checked before anything of it is written - no absolute name, no C(..), no symlink or hard
    link whose target leaves the extraction root, no device or fifo, no setuid, setgid or sticky
    bit - and the archive must stay within O(max_members), O(max_total_bytes) and O(max_ratio).
    Each refusal names the member and the rule; the extraction is then removed whole.
  - A gzip, bzip2 or xz stream that is not a tar is decompressed to its end within the same caps
    (its own checksum is verified); kind C(compressed).
  - Anything else is C(raw) and counts as valid once restored (its digest was verified).
  - The manifest's declared C(kind) (passed on by M(drguard.sandbox.restore_artifacts)) must agree
    with the content when it is C(tar) or C(sqlite); an artifact declared C(raw) is checked as what
    its content is, so a declaration never switches a check off.
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
  max_members:
    description: Most members one tar archive may hold.
    type: int
    default: 100000
  max_total_bytes:
    description:
      - Most bytes the members of one tar archive may unpack to, and most bytes a compressed stream may
        decompress to. Judged from each member's header before it is written.
    type: int
    default: 10737418240
  max_ratio:
    description:
      - Most times its own size an archive or compressed stream may unpack to (decompression bombs).
        Judged from each member's header and while reading, so a bomb stops early.
    type: int
    default: 200
  keep_extracted:
    description:
      - Leave a valid archive's extraction in place (returned as C(extracted_to)) instead of removing it.
      - Nothing is extracted in check mode; archives are read through without writing.
      - Not with O(namespace) (an extraction inside the sandbox vanishes with its workload).
    type: bool
    default: false
  namespace:
    description:
      - Run the validators inside this namespace of the drill's netns runtime (its validation tier,
        C(drg-<short>-validation)) instead of on the controller. Each restored file is copied read-only
        into a tmpfs of the workload's own mount namespace, extractions go to a size-capped scratch on
        the same tmpfs, and the workload runs unprivileged (a uid of its own, no capabilities, an empty
        environment). The results are the same as on the controller. See C(docs/runtime.md).
    type: str
author:
  - drguard maintainers (!UNKNOWN)
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
  description:
    - One entry per artifact with C(name), C(kind) (C(sqlite), C(tar), C(compressed), C(raw), or C(unknown)
      when it cannot be opened), C(valid), C(detail) and kind-specific figures - C(tables) for SQLite;
      C(members), C(bytes), C(compression) and C(read_bytes) (decompressed bytes read) for archives and
      streams; C(declared_kind) when the manifest declared one; C(extracted_to) with O(keep_extracted).
  returned: always
  type: list
  elements: dict
  sample: [{name: orders.sqlite, kind: sqlite, valid: true, detail: ok, tables: {orders: 500}},
           {name: files.tar.gz, kind: tar, compression: gzip, valid: true, detail: ok, members: 12, bytes: 40960,
            read_bytes: 51200}]
inside:
  description: The namespace the validators ran in.
  returned: with O(namespace)
  type: str
  sample: drg-1a2b3c-validation
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import Caps
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_MEMBERS
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_RATIO
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_TOTAL_BYTES
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import validate
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate_inside

ARGUMENT_SPEC = dict(
    restored=dict(type="list", elements="dict", required=True),
    min_rows=dict(type="int", default=1),
    max_members=dict(type="int", default=DEFAULT_MAX_MEMBERS),
    max_total_bytes=dict(type="int", default=DEFAULT_MAX_TOTAL_BYTES),
    max_ratio=dict(type="int", default=DEFAULT_MAX_RATIO),
    keep_extracted=dict(type="bool", default=False),
    namespace=dict(type="str"),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    caps = Caps(max_members=p["max_members"], max_total_bytes=p["max_total_bytes"], max_ratio=p["max_ratio"])
    inside = p["namespace"]
    try:
        if inside and p["keep_extracted"]:
            raise RestoreError("keep_extracted cannot be used with namespace: an extraction inside the sandbox "
                               "vanishes with its workload; drop one of them")
        if inside:
            outcome = validate_inside(inside, p["restored"], p["min_rows"], caps, python=python_executable(),
                                      extract=not module.check_mode)
        else:
            outcome = validate(p["restored"], p["min_rows"], caps, extract=not module.check_mode,
                               keep=p["keep_extracted"])
    except RestoreError as exc:
        module.fail_json(msg=str(exc))
    where = {"inside": inside} if inside else {}
    if not outcome.valid:
        module.fail_json(msg=outcome.message, valid=False, results=outcome.results, **where)
    kept = any(r.get("extracted_to") for r in outcome.results)
    module.exit_json(changed=kept, valid=True, results=outcome.results, **where)


if __name__ == "__main__":
    main()
