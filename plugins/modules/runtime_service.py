#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_service
short_description: Serve the restored database from the db tier of the drill's netns runtime
version_added: 0.1.0
description:
  - Starts the db tier's service inside the drill's netns runtime (M(drguard.sandbox.sandbox_runtime) must
    have built it with the same O(output_dir)), so the user's validation command reaches the restored database
    through the declared tier rule, not through a file on the controller. See C(docs/runtime.md).
  - The db tier is the destination of the first C(tcp) rule of C(drill_boundary.tier_rules) (towards O(tier)
    when given); the service listens on that tier's address and the rule's first port (or O(port)). The
    rule's source tier is returned as RV(client_tier), the tier the user's command runs in.
  - The service opens a read-only copy of O(database) (on a tmpfs of its own mount namespace) with
    C(mode=ro&immutable=1) and answers one SQL C(SELECT) per line with JSON rows; anything else (a write,
    a PRAGMA, ATTACH, a second statement) is refused. It runs unprivileged under a uid of its own, with no
    capabilities and an empty environment.
  - The runtime's plain listener already holds that port; the service replaces it (the tier's listener
    process is restarted without that one port). The runtime's C(state.json) records both new processes,
    so teardown and the reaper remove them with the runtime.
  - Idempotent; in check mode nothing is started and C(changed) says whether a run would start it.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description: The drill's id.
    type: str
    required: true
  boundary:
    description: C(drill_boundary), the same the runtime was built from.
    type: dict
    required: true
  output_dir:
    description: The run's output directory, the one the runtime was built with (absolute).
    type: path
    required: true
  database:
    description: The restored SQLite database to serve (a regular file; it is copied, never written).
    type: path
    required: true
  tier:
    description: The db tier; default the destination of the first C(tcp) tier rule.
    type: str
  port:
    description: The port to serve on; it must be declared by that tier rule. Default the rule's first port.
    type: int
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
"""

EXAMPLES = r"""
- name: Serve the restored orders database from the db tier
  drguard.sandbox.runtime_service:
    drill_id: "{{ drill_ctx.drill_id }}"
    boundary: "{{ drill_boundary }}"
    output_dir: "{{ drill_ctx.output_dir }}"
    database: "{{ drill_ctx.output_dir }}/restore/orders.sqlite"
  register: db_service
"""

RETURN = r"""
tier:
  description: The tier serving the database.
  returned: success
  type: str
  sample: db
client_tier:
  description: The tier the declared tier rule lets reach it (where the user's command runs).
  returned: success
  type: str
  sample: app
address:
  description: The service's address (the db tier's).
  returned: success
  type: str
port:
  description: The service's port.
  returned: success
  type: int
address_port:
  description: C(address:port), what C(DRGUARD_DB_ADDRESS) is set to for the user's command.
  returned: success
  type: str
  sample: 10.213.0.18:5432
pid:
  description: The service's process id (none in check mode when it is not running).
  returned: success
  type: int
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _workloads
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    output_dir=dict(type="path", required=True),
    database=dict(type="path", required=True),
    tier=dict(type="str"),
    port=dict(type="int"),
)


def planned(params, boundary):
    """Check mode: where the service would listen and whether it runs already."""
    plan = _runtime.full_plan(boundary, params["drill_id"])
    target = _workloads.db_target(boundary, plan, params["tier"], params["port"])
    state = _runtime.read_state_file(params["output_dir"]) or {}
    old = (state.get("processes") or {}).get(_workloads.SERVICE_KEY) or {}
    from ansible_collections.drguard.sandbox.plugins.module_utils import _netns  # noqa: PLC0415
    alive = _runtime._alive(_netns, target["ns"], old.get("pid"))  # noqa: SLF001
    result = {k: v for k, v in target.items() if k != "ns"}
    return dict(result, address_port="%s:%d" % (target["address"], target["port"]), changed=not alive,
                pid=old.get("pid") if alive else None)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        validate_drill_id(p["drill_id"])
        if not os.path.isabs(p["output_dir"]):
            raise ValueError("output_dir must be an absolute path; pass the run's output directory")
        boundary = parse_boundary(p["boundary"])
        if module.check_mode:
            result = planned(p, boundary)
        else:
            result = _workloads.start_db_service(boundary, p["drill_id"], p["output_dir"], p["database"],
                                                 python=python_executable(), tier=p["tier"], port=p["port"])
    except (_workloads.RestoreError, _runtime.SandboxRuntimeError) as exc:
        module.fail_json(msg=str(exc))
    except (BoundaryError, DrillError, ValueError) as exc:
        module.fail_json(msg="runtime_service: %s." % str(exc).rstrip("."))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
