#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sandbox_runtime
short_description: Start or remove a drill's sandbox runtime (tiers as network namespaces with their embedded world)
version_added: 0.1.0
description:
  - Builds the compute a drill runs inside its boundary, or removes it. The backend is chosen by O(backend).
  - "V(netns) (the default): one Linux network namespace per tier (C(drill_boundary.tiers) plus C(validation)),
    joined through a router namespace that holds the drill's nft table, translated from the same C(drill_boundary)
    (see C(docs/runtime.md)). Behind the router's uplink sits the embedded world: a C(wan) namespace and neighbour
    namespaces for production (bait listeners on a database port, a webhook and a log intake), the control plane,
    the telemetry collector and, when declared, the fallback paths. Every listener runs as an unprivileged process
    (uid 65534, no capabilities, no_new_privs, a clean environment)."
  - V(none) runs nothing inside the sandbox and returns no units; the drill's report then says so.
  - "V(ec2) (real AWS): one instance per tier (plus C(validation)) in the drill's sandbox subnets, in the tier's
    security group, without a public address, IMDSv2 required (hop limit 1), with the instance profile
    C(drguard-<drill_id>-runtime) (path C(/drguard/), tagged) holding the runtime's own role of that name. Each
    tier's certificate bundle goes to its instance through Secrets Manager (C(docs/mtls.md)). The network must have
    been built with C(drill_boundary.ssm_endpoints=true) (the ssm, ssmmessages, ec2messages and secretsmanager
    interface endpoints and the C(validation) tier's group); the instances are reached only through SSM Run Command.
    Found again by tags and names, so a second run changes nothing. O(state=absent) terminates the instances, waits
    until they are gone and deletes the instance profile, the runtime's role and the tiers' certificate secrets. The
    emulator runs no SSM command (see C(docs/runtime.md))."
  - With O(state=present), C(<output_dir>/runtime/state.json) records the drill's prefix before anything is
    created, so teardown and the reaper find the runtime after a kill. Production bait connections are written to
    C(<output_dir>/runtime/bait-hits.jsonl) (it must stay empty) and the collector's events to
    C(<output_dir>/telemetry.jsonl). Files are 0600 in 0700 directories and hold no secret.
  - Idempotent. A second run changes nothing (C(changed) false) while the namespaces exist, the live router
    ruleset verifies against the boundary (so its counters are kept) and every listener process is alive and bound;
    what is missing is rebuilt or restarted. In check mode nothing is created or changed and C(changed) says
    whether a real run would change something.
  - Bad input (the boundary, a tier named like a namespace of the embedded world, a CIDR with no free host) and a
    host that cannot run the runtime (not root, so no CAP_NET_ADMIN; C(ip), C(nft) or C(setpriv) missing) fail
    before anything is created. A failure after creation began removes everything of the drill's prefix again.
  - With O(state=absent), every process, namespace, veth and the router's nft table of the drill are removed and
    proven gone (C(ip netns), C(nft list tables), C(/proc/mounts), the process table); removing a runtime that does
    not exist changes nothing.
author:
  - drguard maintainers (!UNKNOWN)
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
      - The drill's id (4-40 lowercase letters, digits and hyphens); the runtime's names carry
        C(drg-<first 6 hex digits of its SHA-256>-).
    type: str
    required: true
  state:
    description:
      - V(present) builds or completes the runtime, V(absent) removes it.
    type: str
    default: present
    choices: [present, absent]
  backend:
    description:
      - Where the workloads run. V(netns) is the embedded default; V(none) runs nothing inside; V(ec2) runs one
        instance per tier on AWS, reached through SSM.
    type: str
    default: netns
    choices: [netns, none, ec2]
  boundary:
    description:
      - The drill's boundary policy (C(drill_boundary), see C(docs/boundary-policy.md)). Required with
        O(state=present) and O(backend=netns) or O(backend=ec2).
    type: dict
  output_dir:
    description:
      - The run's output directory (absolute). Required with O(state=present) and O(backend=netns); with
        O(state=absent) its C(runtime/state.json) is checked to belong to this drill and marked absent.
    type: path
  expires_at:
    description:
      - With O(backend=ec2), the RFC 3339 time the drill's resources expire (their C(drguard:expires-at) tag). By
        default the drill's VPC's own C(drguard:expires-at) tag.
      - With O(backend=netns), the drill's CA, which the runtime makes for its mTLS telemetry collector when the
        drill has none yet, is valid until then (at least a minute from now); by default for 120 minutes.
    type: str
  ec2:
    description:
      - Settings of O(backend=ec2).
    type: dict
    default: {}
    suboptions:
      instance_role:
        description:
          - The IAM role the instance profile holds. By default the runtime makes its own, C(drguard-<drill_id>-runtime)
            (trusts C(ec2.amazonaws.com) only; the SSM agent's actions and, per tier, its own runtime secret for
            that tier's instance only (C(ec2:SourceInstanceARN)), the validation tier's also the drill's session),
            and removes it with O(state=absent). A role given here must carry the drill's C(drguard:drill-id) tag and
            trust C(ec2.amazonaws.com), or the run fails before any instance starts.
        type: str
      ami:
        description:
          - The AMI. Default the value of O(ec2.ami_parameter).
        type: str
      ami_parameter:
        description:
          - The SSM public parameter the AMI is read from when O(ec2.ami) is not given.
        type: str
        default: /aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64
      instance_type:
        description:
          - The instance type of every tier.
        type: str
        default: t3.micro
      wait_timeout:
        description:
          - Seconds to wait for the instances to run (or, with O(state=absent), to be terminated).
        type: int
        default: 600
notes:
  - With O(backend=ec2) the module uses amazon.aws' connection options (module_defaults group
    C(group/drguard.sandbox.aws)); every AWS call is retried on transient errors.
  - With O(backend=netns), needs root (namespaces and nftables need CAP_SYS_ADMIN and CAP_NET_ADMIN) and
    iproute2, nftables and util-linux (C(setpriv)) on C(PATH); C(make venv) as root installs them.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
seealso:
  - module: drguard.sandbox.runtime_verify
  - module: drguard.sandbox.runtime_probe
"""

EXAMPLES = r"""
- name: Start the drill's runtime
  drguard.sandbox.sandbox_runtime:
    drill_id: "{{ drill.drill_id }}"
    boundary: "{{ drill_boundary }}"
    output_dir: "{{ drill_output_dir }}"
  register: runtime

- name: Nothing runs inside the sandbox (said in the report)
  drguard.sandbox.sandbox_runtime:
    drill_id: dr-20261130200000-a1b2c3
    backend: none

- name: The runtime on AWS (the network built with drill_boundary.ssm_endpoints true)
  drguard.sandbox.sandbox_runtime:
    drill_id: "{{ drill.drill_id }}"
    backend: ec2
    boundary: "{{ drill_boundary | combine({'ssm_endpoints': true}) }}"

- name: Remove the runtime
  drguard.sandbox.sandbox_runtime:
    drill_id: dr-20261130200000-a1b2c3
    output_dir: /var/lib/drguard/runs/dr-20261130200000-a1b2c3
    state: absent
"""

RETURN = r"""
backend:
  description: The backend used.
  returned: always
  type: str
  sample: netns
units:
  description: One entry per tier namespace (V(ec2) - C(tier), C(instance_id), C(address), C(subnet_id),
    C(security_group_id)); empty for V(none) and O(state=absent).
  returned: always
  type: list
  elements: dict
  sample: [{"tier": "app", "ns": "drg-ab12cd-app", "address": "10.213.0.2"}]
prefix:
  description: The drill's name prefix; everything of the runtime carries it.
  returned: with backend netns
  type: str
  sample: drg-ab12cd-
table:
  description: The drill's nft table (family inet) in the router namespace.
  returned: with backend netns and state present
  type: str
  sample: drg-ab12cd-router
world:
  description: The embedded world (the wan namespace, the neighbours with their addresses, every listener, the
    telemetry destination), as laid out in C(docs/runtime.md).
  returned: with backend netns and state present
  type: dict
listeners:
  description: How many listeners the world has.
  returned: with backend netns and state present
  type: int
  sample: 24
rules:
  description: How many rules the drill's table holds, read back from the router namespace (null in check mode).
  returned: with backend netns and state present
  type: int
  sample: 31
collector:
  description: The telemetry collector (null when no egress rule has C(kind=telemetry)).
  returned: with backend netns and state present
  type: dict
  sample: {"address": "198.51.100.17", "port": 4317, "path": "/runs/dr-1/telemetry.jsonl"}
processes:
  description: The pids of the runtime's listener processes and collector.
  returned: with backend netns and state present
  type: list
  elements: int
removed:
  description: What O(state=absent) removed (netns - namespaces, host links, pids; ec2 - instances and the instance
    profile).
  returned: with state absent and backend netns or ec2
  type: dict
certificates:
  description: One entry per tier - C(tier), C(secret) (the Secrets Manager secret its instance fetched its bundle
    from), C(serial), C(sha256) and C(not_after) of its leaf, C(delivered) (true only when the instance confirmed the
    certificate's SHA-256) and C(reason). Never key material.
  returned: with backend ec2 and state present
  type: list
  elements: dict
instance_role:
  description: The IAM role the instance profile holds (the runtime's own unless O(ec2.instance_role) names one).
  returned: with backend ec2 and state present
  type: str
  sample: drguard-dr-20261130200000-a1b2c3-runtime
instance_profile:
  description: The instance profile of the tiers' instances.
  returned: with backend ec2 and state present
  type: str
  sample: drguard-dr-20261130200000-a1b2c3-runtime
ami:
  description: The AMI the instances were launched from.
  returned: with backend ec2 and state present
  type: str
vpc_id:
  description: The drill's VPC the instances run in.
  returned: with backend ec2 and state present
  type: str
actions:
  description: What the ec2 backend did (or would do in check mode).
  returned: with backend ec2
  type: list
  elements: str
"""

from datetime import datetime
from datetime import timezone

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import BoundaryError
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    backend=dict(type="str", default="netns", choices=["netns", "none", "ec2"]),
    boundary=dict(type="dict"),
    output_dir=dict(type="path"),
    expires_at=dict(type="str"),
    ec2=dict(type="dict", default={}, options=dict(
        instance_role=dict(type="str"),
        ami=dict(type="str"),
        ami_parameter=dict(type="str", default=_runtime_ec2.AMI_PARAMETER),
        instance_type=dict(type="str", default=_runtime_ec2.INSTANCE_TYPE),
        wait_timeout=dict(type="int", default=600),
    )),
)


def run_ec2(params, check_mode, client):
    """The ec2 backend; ``client(service)`` gives a retrying client. Raises :class:`_runtime_ec2.Ec2RuntimeError`."""
    drill_id = validate_drill_id(params["drill_id"])
    opts = params.get("ec2") or {}
    if not 1 <= int(opts.get("wait_timeout") or 600) <= 3600:
        raise ValueError("ec2.wait_timeout %r must be between 1 and 3600 seconds" % opts.get("wait_timeout"))
    if params["state"] == "absent":
        clients = {"ec2": client("ec2"), "iam": client("iam"), "secretsmanager": client("secretsmanager")}
        return _runtime_ec2.down(clients, drill_id, wait_timeout=opts.get("wait_timeout") or 600,
                                 check_mode=check_mode)
    if not params["boundary"]:
        raise ValueError("boundary is required to start the ec2 runtime; pass the drill's boundary")
    # Bad input fails before any client exists.
    boundary = parse_boundary(params["boundary"])
    _runtime_ec2.require_ssm_endpoints(boundary)
    clients = {"ec2": client("ec2"), "iam": client("iam"), "ssm": client("ssm"),
               "secretsmanager": client("secretsmanager")}
    expires = params.get("expires_at")
    if not expires:
        expires = _runtime_ec2.find_network(clients["ec2"], drill_id, boundary)["expires_at"]
    tags = drill_tags(drill_id, expires)
    return _runtime_ec2.up(clients, drill_id, boundary, tags,
                           role_name=opts.get("instance_role"),
                           ami=opts.get("ami"), ami_parameter=opts.get("ami_parameter") or _runtime_ec2.AMI_PARAMETER,
                           instance_type=opts.get("instance_type") or _runtime_ec2.INSTANCE_TYPE,
                           wait_timeout=opts.get("wait_timeout") or 600, check_mode=check_mode)


def run(params, check_mode):
    """The module's work; raises :class:`_runtime.SandboxRuntimeError` (or ``ValueError`` for bad input)."""
    drill_id = validate_drill_id(params["drill_id"])
    backend = params["backend"]
    if backend == "none":
        return {"changed": False, "backend": "none", "units": []}
    if params["state"] == "absent":
        if check_mode:
            remaining = _runtime.leftovers(_runtime.prefix_of(drill_id))
            return {"changed": bool(remaining["namespaces"]), "backend": "netns", "units": [],
                    "prefix": _runtime.prefix_of(drill_id), "removed": {}}
        result = _runtime.down(drill_id, params["output_dir"])
        return dict(result, backend="netns", units=[])
    missing = [name for name in ("boundary", "output_dir") if not params[name]]
    if missing:
        raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required to start the "
                         "netns runtime; pass the drill's boundary and output directory.")
    boundary = parse_boundary(params["boundary"])
    pki_ttl = None
    if params.get("expires_at"):
        pki_ttl = int((parse_time(params["expires_at"]) - datetime.now(timezone.utc)).total_seconds())
        if pki_ttl < 60:
            raise ValueError(f"expires_at {params['expires_at']} is less than a minute away; pass the drill's "
                             "expiry (drill_ctx.expires_at) of a drill that has not expired")
    return _runtime.up(boundary, drill_id, params["output_dir"], python_executable(), check_mode=check_mode,
                       pki_ttl=pki_ttl, s3_target=_runtime.s3_target(boundary, params))


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    _aws.hide_session_credentials(module)
    try:
        if module.params["backend"] == "ec2":
            result = run_ec2(module.params, module.check_mode, lambda service: _aws.aws_client(module, service))
        else:
            result = run(module.params, module.check_mode)
    except _runtime_ec2.Ec2RuntimeError as exc:
        module.fail_json(msg="sandbox_runtime: %s." % exc.msg.rstrip("."),
                         **{k: v for k, v in exc.detail.items() if k in ("instances", "remaining", "problems")})
    except _aws.ClientError as exc:
        module.fail_json_aws(exc, msg="sandbox_runtime: the ec2 runtime's AWS call failed")
    except (DrillError, BoundaryError, ValueError) as exc:
        module.fail_json(msg=f"sandbox_runtime: {str(exc).rstrip('.')}.")
    except _runtime.SandboxRuntimeError as exc:
        module.fail_json(msg=exc.msg, **{k: v for k, v in exc.detail.items() if k in ("cleanup", "remaining")})
    module.exit_json(**result)


if __name__ == "__main__":
    main()
