#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_mtls
short_description: Prove mutual TLS by identity between the tiers of the drill's runtime, with rotation
version_added: 0.1.0
description:
  - The drill's C(mtls) phase in one call (C(docs/mtls.md), "In the drill"), on a runtime
    M(drguard.sandbox.sandbox_runtime) built with the same O(output_dir).
  - Creates the drill's PKI (a CA valid for O(ttl_minutes), one leaf per tier plus C(validation); leaves past
    half-life renewed) under C(/dev/shm/drguard-<drill_id>-mtls/pki) and delivers each tier's identity and
    trust into a directory of its own beside it.
  - In every tier that is the destination of a C(tcp) rule of C(drill_boundary.tier_rules), an mTLS echo
    server (TLS 1.3, client certificate required, authorisation by SPIFFE identity against C(tier_rules))
    takes the rule's ports from the runtime's plain listener for the time of the call; the plain listener
    gets them back at the end.
  - Handshake probes (rows of layer C(mtls)) - every allowed pair with a round trip; refusals with the
    server's reason (no client certificate, another drill's CA, expired, an identity C(tier_rules) does not
    allow, outside the trust domain signed by the drill CA, wrong EKU, cA true, a rotated-out leaf, the old
    CA's leaf after a CA rotation) - a forced leaf rotation with a connection held open, and a CA rotation with
    an overlap bundle.
  - Every handshake and reload event of the servers is sent to the drill's telemetry collector (O(telemetry)).
  - A row whose observed differs from its expectation is returned in RV(violations) (the playbook alerts and
    halts); the module itself fails only when the proof could not run.
  - Private keys never appear in a result.
  - With O(backend=ec2) (C(docs/mtls.md), "On AWS") the servers and the handshake probes run on the drill's
    instances through SSM Run Command, with the bundle each instance fetched from the secret store in the
    runtime phase; no key travels in a command. A row whose result did not come back is C(unknown) and a
    violation (fail closed; on the emulator, which runs no command, every row is). Cases that need a certificate
    made for the probe alone do not run on C(ec2) (RV(omitted)). No telemetry on C(ec2).
  - With O(backend=ec2) the CA rotation (the phase mints its own CA under C(/dev/shm/drguard-<drill_id>-mtls/pki);
    overlap bundle, new leaves, the runtime's CA retired) and then the leaf rotation of the first allowed pair's
    destination (a connection held open meanwhile; the old leaf revoked in the CRL) reach the instances through
    each tier's secret, fetched again by the instance itself, and SIGHUP to the servers. A rotation is proven
    only when every step was confirmed by the instances (the certificate's and the CA bundle's SHA-256, the
    reload with the issued serial, the held connection's result); otherwise RV(rotation) or RV(ca_rotation)
    says C(rotated=false) with the reason and the phase fails. The phase's PKI is destroyed when it ends.
attributes:
  check_mode:
    support: none
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
  backend:
    description:
      - The runtime's backend. V(netns) runs in the namespaces on this host; V(ec2) on the drill's instances
        through SSM (connection options as every AWS module of the collection).
    type: str
    choices: [netns, ec2]
    default: netns
  output_dir:
    description:
      - The run's output directory, the one the runtime was built with (absolute).
      - Required with O(backend=netns).
    type: path
  ttl_minutes:
    description:
      - The drill's TTL; the CA is valid that long.
      - Required with O(backend=netns) (on V(ec2) the runtime phase made the CA).
    type: int
  command_timeout:
    description: With O(backend=ec2), seconds to wait for each SSM command to reach a final status (5 to 600).
    type: float
    default: 60.0
  leaf_lifetime:
    description:
      - Seconds a leaf is valid (at least 20); on V(ec2), the leaves of the phase's own CA (never past that CA,
        which ends with the runtime's CA).
    type: int
    default: 900
  timeout:
    description: Seconds a probe waits for its connection and handshake.
    type: float
    default: 5.0
  telemetry:
    description: The drill's telemetry collector; the servers' events are sent to it.
    type: dict
    suboptions:
      address:
        description: The collector's IPv4 address.
        type: str
        required: true
      port:
        description: The collector's TCP port.
        type: int
        required: true
  inject_allow:
    description:
      - Fault injection for tests of the drill itself; never set it in a real drill.
      - Tier rules (C(from), C(to), C(ports)) the mTLS servers accept on top of C(drill_boundary.tier_rules),
        while the probes still expect C(tier_rules) alone; an identity the policy does not allow is then
        accepted and shows as a violation.
    type: list
    elements: dict
    default: []
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: drguard.sandbox.drill_pki
  - module: drguard.sandbox.runtime_probe
"""

EXAMPLES = r"""
- name: Prove mTLS between the tiers
  drguard.sandbox.runtime_mtls:
    drill_id: "{{ drill_ctx.drill_id }}"
    boundary: "{{ drill_boundary }}"
    output_dir: "{{ drill_ctx.output_dir }}"
    ttl_minutes: 60
    telemetry: "{{ sandbox_runtime__output.collector }}"
  register: mtls
"""

RETURN = r"""
skipped:
  description: True when no tcp tier rule exists (nothing to secure; nothing started).
  returned: always
  type: bool
trust_domain:
  description: C(<drill_id>.drguard.internal).
  returned: unless skipped
  type: str
ca:
  description: The issuing CA at the end (serial, sha256, not_before, not_after).
  returned: unless skipped
  type: dict
leaves:
  description: Per tier its current leaf (serial, sha256, not_before, not_after, spiffe_id).
  returned: unless skipped
  type: dict
servers:
  description: The tiers that ran an mTLS server and their ports.
  returned: unless skipped
  type: list
  elements: dict
rows:
  description:
    - Probe rows of layer C(mtls) - src, dst, address, layer, case, expected, observed, reason,
      expected_reason, latency_ms, peer_id, serial, server_serial.
  returned: always
  type: list
  elements: dict
violations:
  description: The rows whose observed differs from expected.
  returned: always
  type: list
  elements: dict
unexpected:
  description: The rows observed as expected but refused for another reason than expected.
  returned: always
  type: list
  elements: dict
handshakes:
  description: Every handshake the servers saw (the data of their C(drguard.tls.handshake) events).
  returned: always
  type: list
  elements: dict
rotation:
  description:
    - The forced leaf rotation - rotated, dropped_connections, failed_handshakes, new_serials.
    - With O(backend=ec2) also C(steps) (each step per tier - step, tier, instance_id, confirmed, reason), C(pair),
      C(old_serial), C(new_serial), and C(reason) when not proven (C(dropped_connections) and C(failed_handshakes)
      are null when what they count did not come back).
  returned: unless skipped
  type: dict
ca_rotation:
  description:
    - The CA rotation - rotated, old_ca, new_ca, old_ca_key_destroyed.
    - With O(backend=ec2) also C(steps), C(reason) when not proven, C(old_ca_key_check) (the runtime's CA key was
      never stored - true when no private key of the drill's secrets or of the PKI directory is that CA's) and
      C(new_ca_key_destroyed) (the phase's own CA key, with its PKI directory).
  returned: unless skipped
  type: dict
pki_destroyed:
  description: With O(backend=ec2), the phase's PKI directory, destroyed when the phase ended (null if none was made).
  returned: with O(backend=ec2), unless skipped
  type: str
telemetry:
  description: What the collector acknowledged (sent, acknowledged) or the delivery error.
  returned: when telemetry is given and O(backend=netns)
  type: dict
backend:
  description: C(ec2) when the phase ran on the instances.
  returned: with O(backend=ec2)
  type: str
omitted:
  description: With O(backend=ec2), the netns phase's cases that did not run, each with why (case, reason).
  returned: with O(backend=ec2), unless skipped
  type: list
  elements: dict
"""

import os

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    boundary=dict(type="dict", required=True),
    backend=dict(type="str", default="netns", choices=["netns", "ec2"]),
    output_dir=dict(type="path"),
    ttl_minutes=dict(type="int"),
    command_timeout=dict(type="float", default=60.0),
    leaf_lifetime=dict(type="int", default=900),
    timeout=dict(type="float", default=5.0),
    telemetry=dict(type="dict", options=dict(address=dict(type="str", required=True),
                                             port=dict(type="int", required=True))),
    inject_allow=dict(type="list", elements="dict", default=[]),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=False,
                              required_if=[("backend", "netns", ("output_dir", "ttl_minutes"))])
    _aws.hide_session_credentials(module)
    p = module.params
    if p["backend"] == "ec2":
        module.exit_json(**run_ec2(module))
    try:
        validate_drill_id(p["drill_id"])
        if not os.path.isabs(p["output_dir"]):
            raise ValueError("output_dir must be an absolute path; pass the run's output directory")
        if not 0.1 <= p["timeout"] <= 30:
            raise ValueError("timeout %s is outside 0.1-30 seconds; pass a timeout in that range" % p["timeout"])
        boundary = parse_boundary(p["boundary"])
        phase = _mtls_drill.Phase(boundary, p["drill_id"], p["output_dir"], python=python_executable(),
                                  ttl=p["ttl_minutes"] * 60, leaf_lifetime=p["leaf_lifetime"],
                                  telemetry=p["telemetry"], inject_allow=p["inject_allow"], timeout=p["timeout"])
        result = phase.run()
    except (_mtls_drill.MtlsDrillError, _mtls.MtlsError, _pki.PkiError, _runtime.SandboxRuntimeError) as exc:
        module.fail_json(msg="runtime_mtls: %s" % exc.msg)
    except (BoundaryError, DrillError, ValueError) as exc:
        module.fail_json(msg="runtime_mtls: %s." % str(exc).rstrip("."))
    module.exit_json(**result)


def run_ec2(module):
    """The phase on the ec2 runtime's instances through SSM (``_mtls_ec2``)."""
    p = module.params
    try:
        validate_drill_id(p["drill_id"])
        if not 0.1 <= p["timeout"] <= 30:
            raise ValueError("timeout %s is outside 0.1-30 seconds; pass a timeout in that range" % p["timeout"])
        if not 5 <= p["command_timeout"] <= 600:
            raise ValueError("command_timeout %s is outside 5-600 seconds; pass a command timeout in that range"
                             % p["command_timeout"])
        if p["leaf_lifetime"] < _pki.MIN_LEAF_LIFETIME:
            raise ValueError("leaf_lifetime %d is below %d seconds; pass a longer leaf_lifetime"
                             % (p["leaf_lifetime"], _pki.MIN_LEAF_LIFETIME))
        if p["inject_allow"]:
            raise ValueError("inject_allow is not supported with backend ec2 (the servers on the instances judge by "
                             "drill_boundary.tier_rules only); leave it empty")
        boundary = parse_boundary(p["boundary"])
    except (BoundaryError, DrillError, ValueError) as exc:
        module.fail_json(msg="runtime_mtls: %s." % str(exc).rstrip("."))
    try:
        units = _runtime_ec2.live_units(_aws.aws_client(module, "ec2"), p["drill_id"], boundary)
        return _mtls_ec2.run(_aws.aws_client(module, "ssm"), _aws.aws_client(module, "secretsmanager"),
                             p["drill_id"], boundary, units, timeout=p["timeout"],
                             command_timeout=p["command_timeout"], leaf_lifetime=p["leaf_lifetime"])
    except (_pki.PkiError, _mtls_drill.MtlsDrillError) as exc:
        module.fail_json(msg="runtime_mtls: %s" % exc.msg)
    except _aws.ClientError as exc:
        module.fail_json_aws(exc, msg="runtime_mtls: the mTLS phase on the ec2 runtime of drill %s failed; check "
                                      "the runtime (runtime_verify) and run the phase again" % p["drill_id"])


if __name__ == "__main__":
    main()
