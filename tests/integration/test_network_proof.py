"""What sandbox_network builds, boundary_verify proves isolated (no false positives across the pair)."""

from __future__ import annotations

import uuid

BOUNDARY = {
    "production_cidrs": ["10.0.0.0/16", "10.1.0.0/16"],
    "ingress": [{"cidr": "192.0.2.0/28", "ports": [22, 443]}],
    "egress": [{"cidr": "198.51.100.0/28", "ports": [443, 4317]},
               {"cidr": "203.0.113.0/28", "protocol": "udp", "ports": [514]}],
    "tier_rules": [{"from": "app", "to": "db", "ports": [5432]}],
    "s3_read": [{"bucket": "proof-backups", "prefix": "orders/"}],
    "s3_write": [{"bucket": "proof-telemetry", "prefix": "drills/"}],
}


def test_built_network_verifies_isolated(module_runner):
    drill_id = "dr-proof-%s" % uuid.uuid4().hex[:6]
    net = module_runner("sandbox_network", {"drill_id": drill_id, "boundary": BOUNDARY,
                                            "expires_at": "2030-01-01T00:00:00Z"})
    assert not net.failed, net
    proof = module_runner("boundary_verify", {"vpc_id": net["vpc_id"], "fail_on_findings": False,
                                              "boundary": dict(BOUNDARY, sandbox_cidr=net["sandbox_cidr"])})
    assert proof["isolated"] is True, proof["findings"]
    assert proof["findings"] == []
    swept = module_runner("sweep", {"drill_id": drill_id})
    assert not swept.failed and swept["counts"]["remaining"] == 0, swept
