"""What ``supervisor status`` prints: one row per child, and the notes under the table.

Stdlib only, so ``status`` answers fast; the live view of ``supervisor up``
(:mod:`supervisor.live`) draws the same rows with rich.
"""

from __future__ import annotations

from protocol import causes
from protocol.states import FAILED
from protocol.text import duration

COLUMNS = ("NAME", "STATE", "PID", "UPTIME", "STEPS", "STEPS/S", "HEARTBEAT", "RESTARTS", "DROPS", "PHASE")
RIGHT = {"PID", "STEPS", "STEPS/S", "RESTARTS", "DROPS", "GPU MEM"}


def has_gpu(status: dict) -> bool:
    return any(p.get("gpu_memory_bytes") is not None for p in status["processes"])


def columns(status: dict) -> tuple[str, ...]:
    return COLUMNS + (("GPU MEM",) if has_gpu(status) else ())


def rows(status: dict) -> list[list[str]]:
    """Each child's cells, in :func:`columns`' order."""
    gpu = has_gpu(status)
    out = []
    for p in status["processes"]:
        counter = (p.get("progress_counters") or ["env_steps"])[0]  # the child's own measure of work
        steps = {"env_steps": f"{p['env_steps']}", "updates": f"{p['updates']} upd"}.get(
            counter, f"{p['progress']} {counter}")
        hb = "-" if p["heartbeat_age_s"] is None else f"{p['heartbeat_age_s']:.1f}s ago"
        row = [p["name"], p["state"], str(p["pid"] or "-"), duration(p["uptime_s"] if p["pid"] else None), steps,
               f"{p['steps_per_s']:.1f}", hb, str(p["restarts"]), str(p.get("dropped") or 0),
               p["phase"] or (p["reason"] or "-")]
        if gpu:
            mem = p.get("gpu_memory_bytes")
            row.append("-" if mem is None else f"{mem / 2**30:.2f} GiB")
        out.append(row)
    return out


def plain_table(status: dict) -> str:
    """The status table as plain text (for terminals, pipes and logs)."""
    head = columns(status)
    body = rows(status)
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(head)]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if h in RIGHT else c.ljust(w) for c, w, h in zip(cells, widths, head)).rstrip()

    return "\n".join([f"run {status['run_id']}", line(head), *(line(r) for r in body)]) + "\n"


def status_notes(status: dict) -> list[str]:
    """The lines under the table: alerts, what a process says of itself, work redone after a resume, disk."""
    lines = []
    disk = status.get("disk") or {}
    if disk.get("warning"):
        lines.append(f"warning: {disk['warning']}")
    for p in status["processes"]:
        for alert in p.get("alerts") or []:
            lines.append(f"alert from {p['name']}: {alert}")
        if p.get("detail"):
            lines.append(f"{p['name']} reports: {p['detail']}")
        if p["state"] == FAILED and p.get("reason"):
            lines.append(f"{p['name']} failed: {p['reason']}")
        if p.get("cause"):
            where = f" ({p['cause_incident']})" if p.get("cause_incident") else ""
            lines.append(f"{p['name']}'s last trouble: {p['cause']}: {causes.advice(p['cause'])}{where}")
        resumed = p.get("resumed")
        if resumed:
            reached = (f"its last run had reached {resumed['previous']}: {resumed['redone']} redone"
                       if resumed.get("redone") is not None else "how far its last run got is not known")
            lines.append(f"{p['name']} resumed from its checkpoint at {resumed['resumed_from']} ({reached})")
        for h in p.get("hosts") or []:
            lines.append(f"{p['name']} hears from host {h['host']}: {h['slots']} slot(s), {h['steps']:,} steps, "
                         f"last {h['last_seen_s']:.1f}s ago")
        if p.get("children"):  # a host of the fleet: its own supervisor's children
            node = ", ".join(([f"node {p['node']}"] if p.get("node") else [])
                             + ([f"as {p['identity']}"] if p.get("identity") not in (None, p["name"]) else []))
            node = f" ({node})" if node else ""
            lines.append(f"{p['name']}{node}: " + ", ".join(
                f"{c['name']} {c['state']} {c['env_steps']:,} steps" + (f" {c['restarts']} restarts" if c['restarts']
                                                                        else "")
                + (f" weights v{c['weights']}" if c.get("weights") is not None else "") for c in p["children"]))
        if p.get("refused"):
            lines.append(f"{p['name']} refused {p['refused']} connection(s) from hosts whose key it does not allow")
    own = status.get("supervisor_dropped")
    if status.get("dropped_messages") and own is not None:
        lines.append(f"dropped messages: supervisor {own}, " + ", ".join(
            f"{p['name']} {p.get('dropped') or 0}" for p in status["processes"]))
    return lines
