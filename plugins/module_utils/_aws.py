# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Small boto3 helpers shared by our modules (private)."""

from __future__ import annotations


def paginate(client, op: str, key: str, **kwargs) -> list:
    """Every item under ``key`` of ``op``, following pagination when the API has it."""
    if client.can_paginate(op):
        out = []
        for page in client.get_paginator(op).paginate(**kwargs):
            out.extend(page.get(key) or [])
        return out
    return getattr(client, op)(**kwargs).get(key) or []


def hide_session_credentials(module) -> None:
    """Treat every credential option as a secret in this module's output.

    amazon.aws declares ``access_key`` without ``no_log`` (an access key id alone is not
    a secret to AWS), but a drill's minted session must not be traceable in logs: its
    key id is censored like the secret key and the session token.
    """
    for name in ("access_key", "secret_key", "session_token"):
        value = module.params.get(name)
        if value:
            module.no_log_values.add(value)
