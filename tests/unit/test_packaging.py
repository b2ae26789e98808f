"""Ansible packs a module's module_utils (AnsiballZ) by reading its import statements.

A module_utils file that is only named in a string (``importlib.import_module("...")``) is
not packed: the module then works in-process in pytest but fails in a real play with
ModuleNotFoundError. Every collection module named in a string must also be imported by a
plain import statement in the same file (inside a function is fine: still lazy).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"^ansible_collections\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.plugins\.module_utils(\.[A-Za-z0-9_]+)+$")
FILES = sorted((ROOT / "plugins").rglob("*.py"))


def _static_imports(tree: ast.AST) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update("%s.%s" % (node.module, alias.name) for alias in node.names)
    return names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_module_utils_named_in_strings_are_also_imported_plainly(path):
    tree = ast.parse(path.read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and NAME.match(n.value)}
    missing = sorted(strings - _static_imports(tree))
    assert not missing, "%s names %s only in a string: AnsiballZ will not pack it" % (path.name, missing)


def test_the_check_catches_a_string_only_import():
    tree = ast.parse('import importlib\nM = "ansible_collections.drguard.sandbox.plugins.module_utils._x"\n'
                     'importlib.import_module(M)\n')
    assert "ansible_collections.drguard.sandbox.plugins.module_utils._x" not in _static_imports(tree)
