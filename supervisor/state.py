"""The supervisor's decisions: a pure state machine over child specs, with an injectable clock.

No I/O happens here, and nothing here knows what a child *is*: every policy
(restart type, significance, deadlines, progress counters, grace periods, backoff,
intensity, dependencies, a standby spare) comes from its :class:`ChildSpec`, which
:mod:`supervisor.plan` builds from the validated config. Drivers feed in what
they observe (a child spawned, a heartbeat, an exit, evidence captured, a user
request, a signal) and :meth:`Supervision.tick` turns the passage of time into
decisions; every call returns a list of actions (spawn, capture evidence, signal,
keep a standby, log an event, end the run) that the driver of the child's kind
carries out. That keeps every transition testable without processes or sleeping.

Per child::

    starting --first heartbeat outside its start-up phases--> running
    starting/running --deadline missed--> stalled --evidence, SIGTERM, grace, SIGKILL--> (exit)
    (exit, to be restarted) --> backoff --delay--> starting
    (exit, too many restarts in the window, or temporary) --> failed
    (exit 0 of a transient or temporary child, or any exit while stopping) --> stopped

Restart types follow Erlang/OTP: ``permanent`` children are always restarted,
``transient`` ones only after an abnormal exit (non-zero, or killed for a stall),
``temporary`` ones never. A *significant* child ends the run: normally when it
finishes (exit 0), with exit 1 when it fails. Dependencies follow ``rest_for_one``:
when a child is restarted, the children that depend on it are stopped and started
again after it; a dependent's own restart leaves what it depends on alone. Start
order follows dependencies, and an orderly stop goes in reverse: a child is asked
to stop once nothing that depends on it is still alive.
"""

from __future__ import annotations

import math
import random
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from protocol import events as ev

STARTING, RUNNING, STALLED, STOPPING, BACKOFF, FAILED, STOPPED = (
    "starting", "running", "stalled", "stopping", "backoff", "failed", "stopped")
ALIVE = (STARTING, RUNNING, STALLED, STOPPING)
UP = (STARTING, RUNNING)  # what a dependent needs of what it depends on

PERMANENT, TRANSIENT, TEMPORARY = "permanent", "transient", "temporary"
RESTART_TYPES = (PERMANENT, TRANSIENT, TEMPORARY)

# Counters a child reports are capped here, so sums of them stay numbers every reader can take.
COUNT_CAP = 2**48

# Evidence that has not come back this long after its own timeout never will (its
# thread is stuck): the kill goes on without it.
EVIDENCE_SLACK_S = 1.0


@dataclass(frozen=True)
class Deadlines:
    heartbeat_s: float  # silence: a frozen process (SIGSTOP, GIL held in native code)
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
    kill_grace_s: float  # SIGTERM to SIGKILL for a stalled child
    stop_grace_s: float  # SIGTERM to SIGKILL for an orderly stop (time to write a checkpoint)
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


# -- actions -------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    name: str
    incarnation: int
    standby: bool = False  # a standby spare of this child is ready to take over


@dataclass(frozen=True)
class StartStandby:
    name: str


@dataclass(frozen=True)
class DropStandby:
    name: str


@dataclass(frozen=True)
class CaptureEvidence:
    name: str
    pid: int
    reason: str
    heartbeat: dict | None


@dataclass(frozen=True)
class Signal:
    name: str
    pid: int
    signum: int


@dataclass(frozen=True)
class Event:
    kind: str
    name: str
    detail: dict = field(default_factory=dict)

    def __post_init__(self):
        ev.check_event(self.kind, self.detail)


@dataclass(frozen=True)
class EndRun:
    exit_code: int
    reason: str


Action = Spawn | StartStandby | DropStandby | CaptureEvidence | Signal | Event | EndRun


@dataclass
class Child:
    spec: ChildSpec
    state: str = STOPPED
    pid: int | None = None
    incarnation: int = -1
    started_at: float = 0.0
    last_heartbeat_at: float | None = None
    heartbeat: dict | None = None
    progress_at: float = 0.0
    progress_count: int | None = None
    progress_phase: str | None = None
    restart_times: deque = field(default_factory=deque)
    restarts: int = 0
    consecutive: int = 0  # restarts since the child last ran healthily, for the backoff
    restart_at: float = 0.0
    kill_reason: str = ""
    kill_started_at: float | None = None  # SIGTERM sent
    evidence_since: float | None = None
    kill_sent: bool = False
    restart_after_exit: bool = False  # a user restart: respawn at once when it exits
    held: bool = False  # stopped with a dependency: starts again once its dependencies are up
    spare: bool = False  # a standby was asked for and not used or lost since
    last_exit: int | None = None
    last_incident: str | None = None
    alerts_seen: set = field(default_factory=set)
    previous_count: int | None = None  # the progress count its last incarnation reached
    dropped_earlier: int = 0  # messages its earlier incarnations dropped
    resumed: dict | None = None  # this incarnation resumed from saved state: from where, and what it redoes

    @property
    def name(self) -> str:
        return self.spec.name

    def count(self) -> int:
        """What must grow while the child is in a progressing phase."""
        hb = self.heartbeat or {}
        return sum(int(hb.get(k) or 0) for k in self.spec.progress_counters)


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


class Supervision:
    """Every child of a run and what to do about each of them."""

    def __init__(self, specs: list[ChildSpec], clock: Callable[[], float], rng: random.Random | None = None):
        self.clock = clock
        self.rng = rng or random.Random()
        self.children: dict[str, Child] = {s.name: Child(s) for s in start_order(specs)}
        self.stopping = False
        self.forced_at: float | None = None
        self.stop_signals = 0
        self.end: EndRun | None = None
        self.stop_reason = ""
        self._stop_code = 0

    # -- structure -------------------------------------------------------------

    def dependents(self, c: Child) -> list[Child]:
        """Children that depend on ``c``, directly or through others, in start order."""
        names = {c.name}
        out = []
        for d in self.children.values():  # start order: a dependent comes after what it depends on
            if names & set(d.spec.depends_on):
                names.add(d.name)
                out.append(d)
        return out

    def _deps_up(self, c: Child) -> bool:
        """Every dependency is ready: running (past its start-up), not being stopped."""
        return all(self.children[d].state == RUNNING and self.children[d].pid is not None for d in c.spec.depends_on)

    def _held_dependents_alive(self, c: Child) -> bool:
        """rest_for_one: a restarted child waits until the dependents stopped for it are gone."""
        return any(d.held and d.pid is not None for d in self.dependents(c))

    def wants_spawn(self, action: Spawn) -> bool:
        """Whether a Spawn still stands: an earlier action of the same batch may have changed the machine's mind."""
        c = self.children[action.name]
        return c.state == STARTING and c.pid is None and c.incarnation == action.incarnation and not self.stopping

    # -- inputs ------------------------------------------------------------

    def start(self) -> list[Action]:
        """Spawn every child without dependencies; the others start as their dependencies become ready."""
        actions: list[Action] = []
        for c in self.children.values():
            if c.spec.depends_on:
                c.held = True
                actions += self._wait_for_dependencies(c)
            else:
                actions += self._spawn(c)
        return actions

    def spawned(self, name: str, pid: int, standby: bool = False) -> list[Action]:
        """The driver started it. Held dependents waiting for it start now, after it."""
        c = self.children[name]
        if c.state != STARTING or c.pid is not None:
            return [Signal(name, pid, signal.SIGKILL)]  # not wanted any more: nothing may run unwatched
        c.pid = pid
        return [Event(ev.SPAWNED, name, {"pid": pid, "incarnation": c.incarnation, "standby": standby})]

    def spawn_failed(self, name: str, error: str) -> list[Action]:
        """The driver could not start it: handled as an abnormal exit (backoff, intensity)."""
        c = self.children[name]
        c.pid = None
        return [Event(ev.SPAWN_FAILED, name, {"error": error})] + self._after_exit(c, None)

    def standby_lost(self, name: str) -> list[Action]:
        """The child's standby spare died or could not start; a new one is asked for when it runs again."""
        self.children[name].spare = False
        return []

    def heartbeat(self, hb: dict) -> list[Action]:
        c = self.children.get(hb.get("name", ""))
        if c is None or c.pid is None or hb.get("pid") != c.pid or c.state not in ALIVE:
            return []  # a late beat from an earlier incarnation, or from a stranger
        now = self.clock()
        c.last_heartbeat_at = now
        c.heartbeat = hb
        count, phase = c.count(), hb.get("phase")
        if count != c.progress_count or phase != c.progress_phase:
            c.progress_count, c.progress_phase, c.progress_at = count, phase, now
        actions: list[Action] = []
        if isinstance(hb.get("resumed_from"), int) and c.resumed is None:
            previous = c.previous_count  # None: not known (a supervisor killed before it saved its counts)
            c.resumed = {"resumed_from": hb["resumed_from"], "previous": previous,
                         "redone": None if previous is None else max(0, previous - hb["resumed_from"])}
            actions.append(Event(ev.RESUMED, c.name, dict(c.resumed)))
        for alert in hb.get("alerts") or []:
            if isinstance(alert, str) and alert not in c.alerts_seen:  # alerts a child reports (divergence, say) become run events
                c.alerts_seen.add(alert)
                actions.append(Event(ev.ALERT, c.name, {"alert": alert}))
        if c.state == STARTING and phase not in c.spec.startup_phases:
            c.state = RUNNING
            actions.append(Event(ev.RUNNING, c.name, {"pid": c.pid, "phase": phase}))
            actions += self._release_dependents(c)  # ready: what waits for it starts now
        return actions

    def evidence_done(self, name: str, incident: str | None) -> list[Action]:
        c = self.children[name]
        actions: list[Action] = []
        if incident:
            c.last_incident = incident
            actions.append(Event(ev.EVIDENCE_CAPTURED, name, {"incident": incident}))
        if c.state != STALLED or c.kill_started_at is not None or c.pid is None:
            return actions
        return actions + self._terminate(c)

    def exited(self, name: str, pid: int, code: int | None) -> list[Action]:
        c = self.children[name]
        if pid != c.pid:
            return []
        c.last_exit = code
        c.pid = None
        if c.heartbeat is not None:
            c.previous_count = max(c.count(), c.resumed["resumed_from"] if c.resumed else 0)
            c.dropped_earlier = min(COUNT_CAP, c.dropped_earlier + int(c.heartbeat.get("dropped") or 0))
        actions: list[Action] = [Event(ev.EXITED, name, {"pid": pid, "code": code, "state": c.state})]
        if not self.stopping and c.state in UP and code is not None:
            if code in c.spec.stall_dependencies_on:
                actions += self._replace_dependencies(c, f"{c.name} found it stalled (exit {code})", stalled=True)
            elif code in c.spec.recycle_dependencies_on:
                actions += self._replace_dependencies(c, f"{c.name} asked for a fresh one (exit {code})",
                                                      stalled=False)
        return actions + self._after_exit(c, code)

    def request_restart(self, name: str) -> list[Action]:
        """A user's restart: stop it now (no evidence), spawn again at once, outside the intensity limit."""
        if name not in self.children:
            raise KeyError(name)
        c = self.children[name]
        actions: list[Action] = [Event(ev.RESTART_REQUESTED, name, {"state": c.state})]
        if self.stopping:
            return actions
        if c.state in ALIVE and c.pid is not None:
            if c.held:
                return actions  # already being restarted with its dependency
            c.restart_after_exit = True
            if c.state != STOPPING:
                c.state = STOPPING
                c.kill_reason = "restart requested"
                actions += self._terminate(c)
            return actions
        if c.held and not self._deps_up(c):
            return actions  # it starts with its dependency, not before
        c.consecutive = 0
        c.restart_times.clear()
        return actions + self._restart_dependents(c) + self._spawn_or_wait(c)

    def request_stop(self, reason: str = "stop requested", exit_code: int = 0) -> list[Action]:
        """An orderly stop: children stop in reverse start order, each with its stop grace. Asking twice is harmless."""
        if self.stopping:
            return []
        self.stopping = True
        self.stop_reason = reason
        self._stop_code = exit_code
        actions: list[Action] = [Event(ev.STOPPING, "run", {"reason": reason})]
        for c in self.children.values():
            actions += self._drop_spare(c)
            if c.state in ALIVE and c.pid is not None:
                if c.state == STALLED and c.kill_started_at is not None:
                    continue  # already being killed
                if c.state != STOPPING:
                    c.state = STOPPING
                    c.kill_reason = reason
                    c.kill_started_at = None  # asked to stop once its dependents are gone
                    c.evidence_since = None
            elif c.state in (BACKOFF, STARTING):
                c.state = STOPPED
        return actions + self._advance_stop() + self._check_end()

    def signal_received(self, signum: int) -> list[Action]:
        """SIGINT/SIGTERM to the supervisor: the first stops the run in order, the second kills everything."""
        self.stop_signals += 1
        name = signal.Signals(signum).name
        if self.stop_signals == 1 and not self.stopping:
            return self.request_stop(f"signal {name}")
        if self.forced_at is None:
            return self.force_stop(f"signal {name} while stopping")
        return []

    def force_stop(self, reason: str) -> list[Action]:
        """Kill every child now, without grace; the run ends as soon as they are gone."""
        if self.forced_at is not None:
            return []
        now = self.clock()
        if not self.stopping:
            self.stopping, self.stop_reason, self._stop_code = True, reason, 1
        self.forced_at = now
        actions: list[Action] = [Event(ev.FORCED_STOP, "run", {"reason": reason})]
        for c in self.children.values():
            actions += self._drop_spare(c)
            if c.state in ALIVE and c.pid is not None:
                c.state = STOPPING
                c.kill_reason = reason
                c.kill_started_at = now
                c.kill_sent = True
                actions.append(Signal(c.name, c.pid, signal.SIGKILL))
            elif c.state in (BACKOFF, STARTING):
                c.state = STOPPED
        return actions + self._check_end()

    # -- time ----------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Decisions that are due now: deadlines, grace periods, backoffs, standbys."""
        now = self.clock()
        actions: list[Action] = []
        for c in self.children.values():
            spec = c.spec
            if c.state in UP and c.pid is not None:
                reason = self._stall_reason(c, now)
                if reason:
                    actions += self._stall(c, reason, now)
                elif c.state == RUNNING and c.consecutive and now - c.started_at >= spec.backoff.healthy_reset_s:
                    c.consecutive = 0  # healthy for a while: the next failure starts the backoff over
            elif c.state == STALLED and c.kill_started_at is None and c.evidence_since is not None \
                    and now - c.evidence_since >= spec.deadlines.evidence_s + EVIDENCE_SLACK_S:
                actions += self._terminate(c)  # evidence never came back; kill without it
            if c.state in (STALLED, STOPPING) and c.kill_started_at is not None and not c.kill_sent:
                grace = spec.stop_grace_s if c.state == STOPPING else spec.kill_grace_s
                if now - c.kill_started_at >= grace:
                    c.kill_sent = True
                    actions += [Signal(c.name, c.pid, signal.SIGKILL),
                                Event(ev.KILLED, c.name, {"pid": c.pid, "after_s": round(now - c.kill_started_at, 2)})]
            if c.state == BACKOFF and not c.held and now >= c.restart_at and not self.stopping \
                    and not self._held_dependents_alive(c):
                actions += self._spawn(c)
            if c.state == RUNNING and spec.max_age_s and now - c.started_at >= spec.max_age_s \
                    and not c.restart_after_exit and not self.stopping:
                actions += self._recycle(c, f"ran {now - c.started_at:.0f}s (max age {spec.max_age_s:g}s)")
            if c.state == RUNNING and spec.standby and not c.spare and not self.stopping:
                c.spare = True  # asked for once the child runs, so it never slows the child's own start
                actions.append(StartStandby(c.name))
        if self.forced_at is not None and self.end is None:
            actions += self._give_up_forced(now)
        return actions

    def _stall_reason(self, c: Child, now: float) -> str:
        d = c.spec.deadlines
        if c.last_heartbeat_at is None:
            if now - c.started_at > d.startup_s:
                return f"no heartbeat within the startup deadline ({d.startup_s:g}s)"
            return ""
        silent = now - c.last_heartbeat_at
        if silent > d.heartbeat_s:
            return f"no heartbeat for {silent:.1f}s (deadline {d.heartbeat_s:g}s)"
        phase = (c.heartbeat or {}).get("phase")
        in_phase = float((c.heartbeat or {}).get("phase_age_s") or 0.0) + silent
        if phase in c.spec.startup_phases and in_phase > d.startup_s:
            return f"in phase {phase} for {in_phase:.1f}s (startup deadline {d.startup_s:g}s)"
        if phase in c.spec.progress_phases and now - c.progress_at > d.progress_s:
            said = (c.heartbeat or {}).get("detail")
            return (f"no progress for {now - c.progress_at:.1f}s in phase {phase} at count {c.progress_count} "
                    f"(deadline {d.progress_s:g}s)" + (f"; it reports: {said}" if said else ""))
        return ""

    # -- transitions -----------------------------------------------------------

    def _spawn(self, c: Child) -> list[Action]:
        now = self.clock()
        c.state = STARTING
        c.incarnation += 1
        c.pid = None
        c.started_at = now
        c.last_heartbeat_at = None
        c.heartbeat = None
        c.resumed = None
        c.progress_at, c.progress_count, c.progress_phase = now, None, None
        c.kill_started_at = c.evidence_since = None
        c.kill_sent = False
        c.restart_after_exit = False
        c.held = False
        c.kill_reason = ""
        standby, c.spare = c.spare, False
        return [Spawn(c.name, c.incarnation, standby)]

    def _spawn_or_wait(self, c: Child) -> list[Action]:
        """Spawn now, or as soon as the dependents stopped for it have exited (tick does it)."""
        if self._held_dependents_alive(c):
            c.state = BACKOFF
            c.restart_at = self.clock()
            return []
        return self._spawn(c)

    def _stall(self, c: Child, reason: str, now: float) -> list[Action]:
        c.state = STALLED
        c.kill_reason = reason
        c.evidence_since = now
        return [Event(ev.STALLED, c.name, {"pid": c.pid, "reason": reason, "heartbeat": c.heartbeat}),
                CaptureEvidence(c.name, c.pid, reason, c.heartbeat)]

    def _terminate(self, c: Child) -> list[Action]:
        c.kill_started_at = self.clock()
        # SIGCONT after SIGTERM: a stopped process cannot handle SIGTERM until it runs again
        return [Signal(c.name, c.pid, signal.SIGTERM), Signal(c.name, c.pid, signal.SIGCONT),
                Event(ev.TERMINATING, c.name, {"pid": c.pid, "reason": c.kill_reason})]

    def _replace_dependencies(self, c: Child, reason: str, stalled: bool) -> list[Action]:
        """A dependent that exited asked for its dependencies' replacement; it waits for them (held)."""
        actions: list[Action] = []
        for name in c.spec.depends_on:
            d = self.children[name]
            if d.state not in UP or d.pid is None:
                continue
            c.held = True
            actions += self._stall(d, reason, self.clock()) if stalled else self._recycle(d, reason)
        return actions

    def _recycle(self, c: Child, reason: str) -> list[Action]:
        """A planned restart: no evidence, outside the intensity limit; dependents restart after it."""
        c.state = STOPPING
        c.kill_reason = f"recycled: {reason}"
        c.restart_after_exit = True
        return [Event(ev.RECYCLED, c.name, {"reason": reason})] + self._terminate(c)

    def _drop_spare(self, c: Child) -> list[Action]:
        if not c.spare:
            return []
        c.spare = False
        return [DropStandby(c.name)]

    def _restart_dependents(self, c: Child) -> list[Action]:
        """rest_for_one: stop what depends on ``c``; each starts again once ``c`` (and all it needs) is up."""
        actions: list[Action] = []
        for d in self.dependents(c):
            if d.state in (FAILED, STOPPED) and not d.held:
                continue  # failed or finished on its own: it stays so
            d.held = True
            d.restart_after_exit = False  # it starts again after c, not on its own
            if d.state in UP and d.pid is not None:
                d.state = STOPPING
                d.kill_reason = f"restarting with {c.name}"
                actions.append(Event(ev.DEPENDENCY_RESTART, d.name, {"dependency": c.name}))
                actions += self._terminate(d)
            elif d.state in (BACKOFF, STARTING) and d.pid is None:  # not running: wait for c
                actions += self._wait_for_dependencies(d)
        return actions

    def _release_dependents(self, c: Child) -> list[Action]:
        """Start the held dependents that have exited and whose dependencies are all up again."""
        actions: list[Action] = []
        for d in self.dependents(c):
            if d.held and d.pid is None and d.state not in ALIVE and self._deps_up(d):
                d.restarts += d.incarnation >= 0  # its first start is no restart
                actions += self._spawn(d)
        return actions

    def _hold(self, c: Child) -> list[Action]:
        """A held child has exited: start it if its dependencies are up, else wait for them."""
        if self._deps_up(c):
            c.restarts += 1
            return self._spawn(c)
        return self._wait_for_dependencies(c)

    def _wait_for_dependencies(self, c: Child) -> list[Action]:
        """Not running, held for a dependency that is down: failed with it, or waiting for it."""
        down = [d for d in c.spec.depends_on if self.children[d].state != RUNNING]
        failed = [d for d in down if self.children[d].state == FAILED]
        ended = [d for d in down if self.children[d].state == STOPPED]
        c.restart_at = math.inf
        if failed:
            c.state = FAILED
            c.kill_reason = f"{failed[0]} failed"
            return [Event(ev.FAILED, c.name, {"reason": c.kill_reason})] + self._drop_spare(c)
        if ended:  # it finished and will not come back: neither will this
            c.state = STOPPED
            c.held = False
            c.kill_reason = f"{ended[0]} finished"
            return [Event(ev.FINISHED, c.name, {})] + self._drop_spare(c)
        c.state = BACKOFF
        c.kill_reason = f"waiting for {down[0]}" if down else ""
        return []

    def _after_exit(self, c: Child, code: int | None) -> list[Action]:
        now = self.clock()
        spec = c.spec
        if self.stopping:
            c.state = STOPPED
            return self._advance_stop() + self._check_end()
        if c.restart_after_exit:
            return self._restart_dependents(c) + self._spawn_or_wait(c)
        if c.held:
            return self._hold(c)
        if code in spec.fatal_exit_codes and c.state != STALLED:
            reason = (c.heartbeat or {}).get("detail")  # the beat of this incarnation: spawning clears it
            return self._fail(c, reason or f"exited with code {code}, which says a restart would not help", {})
        abnormal = code != 0 or c.state == STALLED  # a stalled child was killed by us, whatever its exit code
        if not abnormal and spec.restart != PERMANENT:
            c.state = STOPPED
            if spec.significant:
                return [Event(ev.RUN_COMPLETE, c.name, {})] + self.request_stop("run complete", 0)
            actions: list[Action] = [Event(ev.FINISHED, c.name, {})] + self._drop_spare(c)
            for d in self.dependents(c):  # held ones waiting for it will wait no more
                if d.held and d.pid is None and d.state not in ALIVE:
                    actions += self._wait_for_dependencies(d)
            return actions
        if spec.restart == TEMPORARY:
            return self._fail(c, f"exited with code {code}; {TEMPORARY} children are not restarted", {})
        # to be restarted, within the intensity limit
        while c.restart_times and now - c.restart_times[0] > spec.intensity.window_s:
            c.restart_times.popleft()
        if len(c.restart_times) >= spec.intensity.max_restarts:
            return self._fail(c, f"{len(c.restart_times)} restarts within {spec.intensity.window_s:g}s",
                              {"restarts": len(c.restart_times), "window_s": spec.intensity.window_s})
        c.restart_times.append(now)
        c.restarts += 1
        b = spec.backoff
        delay = min(b.max_s, b.initial_s * (2 ** c.consecutive))
        delay *= 1.0 + b.jitter * (2.0 * self.rng.random() - 1.0)
        c.consecutive += 1
        c.state = BACKOFF
        c.restart_at = now + delay
        return ([Event(ev.BACKOFF, c.name, {"delay_s": round(delay, 3), "restarts": c.restarts, "code": code})]
                + self._restart_dependents(c))

    def _fail(self, c: Child, reason: str, detail: dict) -> list[Action]:
        c.state = FAILED
        c.kill_reason = reason
        actions: list[Action] = [Event(ev.FAILED, c.name, {"reason": reason, **detail})]
        actions += self._drop_spare(c) + self._restart_dependents(c)
        pool = [p for p in self.children.values() if c.spec.pool and p.spec.pool == c.spec.pool]
        if c.spec.significant:
            actions += self.request_stop(f"{c.name} failed: {reason}", 1)
        elif pool and all(p.state == FAILED for p in pool) and not self.stopping:
            actions += self.request_stop(f"every child of pool {c.spec.pool} failed; the last, {c.name}: {reason}", 1)
        return actions

    def _advance_stop(self) -> list[Action]:
        """Reverse start order: SIGTERM a stopping child once nothing alive depends on it."""
        actions: list[Action] = []
        if not self.stopping or self.forced_at is not None:
            return actions
        for c in reversed(list(self.children.values())):
            if c.state == STOPPING and c.pid is not None and c.kill_started_at is None \
                    and not any(d.state in ALIVE for d in self.dependents(c)):
                actions += self._terminate(c)
        return actions

    def _give_up_forced(self, now: float) -> list[Action]:
        """After a forced stop, a child that outlives every kill grace is given up on (the driver reaps it later)."""
        if now - self.forced_at < max((c.spec.kill_grace_s for c in self.children.values()), default=0.0):
            return []
        actions: list[Action] = []
        for c in self.children.values():
            if c.state in ALIVE:
                actions.append(Event(ev.EXITED, c.name, {"pid": c.pid, "code": None, "state": c.state}))
                c.state, c.pid = STOPPED, None
        return actions + self._check_end()

    def _check_end(self) -> list[Action]:
        if self.end is None and self.stopping and not any(c.state in ALIVE for c in self.children.values()):
            self.end = EndRun(self._stop_code, self.stop_reason)
            return [Event(ev.RUN_ENDED, "run", {"reason": self.stop_reason, "exit_code": self.end.exit_code}),
                    self.end]
        return []

    # -- reading ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Each child's progress count as last reported (its last incarnation's, once it exited)."""
        return {c.name: max(c.count(), c.previous_count or 0) if c.heartbeat is not None else c.previous_count
                for c in self.children.values() if c.heartbeat is not None or c.previous_count is not None}

    def restore_counts(self, counts: dict) -> None:
        """What an earlier supervisor of this run saw its children reach: the base of ``resumed``'s ``redone``."""
        for name, count in counts.items():
            if name in self.children and isinstance(count, int) and not isinstance(count, bool):
                self.children[name].previous_count = count

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per child, in start order, for ``status``."""
        now = self.clock()
        rows = []
        for c in self.children.values():
            hb = c.heartbeat or {}
            alive = c.state in ALIVE and c.pid is not None
            rows.append({
                "name": c.name, "kind": c.spec.kind, "labels": dict(c.spec.labels), "state": c.state,
                "pid": c.pid if alive else None, "incarnation": c.incarnation, "restarts": c.restarts,
                "uptime_s": round(now - c.started_at, 2) if alive else 0.0,
                "heartbeat_age_s": round(now - c.last_heartbeat_at, 2) if alive and c.last_heartbeat_at else None,
                "phase": hb.get("phase") if alive else None,
                "progress": c.count(), "progress_counters": list(c.spec.progress_counters),
                "env_steps": int(hb.get("env_steps", 0)), "updates": int(hb.get("updates", 0)),
                "steps_per_s": float(hb.get("steps_per_s", 0.0)), "rss_bytes": int(hb.get("rss_bytes", 0)),
                "gpu_memory_bytes": hb.get("gpu_memory_bytes") if alive else None,
                "alerts": list(hb.get("alerts", [])), "last_exit": c.last_exit,
                "detail": hb.get("detail") if alive else None,
                "dropped": min(COUNT_CAP, c.dropped_earlier + (int(hb.get("dropped") or 0) if alive else 0)),
                "resumed": c.resumed,
                "last_incident": c.last_incident, "reason": c.kill_reason or None,
                "depends_on": list(c.spec.depends_on),
            })
        return rows
