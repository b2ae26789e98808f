"""tools/check_docs.py: the gate passes on the tree and catches what it claims to catch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "tools" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)


def test_tree_is_clean(capsys):
    assert check_docs.main() == 0, capsys.readouterr().out


def test_own_fragment_options_are_merged_and_compared():
    spec = {"drill_id": {"type": "str", "required": True},
            "alert_sink": {"type": "dict", "required": True, "options": {"path": {"type": "path", "required": True},
                                                                          "extra": {"type": "str"}}}}
    doc = {"options": {"drill_id": {"description": "x", "type": "str", "required": True}},
           "extends_documentation_fragment": ["amazon.aws.boto3", "drguard.sandbox.alert_sink"]}
    problems = []
    merged = check_docs.own_fragment_options(doc, "m", problems)
    assert problems == [] and set(merged) == {"drill_id", "alert_sink"}
    check_docs.compare(spec, merged, "m", problems)
    assert "m.alert_sink: option 'extra' is in ARGUMENT_SPEC but not documented" in problems
    assert any("'sns_topic_arn' is documented but not in ARGUMENT_SPEC" in p for p in problems)


def test_missing_fragment_and_drift_are_findings():
    problems = []
    check_docs.own_fragment_options({"extends_documentation_fragment": ["drguard.sandbox.nope"]}, "m", problems)
    assert problems and "drguard.sandbox.nope cannot be loaded" in problems[0]
    problems = []
    check_docs.compare({"a": {"type": "int", "default": 1}, "token": {"type": "str"}},
                       {"a": {"description": "x", "type": "int", "default": 2}, "token": {"description": "t"}},
                       "m", problems)
    assert "m.a: default is 1 in ARGUMENT_SPEC but 2 in DOCUMENTATION" in problems
    assert "m.token: looks like a secret but is not no_log in ARGUMENT_SPEC" in problems


def _attrs(check="full", diff="none", fragment=True):
    doc = {"attributes": {"check_mode": {"support": check}, "diff_mode": {"support": diff}}}
    if fragment:
        doc["extends_documentation_fragment"] = ["ansible.builtin.action_common_attributes"]
    return doc


def test_attributes_are_required_and_honest():
    ok_source = "AnsibleModule(argument_spec=S, supports_check_mode=True)\nif module._diff: pass"
    problems = []
    check_docs.check_attributes(_attrs(diff="full"), ok_source, "m", problems)
    assert problems == []
    check_docs.check_attributes({}, ok_source, "m", problems)
    assert problems == ["m: does not extend ansible.builtin.action_common_attributes",
                        "m: attributes.check_mode.support is None; use one of full, partial, none",
                        "m: attributes.diff_mode.support is None; use one of full, partial, none"]
    problems = []
    check_docs.check_attributes(_attrs(check="full"), "AnsibleModule(argument_spec=S)", "m", problems)
    assert problems == ["m: attributes.check_mode says full but the module does not set supports_check_mode=True"]
    problems = []
    check_docs.check_attributes(_attrs(check="none", diff="partial"), "supports_check_mode=True", "m", problems)
    assert problems == ["m: the module supports check mode but attributes.check_mode.support is none",
                        "m: attributes.diff_mode says partial but the module never looks at module._diff"]
