"""What the tests that build network namespaces share: the skip marker naming what a host lacks,
and the two-tier boundary most of them run on (each test file keeps a sandbox CIDR of its own, so
files running side by side never collide)."""

from __future__ import annotations

import os
import shutil

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"  # runnable by any uid (the venv's interpreter may live under /root)


def needs_root_and(*tools: str, what: str = "network namespaces need", files: tuple = ()) -> pytest.MarkDecorator:
    """Skip unless running as root with every one of ``tools`` on PATH and every one of ``files``
    present; the reason names the euid and exactly what is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None] + [f for f in files if not os.path.exists(f)]
    return pytest.mark.skipif(
        os.geteuid() != 0 or bool(missing),
        reason=(f"{what} root and {'/'.join(tools)}{' and ' + ', '.join(files) if files else ''} on PATH "
                f"(euid {os.geteuid()}, missing: {', '.join(missing) or 'nothing'}); make venv as root installs them"),
    )


def app_db_boundary(sandbox_cidr: str) -> dict:
    """Tiers app and db (app reaches db on TCP 5432), control-plane ingress on 22, egress on 443 and
    telemetry on 4317, one production CIDR."""
    return {
        "sandbox_cidr": sandbox_cidr,
        "production_cidrs": ["10.0.0.0/16"],
        "ingress": [{"cidr": "192.0.2.0/28", "protocol": "tcp", "ports": [22]}],
        "egress": [
            {"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [443]},
            {"cidr": "198.51.100.16/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"},
        ],
        "tiers": ["app", "db"],
        "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
    }
