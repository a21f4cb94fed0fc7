"""Chaos faults: their names, what each targets and what the stack must do about it.

Shared by the config (``chaos.faults``), the supervisor that injects them
(:mod:`supervisor.chaos`), the CLI (``supervisor chaos FAULT``) and the worker,
which fires the faults that happen inside its env's ``step()`` on request: the
supervisor writes :func:`request_path` and sends SIGUSR1; the worker's handler
only sets a flag, and its :class:`worker.faults.FaultInjector` reads the request
at the next ``step()``.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from protocol.files import atomic_write
from protocol.roles import LEARNER, SIMULATOR, WORKER

# What the stack must do: replace the target (after a stall or an exit), or leave it alone.
RESTART, NO_RESTART = "restart", "no_restart"
# What a fault targets: a child by its role (WORKER, LEARNER, SIMULATOR: the roles of protocol.roles), or the
# run's sockets.
SOCKETS = "sockets"
# How the supervisor sees it: a deadline missed, or an exit.
HEARTBEAT, PROGRESS, LIVENESS, EXIT, NOTHING = "heartbeat", "progress", "liveness", "exit", "nothing"

# The signal by which the supervisor tells a worker that a request file waits for it.
REQUEST_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class Fault:
    name: str
    target: str  # a role, or SOCKETS
    expect: str  # RESTART or NO_RESTART
    seen_by: str  # which deadline (or an exit) finds it
    meaning: str


FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("worker_sigstop", WORKER, RESTART, HEARTBEAT, "SIGSTOP of a worker: a frozen process"),
    Fault("worker_sigkill", WORKER, RESTART, EXIT, "SIGKILL of a worker"),
    Fault("hang", WORKER, RESTART, PROGRESS, "the worker's env step() blocks forever (a frozen simulator)"),
    Fault("crash", WORKER, RESTART, EXIT, "the worker's env step() raises"),
    Fault("slow", WORKER, NO_RESTART, NOTHING,
          "each env step() sleeps slow_s for duration_s: slow but progressing, must not be killed"),
    Fault("learner_sigkill", LEARNER, RESTART, EXIT, "SIGKILL of the learner"),
    Fault("learner_sigstop", LEARNER, RESTART, HEARTBEAT, "SIGSTOP of the learner"),
    Fault("garbage", SOCKETS, NO_RESTART, NOTHING,
          "random bytes, malformed and oversized messages and forged heartbeats on the heartbeat, control "
          "and steps sockets: dropped and counted"),
    Fault("docker_pause", SIMULATOR, RESTART, LIVENESS, "`docker pause` of a simulator container"),
    Fault("docker_kill", SIMULATOR, RESTART, EXIT, "`docker kill` of a simulator container"),
]}
FAULT_NAMES = tuple(FAULTS)
IN_STEP_FAULTS = ("hang", "crash", "slow")  # fired by the worker itself, on request
SOCKET_TARGETS = ("heartbeat", "control", "steps")


def request_path(run_dir: Path, name: str) -> Path:
    """Where the supervisor leaves an in-step fault for the worker called ``name``."""
    return Path(run_dir) / "chaos" / f"{name}.json"


def write_request(run_dir: Path, name: str, pid: int, fault: str, **options) -> Path:
    path = request_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"pid": pid, "fault": fault, **options}), fsync=False)
    return path


def take_request(run_dir: Path, name: str) -> dict | None:
    """The request for this process (by pid), removed once read; None if there is none for it."""
    path = request_path(run_dir, name)
    try:
        request = json.loads(path.read_text())
        path.unlink()
    except (OSError, ValueError):
        return None
    if not isinstance(request, dict) or request.get("pid") != os.getpid() or request.get("fault") not in IN_STEP_FAULTS:
        return None
    return request
