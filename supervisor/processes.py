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
    """Starts child processes with their output appended to ``logs/<name>.out``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}

    def command(self, name: str, role: str, slot: int, incarnation: int) -> list[str]:
        module = "learner" if role == "learner" else "worker"
        cmd = [sys.executable, "-m", module, "--run-dir", str(self.run_dir), "--incarnation", str(incarnation)]
        if role == "worker":
            cmd += ["--slot", str(slot)]
        return cmd

    def spawn(self, name: str, role: str, slot: int, incarnation: int) -> int:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{name}.out", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(self.command(name, role, slot, incarnation), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                                    env=env, close_fds=True)
        finally:
            out.close()
        self.procs[proc.pid] = (name, proc)
        return proc.pid

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

    def kill_all(self) -> None:
        for pid in list(self.procs):
            self.signal(pid, signal.SIGKILL)
        for pid, (_, proc) in list(self.procs.items()):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def pids(self) -> list[int]:
        return list(self.procs)


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
