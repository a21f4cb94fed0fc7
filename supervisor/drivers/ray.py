"""Host agents on Ray: the fleet's children, one per host, judged like any other child.

Ray places the agents (one per unit of ``cluster.host_resource``), notices dead
nodes and places an agent again when a node comes back. It does not notice a hung
host: an agent whose host supervisor stopped answering is still "alive" to Ray.
This driver makes the heartbeats the machine judges: a beat for each ``status``
request the host's supervisor answered through its agent (a real request, asked
every ``cluster.probe_interval_s`` and bounded by ``probe_timeout_s``). Silence
past ``cluster.host_deadline_s`` is a stall: the machine asks for evidence (the
host supervisor's stack and last status, from the agent; or that the agent itself
did not answer), then a kill, and spawns the next incarnation, a new agent, which
first removes what the last one left on its host. While Ray reports the agent's
node dead the driver beats ``waiting_node``, a phase no deadline of progress
applies to: a dead node is waited for, not killed.

Each incarnation is a detached actor named for the run and the host, so a head
supervisor that was killed and started again finds the running agents by name and
takes them over (:meth:`RayHostDriver.spawn` adopts a live one).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.messages import MAX_HOSTS
from protocol.states import RUNNING
from supervisor.drivers import Beat, Exited, NotSupported, Watcher
from supervisor.drivers.evidence import incident_dir
from supervisor.machine import CaptureEvidence
from supervisor.specs import ChildSpec

WAITING_NODE = "waiting_node"  # the agent's node is dead to Ray: waited for, never judged for progress
SERVING = "serving"
FREE_NAME_S = 30.0  # how long a killed agent's name may take to be free for the next incarnation


def connect(address: str | None, namespace: str):
    """Join the Ray cluster as a driver (``address``: None means RAY_ADDRESS, else a local cluster); returns ray."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=namespace,
                 log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    return ray


@dataclass
class HostRun:
    name: str
    incarnation: int
    actor: object
    actor_name: str
    stop: threading.Event = field(default_factory=threading.Event)
    answers: int = 0
    node: str | None = None
    last: dict | None = None  # the agent's last answer
    last_error: str | None = None
    ended: bool = False
    identity: str | None = None  # what its workers go by at the learner (its key's name, KEY.host-N)
    settled_since: float | None = None  # since when every child of its supervisor has been running
    silent: str | None = None  # why the learner's side says it delivers nothing, while it does not


def _reason(exc: BaseException) -> str:
    """The line of a Ray error that says why (its cause, where Ray wraps one), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if "Error" in line and not line.startswith(("File ", "Traceback"))]
    return ((told[-1] if told else lines[0]) if lines else type(exc).__name__)[:300]


def host_children(status: dict | None) -> list[dict]:
    """What the head shows of a host's own children, from its supervisor's status answer."""
    rows = []
    for p in (status or {}).get("processes") or []:
        if isinstance(p, dict):
            rows.append({k: p.get(k) for k in ("name", "state", "env_steps", "restarts", "pid", "weights")})
    return rows


def learner_silence(identity: str | None, heard: dict[str, float], settled_s: float, limit_s: float) -> str | None:
    """Why a host that answers is not delivering, by the learner's "last seen" of each host (``heard``: seconds
    since it last had steps from each, by name), or None. It is judged only when the learner hears at least one
    other host within ``limit_s`` (a learner that hears nobody, or holds everyone back, is its own problem, never a
    host's) and the host's children have all been running for longer than ``limit_s`` (``settled_s``: a host
    repairing or starting a slot is its own supervisor's business)."""
    if not limit_s or identity is None or settled_s <= limit_s:
        return None
    others = sorted(h for h, seen in heard.items() if h != identity and seen <= limit_s)
    if not others:
        return None
    silent = min(heard.get(identity, math.inf), settled_s)
    if silent <= limit_s:
        return None
    also = f" and {len(others) - 3} more" if len(others) > 3 else ""
    return (f"the learner has had no steps from {identity} for {silent:.0f}s (limit {limit_s:g}s) while it has "
            f"them from {', '.join(others[:3])}{also}")


class LearnerView:
    """The learner's "last seen" of each host, as the head's loop last showed it (its hosts table in the run's
    status rows), and the judgement of a host by it (:func:`learner_silence`)."""

    def __init__(self, limit_s: float, fresh_s: float, clock=time.monotonic):
        self.limit_s = limit_s
        self.fresh_s = fresh_s  # a view older than this judges nothing
        self.clock = clock
        # (when, seconds since the learner had each host, the learner's uptime: a host it has not had yet counts
        # from its start, a new incarnation's table being empty)
        self.heard: tuple[float, dict[str, float], float] | None = None

    def see(self, rows: list[dict]) -> None:
        for r in rows:
            if r.get("hosts") and r.get("state") == RUNNING and r.get("heartbeat_age_s") is not None:
                age = float(r["heartbeat_age_s"])
                # a full table may lack a host it has: only hosts it shows can be judged then
                uptime = None if len(r["hosts"]) >= MAX_HOSTS else float(r.get("uptime_s") or 0.0)
                self.heard = (self.clock(), {h["host"]: h["last_seen_s"] + age for h in r["hosts"]}, uptime)
                return
        self.heard = None  # no learner running and hearing hosts: nothing to judge by

    def judge(self, run: HostRun, status) -> str | None:
        """Why ``run``'s host (its supervisor's ``status`` just answered) delivers nothing, or None."""
        now = self.clock()
        children = host_children(status)
        if not children or any(c.get("state") != RUNNING for c in children):
            run.settled_since = None
            return None
        if run.settled_since is None:
            run.settled_since = now
        if self.heard is None or now - self.heard[0] > self.fresh_s:
            return None
        when, seen, uptime = self.heard
        heard = {h: s + (now - when) for h, s in seen.items()}
        if run.identity not in heard:
            if uptime is None:
                return None
            heard[run.identity] = uptime + (now - when)
        return learner_silence(run.identity, heard, now - run.settled_since, self.limit_s)


class RayHostDriver(Watcher):
    """The ``ray_host`` kind: each child is a host's agent (``fleet.agent.HostAgent``) on a Ray node."""

    def __init__(self, run_dir: Path, run_id: str, specs: dict[str, dict], *, address: str | None, namespace: str,
                 resource: str, registry: dict, probe_interval_s: float, probe_timeout_s: float,
                 stop_grace_s: float, registry_resource: str | None = None, learner_silence_s: float = 0.0):
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.agent_specs = specs  # child name -> the HostAgent's spec
        self.namespace = namespace
        self.resource = resource
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.stop_grace_s = stop_grace_s
        self.view = LearnerView(learner_silence_s, fresh_s=max(5.0, 5 * probe_interval_s))
        self.ray = connect(address, namespace)
        from fleet.agent import Registry, registry_name

        # on the learner's node (a sliver of its resource), restartable: a GPU host's node may go, the registry stays
        pinned = {registry_resource: 0.001} if registry_resource else {}
        self.registry = self.ray.remote(Registry).options(
            name=registry_name(run_id), namespace=namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources=pinned, max_restarts=-1).remote(registry)
        self.ray.get(self.registry.put.remote(registry), timeout=60)
        super().__init__()
        self.running: dict[str, HostRun] = {}

    # -- starting and ending -----------------------------------------------------------------

    def _existing(self, actor_name: str):
        try:
            return self.ray.get_actor(actor_name, namespace=self.namespace)
        except ValueError:
            return None

    def spawn(self, spec: ChildSpec, incarnation: int, standby: bool) -> tuple[int | None, bool]:
        from fleet.agent import HostAgent, agent_name

        actor_name = agent_name(self.run_id, spec.name)
        actor = self._existing(actor_name)
        if actor is None:
            actor = self.ray.remote(HostAgent).options(
                name=actor_name, namespace=self.namespace, lifetime="detached", num_cpus=0,
                resources={self.resource: 1}, max_restarts=-1, max_concurrency=4,
            ).remote(self.agent_specs[spec.name])
        # else: an agent a head supervisor before this one started (and which runs on): taken over as it is
        run = HostRun(spec.name, incarnation, actor, actor_name)
        self.running[spec.name] = run
        self.watch(spec.name, self._probe_loop, run)
        return None, False

    def _end(self, name: str, incarnation: int, graceful: bool) -> None:
        run = self.running.get(name)
        if run is None or run.incarnation != incarnation or run.ended:
            return
        run.ended = True
        run.stop.set()

        def end():
            code = -9
            if graceful:
                try:
                    answer = self.ray.get(run.actor.stop.remote(self.stop_grace_s), timeout=self.stop_grace_s + 10)
                    code = answer if isinstance(answer, int) else 0
                except Exception:
                    code = -9
            self._finish(run, code)

        threading.Thread(target=end, name=f"end-{name}", daemon=True).start()

    def _kill_actor(self, run: HostRun) -> None:
        try:
            self.ray.kill(run.actor, no_restart=True)
        except Exception:  # gone already
            pass

    def _finish(self, run: HostRun, code: int | None) -> None:
        """The incarnation's agent ended for good, its name free for the next one; then its exit is reported."""
        self._kill_actor(run)
        deadline = time.monotonic() + FREE_NAME_S
        while time.monotonic() < deadline and self._existing(run.actor_name) is not None:
            time.sleep(0.2)
        self.seen.put(Exited(run.name, run.incarnation, code))

    def terminate(self, name: str, incarnation: int) -> None:
        self._end(name, incarnation, graceful=True)

    def kill(self, name: str, incarnation: int) -> None:
        self._end(name, incarnation, graceful=False)

    def inject(self, name: str, incarnation: int, what: str) -> None:
        raise NotSupported("a host agent takes no chaos faults; inject them into its host's own supervisor")

    # -- watching ----------------------------------------------------------------------------

    def _node_dead(self, node: str | None) -> bool:
        if node is None:
            return False
        try:
            return any(n.get("NodeID") == node and not n.get("Alive") for n in self.ray.nodes())
        except Exception:
            return False

    def see(self, rows: list[dict]) -> None:
        """The run's status rows, from the loop (the learner's hosts table in them)."""
        self.view.see(rows)

    def _beat(self, run: HostRun, phase: str, detail: str | None = None) -> None:
        status = (run.last or {}).get("status")
        children = host_children(status)
        beat = {"name": run.name, "incarnation": run.incarnation, "pid": None, "phase": phase, "phase_age_s": 0.0,
                "probes": run.answers, "env_steps": sum(int(c.get("env_steps") or 0) for c in children),
                "node": (run.node or "")[:16], "children": children}
        if run.identity is not None:
            beat["identity"] = run.identity  # the name its workers go by at the learner (its key's)
        if detail:
            beat["detail"] = detail
        self.seen.put(Beat(beat))

    def _probe_loop(self, run: HostRun) -> None:
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        while not run.stop.is_set():
            started = time.monotonic()
            try:
                answer = self.ray.get(run.actor.ping.remote(self.probe_timeout_s / 2), timeout=self.probe_timeout_s)
                run.last, run.node = answer, answer.get("node") or run.node
                if "exited" in answer:  # its supervisor ended: the host's run is over (0) or failed
                    if not run.ended:
                        run.ended = True
                        self._finish(run, int(answer["exited"]))
                    return
                if answer.get("status") is not None:
                    run.identity = answer.get("as") if isinstance(answer.get("as"), str) else run.identity
                    run.silent = self.view.judge(run, answer["status"])
                    if run.silent is None:  # an answer is progress while the learner has its steps too
                        run.answers += 1
                    run.last_error = None
                    self._beat(run, SERVING, run.silent)
                else:
                    run.last_error = "its supervisor did not answer a status request"
            except ActorUnavailableError:  # Ray is placing it again (its node died)
                run.last_error = "Ray is placing the agent again"
                self._beat(run, WAITING_NODE, "its node is gone; Ray places the agent again when a node is back")
            except GetTimeoutError:
                run.last_error = f"the agent did not answer within {self.probe_timeout_s:g}s"
                if self._node_dead(run.node):
                    self._beat(run, WAITING_NODE, "its node is dead to Ray; waiting for it or another")
            except RayActorError as exc:
                if self._existing(run.actor_name) is not None:  # its name held: Ray restarts it (its node died
                    run.last_error = "the agent died; Ray is placing it again"  # under a call, or its process)
                    self._beat(run, WAITING_NODE, "its agent died; Ray places it again when a node is there")
                    run.stop.wait(self.probe_interval_s)
                    continue
                if not run.ended:  # dead for good (killed by someone else, or its creation failed)
                    run.ended = True
                    run.last_error = _reason(exc)
                    print(f"[supervisor] {run.name}: its agent is dead: {run.last_error}", file=sys.stderr, flush=True)
                    self.seen.put(Exited(run.name, run.incarnation, None))
                return
            except Exception as exc:  # whatever answers badly is no answer
                run.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            run.stop.wait(max(0.0, self.probe_interval_s - (time.monotonic() - started)))

    def capture(self, run_dir: Path, action: CaptureEvidence, timeout_s: float) -> Path:
        """The host's evidence through its agent: its supervisor's stack, output and last status; or, when the
        agent itself does not answer, that it did not and what Ray says of its node."""
        out = incident_dir(run_dir, action.name)
        run = self.running.get(action.name)
        got, error = None, None
        if run is not None:
            try:
                got = self.ray.get(run.actor.evidence.remote(timeout_s / 2), timeout=timeout_s)
            except Exception as exc:
                error = f"the agent did not give evidence within {timeout_s:g}s ({type(exc).__name__})"
        incident = {"name": action.name, "pid": (got or {}).get("pid"), "reason": action.reason, "time": time.time(),
                    "last_heartbeat": action.heartbeat, "agent": run.actor_name if run else None,
                    "node": (got or {}).get("node") or (run.node if run else None),
                    "node_alive": (not self._node_dead(run.node)) if run else None,
                    "last_probe_error": run.last_error if run else None,
                    "learner_silence": run.silent if run else None, "evidence_error": error}
        (out / "incident.json").write_text(json.dumps(incident, indent=2))
        (out / "stack.txt").write_text((got or {}).get("stack") or f"{error or 'no agent'}: no stack of its "
                                                                   "host's supervisor\n")
        (out / "log_tail.txt").write_text((got or {}).get("log_tail") or "")
        (out / "status.json").write_text(json.dumps((got or {}).get("last_status") or (run.last or {}).get("status")
                                                    if run else None, indent=2))
        return out

    def kill_all(self) -> None:
        for run in list(self.running.values()):
            run.stop.set()
            self._kill_actor(run)
