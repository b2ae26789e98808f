#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: quarantine_artifact
short_description: Preserve every artifact that failed verification, under legal hold, and alert
version_added: 0.1.0
description:
  - Takes the C(failures) list of M(drguard.sandbox.verify_artifacts) as-is and quarantines
    every entry in one call, in parallel.
  - "S3 sources: the exact failing object version (pinned by C(version_id) or the source's
    C(?versionId=)) is copied server-side to C(<quarantine prefix><drill_id>/<encoded name>)
    with an Object Lock legal hold ON; the copy and the source version are tagged
    C(drguard:drill-id), C(drguard:quarantine-reason), C(drguard:observed-sha256) and
    C(drguard:quarantined-at) (existing tags of the source version are kept). The original
    is never deleted or overwritten."
  - "Local sources: the file is moved into the 0700 directory C(<quarantine>/<drill_id>/)
    and made read-only (0400). When the original cannot be removed (it sits on the drill's
    read-only backup mount) it is copied and the original is left in place; the record
    says so."
  - A JSON quarantine record (one per failure, C(<encoded name>@<reason>.json)) is written
    beside the copy (S3 with legal hold ON; local files 0600), and one CloudEvent
    C(drguard.artifact.quarantined) per failure goes to the alert sink. A source that does
    not exist (for example C(artifact_missing)) gets a record and an alert but no copy.
  - Names are untrusted. They are never used raw in a key or path; the quarantine leaf is
    the name percent-encoded (every byte outside C([A-Za-z0-9_.~-]) and a leading dot
    encoded, long names shortened with a SHA-256 suffix), so nothing can leave the
    quarantine location. Manifest-level failures (C(name) null) use the leaf C(@manifest).
  - An C(unsafe_name) failure's source is the manifest that lists the name, so its copy is
    the manifest's copy (leaf C(@manifest)); its record still uses the name's encoded leaf.
  - A local source path that is not absolute and normalized, that has a symlink among its
    parent directories, or that is not a regular file (symlink, directory, device), is
    recorded and alerted but never moved or followed.
  - Idempotent. A failure whose record already exists is not quarantined or alerted again
    (C(changed=false)); missing tags or a missing legal hold are restored.
  - S3 copies use a multipart copy (UploadPartCopy), which also covers objects above the
    5 GiB CopyObject limit; the quarantine bucket must have Object Lock enabled and must
    not be a source bucket.
  - In check mode nothing is written and no alert is emitted; the records returned
    describe what would be done.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  failures:
    description:
      - Failure entries from M(drguard.sandbox.verify_artifacts), each
        C({name, reason, detail, source, version_id, observed_sha256, observed_size}).
      - C(name) is null for manifest-level failures; C(source) is then the manifest's location.
      - C(reason) must be one of the failure reason codes of C(docs/manifest.md).
      - C(source) is C(s3://bucket/key) with an optional C(?versionId=...) suffix, or an
        absolute local path.
    type: list
    elements: dict
    required: true
  drill_id:
    description: The drill's id.
    type: str
    required: true
  quarantine:
    description:
      - Where failing artifacts are preserved. C(s3://bucket/prefix/) (an Object Lock
        bucket outside the sandbox) or an absolute local directory.
      - A local directory and the drill's directory inside it are created with mode 0700 (missing parents too);
        an existing one must be a real directory (a symlink is refused, never followed) owned by the user running
        the drill, and group and other permission bits on it are removed.
    type: str
    required: true
  workers:
    description: Failures quarantined in parallel.
    type: int
    default: 8
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
  - drguard.sandbox.alert_sink
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Quarantine every artifact that failed verification (controller credentials)
  drguard.sandbox.quarantine_artifact:
    failures: "{{ verify.failures }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    quarantine: s3://org-dr-quarantine/drills/
    alert_sink:
      path: "{{ drill_ctx.output_dir }}/alerts.jsonl"
  register: quarantined

- name: Quarantine local artifacts into a private directory
  drguard.sandbox.quarantine_artifact:
    failures: "{{ verify.failures }}"
    drill_id: "{{ drill_ctx.drill_id }}"
    quarantine: /srv/dr-quarantine
    alert_sink:
      path: "{{ drill_ctx.output_dir }}/alerts.jsonl"
      sns_topic_arn: "{{ drill_alert_topic_arn }}"
"""

RETURN = r"""
records:
  description:
    - One quarantine record per failure, in the order of O(failures). In check mode,
      what would be recorded.
  returned: always
  type: list
  elements: dict
  contains:
    drill_id:
      description: The drill's id.
      type: str
    name:
      description: The artifact name as given (null for manifest-level failures).
      type: str
    reason:
      description: The failure reason (C(docs/manifest.md)).
      type: str
    source:
      description: The failing object's location as given.
      type: str
    version_id:
      description: The exact S3 version quarantined (null for local sources).
      type: str
    quarantine_location:
      description: Where the copy is (C(s3://bucket/key?versionId=...) or a local path); null when nothing was copied.
      type: str
    record_location:
      description: Where this record is stored.
      type: str
    copied:
      description: Whether a copy of the failing object exists in quarantine.
      type: bool
    original:
      description:
        - C(preserved) (S3, tagged), C(moved) (local), C(kept) (local, could not be removed),
          C(missing) or C(untouched).
      type: str
    legal_hold:
      description: C(ON) for S3 copies.
      type: str
    alert_id:
      description: Id of the CloudEvent emitted for this failure.
      type: str
    action:
      description: C(quarantined), C(unchanged) or, in check mode, C(would_quarantine).
      type: str
  sample:
    - drill_id: dr-20261129050000-a1b2c3
      name: orders.sqlite
      reason: digest_mismatch
      source: s3://backups/orders/orders.sqlite?versionId=3HL4kqtJlcpXroDTDmJ
      version_id: 3HL4kqtJlcpXroDTDmJ
      quarantine_location: s3://dr-quarantine/drills/dr-20261129050000-a1b2c3/orders.sqlite?versionId=Ue8
      record_location: s3://dr-quarantine/drills/dr-20261129050000-a1b2c3/orders.sqlite@digest_mismatch.json
      copied: true
      original: preserved
      legal_hold: "ON"
      action: quarantined
alerts:
  description: Ids of the CloudEvents emitted by this run (empty in check mode and when nothing changed).
  returned: always
  type: list
  elements: str
errors:
  description: Failures that could not be quarantined (the task then fails).
  returned: failure
  type: list
  elements: dict
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import Quarantine
from ansible_collections.drguard.sandbox.plugins.module_utils._quarantine import QuarantineError
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import ALERT_SINK_SPEC

ARGUMENT_SPEC = dict(
    failures=dict(type="list", elements="dict", required=True),
    drill_id=dict(type="str", required=True),
    quarantine=dict(type="str", required=True),
    alert_sink=ALERT_SINK_SPEC,
    workers=dict(type="int", default=8),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        job = Quarantine(failures=p["failures"], drill_id=p["drill_id"], quarantine=p["quarantine"],
                         alert_sink=p["alert_sink"], workers=p["workers"], check_mode=module.check_mode,
                         client=lambda service: aws_client(module, service))
        job.check()
    except QuarantineError as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Could not check the quarantine location or the alert sink")
    outcome = job.run()
    if outcome.errors:
        module.fail_json(msg=outcome.message, changed=outcome.changed, records=outcome.records,
                         alerts=outcome.alerts, errors=outcome.errors)
    module.exit_json(changed=outcome.changed, records=outcome.records, alerts=outcome.alerts)


if __name__ == "__main__":
    main()
