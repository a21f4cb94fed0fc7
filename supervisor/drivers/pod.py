"""Simulators in a pod: the CARLA server is the pod's sibling container, a process the supervisor sees but does not own.

In a Kubernetes pod there is no Docker socket. With ``shareProcessNamespace`` the
CARLA container's server is a process in the supervisor's view (and on the pod's
network), started and restarted by the kubelet. This driver (``simulators.mode:
pod``) judges it as the container driver does: healthy while it answers a real
``version`` request. It finds the server as the process listening on its RPC port;
a stalled one is replaced by signalling that process (SIGTERM, SIGKILL after the
grace), after which the kubelet starts the container again and the next
incarnation is ready at its first answer. Evidence is what the process table and
the probes say (its state, e.g. stopped, and its command line; a native server has
no Python stack).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from supervisor.drivers import CRASH, FREEZE, Beat, Exited, Gone, NotSupported, Watcher
from supervisor.drivers.container import server_version
from supervisor.drivers.evidence import incident_dir, process_state
from supervisor.machine import CaptureEvidence
from supervisor.specs import ChildSpec


def listener_of(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (this network namespace), or None."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.AccessDenied, OSError):
        pass
    return None


@dataclass
class PodRun:
    name: str
    incarnation: int
    host: str
    port: int
    pid: int | None = None  # the server process this incarnation watches, once found
    stop: threading.Event = field(default_factory=threading.Event)
    probes: int = 0
    last_error: str | None = None
    ended: bool = False


class PodSimulatorDriver(Watcher):
    """The ``pod_simulator`` kind: a slot's CARLA server in a sibling container (see the module's docstring)."""

    def __init__(self, probe_interval_s: float, probe_timeout_s: float):
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        super().__init__()
        self.running: dict[str, PodRun] = {}

    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int | None, bool]:
        """Nothing to start (the kubelet does): watch for the server on the slot's port from now on."""
        run = PodRun(spec.name, incarnation, spec.launch["host"], int(spec.launch["rpc_port"]))
        self.running[spec.name] = run
        self.watch(spec.name, self._probe_loop, run)
        return None, False

    def _probe_loop(self, run: PodRun) -> None:
        while not run.stop.is_set():
            started = time.monotonic()
            if run.pid is None:
                run.pid = listener_of(run.port)  # the kubelet's new server, once it listens
            elif not psutil.pid_exists(run.pid) or _zombie(run.pid):
                self._exited(run)  # it ended (killed, crashed): the kubelet starts another, a new incarnation
                return
            if run.pid is not None:
                try:
                    server_version(run.host, run.port, self.probe_timeout_s)
                    run.probes += 1
                    run.last_error = None
                    self.seen.put(Beat({"name": run.name, "incarnation": run.incarnation, "pid": None,
                                        "phase": "serving", "probes": run.probes, "phase_age_s": 0.0}))
                except Exception as exc:  # whatever answers badly is no answer
                    run.last_error = f"{type(exc).__name__}: {exc}"
            run.stop.wait(max(0.0, self.probe_interval_s - (time.monotonic() - started)))

    def _exited(self, run: PodRun) -> None:
        if not run.ended:
            run.ended = True
            run.stop.set()
            # its status is its container's to know; that it ended is all the supervisor sees
            self.seen.put(Exited(run.name, run.incarnation, None, "simulator_exited"))

    def _signal(self, name: str, incarnation: int, sig: int, grace_s: float | None) -> None:
        run = self.running.get(name)
        if run is None or run.incarnation != incarnation or run.ended:
            return
        pid = run.pid

        def end():
            if pid is not None:
                for s in (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,):
                    try:
                        os.kill(pid, s)
                    except ProcessLookupError:
                        break
                deadline = time.monotonic() + (grace_s or 10.0)
                while time.monotonic() < deadline and psutil.pid_exists(pid) and not _zombie(pid):
                    time.sleep(0.05)
            self._exited(run)

        threading.Thread(target=end, name=f"end-{name}", daemon=True).start()

    def terminate(self, name: str, incarnation: int) -> None:
        self._signal(name, incarnation, signal.SIGTERM, None)

    def kill(self, name: str, incarnation: int) -> None:
        self._signal(name, incarnation, signal.SIGKILL, 10.0)

    def inject(self, name: str, incarnation: int, what: str) -> None:
        run = self.running.get(name)
        if run is None or run.incarnation != incarnation or run.pid is None or run.ended:
            raise Gone(f"{name} has no server process running")
        sigs = {FREEZE: signal.SIGSTOP, CRASH: signal.SIGKILL}
        if what not in sigs:
            raise NotSupported(f"a pod's simulator takes freeze and crash, not {what}")
        try:
            os.kill(run.pid, sigs[what])
        except ProcessLookupError:
            raise Gone(f"{name}'s server process is gone") from None

    def capture(self, run_dir: Path, action: CaptureEvidence, timeout_s: float) -> Path:
        out = incident_dir(run_dir, action.name)
        run = self.running.get(action.name)
        process = process_state(run.pid if run is not None else None)
        (out / "incident.json").write_text(json.dumps(
            {"name": action.name, "pid": run.pid if run else None, "reason": action.reason, "time": time.time(),
             "last_heartbeat": action.heartbeat, "process": process,
             "probe": {"host": run.host, "port": run.port, "answers": run.probes, "last_error": run.last_error}
             if run else None}, indent=2))
        (out / "stack.txt").write_text("the CARLA server is native code in another container: no Python stack; its "
                                       "process state is in incident.json\n")
        return out

    def kill_all(self) -> None:
        for run in self.running.values():
            run.stop.set()  # the server runs on: it belongs to its container


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
