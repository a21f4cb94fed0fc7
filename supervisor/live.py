"""The foreground view of ``supervisor up`` on a terminal: the status table, progress, the latest notes."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from protocol.states import (
    BACKOFF,
    FAILED,
    RUNNING,
    STALLED,
    STARTING,
    STOPPED,
    STOPPING,
)
from supervisor.display import RIGHT, columns, rows, status_notes

STATE_STYLE = {RUNNING: "green", STARTING: "cyan", STALLED: "bold red", STOPPING: "yellow",
               BACKOFF: "yellow", FAILED: "bold red", STOPPED: "dim"}


def process_table(status: dict) -> Table:
    table = Table(title=f"run {status['run_id']}", title_justify="left", expand=False)
    for col in columns(status):
        table.add_column(col, justify="right" if col in RIGHT else "left")
    for row in rows(status):
        state = row[1]
        table.add_row(row[0], f"[{STATE_STYLE.get(state, '')}]{state}[/]", *row[2:])
    return table


class LiveDisplay:
    """Process table, progress toward max_timesteps, incidents and notes, redrawn a few times a second."""

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
