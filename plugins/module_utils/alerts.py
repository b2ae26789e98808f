# Copyright: drguard maintainers
# Apache License 2.0
"""Structured drill alerts as CloudEvents 1.0 (docs/quarantine-and-alerts.md).

One event is one JSON object::

    {"specversion": "1.0", "id": "<uuid4>", "source": "drguard.sandbox/<drill id>",
     "type": "drguard.artifact.quarantined", "time": "2026-11-29T05:00:00.123Z",
     "subject": "orders.sqlite", "datacontenttype": "application/json",
     "drillid": "<drill id>", "data": {...}}

Every event is appended to the drill's ``alerts.jsonl`` (one object per line,
``O_APPEND`` under an exclusive lock, fsync, mode 0600, missing directories 0700). When the sink names an SNS
topic, an EventBridge bus or a CloudWatch Logs group, the event is delivered there
too, but only after that destination has been shown to belong to the drill (it
carries the tag ``drguard:drill-id`` = the drill's id): alerts never leave the
drill's sandbox for a production pipeline.

Alerts never carry secrets: :func:`check_no_secrets` refuses data whose keys look
like secret names or whose values look like key material, before anything is written.

Everything here raises :class:`AlertError` (a bad drill id too), except botocore errors
from the AWS destinations.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
import uuid
from datetime import datetime
from datetime import UTC

from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

# The ``alert_sink`` option of every module that emits alerts (doc fragment
# drguard.sandbox.alert_sink documents it).
ALERT_SINK_SPEC = dict(type="dict", required=True, options=dict(
    path=dict(type="path", required=True),
    sns_topic_arn=dict(type="str"),
    event_bus_name=dict(type="str"),
    log_group_name=dict(type="str"),
))

SPECVERSION = "1.0"
SOURCE_PREFIX = "drguard.sandbox/"
TYPE_PREFIX = "drguard."
CONTENT_TYPE = "application/json"
LOG_STREAM = "drguard-alerts"
EVENTBRIDGE_SOURCE = "drguard.sandbox"

TYPE_RE = re.compile(r"^drguard\.[a-z0-9]+(?:[._-][a-z0-9]+)*$")

# Key names that suggest a secret. Matching is on the key, case-insensitive.
SECRET_KEY_RE = re.compile(
    r"(pass(word|wd|phrase)?|secret|token|private[_-]?key|credential|api[_-]?key|access[_-]?key"
    r"|session[_-]?key|authorization|cookie|masking[_-]?key)", re.IGNORECASE)
# Values that look like key material or AWS credentials, whatever their key is called.
SECRET_VALUE_RES = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
)

_LOCAL_LOCK = threading.Lock()


class AlertError(ValueError):
    """An alert could not be built or delivered; the message says why and what to do."""


def event_source(drill_id: str) -> str:
    """The CloudEvents ``source`` of a drill: ``drguard.sandbox/<drill id>``."""
    return SOURCE_PREFIX + _drill_id(drill_id)


def _drill_id(drill_id: str) -> str:
    try:
        return validate_drill_id(drill_id)
    except DrillError as exc:
        raise AlertError(str(exc)) from None


def rfc3339_now(now: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds and a ``Z`` suffix."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


def check_no_secrets(data, where: str = "data") -> None:
    """Raise :class:`AlertError` when ``data`` holds something that looks like a secret.

    Keys are checked against :data:`SECRET_KEY_RE`, string values against
    :data:`SECRET_VALUE_RES`, recursively through dicts and lists. The message names
    the offending key path, never the value.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            here = "%s.%s" % (where, key)
            if SECRET_KEY_RE.search(str(key)):
                raise AlertError("alert %s: the key name looks like a secret; alerts must never carry "
                                 "secrets, so rename the key or leave the value out" % here)
            check_no_secrets(value, here)
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            check_no_secrets(value, "%s[%d]" % (where, i))
    elif isinstance(data, str):
        for pattern in SECRET_VALUE_RES:
            if pattern.search(data):
                raise AlertError("alert %s: the value looks like key material or an AWS access key; "
                                 "alerts must never carry secrets" % where)


def build_event(drill_id: str, type_: str, subject: str | None, data: dict, *,
                event_id: str | None = None, time: str | None = None) -> dict:
    """A CloudEvents 1.0 event of ``type_`` for ``drill_id`` with ``data`` as payload.

    ``type_`` must start with ``drguard.``; ``data`` must be a JSON-serializable dict
    without secrets (:func:`check_no_secrets`).
    """
    source = event_source(drill_id)
    if not isinstance(type_, str) or not TYPE_RE.match(type_):
        raise AlertError("alert type %r is not valid: use 'drguard.' followed by lowercase dotted words, "
                         "e.g. drguard.artifact.quarantined" % (type_,))
    if not isinstance(data, dict):
        raise AlertError("alert data must be a mapping, got %s" % type(data).__name__)
    check_no_secrets(data)
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AlertError("alert data is not JSON-serializable: %s" % exc) from None
    event = {
        "specversion": SPECVERSION,
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": type_,
        "time": time or rfc3339_now(),
        "datacontenttype": CONTENT_TYPE,
        # CloudEvents extension attribute (lowercase alphanumeric name).
        "drillid": drill_id,
        "data": data,
    }
    if subject is not None:
        if not isinstance(subject, str) or not subject:
            raise AlertError("alert subject must be a non-empty string when given")
        event["subject"] = subject
    return event


def encode_event(event: dict) -> bytes:
    """One line of ``alerts.jsonl``: compact JSON, sorted keys, newline-terminated."""
    return (json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def append_jsonl(path: str, event: dict) -> None:
    """Append ``event`` as one line to ``path`` (created 0600; missing directories created 0700).

    ``O_APPEND`` plus an exclusive ``flock`` keeps concurrent writers (threads of one
    module or several processes) from interleaving lines; ``fsync`` makes the line
    durable before the caller reports the alert as emitted. A symlink at ``path`` is
    refused (``O_NOFOLLOW``).
    """
    line = encode_event(event)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        # Every missing directory 0700, whatever the umask; an existing one is used as it is.
        try:
            ensure_private_dir(directory, parents=True)
        except OSError as exc:
            raise AlertError("cannot create the directory of alert sink %s: %s" % (path, exc)) from None
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AlertError("alert sink %s is a symlink; point alert_sink.path at a regular file" % path) from None
        raise AlertError("cannot open alert sink %s: %s" % (path, exc.strerror)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AlertError("alert sink %s is not a regular file" % path)
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        with _LOCAL_LOCK:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list:
    """All events in ``path`` (for tests and reports); a missing file has none."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []


SINK_KEYS = ("path", "sns_topic_arn", "event_bus_name", "log_group_name")


def parse_sink(sink) -> dict:
    """Validate an ``alert_sink`` option; returns it with every known key present."""
    if not isinstance(sink, dict):
        raise AlertError("alert_sink must be a mapping with at least 'path'")
    unknown = sorted(set(sink) - set(SINK_KEYS))
    if unknown:
        raise AlertError("alert_sink: unknown key(s) %s; allowed: %s" % (", ".join(unknown), ", ".join(SINK_KEYS)))
    if not isinstance(sink.get("path"), str) or not sink["path"].strip():
        raise AlertError("alert_sink.path is required: the alerts.jsonl file in the drill's output directory")
    out = {key: sink.get(key) or None for key in SINK_KEYS}
    if out["sns_topic_arn"] and not str(out["sns_topic_arn"]).startswith("arn:"):
        raise AlertError("alert_sink.sns_topic_arn %r is not an ARN" % (out["sns_topic_arn"],))
    return out


def needs_aws(sink: dict) -> bool:
    return bool(sink.get("sns_topic_arn") or sink.get("event_bus_name") or sink.get("log_group_name"))


class AlertSink:
    """Emits a drill's events: always to ``alerts.jsonl``, plus the configured AWS sinks.

    ``client`` is a callable ``client("sns")`` returning a boto3 client whose calls retry
    (``lambda s: _aws.aws_client(module, s)``); it is only called when an AWS destination
    is configured.
    Each AWS destination is checked once for the drill's tag before the first
    delivery (fail closed: an untagged or unreadable destination is refused).
    """

    def __init__(self, drill_id: str, sink: dict, client=None):
        self.drill_id = _drill_id(drill_id)
        self.sink = parse_sink(sink)
        self.client = client
        self._clients = {}
        self._verified = set()
        self._lock = threading.Lock()
        if needs_aws(self.sink) and client is None:
            raise AlertError("alert_sink names an AWS destination but no AWS client is available")

    # -- AWS destinations ----------------------------------------------------------
    def _c(self, service):
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self.client(service)
            return self._clients[service]

    def _require_drill_tag(self, what: str, tags: dict) -> None:
        if tags.get(TAG_DRILL_ID) != self.drill_id:
            raise AlertError("%s is not tagged %s=%s, so it is not this drill's sink; alerts are only "
                             "delivered inside the drill's sandbox" % (what, TAG_DRILL_ID, self.drill_id))

    def verify_destinations(self) -> None:
        """Prove every configured AWS destination belongs to the drill (tag check)."""
        s = self.sink
        if s["sns_topic_arn"] and "sns" not in self._verified:
            tags = self._c("sns").list_tags_for_resource(ResourceArn=s["sns_topic_arn"])["Tags"]
            self._require_drill_tag("SNS topic %s" % s["sns_topic_arn"], {t["Key"]: t["Value"] for t in tags})
            self._verified.add("sns")
        if s["event_bus_name"] and "events" not in self._verified:
            events = self._c("events")
            arn = events.describe_event_bus(Name=s["event_bus_name"])["Arn"]
            tags = events.list_tags_for_resource(ResourceARN=arn)["Tags"]
            self._require_drill_tag("EventBridge bus %s" % s["event_bus_name"],
                                    {t["Key"]: t["Value"] for t in tags})
            self._verified.add("events")
        if s["log_group_name"] and "logs" not in self._verified:
            logs = self._c("logs")
            groups = logs.describe_log_groups(logGroupNamePrefix=s["log_group_name"])["logGroups"]
            match = [g for g in groups if g["logGroupName"] == s["log_group_name"]]
            if not match:
                raise AlertError("CloudWatch Logs group %s does not exist; create it in the sandbox first"
                                 % s["log_group_name"])
            arn = match[0]["arn"].removesuffix(":*")
            tags = logs.list_tags_for_resource(resourceArn=arn).get("tags", {})
            self._require_drill_tag("CloudWatch Logs group %s" % s["log_group_name"], tags)
            self._verified.add("logs")

    def _deliver_aws(self, event: dict) -> None:
        s = self.sink
        body = encode_event(event).decode().rstrip("\n")
        if s["sns_topic_arn"]:
            self._c("sns").publish(
                TopicArn=s["sns_topic_arn"], Message=body, Subject=event["type"][:100],
                MessageAttributes={"type": {"DataType": "String", "StringValue": event["type"]},
                                   "drill_id": {"DataType": "String", "StringValue": self.drill_id}})
        if s["event_bus_name"]:
            result = self._c("events").put_events(Entries=[{
                "EventBusName": s["event_bus_name"], "Source": EVENTBRIDGE_SOURCE,
                "DetailType": event["type"], "Detail": body, "Resources": []}])
            if result.get("FailedEntryCount"):
                raise AlertError("EventBridge refused alert %s: %s" % (
                    event["id"], result["Entries"][0].get("ErrorMessage", "unknown error")))
        if s["log_group_name"]:
            logs = self._c("logs")
            try:
                logs.create_log_stream(logGroupName=s["log_group_name"], logStreamName=LOG_STREAM)
            except logs.exceptions.ResourceAlreadyExistsException:
                pass
            now_ms = int(datetime.now(UTC).timestamp() * 1000)
            logs.put_log_events(logGroupName=s["log_group_name"], logStreamName=LOG_STREAM,
                                logEvents=[{"timestamp": now_ms, "message": body}])

    # -- emitting ---------------------------------------------------------------------
    def emit(self, type_: str, subject: str | None, data: dict, event_id: str | None = None) -> dict:
        """Build, append to ``alerts.jsonl`` and deliver one event; returns the event.

        The local line is written first, so an AWS delivery failure (raised as
        :class:`AlertError` or a botocore error) never loses the alert. Callers that
        must fail before acting call :meth:`verify_destinations` up front. ``event_id``
        lets a caller that records the id elsewhere choose it (default: a new uuid4).
        """
        event = build_event(self.drill_id, type_, subject, data, event_id=event_id)
        append_jsonl(self.sink["path"], event)
        if needs_aws(self.sink):
            self.verify_destinations()
            self._deliver_aws(event)
        return event
