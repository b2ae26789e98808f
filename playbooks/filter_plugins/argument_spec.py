# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Filter ``spec_arguments``: a playbook's inputs with the defaults of its argument spec filled in.

``ansible.builtin.validate_argument_spec`` checks the inputs but hands nothing back, and
does not fill defaults. This filter runs the same validator (ansible-core's
``ArgumentSpecValidator``) on the same spec and returns its validated parameters: every
option of the spec, given or not, with the spec's default (also inside dict options) or
``None``. The spec file stays the one place that owns each default.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator


def spec_arguments(argument_spec, provided, strip_prefix=""):
    """Validate ``provided`` against ``argument_spec`` (the ``options`` mapping) and return every option.

    With ``strip_prefix`` (for example ``drill_``), top-level names lose that prefix in the result.
    """
    if not isinstance(argument_spec, dict) or not isinstance(provided, dict):
        raise AnsibleFilterError("spec_arguments needs the spec's options and the provided arguments as mappings.")
    result = ArgumentSpecValidator(argument_spec).validate(dict(provided))
    if result.error_messages:
        raise AnsibleFilterError("Validation of arguments failed: %s" % "; ".join(result.error_messages))
    values = result.validated_parameters
    if strip_prefix:
        values = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): v for k, v in values.items()}
    return values


class FilterModule:
    """The playbooks' argument-spec filters."""

    def filters(self):
        return {"spec_arguments": spec_arguments}
