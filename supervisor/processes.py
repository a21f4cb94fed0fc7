"""Spawning, signalling and reaping child processes, each in its own process group."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the supervisor dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass  # not Linux: children also poll their parent pid from the heartbeat thread


class ProcessDriver:
    """Starts child processes with their output appended to ``logs/<name>.out``.

    With ``standby`` set, each worker slot also keeps a *standby* process that has
    already imported torch and the simulator client and waits on its stdin; a
    respawn activates it instead of starting Python from scratch.
    """

    def __init__(self, run_dir: Path, standby: bool = False):
        self.run_dir = Path(run_dir)
        self.standby = standby
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}
        self.spares: dict[str, subprocess.Popen] = {}

    def command(self, name: str, role: str, slot: int, incarnation: int) -> list[str]:
        module = "learner" if role == "learner" else "worker"
        cmd = [sys.executable, "-m", module, "--run-dir", str(self.run_dir), "--incarnation", str(incarnation)]
        if role == "worker":
            cmd += ["--slot", str(slot)]
        return cmd

    def _popen(self, name: str, cmd: list[str], stdin) -> subprocess.Popen:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{name}.out", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=stdin, start_new_session=True,
                                    preexec_fn=_die_with_parent, env=env, close_fds=True)
        finally:
            out.close()

    def spawn(self, name: str, role: str, slot: int, incarnation: int) -> int:
        proc = self._activate_spare(name, incarnation) if role == "worker" else None
        if proc is None:
            proc = self._popen(name, self.command(name, role, slot, incarnation), subprocess.DEVNULL)
        self.procs[proc.pid] = (name, proc)
        return proc.pid

    def ensure_spare(self, name: str, slot: int) -> None:
        """Start the slot's standby process if it has none (called once the slot runs, not to slow its start)."""
        if self.standby and name not in self.spares:
            self.spares[name] = self._popen(name, self.command(name, "worker", slot, 0) + ["--standby"],
                                            subprocess.PIPE)

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
            self.signal(spare.pid, signal.SIGKILL)
            spare.wait()
            return None

    def signal(self, pid: int, signum: int) -> None:
        """Signal the child's whole process group (its pgid is its pid)."""
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self) -> list[tuple[str, int, int]]:
        """Children that exited since the last call: (name, pid, exit code; -N for signal N)."""
        done = []
        for pid, (name, proc) in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[pid]
                done.append((name, pid, code))
        return done

    def reap_spares(self) -> None:
        """Forget standby processes that died (``ensure_spare`` starts new ones)."""
        for name, spare in list(self.spares.items()):
            if spare.poll() is not None:
                del self.spares[name]

    def kill_all(self) -> None:
        procs = [proc for _, proc in self.procs.values()] + list(self.spares.values())
        for proc in procs:
            self.signal(proc.pid, signal.SIGKILL)
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
        return list(self.procs) + [p.pid for p in self.spares.values()]


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
