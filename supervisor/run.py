"""The supervisor process: drives the state machine with real processes, sockets and files.

It owns the run directory, binds the heartbeat (PULL) and control (REP) endpoints,
spawns the learner and the env-workers, and carries out what
:class:`supervisor.state.Supervision` decides. Signal handlers only queue the
signal; the main loop does the work.
"""

from __future__ import annotations

import json
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import yaml
import zmq

from protocol import events as ev
from protocol.config import Config
from protocol.files import atomic_write, replace_symlink
from protocol.messages import CONTROL_REPLY, CONTROL_REQUEST, HEARTBEAT
from protocol.sockets import Receiver, ipc_path, make_socket, prepare_endpoints, send
from supervisor.chaos import Chaos
from supervisor.drivers import Beat, Driver, Exited, SpawnError, StandbyLost
from supervisor.plan import Plan, build_plan
from supervisor.processes import ProcessDriver
from supervisor.state import (CaptureEvidence, DropStandby, EndRun, Event, Signal, Spawn, StartStandby,
                              Supervision)

# The main loop wakes at least this often to judge deadlines.
TICK_S = 0.05


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def create_run_dir(cfg: Config) -> Path:
    runs = Path(cfg.run.runs_dir)
    run_id = cfg.run.run_id or new_run_id()
    run_dir = runs / run_id
    for sub in ("logs", "checkpoints", "incidents", "tb"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    data = cfg.to_dict()
    data["run"]["run_id"] = run_id
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))
    replace_symlink(runs / "latest", run_id)
    return run_dir.resolve()


class Supervisor:
    """Carries out the machine's decisions: each action goes to the driver of its child's kind."""

    def __init__(self, cfg: Config, run_dir: Path, live: bool = False, out=sys.stdout, plan: Plan | None = None,
                 drivers: dict[str, Driver] | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.live = live
        self.out = out
        self.plan = plan or build_plan(cfg, self.run_id)
        self.specs = {s.name: s for s in self.plan.specs}
        self.machine = Supervision(list(self.plan.specs), clock, random.Random(cfg.run.seed))
        self.drivers: dict[str, Driver] = drivers if drivers is not None else default_drivers(cfg, self.run_dir,
                                                                                             self.plan)
        missing = {s.kind for s in self.plan.specs} - set(self.drivers)
        if missing:
            raise ValueError(f"no driver for child kind(s) {sorted(missing)}")
        self.ctx = zmq.Context()
        self.events_file = open(self.run_dir / "events.jsonl", "a", buffering=1)
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.evidence_done: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self.started = time.monotonic()
        self.exit_code: int | None = None
        self.incidents = 0
        self.chaos = Chaos(self)

    def driver_of(self, name: str) -> Driver:
        return self.drivers[self.specs[name].kind]

    # -- setup ---------------------------------------------------------------

    def bind(self) -> None:
        eps = prepare_endpoints(self.run_dir)
        self.endpoints = eps
        self.hb_sock = make_socket(self.ctx, zmq.PULL, hwm=10_000, max_bytes=64 * 1024)
        self.hb_sock.bind(eps["heartbeat"])
        self.control = make_socket(self.ctx, zmq.REP, hwm=100, max_bytes=64 * 1024)
        self.control.bind(eps["control"])
        os.chmod(ipc_path(eps["control"]), 0o600)
        self.hb_inbox = Receiver(self.hb_sock, lambda msg, **kw: self.record(Event(ev.MALFORMED, "heartbeat", kw)))
        self.control_inbox = Receiver(self.control,
                                      lambda msg, **kw: self.record(Event(ev.MALFORMED, "control", kw)))

    def clean_leftovers(self) -> None:
        """Kill children of an earlier supervisor of this run that died without cleaning up."""
        state_file = self.run_dir / "supervisor.json"
        old: dict = {}
        if state_file.exists():
            try:
                old = json.loads(state_file.read_text())
            except ValueError:
                old = {}  # torn by a crash: the drivers still find what is labelled for this run
        if old.get("pid") and old["pid"] != os.getpid() and _alive(old["pid"]):
            raise RuntimeError(f"another supervisor (pid {old['pid']}) is running this run in {self.run_dir}")
        killed = [pid for driver in self.drivers.values() for pid in driver.kill_leftovers(old)]
        if killed:
            self.record(Event(ev.LEFTOVERS_KILLED, "run", {"pids": killed}))

    def save_state(self) -> None:
        children = [pid for driver in self.drivers.values() for pid in driver.pids()]
        atomic_write(self.run_dir / "supervisor.json",
                     json.dumps({"pid": os.getpid(), "children": children, "run_id": self.run_id}), fsync=False)

    # -- actions -------------------------------------------------------------

    def record(self, event: Event) -> None:
        line = {"time": round(time.time(), 3), "event": event.kind, "name": event.name, **event.detail}
        self.events_file.write(json.dumps(line, default=str) + "\n")
        if not self.live and event.kind != ev.MALFORMED:
            detail = " ".join(f"{k}={v}" for k, v in event.detail.items() if k != "heartbeat")
            print(f"[supervisor] {event.name}: {event.kind} {detail}", file=self.out, flush=True)

    def execute(self, actions) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Spawn):
                if not self.machine.wants_spawn(action):
                    continue  # an earlier action of this batch changed the machine's mind
                spec = self.specs[action.name]
                try:
                    pid, standby = self.driver_of(action.name).spawn(spec, action.incarnation, action.standby)
                except (OSError, SpawnError) as exc:
                    pending += self.machine.spawn_failed(action.name, str(exc))
                    continue
                pending += self.machine.spawned(action.name, pid, standby)
                self.save_state()
            elif isinstance(action, StartStandby):
                try:
                    self.driver_of(action.name).start_standby(self.specs[action.name])
                except (OSError, SpawnError):
                    pending += self.machine.standby_lost(action.name)
            elif isinstance(action, DropStandby):
                self.driver_of(action.name).drop_standby(action.name)
            elif isinstance(action, CaptureEvidence):
                self.incidents += 1
                threading.Thread(target=self._capture, args=(action,), daemon=True).start()
            elif isinstance(action, Signal):
                self.driver_of(action.name).signal(action.name, action.pid, action.signum)
            elif isinstance(action, Event):
                self.record(action)
            elif isinstance(action, EndRun):
                self.exit_code = action.exit_code

    def _capture(self, action: CaptureEvidence) -> None:
        try:
            spec = self.specs[action.name]
            path = self.driver_of(action.name).capture(self.run_dir, action, spec.deadlines.evidence_s)
            self.evidence_done.put((action.name, str(path.relative_to(self.run_dir))))
        except Exception as exc:  # evidence is best effort; the kill must go on
            self.evidence_done.put((action.name, None))
            self.record(Event(ev.EVIDENCE_FAILED, action.name, {"error": repr(exc)}))

    def observe(self) -> None:
        """What the drivers saw since the last call, fed to the machine."""
        for driver in self.drivers.values():
            for seen in driver.poll():
                if isinstance(seen, Exited):
                    self.execute(self.machine.exited(seen.name, seen.pid, seen.code))
                elif isinstance(seen, Beat):
                    self.execute(self.machine.heartbeat(seen.fields))
                elif isinstance(seen, StandbyLost):
                    self.execute(self.machine.standby_lost(seen.name))

    # -- control -------------------------------------------------------------

    def status(self) -> dict:
        rows = self.machine.snapshot()
        for row in rows:
            row["role"] = row["labels"].get("role")
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "supervisor_pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 2),
                "env_steps": self.plan.run_env_steps(rows),
                "max_timesteps": self.cfg.run.max_timesteps, "incidents": self.incidents,
                "dropped_messages": self.hb_inbox.dropped_total + self.control_inbox.dropped_total,
                "stopping": self.machine.stopping, "processes": rows}

    def serve_control(self) -> None:
        for _ in range(20):
            try:
                frames = self.control.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self.control_inbox.decode_frames(frames)
            if msg is None or msg.type != CONTROL_REQUEST:
                if msg is not None:
                    self.control_inbox.drop("wrong_type", f"{msg.type} on the control socket")
                reply = {"ok": False, "error": "malformed request"}
            else:
                reply = self.answer(msg["cmd"], msg.get("name"), msg.fields)
            send(self.control, CONTROL_REPLY, reply)

    def answer(self, cmd: str, name: str | None, fields: dict | None = None) -> dict:
        if cmd == "status":
            return {"ok": True, "data": self.status()}
        if cmd == "restart":
            if name not in self.specs:
                return {"ok": False, "error": f"no process named {name!r}; names: {', '.join(self.specs)}"}
            self.execute(self.machine.request_restart(name))
            return {"ok": True, "data": {"restarting": name}}
        if cmd == "stop":
            self.execute(self.machine.request_stop("stop requested"))
            return {"ok": True, "data": {"stopping": True}}
        if cmd == "chaos":
            fields = fields or {}
            return self.chaos.command(fields.get("fault"), name, fields.get("options"))
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- the loop ------------------------------------------------------------

    def on_signal(self, signum, frame) -> None:
        self.signals.put(signum)

    def loop_once(self, poller: zmq.Poller) -> None:
        events = dict(poller.poll(int(TICK_S * 1000)))
        if self.hb_sock in events:
            for msg in self.hb_inbox.drain(limit=1000):
                if msg.type == HEARTBEAT:
                    self.execute(self.machine.heartbeat(msg.fields))
                else:
                    self.hb_inbox.drop("wrong_type", f"{msg.type} on the heartbeat socket")
        if self.control in events:
            self.serve_control()
        while not self.evidence_done.empty():
            name, path = self.evidence_done.get()
            self.execute(self.machine.evidence_done(name, path))
        self.observe()
        while not self.signals.empty():
            self.execute(self.machine.signal_received(self.signals.get()))
        self.execute(self.machine.tick())
        self.chaos.tick()

    def start(self) -> zmq.Poller:
        """Bind, and start every child (after :meth:`clean_leftovers`)."""
        self.bind()
        self.record(Event(ev.RUN_STARTED, "run", {"run_dir": str(self.run_dir), "pid": os.getpid(),
                                                   "workers": self.cfg.workers.count, "children": self.plan.names}))
        self.execute(self.machine.start())
        poller = zmq.Poller()
        poller.register(self.hb_sock, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        return poller

    def close(self) -> None:
        """Kill whatever is left, and leave no socket file behind."""
        self.chaos.close()
        for driver in self.drivers.values():
            driver.kill_all()
        self.save_state()
        self.events_file.close()
        self.ctx.destroy(linger=0)
        self.remove_sockets()

    def run(self) -> int:
        self.clean_leftovers()  # refuses to go on beside a live supervisor of this run, before touching anything
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        display = None
        try:
            poller = self.start()
            if self.live:
                from supervisor.display import LiveDisplay

                display = LiveDisplay(self)
                display.start()
            while self.exit_code is None:
                self.loop_once(poller)
                if display is not None:
                    display.refresh()
        finally:
            if display is not None:
                display.stop()
            self.close()
        return self.exit_code or 0

    def remove_sockets(self) -> None:
        """No socket files outlive the run (children are gone, so nobody holds them)."""
        if not hasattr(self, "endpoints"):
            return
        paths = [ipc_path(ep) for ep in self.endpoints.values()]
        for path in paths:
            if path is not None and path.exists():
                path.unlink()
        sock_dir = paths[0].parent if paths and paths[0] is not None else None
        if sock_dir is not None and sock_dir != self.run_dir.resolve():
            try:
                sock_dir.rmdir()
            except OSError:
                pass


def default_drivers(cfg: Config, run_dir: Path, plan: Plan) -> dict[str, Driver]:
    """A driver for each kind of child in the plan (no Docker engine is asked for when no child needs one)."""
    drivers: dict[str, Driver] = {"process": ProcessDriver(run_dir)}
    if any(s.kind == "container" for s in plan.specs):
        from supervisor.containers import ContainerDriver

        sims = cfg.simulators
        drivers["container"] = ContainerDriver(run_dir, Path(run_dir).name, sims.probe_interval_s,
                                               sims.probe_timeout_s, sims.docker_timeout_s)
    return drivers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
