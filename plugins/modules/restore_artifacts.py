#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: restore_artifacts
short_description: Restore verified backup artifacts into the sandbox, re-checking every byte
version_added: 0.1.0
description:
  - Copies the artifacts that M(drguard.sandbox.verify_artifacts) verified into a
    private restore directory, reading S3 objects by their pinned version id and local
    files from the read-only mount.
  - Every byte is hashed again while it is written; a file whose SHA-256 or size differs
    from what was verified is discarded and the task fails. Nothing half-written survives
    (temporary file, then rename).
  - Run it with the drill's minted credentials, which can only read the backups.
  - With O(namespace) (the netns runtime's validation tier) the S3 reads run inside that tier as an
    unprivileged workload with the drill's session, through the runtime's S3 endpoint O(s3_endpoint); the
    bytes come back to the controller, which checks them against what was verified while it writes
    O(dest) exactly as without O(namespace). See docs/runtime.md, "Restore and validation inside".
  - With O(backend=ec2) the artifacts are restored on the ec2 runtime's validation instance
    (C(drguard-<drill_id>-validation)), through SSM Run Command; the bytes never reach the controller. The
    drill's session (O(access_key), O(secret_key),
    O(session_token)) is stored as the secret C(drguard/<drill_id>/runtime/session), tagged as the drill's, which
    only that instance's role may read; the command carries its name only. On the instance, an unprivileged
    workload reads each artifact by its pinned version from the regional S3 endpoint into a size-capped tmpfs
    (C(/run/drguard/restore)) and prints its size and SHA-256, which must be the verified ones. Local sources
    are refused (naming the artifact). The secret store, SSM and EC2 are called with the controller's
    credentials (the environment or O(profile)), never with the drill's session. See docs/runtime.md, "The ec2 backend".
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  artifacts:
    description:
      - The C(artifacts) list returned by M(drguard.sandbox.verify_artifacts); each entry
        needs C(name), C(verified), C(sha256), C(size), C(source) and C(version_id).
      - An entry that is not verified is refused.
    type: list
    elements: dict
    required: true
  dest:
    description:
      - Restore directory. It, its missing parents and every directory inside it are created with mode 0700
        whatever the umask; restored files are 0400.
      - An existing O(dest) must be a real directory (a symlink is refused, never followed or chmodded) owned by the
        user running the drill; group and other permission bits on it are removed.
    type: path
    required: true
  workers:
    description: Parallel downloads (on the controller; inside O(namespace) the artifacts are read one after another).
    type: int
    default: 4
  namespace:
    description:
      - The netns runtime's validation tier (C(drg-<short>-validation)) to read the S3 artifacts in.
      - Needs O(s3_endpoint) and the drill's session as explicit O(access_key), O(secret_key) and
        O(session_token); the controller's own credentials are never handed in. Local sources are restored on the
        controller from the read-only mount.
    type: str
  s3_endpoint:
    description:
      - C(address:port) of the runtime's S3 endpoint (M(drguard.sandbox.sandbox_runtime)'s C(s3_endpoint)), which
        relays to the drill's S3 endpoint (O(endpoint_url), else the region's S3). Required with O(namespace).
    type: str
  backend:
    description:
      - Where the restore runs. V(controller) - on the controller, or inside O(namespace) when given.
        V(ec2) - on the ec2 runtime's validation instance, through SSM (O(drill_id) required; O(dest),
        O(workers), O(namespace) and O(s3_endpoint) do not apply).
    type: str
    default: controller
    choices: [controller, ec2]
  drill_id:
    description: The drill whose ec2 runtime restores (O(backend=ec2)).
    type: str
  command_timeout:
    description: Seconds one SSM command of the restore may take (O(backend=ec2)); no result by then fails.
    type: int
    default: 900
  session_expiration:
    description:
      - With O(backend=ec2), when the drill's session expires (RFC 3339), stored with it as
        C(AWS_CREDENTIAL_EXPIRATION) in the session secret.
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Restore the verified backup set with the drill's credentials
  drguard.sandbox.restore_artifacts:
    artifacts: "{{ verify.artifacts }}"
    dest: "{{ drill_output_dir }}/restore"
    access_key: "{{ drill_aws_session.access_key_id }}"
    secret_key: "{{ drill_aws_session.secret_access_key }}"
    session_token: "{{ drill_aws_session.session_token }}"
  register: restored

- name: Restore inside the netns runtime's validation tier, through its S3 endpoint
  drguard.sandbox.restore_artifacts:
    artifacts: "{{ verify.artifacts }}"
    dest: "{{ drill_output_dir }}/restore"
    namespace: "{{ sandbox_runtime__output.prefix }}validation"
    s3_endpoint: "{{ sandbox_runtime__output.s3_endpoint.address }}:{{ sandbox_runtime__output.s3_endpoint.port }}"
    access_key: "{{ drill_aws_session.access_key_id }}"
    secret_key: "{{ drill_aws_session.secret_access_key }}"
    session_token: "{{ drill_aws_session.session_token }}"
  register: restored

- name: Restore on the ec2 runtime's validation instance, through SSM
  drguard.sandbox.restore_artifacts:
    artifacts: "{{ verify.artifacts }}"
    dest: /run/drguard/restore
    backend: ec2
    drill_id: "{{ drill.drill_id }}"
    access_key: "{{ drill_aws_session.access_key_id }}"
    secret_key: "{{ drill_aws_session.secret_access_key }}"
    session_token: "{{ drill_aws_session.session_token }}"
  register: restored
"""

RETURN = r"""
restored:
  description:
    - One entry per artifact written - C(name), C(path), C(sha256), C(size), and the manifest's C(kind) and
      C(expect) when the input entry carries them (for M(drguard.sandbox.validate_restore)).
    - With O(backend=ec2), C(path) is on the validation instance and C(on_instance) is true.
  returned: success
  type: list
  elements: dict
  sample: [{name: orders.sqlite, path: /drill-runs/dr-1/restore/orders.sqlite, sha256: "9f8...", size: 20480}]
bytes_restored:
  description: Bytes written.
  returned: success
  type: int
inside:
  description:
    - The namespace the S3 reads ran in (O(namespace)), or the validation instance (C(<instance id> (validation)))
      with O(backend=ec2); absent when the restore ran on the controller.
  returned: success with O(namespace) or O(backend=ec2)
  type: str
  sample: drg-1a2b3c-validation
session_secret:
  description: The name of the secret holding the drill's session for the validation instance (never its value).
  returned: success with O(backend=ec2)
  type: str
  sample: drguard/dr-20261130200000-a1b2c3/runtime/session
"""

import ipaddress

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import restore
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import restore_inside
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2 import Ec2RuntimeError
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2_restore import checked_target
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2_restore import restore_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_relay import RelayError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_relay import target
from ansible_collections.drguard.sandbox.plugins.module_utils._secret_exec import drill_session

ARGUMENT_SPEC = dict(
    artifacts=dict(type="list", elements="dict", required=True),
    dest=dict(type="path", required=True),
    workers=dict(type="int", default=4),
    namespace=dict(type="str"),
    s3_endpoint=dict(type="str"),
    backend=dict(type="str", default="controller", choices=["controller", "ec2"]),
    drill_id=dict(type="str"),
    command_timeout=dict(type="int", default=900),
    session_expiration=dict(type="str"),
)


def _endpoint(value):
    """``(address, port)`` of ``s3_endpoint`` (``address:port``, an IPv4 address), or :class:`RestoreError`."""
    address, _sep, port = (value or "").rpartition(":")
    try:
        ipaddress.IPv4Address(address)
        port = int(port)
        if not 1 <= port <= 65535:
            raise ValueError(port)
    except ValueError:
        raise RestoreError("s3_endpoint %r is not address:port (an IPv4 address and a port); pass the runtime's "
                           "s3_endpoint" % (value,)) from None
    return address, port


def run_inside(module):
    """The restore inside ``namespace``; bad input fails before anything runs."""
    p = module.params
    if not p["s3_endpoint"]:
        raise RestoreError("s3_endpoint is required with namespace: the validation tier reaches S3 only through the "
                           "runtime's S3 endpoint; pass sandbox_runtime's s3_endpoint (address:port)")
    endpoint = _endpoint(p["s3_endpoint"])
    try:
        to = target(p.get("endpoint_url"), module.region)
    except RelayError as exc:
        raise RestoreError(exc.msg.rstrip(".")) from None
    return restore_inside(p["artifacts"], p["dest"], ns=p["namespace"], endpoint=endpoint, to=to,
                          region=module.region or "us-east-1", session=drill_session(p), python=python_executable(),
                          check_mode=module.check_mode)


def controller_client(module, service):
    """A client with the controller's credentials (environment, profile), never the drill's explicit session."""
    return aws_client(module, service, aws_access_key_id=None, aws_secret_access_key=None, aws_session_token=None)


def run_ec2(module):
    """The restore on the ec2 runtime's validation instance; bad input fails before any AWS call."""
    p = module.params
    drill_id = checked_target(p["drill_id"], p["command_timeout"])
    if p["namespace"] or p["s3_endpoint"]:
        raise RestoreError("namespace and s3_endpoint belong to the netns runtime; drop them with backend ec2")
    session = drill_session(p)
    if session and p["session_expiration"]:
        session = dict(session, AWS_CREDENTIAL_EXPIRATION=p["session_expiration"])
    try:
        to = target(p.get("endpoint_url"), module.region)
    except RelayError as exc:
        raise RestoreError(exc.msg.rstrip(".")) from None
    clients = {s: controller_client(module, s) for s in ("ec2", "ssm", "secretsmanager")}
    return restore_ec2(clients, drill_id, p["artifacts"], session=session, region=module.region or "us-east-1",
                       to=to, timeout=p["command_timeout"], check_mode=module.check_mode)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    p = module.params
    try:
        if p["backend"] == "ec2":
            result = run_ec2(module)
        elif p["namespace"]:
            result = run_inside(module)
        else:
            result = restore(p["artifacts"], p["dest"], workers=p["workers"], check_mode=module.check_mode,
                             client=lambda service: aws_client(module, service))
    except RestoreError as exc:
        module.fail_json(msg=str(exc))
    except Ec2RuntimeError as exc:
        module.fail_json(msg=exc.msg)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Restore failed")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
