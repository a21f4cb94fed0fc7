"""A host's agent on Ray, and the run's registry.

One :class:`HostAgent` runs on each node that offers ``cluster.host_resource`` (a
detached, named Ray actor that takes no CPU). It runs that host's own supervisor
(``supervisor up --role workers``) as a process in a session of its own, so the host
keeps its own supervision, evidence and ``status``; the agent answers the head's
questions about it: is its supervisor answering a real ``status`` request (not a
bare connect), what are its children doing, what is its stack. Ray restarts an
agent whose node died once a node with the resource is there again; the head's
supervisor kills and replaces one whose supervisor stopped answering while Ray
calls it alive.

An agent starts by removing what an earlier incarnation of it left on the host:
Ray does not end a process an actor started in its own session, nor a container.

:class:`Registry` is where agents find the learner: its endpoint and its public
key (CurveZMQ), never a secret.

This module imports Ray only inside the agent's methods: its logic runs (and is
tested) without a cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from protocol.runstate import runs_naming

PID_FILE = "supervisor.pid"
OUT_FILE = "supervisor.out"
CONFIG_FILE = "config.yaml"
LEARNER_KEY_FILE = "learner.key"
# a node's own secret key file, set in its environment (deploy/ray/start-worker.sh, the unit's ray.env) where its
# machine's key is not at cluster.host_key; the host's workers connect with it and are named after it
HOST_KEY_ENV = "RLSTACK_HOST_KEY"


def agent_name(run_id: str, host: str) -> str:
    """The Ray name of a host's agent in a run (also its Ray name after a restart: how the head re-attaches)."""
    return f"rlstack-{run_id}-{host}"


def registry_name(run_id: str) -> str:
    return f"rlstack-{run_id}-registry"


class Registry:
    """The run's public facts for its hosts: the learner's endpoint and public key (z85), never a secret."""

    def __init__(self, info: dict):
        self.info = dict(info)

    def put(self, info: dict) -> None:
        self.info.update(info)

    def get(self) -> dict:
        return dict(self.info)


def end_group(pgid: int, grace_s: float, ended=None) -> None:
    """SIGTERM a process group, SIGKILL it after ``grace_s`` (SIGCONT too: a stopped one must run to end).
    ``ended``: how to tell its leader has ended (for a child of ours, which stays a zombie until reaped)."""
    def gone() -> bool:
        if ended is not None:
            return ended()
        try:
            os.killpg(pgid, 0)
            return False
        except ProcessLookupError:
            return True

    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if gone():
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def host_identity(configured_key: str | None, host: str, environ=os.environ) -> tuple[str | None, str]:
    """The secret key this node's workers connect with (its environment's ``RLSTACK_HOST_KEY``, else the run's
    ``cluster.host_key``) and the name they go by at the learner, which lets a key named KEY in only as KEY or
    KEY.SUB: ``KEY.host-N`` (one key may serve several machines, a Kubernetes Secret every pod mounts, and host-N
    keeps them apart); without keys, host-N."""
    from protocol.curve import key_name

    key = environ.get(HOST_KEY_ENV) or configured_key
    return key, (f"{key_name(Path(key))}.{host}" if key else host)


class HostAgent:
    """One host's supervisor, started and watched for the head (see the module's docstring).

    ``spec``: ``run_id`` (the host's own run id), ``host`` (what its workers are called at the learner),
    ``runs_dir`` (absolute, on this host), ``config`` (the host run's config as a dict: paths, no keys),
    ``registry`` (the registry actor's name, or None) with ``namespace``, and ``learner`` / ``learner_public_key``
    when there is no registry to ask.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.host = spec["host"]
        self.runs_dir = Path(spec["runs_dir"])
        self.run_dir = self.runs_dir / spec["run_id"]
        self.state = self.runs_dir / ".agents" / spec["run_id"]
        self.state.mkdir(parents=True, exist_ok=True)
        self.cleaned = self.clean_up()
        self.started = time.time()
        self.last_status: dict | None = None
        self.proc = self.start()

    # -- the host's supervisor ---------------------------------------------------------------

    def clean_up(self) -> list[str]:
        """End what an earlier incarnation of this agent left: its supervisor's process group (its children
        die with it) and, where Docker answers, the run's containers; returns what it removed."""
        removed = []
        pid_file = self.state / PID_FILE
        try:
            pgid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pgid = None
        if pgid is not None and runs_naming(pgid, str(self.state / CONFIG_FILE)):
            end_group(pgid, 5.0)
            removed.append(f"process group {pgid}")
        pid_file.unlink(missing_ok=True)
        try:
            import docker

            engine = docker.from_env(timeout=10)
            for c in engine.containers.list(all=True, filters={"label": [f"rlstack.run={self.spec['run_id']}"]}):
                c.remove(force=True)
                removed.append(f"container {c.name}")
        except Exception:  # no Docker here, or no engine answering: nothing of ours can be running in it
            pass
        return removed

    def learner(self) -> tuple[str, str | None]:
        """The learner's endpoint and public key: from the run's registry (a restarted agent reads the current
        ones), else those the agent was started with."""
        if self.spec.get("registry"):
            try:
                import ray

                info = ray.get(ray.get_actor(self.spec["registry"], namespace=self.spec["namespace"]).get.remote(),
                               timeout=30)
                return info["learner"], info.get("learner_public_key")
            except Exception:  # no registry answering (being placed again): the facts the agent started with
                pass
        return self.spec["learner"], self.spec.get("learner_public_key")

    def start(self) -> subprocess.Popen:
        endpoint, public = self.learner()
        cfg = dict(self.spec["config"])
        workers = dict(cfg.get("workers") or {}, learner=endpoint)
        secret, self.identity = host_identity(workers.get("curve_key"), self.host)
        workers.update(curve_key=secret, host=self.identity)
        if public is not None:
            key = self.state / LEARNER_KEY_FILE
            key.write_text(f"metadata\ncurve\n    public-key = \"{public}\"\n")
            workers["learner_key"] = str(key)
        cfg["workers"] = workers
        cfg["run"] = dict(cfg.get("run") or {}, run_id=self.spec["run_id"], runs_dir=str(self.runs_dir),
                          role="workers", engine="local")
        config = self.state / CONFIG_FILE
        config.write_text(yaml.safe_dump(cfg))
        out = open(self.state / OUT_FILE, "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor", "up", "--config", str(config), "--no-live"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.runs_dir)
        finally:
            out.close()
        (self.state / PID_FILE).write_text(str(proc.pid))
        return proc

    # -- what the head asks ------------------------------------------------------------------

    def node(self) -> str | None:
        try:
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:
            return None

    def ping(self, timeout_s: float = 2.0) -> dict:
        """Whether the host's supervisor answers a real ``status`` request, and what it says; or its exit."""
        from supervisor.cli import request

        out = {"host": self.host, "as": self.identity, "node": self.node(), "pid": self.proc.pid,
               "agent_pid": os.getpid(), "cleaned": self.cleaned}
        code = self.proc.poll()
        if code is not None:
            out["exited"] = code
            return out
        reply = request(self.run_dir, "status", timeout_ms=int(timeout_s * 1000)) \
            if (self.run_dir / "endpoints.json").exists() else None
        if reply is not None and reply.get("ok"):
            self.last_status = reply["data"]
            out["status"] = self.last_status
        return out

    def evidence(self, timeout_s: float = 5.0) -> dict:
        """The host supervisor's stack (py-spy), the tail of its output, the last status it answered."""
        from supervisor.drivers.evidence import stack_of, tail

        alive = self.proc.poll() is None
        return {"host": self.host, "node": self.node(), "pid": self.proc.pid,
                "stack": stack_of(self.proc.pid if alive else None, timeout_s),
                "log_tail": tail(self.state / OUT_FILE), "last_status": self.last_status}

    def stop(self, grace_s: float = 15.0) -> int | None:
        """End the host's supervisor (SIGTERM: it stops its children; SIGKILL after ``grace_s``)."""
        if self.proc.poll() is None:
            end_group(self.proc.pid, grace_s, ended=lambda: self.proc.poll() is not None)
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None
