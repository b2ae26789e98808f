#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_reap
short_description: Remove the sandbox runtimes that expired or killed drills left on this host
version_added: 0.1.0
description:
  - The reaper's part for the C(netns) sandbox runtime (see C(docs/teardown.md), "Runtime leftovers"). Lists the
    network namespaces named C(drg-<6 hex>-<name>) (C(ip netns list)) and the rootless holders marked
    C(drg-<6 hex>-holder) on this host, and groups them by their prefix C(drg-<6 hex>-).
  - A prefix is removed only on proof found under O(output_root) - a drill directory C(<output_root>/<drill_id>/)
    whose C(state.json) (written when the drill started, before anything was created) records that drill id, whose
    prefix (the first 6 hex digits of the id's SHA-256) is the leftover's, and whose C(expires_at) is at or before
    O(as_of); with O(drill_id), that drill's runtime is removed whatever its expiry. The removal kills every process in
    the drill's namespaces, deletes the namespaces (their veths and the router's nft table go with them) and proves
    that no namespace, nft table, mount or process of the prefix is left.
  - A prefix without such proof is never touched. It is returned in RV(refused) with its reason - V(no_proof) (no
    drill directory records a drill with that prefix), V(not_expired) (its drill has not expired by O(as_of)) or
    V(ambiguous) (several drill directories record drills with that prefix).
  - Fails when the removal of any proven prefix fails (RV(errors)); the other prefixes are still reaped.
  - In check mode nothing is removed; RV(found) lists what would be.
  - Needs root (or the user whose rootless drills are reaped) and C(ip) and C(nft) on C(PATH).
author:
  - drguard maintainers (!UNKNOWN)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  output_root:
    description:
      - The drill runs directory (absolute), where each drill keeps C(<drill_id>/state.json). A directory that does
        not exist holds no proof, so every leftover is refused.
    type: path
    required: true
  as_of:
    description:
      - RFC 3339 time (with a zone) to judge expiry against. Default now.
    type: str
  drill_id:
    description:
      - Reap only this drill's runtime, whatever its expiry (its drill directory must still record it). Other
        prefixes are not looked at.
    type: str
  drill_ids:
    description:
      - Reap only these drills' runtimes, whatever their expiry, as O(drill_id) does for one (the drills of a run with
        many drill hosts). Mutually exclusive with O(drill_id).
    type: list
    elements: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
seealso:
  - module: drguard.sandbox.sandbox_runtime
  - module: drguard.sandbox.sweep
"""

EXAMPLES = r"""
- name: Remove the runtimes of every expired drill
  drguard.sandbox.runtime_reap:
    output_root: /var/lib/drguard/drill-runs

- name: List what would be removed an hour from now
  drguard.sandbox.runtime_reap:
    output_root: /var/lib/drguard/drill-runs
    as_of: "2026-11-30T22:00:00Z"
  check_mode: true
"""

RETURN = r"""
as_of:
  description: The time expiry was judged against.
  returned: success
  type: str
  sample: "2026-11-30T21:00:00Z"
found:
  description: Every prefix proven removable (in check mode, what would be removed), with its drill.
  returned: always
  type: list
  elements: dict
  sample: [{"prefix": "drg-ab12cd-", "namespaces": ["drg-ab12cd-app"], "holders": [], "drill_id": "dr-1",
            "expires_at": "2026-11-30T20:00:00Z", "output_dir": "/runs/dr-1"}]
removed:
  description: The prefixes removed and proven gone (entries of RV(found) plus C(removed), what went).
  returned: always
  type: list
  elements: dict
refused:
  description: The prefixes left alone, with C(reason) (V(no_proof), V(not_expired), V(ambiguous)) and C(detail).
  returned: always
  type: list
  elements: dict
errors:
  description: The proven prefixes whose removal failed, with C(error) (one sentence).
  returned: always
  type: list
  elements: dict
skipped:
  description: Drill directories whose C(state.json) proves nothing (unreadable, a symlink, another drill id than
    the directory's name, no valid expiry), with C(path) and C(reason).
  returned: always
  type: list
  elements: dict
counts:
  description: How many prefixes were found, removed, refused and failed.
  returned: always
  type: dict
  sample: {"found": 1, "removed": 1, "refused": 0, "errors": 0}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_reap

ARGUMENT_SPEC = dict(
    output_root=dict(type="path", required=True),
    as_of=dict(type="str"),
    drill_id=dict(type="str"),
    drill_ids=dict(type="list", elements="str"),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True,
                           mutually_exclusive=[("drill_id", "drill_ids")])
    p = module.params
    try:
        result = _runtime_reap.reap(p["output_root"], as_of=p["as_of"], drill_id=p["drill_id"],
                                    drill_ids=p["drill_ids"], check_mode=module.check_mode)
    except _runtime_reap.RuntimeReapError as exc:
        module.fail_json(msg=exc.msg)
    if result["errors"]:
        first = result["errors"][0]
        module.fail_json(msg=f"{len(result['errors'])} drill runtime(s) could not be removed (first: {first['prefix']} "
                             f"of drill {first['drill_id']}: {first['error']})", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
