#!/usr/bin/env python3
"""Run ``ansible-test sanity`` on this collection, offline (``make sanity``).

    .venv/bin/python tools/sanity.py                     # every sanity test that applies
    .venv/bin/python tools/sanity.py --test validate-modules --test pylint

ansible-test needs the collection at ``.../ansible_collections/drguard/sandbox``: the artifact
users install (``ansible-galaxy collection build`` of the checkout) is unpacked into a temporary
tree of that shape, next to the amazon.aws collection it depends on (the one the virtualenv's
``ansible`` package ships), and ansible-test runs there with the virtualenv's Python.
``tests/sanity/`` (ignore files, if any) is copied in as well, and one ignore is added for every
module: the GPLv3-header check of validate-modules (the collection is Apache-2.0).

Offline: ansible-test runs each sanity test in a virtualenv of its own, which it bootstraps
with pip's ``get-pip.py`` downloaded from Ansible's CI file server, and then fills with its
pinned requirements from the package index. Where that script is not cached yet
(``~/.ansible/test/cache/get_pip_<version>.py``) a local stand-in is written there: it installs
the pip that ships with Python (``ensurepip``) and then the requested pip version from the
configured package index, so nothing but the package index is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

BOOTSTRAP = '''\
"""Offline stand-in for pip's get-pip.py, written by drguard.sandbox's tools/sanity.py.

Installs the pip bundled with Python (ensurepip), then the requested packages from the
configured package index. get-pip.py's own options (--no-setuptools, --no-wheel) are dropped.
"""
import ensurepip
import os
import subprocess
import sys

# ensurepip points PIP_CONFIG_FILE at /dev/null for its own run: keep the user's pip settings.
env = dict(os.environ)
ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args], env=env))
'''


def pip_version() -> str:
    """The pip version ansible-test bootstraps its sanity virtualenvs with."""
    from ansible_test._internal import python_requirements

    source = Path(python_requirements.__file__).read_text()
    match = re.search(r"default_packages = dict\(\s*pip='([0-9.]+)'", source)
    if not match:
        raise SystemExit("sanity: cannot find the pip version ansible-test bootstraps with in %s"
                         % python_requirements.__file__)
    return match.group(1)


def ensure_bootstrap() -> Path:
    """Write the offline get-pip stand-in where ansible-test looks for its cached script (if none is there)."""
    cache = Path.home() / ".ansible" / "test" / "cache" / ("get_pip_%s.py" % pip_version().replace(".", "_"))
    if not cache.exists() or cache.read_text().startswith('"""Offline stand-in'):
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(BOOTSTRAP)
    return cache


def write_license_ignores(target: Path) -> Path:
    """Add to the staged ignore file of this ansible-core version: every module's GPLv3-header check.

    validate-modules wants a GPLv3 header in every module; this collection is Apache-2.0
    (galaxy.yml), so such a header would misstate the module's license. Generated here for each
    module, so that a new module needs no ignore line of its own and no other check is ignored.
    """
    from ansible.release import __version__

    ignore = target / "tests" / "sanity" / ("ignore-%s.txt" % ".".join(__version__.split(".")[:2]))
    ignore.parent.mkdir(parents=True, exist_ok=True)
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    for module in sorted((target / "plugins" / "modules").glob("*.py")):
        if module.name != "__init__.py":
            lines.append("plugins/modules/%s validate-modules:missing-gplv3-license"
                         " # the collection is Apache-2.0 (galaxy.yml), not GPLv3" % module.name)
    ignore.write_text("".join(line + "\n" for line in lines))
    return ignore


def stage(dest: Path) -> Path:
    """Build the collection and unpack it to ``dest/ansible_collections/drguard/sandbox``; return that path."""
    dist = dest / "dist"
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(dist), str(ROOT)],
                   check=True, stdout=subprocess.DEVNULL)
    (tarball,) = dist.glob("*.tar.gz")
    target = dest / "ansible_collections" / "drguard" / "sandbox"
    target.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(target, filter="data")
    shutil.rmtree(dist)
    if (ROOT / "tests" / "sanity").is_dir():
        shutil.copytree(ROOT / "tests" / "sanity", target / "tests" / "sanity")
    write_license_ignores(target)
    import ansible_collections.amazon.aws as amazon_aws

    (dest / "ansible_collections" / "amazon").mkdir()
    os.symlink(list(amazon_aws.__path__)[0], dest / "ansible_collections" / "amazon" / "aws")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", action="append", default=[], help="run only this sanity test (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the staged tree (its path is printed)")
    args = parser.parse_args(argv)

    ensure_bootstrap()
    tmp = Path(tempfile.mkdtemp(prefix="drguard-sanity-"))
    try:
        target = stage(tmp)
        version = "%d.%d" % sys.version_info[:2]
        cmd = [str(VENV_BIN / "ansible-test"), "sanity", "--python", version, "--color", "no"]
        for name in args.test:
            cmd += ["--test", name]
        env = dict(os.environ, PATH=str(VENV_BIN) + os.pathsep + os.environ.get("PATH", ""))
        # The collection under test is the staged copy: never one from a configured collection path.
        for key in ("ANSIBLE_CONFIG", "ANSIBLE_COLLECTIONS_PATH", "ANSIBLE_COLLECTIONS_PATHS"):
            env.pop(key, None)
        print("==> %s (in %s)" % (" ".join(cmd), target), flush=True)
        return subprocess.call(cmd, cwd=target, env=env)
    finally:
        if args.keep:
            print("sanity: staged tree kept at %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
