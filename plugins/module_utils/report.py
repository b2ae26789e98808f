# -*- coding: utf-8 -*-
# Copyright: drguard maintainers
# Apache License 2.0
"""The drill report (docs/report.md): build it from what the phases returned, render it.

RTO and RPO as measured here:

* RTO measured = seconds from the drill's start (the simulated disaster) until the
  restore was validated. Not measured when the drill never got there.
* RPO measured = seconds between the backup set's ``created_at`` and the drill's
  start: the data a real disaster at that moment would have lost.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = Exception

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import describe_error
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._io import check_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_prefix
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import s3_uri

OUTCOMES = ("passed", "failed", "halted")

# What outlives the job (docs/awx.md): the report, its rendering, the alerts and the drill's state,
# relative to the drill's output directory. Missing ones (a drill that stopped early) are skipped.
DURABLE_FILES = ("drill-report.json", "drill-report.md", "alerts.jsonl", "state.json", "runtime/state.json")
_TAG_DRILL_ID = "drguard:drill-id"

# The report's overhead split: seconds spent building and proving the boundary vs recovering.
BOUNDARY_PHASES = ("network", "prove", "runtime", "probes", "mtls")
RECOVERY_PHASES = ("restore", "validate")


def _seconds(start, end):
    if start is None or end is None:
        return None
    return round(max(0.0, float(end) - float(start)), 3)


def build_phases(marks: list, finished: float, failed_phase: str | None) -> list:
    """``marks`` = [{name, started}] in order -> [{name, status, seconds}].

    A phase ends where the next one starts (or at ``finished``). The failed phase is
    ``failed``; phases after it never ran.
    """
    phases = []
    failed_seen = False
    for i, mark in enumerate(marks):
        end = marks[i + 1]["started"] if i + 1 < len(marks) else finished
        if mark.get("finished") is not None:
            end = mark["finished"]
        status = mark.get("status")
        if status is None:
            if failed_phase and mark["name"] == failed_phase:
                status, failed_seen = "failed", True
            else:
                status = "skipped" if failed_seen else "passed"
        phases.append({"name": mark["name"], "status": status,
                       "seconds": _seconds(mark.get("started"), end)})
    return phases


def decide_outcome(*, halted: bool, failed_phase: str | None, error: str | None, teardown: dict | None,
                   teardown_error: str | None, recovery: dict) -> tuple:
    """The drill's verdict: ``(outcome, failed_phase, error)``; the one place that decides it.

    In order: a safety gate that stopped the drill on purpose (``halted``) is ``halted``; a
    phase that failed is ``failed``; then the teardown fails the drill when it reported an
    error or did not prove that zero resources remain (also when it never ran: fail
    closed); then a missed RTO/RPO target fails it. Otherwise ``passed``.
    """
    if halted or failed_phase or error:
        return ("halted" if halted else "failed"), failed_phase, error or "unknown error"
    if teardown_error:
        return "failed", "teardown", teardown_error
    if teardown is None or teardown.get("remaining") != 0:
        return "failed", "teardown", "teardown did not prove that zero resources remain"
    missed = [key.upper() for key, value in recovery.items() if value["met"] is False]
    if missed:
        return "failed", "recovery", "%s target not met" % " and ".join(missed)
    return "passed", None, None


def measure(targets: dict, drill_started: float, recovered_at: float | None,
            backup_created_epoch: float | None) -> dict:
    """RTO/RPO measured vs targets. A target not met, or not measurable, is not met."""
    rto = _seconds(drill_started, recovered_at) if recovered_at else None
    rpo = _seconds(backup_created_epoch, drill_started) if backup_created_epoch else None
    out = {}
    for key, value in (("rto", rto), ("rpo", rpo)):
        target = (targets or {}).get("%s_seconds" % key)
        out[key] = {
            "measured_seconds": value,
            "target_seconds": target,
            "met": None if target is None else (value is not None and value <= float(target)),
        }
    return out


def overhead(phases: list) -> dict:
    """Seconds of boundary work (network, prove, runtime, probes, mtls) vs recovery work (restore, validate)."""
    secs = {p["name"]: p["seconds"] for p in phases if p.get("seconds") is not None}
    boundary = {n: secs[n] for n in BOUNDARY_PHASES if n in secs}
    recovery = {n: secs[n] for n in RECOVERY_PHASES if n in secs}
    b, r = round(sum(boundary.values()), 3), round(sum(recovery.values()), 3)
    return {"boundary_seconds": b, "recovery_seconds": r, "boundary_phases": boundary, "recovery_phases": recovery,
            # Of the time the boundary and the recovery took together, the boundary's share.
            "boundary_share": round(b / (b + r), 3) if b + r > 0 else None}


def runtime_section(runtime: dict | None, probes: dict | None, verify: dict | None) -> dict | None:
    """The report's ``runtime``: what ran inside the boundary, the live verification and the probe matrix."""
    if not runtime:
        return None
    backend = runtime.get("backend")
    out = {"backend": backend, "prefix": runtime.get("prefix"),
           # A namespace (netns) or an instance (ec2): each unit says where its tier ran.
           "units": [{k: u.get(k) for k in ("tier", "ns", "instance_id", "address") if k in u}
                     for u in runtime.get("units") or []],
           "rules": runtime.get("rules")}
    if backend == "none":
        out["note"] = "runtime backend none: nothing ran inside the boundary; no live probes"
        return out
    if verify is not None:
        out["isolated"] = verify.get("isolated")
        out["findings"] = verify.get("findings") or []
    if probes is not None:
        out["probes"] = probes.get("rows") or []
        out["counters"] = probes.get("counters") or {}
        out["violations"] = len(probes.get("violations") or [])
    return out


def _handshakes(events) -> tuple:
    """Handshake records (peer id, serial, accepted, reason, latency) and their counts."""
    keys = ("local_tier", "port", "peer_id", "peer_tier", "serial", "accepted", "reason", "latency_ms")
    handshakes = [{k: h.get(k) for k in keys} for h in events or []]
    by_reason = {}
    for h in handshakes:
        by_reason[h["reason"]] = by_reason.get(h["reason"], 0) + 1
    accepted = sum(1 for h in handshakes if h["accepted"])
    return handshakes, {"handshakes": len(handshakes), "accepted": accepted, "refused": len(handshakes) - accepted,
                        "by_reason": by_reason}


def mtls_section(mtls: dict | None) -> dict | None:
    """The report's ``mtls`` (docs/mtls.md): the CA, every handshake the tiers' servers saw (peer id, serial,
    accepted, reason), the handshake probes, the leaf and CA rotations. None when the phase did not run."""
    if not mtls:
        return None
    if mtls.get("skipped"):
        return {"skipped": True, "note": mtls.get("note")}
    handshakes, counts = _handshakes(mtls.get("handshakes"))
    services, service_counts = _handshakes(mtls.get("service_handshakes"))
    ca = mtls.get("ca") or {}
    return {"trust_domain": mtls.get("trust_domain"),
            "ca": {k: ca.get(k) for k in ("serial", "sha256", "not_after")},
            "servers": mtls.get("servers") or [],
            "handshakes": handshakes,
            "counts": counts,
            # The tier services' own handshakes (the db service of phase validate), apart from the phase's servers.
            "service_handshakes": services,
            "service_counts": service_counts,
            "probes": mtls.get("rows") or [],
            "violations": len(mtls.get("violations") or []),
            "unexpected": len(mtls.get("unexpected") or []),
            "rotation": mtls.get("rotation"),
            "ca_rotation": mtls.get("ca_rotation"),
            "telemetry": mtls.get("telemetry")}


def _cell(value) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    """A human-readable rendering of the report for auditors."""
    lines = ["# Drill report: %s" % report["drill_id"], ""]
    lines += ["| | |", "|---|---|",
              "| Outcome | **%s** |" % report["outcome"],
              "| Started | %s |" % report["started_at"],
              "| Finished | %s |" % report["finished_at"],
              "| Duration | %s s |" % report["seconds"],
              "| Region | %s |" % report.get("region", ""),
              ]
    if report.get("failed_phase"):
        lines.append("| Failed phase | %s |" % report["failed_phase"])
    if report.get("error"):
        lines.append("| Error | %s |" % str(report["error"]).replace("|", "\\|").replace("\n", " "))
    lines += ["", "## Phases", "", "| phase | status | seconds |", "|---|---|---|"]
    lines += ["| %s | %s | %s |" % (p["name"], p["status"], p["seconds"]) for p in report["phases"]]

    b = report.get("boundary") or {}
    lines += ["", "## Boundary proof", ""]
    if b:
        lines.append("Isolated: **%s** (VPC %s)" % (b.get("isolated"), b.get("vpc_id")))
        findings = b.get("findings") or []
        if findings:
            lines += ["", "| code | resource | detail |", "|---|---|---|"]
            lines += ["| %s | %s | %s |" % (f.get("code"), f.get("resource"), f.get("detail")) for f in findings]
    else:
        lines.append("Not reached.")

    a = report.get("artifacts") or {}
    lines += ["", "## Backup artifacts", ""]
    if a:
        m = a.get("manifest") or {}
        lines.append("Verified: **%s**; backup set %s, sequence %s, created %s; %s bytes hashed."
                     % (a.get("verified"), m.get("backup_set"), m.get("sequence"),
                        m.get("created_at"), a.get("bytes_hashed")))
        items = a.get("artifacts") or []
        if items:
            lines += ["", "| artifact | verified | reason | signed size | signed sha256 |", "|---|---|---|---|---|"]
            lines += ["| %s | %s | %s | %s | %s |" % (i.get("name"), i.get("verified"), i.get("reason") or "",
                                                      i.get("size"), i.get("sha256") or "")
                      for i in items]
        failures = [f for f in a.get("failures") or [] if f.get("name") is None]
        for f in failures:
            lines.append("- manifest: **%s**: %s" % (f.get("reason"), f.get("detail")))
    else:
        lines.append("Not reached.")

    q = report.get("quarantine") or []
    if q:
        lines += ["", "## Quarantine", "", "| artifact | reason | location |", "|---|---|---|"]
        lines += ["| %s | %s | %s |" % (r.get("name"), r.get("reason"),
                                        r.get("quarantine_location") or r.get("location"))
                  for r in q]

    v = report.get("validation") or {}
    if v.get("checks") or v.get("command_rc") is not None:
        lines += ["", "## Restore validation", "", "| artifact | kind | valid | detail |", "|---|---|---|---|"]
        lines += ["| %s | %s | %s | %s |" % (c.get("name"), c.get("kind"), c.get("valid"), c.get("detail"))
                  for c in v.get("checks") or []]
        if v.get("command_rc") is not None:
            lines += ["", "Validation command: exit %s" % v["command_rc"]]
            if v.get("command_stdout"):
                lines += ["", "```", str(v["command_stdout"]).rstrip()[:2000], "```"]

    ident = report.get("identity") or {}
    if ident.get("role_arn"):
        lines += ["", "## Identity", "",
                  "Drill role %s, session expiring %s; secrets (%s): %s."
                  % (ident["role_arn"], ident.get("expiration"), ident.get("secret_store"),
                     ", ".join(ident.get("secret_names") or []) or "none")]

    rt = report.get("runtime")
    lines += ["", "## Sandbox runtime", ""]
    if not rt:
        lines.append("Not reached.")
    elif rt.get("note"):
        lines.append(rt["note"] + ".")
    else:
        lines.append("Backend %s; %d unit(s): %s." % (rt.get("backend"), len(rt.get("units") or []), ", ".join(
            "%s %s" % (u.get("tier"), u.get("address")) for u in rt.get("units") or [])))
        if "isolated" in rt:
            lines.append("Live rules verified: isolated **%s**." % rt["isolated"])
            if rt.get("findings"):
                lines += ["", "| code | resource | detail |", "|---|---|---|"]
                lines += ["| %s | %s | %s |" % (_cell(f.get("code")), _cell(f.get("resource")), _cell(f.get("detail")))
                          for f in rt["findings"]]
        if "probes" in rt:
            lines += ["", "Probe matrix: %d row(s), %d violation(s)." % (len(rt["probes"]), rt.get("violations", 0)),
                      "", "| from | to | address | expected | observed | reason | ms |",
                      "|---|---|---|---|---|---|---|"]
            lines += ["| %s | %s | %s | %s | %s | %s | %s |" % tuple(_cell(row.get(k)) for k in (
                "src", "dst", "address", "expected", "observed", "reason", "latency_ms")) for row in rt["probes"]]
            delta = (rt.get("counters") or {}).get("delta") or {}
            if delta:
                lines += ["", "Counters during the probes: " + ", ".join(
                    "%s +%s" % (k, v) for k, v in sorted(delta.items()))]

    m = report.get("mtls")
    if m and m.get("skipped"):
        lines += ["", "## mTLS between the tiers", "", "Not run: %s." % m.get("note")]
    elif m:
        c, ca, sc = m.get("counts") or {}, m.get("ca") or {}, m.get("service_counts") or {}
        lines += ["", "## mTLS between the tiers", "",
                  "Trust domain %s; CA %s, sha256 %s, valid until %s." % (
                      m.get("trust_domain"), ca.get("serial"), ca.get("sha256"), ca.get("not_after")),
                  "%s handshake(s): %s accepted, %s refused (%s)." % (
                      c.get("handshakes"), c.get("accepted"), c.get("refused"),
                      ", ".join("%s %s" % kv for kv in sorted((c.get("by_reason") or {}).items())) or "none"),
                  "Tier services (the db service): %s handshake(s): %s accepted, %s refused (%s)." % (
                      sc.get("handshakes", 0), sc.get("accepted", 0), sc.get("refused", 0),
                      ", ".join("%s %s" % kv for kv in sorted((sc.get("by_reason") or {}).items())) or "none"),
                  "", "Handshake probes: %d row(s), %d violation(s), %d refused for another reason." % (
                      len(m.get("probes") or []), m.get("violations", 0), m.get("unexpected", 0)),
                  "", "| case | from | to | expected | observed | reason | ms |", "|---|---|---|---|---|---|---|"]
        lines += ["| %s | %s | %s | %s | %s | %s | %s |" % tuple(_cell(row.get(k)) for k in (
            "case", "src", "dst", "expected", "observed", "reason", "latency_ms")) for row in m.get("probes") or []]
        rot, car = m.get("rotation") or {}, m.get("ca_rotation") or {}
        lines += ["", "Leaf rotation (%s): rotated %s, dropped connections %s, failed handshakes %s, serials %s." % (
            rot.get("pair"), rot.get("rotated"), rot.get("dropped_connections"), rot.get("failed_handshakes"),
            " -> ".join(rot.get("new_serials") or []) or "none"),
            "CA rotation: rotated %s (%s -> %s), old CA key destroyed %s." % (
                car.get("rotated"), car.get("old_ca"), car.get("new_ca"), car.get("old_ca_key_destroyed"))]

    tel = report.get("telemetry")
    if tel and tel.get("error"):
        lines += ["", "## Telemetry", "", "Not counted: %s" % tel["error"]]
    elif tel:
        lines += ["", "## Telemetry", "", "%s event(s) received by the drill's collector, %s rejected, %s corrupt "
                  "line(s)." % (tel.get("events"), tel.get("rejected"), tel.get("corrupt", 0)), ""]
        lines += ["| type | events |", "|---|---|"]
        lines += ["| %s | %s |" % (k, v) for k, v in sorted((tel.get("by_type") or {}).items())]

    o = report.get("overhead") or {}
    if o:
        lines += ["", "## Boundary overhead", "",
                  "Boundary work %s s (%s); recovery work %s s (%s); boundary share %s."
                  % (o.get("boundary_seconds"), ", ".join("%s %s" % kv for kv in o.get("boundary_phases", {}).items())
                     or "none", o.get("recovery_seconds"),
                     ", ".join("%s %s" % kv for kv in o.get("recovery_phases", {}).items()) or "none",
                     o.get("boundary_share"))]

    r = report.get("recovery") or {}
    lines += ["", "## RTO / RPO", "", "| | measured (s) | target (s) | met |", "|---|---|---|---|"]
    for key in ("rto", "rpo"):
        v = r.get(key) or {}
        lines.append("| %s | %s | %s | %s |"
                     % (key.upper(), v.get("measured_seconds"), v.get("target_seconds"), v.get("met")))

    d = report.get("durable")
    if d:
        lines += ["", "## Durable copy", ""]
        lines.append("Not made: %s" % d["error"] if d.get("error") else "Copied to %s" % d.get("location"))

    t = report.get("teardown") or {}
    lines += ["", "## Teardown", ""]
    if t:
        lines.append("Deleted: %s; remaining: **%s**." % (t.get("deleted"), t.get("remaining")))
        for item in t.get("remaining_resources") or []:
            lines.append("- remaining: %s %s" % (item.get("type"), item.get("id")))
    else:
        lines.append("Not run.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- durable copy
class DurableCopyError(Exception):
    """The durable copy could not be made; the message says what was wrong and what to do."""


def durable_location(value: str, drill_id: str, output_dir: str) -> dict:
    """Where the drill's outputs are copied: ``{"kind": "s3", bucket, prefix, uri}`` or ``{"kind": "local", path,
    uri}``, with ``<drill_id>/`` appended; checked before anything is written."""
    if is_s3(value):
        try:
            loc = parse_prefix(value if value.endswith("/") else value + "/", "copy_to")
        except LocationError as exc:
            raise DurableCopyError("%s; use s3://bucket/prefix/ of an Object Lock bucket" % exc) from None
        prefix = "%s%s/" % (loc.key, drill_id)
        return {"kind": "s3", "bucket": loc.bucket, "prefix": prefix, "uri": s3_uri(loc.bucket, prefix)}
    if not isinstance(value, str) or not os.path.isabs(value) or "\x00" in value:
        raise DurableCopyError("copy_to %r must be s3://bucket/prefix/ or an absolute directory outside the job's "
                               "working directory" % (value,))
    root = os.path.normpath(value)
    inside = os.path.normpath(output_dir) + os.sep
    if (root + os.sep).startswith(inside):
        raise DurableCopyError("copy_to %s lies inside the drill's output directory %s, which dies with the job; "
                               "name a durable location outside it" % (root, output_dir))
    path = os.path.join(root, drill_id)
    return {"kind": "local", "root": root, "path": path, "uri": path + os.sep}


def _read_regular(path: str):
    """The bytes of the regular file ``path`` (a symlink is never followed), or None when it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DurableCopyError("%s is a symlink; refusing to copy it" % path) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise DurableCopyError("%s is not a regular file; refusing to copy it" % path)
        return handle.read()


def copy_outputs(dest: dict, output_dir: str, drill_id: str, client=None, check_mode: bool = False) -> list:
    """Copy :data:`DURABLE_FILES` from ``output_dir`` to ``dest`` (:func:`durable_location`).

    S3: the bucket must have Object Lock enabled (fail closed); every object is written with a SHA-256
    checksum, the drill id tag and a legal hold, as the quarantine does, and read back with HeadObject to
    prove the hold. Local: a 0700 directory of 0600 files, written atomically. ``client(service)`` returns a
    retrying boto3 client. In check mode the location is checked and nothing is written. Returns one
    ``{name, location, sha256, size, version_id}`` per file copied; raises :class:`DurableCopyError`.
    """
    s3 = client("s3") if dest["kind"] == "s3" else None
    try:
        if s3 is not None:
            _check_lock(s3, dest["bucket"])
        else:
            for path in (dest["root"], dest["path"]):
                check_private_dir(path)
    except OSError as exc:
        raise DurableCopyError("the durable location is unusable: %s" % exc) from None
    files = []
    for name in DURABLE_FILES:
        try:
            data = _read_regular(os.path.join(output_dir, name))
        except OSError as exc:
            raise DurableCopyError("cannot read %s of the drill's outputs: %s" % (name, exc)) from None
        if data is None:
            continue
        entry = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "version_id": None}
        if s3 is not None:
            key = dest["prefix"] + name
            entry["location"] = s3_uri(dest["bucket"], key)
            if not check_mode:
                entry["version_id"] = _put_locked(s3, dest["bucket"], key, data, drill_id)
        else:
            entry["location"] = os.path.join(dest["path"], name)
            if not check_mode:
                try:
                    ensure_private_dir(dest["root"], parents=True)
                    ensure_private_dir(os.path.dirname(entry["location"]), parents=True)
                    atomic_write(entry["location"], data, 0o600)
                except OSError as exc:
                    raise DurableCopyError("cannot write %s: %s; make the durable directory writable by the "
                                           "user running the drill" % (entry["location"], exc)) from None
        files.append(entry)
    return files


def _check_lock(s3, bucket: str) -> None:
    try:
        conf = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    except (BotoCoreError, ClientError) as exc:  # after the client's retries
        raise DurableCopyError("cannot read the Object Lock configuration of bucket %s (%s); the durable copy needs "
                               "an existing bucket with Object Lock enabled" % (bucket, describe_error(exc))) from None
    if conf.get("ObjectLockEnabled") != "Enabled":
        raise DurableCopyError("bucket %s does not have Object Lock enabled; create the report bucket with Object "
                               "Lock so the drill's outputs cannot be altered or deleted" % bucket)


def _put_locked(s3, bucket: str, key: str, data: bytes, drill_id: str):
    uri = s3_uri(bucket, key)
    try:
        put = s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                            ObjectLockLegalHoldStatus="ON", Tagging="%s=%s" % (_TAG_DRILL_ID, drill_id),
                            ContentType="application/json" if key.endswith((".json", ".jsonl")) else "text/markdown")
        version = put.get("VersionId")
        head = s3.head_object(Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
    except (BotoCoreError, ClientError) as exc:  # after the client's retries
        raise DurableCopyError("cannot write %s (%s); the role running the drill needs s3:PutObject, "
                               "s3:PutObjectLegalHold and s3:PutObjectTagging on it"
                               % (uri, describe_error(exc))) from None
    if head.get("ObjectLockLegalHoldStatus") != "ON":
        raise DurableCopyError("%s was written without a legal hold; check the bucket's Object Lock settings" % uri)
    return version


def fail_for_copy(report: dict, message: str) -> None:
    """A drill whose outputs did not reach the durable location the user named is not ``passed``.

    An earlier verdict (halted, a failed phase) keeps its reason; the copy's error is recorded
    under ``durable.error`` either way.
    """
    report.setdefault("durable", {})["error"] = message
    if report["outcome"] == "passed":
        report["outcome"], report["failed_phase"], report["error"] = (
            "failed", "report", "the durable copy failed: %s" % message)
