#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_probe
short_description: Prove with real packets, both ways, that a netns runtime lets through only what the boundary declares
version_added: 0.1.0
description:
  - Sends live probes through a drill's C(netns) sandbox runtime and its embedded world, and judges each one
    against the declared boundary policy (C(drill_boundary)). From every tier (the declared tiers and
    C(validation)) - TCP to every production bait (must be denied), to the control plane and telemetry on the
    declared egress ports and over every declared fallback path (must connect), every declared tier rule (must
    connect), an undeclared port on a declared peer and every undeclared tier pair (must be denied), DNS (UDP 53)
    to the outside (must fail); into the sandbox - from the control plane to every tier on each ingress port
    (must connect) and from production on the same ports (must be denied).
  - Every probe runs B(unprivileged) (uid 65534, no capabilities) inside its source namespace; the probes of one
    namespace run at once, and all namespaces at once, so the whole matrix takes about one O(timeout).
  - A TCP probe counts as C(allow) when it connects or is refused (a reset means the packet reached the peer),
    C(deny) when it times out or is unreachable; a UDP probe counts as C(allow) when anything comes back.
  - The router table's named counters are read before and after; the C(production_drop) counter must rise by at
    least the number of production probes.
  - Any row whose observed verdict differs from the expected one is a boundary violation, and so is a production
    counter that did not rise or a probe that could not run; the task then fails after returning everything.
  - The rows, violation codes and what each means are in C(docs/runtime.md) ("Live probes").
  - Sends packets only between namespaces of the drill; changes nothing, so C(changed) is always false. In
    check mode no packet is sent and the planned rows are returned with C(observed) null.
  - Needs root (it enters the drill's namespaces and reads the router's counters), C(ip), C(nft) and C(setpriv).
  - "With O(backend=ec2) the rows of the ec2 runtime (C(docs/runtime.md), \"The ec2 backend\") are probed from each
    tier's running instance through SSM Run Command (one C(AWS-RunShellScript) per instance, the probe program run
    unprivileged), with amazon.aws' connection options. A row whose command did not end C(Success) within
    O(command_timeout) with a result for every probe in its output, or whose tier has no running instance, is
    C(observed=unknown) and a C(probe_failed) violation (fail closed). The emulator runs no command: there every
    row is unknown."
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
      - The drill whose runtime is probed; its namespaces are named C(drg-<short>-...) after it.
    type: str
    required: true
  boundary:
    description:
      - The declared boundary policy (C(drill_boundary)); see C(docs/boundary-policy.md). An invalid policy
        fails the task before any probe is sent.
    type: dict
    required: true
  backend:
    description:
      - The runtime's backend. V(netns) probes from the namespaces on this host; V(ec2) from the drill's instances
        through SSM.
    type: str
    default: netns
    choices: [netns, ec2]
  command_timeout:
    description:
      - With O(backend=ec2), seconds to wait for each instance's SSM command to reach a final status (5 to 600).
    type: float
    default: 60.0
  timeout:
    description:
      - Seconds each probe waits for a connection or a reply before it counts as denied (0.05 to 30).
    type: float
    default: 1.0
  telemetry:
    description:
      - The drill's telemetry collector. When given, every row is also sent as a C(drguard.probe.result)
        CloudEvents event (C(docs/runtime.md)) from the control-plane namespace, unprivileged, after the probes.
      - An event the collector did not acknowledge is a warning and shows in the C(telemetry) return, not a
        failure (the probe rows to the telemetry destination already prove the path).
    type: dict
    suboptions:
      address:
        description:
          - The collector's IPv4 address (the embedded world's telemetry address).
        type: str
        required: true
      port:
        description:
          - The collector's TCP port.
        type: int
        required: true
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: drguard.sandbox.runtime_verify
"""

EXAMPLES = r"""
- name: Probe the live runtime
  drguard.sandbox.runtime_probe:
    drill_id: "{{ drill.drill_id }}"
    boundary: "{{ drill_boundary }}"
  register: probes

- name: Show the matrix
  ansible.builtin.debug:
    msg: "{{ probes.rows | map(attribute='address') | list }}"
"""

RETURN = r"""
rows:
  description: One row per probe, in the report's probe row shape plus C(protocol) and C(src_address).
  returned: always, also in the failure result
  type: list
  elements: dict
  contains:
    src:
      description: Where the probe was sent from (a tier, C(control_plane) or C(production)).
      type: str
      sample: app
    dst:
      description: What it was sent to (a tier, C(production), C(control_plane), C(telemetry), C(fallback), C(dns)).
      type: str
      sample: production
    address:
      description: The destination, C(ip:port).
      type: str
      sample: "10.0.0.1:5432"
    layer:
      description: Always C(l4).
      type: str
      sample: l4
    protocol:
      description: C(tcp) or C(udp).
      type: str
      sample: tcp
    src_address:
      description: The source address the probe was bound to.
      type: str
      sample: 10.213.0.2
    expected:
      description: C(allow) or C(deny), from the boundary.
      type: str
      sample: deny
    observed:
      description: C(allow), C(deny), or C(error) when the probe could not run; null in check mode.
      type: str
      sample: deny
    reason:
      description: What happened (C(connected), C(refused (reached the peer)), C(timed out), C(reply), C(no reply),
        ...); a blocked fallback path starts with C(fallback_blocked).
      type: str
      sample: timed out
    latency_ms:
      description: Milliseconds until the outcome.
      type: float
      sample: 1001.3
counters:
  description: Packets counted by each of the router table's named counters before and after the probes, and
    the delta.
  returned: always (null values in check mode or when unreadable)
  type: dict
  sample: {"before": {"production_drop": 0, "default_drop": 3}, "after": {"production_drop": 48, "default_drop": 40},
           "delta": {"production_drop": 48, "default_drop": 37}}
violations:
  description: One entry per violation - C(code), C(detail) and, for a row at fault, C(row) (its index in I(rows)).
  returned: always, also in the failure result
  type: list
  elements: dict
  sample: [{"code": "production_reachable", "row": 0,
            "detail": "app -> production tcp 10.0.0.1:5432: expected deny, observed allow (connected)"}]
telemetry:
  description: How many probe events were sent and acknowledged by the collector, and C(error) when not all were.
  returned: when I(telemetry) is given and the probes ran
  type: dict
  sample: {"sent": 60, "acknowledged": 60}
summary:
  description: Counts of rows, of rows observed C(allow) and C(deny), and of violations.
  returned: always
  type: dict
  sample: {"rows": 60, "allow": 18, "deny": 42, "violations": 0}
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._nft_policy import NftPolicyError
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import ProbeError
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import probe_matrix
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import run_probes
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import send_events
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    backend=dict(type="str", default="netns", choices=["netns", "ec2"]),
    command_timeout=dict(type="float", default=60.0),
    timeout=dict(type="float", default=1.0),
    telemetry=dict(type="dict", options=dict(address=dict(type="str", required=True),
                                             port=dict(type="int", required=True))),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    _aws.hide_session_credentials(module)
    p = module.params
    if not 0.05 <= p["timeout"] <= 30:
        module.fail_json(msg="timeout %s is outside 0.05-30 seconds; pass a probe timeout in that range"
                             % p["timeout"])
    if p["backend"] == "ec2":
        finish(module, probe_ec2(module))
    try:
        boundary = parse_boundary(p["boundary"])
        plan = _runtime.full_plan(boundary, p["drill_id"])
        rows = probe_matrix(boundary, plan)
    except (BoundaryError, NftPolicyError, _runtime.SandboxRuntimeError, ValueError) as exc:
        module.fail_json(msg="boundary is invalid for the netns runtime: %s" % exc)
    except ProbeError as exc:
        module.fail_json(msg=exc.msg, **exc.detail)

    if module.check_mode:
        module.exit_json(changed=False, rows=rows, counters={"before": None, "after": None, "delta": None},
                         violations=[], summary={"rows": len(rows), "allow": 0, "deny": 0, "violations": 0})
    try:
        result = run_probes(rows, plan, timeout=p["timeout"])
    except ProbeError as exc:
        module.fail_json(msg=exc.msg, rows=rows, **exc.detail)
    result["changed"] = False
    if p["telemetry"]:
        result["telemetry"] = send_events(result["rows"], plan, p["drill_id"], p["telemetry"]["address"],
                                          p["telemetry"]["port"])
        if "error" in result["telemetry"]:
            module.warn("probe events were not all delivered to the telemetry collector: %s"
                        % result["telemetry"]["error"])
    finish(module, result)


def probe_ec2(module):
    """The ec2 runtime's rows, probed from its instances through SSM (check mode: the planned rows only)."""
    p = module.params
    if not 5 <= p["command_timeout"] <= 600:
        module.fail_json(msg="command_timeout %s is outside 5-600 seconds; pass a command timeout in that range"
                             % p["command_timeout"])
    try:
        boundary = parse_boundary(p["boundary"])
    except (BoundaryError, ValueError) as exc:
        module.fail_json(msg="runtime_probe: %s." % str(exc).rstrip("."))
    try:
        units = _runtime_ec2.live_units(_aws.aws_client(module, "ec2"), p["drill_id"], boundary)
        rows = _runtime_ec2.probe_matrix(boundary, units)
        if module.check_mode:
            return {"changed": False, "rows": rows, "violations": [],
                    "summary": {"rows": len(rows), "allow": 0, "deny": 0, "unknown": 0, "violations": 0}}
        result = _runtime_ec2.run_probes(_aws.aws_client(module, "ssm"), rows, units, timeout=p["timeout"],
                                         command_timeout=p["command_timeout"])
    except _aws.ClientError as exc:
        module.fail_json_aws(exc, msg="runtime_probe: probing the ec2 runtime of drill %s failed" % p["drill_id"])
    result.update(changed=False, counters={"before": None, "after": None, "delta": None})
    return result


def finish(module, result):
    """Exit with the probe result; a violation fails the task after returning everything."""
    p = module.params
    if result["violations"]:
        first = "; ".join(v["detail"] for v in result["violations"][:3])
        module.fail_json(msg="the runtime of drill %s violates the boundary: %d violation(s) (%s), first: %s; halt "
                             "before any backup is read and tear down" % (
                                 p["drill_id"], len(result["violations"]),
                                 ", ".join(sorted({v["code"] for v in result["violations"]})), first),
                         **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
