"""The supervisor process: drives the state machine with real processes, sockets and files.

It owns the run directory, binds the heartbeat (PULL) and control (REP) endpoints,
spawns the learner and the env-workers, and carries out what
:class:`supervisor.state.Supervision` decides. Signal handlers only queue the
signal; the main loop does the work.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import queue
import random
import secrets
import shutil
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
from protocol.exits import say
from protocol.files import atomic_write, replace_symlink
from protocol.messages import CONTROL_REPLY, CONTROL_REQUEST, HEARTBEAT
from protocol.sockets import (CONTROL_MAX_BYTES, CONTROL_RCVHWM, HEARTBEAT_MAX_BYTES, HEARTBEAT_RCVHWM, Receiver,
                              ipc_path, make_socket, prepare_endpoints, send)
from supervisor.chaos import Chaos
from supervisor.drivers import Beat, Driver, Exited, SpawnError, StandbyLost
from supervisor.plan import Plan, build_plan
from supervisor.processes import ProcessDriver
from supervisor.state import (CaptureEvidence, DropStandby, EndRun, Event, Signal, Spawn, StartStandby,
                              Supervision)

# The main loop wakes at least this often to judge deadlines.
TICK_S = 0.05
# events.jsonl keeps this much disk space reserved beyond its end (renewed every RESERVE_EVERY lines), so the
# events that tell how a run ended on a full disk still find room.
RESERVE_BYTES = 1024 * 1024
RESERVE_EVERY = 1000
DISK_CHECK_EVERY_S = 5.0
# progress.jsonl: every child's counters, phase and steps/s, this often (what `supervisor report` plots per worker
# and judges a frozen run by); about 100 bytes per child per line.
PROGRESS_SAMPLE_S = 2.0


_HELD_LOCKS: list[int] = []  # run-directory locks this process holds until it ends


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def create_run_dir(cfg: Config, locked: bool = False) -> Path:
    """The run directory with its config; locked (see :func:`lock_run`) unless the caller holds the lock.
    Raises RunBusy when another supervisor holds it."""
    runs = Path(cfg.run.runs_dir)
    run_id = cfg.run.run_id or new_run_id()
    run_dir = runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if not locked:
        fd = lock_run(run_dir)
        if fd is None:
            raise RunBusy(f"another supervisor is starting or running {run_dir}")
        _HELD_LOCKS.append(fd)
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
        self.events_path = self.run_dir / "events.jsonl"
        self.events_file = open(self.events_path, "a", buffering=1)
        reserve_space(self.events_file, RESERVE_BYTES)  # the last events are written on a full disk too
        self.events_written = 0
        self.os_errors: set = set()
        self.disk_checked_at = -1e9
        self.disk: dict = {}
        self.process_started = process_start_time(os.getpid())
        self.progress_sampled_at = -1e9
        self.progress_file = None
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
        self.hb_sock = make_socket(self.ctx, zmq.PULL, hwm=HEARTBEAT_RCVHWM, max_bytes=HEARTBEAT_MAX_BYTES)
        self.hb_sock.bind(eps["heartbeat"])
        self.control = make_socket(self.ctx, zmq.REP, hwm=CONTROL_RCVHWM, max_bytes=CONTROL_MAX_BYTES)
        self.control.bind(eps["control"])
        os.chmod(ipc_path(eps["control"]), 0o600)
        self.hb_inbox = Receiver(self.hb_sock, lambda msg, **kw: self.record(Event(ev.MALFORMED, "heartbeat", kw)))
        self.control_inbox = Receiver(self.control,
                                      lambda msg, **kw: self.record(Event(ev.MALFORMED, "control", kw)))

    def clean_leftovers(self) -> None:
        """Kill children of an earlier supervisor of this run that died without cleaning up."""
        old = read_state(self.run_dir)  # torn by a crash: {} (the drivers still find what is labelled for this run)
        if live_pid(old) is not None:
            raise RuntimeError(f"another supervisor (pid {old['pid']}) is running this run in {self.run_dir}")
        self.machine.restore_counts(old.get("counts") or {})
        killed = [pid for driver in self.drivers.values() for pid in driver.kill_leftovers(old)]
        if killed:
            self.record(Event(ev.LEFTOVERS_KILLED, "run", {"pids": killed}))

    def save_state(self, ended: dict | None = None) -> None:
        """``supervisor.json``: who runs the run and its children's pids (and, at the end, how it ended)."""
        children = [pid for driver in self.drivers.values() for pid in driver.pids()]
        state = {"pid": os.getpid(), "started": self.process_started, "children": children, "run_id": self.run_id,
                 "counts": self.machine.counts()}
        if ended is not None:
            state["ended"] = ended
            state["processes"] = [{k: row.get(k) for k in ("name", "state", "restarts", "reason", "last_exit")}
                                  for row in self.machine.snapshot()]
        try:
            atomic_write(self.run_dir / "supervisor.json", json.dumps(state), fsync=False)
        except OSError as exc:  # the old file stays whole; the run goes on
            self.os_trouble(exc, "writing its state file")

    def os_trouble(self, exc: OSError, doing: str, path: Path | None = None) -> None:
        """An OS error of the supervisor's own files (``path``, where the error names none): never fatal; said
        once per kind, and a full disk stops the run (every child's next write would fail too)."""
        if exc.filename is None and path is not None:
            exc.filename = str(path)
        key = (doing, exc.errno)
        if key not in self.os_errors:
            self.os_errors.add(key)
            then = "the run stops" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "carrying on without it"
            say(f"supervisor: {os_error_text(exc)} ({doing}); {then}")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not self.machine.stopping:
            self.record(Event(ev.DISK_FULL, "run", {"path": str(exc.filename), "error": exc.strerror or str(exc)}))
            self.execute(self.machine.request_stop(f"no space left on device ({exc.filename})", 1))

    # -- actions -------------------------------------------------------------

    def record(self, event: Event) -> None:
        line = {"time": round(time.time(), 3), "event": event.kind, "name": event.name, **event.detail}
        try:
            self.events_file.write(json.dumps(line, default=str) + "\n")
            self.events_file.flush()
        except OSError as exc:
            if event.kind != ev.DISK_FULL:
                self.os_trouble(exc, "writing events.jsonl", self.events_path)
        self.events_written += 1
        if self.events_written % RESERVE_EVERY == 0:
            reserve_space(self.events_file, RESERVE_BYTES)
        if not self.live and event.kind != ev.MALFORMED:
            detail = " ".join(f"{k}={v}" for k, v in event.detail.items() if k != "heartbeat")
            try:
                print(f"[supervisor] {event.name}: {event.kind} {detail}", file=self.out, flush=True)
            except OSError:
                pass  # stdout on a full disk: events.jsonl (with its reserved space) still has the line

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

    def check_disk(self) -> None:
        """Free space on the run's volume, for ``status``; a warning (and an event) when it runs low."""
        now = time.monotonic()
        if now - self.disk_checked_at < DISK_CHECK_EVERY_S:
            return
        self.disk_checked_at = now
        self.save_state()  # the children's counts, for the work a resume redoes
        try:
            usage = shutil.disk_usage(self.run_dir)
        except OSError:
            return
        low = usage.free < self.cfg.supervisor.disk_warn_gb * 2**30
        was_low = bool(self.disk.get("warning"))
        warning = (f"only {usage.free / 2**30:.2f} GiB free on the volume of {self.run_dir} (warning below "
                   f"{self.cfg.supervisor.disk_warn_gb:g} GiB): free space before checkpoints fail") if low else None
        self.disk = {"free_bytes": usage.free, "total_bytes": usage.total, "warning": warning}
        if low and not was_low:
            self.record(Event(ev.DISK_LOW, "run", {"free_bytes": usage.free, "path": str(self.run_dir)}))

    def sample_progress(self) -> None:
        """One line of ``progress.jsonl``: each child's state, phase, counters and steps/s (best effort)."""
        now = time.monotonic()
        if now - self.progress_sampled_at < PROGRESS_SAMPLE_S:
            return
        self.progress_sampled_at = now
        children = {r["name"]: {"role": r["labels"].get("role"), "state": r["state"], "phase": r["phase"],
                                "incarnation": r["incarnation"], "env_steps": r["env_steps"], "updates": r["updates"],
                                "steps_per_s": r["steps_per_s"], "heartbeat_age_s": r["heartbeat_age_s"]}
                    for r in self.machine.snapshot()}
        try:
            if self.progress_file is None:
                self.progress_file = open(self.run_dir / "progress.jsonl", "a", buffering=1)
            self.progress_file.write(json.dumps({"time": round(time.time(), 3), "children": children}) + "\n")
        except OSError as exc:
            self.os_trouble(exc, "writing progress.jsonl", self.run_dir / "progress.jsonl")

    # -- control -------------------------------------------------------------

    def status(self) -> dict:
        rows = self.machine.snapshot()
        for row in rows:
            row["role"] = row["labels"].get("role")
        own = self.hb_inbox.dropped_total + self.control_inbox.dropped_total
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "supervisor_pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 2),
                "env_steps": self.plan.run_env_steps(rows),
                "max_timesteps": self.cfg.run.max_timesteps, "incidents": self.incidents,
                "dropped_messages": own + sum(int(r.get("dropped") or 0) for r in rows),
                "supervisor_dropped": own, "disk": self.disk,
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
                try:
                    reply = self.answer(msg["cmd"], msg.get("name"), msg.fields)
                except Exception as exc:  # a request the supervisor cannot answer must not end the run
                    self.control_inbox.drop("unanswerable", f"{msg.get('cmd')!r}: {exc!r:.200}")
                    reply = {"ok": False, "error": f"cannot answer {msg.get('cmd')!r}: {type(exc).__name__}"}
            try:
                send(self.control, CONTROL_REPLY, reply)
            except Exception as exc:  # a reply that cannot be encoded: the REP socket still owes one
                send(self.control, CONTROL_REPLY, {"ok": False, "error": f"reply not encodable: {type(exc).__name__}"})

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
        if self.control in events:  # first: an operator's request is answered however busy the run is
            self.serve_control()
        if self.hb_sock in events:
            for msg in self.hb_inbox.drain(limit=500):
                if msg.type == HEARTBEAT:
                    self.execute(self.machine.heartbeat(msg.fields))
                else:
                    self.hb_inbox.drop("wrong_type", f"{msg.type} on the heartbeat socket")
        self.check_disk()
        while not self.evidence_done.empty():
            name, path = self.evidence_done.get()
            self.execute(self.machine.evidence_done(name, path))
        self.observe()
        while not self.signals.empty():
            self.execute(self.machine.signal_received(self.signals.get()))
        self.execute(self.machine.tick())
        self.chaos.tick()
        self.sample_progress()

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
        end = self.machine.end
        self.save_state(ended={"time": round(time.time(), 3), "exit_code": end.exit_code if end else None,
                               "reason": end.reason if end else "the supervisor stopped"})
        for f in (self.events_file, self.progress_file):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
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
    drivers: dict[str, Driver] = {"process": ProcessDriver(run_dir, cfg.supervisor.child_nice)}
    if any(s.kind == "container" for s in plan.specs):
        from supervisor.containers import ContainerDriver

        sims = cfg.simulators
        drivers["container"] = ContainerDriver(run_dir, Path(run_dir).name, sims.probe_interval_s,
                                               sims.probe_timeout_s, sims.docker_timeout_s)
    return drivers


def read_state(run_dir: Path) -> dict:
    """A run's ``supervisor.json``; {} when it is missing or torn (never raises for its content)."""
    path = Path(run_dir) / "supervisor.json"
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def live_pid(state: dict) -> int | None:
    """The pid of the supervisor a run's state file names, if that very process still runs; None when the run
    ended, the pid is ours (a container restarted with the same pid), or the pid now belongs to another process."""
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or state.get("ended") or pid == os.getpid():
        return None
    started = state.get("started")
    if isinstance(started, (int, float)):
        now = process_start_time(pid)
        return pid if now is not None and abs(now - started) < 1.0 else None
    return pid if supervisor_alive(pid) else None


def supervisor_alive(pid: int) -> bool:
    """Whether ``pid`` looks like a live supervisor (for state files that do not record its start time)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return any("supervisor" in part for part in cmdline)


def lock_run(run_dir: Path) -> int | None:
    """An exclusive lock on the run directory itself (``flock`` on its descriptor: nothing is written), held
    until the process ends; None when another process holds it."""
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class RunBusy(RuntimeError):
    """Another supervisor holds the run."""


def os_error_text(exc: OSError) -> str:
    return f"{exc.strerror or exc} on {exc.filename}" if exc.filename else str(exc)


def reserve_space(f, nbytes: int) -> None:
    """Reserve disk blocks beyond the end of an append-only file without changing its size (Linux
    FALLOC_FL_KEEP_SIZE); where the file system cannot, nothing is reserved."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        libc.fallocate(f.fileno(), 1, os.fstat(f.fileno()).st_size, nbytes)
    except (OSError, AttributeError, ValueError):
        pass


# What one child of each kind takes, for the check that a host can hold a run (measured on the embedded
# default: a worker with torch and highway-env ~0.35 GiB, its standby spare as much, the learner ~1.5 GiB).
WORKER_MEMORY_BYTES = int(0.35 * 2**30)
LEARNER_MEMORY_BYTES = int(1.5 * 2**30)


def host_capacity_problem(cfg: Config) -> str | None:
    """Why this host cannot run ``cfg``'s workers (cores and memory), or None when it can."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = cfg.workers.count
    most = cfg.supervisor.max_workers_per_core * cores
    if workers > most:
        return (f"{workers} workers on {cores} cores: at most {most} fit "
                f"(supervisor.max_workers_per_core {cfg.supervisor.max_workers_per_core:g})")
    per_worker = WORKER_MEMORY_BYTES * (2 if cfg.supervisor.standby_workers else 1)
    need = LEARNER_MEMORY_BYTES + workers * per_worker
    available = psutil.virtual_memory().available
    if need > available:
        return (f"{workers} workers need about {need / 2**30:.1f} GiB of memory (learner {LEARNER_MEMORY_BYTES / 2**30:.1f}"
                f", {per_worker / 2**30:.2f} per worker with its standby), {available / 2**30:.1f} GiB is available")
    return None
