"""Faults injected into real boto3 clients talking to the real emulator (test-only).

:func:`throttle` answers chosen API calls with a throttling error *above* botocore's own
retries (``BaseClient._make_api_call``), so only a client that retries every call itself
(``_aws.aws_client``) can recover. One helper for every test that proves a retry.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from unittest import mock


@contextmanager
def throttle(*operations, times=1, code="Throttling", status=400, match=None):
    """The first ``times`` calls (every call: ``times=None``) of each of ``operations`` answer ``code``.

    ``match(params)`` narrows it to the calls whose parameters it accepts (a bucket, a drill
    id). Yields ``{operation: matching calls so far}``: its keys are the operations that were
    throttled. Contexts nest (each wraps whatever is patched when it starts).
    """
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    real, seen, lock = BaseClient._make_api_call, {}, threading.Lock()

    def call(client, name, params):
        if name in operations and (match is None or match(params)):
            with lock:
                seen[name] = seen.get(name, 0) + 1
                fail = times is None or seen[name] <= times
            if fail:
                raise ClientError({"Error": {"Code": code, "Message": "injected"},
                                   "ResponseMetadata": {"HTTPStatusCode": status}}, name)
        return real(client, name, params)

    with mock.patch.object(BaseClient, "_make_api_call", call):
        yield seen
