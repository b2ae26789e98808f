#!/usr/bin/env python3
"""Run ``molecule test`` for every scenario under molecule/ (sorted) and summarise.

    .venv/bin/python tools/run_molecule.py                 # every scenario
    .venv/bin/python tools/run_molecule.py sandbox_network # only these
    .venv/bin/python tools/run_molecule.py --list

A scenario is a directory of molecule/ holding a molecule.yml (molecule/shared/ holds the
create/destroy playbooks the scenarios share and is not one). Each runs with the
repository's Ansible configuration and collection path, and the virtualenv first on PATH,
from the repository root. One summary line per scenario; the exit code is non-zero when
any scenario failed (or none was found).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOLECULE_DIR = ROOT / "molecule"
VENV_BIN = ROOT / ".venv" / "bin"


def scenarios() -> list[str]:
    """Names of the scenario directories under molecule/, sorted."""
    if not MOLECULE_DIR.is_dir():
        return []
    return sorted(p.name for p in MOLECULE_DIR.iterdir() if (p / "molecule.yml").is_file())


def molecule_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / ".collections"),
        "ANSIBLE_LOCAL_TEMP": str(ROOT / ".ansible" / "tmp"),
        "PATH": str(VENV_BIN) + os.pathsep + env.get("PATH", ""),
        "ANSIBLE_NOCOLOR": env.get("ANSIBLE_NOCOLOR", "1"),
        "ANSIBLE_FORCE_COLOR": "0",
    })
    # The scenarios start their own emulator; never let a caller's endpoint leak in.
    for key in ("AWS_ENDPOINT_URL", "AWS_URL", "DRGUARD_EMULATOR_URL", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        env.pop(key, None)
    return env


def molecule_cmd() -> str:
    local = VENV_BIN / "molecule"
    return str(local) if local.exists() else "molecule"


def run(name: str, env: dict[str, str]) -> tuple[int, float]:
    started = time.monotonic()
    print("==> molecule test -s %s" % name, flush=True)
    proc = subprocess.Popen([molecule_cmd(), "test", "-s", name], cwd=ROOT, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Let molecule run its destroy step (it stops the emulator), then give up.
        proc.wait()
        raise
    return code, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*", help="run only these scenarios (default: all)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)

    found = scenarios()
    if args.list:
        print("\n".join(found))
        return 0
    unknown = sorted(set(args.scenario) - set(found))
    if unknown:
        print("run_molecule: unknown scenario(s) %s; known: %s" % (", ".join(unknown), ", ".join(found) or "none"),
              file=sys.stderr)
        return 2
    selected = [s for s in found if not args.scenario or s in args.scenario]
    if not selected:
        print("run_molecule: no scenario found under %s" % MOLECULE_DIR, file=sys.stderr)
        return 1

    env = molecule_env()
    (ROOT / ".ansible" / "tmp").mkdir(parents=True, exist_ok=True)
    results = []
    for name in selected:
        code, seconds = run(name, env)
        results.append((name, code, seconds))

    print("\nmolecule summary:")
    for name, code, seconds in results:
        print("  %-4s %-32s %6.1f s%s" % ("PASS" if code == 0 else "FAIL", name, seconds,
                                          "" if code == 0 else "  (exit code %d)" % code))
    failed = [name for name, code, _ in results if code != 0]
    print("%d scenario(s), %d passed, %d failed" % (len(results), len(results) - len(failed), len(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
