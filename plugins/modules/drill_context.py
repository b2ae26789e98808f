#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_context
short_description: Start a drill - validate its inputs, fix its id, expiry and output directory
version_added: 0.1.0
description:
  - First step of every drill. Validates the boundary policy and the drill id before
    anything is created, picks a unique drill id when none is given, computes the
    C(drguard:expires-at) tag value, and creates the drill's private output directory
    with its state file (C(state.json)), where later phases record resources that
    cannot carry tags.
  - Makes no AWS call.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill's id. When empty, a fresh one like C(dr-20261129044000-a1b2c3) is generated.
      - 4-40 lowercase letters, digits and hyphens.
    type: str
  ttl_minutes:
    description:
      - Minutes after which the drill's resources count as expired for the reaper.
    type: int
    default: 120
  output_root:
    description:
      - Directory under which the drill's output directory (named after the drill id) is created.
      - Both, and any missing parent of O(output_root), are created with mode 0700 whatever the umask. An existing
        one must be a real directory (a symlink is refused, never followed) owned by the user running the drill;
        group and other permission bits on it are removed.
    type: path
    required: true
  boundary:
    description:
      - The drill's boundary policy (C(drill_boundary)); validated here so that bad input fails before anything exists.
    type: dict
    required: true
  region:
    description:
      - The AWS region the drill runs in; recorded in the state file.
    type: str
    required: true
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
"""

EXAMPLES = r"""
- name: Start the drill
  drguard.sandbox.drill_context:
    output_root: "{{ playbook_dir }}/../drill-runs"
    boundary: "{{ drill_boundary }}"
    region: "{{ drill_region }}"
  register: drill_ctx
"""

RETURN = r"""
drill_id:
  description: The drill's id.
  returned: always
  type: str
  sample: dr-20261129044000-a1b2c3
expires_at:
  description: Value of the C(drguard:expires-at) tag for every resource of this drill.
  returned: always
  type: str
  sample: "2026-11-29T06:40:00Z"
started_at:
  description: RFC 3339 UTC start of the drill.
  returned: always
  type: str
started_epoch:
  description: Start of the drill in seconds since the epoch (for phase timing).
  returned: always
  type: float
output_dir:
  description: The drill's private output directory (reports, alerts, state).
  returned: always
  type: str
state_file:
  description: Path of the drill's state file.
  returned: always
  type: str
boundary:
  description: The validated, normalized boundary policy.
  returned: always
  type: dict
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_json
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import expires_at
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import new_drill_id
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str"),
    ttl_minutes=dict(type="int", default=120),
    output_root=dict(type="path", required=True),
    boundary=dict(type="dict", required=True),
    region=dict(type="str", required=True),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        boundary = parse_boundary(p["boundary"])
        drill_id = validate_drill_id(p["drill_id"]) if p["drill_id"] else new_drill_id()
        if not 5 <= p["ttl_minutes"] <= 7 * 24 * 60:
            raise DrillError("ttl_minutes must be between 5 and 10080 (one week), got %d" % p["ttl_minutes"])
        now = utcnow()
        expiry = expires_at(p["ttl_minutes"] * 60, now)
    except (BoundaryError, DrillError) as exc:
        module.fail_json(msg=str(exc))
    if not p["region"].strip():
        module.fail_json(msg="region is empty; set drill_region (for example us-east-1)")

    output_dir = os.path.join(p["output_root"], drill_id)
    state_file = os.path.join(output_dir, "state.json")
    state = {
        "drill_id": drill_id,
        "region": p["region"],
        "started_at": format_time(now),
        "expires_at": expiry,
    }
    changed = False
    try:
        if module.check_mode:
            check_private_dir(p["output_root"])
            check_private_dir(output_dir)
        else:
            ensure_private_dir(p["output_root"], parents=True)
            ensure_private_dir(output_dir)
            if not os.path.lexists(state_file):
                atomic_write_json(state_file, state)
                changed = True
    except OSError as exc:
        module.fail_json(msg="Cannot use the drill's output directory: %s" % exc)
    module.exit_json(
        changed=changed,
        drill_id=drill_id,
        expires_at=expiry,
        started_at=state["started_at"],
        started_epoch=time.time(),
        output_dir=output_dir,
        state_file=state_file,
        boundary=boundary.to_dict(),
    )


if __name__ == "__main__":
    main()
