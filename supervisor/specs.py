"""What the machine decides a child by: its spec, built by :mod:`supervisor.plan` from the validated config.

Nothing here knows what a child does or how it runs: a spec says how to judge a child
(deadlines, progress phases and counters), how to restart it (restart type,
backoff, intensity, dependencies) and, opaquely, how to launch it (``launch``,
read by its driver only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

PERMANENT, TRANSIENT, TEMPORARY = "permanent", "transient", "temporary"
RESTART_TYPES = (PERMANENT, TRANSIENT, TEMPORARY)


@dataclass(frozen=True)
class Deadlines:
    heartbeat_s: float  # silence: a frozen process (stopped, or the GIL held in native code)
    progress_s: float  # no growth of the progress count while in a progressing phase
    startup_s: float  # in a start-up phase (or without a first heartbeat) this long
    evidence_s: float  # capturing evidence may hold back a kill this long


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float
    jitter: float  # +- this fraction, so restarted children do not move in lockstep
    healthy_reset_s: float  # running this long resets the backoff to its initial delay


@dataclass(frozen=True)
class Intensity:
    """At most ``max_restarts`` restarts in ``window_s`` seconds, then the child is failed."""

    max_restarts: int
    window_s: float


@dataclass(frozen=True)
class ChildSpec:
    """Everything the machine decides about one child by. Built by :mod:`supervisor.plan`."""

    name: str
    kind: str  # which driver runs it: "process", ...
    restart: str  # permanent, transient or temporary
    significant: bool  # its failure (or its finishing) ends the run
    deadlines: Deadlines
    progress_phases: frozenset[str]  # phases in which the progress count must grow
    startup_phases: frozenset[str]  # phases bounded by the start-up deadline
    progress_counters: tuple[str, ...]  # heartbeat fields whose sum is the progress count
    kill_grace_s: float  # terminate to kill for a stalled child
    stop_grace_s: float  # terminate to kill for an orderly stop (time to write a checkpoint)
    backoff: Backoff
    intensity: Intensity
    depends_on: tuple[str, ...] = ()
    # exit codes by which a child says its dependency is stalled (evidence, kill, replace it, then this child)
    # or due for a planned fresh start; neither counts against this child's own intensity
    stall_dependencies_on: frozenset[int] = frozenset()
    recycle_dependencies_on: frozenset[int] = frozenset()
    fatal_exit_codes: frozenset[int] = frozenset()  # a restart would not help: failed at once, with its reason
    pool: str = ""  # children doing the same work: when every one of a pool has failed, the run ends
    max_age_s: float | None = None  # a planned restart after running this long (servers that leak memory)
    standby: bool = False  # keep a pre-started spare that a respawn activates
    launch: Mapping[str, Any] = field(default_factory=dict)  # for the driver; the machine never reads it
    labels: Mapping[str, str] = field(default_factory=dict)  # for people and tools; the machine never reads it


def start_order(specs: list[ChildSpec]) -> list[ChildSpec]:
    """Specs with every dependency before its dependents, otherwise in the given order.

    Raises ValueError naming an unknown dependency, a duplicate name or a cycle.
    """
    by_name: dict[str, ChildSpec] = {}
    for s in specs:
        if s.name in by_name:
            raise ValueError(f"two children are named {s.name!r}")
        if s.restart not in RESTART_TYPES:
            raise ValueError(f"{s.name}: restart type {s.restart!r} is not one of {RESTART_TYPES}")
        if s.significant and s.restart == PERMANENT:
            raise ValueError(f"{s.name}: a significant child cannot be {PERMANENT} (it could never end the run)")
        by_name[s.name] = s
    for s in specs:
        for d in s.depends_on:
            if d not in by_name:
                raise ValueError(f"{s.name} depends on {d!r}, which is not a child of this run")
    ordered: list[ChildSpec] = []
    placing: set[str] = set()

    def place(s: ChildSpec) -> None:
        if s in ordered:
            return
        if s.name in placing:
            raise ValueError(f"dependency cycle through {s.name!r}")
        placing.add(s.name)
        for d in s.depends_on:
            place(by_name[d])
        placing.discard(s.name)
        ordered.append(s)

    for s in specs:
        place(s)
    return ordered
