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
  - drguard maintainers
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

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_json
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_EXPIRES_AT
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_MANAGED
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import tag_dict
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import tag_list
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    expires_at=dict(type="str"),
    store=dict(type="str", default="secretsmanager", choices=["secretsmanager", "tmpfs"]),
    secrets=dict(type="list", elements="dict", default=[], options=dict(
        name=dict(type="str", required=True),
        kind=dict(type="str", required=True, choices=["synthetic_db", "synthetic_token", "masked"]),
        value=dict(type="str", no_log=True),
    )),
    masking_key=dict(type="str", no_log=True),
    reader_role_arn=dict(type="str"),
    tmpfs_dir=dict(type="path"),
)

TAG_KIND = "drguard:secret-kind"
TAG_FINGERPRINT = "drguard:fingerprint"
META_FILE = ".drguard-meta.json"
KEY_DELETION_DAYS = 7
_ROLE_ARN_RE = re.compile(r"^arn:(aws[a-z-]*):iam::(\d{12}):role/[\w+=,.@/-]+$")


def secret_prefix(drill_id: str) -> str:
    return "drguard/%s/" % drill_id


def alias_name(drill_id: str) -> str:
    return "alias/drguard/%s" % drill_id


def default_tmpfs_dir(drill_id: str) -> str:
    return os.path.join(sec.TMPFS_ROOT, "drguard-%s" % drill_id)


def key_policy(partition: str, account: str, reader_role_arn: str, region: str) -> dict:
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "AccountAdministers", "Effect": "Allow",
         "Principal": {"AWS": "arn:%s:iam::%s:root" % (partition, account)},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "DrillReaderDecryptsViaSecretsManager", "Effect": "Allow",
         "Principal": {"AWS": reader_role_arn}, "Action": "kms:Decrypt", "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": "secretsmanager.%s.amazonaws.com" % region}}},
    ]}


def secret_policy(reader_role_arn: str) -> dict:
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "DrillReaderReads", "Effect": "Allow", "Principal": {"AWS": reader_role_arn},
         "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"], "Resource": "*"},
        {"Sid": "NobodyElseReads", "Effect": "Deny", "Principal": "*",
         "Action": "secretsmanager:GetSecretValue", "Resource": "*",
         "Condition": {"StringNotEquals": {"aws:PrincipalArn": reader_role_arn}}},
    ]}


def is_drill_owned(tags: dict, drill_id: str) -> bool:
    """True when ``tags`` carry the full drill tag set of ``drill_id`` (managed, id, a valid expiry)."""
    if tags.get(TAG_MANAGED) != "true" or tags.get(TAG_DRILL_ID) != drill_id:
        return False
    try:
        parse_time(tags.get(TAG_EXPIRES_AT) or "")
    except DrillError:
        return False
    return True


def _canon(doc) -> str:
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            return doc
    return json.dumps(doc, sort_keys=True)


class Secrets:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.drill_id = self.p["drill_id"]
        self.actions = []
        self.changed = False
        self.lock = threading.Lock()

    def act(self, line: str) -> bool:
        with self.lock:
            self.actions.append(line)
            self.changed = True
        return not self.module.check_mode

    def fail(self, msg: str, **kwargs):
        self.module.fail_json(msg=msg, actions=self.actions, **kwargs)

    # ------------------------------------------------------------ input
    def validated_entries(self) -> list:
        entries, seen = [], set()
        for item in self.p["secrets"]:
            name, kind, value = item["name"], item["kind"], item.get("value")
            if not sec.NAME_RE.match(name):
                self.fail("secret name %r is not valid: use 1-64 letters, digits, '.', '_' and '-', starting with "
                          "a letter or digit" % name)
            if name in seen:
                self.fail("secret name %r is given twice; names must be unique" % name)
            seen.add(name)
            if kind == "masked":
                if not value:
                    self.fail("secret %r is masked but has no value; pass the production value to mask" % name)
                try:
                    value = sec.mask(value, self.p["masking_key"] or "")
                except sec.SecretError as exc:
                    self.fail("secret %r cannot be masked: %s" % (name, exc))
                self.module.no_log_values.add(value)
            elif value is not None:
                self.fail("secret %r has a value but kind %s; only masked secrets take a value" % (name, kind))
            entries.append({"name": name, "kind": kind, "masked": value})
        return entries

    def new_value(self, entry) -> str:
        if entry["kind"] == "masked":
            return entry["masked"]
        value = sec.synthetic_db() if entry["kind"] == "synthetic_db" else sec.synthetic_token()
        self.module.no_log_values.add(value)
        return value

    def fingerprint(self, entry) -> str:
        return sec.fingerprint(entry["masked"], self.p["masking_key"]) if entry["kind"] == "masked" else "synthetic"

    # ------------------------------------------------------------ tmpfs
    def tmpfs_dir(self) -> str:
        directory = self.p["tmpfs_dir"] or default_tmpfs_dir(self.drill_id)
        return os.path.abspath(directory)

    def tmpfs_present(self, entries, tags):
        directory = self.tmpfs_dir()
        try:
            sec.require_tmpfs(directory)
            exists = os.path.lexists(directory)
            if not exists and self.act("create tmpfs store %s" % directory):
                sec.ensure_private_dir(directory)
            elif exists:
                sec.ensure_private_dir(directory, create=False)
            meta = os.path.join(directory, META_FILE)
            if not os.path.exists(meta) and self.act("write %s" % META_FILE):
                atomic_write_json(meta, {"drill_id": self.drill_id, "expires_at": tags["drguard:expires-at"],
                                         "managed": True})
            results = []
            for entry in entries:
                path = os.path.join(directory, entry["name"])
                current = sec.read_secret_file(directory, entry["name"]) if os.path.lexists(path) else None
                if current is None:
                    if self.act("write %s" % path):
                        sec.write_secret_file(directory, entry["name"], self.new_value(entry))
                elif entry["kind"] == "masked" and current != entry["masked"]:
                    if self.act("rewrite masked %s" % path):
                        sec.write_secret_file(directory, entry["name"], entry["masked"])
                elif entry["kind"] != "masked":
                    self.module.no_log_values.add(current)
                results.append({"name": entry["name"], "kind": entry["kind"], "path": path})
        except (sec.SecretError, OSError) as exc:
            self.fail("tmpfs store %s: %s" % (directory, exc))
        self.module.exit_json(changed=self.changed, store="tmpfs", tmpfs_dir=directory, secrets=results,
                              actions=self.actions)

    def tmpfs_absent(self):
        directory = self.tmpfs_dir()
        names = []
        if os.path.isdir(directory) and not os.path.islink(directory):
            names = sorted(n for n in os.listdir(directory) if n != META_FILE and not n.startswith("."))
        if os.path.lexists(directory) and self.act("wipe and remove %s" % directory):
            try:
                sec.wipe_dir(directory)
            except (sec.SecretError, OSError) as exc:
                self.fail("cannot remove tmpfs store %s: %s" % (directory, exc))
        self.module.exit_json(changed=self.changed, store="tmpfs", tmpfs_dir=directory, actions=self.actions,
                              secrets=[{"name": n, "path": os.path.join(directory, n)} for n in names])

    # ------------------------------------------------------------ Secrets Manager
    def clients(self):
        retry = AWSRetry.jittered_backoff()
        return (self.module.client("secretsmanager", retry_decorator=retry),
                self.module.client("kms", retry_decorator=retry))

    def find_key(self, kms):
        """The key behind the drill's alias, or None; fails unless that key carries this drill's tags.

        The alias is only a name: whoever can create aliases could point it at any key, so
        the key's own tags decide whether this module may change its policy or delete it.
        """
        try:
            key = kms.describe_key(KeyId=alias_name(self.drill_id), aws_retry=True)["KeyMetadata"]
        except is_boto3_error_code("NotFoundException"):
            return None
        tags = {}
        marker = None
        while True:
            kwargs = {"KeyId": key["KeyId"], "aws_retry": True}
            if marker:
                kwargs["Marker"] = marker
            page = kms.list_resource_tags(**kwargs)
            tags.update(tag_dict(page.get("Tags"), "TagKey", "TagValue"))
            marker = page.get("NextMarker") if page.get("Truncated") else None
            if not marker:
                break
        if not is_drill_owned(tags, self.drill_id):
            self.fail("KMS key %s behind %s is not tagged as this drill's key (%s=true, %s=%s, a valid %s); "
                      "refusing to change or delete it - point the alias back at the drill's key or use a new "
                      "drill id" % (key["Arn"], alias_name(self.drill_id), TAG_MANAGED, TAG_DRILL_ID, self.drill_id,
                                    TAG_EXPIRES_AT), kms_key_arn=key["Arn"], kms_alias=alias_name(self.drill_id))
        return key

    def ensure_key(self, kms, tags, policy):
        key = self.find_key(kms)
        if key is not None:
            if key.get("KeyState") == "PendingDeletion":
                self.fail("the drill's KMS key %s is pending deletion; use a new drill id" % key["Arn"])
            current = kms.get_key_policy(aws_retry=True, KeyId=key["KeyId"], PolicyName="default")["Policy"]
            if _canon(current) != _canon(policy) and self.act("update key policy of %s" % key["Arn"]):
                kms.put_key_policy(aws_retry=True, KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
            return key["Arn"]
        if not self.act("create KMS key %s" % alias_name(self.drill_id)):
            return None
        deadline = time.monotonic() + 45
        while True:
            try:
                key = kms.create_key(aws_retry=True,
                    Description="drguard drill %s: secrets" % self.drill_id, KeyUsage="ENCRYPT_DECRYPT",
                    KeySpec="SYMMETRIC_DEFAULT", Policy=json.dumps(policy),
                    Tags=tag_list(tags, "TagKey", "TagValue"))["KeyMetadata"]
                break
            except is_boto3_error_code("MalformedPolicyDocumentException") as e:
                # A role created a moment ago may not be a valid principal yet.
                if time.monotonic() > deadline:
                    self.module.fail_json_aws(e, msg="KMS rejects the key policy for reader role %s"
                                                     % self.p["reader_role_arn"])
                time.sleep(3)
        kms.create_alias(aws_retry=True, AliasName=alias_name(self.drill_id), TargetKeyId=key["KeyId"])
        return key["Arn"]

    def ensure_secret(self, sm, entry, key_arn, tags, policy):
        secret_id = secret_prefix(self.drill_id) + entry["name"]
        want_tags = dict(tags, **{TAG_KIND: entry["kind"], TAG_FINGERPRINT: self.fingerprint(entry)})
        try:
            current = sm.describe_secret(aws_retry=True, SecretId=secret_id)
        except is_boto3_error_code("ResourceNotFoundException"):
            current = None
        arn = current["ARN"] if current else None
        if current is None:
            if self.act("create secret %s" % secret_id):
                kwargs = dict(Name=secret_id, SecretString=self.new_value(entry), Tags=tag_list(want_tags),
                              Description="drguard drill %s: %s" % (self.drill_id, entry["kind"]))
                if key_arn:
                    kwargs["KmsKeyId"] = key_arn
                arn = sm.create_secret(aws_retry=True, **kwargs)["ARN"]
        else:
            if current.get("DeletedDate"):
                raise sec.SecretError("secret %s is scheduled for deletion; remove it first (state=absent)"
                                      % secret_id)
            have = tag_dict(current.get("Tags"))
            if have.get(TAG_DRILL_ID) != self.drill_id or have.get(TAG_MANAGED) != "true":
                raise sec.SecretError("secret %s exists but is not tagged for this drill (%s=true, %s=%s); "
                                      "refusing to touch it - remove it or use a new drill id"
                                      % (secret_id, TAG_MANAGED, TAG_DRILL_ID, self.drill_id))
            if key_arn and current.get("KmsKeyId") not in (key_arn, key_arn.split("/")[-1], alias_name(
                    self.drill_id)) and self.act("re-encrypt %s with the drill key" % secret_id):
                sm.update_secret(aws_retry=True, SecretId=secret_id, KmsKeyId=key_arn)
            if (entry["kind"] == "masked" and have.get(TAG_FINGERPRINT) != want_tags[TAG_FINGERPRINT]
                    and self.act("rewrite masked secret %s" % secret_id)):
                sm.put_secret_value(aws_retry=True, SecretId=secret_id, SecretString=entry["masked"])
            stale = {k: v for k, v in want_tags.items() if have.get(k) != v}
            if stale and self.act("tag secret %s" % secret_id):
                sm.tag_resource(aws_retry=True, SecretId=secret_id, Tags=tag_list(stale))
        if arn:
            try:
                have_policy = sm.get_resource_policy(aws_retry=True, SecretId=secret_id).get("ResourcePolicy")
            except is_boto3_error_code("ResourceNotFoundException"):
                have_policy = None
            if (have_policy is None or _canon(have_policy) != _canon(policy)) and self.act(
                    "set resource policy of %s" % secret_id):
                sm.put_resource_policy(aws_retry=True, SecretId=secret_id, ResourcePolicy=json.dumps(policy),
                                       BlockPublicPolicy=True)
        elif not self.module.check_mode:
            raise sec.SecretError("secret %s has no ARN" % secret_id)
        return {"name": entry["name"], "kind": entry["kind"], "secret_id": secret_id, "arn": arn}

    def sm_present(self, entries, tags):
        reader = self.p["reader_role_arn"]
        match = _ROLE_ARN_RE.match(reader or "")
        if not match:
            self.fail("reader_role_arn %r is not an IAM role ARN; pass the drill role (mint_credentials' role_arn)"
                      % (reader,))
        partition, account = match.groups()
        region = self.module.region
        if not region:
            self.fail("no AWS region; set region or AWS_REGION")
        sm, kms = self.clients()
        try:
            key_arn = self.ensure_key(kms, tags, key_policy(partition, account, reader, region))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot set up the drill's KMS key %s" % alias_name(self.drill_id))
        policy = secret_policy(reader)
        try:
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(entries)))) as pool:
                results = list(pool.map(lambda e: self.ensure_secret(sm, e, key_arn, tags, policy), entries))
        except sec.SecretError as exc:
            self.fail(str(exc))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot store the drill's secrets")
        self.module.exit_json(changed=self.changed, store="secretsmanager", kms_key_arn=key_arn,
                              kms_alias=alias_name(self.drill_id), secrets=results, actions=self.actions)

    def sm_absent(self):
        sm, kms = self.clients()
        prefix = secret_prefix(self.drill_id)
        results, skipped = [], []
        key_arn = None
        try:
            paginator = sm.get_paginator("list_secrets")
            found = []
            for page in paginator.paginate(Filters=[{"Key": "name", "Values": [prefix]}]):
                found += [s for s in page.get("SecretList", []) if s["Name"].startswith(prefix)]
            for item in found:
                # The name is only a filter: the secret's own tags (read fresh) say whether it is ours.
                try:
                    described = sm.describe_secret(SecretId=item["ARN"], aws_retry=True)
                except is_boto3_error_code("ResourceNotFoundException"):
                    continue
                entry = {"name": item["Name"][len(prefix):], "secret_id": item["Name"], "arn": item["ARN"]}
                tags = tag_dict(described.get("Tags"))
                if tags.get(TAG_DRILL_ID) != self.drill_id or tags.get(TAG_MANAGED) != "true":
                    skipped.append(dict(entry, reason="not tagged for this drill"))
                    continue
                results.append(entry)
                if self.act("delete secret %s without recovery" % item["Name"]):
                    try:
                        sm.delete_secret(aws_retry=True, SecretId=item["ARN"], ForceDeleteWithoutRecovery=True)
                    except is_boto3_error_code("ResourceNotFoundException"):
                        pass
            key = self.find_key(kms)
            key_arn = key["Arn"] if key else None
            if key:
                if key.get("KeyState") != "PendingDeletion" and self.act(
                        "schedule deletion of KMS key %s in %d days" % (key["Arn"], KEY_DELETION_DAYS)):
                    kms.schedule_key_deletion(aws_retry=True, KeyId=key["KeyId"],
                                              PendingWindowInDays=KEY_DELETION_DAYS)
                if self.act("delete alias %s" % alias_name(self.drill_id)):
                    kms.delete_alias(aws_retry=True, AliasName=alias_name(self.drill_id))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            self.module.fail_json_aws(e, msg="Cannot remove the drill's secrets")
        if skipped:
            self.module.warn("%d secret(s) under %s are not tagged for this drill and were left alone: %s"
                             % (len(skipped), prefix, ", ".join(s["secret_id"] for s in skipped)))
        self.module.exit_json(changed=self.changed, store="secretsmanager", kms_key_arn=key_arn,
                              kms_alias=alias_name(self.drill_id), secrets=results, skipped=skipped,
                              actions=self.actions)


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    try:
        validate_drill_id(p["drill_id"])
    except DrillError as exc:
        module.fail_json(msg=str(exc))
    store = Secrets(module)
    if p["state"] == "absent":
        (store.tmpfs_absent if p["store"] == "tmpfs" else store.sm_absent)()
    if not p["expires_at"]:
        module.fail_json(msg="expires_at is required with state=present; pass the drill's expiry")
    try:
        tags = drill_tags(p["drill_id"], p["expires_at"])
    except DrillError as exc:
        module.fail_json(msg=str(exc))
    entries = store.validated_entries()
    (store.tmpfs_present if p["store"] == "tmpfs" else store.sm_present)(entries, tags)


if __name__ == "__main__":
    main()
