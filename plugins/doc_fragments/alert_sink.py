# Copyright: drguard maintainers
# Apache License 2.0
"""The O(alert_sink) option shared by drill_alert and quarantine_artifact."""

from __future__ import annotations


class ModuleDocFragment:
    # Matches module_utils.alerts.ALERT_SINK_SPEC (tools/check_docs.py compares them).
    DOCUMENTATION = r"""
options:
  alert_sink:
    description:
      - Where the drill's alerts go (CloudEvents, see C(docs/quarantine-and-alerts.md)).
      - Every event is appended to O(alert_sink.path); the AWS destinations are used in
        addition, and only when they carry the tag C(drguard:drill-id) = O(drill_id).
    type: dict
    required: true
    suboptions:
      path:
        description:
          - The drill's C(alerts.jsonl) (created 0600, missing directories above it 0700; one JSON object per line).
        type: path
        required: true
      sns_topic_arn:
        description: SNS topic of the drill (must carry the tag C(drguard:drill-id) = O(drill_id)).
        type: str
      event_bus_name:
        description: EventBridge bus of the drill (must carry the drill's tag).
        type: str
      log_group_name:
        description: CloudWatch Logs group of the drill (must carry the drill's tag).
        type: str
"""
