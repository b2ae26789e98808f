# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""Small boto3 helpers shared by our modules (private)."""

from __future__ import annotations

import functools
import threading
import time

try:
    import boto3
    import botocore.config
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
    from botocore.exceptions import NoRegionError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    ClientError = None

from ansible_collections.amazon.aws.plugins.module_utils.botocore import get_aws_connection_info
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

# Codes that mean "slow down" or "try again in a moment", on top of those amazon.aws'
# AWSRetry already knows (RequestLimitExceeded, Throttling, TooManyRequestsException,
# ServiceUnavailable, Unavailable, InternalError, InternalFailure). Never a code that could
# mean "denied" or "not there": those are answers, not transient states.
TRANSIENT_CODES = (
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "SlowDown", "EC2ThrottledException", "BandwidthLimitExceeded", "PriorRequestNotComplete",
    "ProvisionedThroughputExceededException", "InternalServerError",
    "InternalServiceError", "InternalServiceErrorException", "ServiceFailure", "RequestTimeout",
    "RequestTimeoutException", "KMSInternalException", "ConcurrentModificationException",
    "OperationAborted",
)
# Backoff of every AWS call: at most RETRIES attempts in all (amazon.aws counts the first),
# jittered sleeps starting at up to RETRY_DELAY seconds, doubling, capped at RETRY_MAX_DELAY.
RETRIES = 8
RETRY_DELAY = 1.0
RETRY_MAX_DELAY = 20.0


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError (``"AccessDenied"``), ``""`` for anything else."""
    if ClientError is not None and isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "") or "")
    return ""


# Codes that mean "no such thing" across the services we use (IAM, S3, EC2 ``*.NotFound``,
# Secrets Manager / KMS / Logs ``*NotFoundException``); S3 objects: _s3_location.
NOT_FOUND_CODES = frozenset({"NoSuchEntity", "NoSuchBucket", "NotFoundException", "ResourceNotFoundException",
                             "NotFound", "NatGatewayNotFound"})


def is_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` is AWS saying that the thing asked for does not exist."""
    code = error_code(exc)
    return bool(code) and (code in NOT_FOUND_CODES or code.endswith(("NotFound", "NotFoundException")))


def get_or_none(call, key: str, **kwargs):
    """``call(**kwargs)[key]``, or None when AWS says that the thing asked for does not exist; any other
    error propagates (``iam.get_role``, ``iam.get_instance_profile``, ...)."""
    try:
        return call(**kwargs)[key]
    except ClientError as exc:
        if not is_not_found(exc):
            raise
        return None


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


def backoff():
    """The one retry decorator of the collection: jittered backoff on transient AWS errors."""
    return AWSRetry.jittered_backoff(retries=RETRIES, delay=RETRY_DELAY, max_delay=RETRY_MAX_DELAY,
                                     catch_extra_error_codes=list(TRANSIENT_CODES))


class RetryingClient:
    """A boto3 client whose every API call retries transient errors with jittered backoff.

    amazon.aws' ``module.client(..., retry_decorator=...)`` retries only the calls made with
    ``aws_retry=True``; this proxy retries all of them, so no call can forget. Paginated
    listings go through :func:`paginate`, which retries the listing as a whole.
    """

    _PLAIN = frozenset({"get_paginator", "get_waiter", "can_paginate", "generate_presigned_url",
                        "generate_presigned_post", "meta", "exceptions"})

    def __init__(self, client, decorator=None):
        self.unwrapped = client
        self._decorator = decorator or backoff()

    def __getattr__(self, name):
        attr = getattr(self.unwrapped, name)
        if name in self._PLAIN or name.startswith("_") or not callable(attr):
            return attr
        wrapped = functools.wraps(attr)(self._decorator(attr))
        setattr(self, name, wrapped)  # built once per method
        return wrapped


def aws_client(module, service: str, **kwargs) -> RetryingClient:
    """The one way our modules get a client: amazon.aws' connection settings, every call retried.

    Region, endpoint, credentials and profile come from amazon.aws' common options exactly as
    for ``module.client``; ``kwargs`` override them (``region=...``, ``endpoint=...``,
    ``config=...``). All clients of one module run share one boto3 session, so each service
    model is loaded once per module run instead of once per client (amazon.aws opens a new
    session for every client: 0.1-0.15 s each, most of a sweep's start-up).
    """
    region, endpoint, params = get_aws_connection_info(module)
    params = dict(params, region=region, endpoint=endpoint)
    params.update(kwargs)
    return RetryingClient(_client(module, service, **params))


_SESSION_LOCK = threading.Lock()  # boto3 sessions are not thread-safe; clients are


def _client(module, service, *, region=None, endpoint=None, profile_name=None, config=None, aws_config=None,
            **params):
    merged = botocore.config.Config(user_agent_extra="drguard.sandbox")
    for extra in (config, aws_config):
        if extra:
            merged = merged.merge(extra if isinstance(extra, botocore.config.Config)
                                  else botocore.config.Config(**extra))
    try:
        with _SESSION_LOCK:
            sessions = module.__dict__.setdefault("_drguard_boto3_sessions", {})
            if profile_name not in sessions:
                sessions[profile_name] = boto3.session.Session(profile_name=profile_name)
            return sessions[profile_name].client(service, config=merged, region_name=region, endpoint_url=endpoint,
                                                 **params)
    except NoRegionError:
        module.fail_json(msg="The %s module requires a region and none was found in configuration, environment "
                             "variables or module parameters" % getattr(module, "_name", "drguard.sandbox"))
    except (ValueError, BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="Couldn't connect to AWS")


def paginate(client, op: str, key: str, **kwargs) -> list:
    """Every item under ``key`` of ``op``, following pagination when the API has it.

    A transient error part-way restarts the listing (listings are read-only), with the
    same backoff as every other call.
    """
    def listing():
        if client.can_paginate(op):
            out = []
            for page in client.get_paginator(op).paginate(**kwargs):
                out.extend(page.get(key) or [])
            return out
        # The raw method: the whole listing is what retries, not each call again inside it.
        return getattr(getattr(client, "unwrapped", client), op)(**kwargs).get(key) or []
    return backoff()(listing)()


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
