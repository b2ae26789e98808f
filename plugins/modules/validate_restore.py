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
  - With O(backend=ec2) the validators run on the ec2 runtime's validation instance over the files
    M(drguard.sandbox.restore_artifacts) restored there (O(backend=ec2)), through SSM Run Command, unprivileged
    (uid 65534, no capability, an empty environment), extractions on a size-capped tmpfs; their JSON results
    are read from the command's output, and anything else (no result, another status) fails. With O(command) the
    module runs that command there instead, unprivileged, in the restore directory, and returns its exit code and
    the tail of its output. SSM and EC2 are called with the controller's credentials. See docs/runtime.md,
    "The ec2 backend".
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
  backend:
    description:
      - Where the validators run. V(controller) - on the controller, or inside O(namespace) when given.
        V(ec2) - on the ec2 runtime's validation instance, through SSM (O(drill_id) required).
    type: str
    default: controller
    choices: [controller, ec2]
  drill_id:
    description: The drill whose ec2 runtime validates (O(backend=ec2)).
    type: str
  command:
    description:
      - With O(backend=ec2) only - run this argv (the user's validation command) on the validation instance instead
        of the validators, unprivileged, in the restore directory, with only C(PATH), C(LANG) and C(HOME) in its
        environment (no secret, no AWS session). Fails when it exits non-zero. Its output tail is returned.
    type: list
    elements: str
  script:
    description:
      - With O(command) - a script on the controller (a regular file of at most 16 KiB) handed to the validation
        instance as C(/run/drguard/command/<name>) (0444); every argument of O(command) equal to this path names
        that copy.
    type: path
  command_timeout:
    description: Seconds one SSM command may take (O(backend=ec2)); no result by then fails.
    type: int
    default: 900
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
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
  description: The namespace the validators ran in, or the validation instance (C(<instance id> (validation))).
  returned: with O(namespace) or O(backend=ec2)
  type: str
  sample: drg-1a2b3c-validation
rc:
  description: The exit code of O(command).
  returned: with O(command)
  type: int
stdout:
  description: The last 4000 bytes of O(command)'s output (stdout and stderr).
  returned: with O(command)
  type: str
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import Caps
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_MEMBERS
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_RATIO
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import DEFAULT_MAX_TOTAL_BYTES
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import RestoreError
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import validate
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2 import Ec2RuntimeError
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2_restore import checked_target
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2_restore import run_user_command
from ansible_collections.drguard.sandbox.plugins.module_utils._runtime_ec2_restore import validate_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import validate_inside

ARGUMENT_SPEC = dict(
    restored=dict(type="list", elements="dict", required=True),
    min_rows=dict(type="int", default=1),
    max_members=dict(type="int", default=DEFAULT_MAX_MEMBERS),
    max_total_bytes=dict(type="int", default=DEFAULT_MAX_TOTAL_BYTES),
    max_ratio=dict(type="int", default=DEFAULT_MAX_RATIO),
    keep_extracted=dict(type="bool", default=False),
    namespace=dict(type="str"),
    backend=dict(type="str", default="controller", choices=["controller", "ec2"]),
    drill_id=dict(type="str"),
    command=dict(type="list", elements="str"),
    script=dict(type="path"),
    command_timeout=dict(type="int", default=900),
)


def run_ec2(module, caps):
    """Validators (or O(command)) on the validation instance: ``(result dict, failed message or None)``."""
    p = module.params
    drill_id = checked_target(p["drill_id"], p["command_timeout"])
    if p["namespace"] or p["keep_extracted"]:
        raise RestoreError("namespace and keep_extracted do not apply with backend ec2; drop them")
    if p["script"] and p["command"] is None:
        raise RestoreError("script is handed in for command only; pass the command that runs it")
    clients = {s: aws_client(module, s) for s in ("ec2", "ssm")}
    if p["command"] is not None:
        if module.check_mode:
            return {"changed": False, "rc": None, "stdout": ""}, None
        out = run_user_command(clients, drill_id, p["command"], script_path=p["script"],
                               timeout=p["command_timeout"])
        failed = ("the validation command exited %d on %s" % (out["rc"], out["inside"])) if out["rc"] else None
        return {"changed": True, "rc": out["rc"], "stdout": out["stdout"], "inside": out["inside"]}, failed
    outcome, inside = validate_ec2(clients, drill_id, p["restored"], p["min_rows"], caps,
                                   extract=not module.check_mode, timeout=p["command_timeout"])
    where = {"inside": inside} if inside else {}
    return (dict(changed=False, valid=outcome.valid, results=outcome.results, **where),
            None if outcome.valid else outcome.message)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    caps = Caps(max_members=p["max_members"], max_total_bytes=p["max_total_bytes"], max_ratio=p["max_ratio"])
    inside = p["namespace"]
    if p["backend"] == "ec2":
        try:
            result, failed = run_ec2(module, caps)
        except RestoreError as exc:
            module.fail_json(msg=str(exc))
        except Ec2RuntimeError as exc:
            module.fail_json(msg=exc.msg)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            module.fail_json_aws(exc, msg="Validation on the ec2 runtime failed")
        if failed:
            module.fail_json(msg=failed, **result)
        module.exit_json(**result)
    try:
        if p["command"] is not None or p["script"]:
            raise RestoreError("command and script run only with backend ec2; on the controller or in a namespace "
                               "the drill runs the validation command with secret_exec")
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
