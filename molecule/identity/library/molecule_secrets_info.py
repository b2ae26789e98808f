#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: molecule_secrets_info
short_description: Describe the Secrets Manager secrets under a name prefix, never their values (Molecule only)
description:
  - Test helper of the Molecule scenario C(identity) - an independent reader of what
    M(drguard.sandbox.drill_secrets) wrote. amazon.aws has no Secrets Manager info module, and its lookup
    returns values; this one returns metadata only (name, ARN, KMS key, tags, resource policy).
  - Lists with the C(name) filter, then keeps only names that really start with O(prefix).
options:
  prefix:
    description: Name prefix, e.g. C(drguard/<drill_id>/).
    type: str
    required: true
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers
"""

EXAMPLES = r"""
- name: Describe a drill's secrets
  molecule_secrets_info:
    prefix: drguard/dr-1/
  register: found
"""

RETURN = r"""
secrets:
  description: One entry per secret under the prefix, sorted by name; never a value.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Secret name.
      type: str
    arn:
      description: Secret ARN.
      type: str
    kms_key_id:
      description: The KMS key the secret is encrypted with, as Secrets Manager reports it (None = aws/secretsmanager).
      type: str
    tags:
      description: Tags as a dict.
      type: dict
    resource_policy:
      description: The secret's resource policy (parsed), or None.
      type: dict
"""

import json  # noqa: E402 - Ansible modules import after their documentation

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule  # noqa: E402
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry  # noqa: E402

ARGUMENT_SPEC = dict(prefix=dict(type="str", required=True))


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    prefix = module.params["prefix"]
    sm = module.client("secretsmanager", retry_decorator=AWSRetry.jittered_backoff())
    out = []
    try:
        paginator = sm.get_paginator("list_secrets")
        for page in paginator.paginate(Filters=[{"Key": "name", "Values": [prefix]}]):
            for item in page.get("SecretList", []):
                if not item["Name"].startswith(prefix):
                    continue
                described = sm.describe_secret(SecretId=item["ARN"])
                policy = sm.get_resource_policy(SecretId=item["ARN"]).get("ResourcePolicy")
                out.append(dict(
                    name=described["Name"], arn=described["ARN"], kms_key_id=described.get("KmsKeyId"),
                    tags={t["Key"]: t["Value"] for t in described.get("Tags", [])},
                    resource_policy=json.loads(policy) if policy else None,
                ))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        module.fail_json_aws(e, msg="Cannot describe the secrets under %s" % prefix)
    module.exit_json(changed=False, secrets=sorted(out, key=lambda s: s["name"]))


if __name__ == "__main__":
    main()
