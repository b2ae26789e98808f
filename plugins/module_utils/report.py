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

OUTCOMES = ("passed", "failed", "halted")

# The report's overhead split: seconds spent building and proving the boundary vs recovering.
BOUNDARY_PHASES = ("network", "prove", "runtime", "probes")
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
    """Seconds of boundary work (network, prove, runtime, probes) vs recovery work (restore, validate)."""
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
           "units": [{k: u.get(k) for k in ("tier", "ns", "address")} for u in runtime.get("units") or []],
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

    t = report.get("teardown") or {}
    lines += ["", "## Teardown", ""]
    if t:
        lines.append("Deleted: %s; remaining: **%s**." % (t.get("deleted"), t.get("remaining")))
        for item in t.get("remaining_resources") or []:
            lines.append("- remaining: %s %s" % (item.get("type"), item.get("id")))
    else:
        lines.append("Not run.")
    return "\n".join(lines) + "\n"
