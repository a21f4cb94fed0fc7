"""Tables of a run's processes: the live view of ``supervisor up`` and ``supervisor status``."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protocol.states import BACKOFF, FAILED, RUNNING, STALLED, STARTING, STOPPED, STOPPING
from protocol.text import duration

STATE_STYLE = {RUNNING: "green", STARTING: "cyan", STALLED: "bold red", STOPPING: "yellow",
               BACKOFF: "yellow", FAILED: "bold red", STOPPED: "dim"}


def process_table(status: dict) -> Table:
    table = Table(title=f"run {status['run_id']}", title_justify="left", expand=False)
    gpu = any(p.get("gpu_memory_bytes") is not None for p in status["processes"])
    columns = ("NAME", "STATE", "PID", "UPTIME", "STEPS", "STEPS/S", "HEARTBEAT", "RESTARTS", "DROPS", "PHASE") + \
        (("GPU MEM",) if gpu else ())
    for col in columns:
        table.add_column(col, justify="right" if col in ("PID", "STEPS", "STEPS/S", "RESTARTS", "DROPS", "GPU MEM")
                         else "left")
    for p in status["processes"]:
        counter = (p.get("progress_counters") or ["env_steps"])[0]  # the child's own measure of work
        steps = {"env_steps": f"{p['env_steps']}", "updates": f"{p['updates']} upd"}.get(
            counter, f"{p['progress']} {counter}")
        hb = "-" if p["heartbeat_age_s"] is None else f"{p['heartbeat_age_s']:.1f}s ago"
        state = p["state"]
        row = [p["name"], f"[{STATE_STYLE.get(state, '')}]{state}[/]", str(p["pid"] or "-"),
               duration(p["uptime_s"] if p["pid"] else None), steps, f"{p['steps_per_s']:.1f}", hb,
               str(p["restarts"]), str(p.get("dropped") or 0), p["phase"] or (p["reason"] or "-")]
        if gpu:
            mem = p.get("gpu_memory_bytes")
            row.append("-" if mem is None else f"{mem / 2**30:.2f} GiB")
        table.add_row(*row)
    return table


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
        resumed = p.get("resumed")
        if resumed:
            reached = (f"its last run had reached {resumed['previous']}: {resumed['redone']} redone"
                       if resumed.get("redone") is not None else "how far its last run got is not known")
            lines.append(f"{p['name']} resumed from its checkpoint at {resumed['resumed_from']} ({reached})")
    own = status.get("supervisor_dropped")
    if status.get("dropped_messages") and own is not None:
        lines.append(f"dropped messages: supervisor {own}, " + ", ".join(
            f"{p['name']} {p.get('dropped') or 0}" for p in status["processes"]))
    return lines


def plain_table(status: dict) -> str:
    """The status table as plain text (for pipes and logs)."""
    console = Console(width=140, file=None, record=True, force_terminal=False, color_system=None)
    with console.capture() as cap:
        console.print(process_table(status))
    return cap.get()


class LiveDisplay:
    """The foreground view of ``supervisor up``: process table, progress toward max_timesteps, events."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status
        self.progress = Progress(TextColumn("env steps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.progress.add_task("steps", total=status()["max_timesteps"])
        self.live = Live(refresh_per_second=4, transient=False)
        self._last = 0.0

    def start(self) -> None:
        self.live.start()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        status = self.status()
        self.progress.update(self.task, completed=min(status["env_steps"], status["max_timesteps"]))
        footer = (f"incidents: {status['incidents']}   dropped messages: {status['dropped_messages']}   "
                  f"run dir: {status['run_dir']}   (Ctrl-C stops)")
        self.live.update(Group(process_table(status), self.progress, footer, *status_notes(status)[-8:]))

    def stop(self) -> None:
        self.refresh()
        self.live.stop()
