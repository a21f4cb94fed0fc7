"""A real Ray cluster on one machine for the fleet's tests: a head offering ``learner_host`` and nodes offering
``carla_host`` (``ray.cluster_utils.Cluster``: each node its own raylet, about 1 GiB in all)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False}


class MiniCluster:
    def __init__(self, hosts: int = 2):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True,
                               head_node_args={**NODE, "resources": {"learner_host": 1}})
        self.session_dir = Path(self.cluster.head_node.get_session_dir_path())
        self.nodes = [self.add_host() for _ in range(hosts)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_host(self):
        node = self.cluster.add_node(**NODE, resources={"carla_host": 1})
        return node

    def remove(self, node) -> None:
        self.cluster.remove_node(node)
        self.nodes.remove(node)

    def shutdown(self, runs_dir: Path | None = None) -> list[int]:
        """The cluster down, and every host supervisor the agents under ``runs_dir`` started ended (Ray ends its
        actors, not the processes they started in sessions of their own); returns the pids that had to be killed."""
        try:
            self.cluster.shutdown()
        finally:
            left = kill_host_supervisors(runs_dir) if runs_dir is not None else []
            shutil.rmtree(self.session_dir, ignore_errors=True)  # its logs and sockets
        return left


def kill_host_supervisors(runs_dir: Path) -> list[int]:
    """SIGKILL what the agents' pid files under ``runs_dir`` name, if it still runs (its workers die with it)."""
    from fleet.agent import CONFIG_FILE, PID_FILE
    from protocol.runstate import runs_naming

    killed = []
    for pid_file in Path(runs_dir).glob(f".agents/*/{PID_FILE}"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if runs_naming(pid, str(pid_file.parent / CONFIG_FILE)):
            try:
                procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            killed.append(pid)
    deadline = time.monotonic() + 10
    while killed and time.monotonic() < deadline and any(psutil.pid_exists(p) for p in killed):
        time.sleep(0.1)
    return killed


def host_stepping(status: dict, host: str, more_than: int = 0) -> bool:
    """Whether a fleet host is answering (``serving``) and each of its own workers runs with more than ``more_than``
    steps, as the head's ``status`` shows it."""
    from protocol.states import RUNNING

    r = next(p for p in status["processes"] if p["name"] == host)
    return r["state"] == RUNNING and r.get("phase") == "serving" and bool(r.get("children")) and \
        all(c["state"] == RUNNING and c["env_steps"] > more_than for c in r["children"])
