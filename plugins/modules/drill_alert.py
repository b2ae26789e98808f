#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_alert
short_description: Emit one structured drill alert (CloudEvents 1.0) to the drill's own sink
version_added: 0.1.0
description:
  - Builds one CloudEvents 1.0 event (C(specversion), C(id) (uuid4), C(source)
    C(drguard.sandbox/<drill_id>), C(type), C(time) (RFC 3339 UTC), C(subject),
    C(datacontenttype) C(application/json), payload under C(data)) and appends it as one
    line to the drill's C(alerts.jsonl) (O_APPEND, fsync, mode 0600).
  - When O(alert_sink) names an SNS topic, an EventBridge bus or a CloudWatch Logs group,
    the event is delivered there too, but only after the destination is shown to carry the
    tag C(drguard:drill-id) = O(drill_id); anything else (a production pipeline) is refused
    before anything is written.
  - Alerts never carry secrets. O(data) whose keys look like secret names (password,
    secret, token, private_key, credential, api_key, access_key, ...) or whose values look
    like private keys or AWS access key ids is refused, naming the offending key only.
  - Used by the drill playbook for boundary violations, halts and other drill events;
    M(drguard.sandbox.quarantine_artifact) emits C(drguard.artifact.quarantined) itself.
  - In check mode nothing is written or sent; the event that would be emitted is returned.
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
  type:
    description:
      - The event type; must start with C(drguard.) followed by lowercase dotted words,
        for example C(drguard.boundary.violated) or C(drguard.drill.halted).
    type: str
    required: true
  subject:
    description: What the event is about (a VPC id, an artifact name, a phase).
    type: str
  data:
    description: The event payload (JSON-serializable mapping, no secrets).
    type: dict
    default: {}
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
- name: Alert that the sandbox is not isolated
  drguard.sandbox.drill_alert:
    drill_id: "{{ drill_ctx.drill_id }}"
    type: drguard.boundary.violated
    subject: "{{ sandbox_network.vpc_id }}"
    data:
      findings: "{{ drill_boundary_result.findings }}"
    alert_sink:
      path: "{{ drill_ctx.output_dir }}/alerts.jsonl"
"""

RETURN = r"""
event:
  description: The CloudEvent emitted (in check mode, the one that would be).
  returned: success
  type: dict
  sample:
    specversion: "1.0"
    id: 0b3f8f0e-6f0a-4c8e-9a63-1f0f6f5d2c11
    source: drguard.sandbox/dr-20261129050000-a1b2c3
    type: drguard.boundary.violated
    time: "2026-11-29T05:00:00.123Z"
    subject: vpc-0123456789abcdef0
    datacontenttype: application/json
    drillid: dr-20261129050000-a1b2c3
    data: {findings: []}
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertError
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import ALERT_SINK_SPEC
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import AlertSink
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import build_event
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import needs_aws

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    type=dict(type="str", required=True),
    subject=dict(type="str"),
    data=dict(type="dict", default={}),
    alert_sink=ALERT_SINK_SPEC,
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    event = None
    try:
        sink_opts = {k: v for k, v in (p["alert_sink"] or {}).items() if v is not None}
        sink = AlertSink(p["drill_id"], sink_opts, client=lambda service: aws_client(module, service))
        # Validate the event (type, secrets, JSON) before touching any sink.
        preview = build_event(p["drill_id"], p["type"], p["subject"], p["data"] or {})
        if needs_aws(sink.sink):
            sink.verify_destinations()
        if not module.check_mode:
            event = sink.emit(p["type"], p["subject"], p["data"] or {}, event_id=preview["id"])
    except AlertError as exc:
        # The refused payload may hold the very secret it was refused for; keep it out of
        # the task result's echoed invocation.
        module.params["data"] = "(not shown: the alert was refused)"
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        module.fail_json_aws(exc, msg="Could not deliver the drill alert")
    module.exit_json(changed=True, event=event or preview)


if __name__ == "__main__":
    main()
