"""A real Ray cluster for the fleet's tests and benchmark, started by ``deploy/ray``'s scripts: a head offering
``learner_host`` and nodes offering ``carla_host`` (each node its own raylet; about 1.6 GiB in all with two nodes),
a node possibly on another host's network (:mod:`harness.netns`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "ray"


def kill_trees(pids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGKILL each of ``pids`` and everything under it, and wait for them to go; returns the pids that were
    still there to kill."""
    procs, killed = [], []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        killed.append(pid)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return killed


def kill_host_supervisors(runs_dir: Path) -> list[int]:
    """SIGKILL what the agents' pid files under ``runs_dir`` name, if it still runs (its workers die with it)."""
    from fleet.agent import CONFIG_FILE, PID_FILE
    from protocol.runstate import runs_naming

    named = []
    for pid_file in Path(runs_dir).glob(f".agents/*/{PID_FILE}"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if runs_naming(pid, str(pid_file.parent / CONFIG_FILE)):
            named.append(pid)
    return kill_trees(named, timeout=10.0)


def host_supervisor(runs_dir: Path, run_id: str, host: str) -> int:
    """The pid of the supervisor that ``host``'s agent started, from the agent's pid file (its state directory is
    named by the host's run, RUN-host-N)."""
    from fleet.agent import PID_FILE

    return int((Path(runs_dir) / ".agents" / f"{run_id}-{host}" / PID_FILE).read_text())


def host_stepping(status: dict, host: str, more_than: int = 0) -> bool:
    """Whether a fleet host is answering (``serving``), all its own children run (its simulators too) and each of
    its workers has more than ``more_than`` steps, as the head's ``status`` shows it."""
    from protocol.states import RUNNING

    r = next(p for p in status["processes"] if p["name"] == host)
    workers = [c for c in r.get("children") or [] if c["name"].startswith("worker-")]
    return r["state"] == RUNNING and r.get("phase") == "serving" and bool(workers) and \
        all(c["state"] == RUNNING for c in r["children"]) and all(c["env_steps"] > more_than for c in workers)


class DeployedCluster:
    """A Ray cluster started as ``deploy/ray`` starts one: the head by ``start-head.sh``, each host's node by
    ``start-worker.sh`` under a stand-in for its systemd unit (:mod:`harness.restarter`, which starts it again when
    it ends, as ``Restart=always`` does), all with token authentication. A node may run in another host's network
    namespace (``prefix``: ``ip netns exec NS``). The health checks are sped up through the environment the scripts
    read, so a node cut off is declared dead in about ``period_ms * threshold``.

    The test's own process needs the same token to join as a driver: :attr:`env` holds it (set it before Ray is
    imported there)."""

    def __init__(self, tmp: Path, ip: str, *, period_ms: int = 500, threshold: int = 4):
        import secrets
        import socket
        import subprocess
        import tempfile

        self.ip = ip
        with socket.socket() as s:
            s.bind((ip, 0))
            self.port = s.getsockname()[1]
        self.token = Path(tmp) / "ray-token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        # Ray's sockets live under its temp dir: a short path (a unix socket's path is limited to 107 bytes)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rlray-"))
        self.logs = Path(tmp)
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "RAY_health_check_period_ms": str(period_ms), "RAY_health_check_timeout_ms": str(period_ms),
                    "RAY_health_check_failure_threshold": str(threshold), "RAY_health_check_initial_delay_ms": "0",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.started: dict[str, subprocess.Popen] = {}  # by name: "head", then each host's (its restarter)
        self.head = self._start("head", [], ["bash", str(DEPLOY / "start-head.sh"), "--node-ip-address", ip,
                                             "--include-dashboard=false", *self._node_args("head")],
                                {"RAY_PORT": str(self.port)})

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def _node_args(self, name: str) -> list[str]:
        """Each node its own temp dir: nodes on one machine sharing one would share their sockets' paths."""
        return ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--temp-dir", str(self.temp_dir / name)]

    def _start(self, name: str, prefix: list[str], command: list[str], extra: dict | None = None):
        import os
        import subprocess
        import sys

        out = open(self.logs / f"ray-{name}.out", "ab")
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this environment's `ray`
        proc = subprocess.Popen([*prefix, *command], env={**os.environ, **self.env, **(extra or {}), "PATH": path},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        out.close()
        self.started[name] = proc
        return proc

    def add_host(self, name: str, ip: str, prefix: list[str] = (), env: dict | None = None) -> "object":
        """A host's node (``carla_host``) under a restarter, at ``ip`` (in ``prefix``'s namespace where given),
        with ``env`` added to its environment (what its unit's ray.env would set)."""
        import sys

        return self._start(name, list(prefix), [sys.executable, "-m", "harness.restarter", "--delay-s", "0.3", "--",
                                                "bash", str(DEPLOY / "start-worker.sh"), self.address,
                                                "--node-ip-address", ip, *self._node_args(name)], env)

    def shutdown(self, runs_dir: Path | None = None) -> list[int]:
        """Every process the cluster started ended (whole trees: a node's raylet and its workers), then what the
        agents under ``runs_dir`` started; returns the host supervisors that had to be killed."""
        kill_trees([proc.pid for proc in self.started.values()])
        for proc in self.started.values():
            proc.wait(timeout=15)
        try:
            return kill_host_supervisors(runs_dir) if runs_dir is not None else []
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def wait_for_hosts(self, count: int, timeout: float = 90.0) -> None:
        """Until ``count`` live nodes offer ``carla_host`` (asked of the GCS; the cluster's token must be in this
        process's environment: :attr:`env`)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        client = GcsClient(address=self.address)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            try:
                nodes = client.get_all_node_info(timeout=2, state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values()
                seen = sum(1 for n in nodes if n.resources_total.get("carla_host", 0) > 0)
            except Exception:
                seen = 0
            if seen >= count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{seen} of {count} hosts' nodes joined the cluster in {timeout:g}s (logs: {self.logs})")
