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

import yaml
import zmq

from protocol.config import Config
from protocol.messages import CONTROL_REPLY, CONTROL_REQUEST, HEARTBEAT
from protocol.sockets import Receiver, ipc_path, make_socket, prepare_endpoints, send
from supervisor import evidence
from supervisor.processes import ProcessDriver, kill_leftovers
from supervisor.state import RUNNING, CaptureEvidence, ChildSpec, EndRun, Event, Limits, Signal, Spawn, Supervision

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
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    latest = runs / "latest"
    tmp = runs / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_id)
    os.replace(tmp, latest)
    return run_dir.resolve()


class Supervisor:
    def __init__(self, cfg: Config, run_dir: Path, live: bool = False, out=sys.stdout):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.live = live
        self.out = out
        specs = [ChildSpec("learner", "learner")] + [ChildSpec(f"worker-{i}", "worker", i)
                                                     for i in range(cfg.workers.count)]
        self.specs = {s.name: s for s in specs}
        self.machine = Supervision(specs, Limits.from_config(cfg.supervisor), time.monotonic,
                                   random.Random(cfg.run.seed))
        self.driver = ProcessDriver(self.run_dir, standby=cfg.supervisor.standby_workers)
        self.ctx = zmq.Context()
        self.events_file = open(self.run_dir / "events.jsonl", "a", buffering=1)
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.evidence_done: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self.started = time.monotonic()
        self.exit_code: int | None = None
        self.incidents = 0

    # -- setup ---------------------------------------------------------------

    def bind(self) -> None:
        eps = prepare_endpoints(self.run_dir)
        self.endpoints = eps
        self.hb_sock = make_socket(self.ctx, zmq.PULL, hwm=10_000, max_bytes=64 * 1024)
        self.hb_sock.bind(eps["heartbeat"])
        self.control = make_socket(self.ctx, zmq.REP, hwm=100, max_bytes=64 * 1024)
        self.control.bind(eps["control"])
        os.chmod(ipc_path(eps["control"]), 0o600)
        self.hb_inbox = Receiver(self.hb_sock, lambda msg, **kw: self.record(Event("malformed", "heartbeat", kw)))
        self.control_inbox = Receiver(self.control, lambda msg, **kw: self.record(Event("malformed", "control", kw)))

    def clean_leftovers(self) -> None:
        """Kill children of an earlier supervisor of this run that died without cleaning up."""
        state_file = self.run_dir / "supervisor.json"
        if not state_file.exists():
            return
        try:
            old = json.loads(state_file.read_text())
        except ValueError:
            return
        if old.get("pid") and old["pid"] != os.getpid() and _alive(old["pid"]):
            raise RuntimeError(f"another supervisor (pid {old['pid']}) is running this run in {self.run_dir}")
        killed = kill_leftovers(old.get("children", []), str(self.run_dir))
        if killed:
            self.record(Event("leftovers_killed", "run", {"pids": killed}))

    def save_state(self) -> None:
        state = {"pid": os.getpid(), "children": self.driver.pids(), "run_id": self.run_id}
        tmp = self.run_dir / "supervisor.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.run_dir / "supervisor.json")

    # -- actions -------------------------------------------------------------

    def record(self, ev: Event) -> None:
        line = {"time": round(time.time(), 3), "event": ev.kind, "name": ev.name, **ev.detail}
        self.events_file.write(json.dumps(line, default=str) + "\n")
        if not self.live and ev.kind not in ("malformed",):
            detail = " ".join(f"{k}={v}" for k, v in ev.detail.items() if k != "heartbeat")
            print(f"[supervisor] {ev.name}: {ev.kind} {detail}", file=self.out, flush=True)

    def execute(self, actions) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Spawn):
                spec = self.specs[action.name]
                try:
                    pid = self.driver.spawn(spec.name, spec.role, spec.slot, action.incarnation)
                except OSError as exc:
                    pending += self.machine.spawn_failed(action.name, str(exc))
                    continue
                pending += self.machine.spawned(action.name, pid)
                self.save_state()
            elif isinstance(action, CaptureEvidence):
                self.incidents += 1
                threading.Thread(target=self._capture, args=(action,), daemon=True).start()
            elif isinstance(action, Signal):
                self.driver.signal(action.pid, action.signum)
            elif isinstance(action, Event):
                self.record(action)
            elif isinstance(action, EndRun):
                self.exit_code = action.exit_code

    def _capture(self, action: CaptureEvidence) -> None:
        try:
            path = evidence.capture(self.run_dir, action.name, action.pid, action.reason, action.heartbeat,
                                    self.cfg.supervisor.evidence_timeout_s)
            self.evidence_done.put((action.name, str(path.relative_to(self.run_dir))))
        except Exception as exc:  # evidence is best effort; the kill must go on
            self.evidence_done.put((action.name, None))
            self.record(Event("evidence_failed", action.name, {"error": repr(exc)}))

    # -- control -------------------------------------------------------------

    def status(self) -> dict:
        rows = self.machine.snapshot()
        learner = next((r for r in rows if r["role"] == "learner"), None)
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "supervisor_pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 2),
                "env_steps": learner["env_steps"] if learner else 0,
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
                reply = self.answer(msg["cmd"], msg.get("name"))
            send(self.control, CONTROL_REPLY, reply)

    def answer(self, cmd: str, name: str | None) -> dict:
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
        for name, pid, code in self.driver.reap():
            self.execute(self.machine.exited(name, pid, code))
        self.driver.reap_spares()
        for c in self.machine.children.values():
            if c.state == RUNNING and c.spec.role == "worker" and not self.machine.stopping:
                self.driver.ensure_spare(c.name, c.spec.slot)
        while not self.signals.empty():
            signum = self.signals.get()
            if self.machine.stopping:
                self.record(Event("forced_stop", "run", {"signal": signum}))
                self.driver.kill_all()
                for name, pid, code in self.driver.reap():
                    self.execute(self.machine.exited(name, pid, code))
                for c in self.machine.children.values():
                    if c.pid is not None:
                        self.execute(self.machine.exited(c.name, c.pid, -9))
            else:
                self.execute(self.machine.request_stop(f"signal {signal.Signals(signum).name}"))
        self.execute(self.machine.tick())

    def run(self) -> int:
        self.clean_leftovers()
        self.bind()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        self.record(Event("run_started", "run", {"run_dir": str(self.run_dir), "pid": os.getpid(),
                                                   "workers": self.cfg.workers.count}))
        self.execute(self.machine.start())
        poller = zmq.Poller()
        poller.register(self.hb_sock, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        display = None
        if self.live:
            from supervisor.display import LiveDisplay

            display = LiveDisplay(self)
            display.start()
        try:
            while self.exit_code is None:
                self.loop_once(poller)
                if display is not None:
                    display.refresh()
        finally:
            if display is not None:
                display.stop()
            self.driver.kill_all()
            self.save_state()
            self.events_file.close()
            self.ctx.destroy(linger=0)
            self.remove_sockets()
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
