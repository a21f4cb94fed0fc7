"""Chaos: faults injected into a running stack, on command or on a schedule.

``supervisor chaos FAULT [--target NAME]`` sends the supervisor a ``chaos``
control request, and a ``chaos.every_s`` schedule draws one fault at a time. Every
fault is carried out by the driver of its target's kind (:meth:`Driver.inject`:
freeze, crash, or notify a process of a request written for it), never by
signalling anything here. Each fault is an event, ``fault_injected``; a fault the
stack must shrug off (``slow``, ``garbage``) also gets ``fault_ended`` once its
window is over. What the stack did about it is in the same ``events.jsonl``
(``stalled``, ``exited``, ``running``), so :func:`runreport.faults.fault_outcomes` reads detection and
recovery from the events alone.

The faults and their meaning are listed once, in :mod:`protocol.chaos`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from protocol import chaos as pc
from protocol import events as ev
from protocol import roles
from protocol.states import ALIVE, BACKOFF, RUNNING
from supervisor.drivers import CRASH, FREEZE, NOTIFY, Driver, Gone
from supervisor.machine import Event, Supervision
from supervisor.specs import ChildSpec

ROLE_OF_TARGET = {pc.WORKER: roles.WORKER, pc.LEARNER: roles.LEARNER, pc.SIMULATOR: roles.SIMULATOR}
# What each fault asks of its target's driver (``garbage`` goes to sockets, not to a child).
INJECTION = {"worker_sigstop": FREEZE, "learner_sigstop": FREEZE, "docker_pause": FREEZE,
             "worker_sigkill": CRASH, "learner_sigkill": CRASH, "docker_kill": CRASH,
             **{fault: NOTIFY for fault in pc.IN_STEP_FAULTS}}
# A slow step may take at most this share of the progress deadline.
SLOW_SHARE = 0.5
MAX_DURATION_S = 600.0


class ChaosError(ValueError):
    """A fault that cannot be injected; the message is one line for the user."""


@dataclass
class Pending:
    """A fault the stack must shrug off: checked once its window is over (``fault_ended``)."""

    id: int
    fault: str
    name: str
    target: str
    incarnation: int | None
    count: int  # the target's progress count at injection
    dropped: int  # the supervisor's dropped messages at injection
    end_at: float


@dataclass
class Schedule:
    next_id: int = 1
    next_at: float | None = None  # the next scheduled fault
    began_at: float | None = None  # when every child first ran: the schedule counts from here
    pending: dict[int, Pending] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)  # name -> incarnation hit, until replaced
    threads: list[threading.Thread] = field(default_factory=list)


class Chaos:
    """Injects faults into the children of one run.

    Its collaborators, each explicit: the chaos config and seed, the machine (to
    read states and dependents), the children's specs, ``driver_of(name)`` (who
    carries a fault out), ``record(event)``, ``dropped()`` (the supervisor's count
    of dropped messages) and ``garbage(sockets, pids)`` (starts a thread that sends
    garbage to the run's sockets).
    """

    def __init__(self, cfg, seed: int, machine: Supervision, specs: dict[str, ChildSpec], run_dir: Path,
                 driver_of: Callable[[str], Driver], record: Callable[[Event], None], dropped: Callable[[], int],
                 garbage: Callable[[list[str], dict], threading.Thread], clock=time.monotonic):
        self.cfg = cfg
        self.machine = machine
        self.specs = specs
        self.run_dir = Path(run_dir)
        self.driver_of = driver_of
        self.record = record
        self.dropped = dropped
        self.garbage = garbage
        self.clock = clock
        self.rng = random.Random(cfg.seed if cfg.seed is not None else seed)
        self.state = Schedule()

    # -- what may be hit -----------------------------------------------------

    def names_of(self, target: str) -> list[str]:
        role = ROLE_OF_TARGET[target]
        kind = "container" if target == pc.SIMULATOR else "process"
        return [s.name for s in self.specs.values() if s.labels.get("role") == role and s.kind == kind]

    def applicable(self) -> list[str]:
        """The faults this run can take (no docker faults without containers, no worker faults without workers)."""
        return [f for f in pc.FAULT_NAMES if pc.FAULTS[f].target == pc.SOCKETS or self.names_of(pc.FAULTS[f].target)]

    def eligible(self, fault: str) -> list[str]:
        """Targets a scheduled fault may hit: running, and not still recovering from (or shrugging off) another."""
        f = pc.FAULTS[fault]
        if f.target == pc.SOCKETS:
            return [] if any(p.fault == fault for p in self.state.pending.values()) else list(pc.SOCKET_TARGETS)
        pending = {p.name for p in self.state.pending.values()}
        return [n for n in self.names_of(f.target) if self._running(n) and n not in self.state.busy
                and n not in pending]

    def _running(self, name: str) -> bool:
        c = self.machine.children[name]
        return c.state == RUNNING and c.live

    # -- injecting -----------------------------------------------------------

    def command(self, fault: str | None, target: str | None, options: dict | None) -> dict:
        """A ``chaos`` control request: the reply for the CLI."""
        try:
            data = self.inject(fault or "", target, dict(options or {}), source="command")
        except ChaosError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "data": data}

    def inject(self, fault: str, target: str | None = None, options: dict | None = None,
               source: str = "command") -> dict:
        """Inject one fault; returns what the ``fault_injected`` event says. Raises ChaosError."""
        if self.machine.stopping:
            raise ChaosError("the run is stopping")
        f = pc.FAULTS.get(fault)
        if f is None:
            raise ChaosError(f"unknown fault {fault!r}; faults: {', '.join(pc.FAULT_NAMES)}")
        options = self._options(fault, options or {})
        if f.target == pc.SOCKETS:
            return self._garbage(target, source)
        name = self._target(f, target)
        c = self.machine.children[name]
        spec = c.spec
        pid, incarnation = c.pid, c.incarnation
        if fault == "slow" and options["slow_s"] > spec.deadlines.progress_s * SLOW_SHARE:
            raise ChaosError(f"slow_s {options['slow_s']:g} is more than half of {name}'s progress deadline "
                             f"({spec.deadlines.progress_s:g}s): that is a stall, not a slow step")
        try:
            if fault in pc.IN_STEP_FAULTS:
                pc.write_request(self.run_dir, name, pid, fault, fault_id=self.state.next_id, **options)
            self.driver_of(name).inject(name, incarnation, INJECTION[fault])
        except Gone:
            self._failed(fault, name, "the process is gone", source)
            raise ChaosError(f"{name} (pid {pid}) is gone") from None
        except Exception as exc:  # the Docker SDK raises many kinds
            said = str(exc).splitlines()[0][:200] if str(exc) else repr(exc)
            self._failed(fault, name, said, source)
            raise ChaosError(f"{fault} of {name} failed: {said}") from None
        deadline = {pc.HEARTBEAT: spec.deadlines.heartbeat_s, pc.LIVENESS: spec.deadlines.heartbeat_s,
                    pc.PROGRESS: spec.deadlines.progress_s}.get(f.seen_by)
        data = self._record(fault, name, name, pid, incarnation, source, deadline, options)
        if f.expect == pc.RESTART:
            self.state.busy[name] = incarnation
            for d in self.machine.dependents(c):  # rest_for_one: they are restarted with it
                if d.live:
                    self.state.busy.setdefault(d.name, d.incarnation)
        else:
            window = options["duration_s"] + spec.deadlines.progress_s
            self.state.pending[data["id"]] = Pending(data["id"], fault, name, name, incarnation, c.count(),
                                                     self.dropped(), self.clock() + window)
        return data

    def _options(self, fault: str, given: dict) -> dict:
        allowed = {"slow": {"slow_s": self.cfg.slow_s, "duration_s": self.cfg.slow_duration_s}}.get(fault, {})
        unknown = set(given) - set(allowed)
        if unknown:
            raise ChaosError(f"{fault} takes no option(s) {', '.join(sorted(map(repr, unknown)))}"
                             + (f"; it takes {', '.join(allowed)}" if allowed else ""))
        out = dict(allowed)
        for key, value in given.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DURATION_S:
                raise ChaosError(f"{fault}: {key} must be a number of seconds in (0, {MAX_DURATION_S:g}], "
                                 f"not {value!r}")
            out[key] = float(value)
        return out

    def _target(self, f: pc.Fault, target: str | None) -> str:
        names = self.names_of(f.target)
        if not names:
            if f.target == pc.SIMULATOR:
                raise ChaosError(f"{f.name} needs a simulator container, and this run has none "
                                 f"(env.backend carla with simulators.mode container)")
            raise ChaosError(f"{f.name} needs a {ROLE_OF_TARGET[f.target]}, and this run has none")
        if target is None:
            running = [n for n in names if self._running(n)]
            if not running:
                raise ChaosError(f"no {ROLE_OF_TARGET[f.target]} is running to take {f.name} "
                                 f"({', '.join(f'{n} is {self.machine.children[n].state}' for n in names)})")
            return self.rng.choice(running)
        if target not in self.specs:
            raise ChaosError(f"no process named {target!r}; names: {', '.join(self.specs)}")
        if target not in names:
            raise ChaosError(f"{f.name} needs a {ROLE_OF_TARGET[f.target]} ({', '.join(names)}), "
                             f"and {target} is not one")
        if not self._running(target):
            raise ChaosError(f"{target} is {self.machine.children[target].state}, not running")
        return target

    def _garbage(self, target: str | None, source: str) -> dict:
        if target is not None and target not in pc.SOCKET_TARGETS:
            raise ChaosError(f"garbage goes to a socket ({', '.join(pc.SOCKET_TARGETS)}), not {target!r}")
        sockets = [target] if target else list(pc.SOCKET_TARGETS)
        pids = {n: self.machine.children[n].pid for n in self.specs}
        self.state.threads.append(self.garbage(sockets, pids))
        data = self._record("garbage", "run", ",".join(sockets), None, None, source, None, {})
        self.state.pending[data["id"]] = Pending(data["id"], "garbage", "run", data["target"], None, 0,
                                                 self.dropped(), self.clock() + self.cfg.settle_s)
        return data

    def _record(self, fault, name, target, pid, incarnation, source, deadline, options) -> dict:
        f = pc.FAULTS[fault]
        data = {"id": self.state.next_id, "fault": fault, "target": target, "pid": pid, "incarnation": incarnation,
                "source": source, "expect": f.expect, "seen_by": f.seen_by, "deadline_s": deadline,
                "options": options}
        self.state.next_id += 1
        self.record(Event(ev.FAULT_INJECTED, name, data))
        return data

    def _failed(self, fault: str, name: str, error: str, source: str) -> None:
        self.record(Event(ev.FAULT_FAILED, name, {"fault": fault, "error": error, "source": source}))

    # -- time ------------------------------------------------------------------

    def tick(self) -> None:
        """Close the windows of faults that are over; inject the next scheduled one when it is due."""
        now = self.clock()
        for name, incarnation in list(self.state.busy.items()):
            c = self.machine.children[name]
            if (c.state == RUNNING and c.incarnation != incarnation) or c.state not in ALIVE + (BACKOFF,):
                del self.state.busy[name]  # replaced (or failed or stopped: nothing more to wait for)
        for p in list(self.state.pending.values()):
            if now >= p.end_at:
                del self.state.pending[p.id]
                detail = {"id": p.id, "fault": p.fault, "target": p.target, "progress": None,
                          "dropped": self.dropped() - p.dropped}
                if p.name in self.machine.children:
                    c = self.machine.children[p.name]
                    detail["progress"] = c.count() - p.count if c.live and c.incarnation == p.incarnation else None
                self.record(Event(ev.FAULT_ENDED, p.name, detail))
        if self.cfg.every_s is None or self.machine.stopping:
            return
        if self.state.began_at is None:
            if all(c.state == RUNNING for c in self.machine.children.values()):
                self.state.began_at = now
                self.state.next_at = now + self.cfg.start_after_s
            return
        if now < self.state.next_at:
            return
        self.state.next_at = now + self.cfg.every_s
        if self.cfg.stop_after_s is not None and now - self.state.began_at > self.cfg.stop_after_s:
            self.state.next_at = float("inf")  # the schedule is over
            return
        faults = [f for f in (self.cfg.faults or self.applicable()) if f in self.applicable()]
        self.rng.shuffle(faults)
        for fault in faults:
            targets = self.eligible(fault)
            if not targets:
                continue
            target = self.rng.choice(targets) if pc.FAULTS[fault].target != pc.SOCKETS else None
            try:
                self.inject(fault, target, source="schedule")
            except ChaosError:
                continue  # recorded as fault_failed where something was tried; the next one is drawn
            return

    def close(self) -> None:
        for t in self.state.threads:
            t.join(timeout=3)
        try:
            for path in (self.run_dir / "chaos").glob("*.json"):
                path.unlink()
            (self.run_dir / "chaos").rmdir()
        except OSError:
            pass


# -- garbage ---------------------------------------------------------------------------------------

def garbage_frames(names: dict[str, int | None]) -> dict[str, list[list[bytes]]]:
    """What ``garbage`` sends to each socket, in order (each entry a multipart message).

    Random bytes, bytes that are no msgpack, a map of the wrong protocol version, a
    valid message of the wrong type, a field of the wrong type, forged heartbeats
    (a stranger's, and a real child's name with a pid that is not its own), a
    header past its size limit; the heartbeat socket last gets one message past
    the socket's size limit (ZeroMQ disconnects the sender).
    """
    import msgpack
    import numpy as np

    from protocol.codec import encode
    from protocol.messages import PROTOCOL_VERSION

    def raw(header: dict) -> list[bytes]:
        return [msgpack.packb(header, use_bin_type=True)]

    beat = {"name": "intruder", "role": roles.WORKER, "pid": 1, "incarnation": 0, "phase": "stepping",
            "phase_age_s": 0.0, "env_steps": 10**9, "episodes": 0, "updates": 0, "steps_per_s": 0.0,
            "rss_bytes": 0, "sent_at": time.time()}
    common = [[os.urandom(97)], [b"\xc1\xc1 not msgpack"], raw({"v": PROTOCOL_VERSION + 98, "type": "heartbeat"}),
              raw({"v": PROTOCOL_VERSION, "type": "no_such_type"})]
    oversized_header = raw({"v": PROTOCOL_VERSION, "type": "steps", "pad": "x" * 70_000})  # past the header limit
    oversized = [b"\x00" * (128 * 1024)]  # past a 64 KiB socket's limit: ZeroMQ disconnects the sender
    forged = [encode("heartbeat", dict(beat))]
    for name, pid in names.items():  # a real child's name, someone else's pid: the machine ignores it
        forged.append(encode("heartbeat", dict(beat, name=name, pid=(pid or 0) + 7_000_000, phase="stepping")))
    wrong_field = raw({"v": PROTOCOL_VERSION, "type": "heartbeat", **dict(beat, phase="dancing")})
    return {
        "heartbeat": common + [wrong_field, encode("control_request", {"cmd": "status"})] + forged + [oversized],
        "control": common + [raw({"v": PROTOCOL_VERSION, "type": "control_request", "cmd": "status", "evil": 1}),
                             encode("heartbeat", dict(beat)), oversized],
        "steps": common + [oversized_header,
                           # a hello that cannot be valid (a fresh run would otherwise take its spaces as the run's)
                           raw(dict(v=PROTOCOL_VERSION, type="hello", worker="intruder", slot=0, incarnation=0,
                                    frame_shape=[3, -5], frame_dtype="<f4", action_dim=9)),
                           # well-formed steps of spaces the run does not have (dropped as spec_mismatch)
                           encode("steps", dict(worker="intruder", incarnation=0, seq=0, env_steps=1), {
                               "first": np.ones(1, np.uint8), "frames": np.zeros((1, 3, 5), np.float32),
                               "actions": np.zeros((1, 9), np.float32), "rewards": np.zeros(1, np.float32),
                               "terminated": np.zeros(1, np.uint8), "truncated": np.zeros(1, np.uint8)}),
                           raw(dict(v=PROTOCOL_VERSION, type="steps", worker="intruder", incarnation=0, seq=0,
                                    env_steps=1, arrays=[["first", "|u1", [2**40]]]))],
    }


def start_garbage(ctx, endpoints: dict[str, str], sockets: list[str], names: dict[str, int | None]) -> threading.Thread:
    """A thread that sends :func:`garbage_frames` to the run's sockets, started."""
    thread = threading.Thread(target=send_garbage, args=(ctx, endpoints, sockets, names), name="chaos-garbage",
                              daemon=True)
    thread.start()
    return thread


def send_garbage(ctx, endpoints: dict[str, str], sockets: list[str], names: dict[str, int | None]) -> None:
    """Connect to the run's sockets as a stranger and send :func:`garbage_frames` (runs in a thread)."""
    import zmq

    frames = garbage_frames(names)
    socks = []
    try:
        for which in sockets:
            # the control socket is a REP: a DEALER talks to it without waiting for each reply
            sock = ctx.socket(zmq.DEALER if which == "control" else zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.setsockopt(zmq.IMMEDIATE, 0)
            sock.connect(endpoints[which])
            socks.append(sock)
            for msg in frames[which]:
                try:
                    sock.send_multipart(([b""] if which == "control" else []) + msg, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # nobody there (a learner being restarted): nothing to hurt
        time.sleep(1.0)  # replies of the control socket arrive and are ignored
    except zmq.ZMQError:
        pass  # the supervisor is closing its context
    finally:
        for sock in socks:
            try:
                sock.close(linger=1000)
            except zmq.ZMQError:
                pass
