# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Filter ``drill_runs_dir``: where the drill's default (relative) output root lands.

From a checkout, beside ``playbooks/`` (``<checkout>/drill-runs``), whichever directory the user
runs from. From an installed collection (the playbook's directory lies under an
``ansible_collections`` tree: ``ansible-playbook drguard.sandbox.drill``, an AWX project whose
requirements installed the collection), the installed tree is no place for reports - it may be
read-only, shared between users or thrown away with a job's collections - so the root is the
working directory's ``drill-runs``. drill.yml (its output) and reap.yml (the runtime proofs it
reads) use this one rule.
"""

from __future__ import annotations

import os


def drill_runs_dir(playbook_dir, relative, cwd=None):
    """The absolute directory for the relative output root ``relative`` of a playbook in ``playbook_dir``."""
    parts = os.path.normpath(str(playbook_dir)).split(os.sep)
    if "ansible_collections" in parts:
        return os.path.normpath(os.path.join(cwd or os.getcwd(), str(relative)))
    return os.path.normpath(os.path.join(str(playbook_dir), os.pardir, str(relative)))


class FilterModule:
    def filters(self):
        return {"drill_runs_dir": drill_runs_dir}
