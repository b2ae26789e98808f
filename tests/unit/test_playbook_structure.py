"""The drill playbook's structure: phases named once, prologue written once, credentials given
once, defaults owned by the argument spec, one owner for teardown, names that say one thing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
PHASES_DIR = PLAYBOOKS / "phases"
SPEC_FILE = PLAYBOOKS / "vars" / "drill_argument_spec.yml"
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())
MODULES = sorted(p.stem for p in (ROOT / "plugins" / "modules").glob("*.py") if not p.stem.startswith("_"))

sys.path.insert(0, str(PLAYBOOKS / "filter_plugins"))
from argument_spec import spec_arguments  # noqa: E402


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads Ansible's ``!unsafe`` strings as strings."""


_Loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def load(path: Path):
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def drill_play() -> dict:
    return load(PLAYBOOKS / "drill.yml")[0]


def phases() -> list:
    return drill_play()["vars"]["_drill_phases"]


def spec_options() -> dict:
    return load(SPEC_FILE)["argument_specs"]["main"]["options"]


def drill_sources() -> dict:
    """drill.yml and every phase file, path -> text without comment lines."""
    paths = [PLAYBOOKS / "drill.yml", *sorted(PHASES_DIR.glob("*.yml"))]
    return {p: "\n".join(line for line in p.read_text().splitlines() if not line.lstrip().startswith("#"))
            for p in paths}


def walk_tasks(node):
    """Every task (and block) in a list of tasks or plays, depth first."""
    if isinstance(node, list):
        for item in node:
            yield from walk_tasks(item)
    elif isinstance(node, dict):
        yield node
        for key in ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always"):
            if key in node:
                yield from walk_tasks(node[key])


def yaml_files(*dirs: str) -> list:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.yml")
                  if "meta" not in p.parts and "defaults" not in p.parts and p.name != "molecule.yml")


# ------------------------------------------------------------------------------ phases
def test_each_phase_is_named_once_and_has_its_tasks_file():
    names = phases()
    assert names == ["network", "prove", "runtime", "probes", "mtls", "identity", "backup_mount", "verify",
                     "restore", "validate"]
    assert len(set(names)) == len(names)
    files = {p.stem for p in PHASES_DIR.glob("*.yml") if not p.stem.startswith("_")}
    assert files == set(names), "a phase file without a list entry, or the reverse"


def test_fault_phase_choices_match_the_phase_list():
    assert spec_options()["drill_fault_phase"]["choices"] == phases()


def test_drill_runs_the_phases_only_through_the_prologue():
    play = drill_play()
    includes = [t for t in walk_tasks(play["tasks"]) if "ansible.builtin.include_tasks" in t]
    assert [(t["ansible.builtin.include_tasks"], t.get("loop")) for t in includes] == [
        ("phases/_run_phase.yml", "{{ _drill_phases }}")]
    prologue = load(PHASES_DIR / "_run_phase.yml")
    assert prologue[-1]["ansible.builtin.include_tasks"] == "{{ _drill_phase_name }}.yml"


def test_the_phase_prologue_is_written_once():
    for path, text in drill_sources().items():
        for marker in ("_drill_marks +", "_drill_args.fault_phase", "fault injected"):
            if path.name == "_run_phase.yml":
                assert text.count(marker) == 1, (path, marker)
            else:
                assert marker not in text, (path, marker)
    names = [t.get("name", "") for t in walk_tasks(drill_play()["tasks"])]
    assert not [n for n in names if re.match(r"Phase (%s)\b" % "|".join(phases()), n)]


# ------------------------------------------------------------------------ credentials
def test_the_drill_session_is_given_once():
    texts = drill_sources()
    joined = "\n".join(texts.values())
    for field in ("access_key_id", "secret_access_key", "session_token"):
        assert joined.count("identity__session.%s" % field) == 1, field
    for path, text in texts.items():
        if path.parent == PHASES_DIR:
            assert not re.search(r"^\s*(access_key|secret_key|session_token):", text, re.M), path
    block = next(t for t in walk_tasks(drill_play()["tasks"]) if t.get("name") == "Run the drill")
    defaults = block["module_defaults"]
    assert sorted(defaults) == ["drguard.sandbox.restore_artifacts", "drguard.sandbox.secret_exec",
                                "drguard.sandbox.verify_artifacts"]
    assert defaults["drguard.sandbox.restore_artifacts"] == defaults["drguard.sandbox.verify_artifacts"] \
        == defaults["drguard.sandbox.secret_exec"]


# ---------------------------------------------------------------------------- defaults
def _spec_defaults(options: dict, prefix: str = "") -> dict:
    out = {}
    for name, opt in options.items():
        if "default" in opt:
            out[prefix + name] = opt["default"]
        out.update(_spec_defaults(opt.get("options") or {}, prefix + name + "."))
    return out


def test_no_default_of_the_spec_is_restated_in_the_playbook():
    restated = {k: v for k, v in _spec_defaults(spec_options()).items() if v not in ({}, [], False, "")}
    assert restated, "the spec has defaults"
    # drill_hosts is read by the play's `hosts:`, before the spec can fill anything; the spec gives it no
    # default, and the fallback there is its only definition.
    assert "default" not in spec_options()["drill_hosts"]
    inputs = "|".join(re.escape(n) for n in spec_options() if n != "drill_hosts")
    for path, text in drill_sources().items():
        # An input read with a fallback restates (or invents) its default.
        assert not re.search(r"\b(%s)\b[^|}\n]*\|\s*default\((?!omit\))" % inputs, text), path
        for key, value in restated.items():
            if isinstance(value, bool):
                pattern = r"default\(\s*%s\s*\)" % str(value).lower()
            else:
                pattern = r"(?<![\w.-])%s(?![\w.-])" % re.escape(str(value))
            assert not re.search(pattern, text, re.I), (path, key, value)


def test_the_spec_fills_every_default():
    given = {"drill_region": "us-east-1", "drill_boundary": {"production_cidrs": ["10.0.0.0/16"]},
             "drill_backup": {"manifest": "m", "source": "s3://b/p/", "trust_policy": "/t.json"},
             "drill_quarantine": "s3://q/", "drill_validation": {"argv": ["true"]}}
    args = spec_arguments(spec_options(), given, strip_prefix="drill_")
    for key, value in _spec_defaults(spec_options()).items():
        node = args
        for part in key.removeprefix("drill_").split("."):
            node = node[part]
        if isinstance(value, dict):  # its sub-options are filled in too (their default, or None)
            node = {k: v for k, v in node.items() if k in value}
        assert node == value, key
    assert args["fault_phase"] is None and args["backup"]["trusted_state"] is None
    assert set(args) == {n.removeprefix("drill_") for n in spec_options()}


def test_the_spec_filter_refuses_what_the_spec_refuses():
    from ansible.errors import AnsibleFilterError

    with pytest.raises(AnsibleFilterError, match="drill_region"):
        spec_arguments(spec_options(), {"drill_boundary": {}})


@pytest.mark.parametrize("role", ROLES)
def test_role_defaults_agree_with_the_role_argument_spec(role):
    spec = load(ROOT / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    defaults = load(ROOT / "roles" / role / "defaults" / "main.yml") or {}
    assert defaults == {name: opt["default"] for name, opt in spec.items() if "default" in opt}


# ------------------------------------------------------------------------------ outcome
def test_the_outcome_is_decided_by_drill_report_alone():
    report = next(t for t in walk_tasks(drill_play()["tasks"]) if "drguard.sandbox.drill_report" in t)
    assert "outcome" not in report["drguard.sandbox.drill_report"]
    for path, text in drill_sources().items():
        assert "'halted'" not in text and "'passed' if" not in text, path


# ----------------------------------------------------------------------------- teardown
def test_teardown_has_one_owner():
    always = next(t for t in walk_tasks(drill_play()["tasks"]) if t.get("name") == "Run the drill")["always"]
    roles = [t["ansible.builtin.include_role"]["name"] for t in walk_tasks(always)
             if "ansible.builtin.include_role" in t]
    assert roles == ["drguard.sandbox.teardown"]
    for path, text in drill_sources().items():
        for needle in ("drguard.sandbox.sweep", "drguard.sandbox.mint_credentials", "drguard.sandbox.drill_secrets",
                       "drguard.sandbox.backup_access", "_action: delete"):
            assert needle not in text, (path, needle)


def test_teardown_role_runs_every_step_in_one_module_task():
    tasks = load(ROOT / "roles" / "teardown" / "tasks" / "main.yml")
    modules = [m for t in tasks for m in t if m.startswith("drguard.sandbox.")]
    # One process for revoke, runtime, secrets, local data, backup mount and sweep (their order: _teardown.STEPS).
    assert modules == ["drguard.sandbox.drill_teardown"]
    (task,) = [t for t in tasks if "drguard.sandbox.drill_teardown" in t]
    assert task.get("ignore_errors") is True and task.get("register")
    assert "ansible.builtin.fail" in tasks[-1] and "when" in tasks[-1]


def test_teardown_steps_revoke_first_and_sweep_last():
    from ansible_collections.drguard.sandbox.plugins.module_utils import _teardown

    assert _teardown.STEPS == ("revoke", "runtime", "secrets", "local_data", "backup_mount", "sweep")


# -------------------------------------------------------------------------------- names
def _published_names(path: Path) -> list:
    names = []
    for task in walk_tasks(load(path) or []):
        if isinstance(task.get("register"), str):
            names.append(task["register"])
        facts = task.get("ansible.builtin.set_fact") or task.get("set_fact")
        if isinstance(facts, dict):
            names += [k for k in facts if k != "cacheable"]
    return names


def test_no_fact_or_register_reuses_a_role_or_module_name():
    taken = set(ROLES) | set(MODULES)
    for path in yaml_files("playbooks", "roles", "molecule"):
        clash = set(_published_names(path)) & taken
        assert not clash, (path.relative_to(ROOT), clash)


@pytest.mark.parametrize("role", ROLES)
def test_role_facts_and_registers_carry_the_role_prefix(role):
    for path in sorted((ROOT / "roles" / role / "tasks").glob("*.yml")):
        for name in _published_names(path):
            assert name.startswith((role + "_", "_" + role + "_")), (path.relative_to(ROOT), name)


def test_no_var_naming_suppressions():
    for path in (ROOT / d for d in ("playbooks", "roles", "molecule")):
        for file in path.rglob("*.yml"):
            assert "noqa: var-naming" not in file.read_text(), file


def test_every_host_of_the_example_drills_inventory_passes_the_drill_input_check():
    """inventory/drills.example.yml (docs/scale-out.md): each host, its group's vars under its own, is a valid drill."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

    group = load(ROOT / "inventory" / "drills.example.yml")["drills"]
    assert len(group["hosts"]) >= 2
    for host, own in group["hosts"].items():
        given = {k: v for k, v in {**group["vars"], **(own or {})}.items() if k.startswith("drill_")}
        result = ArgumentSpecValidator(spec_options()).validate(given)
        assert not result.error_messages, (host, result.error_messages)
    backups = [own["drill_backup"]["manifest"] for own in group["hosts"].values()]
    assert len(set(backups)) == len(backups), "one host per backup set"
