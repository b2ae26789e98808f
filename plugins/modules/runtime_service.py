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
  - It speaks TLS 1.3 only, client certificates required, C(TCP_NODELAY); a client is authorised by its
    SPIFFE identity (exactly one URI SAN in the drill's trust domain, a tier C(tier_rules) lets reach the db
    tier on that port), exactly as the mTLS servers of M(drguard.sandbox.runtime_mtls). Its leaf comes from
    the drill's PKI (issued here when missing, renewed from half-life on) as 0400 files of its workload,
    never on argv or in its environment. Every handshake, accepted or refused, is a C(drguard.tls.handshake)
    event in C(<output_dir>/runtime/db-service-events.jsonl); O(telemetry) sends them to the collector.
  - O(state=renewed) renews the leaves past half-life and hands the db tier's new leaf to the live service,
    which loads it for new handshakes (open connections keep theirs); with O(renew_for) it keeps doing so at
    every half-life for that many seconds or until the service is gone (run it with C(async) and C(poll=0)).
    See C(docs/mtls.md).
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
  state:
    description:
      - V(present) starts the service (or keeps a live one, renewing its leaf when past half-life).
      - V(renewed) renews a live service's leaf when past half-life (with O(renew_for), at every half-life).
    type: str
    choices: [present, renewed]
    default: present
  ttl_minutes:
    description: The drill's TTL; the CA's validity when the drill has no CA yet.
    type: int
    default: 60
  leaf_lifetime:
    description: Seconds a tier's leaf is valid (at least 20); renewed from half-life on.
    type: int
    default: 900
  renew_for:
    description: With O(state=renewed), keep renewing at every half-life for this many seconds (the background renewer).
    type: int
    default: 0
  telemetry:
    description: The drill's collector; the service's handshake and reload events not sent yet go there.
    type: dict
    suboptions:
      address:
        description: The collector's address.
        type: str
        required: true
      port:
        description: The collector's port.
        type: int
        required: true
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
tls:
  description:
    - The client tier's delivered identity (its leaf and key in one file) and the drill's trust bundle, as paths
      on the controller (never their content), with the client's and the server's SPIFFE ids.
  returned: success with state present
  type: dict
renewal:
  description: The last renewal - renewed, serial, previous, actions (and renewals, stopped with renew_for).
  returned: when a live service was renewed or checked
  type: dict
telemetry:
  description: What the collector acknowledged of the service's events (sent, acknowledged) or the delivery error.
  returned: when telemetry is given
  type: dict
handshakes:
  description: Every handshake the service saw (the data of its drguard.tls.handshake events).
  returned: success
  type: list
  elements: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
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
    state=dict(type="str", choices=["present", "renewed"], default="present"),
    ttl_minutes=dict(type="int", default=60),
    leaf_lifetime=dict(type="int", default=900),
    renew_for=dict(type="int", default=0),
    telemetry=dict(type="dict", options=dict(address=dict(type="str", required=True),
                                             port=dict(type="int", required=True))),
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
        if p["leaf_lifetime"] < _pki.MIN_LEAF_LIFETIME or p["ttl_minutes"] < 1 or p["renew_for"] < 0:
            raise ValueError("leaf_lifetime must be at least %d seconds, ttl_minutes at least 1 and renew_for not "
                             "negative; pass such values" % _pki.MIN_LEAF_LIFETIME)
        boundary = parse_boundary(p["boundary"])
        python, ttl = python_executable(), p["ttl_minutes"] * 60
        if module.check_mode:
            result = planned(p, boundary)
        elif p["state"] == "present":
            result = _workloads.start_db_service(boundary, p["drill_id"], p["output_dir"], p["database"],
                                                 python=python, tier=p["tier"], port=p["port"], ttl=ttl,
                                                 leaf_lifetime=p["leaf_lifetime"])
        else:
            renewal = _workloads.renew_db_service(boundary, p["drill_id"], p["output_dir"], python=python, ttl=ttl,
                                                  leaf_lifetime=p["leaf_lifetime"])
            if p["renew_for"]:
                renewal.update(_workloads.keep_renewed(boundary, p["drill_id"], p["output_dir"], python=python,
                                                       seconds=p["renew_for"], ttl=ttl,
                                                       leaf_lifetime=p["leaf_lifetime"]))
            result = dict(planned(p, boundary), changed=renewal["renewed"] or bool(renewal.get("renewals")),
                          renewal=renewal)
        if not module.check_mode:
            if p["telemetry"]:
                result["telemetry"] = _workloads.flush_events(p["output_dir"], p["telemetry"], drill_id=p["drill_id"],
                                                              python=python,
                                                              plan=_runtime.full_plan(boundary, p["drill_id"]))
            result["handshakes"] = [dict(e["data"], time=e["time"]) for e in _workloads.service_events(p["output_dir"])]
    except (_workloads.RestoreError, _runtime.SandboxRuntimeError) as exc:
        module.fail_json(msg=str(exc))
    except (BoundaryError, DrillError, ValueError) as exc:
        module.fail_json(msg="runtime_service: %s." % str(exc).rstrip("."))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
