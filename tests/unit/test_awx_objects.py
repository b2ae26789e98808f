"""playbooks/awx_configure.yml: controller objects as code, checked without a controller.

The playbook is parsed and its task arguments rendered with the example inputs
(awx/drill-template.yml); they are checked against the awx.awx modules' documented options,
against each other (every object a task refers to is created by an earlier task), against the
drill's argument spec (surveys, and what AWX sends for an unanswered optional question), against
the reaper's inputs, and against the drill's set_stats figures (notifications). Schedules are
parsed with python-dateutil's rrulestr, as AWX itself does.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime
from datetime import UTC
from pathlib import Path

import pytest
import yaml
from dateutil.rrule import rrulestr
from jinja2 import StrictUndefined
from jinja2 import UndefinedError
from jinja2.nativetypes import NativeEnvironment
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from conftest import run_module

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "playbooks" / "awx_configure.yml"
EXAMPLE = ROOT / "awx" / "drill-template.yml"

# Credential types every AWX ships (managed by the controller itself).
BUILTIN_CREDENTIAL_TYPES = {"Amazon Web Services"}

# Which option of which module names an object of which kind.
REFERENCES = {
    "organization": "organization", "project": "project", "inventory": "inventory",
    "execution_environment": "execution_environment", "default_environment": "execution_environment",
    "credential_type": "credential_type", "credentials": "credential",
    "notification_templates_success": "notification_template",
    "notification_templates_error": "notification_template",
    "notification_templates_started": "notification_template",
    "hosts": "host",
}
CREATES = {
    "awx.awx.organization": "organization", "awx.awx.execution_environment": "execution_environment",
    "awx.awx.credential_type": "credential_type", "awx.awx.credential": "credential",
    "awx.awx.project": "project", "awx.awx.inventory": "inventory", "awx.awx.host": "host",
    "awx.awx.notification_template": "notification_template", "awx.awx.job_template": "job_template",
    "awx.awx.workflow_job_template": "workflow_job_template", "awx.awx.schedule": "schedule",
    "awx.awx.group": "group",
}


# ------------------------------------------------------------------------------ loading and rendering
class Unsafe(str):
    """A ``!unsafe`` string: Ansible passes it on untemplated (AWX renders it later)."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!unsafe", lambda loader, node: Unsafe(loader.construct_scalar(node)))


def _load(path: Path):
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader plus !unsafe


class _Omit:
    def __repr__(self):
        return "omit"


OMIT = _Omit()


def _combine(a, b):
    out = dict(a)
    out.update(b)
    return out


def _lookup(kind, *terms, **kwargs):
    if kind == "ansible.builtin.env":
        return "ENV[%s]" % terms[0]
    if kind == "ansible.builtin.file":
        return '{"threshold": 1, "keys": []}'
    raise AssertionError("lookup %s is not expected in awx_configure.yml" % kind)


_ENV = NativeEnvironment(undefined=StrictUndefined)
_ENV.filters["combine"] = _combine
_ENV.filters["dict2items"] = lambda d: [{"key": k, "value": v} for k, v in d.items()]
_ENV.globals["lookup"] = _lookup


def render(value, context):
    """Render ``value`` as Ansible would (native types, ``!unsafe`` left alone)."""
    if isinstance(value, Unsafe):
        return value
    if isinstance(value, str):
        if "{{" not in value and "{%" not in value:
            return value
        return _ENV.from_string(value).render(**context)
    if isinstance(value, dict):
        return {k: render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context) for v in value]
    return value


@pytest.fixture(scope="module")
def play():
    plays = _load(PLAYBOOK)
    assert len(plays) == 1
    return plays[0]


@pytest.fixture(scope="module")
def context(play):
    ctx = dict(_load(EXAMPLE))
    ctx["omit"] = OMIT
    pending = dict(play.get("vars", {}))
    for _ in range(3):  # play vars refer to each other (``_awx`` first); settle them
        for name, value in list(pending.items()):
            try:
                ctx[name] = render(value, ctx)
            except UndefinedError:
                continue  # refers to a play var not rendered yet: next round
            del pending[name]
    assert not pending, "play vars that never render: %s" % sorted(pending)
    return ctx


@pytest.fixture(scope="module")
def tasks(play, context):
    """``[(module, args rendered, task)]`` in order."""
    out = []
    for task in play["tasks"]:
        module = next(k for k in task if k.startswith("awx.awx."))
        local = dict(context, **render(task.get("vars", {}), context))
        if "loop" not in task:
            out.append((module, render(task[module], local), task))
            continue
        items = _ENV.from_string(task["loop"]).render(**local)
        assert items, "%s loops over nothing with the example inputs" % task["name"]
        for item in items:  # one entry per item, as Ansible runs it
            out.append((module, render(task[module], dict(local, item=item)), task))
    return out


def _by_name(tasks, module, name):
    found = [a for m, a, _ in tasks if m == module and a.get("name") == name]
    assert len(found) == 1, (module, name)
    return found[0]


def _drill_spec():
    return yaml.safe_load((ROOT / "playbooks/vars/drill_argument_spec.yml").read_text())[
        "argument_specs"]["main"]["options"]


def _reap_spec():
    plays = yaml.safe_load((ROOT / "playbooks/reap.yml").read_text())
    task = next(t for t in plays[0]["tasks"] if "ansible.builtin.validate_argument_spec" in t)
    return task["ansible.builtin.validate_argument_spec"]["argument_spec"]


def _job_templates(tasks):
    return [a for m, a, _ in tasks if m == "awx.awx.job_template"]


def _drill_templates(tasks, scale_out=False):
    """The job templates that run one drill (``scale_out``: the one that runs many)."""
    return [a for a in _job_templates(tasks) if a["playbook"] == "drill.yml"
            and (a["name"].startswith("drguard drills - ") == scale_out)]


# ------------------------------------------------------------------------------ awx.awx module options
def _awx_modules_dir():
    for entry in sys.path:
        candidate = Path(entry) / "ansible_collections" / "awx" / "awx" / "plugins" / "modules"
        if candidate.is_dir():
            return candidate
    return None


def _module_options(module: str) -> dict:
    directory = _awx_modules_dir()
    if directory is None:
        pytest.skip("the awx.awx collection is not installed (it ships with the `ansible` package)")
    src = (directory / (module.rsplit(".", maxsplit=1)[-1] + ".py")).read_text()
    doc = re.search(r"DOCUMENTATION = r?('''|\"\"\")(.*?)\1", src, re.S).group(2)
    spec = yaml.safe_load(doc)["options"]
    # Connection options every awx.awx module takes (doc fragment awx.awx.auth).
    for name in ("controller_host", "controller_username", "controller_password", "controller_oauthtoken",
                 "validate_certs", "controller_config_file", "request_timeout"):
        spec.setdefault(name, {"type": "raw"})
    return spec


def _check_options(args: dict, spec: dict, where: str, problems: list) -> None:
    for key, value in args.items():
        if key not in spec:
            problems.append("%s: %s is not an option (%s)" % (where, key, ", ".join(sorted(spec))))
            continue
        option = spec[key]
        if option.get("choices") and value is not OMIT and not isinstance(value, list) \
                and value not in option["choices"]:
            problems.append("%s: %s=%r is not one of %s" % (where, key, value, option["choices"]))
        kind = option.get("type")
        expected = {"dict": dict, "list": list, "bool": bool, "int": int, "str": str}.get(kind)
        if expected and value is not OMIT and not isinstance(value, expected):
            problems.append("%s: %s is a %s, the module wants %s" % (where, key, type(value).__name__, kind))
        sub = option.get("suboptions")
        if sub and isinstance(value, dict):
            _check_options(value, sub, "%s.%s" % (where, key), problems)
        if sub and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _check_options(item, sub, "%s.%s[%d]" % (where, key, i), problems)
    for key, option in spec.items():
        if option.get("required") and key not in args:
            problems.append("%s: required option %s is missing" % (where, key))


def test_every_task_uses_only_documented_options_of_its_awx_module(tasks):
    problems = []
    for module, args, task in tasks:
        _check_options(args, _module_options(module), "%s (%s)" % (task["name"], module), problems)
    assert problems == []


def test_tasks_carrying_secrets_are_no_log(play):
    for task in play["tasks"]:
        module = next(k for k in task if k.startswith("awx.awx."))
        text = json.dumps(task[module])
        if any(s in text for s in ("awx_aws_secret_key", "awx_aws_access_key", "awx_masking_key")):
            assert task.get("no_log") is True, task["name"]


# ------------------------------------------------------------------------------ references
def test_every_object_a_task_refers_to_is_created_by_an_earlier_task(tasks):
    created: dict[str, set] = {}
    problems = []

    def need(kind, name, where):
        if kind == "credential_type" and name in BUILTIN_CREDENTIAL_TYPES:
            return
        if name not in created.get(kind, set()):
            problems.append("%s refers to %s %r, which no earlier task creates" % (where, kind, name))

    for module, args, task in tasks:
        where = task["name"]
        for option, kind in REFERENCES.items():
            if option not in args or option == "organization" and module == "awx.awx.organization":
                continue
            value = args[option]
            for name in value if isinstance(value, list) else [value]:
                need(kind, name, where)
        if module == "awx.awx.schedule":
            ujt = args["unified_job_template"]
            if ujt not in created.get("job_template", set()) | created.get("workflow_job_template", set()):
                problems.append("%s schedules %r, which no earlier task creates" % (where, ujt))
        for node in args.get("workflow_nodes", []):
            need("job_template", node["unified_job_template"]["name"], where)
            need("organization", node["unified_job_template"]["organization"]["name"], where)
        created.setdefault(CREATES[module], set()).add(args["name"])
    assert problems == []
    assert {"organization", "execution_environment", "credential_type", "credential", "project", "inventory",
            "host", "notification_template", "job_template", "workflow_job_template", "schedule"} <= set(created)


def test_the_check_catches_a_reference_to_an_object_created_later(tasks):
    """The reference test is not vacuous: moving the project after the job templates is caught."""
    reordered = [t for t in tasks if t[0] != "awx.awx.project"] + [t for t in tasks if t[0] == "awx.awx.project"]
    seen = set()
    late = []
    for module, args, task in reordered:
        if "project" in args and module != "awx.awx.project" and args["project"] not in seen:
            late.append(task["name"])
        if module == "awx.awx.project":
            seen.add(args["name"])
    assert late


def test_job_templates_run_the_repository_root_playbooks(tasks):
    for jt in _job_templates(tasks):
        assert (ROOT / jt["playbook"]).is_file(), jt["playbook"]
        assert jt["playbook"] in ("drill.yml", "reap.yml")


# ------------------------------------------------------------------------------ surveys and extra vars
_SURVEY_TYPES = {"int": {"integer"}, "float": {"float"}, "str": {"text", "textarea", "password", "multiplechoice"},
                 "path": {"text", "textarea"}}


def test_surveys_agree_with_the_drill_argument_spec(tasks):
    spec = _drill_spec()
    checked = 0
    for jt in _drill_templates(tasks):
        for q in (jt.get("survey_spec") or {}).get("spec", []):
            checked += 1
            option = spec.get(q["variable"])
            assert option is not None, "survey variable %s is not a drill input" % q["variable"]
            assert q["type"] in _SURVEY_TYPES[option["type"]], q
            if option.get("choices"):
                assert q["type"] == "multiplechoice"
                assert q["choices"] == option["choices"], q["variable"]
            if option.get("required"):
                assert q["required"] is True, q["variable"]
            if "default" in option and "default" in q:
                assert q["default"] == option["default"], "the survey default of %s differs from the spec's" \
                    % q["variable"]
            if option.get("no_log"):
                assert q["type"] == "password", q["variable"]
    assert checked >= 2


def _unanswered(question, empty_text):
    """What AWX puts in the job's extra vars for a question left unanswered.

    A question with a default sends it. Without one, AWX up to 24 sends an empty string (or
    null) for a text question; later versions leave the variable out; other types are left out.
    """
    if question.get("default") is not None:
        return question["default"]
    if question["type"] in ("text", "textarea", "password"):
        return empty_text
    return OMIT


@pytest.mark.parametrize("empty_text", ["", None, OMIT], ids=["empty-string", "null", "omitted"])
def test_every_launch_of_a_drill_template_passes_the_drill_input_check(tasks, empty_text):
    spec = _drill_spec()
    for jt in _drill_templates(tasks):
        extra = dict(jt["extra_vars"])
        for q in (jt.get("survey_spec") or {}).get("spec", []):
            if q["required"]:
                value = q["choices"][0] if q["type"] == "multiplechoice" else q.get("default")
            else:
                value = _unanswered(q, empty_text)
            if value is not OMIT:
                extra[q["variable"]] = value
        # The credentials inject these (masking key: an extra var; trust policy: a file and its path).
        extra["drill_masking_key"] = "injected"
        unknown = sorted(k for k in extra if k.startswith("drill_") and k not in spec)
        assert unknown == [], "%s: the drill refuses unknown inputs %s" % (jt["name"], unknown)
        result = ArgumentSpecValidator(spec).validate(extra)
        assert result.error_messages == [], (jt["name"], result.error_messages)
        assert extra["drill_backup"]["trust_policy"] == "{{ drguard_trust_policy_file }}"


def test_an_unanswered_ttl_sends_the_spec_default(tasks):
    drill = next(jt for jt in _drill_templates(tasks) if jt.get("survey_spec") and any(
        q["variable"] == "drill_ttl_minutes" for q in jt["survey_spec"]["spec"]))
    question = next(q for q in drill["survey_spec"]["spec"] if q["variable"] == "drill_ttl_minutes")
    assert _unanswered(question, "") == _drill_spec()["drill_ttl_minutes"]["default"]


def test_an_empty_report_location_means_no_durable_copy():
    """An empty string (AWX's unanswered text question, or an operator's blank) must not reach drill_report."""
    drill = yaml.safe_load((ROOT / "playbooks/drill.yml").read_text())[0]

    def walk(items):
        for t in items:
            yield t
            for key in ("block", "rescue", "always"):
                yield from walk(t.get(key, []))

    report = next(t for t in walk(drill["tasks"]) if "drguard.sandbox.drill_report" in t)
    expr = report["drguard.sandbox.drill_report"]["copy_to"]
    env = NativeEnvironment(undefined=StrictUndefined)
    for value in ("", None):
        assert env.from_string(expr).render(_drill_args={"report_location": value}, omit=OMIT) is OMIT
    assert env.from_string(expr).render(_drill_args={"report_location": "s3://b/p/"}, omit=OMIT) == "s3://b/p/"


def test_tampered_demo_differs_from_the_drill_only_in_its_backup_set(tasks, context):
    drill = _by_name(tasks, "awx.awx.job_template", context["_awx"]["drill"])
    tampered = _by_name(tasks, "awx.awx.job_template", context["_awx"]["tampered"])
    assert {k: v for k, v in tampered["extra_vars"].items() if k != "drill_backup"} == \
        {k: v for k, v in drill["extra_vars"].items() if k != "drill_backup"}
    assert tampered["extra_vars"]["drill_backup"]["manifest"] != drill["extra_vars"]["drill_backup"]["manifest"]
    assert "survey_spec" not in tampered


def test_drill_templates_get_every_credential_and_the_execution_environment(tasks, context):
    names = context["_awx"]
    for jt in _drill_templates(tasks):
        assert sorted(jt["credentials"]) == sorted([names["aws_credential"], names["masking_credential"],
                                                    names["trust_credential"]])
        assert jt["execution_environment"] == names["ee"]
        assert jt["inventory"] == names["inventory"]


def test_the_execution_node_is_a_local_host(tasks):
    host = next(a for m, a, _ in tasks if m == "awx.awx.host")
    assert host["name"] == "localhost"
    assert host["variables"] == {"ansible_connection": "local",
                                 "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
    assert isinstance(host["variables"]["ansible_python_interpreter"], Unsafe)


# ------------------------------------------------------------------------------ credential types
def test_trust_material_is_injected_as_a_file(tasks, context):
    ctype = _by_name(tasks, "awx.awx.credential_type", context["_awx"]["trust_type"])
    field_ids = [f["id"] for f in ctype["inputs"]["fields"]]
    assert ctype["kind"] == "cloud"
    assert ctype["injectors"]["file"] == {"template": "{{ trust_policy }}"}
    assert "trust_policy" in field_ids
    assert ctype["injectors"]["extra_vars"] == {"drguard_trust_policy_file": "{{ tower.filename }}"}
    injected = ctype["injectors"]
    for value in (injected["file"]["template"], injected["extra_vars"]["drguard_trust_policy_file"]):
        assert isinstance(value, Unsafe), "awx_configure.yml would template %r itself" % value


def test_masking_key_is_a_secret_input_injected_as_the_drill_variable(tasks, context):
    ctype = _by_name(tasks, "awx.awx.credential_type", context["_awx"]["masking_type"])
    field = next(f for f in ctype["inputs"]["fields"] if f["id"] == "masking_key")
    assert field["secret"] is True
    assert ctype["injectors"]["extra_vars"] == {"drill_masking_key": "{{ masking_key }}"}
    assert _drill_spec()["drill_masking_key"]["no_log"] is True


# ------------------------------------------------------------------------------ reaper and workflow
def test_reaper_inputs_pass_the_reapers_own_check(tasks, context):
    reaper = _by_name(tasks, "awx.awx.job_template", context["_awx"]["reaper"])
    workflow = _by_name(tasks, "awx.awx.workflow_job_template", context["_awx"]["workflow"])
    node = next(n for n in workflow["workflow_nodes"] if n["unified_job_template"]["name"] == reaper["name"])
    extra = dict(reaper["extra_vars"], **node.get("extra_data", {}))
    result = ArgumentSpecValidator(_reap_spec()).validate(extra)
    assert result.error_messages == []
    # AWX accepts a node's extra_data only for a template that prompts for variables.
    assert reaper["ask_variables_on_launch"] is True


def _all_tasks(play: dict):
    """Every task of ``play``, blocks flattened."""
    todo = list(play.get("tasks", []))
    while todo:
        task = todo.pop(0)
        yield task
        for key in ("block", "rescue", "always"):
            todo.extend(task.get(key) or [])


def test_workflow_always_runs_the_reaper_for_that_drill(tasks, context):
    names = context["_awx"]
    workflow = _by_name(tasks, "awx.awx.workflow_job_template", names["workflow"])
    nodes = {n["identifier"]: n for n in workflow["workflow_nodes"]}
    drill = next(n for n in nodes.values() if n["unified_job_template"]["name"] == names["drill"])
    always = [ref["identifier"] for ref in drill["related"]["always_nodes"]]
    assert len(always) == 1
    reaper = nodes[always[0]]
    assert reaper["unified_job_template"] == {"name": names["reaper"], "type": "job_template",
                                              "organization": {"name": context["awx_organization"]}}
    assert reaper["extra_data"] == {"reap_drill_from_stats": True}
    # The drill publishes its id under `drill` (set_stats), which AWX passes to the next node; reap.yml
    # reads exactly that key.
    drill_play = yaml.safe_load((ROOT / "playbooks/drill.yml").read_text())[0]
    stats = next(t for t in _all_tasks(drill_play) if "ansible.builtin.set_stats" in t)
    assert "{'drill': drill_report_result.headline} if ansible_play_hosts_all | length == 1" in \
        stats["ansible.builtin.set_stats"]["data"]
    assert "drill.drill_id" in (ROOT / "playbooks/reap.yml").read_text()


# ------------------------------------------------------------------------------ schedules
def _parse_rrule(text: str):
    """AWX's rrule text (``DTSTART:... RRULE:...``) as dateutil reads it; AWX's own rules checked."""
    assert text.count("DTSTART") == 1, text
    assert re.match(r"^DTSTART(;TZID=[^:]+)?:\d{8}T\d{6}Z? RRULE:", text), text
    assert "FREQ=SECONDLY" not in text and "FREQ=MINUTELY" not in text, text
    count = re.search(r"COUNT=(\d+)", text)
    assert not count or int(count.group(1)) <= 999, text
    return rrulestr(text.replace(" RRULE:", "\nRRULE:"), forceset=True)


def test_schedules_parse_and_keep_firing(tasks, context):
    schedules = {a["unified_job_template"]: a for m, a, _ in tasks if m == "awx.awx.schedule"}
    names = context["_awx"]
    assert set(schedules) == {names["workflow"], names["reaper"], names["scale_out"]}
    now = datetime.now(UTC)
    for schedule in schedules.values():
        rule = _parse_rrule(schedule["rrule"])
        first = rule.after(now)
        assert first is not None and first.tzinfo is not None, schedule["name"]
    # The reaper runs at least hourly, well inside the drill's default TTL.
    reaper = _parse_rrule(schedules[names["reaper"]]["rrule"])
    a = reaper.after(now)
    b = reaper.after(a)
    assert (b - a).total_seconds() <= 3600
    assert (b - a).total_seconds() < _drill_spec()["drill_ttl_minutes"]["default"] * 60
    # The drill runs at least monthly (a drill that never runs proves nothing).
    for name in (names["workflow"], names["scale_out"]):
        drill = _parse_rrule(schedules[name]["rrule"])
        a = drill.after(now)
        assert (drill.after(a) - a).days <= 31, name


def test_the_rrule_check_refuses_what_awx_refuses():
    for bad in ("RRULE:FREQ=DAILY", "DTSTART:20260101T000000Z RRULE:FREQ=MINUTELY;INTERVAL=5",
                "DTSTART:20260101T000000Z RRULE:FREQ=DAILY;COUNT=5000"):
        with pytest.raises(AssertionError):
            _parse_rrule(bad)


# ------------------------------------------------------------------------------ notifications
@pytest.fixture(scope="module")
def headline(tmp_path_factory):
    out = tmp_path_factory.mktemp("awx-report")
    res = run_module("drill_report", {
        "output_dir": str(out), "drill_id": "dr-awx-1", "region": "us-east-1",
        "started_at": "2026-11-29T00:00:00Z", "started_epoch": 1000.0,
        "phases": [{"name": "network", "started": 1001.0}], "teardown_started": 1002.0,
        "teardown": {"deleted": 1, "remaining": 0, "remaining_resources": []},
        "copy_to": str(out.parent / "awx-durable")})
    assert not res.failed, res
    return res["headline"]


def _render_notification(template: str, artifacts: dict) -> str:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    return env.from_string(template).render(job={"artifacts": artifacts, "status": "successful", "id": 7},
                                            url="https://awx.example/#/jobs/playbook/7")


def test_notifications_carry_the_drills_set_stats_figures(tasks, context, headline):
    note = _by_name(tasks, "awx.awx.notification_template", context["_awx"]["notification"])
    for event in ("success", "error"):
        message, body = note["messages"][event]["message"], note["messages"][event]["body"]
        assert isinstance(message, Unsafe) and isinstance(body, Unsafe)
        fields = set(re.findall(r"job\.artifacts\.drill \| default\(\{\}\)\)\.(\w+)", message + body))
        assert fields and fields <= set(headline), fields - set(headline)
        text = _render_notification(message, {"drill": headline})
        assert "outcome=passed" in text and "teardown_remaining=0" in text
        assert "report=%s" % headline["report_location"] in text
        assert "failed_phase=none" in text and "None" not in text
        data = json.loads(_render_notification(body, {"drill": headline}))
        assert data["outcome"] == "passed" and data["teardown_remaining"] == "0"
        assert data["drill_id"] == "dr-awx-1"
        # A job that died before set_stats still gets a notification.
        assert "outcome=unknown" in _render_notification(message, {})
        assert json.loads(_render_notification(body, {}))["outcome"] == "unknown"


def test_every_drill_template_notifies(tasks, context):
    for jt in _drill_templates(tasks):
        assert jt["notification_templates_success"] == [context["_awx"]["notification"]]
        assert jt["notification_templates_error"] == [context["_awx"]["notification"]]


# ------------------------------------------------------------------------------ scale-out (docs/scale-out.md)
def test_scale_out_runs_each_backup_set_as_a_host_of_the_group_drills(tasks, context):
    names, scale = context["_awx"], context["awx_scale_out"]
    hosts = [a for m, a, _ in tasks if m == "awx.awx.host" and a["inventory"] == names["scale_out_inventory"]]
    assert sorted(h["name"] for h in hosts) == sorted(scale["hosts"])
    group = next(a for m, a, _ in tasks if m == "awx.awx.group")
    assert group["name"] == "drills" and group["inventory"] == names["scale_out_inventory"]
    assert sorted(group["hosts"]) == sorted(scale["hosts"])
    assert group["variables"]["ansible_connection"] == "local"
    assert isinstance(group["variables"]["ansible_python_interpreter"], Unsafe)
    # Its own inventory: a group `drills` beside the single-drill templates' localhost would make them run all.
    assert names["scale_out_inventory"] != names["inventory"]
    jt = _by_name(tasks, "awx.awx.job_template", names["scale_out"])
    assert jt["inventory"] == names["scale_out_inventory"]
    assert (jt["forks"], jt["job_slice_count"]) == (scale["forks"], scale["job_slice_count"]) == (4, 2)
    assert "extra_vars" not in jt, "extra vars would override every host's own drill variables"
    assert sorted(jt["credentials"]) == sorted([names["aws_credential"], names["masking_credential"],
                                                names["trust_credential"]])
    assert _drill_templates(tasks, scale_out=True) == [jt]


def test_every_scale_out_host_is_a_valid_drill_of_its_own(tasks, context):
    spec = _drill_spec()
    group = next(a for m, a, _ in tasks if m == "awx.awx.group")
    hosts = [a for m, a, _ in tasks if m == "awx.awx.host" and a["inventory"] == context["_awx"]["scale_out_inventory"]]
    manifests = []
    for host in hosts:
        given = {k: v for k, v in {**group["variables"], **host["variables"]}.items() if k.startswith("drill_")}
        given["drill_masking_key"] = "injected"
        result = ArgumentSpecValidator(spec).validate(given)
        assert result.error_messages == [], (host["name"], result.error_messages)
        assert given["drill_backup"]["trust_policy"] == "{{ drguard_trust_policy_file }}"
        assert "drill_id" not in given, "a shared drill_id would be refused; each drill generates its own"
        manifests.append(given["drill_backup"]["manifest"])
    assert len(set(manifests)) == len(manifests) >= 2


def test_scale_out_notification_lists_every_drill(tasks, context, headline):
    names = context["_awx"]
    note = _by_name(tasks, "awx.awx.notification_template", names["scale_out_notification"])
    jt = _by_name(tasks, "awx.awx.job_template", names["scale_out"])
    assert jt["notification_templates_success"] == jt["notification_templates_error"] == [note["name"]]
    failed = dict(headline, drill_id="dr-awx-2", outcome="failed", failed_phase="restore")
    drills = {"orders-db": headline, "billing-db": failed}
    for event in ("success", "error"):
        message, body = note["messages"][event]["message"], note["messages"][event]["body"]
        assert isinstance(message, Unsafe) and isinstance(body, Unsafe)
        text = _render_notification(message, {"drills": drills})
        assert "orders-db=passed (dr-awx-1, failed_phase=none, teardown_remaining=0)" in text, text
        assert "billing-db=failed (dr-awx-2, failed_phase=restore" in text
        assert json.loads(_render_notification(body, {"drills": drills}))["drills"]["billing-db"]["outcome"] == \
            "failed"
        assert "outcome=unknown" in _render_notification(message, {})
        assert json.loads(_render_notification(body, {}))["drills"] == {}
