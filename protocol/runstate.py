"""A run's ``supervisor.json`` and whether the supervisor it names still runs.

``status``, ``up``'s pre-flight checks and the run report all ask this of a run
directory; none of them needs the supervisor's loop to answer it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "supervisor.json"


def read_state(run_dir: Path) -> dict:
    """A run's ``supervisor.json``; {} when it is missing or torn (never raises for its content)."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


# A process's start time as psutil reads it again later differs by rounding only: this much is the same process.
START_TOLERANCE_S = 1.0


def same_process(started: float, now_started: float | None) -> bool:
    """Whether a pid's current start time (None: no such pid) is that of the process that started at ``started``."""
    return now_started is not None and abs(now_started - started) < START_TOLERANCE_S


def live_pid(state: dict) -> int | None:
    """The pid of the supervisor a run's state file names, if that very process still runs; None when the run
    ended, the pid is ours (a container restarted with the same pid), or the pid now belongs to another process."""
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or state.get("ended") or pid == os.getpid():
        return None
    started = state.get("started")
    if isinstance(started, (int, float)):
        return pid if same_process(started, process_start_time(pid)) else None
    return pid if supervisor_alive(pid) else None


def runs_naming(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live process (not a zombie) whose command line names ``marker``: a pid file or a state
    file can outlive its process, and the pid be another's since."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def supervisor_alive(pid) -> bool:
    """Whether ``pid`` looks like a live supervisor (for state files that do not record its start time)."""
    import psutil

    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return any("supervisor" in part for part in cmdline)
