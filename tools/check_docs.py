#!/usr/bin/env python3
"""Quality gate: module docs match the argument spec.

For every module in plugins/modules/: DOCUMENTATION, EXAMPLES and RETURN are valid
YAML; the options documented equal the module-level ``ARGUMENT_SPEC`` (names, type,
required, default, choices, elements, aliases, suboptions; secret-looking options
must be no_log; options from this collection's doc fragments count), AWS modules extend the
amazon.aws doc fragments, and every role has meta/argument_specs.yml.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))

# Option names that carry secrets must be no_log in the spec (DOCUMENTATION has no such field).
SECRET_NAME = re.compile(r"(passphrase|password|secret|token|masking_key|private_key$|credentials|^value$)")
NOT_SECRET = {"secret_store", "file_secrets", "env_secrets", "secrets_prefix", "secret_names"}

OWN_FRAGMENT_PREFIX = "drguard.sandbox."
AWS_FRAGMENTS = {"amazon.aws.common.modules", "amazon.aws.region.modules", "amazon.aws.boto3"}
ATTRIBUTES_FRAGMENT = "ansible.builtin.action_common_attributes"
SUPPORT = ("full", "partial", "none")


def check_attributes(doc: dict, source: str, where: str, problems: list) -> None:
    """``attributes:`` as Ansible users expect: check_mode and diff_mode, honest about support."""
    if ATTRIBUTES_FRAGMENT not in (doc.get("extends_documentation_fragment") or []):
        problems.append("%s: does not extend %s" % (where, ATTRIBUTES_FRAGMENT))
    attributes = doc.get("attributes") or {}
    for name in ("check_mode", "diff_mode"):
        support = (attributes.get(name) or {}).get("support")
        if support not in SUPPORT:
            problems.append("%s: attributes.%s.support is %r; use one of %s"
                            % (where, name, support, ", ".join(SUPPORT)))
    check = (attributes.get("check_mode") or {}).get("support")
    if check in ("full", "partial") and "supports_check_mode=True" not in source:
        problems.append("%s: attributes.check_mode says %s but the module does not set supports_check_mode=True"
                        % (where, check))
    if check == "none" and "supports_check_mode=True" in source:
        problems.append("%s: the module supports check mode but attributes.check_mode.support is none" % where)
    diff = (attributes.get("diff_mode") or {}).get("support")
    if diff in ("full", "partial") and "_diff" not in source:
        problems.append("%s: attributes.diff_mode says %s but the module never looks at module._diff" % (where, diff))


def compare(spec: dict, doc: dict, where: str, problems: list) -> None:
    spec_names, doc_names = set(spec), set(doc or {})
    for name in sorted(spec_names - doc_names):
        problems.append("%s: option %r is in ARGUMENT_SPEC but not documented" % (where, name))
    for name in sorted(doc_names - spec_names):
        problems.append("%s: option %r is documented but not in ARGUMENT_SPEC" % (where, name))
    for name in sorted(spec_names & doc_names):
        s, d = spec[name] or {}, doc[name] or {}
        here = "%s.%s" % (where, name)
        if "description" not in d:
            problems.append("%s: no description" % here)
        checks = {
            "type": (s.get("type", "str"), d.get("type", "str")),
            "required": (bool(s.get("required", False)), bool(d.get("required", False))),
            "default": (s.get("default"), d.get("default")),
            "choices": (s.get("choices"), d.get("choices")),
            "elements": (s.get("elements"), d.get("elements")),
            "aliases": (sorted(s.get("aliases") or []), sorted(d.get("aliases") or [])),
        }
        for key, (want, got) in checks.items():
            if want != got:
                problems.append("%s: %s is %r in ARGUMENT_SPEC but %r in DOCUMENTATION" % (here, key, want, got))
        if SECRET_NAME.search(name) and name not in NOT_SECRET and s.get("type", "str") == "str" \
                and not s.get("no_log"):
            problems.append("%s: looks like a secret but is not no_log in ARGUMENT_SPEC" % here)
        if s.get("options") or d.get("suboptions"):
            compare(s.get("options") or {}, d.get("suboptions") or {}, here, problems)


def own_fragment_options(doc: dict, where: str, problems: list) -> dict:
    """The module's options merged with those of this collection's doc fragments, as
    ansible-doc shows them (a module's own option wins over a fragment's)."""
    options = {}
    for fragment in doc.get("extends_documentation_fragment") or []:
        if not fragment.startswith(OWN_FRAGMENT_PREFIX):
            continue
        name = fragment[len(OWN_FRAGMENT_PREFIX):]
        try:
            mod = importlib.import_module("ansible_collections.drguard.sandbox.plugins.doc_fragments." + name)
            options.update(yaml.safe_load(mod.ModuleDocFragment.DOCUMENTATION).get("options") or {})
        except Exception as exc:  # noqa: BLE001 - any failure to load is a finding
            problems.append("%s: doc fragment %s cannot be loaded: %s" % (where, fragment, exc))
    options.update(doc.get("options") or {})
    return options


def aws_group() -> set:
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text()) or {}
    return {m for m in (runtime.get("action_groups") or {}).get("aws", []) if isinstance(m, str)}


def check_module(path: Path, problems: list, group: set) -> None:
    name = path.stem
    where = "plugins/modules/%s.py" % name
    try:
        mod = importlib.import_module("ansible_collections.drguard.sandbox.plugins.modules." + name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding
        problems.append("%s: cannot import: %s" % (where, exc))
        return
    docs = {}
    for attr in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
        text = getattr(mod, attr, None)
        if not text or not str(text).strip():
            problems.append("%s: %s is missing" % (where, attr))
            continue
        try:
            docs[attr] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append("%s: %s is not valid YAML: %s" % (where, attr, exc))
    doc = docs.get("DOCUMENTATION") or {}
    if doc and doc.get("module") != name:
        problems.append("%s: DOCUMENTATION.module is %r" % (where, doc.get("module")))
    spec = getattr(mod, "ARGUMENT_SPEC", None)
    if not isinstance(spec, dict):
        problems.append("%s: no module-level ARGUMENT_SPEC dict" % where)
        return
    if doc:
        compare(spec, own_fragment_options(doc, where, problems), where, problems)
        source = path.read_text()
        check_attributes(doc, source, where, problems)
        if "AnsibleAWSModule" in source:
            fragments = set(doc.get("extends_documentation_fragment") or [])
            missing = AWS_FRAGMENTS - fragments
            if missing:
                problems.append("%s: AWS module does not extend %s" % (where, ", ".join(sorted(missing))))
            if name not in group:
                problems.append("%s: AWS module is not in meta/runtime.yml action_groups.aws, so "
                                "module_defaults group/drguard.sandbox.aws misses it" % where)


def main() -> int:
    problems: list[str] = []
    modules = sorted(p for p in (ROOT / "plugins" / "modules").glob("*.py") if p.name != "__init__.py")
    group = aws_group()
    for path in modules:
        check_module(path, problems, group)
    for role in sorted((ROOT / "roles").iterdir()) if (ROOT / "roles").exists() else []:
        if role.is_dir() and not (role / "meta" / "argument_specs.yml").exists():
            problems.append("roles/%s: no meta/argument_specs.yml" % role.name)
    for line in problems:
        print(line)
    print("check_docs: %d module(s), %d problem(s)" % (len(modules), len(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
