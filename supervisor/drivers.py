"""What a driver of one child kind does, and what it reports back.

The state machine decides; a driver carries out its actions for the children of
its kind (``ChildSpec.kind``) and reports what it observes. Adding a kind of child
(a simulator container, say) is adding a driver and a spec: the machine does not
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from supervisor.state import CaptureEvidence, ChildSpec


class SpawnError(RuntimeError):
    """A child could not be started; the message says why, in one line."""


@dataclass(frozen=True)
class Exited:
    name: str
    pid: int
    code: int | None  # exit status; -N for signal N


@dataclass(frozen=True)
class Beat:
    """A heartbeat a driver produced itself (e.g. from a readiness probe of a simulator)."""

    fields: dict


@dataclass(frozen=True)
class StandbyLost:
    name: str


Observation = Exited | Beat | StandbyLost


class Driver(Protocol):
    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int, bool]:
        """Start the child; return its pid and whether a standby spare took over. Raise SpawnError or OSError."""

    def start_standby(self, spec: ChildSpec) -> None:
        """Prepare a spare that a later ``spawn(standby=True)`` activates."""

    def drop_standby(self, name: str) -> None:
        """Discard the child's spare, if it has one."""

    def signal(self, name: str, pid: int, signum: int) -> None:
        """Deliver ``signum`` to the child (SIGTERM, SIGCONT, SIGKILL)."""

    def poll(self) -> list[Observation]:
        """What happened since the last call: exits, heartbeats, lost spares."""

    def capture(self, run_dir: Path, action: CaptureEvidence, timeout_s: float) -> Path:
        """Write the evidence of a stall into an incident directory and return it."""

    def kill_leftovers(self, saved: dict) -> list[int]:
        """Kill what an earlier supervisor of this run left running (``saved`` is its state file)."""

    def pids(self) -> list[int]:
        """Everything of this driver that is running, for the state file."""

    def kill_all(self) -> None:
        """Kill and reap everything of this driver at once (the supervisor is leaving)."""
