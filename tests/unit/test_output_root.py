"""playbooks/filter_plugins/output_root.py: where the drill's default output root lands."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "playbooks" / "filter_plugins"))
from output_root import drill_runs_dir  # noqa: E402


def test_a_checkout_keeps_its_runs_beside_playbooks():
    assert drill_runs_dir("/src/drguard/playbooks", "drill-runs", cwd="/home/u") == "/src/drguard/drill-runs"


def test_an_installed_collection_writes_to_the_working_directory():
    installed = "/usr/share/ansible/collections/ansible_collections/drguard/sandbox/playbooks"
    assert drill_runs_dir(installed, "drill-runs", cwd="/runner/project") == "/runner/project/drill-runs"
    # Not a mere substring: a checkout under a directory whose name contains it stays a checkout.
    assert drill_runs_dir("/src/my_ansible_collections_work/playbooks", "drill-runs", cwd="/x") == \
        "/src/my_ansible_collections_work/drill-runs"


def test_both_playbooks_use_the_one_rule():
    for name in ("drill.yml", "reap.yml"):
        text = (ROOT / "playbooks" / name).read_text()
        assert "playbook_dir | drill_runs_dir(" in text, name
        assert "playbook_dir ~ '/../'" not in text, name
