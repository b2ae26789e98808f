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
    description: Parallel downloads.
    type: int
    default: 4
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - drguard maintainers
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
"""

RETURN = r"""
restored:
  description: One entry per artifact written.
  returned: success
  type: list
  elements: dict
  sample: [{name: orders.sqlite, path: /drill-runs/dr-1/restore/orders.sqlite, sha256: "9f8...", size: 20480}]
bytes_restored:
  description: Bytes written.
  returned: success
  type: int
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

try:
    import botocore
except ImportError:
    pass  # handled by AnsibleAWSModule

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import hide_session_credentials
from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_chunks
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir

ARGUMENT_SPEC = dict(
    artifacts=dict(type="list", elements="dict", required=True),
    dest=dict(type="path", required=True),
    workers=dict(type="int", default=4),
)

class RestoreError(Exception):
    pass


def safe_relative(name: str) -> str:
    """The artifact name as a relative path that cannot leave the restore directory."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RestoreError("artifact name %r is unsafe" % (name,))
    return os.path.join(*parts)


def _chunks(s3, source, version_id, size):
    """Chunks of the artifact, at most one byte past the verified size (never a full endless read)."""
    if art.is_s3(source):
        loc = art.parse_s3(source, "source")
        try:
            _resp, chunks = art.s3_get_chunks(s3, loc.bucket, loc.key, version_id or loc.version_id, size)
        except botocore.exceptions.ClientError as exc:
            raise RestoreError("%s: %s" % (source, exc.response.get("Error", {}).get("Code") or exc)) from None
        yield from chunks
        return
    with open(source, "rb") as handle:
        yield from art.file_chunks(handle, size)


def restore_one(s3, entry, dest):
    name = entry.get("name")
    if not entry.get("verified"):
        raise RestoreError("artifact %r was not verified; refusing to restore it" % (name,))
    rel = safe_relative(name)
    want_sha, want_size = entry.get("sha256"), entry.get("size")
    source = entry.get("source")
    if not want_sha or want_size is None or not source:
        raise RestoreError("artifact %r lacks sha256, size or source" % (name,))
    target = os.path.join(dest, rel)
    ensure_private_dir(os.path.dirname(target), parents=True)
    want = int(want_size)

    def checked(chunks):
        digest, seen = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            seen += len(chunk)
            if seen > want:
                raise RestoreError("%s: longer than the verified %d bytes" % (name, want))
            yield chunk
        if seen != want or digest.hexdigest() != want_sha:
            raise RestoreError("%s: restored bytes differ from what was verified (size %d, sha256 %s)"
                               % (name, seen, digest.hexdigest()))

    # A raise inside checked() removes the temporary file: nothing unverified is left behind.
    written = atomic_write_chunks(target, checked(_chunks(s3, source, entry.get("version_id"), want)), 0o400)
    return {"name": name, "path": target, "sha256": want_sha, "size": written}


def main():
    module = AnsibleAWSModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    hide_session_credentials(module)
    p = module.params
    if p["workers"] < 1:
        module.fail_json(msg="workers must be at least 1")
    if not p["artifacts"]:
        module.fail_json(msg="artifacts is empty: nothing was verified, so nothing can be restored")
    try:
        if module.check_mode:
            check_private_dir(p["dest"])
            module.exit_json(changed=True, restored=[], bytes_restored=0)
        ensure_private_dir(p["dest"], parents=True)
    except OSError as exc:
        module.fail_json(msg="Cannot use the restore directory: %s" % exc)
    need_s3 = any(str(a.get("source", "")).startswith("s3://") for a in p["artifacts"])
    s3 = module.client("s3", retry_decorator=AWSRetry.jittered_backoff()) if need_s3 else None
    try:
        with ThreadPoolExecutor(max_workers=p["workers"]) as pool:
            restored = list(pool.map(lambda e: restore_one(s3, e, p["dest"]), p["artifacts"]))
    except (RestoreError, art.SourceError, OSError) as exc:
        module.fail_json(msg="Restore failed: %s" % exc)
    except botocore.exceptions.BotoCoreError as exc:
        module.fail_json_aws(exc, msg="Restore failed")
    module.exit_json(changed=True, restored=restored, bytes_restored=sum(r["size"] for r in restored))


if __name__ == "__main__":
    main()
