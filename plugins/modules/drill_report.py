#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_report
short_description: Write the drill report (drill-report.json and a human-readable drill-report.md)
version_added: 0.1.0
description:
  - Assembles the report of one drill from what its phases returned (docs/report.md)
    and writes C(drill-report.json) and C(drill-report.md) atomically into the drill's
    output directory. Every run writes one, also a failed or halted one.
  - Decides the drill's outcome from what it is given, in this order - V(halted) when O(halted) (a safety gate
    stopped the drill on purpose), V(failed) when a phase failed (O(failed_phase), O(error)), V(failed) when the
    teardown reported an error (O(teardown_error)) or did not prove that zero resources remain (also when it never
    ran), V(failed) when an RTO or RPO target was missed, otherwise V(passed).
  - RTO measured is the time from the drill's start to the validated restore; RPO
    measured is the time from the backup set's C(created_at) to the drill's start.
  - With O(copy_to), the report, its rendering, C(alerts.jsonl), C(state.json) and C(runtime/state.json) are also
    copied to a durable location the user names, so they survive a job whose working directory is thrown away
    (an AWX execution environment container). When the copy fails, a drill that would have passed is V(failed) with
    failed phase C(report); an earlier verdict keeps its reason. The copy's error is in the report's C(durable).
  - Makes no AWS call unless O(copy_to) is an S3 location. Inputs are results of other modules, which never carry
    secrets.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  output_dir:
    description:
      - The drill's output directory. Created with mode 0700 (and any missing parent) when missing; an existing one
        must be a real directory (a symlink is refused) owned by the user running the drill.
      - Both report files are written with mode 0600.
    type: path
    required: true
  drill_id:
    description: The drill's id.
    type: str
    required: true
  started_at:
    description: RFC 3339 UTC start of the drill.
    type: str
    required: true
  started_epoch:
    description: Start of the drill in seconds since the epoch.
    type: float
    required: true
  halted:
    description: A safety gate (boundary proof, backup verification) stopped the drill on purpose.
    type: bool
    default: false
  failed_phase:
    description: The phase that failed or halted the drill; absent when every phase passed.
    type: str
  error:
    description: The error message of the failed phase.
    type: str
  phases:
    description:
      - Phase marks in order, each C({name, started}) with C(started) in epoch seconds,
        optionally C(finished) and C(status).
    type: list
    elements: dict
    required: true
  boundary:
    description: The result of M(drguard.sandbox.boundary_verify).
    type: dict
  artifacts:
    description: The result of M(drguard.sandbox.verify_artifacts).
    type: dict
  quarantine:
    description: Quarantine records returned by M(drguard.sandbox.quarantine_artifact).
    type: list
    elements: dict
    default: []
  targets:
    description: RTO/RPO targets, C({rto_seconds, rpo_seconds}).
    type: dict
    default: {}
  recovered_epoch:
    description: When the restore was validated (epoch seconds); absent when it never was.
    type: float
  backup_created_at:
    description: The backup set's C(created_at) (RFC 3339), for the RPO.
    type: str
  teardown_started:
    description:
      - When the teardown started (epoch seconds). The report's phases end with C(teardown), V(failed) when
        O(teardown_error) is set or the teardown did not prove that zero resources remain.
    type: float
  teardown:
    description:
      - Teardown summary, C({deleted, remaining, remaining_resources}) (the teardown role's C(teardown__output)).
    type: dict
  teardown_error:
    description: The teardown's error message, when it failed.
    type: str
  runtime:
    description:
      - The result of M(drguard.sandbox.sandbox_runtime) (backend, units, rules). Absent when the runtime never
        started; with backend V(none) the report says that nothing ran inside the boundary.
    type: dict
  runtime_verify:
    description: The result of M(drguard.sandbox.runtime_verify) (isolated, findings).
    type: dict
  probes:
    description: The result of M(drguard.sandbox.runtime_probe) (rows, counters, violations).
    type: dict
  mtls:
    description:
      - The result of M(drguard.sandbox.runtime_mtls) (CA, handshakes, probe rows, rotations); the report's
        C(mtls) section. Absent when the phase did not run.
      - Its key C(service_handshakes), when given, holds the tier services' own handshakes (the C(handshakes) of
        M(drguard.sandbox.runtime_service)), counted apart in C(service_counts).
    type: dict
  telemetry_path:
    description:
      - The drill's telemetry collector file (C(<output_dir>/telemetry.jsonl)); the report counts its events by
        type, the events the collector rejected and any line it cannot have written (C(corrupt)). A missing or
        unreadable file is reported as the section's C(error).
    type: path
  extra:
    description: Further sections to include as they are (for example identity or validation summaries).
    type: dict
    default: {}
  copy_to:
    description:
      - A durable location for the drill's outputs, V(s3://bucket/prefix/) or an absolute directory outside
        O(output_dir); they go under C(<drill_id>/) there.
      - S3 - the bucket must have Object Lock enabled (checked before anything is written); every object carries a
        SHA-256 checksum, the C(drguard:drill-id) tag and a legal hold (read back to prove it), and the bucket's
        default retention, when it has one, applies. Needs s3:GetBucketObjectLockConfiguration, s3:PutObject,
        s3:PutObjectLegalHold and s3:PutObjectTagging.
      - A directory - created 0700 (a symlink is refused), files 0600, written atomically.
      - Unset or empty - no copy.
    type: str
notes:
  - The region (O(region)) is the drill's, recorded in the report; with an S3 O(copy_to) it is also where the bucket
    is reached.
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Write the drill report
  drguard.sandbox.drill_report:
    output_dir: "{{ drill_ctx.output_dir }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    started_at: "{{ drill_ctx.started_at }}"
    started_epoch: "{{ drill_ctx.started_epoch }}"
    halted: "{{ _drill_halted }}"
    failed_phase: "{{ _drill_failed_phase | default(omit) }}"
    error: "{{ _drill_error | default(omit) }}"
    phases: "{{ _drill_marks }}"
    targets: {rto_seconds: 3600, rpo_seconds: 86400}
    teardown_started: "{{ _drill_teardown_started }}"
    teardown: "{{ teardown__output | default(omit) }}"
    teardown_error: "{{ _drill_teardown_error | default(omit) }}"
  register: drill_report_result
"""

RETURN = r"""
report_path:
  description: Path of C(drill-report.json).
  returned: always
  type: str
summary_path:
  description: Path of the human-readable C(drill-report.md).
  returned: always
  type: str
report:
  description: The report as written.
  returned: always
  type: dict
headline:
  description:
    - Headline figures for C(set_stats) (AWX). C(report_location) is the durable copy of C(drill-report.json), null
      without O(copy_to) or when the copy failed.
  returned: always
  type: dict
  sample: {drill_id: dr-20261129044000-a1b2c3, outcome: passed, rto_seconds: 41.2, teardown_remaining: 0,
           report_location: "s3://drill-reports/drills/dr-20261129044000-a1b2c3/drill-report.json"}
durable:
  description: The durable copy - C(location), and C(files) (each C(name), C(location), C(sha256), C(size),
    C(version_id)).
  returned: when O(copy_to) is set and the copy succeeded
  type: dict
"""

import os
import time

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client

from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._telemetry import TelemetryError
from ansible_collections.drguard.sandbox.plugins.module_utils._telemetry import summarise
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_json
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import format_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow
from ansible_collections.drguard.sandbox.plugins.module_utils.report import build_phases
from ansible_collections.drguard.sandbox.plugins.module_utils.report import copy_outputs
from ansible_collections.drguard.sandbox.plugins.module_utils.report import durable_location
from ansible_collections.drguard.sandbox.plugins.module_utils.report import DurableCopyError
from ansible_collections.drguard.sandbox.plugins.module_utils.report import fail_for_copy
from ansible_collections.drguard.sandbox.plugins.module_utils.report import decide_outcome
from ansible_collections.drguard.sandbox.plugins.module_utils.report import measure
from ansible_collections.drguard.sandbox.plugins.module_utils.report import overhead
from ansible_collections.drguard.sandbox.plugins.module_utils.report import render_markdown
from ansible_collections.drguard.sandbox.plugins.module_utils.report import mtls_section
from ansible_collections.drguard.sandbox.plugins.module_utils.report import runtime_section

ARGUMENT_SPEC = dict(
    output_dir=dict(type="path", required=True),
    drill_id=dict(type="str", required=True),
    started_at=dict(type="str", required=True),
    started_epoch=dict(type="float", required=True),
    halted=dict(type="bool", default=False),
    failed_phase=dict(type="str"),
    error=dict(type="str"),
    phases=dict(type="list", elements="dict", required=True),
    boundary=dict(type="dict"),
    artifacts=dict(type="dict"),
    quarantine=dict(type="list", elements="dict", default=[]),
    targets=dict(type="dict", default={}),
    recovered_epoch=dict(type="float"),
    backup_created_at=dict(type="str"),
    teardown_started=dict(type="float"),
    teardown=dict(type="dict"),
    teardown_error=dict(type="str"),
    runtime=dict(type="dict"),
    runtime_verify=dict(type="dict"),
    probes=dict(type="dict"),
    mtls=dict(type="dict"),
    telemetry_path=dict(type="path"),
    extra=dict(type="dict", default={}),
    copy_to=dict(type="str"),
)

_BOUNDARY_KEYS = ("isolated", "vpc_id", "vpc_cidrs", "findings", "checked")
_ARTIFACT_KEYS = ("verified", "failures", "artifacts", "manifest", "bytes_hashed", "trusted_state_updated")


def _telemetry_summary(path):
    if not path:
        return None
    try:
        return summarise(path)
    except TelemetryError as exc:
        return {"events": None, "error": str(exc)}


def _pick(result, keys):
    if not result:
        return None
    return {k: result.get(k) for k in keys if k in result}


def main():
    # AnsibleAWSModule for the S3 copy; its common ``region`` option is the drill's region.
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    finished = time.time()
    teardown = p["teardown"]
    backup_created_epoch = None
    if p["backup_created_at"]:
        try:
            backup_created_epoch = parse_time(p["backup_created_at"]).timestamp()
        except DrillError as exc:
            module.fail_json(msg="backup_created_at: %s" % exc)

    recovery = measure(p["targets"], p["started_epoch"], p["recovered_epoch"], backup_created_epoch)
    outcome, failed_phase, error = decide_outcome(
        halted=p["halted"], failed_phase=p["failed_phase"], error=p["error"], teardown=teardown,
        teardown_error=p["teardown_error"], recovery=recovery)
    marks = list(p["phases"])
    if p["teardown_started"] is not None:
        torn_down = not p["teardown_error"] and teardown is not None and teardown.get("remaining") == 0
        marks.append({"name": "teardown", "started": p["teardown_started"],
                      "status": "passed" if torn_down else "failed"})
    phases = build_phases(marks, finished, failed_phase)

    report = {
        "report_version": 1,
        "drill_id": p["drill_id"],
        "region": p["region"],
        "started_at": p["started_at"],
        "finished_at": format_time(utcnow()),
        "seconds": round(finished - p["started_epoch"], 3),
        "outcome": outcome,
        "failed_phase": failed_phase,
        "error": error,
        "phases": phases,
        "boundary": _pick(p["boundary"], _BOUNDARY_KEYS),
        "artifacts": _pick(p["artifacts"], _ARTIFACT_KEYS),
        "quarantine": p["quarantine"],
        "recovery": recovery,
        "runtime": runtime_section(p["runtime"], p["probes"], p["runtime_verify"]),
        "mtls": mtls_section(p["mtls"]),
        "telemetry": _telemetry_summary(p["telemetry_path"]),
        "overhead": overhead(phases),
        "teardown": teardown,
    }
    dest = None
    if p["copy_to"]:
        try:
            dest = durable_location(p["copy_to"], p["drill_id"], p["output_dir"])
            report["durable"] = {"location": dest["uri"], "error": None}
        except DurableCopyError as exc:
            report["durable"] = {"location": p["copy_to"], "error": None}
            fail_for_copy(report, str(exc))
    report.update({k: v for k, v in p["extra"].items() if k not in report})

    report_path = os.path.join(p["output_dir"], "drill-report.json")
    summary_path = os.path.join(p["output_dir"], "drill-report.md")

    def write():
        try:
            if module.check_mode:
                check_private_dir(p["output_dir"])
            else:
                ensure_private_dir(p["output_dir"], parents=True)
                atomic_write_json(report_path, report)
                atomic_write(summary_path, render_markdown(report).encode())
        except OSError as exc:
            module.fail_json(msg="Cannot write the drill report: %s" % exc)

    write()
    durable = None
    if dest is not None:
        try:
            files = copy_outputs(dest, p["output_dir"], p["drill_id"],
                                 client=lambda service: aws_client(module, service), check_mode=module.check_mode)
            durable = {"location": dest["uri"], "files": files}
        except DurableCopyError as exc:
            # The local report says why the copy failed, and the drill is not passed.
            fail_for_copy(report, str(exc))
            write()
    report_location = next((f["location"] for f in (durable or {}).get("files", [])
                            if f["name"] == "drill-report.json" and not module.check_mode), None)
    headline = {
        "drill_id": p["drill_id"],
        "outcome": report["outcome"],
        "failed_phase": report["failed_phase"],
        "seconds": report["seconds"],
        "rto_seconds": recovery["rto"]["measured_seconds"],
        "rpo_seconds": recovery["rpo"]["measured_seconds"],
        "artifacts_verified": (report["artifacts"] or {}).get("verified"),
        "boundary_isolated": (report["boundary"] or {}).get("isolated"),
        "runtime_backend": (report["runtime"] or {}).get("backend"),
        "probe_violations": (report["runtime"] or {}).get("violations"),
        "boundary_seconds": report["overhead"]["boundary_seconds"],
        "recovery_seconds": report["overhead"]["recovery_seconds"],
        "teardown_remaining": (teardown or {}).get("remaining"),
        "report_path": report_path,
        "report_location": report_location,
    }
    result = dict(changed=not module.check_mode, report_path=report_path, summary_path=summary_path,
                  report=report, headline=headline)
    if durable is not None:
        result["durable"] = durable
    module.exit_json(**result)


if __name__ == "__main__":
    main()
