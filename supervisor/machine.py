"""The supervisor's decisions: a pure state machine over child specs, with an injectable clock.

No I/O happens here, and nothing here knows what a child *is* or how it runs:
every policy (restart type, significance, deadlines, progress counters, grace
periods, backoff, intensity, dependencies, a standby spare) comes from its
:class:`~supervisor.specs.ChildSpec`, which :mod:`supervisor.plan` builds from the
validated config. Drivers feed in what they observe (an incarnation spawned, a
heartbeat, an exit, evidence captured, a user request, a stop) and
:meth:`Supervision.tick` turns the passage of time into decisions; every call
returns a list of kind-neutral actions (spawn, capture evidence, terminate, kill,
keep a standby, log an event, end the run) that the driver of the child's kind
carries out in its own terms: a process driver signals a process group, a
container driver asks Docker. An incarnation is named by (child name,
incarnation number); a pid, where a driver has one, is shown, never relied on.

Per child (states in :mod:`protocol.states`)::

    starting --first heartbeat outside its start-up phases--> running
    starting/running --deadline missed--> stalled --evidence, terminate, grace, kill--> (exit)
    (exit, to be restarted) --> backoff --delay--> starting
    (exit, too many restarts in the window, or temporary) --> failed
    (exit 0 of a transient or temporary child, or any exit while stopping) --> stopped

A child's history (:class:`Child`: its state, restarts, backoff, what earlier
incarnations reached) and its current run (:class:`Incarnation`: started when,
heartbeats, progress, a kill under way) are two objects; a spawn replaces the
incarnation whole. Every state is entered through :meth:`Supervision._enter`,
which also makes the state's event.

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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol import causes
from protocol import events as ev
from protocol.states import (
    ALIVE,
    BACKOFF,
    ENDED,
    FAILED,
    RUNNING,
    STALLED,
    STARTING,
    STOPPED,
    STOPPING,
    UP,
)
from supervisor.specs import PERMANENT, TEMPORARY, ChildSpec, start_order

# Counters a child reports are capped here, so sums of them stay numbers every reader can take.
COUNT_CAP = 2**48

# Evidence that has not come back this long after its own timeout never will (its
# thread is stuck): the kill goes on without it.
EVIDENCE_SLACK_S = 1.0


# -- actions: what a driver carries out, each for one incarnation (name, incarnation) --------------

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
    incarnation: int
    reason: str
    heartbeat: dict | None


@dataclass(frozen=True)
class Terminate:
    """Ask the incarnation to end, with its grace period to do so (its driver says how)."""

    name: str
    incarnation: int


@dataclass(frozen=True)
class Kill:
    """End the incarnation now, whatever it is doing (its driver says how)."""

    name: str
    incarnation: int


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


Action = Spawn | StartStandby | DropStandby | CaptureEvidence | Terminate | Kill | Event | EndRun


# -- a child: its history, and its current incarnation ----------------------------------------------

@dataclass
class Incarnation:
    """One start of a child, from the spawn the machine asked for until it exited."""

    number: int
    started_at: float
    pid: int | None = None  # what the driver reported, for people; None where it has none
    live: bool = False  # the driver started it, and it has not exited
    last_heartbeat_at: float | None = None
    heartbeat: dict | None = None
    progress_at: float = 0.0
    progress_count: int | None = None
    progress_phase: str | None = None
    kill_started_at: float | None = None  # terminate sent
    evidence_since: float | None = None
    kill_sent: bool = False
    restart_after_exit: bool = False  # a user restart or a recycle: spawn again at once when it exits
    resumed: dict | None = None  # it resumed from saved state: from where, and what it redoes


@dataclass
class Child:
    """A child's history across its incarnations."""

    spec: ChildSpec
    state: str = STOPPED
    inc: Incarnation | None = None  # the current (or last) incarnation
    restart_times: deque = field(default_factory=deque)
    restarts: int = 0
    consecutive: int = 0  # restarts since the child last ran healthily, for the backoff
    restart_at: float = 0.0
    reason: str = ""  # why it is being stopped, failed, or waiting
    held: bool = False  # stopped with a dependency: starts again once its dependencies are up
    spare: bool = False  # a standby was asked for and not used or lost since
    last_exit: int | None = None
    last_incident: str | None = None
    last_cause: str | None = None  # the cause of its last stall or exit of its own (protocol/causes.py)
    cause_incident: str | None = None  # the incident that cause was named from (None: an exit's status)
    alerts_seen: set = field(default_factory=set)
    previous_count: int | None = None  # the progress count its last incarnation reached
    dropped_earlier: int = 0  # messages its earlier incarnations dropped

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def live(self) -> bool:
        """An incarnation runs (spawned, not exited)."""
        return self.inc is not None and self.inc.live

    @property
    def incarnation(self) -> int:
        return self.inc.number if self.inc is not None else -1

    @property
    def pid(self) -> int | None:
        return self.inc.pid if self.live else None

    @property
    def heartbeat(self) -> dict | None:
        """The last heartbeat of the current (or, once it exited, the last) incarnation."""
        return self.inc.heartbeat if self.inc is not None else None

    def count(self) -> int:
        """What must grow while the child is in a progressing phase."""
        hb = self.heartbeat or {}
        return sum(int(hb.get(k) or 0) for k in self.spec.progress_counters)


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
        return all(self.children[d].state == RUNNING and self.children[d].live for d in c.spec.depends_on)

    def _held_dependents_alive(self, c: Child) -> bool:
        """rest_for_one: a restarted child waits until the dependents stopped for it are gone."""
        return any(d.held and d.live for d in self.dependents(c))

    def wants_spawn(self, action: Spawn) -> bool:
        """Whether a Spawn still stands: an earlier action of the same batch may have changed the machine's mind."""
        c = self.children[action.name]
        return (c.state == STARTING and c.inc is not None and not c.inc.live and c.inc.number == action.incarnation
                and not self.stopping)

    def _current(self, name: str, incarnation: int) -> Child | None:
        """The child whose live incarnation this is; None for an earlier one, or a stranger's."""
        c = self.children.get(name)
        if c is None or not c.live or c.inc.number != incarnation:
            return None
        return c

    # -- entering a state: the one place that does, with the state's event -------------------------

    def _enter(self, c: Child, state: str, event: str | None = None, **detail) -> list[Action]:
        c.state = state
        return [Event(event, c.name, detail)] if event else []

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

    def spawned(self, name: str, incarnation: int, pid: int | None = None, standby: bool = False) -> list[Action]:
        """The driver started the incarnation (``pid`` where it has one). Held dependents start after it."""
        c = self.children[name]
        if c.state != STARTING or c.inc is None or c.inc.live or c.inc.number != incarnation:
            return [Kill(name, incarnation)]  # not wanted any more: nothing may run unwatched
        c.inc.live, c.inc.pid = True, pid
        return [Event(ev.SPAWNED, name, {"pid": pid, "incarnation": incarnation, "standby": standby})]

    def spawn_failed(self, name: str, error: str) -> list[Action]:
        """The driver could not start it: handled as an abnormal exit (backoff, intensity)."""
        c = self.children[name]
        return [Event(ev.SPAWN_FAILED, name, {"error": error})] + self._after_exit(c, None)

    def standby_lost(self, name: str) -> list[Action]:
        """The child's standby spare died or could not start; a new one is asked for when it runs again."""
        self.children[name].spare = False
        return []

    def heartbeat(self, hb: dict) -> list[Action]:
        """A beat counts for the live incarnation it names, with that incarnation's pid (None for one the driver
        knows no pid of: a forged beat must match it too)."""
        c = self.children.get(hb.get("name", ""))
        if c is None or not c.live or c.state not in ALIVE or hb.get("incarnation") != c.inc.number \
                or hb.get("pid") != c.inc.pid:
            return []  # a late beat from an earlier incarnation, or from a stranger
        inc = c.inc
        now = self.clock()
        inc.last_heartbeat_at = now
        inc.heartbeat = hb
        count, phase = c.count(), hb.get("phase")
        if count != inc.progress_count or phase != inc.progress_phase:
            inc.progress_count, inc.progress_phase, inc.progress_at = count, phase, now
        actions: list[Action] = []
        if isinstance(hb.get("resumed_from"), int) and inc.resumed is None:
            previous = c.previous_count  # None: not known (a supervisor killed before it saved its counts)
            inc.resumed = {"resumed_from": hb["resumed_from"], "previous": previous,
                           "redone": None if previous is None else max(0, previous - hb["resumed_from"])}
            actions.append(Event(ev.RESUMED, c.name, dict(inc.resumed)))
        for alert in hb.get("alerts") or []:
            # alerts a child reports (divergence, say) become run events
            if isinstance(alert, str) and alert not in c.alerts_seen:
                c.alerts_seen.add(alert)
                actions.append(Event(ev.ALERT, c.name, {"alert": alert}))
        if c.state == STARTING and phase not in c.spec.startup_phases:
            actions += self._enter(c, RUNNING, ev.RUNNING, pid=inc.pid, phase=phase)
            actions += self._release_dependents(c)  # ready: what waits for it starts now
        return actions

    def evidence_done(self, name: str, incident: str | None, cause: dict | None = None) -> list[Action]:
        """The stall's evidence is written (``incident``, None where it failed) and its cause named from it."""
        c = self.children[name]
        actions: list[Action] = []
        if incident:
            c.last_incident = c.cause_incident = incident
            c.last_cause = (cause or {}).get("cause")
            actions.append(Event(ev.EVIDENCE_CAPTURED, name, {
                "incident": incident, **({k: cause.get(k) for k in ("cause", "advice", "because")} if cause else {})}))
        if c.state != STALLED or not c.live or c.inc.kill_started_at is not None:
            return actions
        return actions + self._terminate(c)

    def exited(self, name: str, incarnation: int, code: int | None, cause: str | None = None) -> list[Action]:
        """``cause``: why, where its driver knows more than the exit status (else named from the status)."""
        c = self._current(name, incarnation)
        if c is None:
            return []
        c.last_exit = code
        pid, c.inc.live = c.inc.pid, False
        if c.heartbeat is not None:
            c.previous_count = max(c.count(), c.inc.resumed["resumed_from"] if c.inc.resumed else 0)
            c.dropped_earlier = min(COUNT_CAP, c.dropped_earlier + int(c.heartbeat.get("dropped") or 0))
        detail = {"pid": pid, "code": code, "state": c.state}
        cause = (cause or causes.of_exit(code)) if c.state in UP and not self.stopping else None
        if cause:  # it ended on its own: why
            detail["cause"] = c.last_cause = cause
            c.cause_incident = None
        actions: list[Action] = [Event(ev.EXITED, name, detail)]
        if not self.stopping and c.state in UP and code is not None:
            if code in c.spec.stall_dependencies_on:
                said = (c.heartbeat or {}).get("detail")  # its last word: how it found the dependency stalled
                actions += self._replace_dependencies(c, f"{c.name} found it stalled (exit {code})"
                                                      + (f": {said}" if said else ""), stalled=True)
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
        if c.state in ALIVE and c.live:
            if c.held:
                return actions  # already being restarted with its dependency
            c.inc.restart_after_exit = True
            if c.state != STOPPING:
                actions += self._enter(c, STOPPING)
                c.reason = "restart requested"
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
            if c.state in ALIVE and c.live:
                if c.state == STALLED and c.inc.kill_started_at is not None:
                    continue  # already being killed
                if c.state != STOPPING:
                    actions += self._enter(c, STOPPING)
                    c.reason = reason
                    c.inc.kill_started_at = None  # asked to stop once its dependents are gone
                    c.inc.evidence_since = None
            elif c.state in (BACKOFF, STARTING):
                actions += self._enter(c, STOPPED)
        return actions + self._advance_stop() + self._check_end()

    def signal_received(self, name: str) -> list[Action]:
        """The supervisor was asked to stop from outside (``name`` says how): the first time stops the run in
        order, the second kills everything."""
        self.stop_signals += 1
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
            if c.state in ALIVE and c.live:
                actions += self._enter(c, STOPPING)
                c.reason = reason
                c.inc.kill_started_at = now
                c.inc.kill_sent = True
                actions.append(Kill(c.name, c.inc.number))
            elif c.state in (BACKOFF, STARTING):
                actions += self._enter(c, STOPPED)
        return actions + self._check_end()

    # -- time ----------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Decisions that are due now: deadlines, grace periods, backoffs, standbys."""
        now = self.clock()
        actions: list[Action] = []
        for c in self.children.values():
            spec, inc = c.spec, c.inc
            if c.state in UP and c.live:
                reason = self._stall_reason(c, now)
                if reason:
                    actions += self._stall(c, reason, now)
                elif c.state == RUNNING and c.consecutive and now - inc.started_at >= spec.backoff.healthy_reset_s:
                    c.consecutive = 0  # healthy for a while: the next failure starts the backoff over
            elif c.state == STALLED and c.live and inc.kill_started_at is None and inc.evidence_since is not None \
                    and now - inc.evidence_since >= spec.deadlines.evidence_s + EVIDENCE_SLACK_S:
                actions += self._terminate(c)  # evidence never came back; kill without it
            if c.state in (STALLED, STOPPING) and c.live and inc.kill_started_at is not None and not inc.kill_sent:
                grace = spec.stop_grace_s if c.state == STOPPING else spec.kill_grace_s
                if now - inc.kill_started_at >= grace:
                    inc.kill_sent = True
                    actions += [Kill(c.name, inc.number),
                                Event(ev.KILLED, c.name,
                                      {"pid": inc.pid, "after_s": round(now - inc.kill_started_at, 2)})]
            if c.state == BACKOFF and not c.held and now >= c.restart_at and not self.stopping \
                    and not self._held_dependents_alive(c):
                actions += self._spawn(c)
            if c.state == RUNNING and spec.max_age_s and now - inc.started_at >= spec.max_age_s \
                    and not inc.restart_after_exit and not self.stopping:
                actions += self._recycle(c, f"ran {now - inc.started_at:.0f}s (max age {spec.max_age_s:g}s)")
            if c.state == RUNNING and spec.standby and not c.spare and not self.stopping:
                c.spare = True  # asked for once the child runs, so it never slows the child's own start
                actions.append(StartStandby(c.name))
        if self.forced_at is not None and self.end is None:
            actions += self._give_up_forced(now)
        return actions

    def _stall_reason(self, c: Child, now: float) -> str:
        d, inc = c.spec.deadlines, c.inc
        if inc.last_heartbeat_at is None:
            if now - inc.started_at > d.startup_s:
                return f"no heartbeat within the startup deadline ({d.startup_s:g}s)"
            return ""
        silent = now - inc.last_heartbeat_at
        if silent > d.heartbeat_s:
            return f"no heartbeat for {silent:.1f}s (deadline {d.heartbeat_s:g}s)"
        hb = inc.heartbeat or {}
        phase = hb.get("phase")
        in_phase = float(hb.get("phase_age_s") or 0.0) + silent
        if phase in c.spec.startup_phases and in_phase > d.startup_s:
            return f"in phase {phase} for {in_phase:.1f}s (startup deadline {d.startup_s:g}s)"
        if phase in c.spec.progress_phases and now - inc.progress_at > d.progress_s:
            said = hb.get("detail")
            return (f"no progress for {now - inc.progress_at:.1f}s in phase {phase} at count {inc.progress_count} "
                    f"(deadline {d.progress_s:g}s)" + (f"; it reports: {said}" if said else ""))
        return ""

    # -- transitions -----------------------------------------------------------

    def _spawn(self, c: Child) -> list[Action]:
        """A new incarnation replaces the last one whole."""
        now = self.clock()
        c.inc = Incarnation(number=c.incarnation + 1, started_at=now, progress_at=now)
        c.held = False
        c.reason = ""
        standby, c.spare = c.spare, False
        return self._enter(c, STARTING) + [Spawn(c.name, c.inc.number, standby)]

    def _spawn_or_wait(self, c: Child) -> list[Action]:
        """Spawn now, or as soon as the dependents stopped for it have exited (tick does it)."""
        if self._held_dependents_alive(c):
            c.restart_at = self.clock()
            return self._enter(c, BACKOFF)
        return self._spawn(c)

    def _stall(self, c: Child, reason: str, now: float) -> list[Action]:
        c.reason = reason
        c.inc.evidence_since = now
        return (self._enter(c, STALLED, ev.STALLED, pid=c.inc.pid, reason=reason, heartbeat=c.heartbeat)
                + [CaptureEvidence(c.name, c.inc.number, reason, c.heartbeat)])

    def _terminate(self, c: Child) -> list[Action]:
        c.inc.kill_started_at = self.clock()
        return [Terminate(c.name, c.inc.number),
                Event(ev.TERMINATING, c.name, {"pid": c.inc.pid, "reason": c.reason})]

    def _replace_dependencies(self, c: Child, reason: str, stalled: bool) -> list[Action]:
        """A dependent that exited asked for its dependencies' replacement; it waits for them (held)."""
        actions: list[Action] = []
        for name in c.spec.depends_on:
            d = self.children[name]
            if d.state not in UP or not d.live:
                continue
            c.held = True
            actions += self._stall(d, reason, self.clock()) if stalled else self._recycle(d, reason)
        return actions

    def _recycle(self, c: Child, reason: str) -> list[Action]:
        """A planned restart: no evidence, outside the intensity limit; dependents restart after it."""
        c.reason = f"recycled: {reason}"
        c.inc.restart_after_exit = True
        return self._enter(c, STOPPING, ev.RECYCLED, reason=reason) + self._terminate(c)

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
            if d.inc is not None:
                d.inc.restart_after_exit = False  # it starts again after c, not on its own
            if d.state in UP and d.live:
                d.reason = f"restarting with {c.name}"
                actions += self._enter(d, STOPPING, ev.DEPENDENCY_RESTART, dependency=c.name)
                actions += self._terminate(d)
            elif d.state in (BACKOFF, STARTING) and not d.live:  # not running: wait for c
                actions += self._wait_for_dependencies(d)
        return actions

    def _release_dependents(self, c: Child) -> list[Action]:
        """Start the held dependents that have exited and whose dependencies are all up again."""
        actions: list[Action] = []
        for d in self.dependents(c):
            if d.held and not d.live and d.state not in ALIVE and self._deps_up(d):
                d.restarts += d.inc is not None  # its first start is no restart
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
            c.reason = f"{failed[0]} failed"
            return self._enter(c, FAILED, ev.FAILED, reason=c.reason) + self._drop_spare(c) + self._end_with_pool(c)
        if ended:  # it finished and will not come back: neither will this
            c.held = False
            c.reason = f"{ended[0]} finished"
            return self._enter(c, STOPPED, ev.FINISHED) + self._drop_spare(c) + self._end_with_pool(c)
        c.reason = f"waiting for {down[0]}" if down else ""
        return self._enter(c, BACKOFF)

    def _after_exit(self, c: Child, code: int | None) -> list[Action]:
        now = self.clock()
        spec = c.spec
        if self.stopping:
            return self._enter(c, STOPPED) + self._advance_stop() + self._check_end()
        if c.inc is not None and c.inc.restart_after_exit:
            return self._restart_dependents(c) + self._spawn_or_wait(c)
        if c.held:
            return self._hold(c)
        if code in spec.fatal_exit_codes and c.state != STALLED:
            reason = (c.heartbeat or {}).get("detail")  # the beat of this incarnation: spawning clears it
            return self._fail(c, reason or f"exited with code {code}, which says a restart would not help", {})
        abnormal = code != 0 or c.state == STALLED  # a stalled child was killed by us, whatever its exit code
        if not abnormal and spec.restart != PERMANENT:
            if spec.significant:
                return self._enter(c, STOPPED, ev.RUN_COMPLETE) + self.request_stop("run complete", 0)
            actions: list[Action] = self._enter(c, STOPPED, ev.FINISHED) + self._drop_spare(c)
            for d in self.dependents(c):  # held ones waiting for it will wait no more
                if d.held and not d.live and d.state not in ALIVE:
                    actions += self._wait_for_dependencies(d)
            return actions + self._end_with_pool(c)
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
        c.restart_at = now + delay
        return (self._enter(c, BACKOFF, ev.BACKOFF, delay_s=round(delay, 3), restarts=c.restarts, code=code)
                + self._restart_dependents(c))

    def _fail(self, c: Child, reason: str, detail: dict) -> list[Action]:
        c.reason = reason
        actions: list[Action] = self._enter(c, FAILED, ev.FAILED, reason=reason, **detail)
        actions += self._drop_spare(c) + self._restart_dependents(c)
        pool = [p for p in self.children.values() if c.spec.pool and p.spec.pool == c.spec.pool]
        if c.spec.significant:
            actions += self.request_stop(f"{c.name} failed: {reason}", 1)
        elif pool and all(p.state == FAILED for p in pool) and not self.stopping:
            actions += self.request_stop(f"every child of pool {c.spec.pool} failed; the last, {c.name}: {reason}", 1)
        else:
            actions += self._end_with_pool(c)
        return actions

    def _end_with_pool(self, c: Child) -> list[Action]:
        """With no significant child to end the run (it runs on another host), the run ends once ``c``'s pool has
        ended: 0 when every child of it finished, 1 when one failed."""
        pool = [p for p in self.children.values() if c.spec.pool and p.spec.pool == c.spec.pool]
        if self.stopping or not pool or any(p.state not in ENDED for p in pool) \
                or any(p.spec.significant for p in self.children.values()):
            return []
        failed = [p.name for p in pool if p.state == FAILED]
        return self.request_stop(f"every child of pool {c.spec.pool} finished" + (
            f" or failed ({', '.join(failed)})" if failed else ""), 1 if failed else 0)

    def _advance_stop(self) -> list[Action]:
        """Reverse start order: terminate a stopping child once nothing alive depends on it."""
        actions: list[Action] = []
        if not self.stopping or self.forced_at is not None:
            return actions
        for c in reversed(list(self.children.values())):
            if c.state == STOPPING and c.live and c.inc.kill_started_at is None \
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
                if c.inc is not None:
                    c.inc.live = False
                actions += self._enter(c, STOPPED)
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
        """One row per child, in start order: what the machine knows of it, and its last heartbeat as it came
        (readers pick the fields they show)."""
        now = self.clock()
        rows = []
        for c in self.children.values():
            hb = c.heartbeat or {}
            alive = c.state in ALIVE and c.live
            rows.append({
                "name": c.name, "kind": c.spec.kind, "labels": dict(c.spec.labels), "state": c.state,
                "pid": c.pid if alive else None, "incarnation": c.incarnation, "restarts": c.restarts,
                "uptime_s": round(now - c.inc.started_at, 2) if alive else 0.0,
                "heartbeat_age_s": (round(now - c.inc.last_heartbeat_at, 2)
                                    if alive and c.inc.last_heartbeat_at else None),
                "alive": alive, "heartbeat": dict(hb),
                "progress": c.count(), "progress_counters": list(c.spec.progress_counters),
                "last_exit": c.last_exit,
                "dropped": min(COUNT_CAP, c.dropped_earlier + (int(hb.get("dropped") or 0) if alive else 0)),
                "resumed": c.inc.resumed if c.inc is not None else None,
                "last_incident": c.last_incident, "cause": c.last_cause, "cause_incident": c.cause_incident,
                "reason": c.reason or None,
                "depends_on": list(c.spec.depends_on),
            })
        return rows
