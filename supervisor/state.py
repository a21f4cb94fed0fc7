"""The supervisor's decisions: a pure state machine with an injectable clock.

No I/O happens here. Drivers feed in what they observe (a child spawned, a
heartbeat, an exit, evidence captured, a user request) and :meth:`Supervision.tick`
turns the passage of time into decisions; every call returns a list of actions
(spawn, capture evidence, signal, log an event, end the run) for the drivers to
carry out. That keeps every transition testable without processes or sleeping.

Per child::

    starting --first progressing heartbeat--> running
    starting/running --deadline missed--> stalled --evidence, SIGTERM, grace, SIGKILL--> (exit)
    (exit, unexpected) --> backoff --delay--> starting        (restart)
    (exit, too many restarts in the window) --> failed
    (exit, code 0 of a worker, or any exit while stopping) --> stopped
"""

from __future__ import annotations

import random
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.messages import LEARNER_PROGRESSING_PHASES, PROGRESSING_PHASES, STARTUP_PHASES

STARTING, RUNNING, STALLED, STOPPING, BACKOFF, FAILED, STOPPED = (
    "starting", "running", "stalled", "stopping", "backoff", "failed", "stopped")
ALIVE = (STARTING, RUNNING, STALLED, STOPPING)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    role: str  # "learner" or "worker"
    slot: int = 0


@dataclass(frozen=True)
class Limits:
    heartbeat_deadline_s: float = 5.0
    progress_deadline_s: float = 10.0
    startup_deadline_s: float = 60.0
    learner_deadline_s: float = 60.0
    kill_grace_s: float = 2.0
    stop_grace_s: float = 15.0  # an orderly stop lets the learner write its checkpoint
    evidence_timeout_s: float = 3.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    backoff_jitter: float = 0.2
    healthy_reset_s: float = 60.0
    max_restarts: int = 5
    restart_window_s: float = 60.0

    @classmethod
    def from_config(cls, sup) -> "Limits":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in sup.model_dump().items() if k in names})


# -- actions -------------------------------------------------------------------

@dataclass(frozen=True)
class Spawn:
    name: str
    incarnation: int


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


@dataclass(frozen=True)
class EndRun:
    exit_code: int
    reason: str


Action = Spawn | CaptureEvidence | Signal | Event | EndRun


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
    last_exit: int | None = None
    last_incident: str | None = None
    alerts_seen: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.spec.name

    def count(self) -> int:
        """What must grow while the child is in a progressing phase."""
        hb = self.heartbeat or {}
        if self.spec.role == "learner":
            return int(hb.get("updates", 0))
        return int(hb.get("env_steps", 0)) + int(hb.get("eval_steps") or 0)


class Supervision:
    """Every child of a run and what to do about each of them."""

    def __init__(self, specs: list[ChildSpec], limits: Limits, clock: Callable[[], float],
                 rng: random.Random | None = None):
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        self.children: dict[str, Child] = {s.name: Child(s) for s in specs}
        self.stopping = False
        self.end: EndRun | None = None
        self.stop_reason = ""

    # -- inputs ------------------------------------------------------------

    def start(self) -> list[Action]:
        """Spawn every child, the learner first."""
        order = sorted(self.children.values(), key=lambda c: (c.spec.role != "learner", c.spec.slot))
        return [a for c in order for a in self._spawn(c)]

    def spawned(self, name: str, pid: int) -> list[Action]:
        c = self.children[name]
        c.pid = pid
        return [Event("spawned", name, {"pid": pid, "incarnation": c.incarnation})]

    def spawn_failed(self, name: str, error: str) -> list[Action]:
        c = self.children[name]
        return [Event("spawn_failed", name, {"error": error})] + self._after_exit(c, None)

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
        for alert in hb.get("alerts") or []:
            if alert not in c.alerts_seen:  # the learner's divergence alerts become run events
                c.alerts_seen.add(alert)
                actions.append(Event("alert", c.name, {"alert": alert}))
        if c.state == STARTING and phase not in STARTUP_PHASES:
            c.state = RUNNING
            actions.append(Event("running", c.name, {"pid": c.pid, "phase": phase}))
        return actions

    def evidence_done(self, name: str, incident: str | None) -> list[Action]:
        c = self.children[name]
        if incident:
            c.last_incident = incident
        if c.state != STALLED or c.kill_started_at is not None or c.pid is None:
            return []
        return self._terminate(c)

    def exited(self, name: str, pid: int, code: int | None) -> list[Action]:
        c = self.children[name]
        if pid != c.pid:
            return []
        c.last_exit = code
        c.pid = None
        actions: list[Action] = [Event("exited", name, {"pid": pid, "code": code, "state": c.state})]
        return actions + self._after_exit(c, code)

    def request_restart(self, name: str) -> list[Action]:
        """A user's restart: stop it now (no evidence), spawn again at once, outside the intensity limit."""
        if name not in self.children:
            raise KeyError(name)
        c = self.children[name]
        actions: list[Action] = [Event("restart_requested", name, {"state": c.state})]
        if self.stopping:
            return actions
        if c.state in ALIVE and c.pid is not None:
            c.restart_after_exit = True
            if c.state != STOPPING:
                c.state = STOPPING
                c.kill_reason = "restart requested"
                actions += self._terminate(c)
            return actions
        c.consecutive = 0
        c.restart_times.clear()
        return actions + self._spawn(c)

    def request_stop(self, reason: str = "stop requested", exit_code: int = 0) -> list[Action]:
        if self.stopping:
            return []
        self.stopping = True
        self.stop_reason = reason
        self._stop_code = exit_code
        actions: list[Action] = [Event("stopping", "run", {"reason": reason})]
        for c in self.children.values():
            if c.state in ALIVE and c.pid is not None:
                if c.state != STALLED or c.kill_started_at is None:
                    c.state = STOPPING
                    c.kill_reason = reason
                    actions += self._terminate(c)
            elif c.state in (BACKOFF, STARTING):
                c.state = STOPPED
        return actions + self._check_end()

    # -- time ----------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Decisions that are due now: deadlines, grace periods, backoffs."""
        now = self.clock()
        L = self.limits
        actions: list[Action] = []
        for c in self.children.values():
            if c.state in (STARTING, RUNNING) and c.pid is not None:
                reason = self._stall_reason(c, now)
                if reason:
                    actions += self._stall(c, reason, now)
                elif c.state == RUNNING and c.consecutive and now - c.started_at >= L.healthy_reset_s:
                    c.consecutive = 0  # healthy for a while: the next failure starts the backoff over
            elif c.state == STALLED and c.kill_started_at is None and c.evidence_since is not None \
                    and now - c.evidence_since >= L.evidence_timeout_s + 1.0:
                actions += self._terminate(c)  # evidence never came back; kill without it
            if c.state in (STALLED, STOPPING) and c.kill_started_at is not None and not c.kill_sent:
                grace = L.stop_grace_s if (c.state == STOPPING and c.spec.role == "learner") else L.kill_grace_s
                if now - c.kill_started_at >= grace:
                    c.kill_sent = True
                    actions += [Signal(c.name, c.pid, signal.SIGKILL),
                                Event("killed", c.name, {"pid": c.pid, "after_s": round(now - c.kill_started_at, 2)})]
            if c.state == BACKOFF and now >= c.restart_at and not self.stopping:
                actions += self._spawn(c)
        return actions

    def _stall_reason(self, c: Child, now: float) -> str:
        L = self.limits
        if c.last_heartbeat_at is None:
            if now - c.started_at > L.startup_deadline_s:
                return f"no heartbeat within the startup deadline ({L.startup_deadline_s:g}s)"
            return ""
        silent = now - c.last_heartbeat_at
        if silent > L.heartbeat_deadline_s:
            return f"no heartbeat for {silent:.1f}s (deadline {L.heartbeat_deadline_s:g}s)"
        phase = (c.heartbeat or {}).get("phase")
        in_phase = float((c.heartbeat or {}).get("phase_age_s", 0.0)) + silent
        if phase in STARTUP_PHASES and in_phase > L.startup_deadline_s:
            return f"in phase {phase} for {in_phase:.1f}s (startup deadline {L.startup_deadline_s:g}s)"
        progressing = LEARNER_PROGRESSING_PHASES if c.spec.role == "learner" else PROGRESSING_PHASES
        deadline = L.learner_deadline_s if c.spec.role == "learner" else L.progress_deadline_s
        if phase in progressing and now - c.progress_at > deadline:
            return (f"no progress for {now - c.progress_at:.1f}s in phase {phase} at count {c.progress_count} "
                    f"(deadline {deadline:g}s)")
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
        c.progress_at, c.progress_count, c.progress_phase = now, None, None
        c.kill_started_at = c.evidence_since = None
        c.kill_sent = False
        c.restart_after_exit = False
        c.kill_reason = ""
        return [Spawn(c.name, c.incarnation)]

    def _stall(self, c: Child, reason: str, now: float) -> list[Action]:
        c.state = STALLED
        c.kill_reason = reason
        c.evidence_since = now
        return [Event("stalled", c.name, {"pid": c.pid, "reason": reason, "heartbeat": c.heartbeat}),
                CaptureEvidence(c.name, c.pid, reason, c.heartbeat)]

    def _terminate(self, c: Child) -> list[Action]:
        c.kill_started_at = self.clock()
        # SIGCONT after SIGTERM: a stopped process cannot handle SIGTERM until it runs again
        return [Signal(c.name, c.pid, signal.SIGTERM), Signal(c.name, c.pid, signal.SIGCONT),
                Event("terminating", c.name, {"pid": c.pid, "reason": c.kill_reason})]

    def _after_exit(self, c: Child, code: int | None) -> list[Action]:
        now = self.clock()
        L = self.limits
        if self.stopping:
            c.state = STOPPED
            return self._check_end()
        if c.restart_after_exit:
            return self._spawn(c)
        if code == 0 and c.state != STALLED:
            c.state = STOPPED
            if c.spec.role == "learner":
                return [Event("run_complete", c.name, {})] + self.request_stop("run complete", 0)
            return [Event("finished", c.name, {})]
        # an unexpected exit: restart within the intensity limit
        while c.restart_times and now - c.restart_times[0] > L.restart_window_s:
            c.restart_times.popleft()
        if len(c.restart_times) >= L.max_restarts:
            c.state = FAILED
            detail = {"restarts": len(c.restart_times), "window_s": L.restart_window_s}
            actions: list[Action] = [Event("failed", c.name, detail)]
            if c.spec.role == "learner":
                actions += self.request_stop(f"learner failed after {len(c.restart_times)} restarts", 1)
            return actions
        c.restart_times.append(now)
        c.restarts += 1
        delay = min(L.backoff_max_s, L.backoff_initial_s * (2 ** c.consecutive))
        delay *= 1.0 + L.backoff_jitter * (2.0 * self.rng.random() - 1.0)
        c.consecutive += 1
        c.state = BACKOFF
        c.restart_at = now + delay
        return [Event("backoff", c.name, {"delay_s": round(delay, 3), "restarts": c.restarts, "code": code})]

    def _check_end(self) -> list[Action]:
        if self.end is None and self.stopping and not any(c.state in ALIVE for c in self.children.values()):
            self.end = EndRun(getattr(self, "_stop_code", 0), self.stop_reason)
            return [Event("run_ended", "run", {"reason": self.stop_reason, "exit_code": self.end.exit_code}),
                    self.end]
        return []

    # -- reading ---------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        rows = []
        for c in sorted(self.children.values(), key=lambda c: (c.spec.role != "learner", c.spec.slot)):
            hb = c.heartbeat or {}
            alive = c.state in ALIVE and c.pid is not None
            rows.append({
                "name": c.name, "role": c.spec.role, "state": c.state, "pid": c.pid if alive else None,
                "incarnation": c.incarnation, "restarts": c.restarts,
                "uptime_s": round(now - c.started_at, 2) if alive else 0.0,
                "heartbeat_age_s": round(now - c.last_heartbeat_at, 2) if alive and c.last_heartbeat_at else None,
                "phase": hb.get("phase") if alive else None,
                "env_steps": int(hb.get("env_steps", 0)), "updates": int(hb.get("updates", 0)),
                "steps_per_s": float(hb.get("steps_per_s", 0.0)), "rss_bytes": int(hb.get("rss_bytes", 0)),
                "alerts": list(hb.get("alerts", [])), "last_exit": c.last_exit,
                "last_incident": c.last_incident, "reason": c.kill_reason or None,
            })
        return rows
