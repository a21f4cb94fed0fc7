"""The supervisor process: the loop that ties the drivers to the machine.

:class:`Supervisor` binds the heartbeat (PULL) and control (REP) endpoints,
feeds the machine (:mod:`supervisor.machine`) what the sockets and the drivers
observe, and hands each of its actions to the driver of the child's kind.
Signal handlers only queue the signal; the loop does the work. The run
directory's files are :mod:`supervisor.rundir`'s, the control requests
:mod:`supervisor.control`'s, the faults :mod:`supervisor.chaos`'s.
"""

from __future__ import annotations

import errno
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from protocol import causes
from protocol import events as ev
from protocol.config import Config
from protocol.exits import os_error_line, say
from protocol.messages import HEARTBEAT
from protocol.runstate import live_pid, process_start_time, read_state
from protocol.sockets import (
    CONTROL_MAX_BYTES,
    CONTROL_RCVHWM,
    HEARTBEAT_MAX_BYTES,
    HEARTBEAT_RCVHWM,
    Receiver,
    ipc_path,
    make_socket,
    prepare_endpoints,
)
from supervisor.chaos import Chaos, start_garbage
from supervisor.control import ControlServer, progress_row, status_payload, status_rows
from supervisor.drivers import Beat, Driver, Exited, SpawnError, StandbyLost
from supervisor.drivers.process import PROJECT_ROOT, ProcessDriver
from supervisor.machine import (
    CaptureEvidence,
    DropStandby,
    EndRun,
    Event,
    Kill,
    Spawn,
    StartStandby,
    Supervision,
    Terminate,
)
from supervisor.plan import Plan, build_plan
from supervisor.rundir import RunFiles
from supervisor.watchdog import owner_tag

# The main loop wakes at least this often to judge deadlines.
TICK_S = 0.05
DISK_CHECK_EVERY_S = 5.0
# progress.jsonl: every child's counters, phase and steps/s, this often (what `supervisor report` plots per worker
# and judges a frozen run by); about 100 bytes per child per line.
PROGRESS_SAMPLE_S = 2.0
SHOW_DRIVERS_S = 0.5
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# A clean close waits this long for the container watchdog's last look.
WATCHDOG_WAIT_S = 5.0


class Supervisor:
    """Carries out the machine's decisions: each action goes to the driver of its child's kind."""

    def __init__(self, cfg: Config, run_dir: Path, live: bool = False, out=sys.stdout, plan: Plan | None = None,
                 drivers: dict[str, Driver] | None = None, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.live = live
        self.plan = plan or build_plan(cfg, self.run_id)
        self.specs = {s.name: s for s in self.plan.specs}
        self.machine = Supervision(list(self.plan.specs), clock, random.Random(cfg.run.seed))
        self.process_started = process_start_time(os.getpid())
        self.drivers: dict[str, Driver] = drivers if drivers is not None else default_drivers(
            cfg, self.run_dir, self.plan, owner_tag(os.getpid(), self.process_started))
        missing = {s.kind for s in self.plan.specs} - set(self.drivers)
        if missing:
            raise ValueError(f"no driver for child kind(s) {sorted(missing)}")
        self.ctx = zmq.Context()
        self.files = RunFiles(self.run_dir, out, live)
        self.os_errors: set = set()
        self.disk_checked_at = -1e9
        self.drivers_shown_at = -1e9
        self.disk: dict = {}
        self.watchdog: subprocess.Popen | None = None
        self.progress_sampled_at = -1e9
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.evidence_done: queue.SimpleQueue[tuple[str, str | None, dict | None]] = queue.SimpleQueue()
        self.started = time.monotonic()
        self.exit_code: int | None = None
        self.incidents = 0
        self.metrics = None  # the Prometheus endpoint (supervisor.metrics.Endpoint), when configured
        self.chaos = Chaos(cfg.chaos, cfg.run.seed, self.machine, self.specs, self.run_dir, self.driver_of,
                           self.record, self.dropped,
                           lambda sockets, pids: start_garbage(self.ctx, self.endpoints, sockets, pids))

    def driver_of(self, name: str) -> Driver:
        return self.drivers[self.specs[name].kind]

    # -- setup ---------------------------------------------------------------

    def bind(self) -> None:
        eps = prepare_endpoints(self.run_dir)
        self.endpoints = eps
        self.hb_sock = make_socket(self.ctx, zmq.PULL, hwm=HEARTBEAT_RCVHWM, max_bytes=HEARTBEAT_MAX_BYTES)
        self.hb_sock.bind(eps["heartbeat"])
        control = make_socket(self.ctx, zmq.REP, hwm=CONTROL_RCVHWM, max_bytes=CONTROL_MAX_BYTES)
        control.bind(eps["control"])
        os.chmod(ipc_path(eps["control"]), 0o600)
        self.hb_inbox = Receiver(self.hb_sock, lambda msg, **kw: self.record(Event(ev.MALFORMED, "heartbeat", kw)))
        control_inbox = Receiver(control, lambda msg, **kw: self.record(Event(ev.MALFORMED, "control", kw)))
        self.control = ControlServer(control, control_inbox, {
            "status": lambda name, fields: {"ok": True, "data": self.status()},
            "restart": self.answer_restart,
            "stop": self.answer_stop,
            "chaos": lambda name, fields: self.chaos.command(fields.get("fault"), name, fields.get("options")),
        })

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
            self.files.save_state(state)
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
            then = "the run stops" if exc.errno in FULL_DISK else "carrying on without it"
            say(f"supervisor: {os_error_line(exc)} ({doing}); {then}")
        if exc.errno in FULL_DISK and not self.machine.stopping:
            self.record(Event(ev.DISK_FULL, "run", {"path": str(exc.filename), "error": exc.strerror or str(exc)}))
            self.execute(self.machine.request_stop(f"no space left on device ({exc.filename})", 1))

    # -- actions -------------------------------------------------------------

    def record(self, event: Event) -> None:
        try:
            self.files.event(event.kind, event.name, event.detail, quiet=event.kind == ev.MALFORMED)
        except OSError as exc:
            if event.kind != ev.DISK_FULL:
                self.os_trouble(exc, "writing events.jsonl", self.files.events_path)

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
                pending += self.machine.spawned(action.name, action.incarnation, pid, standby)
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
            elif isinstance(action, Terminate):
                self.driver_of(action.name).terminate(action.name, action.incarnation)
            elif isinstance(action, Kill):
                self.driver_of(action.name).kill(action.name, action.incarnation)
            elif isinstance(action, Event):
                self.record(action)
            elif isinstance(action, EndRun):
                self.exit_code = action.exit_code

    def _capture(self, action: CaptureEvidence) -> None:
        try:
            spec = self.specs[action.name]
            path = self.driver_of(action.name).capture(self.run_dir, action, spec.deadlines.evidence_s)
        except Exception as exc:  # evidence is best effort; the kill must go on
            self.evidence_done.put((action.name, None, None))
            self.record(Event(ev.EVIDENCE_FAILED, action.name, {"error": repr(exc)}))
            return
        try:  # the evidence read back and its cause named (protocol/causes.py), into its incident.json
            cause = causes.name_incident(path, spec.labels.get("role"))
        except Exception as exc:  # whatever the evidence holds, its event is written and the kill goes on
            cause = {"cause": causes.UNKNOWN, "advice": f"the incident could not be read back: {exc!r}"[:200],
                     "because": "", "frames": []}
        self.evidence_done.put((action.name, str(path.relative_to(self.run_dir)), cause))

    def observe(self) -> None:
        """What the drivers saw since the last call, fed to the machine."""
        for driver in self.drivers.values():
            for seen in driver.poll():
                if isinstance(seen, Exited):
                    self.take_heartbeats()  # a child's last beats (why it gave up) come before its exit
                    self.execute(self.machine.exited(seen.name, seen.incarnation, seen.code, seen.cause))
                elif isinstance(seen, Beat):
                    self.execute(self.machine.heartbeat(seen.fields))
                elif isinstance(seen, StandbyLost):
                    self.execute(self.machine.standby_lost(seen.name))

    def show_drivers(self) -> None:
        """The run's status rows, to the drivers that judge a child by others' heartbeats too (a fleet's host by
        the learner's "last seen" of it), every SHOW_DRIVERS_S."""
        now = time.monotonic()
        watching = [d for d in set(self.drivers.values()) if hasattr(d, "see")]
        if not watching or now - self.drivers_shown_at < SHOW_DRIVERS_S:
            return
        self.drivers_shown_at = now
        rows = status_rows(self.machine.snapshot())
        for driver in watching:
            driver.see(rows)

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
        children = {r["name"]: progress_row(r) for r in status_rows(self.machine.snapshot())}
        try:
            self.files.progress(children)
        except OSError as exc:
            self.os_trouble(exc, "writing progress.jsonl", self.files.progress_path)

    # -- control -------------------------------------------------------------

    def dropped(self) -> int:
        """Messages the supervisor's own sockets dropped as malformed or unwanted."""
        return self.hb_inbox.dropped_total + self.control.inbox.dropped_total

    def status(self) -> dict:
        rows = status_rows(self.machine.snapshot())
        return status_payload(rows, run_dir=self.run_dir, uptime_s=time.monotonic() - self.started,
                              env_steps=self.plan.run_env_steps(rows), max_timesteps=self.cfg.run.max_timesteps,
                              incidents=self.incidents, supervisor_dropped=self.dropped(), disk=self.disk,
                              stopping=self.machine.stopping)

    def answer_restart(self, name: str | None, fields: dict) -> dict:
        if name not in self.specs:
            return {"ok": False, "error": f"no process named {name!r}; names: {', '.join(self.specs)}"}
        self.execute(self.machine.request_restart(name))
        return {"ok": True, "data": {"restarting": name}}

    def answer_stop(self, name: str | None, fields: dict) -> dict:
        self.execute(self.machine.request_stop("stop requested"))
        return {"ok": True, "data": {"stopping": True}}

    # -- the loop ------------------------------------------------------------

    def on_signal(self, signum, frame) -> None:
        self.signals.put(signum)

    def take_heartbeats(self) -> None:
        for msg in self.hb_inbox.drain(limit=500):
            if msg.type == HEARTBEAT:
                self.execute(self.machine.heartbeat(msg.fields))
            else:
                self.hb_inbox.drop("wrong_type", f"{msg.type} on the heartbeat socket")

    def loop_once(self, poller: zmq.Poller) -> None:
        events = dict(poller.poll(int(TICK_S * 1000)))
        if self.control.sock in events:  # first: an operator's request is answered however busy the run is
            self.control.serve()
        if self.hb_sock in events:
            self.take_heartbeats()
        self.check_disk()
        while not self.evidence_done.empty():
            name, path, cause = self.evidence_done.get()
            self.execute(self.machine.evidence_done(name, path, cause))
        self.observe()
        self.show_drivers()
        while not self.signals.empty():
            self.execute(self.machine.signal_received(signal.Signals(self.signals.get()).name))
        # the beats that came while this loop did its own work (a slow disk, a status answer) count before the
        # machine judges silence: a supervisor late on its own work must not blame a child for it
        self.take_heartbeats()
        self.execute(self.machine.tick())
        self.chaos.tick()
        self.sample_progress()
        self.publish_metrics()

    def start_metrics(self) -> None:
        """The Prometheus endpoint, when configured; one that cannot bind is said in one line, and the run goes on
        without it (``up`` refused a port in use before anything was written: this is one taken since)."""
        port = self.cfg.supervisor.metrics_port
        if port is None:
            return
        from supervisor.metrics import Endpoint

        host = self.cfg.supervisor.metrics_host
        try:
            self.metrics = Endpoint(host, port)
        except OSError as exc:
            say(f"supervisor: the metrics endpoint cannot bind {host}:{port} ({exc.strerror or exc}); "
                "carrying on without it")
            return
        self.publish_metrics()

    def publish_metrics(self) -> None:
        """A fresh status payload for the endpoint's scrapes, every ``metrics.PUBLISH_EVERY_S``."""
        now = time.monotonic()
        if self.metrics is not None and self.metrics.due(now):
            self.metrics.publish(self.status(), now)

    def start_watchdog(self) -> None:
        """A run with simulator containers gets a watchdog (:mod:`supervisor.watchdog`) in a session of its own:
        it outlives this process to remove the containers should this process die without removing them."""
        if not any(s.kind == "container" for s in self.plan.specs) or self.process_started is None:
            return
        cmd = [sys.executable, "-m", "supervisor.watchdog", "--run-dir", str(self.run_dir), "--run-id", self.run_id,
               "--supervisor-pid", str(os.getpid()), "--supervisor-started", repr(self.process_started),
               "--owner", owner_tag(os.getpid(), self.process_started)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "logs" / "watchdog.out", "ab") as out:
                self.watchdog = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True, close_fds=True, cwd=PROJECT_ROOT, env=env)
        except OSError as exc:  # the run goes on; only a crash of this process would leave its containers
            say(f"supervisor: {os_error_line(exc)} (starting the container watchdog); carrying on without it")

    def stop_watchdog(self) -> None:
        """After a clean close (``ended`` written): SIGTERM makes the watchdog look at once; it removes what the
        drivers could not (nothing, normally) and exits. One still busy after WATCHDOG_WAIT_S (an engine that does
        not answer) is left to finish on its own."""
        if self.watchdog is None:
            return
        if self.watchdog.poll() is None:
            self.watchdog.terminate()
            try:
                self.watchdog.wait(timeout=WATCHDOG_WAIT_S)
            except subprocess.TimeoutExpired:
                say(f"supervisor: the container watchdog (pid {self.watchdog.pid}) is still removing containers; "
                    f"it goes on after this process")
        self.watchdog = None

    def start(self) -> zmq.Poller:
        """Bind, and start every child (after :meth:`clean_leftovers`)."""
        self.bind()
        self.start_watchdog()
        self.record(Event(ev.RUN_STARTED, "run", {"run_dir": str(self.run_dir), "pid": os.getpid(),
                                                   "workers": self.cfg.workers.count, "children": self.plan.names}))
        self.execute(self.machine.start())
        poller = zmq.Poller()
        poller.register(self.hb_sock, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        self.start_metrics()
        return poller

    def close(self) -> None:
        """Kill whatever is left, and leave no socket file behind."""
        self.chaos.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for driver in self.drivers.values():
            driver.kill_all()
        end = self.machine.end
        self.save_state(ended={"time": round(time.time(), 3), "exit_code": end.exit_code if end else None,
                               "reason": end.reason if end else "the supervisor stopped"})
        self.stop_watchdog()
        self.files.close()
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
                from supervisor.live import LiveDisplay

                display = LiveDisplay(self.status)
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


def default_drivers(cfg: Config, run_dir: Path, plan: Plan, owner: str | None = None) -> dict[str, Driver]:
    """A driver for each kind of child in the plan (no Docker engine is asked for when no child needs one);
    ``owner`` labels the containers as this supervisor's (its watchdog removes those)."""
    drivers: dict[str, Driver] = {"process": ProcessDriver(run_dir, cfg.supervisor.child_nice)}
    if any(s.kind == "container" for s in plan.specs):
        from supervisor.drivers.container import ContainerDriver

        sims = cfg.simulators
        drivers["container"] = ContainerDriver(run_dir, Path(run_dir).name, sims.probe_interval_s,
                                               sims.probe_timeout_s, sims.docker_timeout_s, owner=owner)
    if any(s.kind == "pod_simulator" for s in plan.specs):
        from supervisor.drivers.pod import PodSimulatorDriver

        drivers["pod_simulator"] = PodSimulatorDriver(cfg.simulators.probe_interval_s, cfg.simulators.probe_timeout_s)
    hosts = [s.name for s in plan.specs if s.kind == "ray_host"]
    if hosts:
        from fleet.agent import registry_name
        from supervisor.drivers.ray import RayHostDriver
        from supervisor.plan import host_agent_spec, learner_silence_s, registry_info

        run_id, cl, public = Path(run_dir).name, cfg.cluster, registry_info(cfg)
        drivers["ray_host"] = RayHostDriver(  # each agent also starts with the registry's facts, should it not answer
            run_dir, run_id, {h: {**host_agent_spec(cfg, run_id, h, registry_name(run_id)), **public} for h in hosts},
            address=cl.address, namespace=cl.namespace, resource=cl.host_resource, registry=public,
            probe_interval_s=cl.probe_interval_s, probe_timeout_s=cl.probe_timeout_s,
            stop_grace_s=cfg.supervisor.kill_grace_s + cfg.supervisor.learner_stop_grace_s,
            registry_resource=cl.learner_resource, learner_silence_s=learner_silence_s(cfg))
    return drivers
