"""A run's directory as the supervisor keeps it: created, locked, and its supervisor's own files.

``create_run_dir`` makes it (after ``up``'s pre-flight checks: nothing is written
before the run is known to be free and its config valid); ``lock_run`` holds it
for the supervisor's life. :class:`RunFiles` writes what the supervisor records:
``events.jsonl`` (with disk space reserved beyond its end, so the events that tell
how a run ended are written on a full disk too), ``progress.jsonl`` and
``supervisor.json``. Reading those back is :mod:`protocol.runstate` (state) and
:mod:`runreport` (everything else).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import sys
import time
from pathlib import Path

import yaml

from protocol import events
from protocol.config import Config
from protocol.files import atomic_write, replace_symlink
from protocol.runstate import STATE_FILE

# events.jsonl keeps this much disk space reserved beyond its end (renewed every RESERVE_EVERY lines), so the
# events that tell how a run ended on a full disk still find room.
RESERVE_BYTES = 1024 * 1024
RESERVE_EVERY = 1000

_HELD_LOCKS: list[int] = []  # run-directory locks this process holds until it ends


class RunBusy(RuntimeError):
    """Another supervisor holds the run."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def lock_run(run_dir: Path) -> int | None:
    """An exclusive lock on the run directory itself (``flock`` on its descriptor: nothing is written), held
    until the process ends; None when another process holds it."""
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def create_run_dir(cfg: Config, locked: bool = False) -> Path:
    """The run directory with its config; locked (see :func:`lock_run`) unless the caller holds the lock.
    Raises RunBusy when another supervisor holds it."""
    runs = Path(cfg.run.runs_dir)
    run_id = cfg.run.run_id or new_run_id()
    run_dir = runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if not locked:
        fd = lock_run(run_dir)
        if fd is None:
            raise RunBusy(f"another supervisor is starting or running {run_dir}")
        _HELD_LOCKS.append(fd)
    for sub in ("logs", "checkpoints", "incidents", "tb"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    data = cfg.to_dict()
    data["run"]["run_id"] = run_id
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))
    replace_symlink(runs / "latest", run_id)
    return run_dir.resolve()


def reserve_space(f, nbytes: int) -> None:
    """Reserve disk blocks beyond the end of an append-only file without changing its size (Linux
    FALLOC_FL_KEEP_SIZE); where the file system cannot, nothing is reserved."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        libc.fallocate(f.fileno(), 1, os.fstat(f.fileno()).st_size, nbytes)
    except (OSError, AttributeError, ValueError):
        pass


class RunFiles:
    """The supervisor's own files of a run. Every write raises OSError for the caller to judge (a full disk
    stops the run; anything else is said once and the run goes on)."""

    def __init__(self, run_dir: Path, out=sys.stdout, live: bool = False):
        self.run_dir = Path(run_dir)
        self.out = out
        self.live = live
        self.events_path = self.run_dir / "events.jsonl"
        self.progress_path = self.run_dir / "progress.jsonl"
        self.events_file = open(self.events_path, "a", buffering=1)
        reserve_space(self.events_file, RESERVE_BYTES)  # the last events are written on a full disk too
        self.events_written = 0
        self.progress_file = None

    def event(self, kind: str, name: str, detail: dict, quiet: bool = False) -> None:
        """One line of ``events.jsonl`` (and, without the live table, of the supervisor's output)."""
        line = events.line(kind, name, detail)
        try:
            self.events_file.write(json.dumps(line, default=str) + "\n")
            self.events_file.flush()
        finally:
            self.events_written += 1
            if self.events_written % RESERVE_EVERY == 0:
                reserve_space(self.events_file, RESERVE_BYTES)
            if not self.live and not quiet:
                text = " ".join(f"{k}={v}" for k, v in detail.items() if k != "heartbeat")
                try:
                    print(f"[supervisor] {name}: {kind} {text}", file=self.out, flush=True)
                except OSError:
                    pass  # stdout on a full disk: events.jsonl (with its reserved space) still has the line

    def progress(self, children: dict) -> None:
        """One line of ``progress.jsonl``: each child's state, phase, counters and steps/s."""
        if self.progress_file is None:
            self.progress_file = open(self.progress_path, "a", buffering=1)
        self.progress_file.write(json.dumps({"time": round(time.time(), 3), "children": children}) + "\n")

    def save_state(self, state: dict) -> None:
        """``supervisor.json``: who runs the run, its children, their counts (and, at the end, how it ended)."""
        atomic_write(self.run_dir / STATE_FILE, json.dumps(state), fsync=False)

    def close(self) -> None:
        for f in (self.events_file, self.progress_file):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
