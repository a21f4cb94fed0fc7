"""A real stack (supervisor, learner, workers) started by a test, a benchmark or the soak, always cleaned up.

:class:`Stack` writes the run's config (a base config, the fast settings of
:data:`FAST` unless asked not to, the caller's overrides), starts ``supervisor up``
in its own session, watches it through the control socket, and on :meth:`stop`
checks that nothing it started is left: processes, socket files, containers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from harness.paced import ENV_ID as PACED_PENDULUM
from protocol.roles import LEARNER
from protocol.runstate import runs_naming
from protocol.states import RUNNING
from supervisor.cli import request

ROOT = Path(__file__).resolve().parent.parent

# Small and quick: every deadline short, so the tests see failures handled in seconds.
FAST = {
    "run": {"max_timesteps": 10**9},
    "workers": {"start_steps": 200, "batch_steps": 16, "batch_interval_s": 0.2, "eval_freq": 0},
    "learner": {"hidden_dim": 64, "batch_size": 32, "learning_starts": 200, "updates_per_step": 0.5,
                "rate_limit_slack": 400, "publish_every": 20, "checkpoint_every": 100, "log_every": 50,
                "torch_threads": 1, "replay_capacity": 20000},
    # no standby spares unless a test asks for them: each is one more process importing torch
    "supervisor": {"standby_workers": False, "heartbeat_interval_s": 0.2, "heartbeat_deadline_s": 2.0,
                   "progress_deadline_s": 3.0,
                   "startup_deadline_s": 60.0, "learner_deadline_s": 30.0, "kill_grace_s": 1.0,
                   "evidence_timeout_s": 3.0, "backoff_initial_s": 0.2, "backoff_max_s": 2.0,
                   "max_restarts": 3, "restart_window_s": 120.0},
}


# Pendulum at a simulator's pace (harness/paced.py): each worker steps at most 100 times a second, so a running
# stack's learner is not busy all the time; tests wait for counts, not times, so they wait a little longer instead.
PACED = {"env": {"id": PACED_PENDULUM, "kwargs": {"step_s": 0.01}}}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Stack:
    def __init__(self, tmp_path: Path, overrides: dict | None = None, base: str = "configs/pendulum.yaml",
                 fast: bool = True, run_id: str = "test", paced: bool = True):
        self.tmp = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        cfg = yaml.safe_load((ROOT / base).read_text())
        if fast:
            cfg = merge(cfg, FAST)
            if paced and cfg["env"].get("id") == "Pendulum-v1":
                cfg = merge(cfg, PACED)
        cfg = merge(cfg, overrides or {})
        cfg["run"]["runs_dir"] = str(tmp_path / "runs")
        cfg["run"]["run_id"] = run_id
        self.run_id = run_id
        self.config_path = tmp_path / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.run_dir = tmp_path / "runs" / run_id
        self.proc: subprocess.Popen | None = None
        self.seen_pids: set[int] = set()
        self.last_status: dict | None = None
        self.samples: list[dict] = []  # each status: time, the run's stored steps, the learner's incarnation
        self.extra_args: list[str] = []  # more arguments for `supervisor up`
        self.prefix: list[str] = []  # what the supervisor runs under (`ip netns exec NS`: another host's network)

    def start(self) -> "Stack":
        self.out = open(self.tmp / "supervisor.out", "wb")
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "supervisor", "up", "--config", str(self.config_path),
                                      "--no-live", *self.extra_args], cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def cli(self, *args, timeout=20) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor", *args, "--run-dir", str(self.run_dir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict | None:
        reply = request(self.run_dir, "status", timeout_ms=2000)
        if reply is None or not reply.get("ok"):
            return None
        status = reply["data"]
        self.last_status = status
        self.seen_pids.update(p["pid"] for p in status["processes"] if p["pid"])
        learner = next((p for p in status["processes"] if p.get("role") == LEARNER), None)
        if learner is not None:
            self.samples.append({"t": time.monotonic(), "steps": status["env_steps"],
                                 "incarnation": learner["incarnation"], "state": learner["state"]})
        return status

    def proc_row(self, status: dict, name: str) -> dict:
        return next(p for p in status["processes"] if p["name"] == name)

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) while waiting for {what}\n"
                                     + self.diagnostics())
            status = self.status()
            if status is not None:
                try:
                    if predicate(status):
                        return status
                except (KeyError, StopIteration):
                    pass
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + self.diagnostics())

    def wait_running(self, timeout: float = 90) -> dict:
        return self.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"]), timeout,
                             "every process running")

    def events(self) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def log(self, name: str) -> str:
        path = self.run_dir / "logs" / f"{name}.jsonl"
        return path.read_text() if path.exists() else ""

    def diagnostics(self) -> str:
        parts = [f"last status: {json.dumps(self.last_status, indent=1)[:3000]}"]
        out = self.tmp / "supervisor.out"
        if out.exists():
            parts.append("supervisor output:\n" + out.read_text()[-3000:])
        for f in sorted((self.run_dir / "logs").glob("*")) if (self.run_dir / "logs").exists() else []:
            parts.append(f"{f.name}:\n" + f.read_text()[-1500:])
        return "\n".join(parts)

    def stop(self, timeout: float = 40) -> int | None:
        """Stop the supervisor (SIGTERM, then SIGKILL) and make sure nothing it started is left."""
        code = self.stop_supervisor(timeout)
        leftovers = self.kill_leftovers()
        assert not leftovers, f"processes left behind: {leftovers}"
        return code

    def stop_supervisor(self, timeout: float = 40) -> int | None:
        """SIGTERM to the supervisor, SIGKILL to its group if it has not ended within ``timeout``; its exit code."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        elif self.proc is not None:
            code = self.proc.returncode
        if not self.out.closed:
            self.out.close()
        return code

    def kill_leftovers(self) -> list[int]:
        pids = set(self.seen_pids)
        state = self.run_dir / "supervisor.json"
        if state.exists():
            pids.update(json.loads(state.read_text()).get("children", []))
        left = []
        deadline = time.monotonic() + 5  # children die with their parent; give them a moment
        for pid in pids:
            while time.monotonic() < deadline and _is_ours(pid, self.run_dir):
                time.sleep(0.1)
            if _is_ours(pid, self.run_dir):
                left.append(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return left


    # -- what a long run (the soak) watches -------------------------------------------------------------------

    def resources(self) -> dict:
        """The supervisor's open files and memory."""
        ps = psutil.Process(self.proc.pid)
        return {"fds": ps.num_fds(), "rss_bytes": ps.memory_info().rss}

    def zombies(self) -> list[int]:
        """Children of the supervisor that exited and were not reaped."""
        out = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    out.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def watch(self, seconds: float, every_s: float = 0.5) -> None:
        """Ask for the status every ``every_s`` for ``seconds`` (the samples of :meth:`throughput`)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the supervisor exited ({self.proc.returncode})\n" + self.diagnostics())
            self.status()
            time.sleep(every_s)

    def throughput(self, since: float, until: float, from_steps: int = 0) -> float:
        """Stored env steps per second over [since, until] (the learner's count; a restart's dip is skipped),
        from the first sample with at least ``from_steps``."""
        window = [s for s in self.samples if since <= s["t"] <= until]
        start = next((i for i, s in enumerate(window) if s["steps"] >= from_steps), len(window))
        window = window[start:]
        if len(window) < 2:
            return 0.0
        best = max(s["steps"] for s in window)
        return (best - window[0]["steps"]) / max(1e-9, window[-1]["t"] - window[0]["t"])

    def leftovers(self) -> dict:
        """What outlived the supervisor: processes naming the run dir, socket files, containers labelled for the
        run (each process found is killed, so none is left even when the check fails)."""
        deadline = time.monotonic() + 5  # children die with their parent (PR_SET_PDEATHSIG); give them a moment
        while True:
            procs = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline", "status"])
                     if _names(p, str(self.run_dir))]
            if not procs or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        sockets = []
        eps = self.run_dir / "endpoints.json"
        if eps.exists():
            sockets = [ep[len("ipc://"):] for ep in json.loads(eps.read_text()).values()
                       if ep.startswith("ipc://") and Path(ep[len("ipc://"):]).exists()]
        containers: int | str = 0
        try:
            from protocol.config import load_config

            if load_config(self.run_dir / "config.yaml").has_containers():
                from supervisor.drivers.container import RUN_LABEL, connect_engine

                engine = connect_engine(10)
                containers = len(engine.containers.list(all=True, filters={"label": [f"{RUN_LABEL}={self.run_id}"]}))
        except Exception as exc:  # no engine: say so rather than claim none are left
            containers = f"unknown ({exc})"
        for pid in procs:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        return {"processes": procs, "socket_files": sockets, "containers": containers}


def _names(p: psutil.Process, marker: str) -> bool:
    try:
        return p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or ())
    except psutil.Error:
        return False


def _is_ours(pid: int, run_dir: Path) -> bool:
    return runs_naming(pid, str(run_dir))
