# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Small boto3 helpers shared by our modules (private)."""

from __future__ import annotations

import time

try:
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    ClientError = None


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError (``"AccessDenied"``), ``""`` for anything else."""
    if ClientError is not None and isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "") or "")
    return ""


def describe_error(exc: BaseException) -> str:
    """One line for a boto or our own error: ``Code: message`` for a ClientError."""
    if ClientError is not None and isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return "%s: %s" % (err.get("Code", "Error"), err.get("Message", "") or str(exc))
    return str(exc) or exc.__class__.__name__


def retry_while(call, transient, wait: float, *, sleep=time.sleep, clock=time.monotonic):
    """``call()`` until it returns, retrying errors that ``transient(exc)`` calls temporary.

    For what IAM's eventual consistency causes: a role created a moment ago that STS or a
    service cannot assume yet. Backoff 1, 2, 4, 8, 8 ... s; once the next attempt would
    start after ``wait`` seconds the last error is raised. Other errors are raised at once.
    """
    deadline = clock() + wait
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as exc:
            if not transient(exc) or clock() + delay > deadline:
                raise
        sleep(delay)
        delay = min(delay * 2, 8.0)


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
