#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drill_pki
short_description: A drill's own CA and one short-lived SPIFFE leaf certificate per tier, on a tmpfs only
version_added: 0.1.0
description:
  - Creates, renews, rotates and destroys the per-drill PKI that the tiers use for mutual TLS. The trust domain is
    C(<drill_id>.drguard.internal); a tier's identity is C(spiffe://<drill_id>.drguard.internal/tier/<tier>).
  - The CA is P-256 with BasicConstraints cA pathLen 0 (critical), KeyUsage keyCertSign and cRLSign (critical) and a
    critical name constraint permitting URIs of the trust domain only (DNS names and IP addresses excluded); it is
    valid for the drill's TTL.
  - Each leaf has an empty subject, exactly one URI SAN (critical), KeyUsage digitalSignature (critical), EKU
    serverAuth and clientAuth, cA false; it is valid for O(leaf_lifetime) seconds (15 minutes by default) and never
    past the CA.
  - Keys are written only to O(dir), a 0700 directory on a tmpfs (files 0600), and are destroyed (overwritten and
    unlinked) by O(state=absent). The result carries serials, SHA-256 fingerprints and expiry, never key material.
  - The files, the rotation steps and the authorisation by identity are described in C(docs/mtls.md).
attributes:
  check_mode:
    support: full
    details: In check mode nothing is written or destroyed; C(actions) lists what would be done.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  drill_id:
    description:
      - The drill whose PKI this is; it names the trust domain.
    type: str
    required: true
  state:
    description:
      - V(present) creates the CA and a leaf for every tier when missing, and renews each leaf from its half-life on
        (call it again during long phases).
      - V(rotated) re-issues every leaf now; with O(ca=true) it first creates a new CA, trusted beside the old one
        (the overlap bundle), and issues the leaves from it. The replaced leaves (and the old CA) stay trusted until
        V(retired), so live servers can load the new leaves first and no handshake fails meanwhile.
      - V(retired) ends a rotation - the replaced leaves are revoked in their CA's CRL, a CA kept for the overlap is
        dropped from C(trust.pem) and its key destroyed.
      - V(absent) destroys the directory, CA key included.
    type: str
    default: present
    choices: [present, rotated, retired, absent]
  tiers:
    description:
      - The tiers that get a leaf, in order (pass C(drill_boundary.tiers)); C(validation) is always added.
    type: list
    elements: str
    default: [app, db]
  ttl_minutes:
    description:
      - The drill's TTL in minutes - how long a new CA is valid.
    type: int
    default: 120
  leaf_lifetime:
    description:
      - Seconds a leaf is valid; at least 20. Leaves are renewed from their half-life on (half of it after the issue).
    type: int
    default: 900
  ca:
    description:
      - With O(state=rotated), rotate the CA too (new CA, overlap bundle of old and new CA, leaves from the new CA).
    type: bool
    default: false
  dir:
    description:
      - The PKI directory; its parent must be on a tmpfs. Default C(/dev/shm/drguard-<drill_id>/pki).
    type: path
  deliver:
    description:
      - Copy a tier's identity (C(identity.pem), its leaf and key) and C(trust.pem) into a directory of the tier's
        workload (0700, files 0600, owned by O(deliver[].owner)/O(deliver[].group)), after the state is applied.
        Nothing of another tier and no CA key is copied. The directory's parent must be on a tmpfs.
    type: list
    elements: dict
    default: []
    suboptions:
      tier:
        description:
          - The tier whose identity is delivered.
        type: str
        required: true
      path:
        description:
          - The delivery directory (created when missing).
        type: path
        required: true
      owner:
        description:
          - Numeric uid of the tier's workload; the user running the module when omitted.
        type: int
      group:
        description:
          - Numeric gid of the tier's workload; the group running the module when omitted.
        type: int
      parts:
        description:
          - What to copy. C(trust) is always written before C(identity). During a CA rotation deliver
            V(trust) to every tier (and reload its server) before any V(identity) of the new CA.
        type: list
        elements: str
        choices: [trust, identity]
        default: [trust, identity]
author:
  - drguard maintainers (!UNKNOWN)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
seealso:
  - module: drguard.sandbox.drill_secrets
  - module: drguard.sandbox.sandbox_runtime
"""

EXAMPLES = r"""
- name: A CA and a leaf per tier
  drguard.sandbox.drill_pki:
    drill_id: "{{ drill.drill_id }}"
    tiers: "{{ drill_boundary.tiers }}"
    ttl_minutes: "{{ drill_ttl_minutes }}"

- name: Forced rotation mid-drill (then reload the servers, then retire)
  drguard.sandbox.drill_pki:
    drill_id: "{{ drill.drill_id }}"
    tiers: "{{ drill_boundary.tiers }}"
    state: rotated

- name: End the rotation - the replaced leaves are revoked
  drguard.sandbox.drill_pki:
    drill_id: "{{ drill.drill_id }}"
    state: retired

- name: Destroy the PKI at teardown (CA key included)
  drguard.sandbox.drill_pki:
    drill_id: "{{ drill.drill_id }}"
    state: absent
"""

RETURN = r"""
dir:
  description: The PKI directory.
  returned: always
  type: str
  sample: /dev/shm/drguard-dr-20260101-abc123/pki
trust_domain:
  description: The drill's trust domain.
  returned: always
  type: str
  sample: dr-20260101-abc123.drguard.internal
ca:
  description: The issuing CA - C(serial) (hex), C(sha256), C(not_before), C(not_after). None when absent.
  returned: always
  type: dict
  sample: {"serial": "3F1A...", "sha256": "9c1e...", "not_before": "2026-01-01T00:00:00Z",
           "not_after": "2026-01-01T02:00:00Z"}
trusted_cas:
  description: Every CA in C(trust.pem) (two during a CA rotation), same fields as RV(ca).
  returned: always
  type: list
  elements: dict
leaves:
  description: Per tier - C(spiffe_id), C(serial), C(sha256), C(not_before), C(not_after).
  returned: always
  type: dict
  sample: {"app": {"spiffe_id": "spiffe://dr-20260101-abc123.drguard.internal/tier/app", "serial": "5B...",
                   "sha256": "0a4f...", "not_before": "2026-01-01T00:00:00Z", "not_after": "2026-01-01T00:16:00Z"}}
superseded:
  description: Serials of leaves replaced by a rotation and still trusted until C(state=retired).
  returned: always
  type: list
  elements: str
revoked:
  description: Serials revoked in the CRLs of C(trust.pem).
  returned: always
  type: list
  elements: str
delivered:
  description: Per delivered tier, the paths of C(identity) and C(trust).
  returned: when O(deliver) is given and not in check mode
  type: dict
actions:
  description: What was done (or, in check mode, would be done).
  returned: always
  type: list
  elements: str
  sample: ["create CA", "issue leaf app", "issue leaf db", "issue leaf validation"]
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.drguard.sandbox.plugins.module_utils import _pki

ARGUMENT_SPEC = dict(
    drill_id=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "rotated", "retired", "absent"]),
    tiers=dict(type="list", elements="str", default=["app", "db"]),
    ttl_minutes=dict(type="int", default=120),
    leaf_lifetime=dict(type="int", default=_pki.DEFAULT_LEAF_LIFETIME),
    ca=dict(type="bool", default=False),
    dir=dict(type="path"),
    deliver=dict(type="list", elements="dict", default=[], options=dict(
        tier=dict(type="str", required=True),
        path=dict(type="path", required=True),
        owner=dict(type="int"),
        group=dict(type="int"),
        parts=dict(type="list", elements="str", choices=["trust", "identity"], default=["trust", "identity"]),
    )),
)


def run(p, check_mode):
    """Apply ``p`` (the module's parameters); returns the result. Raises :class:`_pki.PkiError`."""
    if not _pki.HAS_CRYPTOGRAPHY:
        raise _pki.PkiError("the Python library cryptography is missing; install it (requirements.txt)")
    store = _pki.Store(p["drill_id"], p["dir"])
    tiers = _pki.tier_list(p["tiers"])
    ttl = p["ttl_minutes"] * 60
    if p["state"] == "absent":
        existed = os.path.lexists(store.dir)
        if existed and not check_mode:
            _pki.destroy(store.dir)
        return dict(changed=existed, dir=store.dir, trust_domain=_pki.trust_domain(p["drill_id"]), ca=None,
                    trusted_cas=[], leaves={}, superseded=[], revoked=[],
                    actions=["destroy %s" % store.dir] if existed else [])
    if p["ca"] and p["state"] != "rotated":
        raise _pki.PkiError("ca=true rotates the CA and needs state=rotated; set state: rotated or drop ca",
                            field="ca")
    if p["state"] == "present":
        actions = store.present(tiers, ttl, p["leaf_lifetime"], check_mode=check_mode)
    elif p["state"] == "rotated":
        actions = store.rotate(tiers, ttl, p["leaf_lifetime"], ca=p["ca"], check_mode=check_mode)
    else:
        actions = store.retire(check_mode=check_mode)
    result = dict(changed=bool(actions), trust_domain=_pki.trust_domain(p["drill_id"]), actions=actions)
    if check_mode and not store.exists():
        result.update(dir=store.dir, ca=None, trusted_cas=[], leaves={}, superseded=[], revoked=[])
        return result
    result.update(store.summary())
    if p["deliver"] and not check_mode:
        result["delivered"] = {}
        for item in p["deliver"]:
            if item["tier"] not in tiers:
                raise _pki.PkiError("deliver: tier %r has no leaf (tiers: %s); deliver one of those"
                                    % (item["tier"], ", ".join(tiers)), field="deliver")
            paths = store.deliver(item["tier"], item["path"], uid=item["owner"], gid=item["group"],
                                  parts=tuple(item["parts"]))
            if paths.pop("changed"):
                result["changed"] = True
                result["actions"].append("deliver %s to %s" % (item["tier"], item["path"]))
            result["delivered"][item["tier"]] = paths
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    if p["ttl_minutes"] < 1 or p["leaf_lifetime"] < _pki.MIN_LEAF_LIFETIME:
        module.fail_json(msg="ttl_minutes must be at least 1 and leaf_lifetime at least %d seconds; pass larger "
                             "values" % _pki.MIN_LEAF_LIFETIME)
    try:
        result = run(p, module.check_mode)
    except _pki.PkiError as exc:
        module.fail_json(msg=exc.msg, **exc.detail)
    except OSError as exc:
        module.fail_json(msg="the drill's PKI could not be written: %s; check the directory and try again"
                             % exc.strerror, path=exc.filename)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
