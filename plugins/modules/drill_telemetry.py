#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_telemetry
short_description: Send a drill's events to its isolated telemetry collector from one of its namespaces
version_added: 0.1.0
description:
  - Builds CloudEvents 1.0 events (C(specversion) 1.0, a fresh C(id), RFC 3339 UTC C(time),
    C(datacontenttype) application/json) from short specs and sends them to the drill's telemetry collector
    from one of the drill's own network namespaces, B(unprivileged) (uid 65534, no capabilities, an empty
    environment). The drill sends from its control-plane namespace, a tier from its own.
  - The collector acknowledges an event only after writing it; the task fails when any event was not
    acknowledged (rejected, unanswered, or no collector), with the collector's reason per event in
    C(rejected).
  - Every event is checked before anything is sent; an invalid one fails the task and nothing is sent.
  - The connection is mutual TLS 1.3 - the sender presents the drill's telemetry leaf of O(namespace) (the control
    plane's or the tier's, made by C(drguard.sandbox.sandbox_runtime) with the collector and handed to the sender
    as read-only files of its private mount, never on its command line or in its environment) and sends nothing
    unless the collector presents the drill's C(telemetry) identity. The collector refuses any other sender and
    records the refusal in its file (C(docs/runtime.md), "Who may send").
  - The events, the collector's checks and its reasons are in C(docs/runtime.md) ("Telemetry").
  - Needs root (it enters the drill's namespace), C(ip) and C(setpriv), and the drill's runtime (its telemetry
    credentials on the drill's tmpfs).
attributes:
  check_mode:
    support: full
    details: In check mode the events are built and checked, nothing is sent.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill whose collector receives the events. It names the default C(source)
        (C(/drguard/drill/<drill_id>)) and the drill's namespaces (C(drg-<short>-...)).
    type: str
    required: true
  namespace:
    description:
      - The drill namespace to send from, such as C(drg-<short>-cp) (the control plane) or a tier's. It must
        carry the drill's prefix.
    type: str
    required: true
  address:
    description:
      - The collector's IP address (the embedded world's telemetry address).
    type: str
    required: true
  port:
    description:
      - The collector's TCP port (the declared telemetry port).
    type: int
    required: true
  events:
    description:
      - The events to send, in order.
    type: list
    elements: dict
    required: true
    suboptions:
      type:
        description:
          - The event type; starts with C(drguard.), such as C(drguard.phase.finished) or
            C(drguard.validation.output). C(drguard.telemetry.) types are the collector's own and refused.
        type: str
        required: true
      subject:
        description:
          - What the event is about (a phase name, a tier).
        type: str
      data:
        description:
          - The payload, any JSON value.
        type: raw
      source:
        description:
          - The event's source; C(/drguard/drill/<drill_id>) when omitted.
        type: str
      time:
        description:
          - RFC 3339 time of the event; now (UTC) when omitted.
        type: str
      id:
        description:
          - The event's id; a fresh UUID when omitted.
        type: str
  connect_timeout:
    description:
      - Seconds the sender keeps trying to connect (the collector may still be starting); 0.1 to 120.
    type: float
    default: 10.0
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
seealso:
  - module: drguard.sandbox.runtime_probe
  - module: drguard.sandbox.drill_report
"""

EXAMPLES = r"""
- name: Tell the collector a phase finished
  drguard.sandbox.drill_telemetry:
    drill_id: "{{ drill.drill_id }}"
    namespace: "{{ runtime.plan.world.neighbours.control_plane.ns }}"
    address: "{{ runtime.plan.world.telemetry.address }}"
    port: "{{ runtime.plan.world.telemetry.port }}"
    events:
      - type: drguard.phase.finished
        subject: restore
        data:
          seconds: 12.5
"""

RETURN = r"""
sent:
  description: How many events the sender sent (zero in check mode).
  returned: always, also in the failure result when the sender ran
  type: int
  sample: 1
acknowledged:
  description: How many of them the collector acknowledged as written.
  returned: always, also in the failure result when the sender ran
  type: int
  sample: 1
rejected:
  description: The events the collector rejected - C(event) (1-based position) and C(reason); at most 20.
  returned: on failure, when the collector rejected events
  type: list
  elements: dict
  sample: [{"event": 2, "reason": "type_not_drguard"}]
events:
  description: The events as built (and, unless in check mode, sent).
  returned: always
  type: list
  elements: dict
  sample: [{"specversion": "1.0", "id": "5f0c...", "source": "/drguard/drill/dr-20260101-abc123",
            "type": "drguard.phase.finished", "time": "2026-01-01T00:00:00.000000Z",
            "datacontenttype": "application/json", "subject": "restore", "data": {"seconds": 12.5}}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    namespace=dict(type="str", required=True),
    address=dict(type="str", required=True),
    port=dict(type="int", required=True),
    events=dict(type="list", elements="dict", required=True, options=dict(
        type=dict(type="str", required=True),
        subject=dict(type="str"),
        data=dict(type="raw"),
        source=dict(type="str"),
        time=dict(type="str"),
        id=dict(type="str"),
    )),
    connect_timeout=dict(type="float", default=10.0),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    prefix = _telemetry.drill_prefix(p["drill_id"])
    if not p["namespace"].startswith(prefix):
        module.fail_json(msg="namespace %s is not one of drill %s's namespaces (%s...); send from the drill's "
                             "control-plane or tier namespace" % (p["namespace"], p["drill_id"], prefix))
    if not 0.1 <= p["connect_timeout"] <= 120:
        module.fail_json(msg="connect_timeout %s is outside 0.1-120 seconds; pass a timeout in that range"
                             % p["connect_timeout"])
    try:
        events = _telemetry.build_events(p["drill_id"], p["events"])
        _telemetry.check_endpoint(p["address"], p["port"])
    except _telemetry.TelemetryError as exc:
        module.fail_json(msg=exc.msg, **exc.detail)
    if module.check_mode or not events:
        module.exit_json(changed=bool(events), sent=0, acknowledged=0, events=events)
    try:
        result = _telemetry.deliver(p["namespace"], events, p["address"], p["port"], drill_id=p["drill_id"],
                                    connect_timeout=p["connect_timeout"])
    except _telemetry.TelemetryError as exc:
        module.fail_json(msg="events of drill %s were not all delivered to the telemetry collector at %s:%s: %s"
                             % (p["drill_id"], p["address"], p["port"], exc.msg), events=events, **exc.detail)
    module.exit_json(changed=True, events=events, **result)


if __name__ == "__main__":
    main()
