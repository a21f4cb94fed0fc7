"""Drivers: each carries out the machine's kind-neutral actions for the children of one kind, in its own terms.

The machine (:mod:`supervisor.machine`) decides; a driver starts, terminates and
kills the incarnations of its kind (``ChildSpec.kind``), captures evidence, and
reports what it observes. An incarnation is named by (child name, incarnation
number) everywhere: a driver keeps whatever handle it needs (a process, a
container) under that name. Adding a kind of child is adding a driver and a spec:
the machine does not change.

- :mod:`supervisor.drivers.process`: ``python -m`` children, each in its own process group.
- :mod:`supervisor.drivers.container`: simulator containers through the Docker SDK.
- :mod:`supervisor.drivers.pod`: a pod's CARLA server, a sibling container's process (the kubelet restarts it).
- :mod:`supervisor.drivers.ray`: the fleet's hosts, each an agent on a Ray node (taken over by name, never
  killed as a leftover).
- :mod:`supervisor.drivers.evidence`: what a stalled process leaves before its kill.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from supervisor.machine import CaptureEvidence
from supervisor.specs import ChildSpec

# What chaos can ask of a driver (:meth:`Driver.inject`); each driver does it in its own terms.
FREEZE = "freeze"  # stop it without ending it (SIGSTOP; docker pause)
CRASH = "crash"  # end it at once, as a crash would (SIGKILL; docker kill)
NOTIFY = "notify"  # tell it to read the fault request chaos wrote for it (a process: the request signal)
INJECTIONS = (FREEZE, CRASH, NOTIFY)


class SpawnError(RuntimeError):
    """A child could not be started; the message says why, in one line."""


class Gone(RuntimeError):
    """The incarnation is not running (any more): nothing to inject into."""


class NotSupported(RuntimeError):
    """This driver cannot do that to its children; the message says what it can do."""


@dataclass(frozen=True)
class Exited:
    name: str
    incarnation: int
    code: int | None  # exit status; -N for signal N
    cause: str | None = None  # why, where the driver knows more than the status (a container's OOM kill)


@dataclass(frozen=True)
class Beat:
    """A heartbeat a driver produced itself (e.g. from a readiness probe of a simulator)."""

    fields: dict


@dataclass(frozen=True)
class StandbyLost:
    name: str


Observation = Exited | Beat | StandbyLost


class Driver(Protocol):
    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int | None, bool]:
        """Start the incarnation; return its pid (None where it has none) and whether a standby spare took over.
        Raise SpawnError or OSError."""

    def start_standby(self, spec: ChildSpec) -> None:
        """Prepare a spare that a later ``spawn(standby=True)`` activates."""

    def drop_standby(self, name: str) -> None:
        """Discard the child's spare, if it has one."""

    def terminate(self, name: str, incarnation: int) -> None:
        """Ask the incarnation to end (it may take its stop grace to do so)."""

    def kill(self, name: str, incarnation: int) -> None:
        """End the incarnation now."""

    def inject(self, name: str, incarnation: int, what: str) -> None:
        """A chaos fault (one of :data:`INJECTIONS`); raise Gone or NotSupported."""

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


class Watcher:
    """What the drivers of children this supervisor watches but does not start as its own processes have in common
    (a host's agent, a pod's simulator): no standby spares, nothing of theirs to kill at exit or after a crash, a
    thread per incarnation that watches it, and what those threads saw, handed over at each :meth:`poll`."""

    def __init__(self):
        self.seen: queue.Queue[Observation] = queue.Queue()

    def watch(self, name: str, loop, run) -> None:
        threading.Thread(target=loop, args=(run,), name=f"probe-{name}", daemon=True).start()

    def start_standby(self, spec: ChildSpec) -> None:
        pass

    def drop_standby(self, name: str) -> None:
        pass

    def poll(self) -> list[Observation]:
        out = []
        while True:
            try:
                out.append(self.seen.get_nowait())
            except queue.Empty:
                return out

    def kill_leftovers(self, saved: dict) -> list[int]:
        return []

    def pids(self) -> list[int]:
        return []
