#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_secrets
short_description: Put a drill's synthetic and masked secrets into the drill's own store, or remove them
version_added: 0.1.0
description:
  - A drill never receives a production secret. Each entry of O(secrets) is either C(synthetic_db)
    (a random database user and password, stored as JSON C({"username", "password"})), C(synthetic_token)
    (a random 256-bit API token), or C(masked) - the production value, read by the control plane only,
    turned into a look-alike by HMAC-SHA256 under O(masking_key) - same known prefix (C(ghp_), C(AKIA),
    C(sk_live_), C(xoxb-), ...), length, character classes and separators, nothing else of the original.
    Masking is deterministic for a given key, so reruns are idempotent.
  - C(store=secretsmanager) - secrets C(drguard/<drill_id>/<name>), encrypted with a drill-specific KMS key
    the module creates (alias C(alias/drguard/<drill_id>), tagged; the key policy allows the account root
    to administer it and the reader role to C(kms:Decrypt) through Secrets Manager only); each secret has a
    resource policy allowing only O(reader_role_arn) to read it and denying C(GetSecretValue) to everyone
    else.
  - C(store=tmpfs) - a 0700 directory of 0600 files on a tmpfs (default C(/dev/shm/drguard-<drill_id>)).
    The module checks C(/proc/mounts) that it IS a tmpfs and fails closed otherwise; secrets never touch
    a disk.
  - Synthetic values are generated once and kept on reruns; a masked value is rewritten only when the
    production value or the key changed.
  - The result holds names, ARNs and paths, never a value.
  - C(state=absent) deletes the secrets without recovery window, schedules the KMS key's deletion (7 days,
    the minimum) and deletes its alias, or wipes and removes the tmpfs directory. Idempotent.
  - Names are only filters. The key behind the alias must carry the full drill tag set
    (C(drguard:managed=true), C(drguard:drill-id=<drill_id>), a valid C(drguard:expires-at)) before its
    policy is replaced or its deletion scheduled; otherwise the module fails and leaves key and alias alone.
    A secret is deleted only when its own tags carry C(drguard:drill-id=<drill_id>) and
    C(drguard:managed=true); other secrets under the prefix are left alone and listed in RV(skipped).
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
      - The drill's id.
    type: str
    required: true
  state:
    description:
      - Whether the drill's secrets should exist.
    type: str
    default: present
    choices: [present, absent]
  expires_at:
    description:
      - RFC 3339 UTC value of the C(drguard:expires-at) tag. Required with C(state=present).
    type: str
  store:
    description:
      - Where the secrets live.
    type: str
    default: secretsmanager
    choices: [secretsmanager, tmpfs]
  secrets:
    description:
      - The drill's secrets.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description:
          - Name inside the drill's store (letters, digits, C(.), C(_), C(-); at most 64 characters).
        type: str
        required: true
      kind:
        description:
          - How the value is made.
        type: str
        required: true
        choices: [synthetic_db, synthetic_token, masked]
      value:
        description:
          - For C(kind=masked) only - the production value to mask. Read by the control plane, never stored.
        type: str
  masking_key:
    description:
      - The control-plane key of the keyed one-way masking function (at least 16 characters). Required when
        a secret is C(masked).
    type: str
  reader_role_arn:
    description:
      - ARN of the drill role allowed to read the secrets. Required with C(store=secretsmanager) and
        C(state=present).
    type: str
  tmpfs_dir:
    description:
      - Directory of the tmpfs store. Default C(/dev/shm/drguard-<drill_id>).
    type: path
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Give the drill its secrets
  drguard.sandbox.drill_secrets:
    drill_id: "{{ drill_ctx.drill_id }}"
    expires_at: "{{ drill_ctx.expires_at }}"
    reader_role_arn: "{{ identity.role_arn }}"
    masking_key: "{{ drguard_masking_key }}"
    secrets:
      - {name: orders-db, kind: synthetic_db}
      - {name: payments-api, kind: synthetic_token}
      - {name: github-token, kind: masked, value: "{{ lookup('env', 'GITHUB_TOKEN') }}"}
  no_log: true

- name: Remove them
  drguard.sandbox.drill_secrets:
    drill_id: "{{ drill_ctx.drill_id }}"
    state: absent
"""

RETURN = r"""
store:
  description: The store used.
  returned: always
  type: str
secrets:
  description: One entry per secret - never its value.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Name in the drill's store.
      type: str
    kind:
      description: C(synthetic_db), C(synthetic_token) or C(masked) (present only).
      type: str
    secret_id:
      description: Secrets Manager name C(drguard/<drill_id>/<name>) (secretsmanager store).
      type: str
    arn:
      description: Secrets Manager ARN (secretsmanager store).
      type: str
    path:
      description: File path (tmpfs store).
      type: str
kms_key_arn:
  description: ARN of the drill's KMS key (secretsmanager store).
  returned: store=secretsmanager
  type: str
kms_alias:
  description: Alias of the drill's KMS key.
  returned: store=secretsmanager
  type: str
tmpfs_dir:
  description: The tmpfs store directory.
  returned: store=tmpfs
  type: str
skipped:
  description: Secrets under the drill's prefix that are not tagged for this drill, left alone (state=absent).
  returned: store=secretsmanager and state=absent
  type: list
  elements: dict
  contains:
    secret_id:
      description: Secrets Manager name.
      type: str
    arn:
      description: Secrets Manager ARN.
      type: str
    reason:
      description: Why it was left alone.
      type: str
actions:
  description: What was done (or would be done in check mode).
  returned: always
  type: list
  elements: str
"""

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import aws_client
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import SecretError
from ansible_collections.drguard.sandbox.plugins.module_utils._secrets import Secrets

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    expires_at=dict(type="str"),
    store=dict(type="str", default="secretsmanager", choices=["secretsmanager", "tmpfs"]),
    secrets=dict(type="list", elements="dict", default=[], no_log=False, options=dict(  # value is no_log
        name=dict(type="str", required=True),
        kind=dict(type="str", required=True, choices=["synthetic_db", "synthetic_token", "masked"]),
        value=dict(type="str", no_log=True),
    )),
    masking_key=dict(type="str", no_log=True),
    reader_role_arn=dict(type="str"),
    tmpfs_dir=dict(type="path"),
)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    store = Secrets(module.params, lambda service: aws_client(module, service), region=module.region,
                    check_mode=module.check_mode, hide=module.no_log_values.add, warn=module.warn)
    try:
        result = store.run()
    except SecretError as exc:
        if exc.exception is not None:
            module.fail_json_aws(exc.exception, msg=exc.message, **exc.kwargs)
        module.fail_json(msg=exc.message, **exc.kwargs)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="Cannot manage the secrets of drill %s" % module.params["drill_id"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
