"""The driver of ``process`` children: spawn, signal and reap them, each in its own process group.

The machine's terminate is SIGTERM to the group, then SIGCONT (a stopped process
cannot handle SIGTERM until it runs again); its kill is SIGKILL to the group."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from protocol.chaos import REQUEST_SIGNAL
from supervisor.drivers import (
    CRASH,
    FREEZE,
    NOTIFY,
    Exited,
    Gone,
    NotSupported,
    Observation,
    StandbyLost,
    evidence,
)
from supervisor.machine import CaptureEvidence
from supervisor.specs import ChildSpec

PR_SET_PDEATHSIG = 1
# The children import the same tree as their supervisor: the directory that holds the packages.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the supervisor dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: children also poll their parent pid from the heartbeat thread


def _child_setup(nice: int):
    def setup() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)  # the supervisor keeps its share of the CPU however many children are busy
    return setup


class ProcessDriver:
    """Starts ``python -m <launch.module>`` children with their output appended to ``logs/<name>.out``.

    A spec's ``launch`` says ``module`` and extra ``args``. A *standby* spare has
    already imported torch and the simulator client and waits on its stdin; a
    respawn that the machine marks ``standby`` activates it instead of starting
    Python from scratch.
    """

    def __init__(self, run_dir: Path, nice: int = 0):
        self.run_dir = Path(run_dir)
        self.nice = nice
        self.procs: dict[tuple[str, int], subprocess.Popen] = {}  # (name, incarnation) -> its process
        self.spares: dict[str, subprocess.Popen] = {}

    def command(self, spec: ChildSpec, incarnation: int) -> list[str]:
        return [sys.executable, "-m", spec.launch["module"], "--run-dir", str(self.run_dir),
                "--incarnation", str(incarnation), *spec.launch.get("args", ())]

    def _popen(self, spec: ChildSpec, cmd: list[str], stdin) -> subprocess.Popen:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{spec.name}.out", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **spec.launch.get("env", {}))
        env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=stdin, start_new_session=True,
                                    preexec_fn=_child_setup(self.nice), env=env, close_fds=True)
        finally:
            out.close()

    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int, bool]:
        proc = self._activate_spare(spec.name, incarnation) if standby else None
        used_standby = proc is not None
        if proc is None:
            proc = self._popen(spec, self.command(spec, incarnation), subprocess.DEVNULL)
        self.procs[(spec.name, incarnation)] = proc
        return proc.pid, used_standby

    def start_standby(self, spec: ChildSpec) -> None:
        if spec.name not in self.spares:
            self.spares[spec.name] = self._popen(spec, self.command(spec, 0) + ["--standby"], subprocess.PIPE)

    def drop_standby(self, name: str) -> None:
        spare = self.spares.pop(name, None)
        if spare is not None:
            self._discard(spare)

    def _activate_spare(self, name: str, incarnation: int) -> subprocess.Popen | None:
        spare = self.spares.pop(name, None)
        if spare is None:
            return None
        try:
            if spare.poll() is not None:
                raise BrokenPipeError
            spare.stdin.write(f"activate {incarnation}\n".encode())
            spare.stdin.close()
            return spare
        except (BrokenPipeError, OSError):
            self._discard(spare)
            return None

    def _discard(self, proc: subprocess.Popen) -> None:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    def terminate(self, name: str, incarnation: int) -> None:
        proc = self.procs.get((name, incarnation))
        if proc is not None:
            signal_group(proc.pid, signal.SIGTERM)
            signal_group(proc.pid, signal.SIGCONT)

    def kill(self, name: str, incarnation: int) -> None:
        proc = self.procs.get((name, incarnation))
        if proc is not None:
            signal_group(proc.pid, signal.SIGKILL)

    def inject(self, name: str, incarnation: int, what: str) -> None:
        """FREEZE: SIGSTOP (the process only: its heartbeat thread stops with it); CRASH: SIGKILL; NOTIFY: the
        request signal, by which a child reads the fault request written for it."""
        signum = {FREEZE: signal.SIGSTOP, CRASH: signal.SIGKILL, NOTIFY: REQUEST_SIGNAL}.get(what)
        if signum is None:
            raise NotSupported(f"a process cannot take {what!r}")
        proc = self.procs.get((name, incarnation))
        if proc is None or proc.returncode is not None:  # not poll(): reaping is the loop's, which reports the exit
            raise Gone(f"{name} (incarnation {incarnation}) is not running")
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            raise Gone(f"{name} (pid {proc.pid}) is gone") from None

    def pid_of(self, name: str, incarnation: int) -> int | None:
        proc = self.procs.get((name, incarnation))
        return proc.pid if proc is not None else None

    def poll(self) -> list[Observation]:
        """Children that exited (exit code; -N for signal N), and standby spares that died."""
        seen: list[Observation] = []
        for (name, incarnation), proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[(name, incarnation)]
                seen.append(Exited(name, incarnation, code))
        for name, spare in list(self.spares.items()):
            if spare.poll() is not None:
                del self.spares[name]
                seen.append(StandbyLost(name))
        return seen

    def capture(self, run_dir: Path, action: CaptureEvidence, timeout_s: float) -> Path:
        pid = self.pid_of(action.name, action.incarnation)
        return evidence.capture(run_dir, action.name, pid, action.reason, action.heartbeat, timeout_s)

    def kill_leftovers(self, saved: dict) -> list[int]:
        return kill_leftovers(saved.get("children", []), str(self.run_dir))

    def kill_all(self) -> None:
        procs = list(self.procs.values()) + list(self.spares.values())
        for proc in procs:
            signal_group(proc.pid, signal.SIGKILL)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdin is not None:
                proc.stdin.close()
        self.procs.clear()
        self.spares.clear()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()] + [p.pid for p in self.spares.values()]


def signal_group(pid: int, signum: int) -> None:
    """Signal a child's whole process group (its pgid is its pid), or the process where the group is gone."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def kill_leftovers(pids: list[int], marker: str) -> list[int]:
    """Kill process groups left by a supervisor that died, if their command line names ``marker``."""
    import psutil

    killed = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if marker in " ".join(proc.cmdline()):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return killed
