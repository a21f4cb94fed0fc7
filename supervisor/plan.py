"""The supervision tree of a run, built from its config: the one module that knows the roles.

The learner and the env-workers are child specs (:class:`supervisor.specs.ChildSpec`);
every limit in them comes from the validated ``supervisor`` section, so a config
key that is renamed or dropped fails here, loudly, instead of falling back to a
default somewhere else. The state machine, the drivers and the CLI read specs and
their labels, never role names.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from protocol.config import Config
from protocol.exits import EXIT_FATAL
from protocol.messages import (
    LEARNER_PROGRESSING_PHASES,
    PROGRESSING_PHASES,
    STARTUP_PHASES,
)
from protocol.roles import HOST, LEARNER, SIMULATOR, WORKER, host_name, simulator_name, worker_name
from protocol.simulators import (
    EXIT_SIMULATOR_RECYCLE,
    EXIT_SIMULATOR_STALLED,
    slot_server,
)
from supervisor.drivers.container import CHILD_LABEL, RUN_LABEL, SLOT_LABEL
from supervisor.specs import (
    PERMANENT,
    TRANSIENT,
    Backoff,
    ChildSpec,
    Deadlines,
    Intensity,
)


def container_name(run_id: str, slot: int) -> str:
    """A stable name per run and slot (Docker allows letters, digits, '_', '.', '-')."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", run_id) or "run"
    return f"rlstack-{safe}-{simulator_name(slot)}"


@dataclass(frozen=True)
class Plan:
    """The children of one supervisor, in start order, and what the run's totals are read from."""

    specs: tuple[ChildSpec, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def with_children(self, *extra: ChildSpec) -> "Plan":
        return Plan(self.specs + tuple(extra))

    def missing_modules(self) -> list[str]:
        """Modules the children need that this install lacks (a supervisor-only install runs no children)."""
        missing = []
        for spec in self.specs:
            for module in spec.launch.get("needs", ()):
                try:
                    found = importlib.util.find_spec(module) is not None
                except (ImportError, ValueError):
                    found = False
                if not found and module not in missing:
                    missing.append(module)
        return missing

    @property
    def local_workers(self) -> int:
        """How many env-workers this host runs (a fleet's head runs none: its hosts' supervisors run theirs)."""
        return sum(1 for s in self.specs if s.labels.get("role") == WORKER)

    @property
    def runs_learner(self) -> bool:
        """Whether this host runs the learner (run.role workers: it runs on another host)."""
        return LEARNER in self.names

    def run_env_steps(self, rows: list[dict]) -> int:
        """The run's env steps: what the learner has stored (workers' counts restart with each incarnation); on a
        host whose learner runs elsewhere, what its workers' current incarnations stepped."""
        if self.runs_learner:
            return next((int(r["env_steps"]) for r in rows if r["name"] == LEARNER), 0)
        return sum(int(r["env_steps"]) for r in rows if r.get("role") == WORKER)


def build_plan(cfg: Config, run_id: str = "") -> Plan:
    """The learner, then one env-worker per slot; both ``transient``, the learner ``significant``.

    Workers do not depend on the learner: a learner restart leaves them stepping
    with their last weights (ZeroMQ queues their steps), and a worker restart
    never touches the learner. With the ``carla`` backend in container mode, each
    slot also has its simulator, ``carla-N`` (``permanent``), and worker-N depends
    on it: a simulator restart restarts its worker after it, and a worker that
    exits with :data:`EXIT_SIMULATOR_STALLED` gets its simulator replaced at once.
    """
    sup = cfg.supervisor
    backoff = Backoff(initial_s=sup.backoff_initial_s, max_s=sup.backoff_max_s, jitter=sup.backoff_jitter,
                      healthy_reset_s=sup.healthy_reset_s)
    intensity = Intensity(max_restarts=sup.max_restarts, window_s=sup.restart_window_s)
    learner = ChildSpec(
        name=LEARNER, kind="process", restart=TRANSIENT, significant=True,
        deadlines=Deadlines(heartbeat_s=sup.heartbeat_deadline_s, progress_s=sup.learner_deadline_s,
                            startup_s=sup.startup_deadline_s, evidence_s=sup.evidence_timeout_s),
        progress_phases=LEARNER_PROGRESSING_PHASES, startup_phases=STARTUP_PHASES, progress_counters=("updates",),
        kill_grace_s=sup.kill_grace_s, stop_grace_s=sup.learner_stop_grace_s, backoff=backoff, intensity=intensity,
        fatal_exit_codes=frozenset({EXIT_FATAL}),
        launch={"module": "learner", "args": ("--name", LEARNER), "needs": ("torch", "tensorboard")}, labels={"role": LEARNER})
    workers = [ChildSpec(
        name=worker_name(slot), kind="process", restart=TRANSIENT, significant=False,
        deadlines=Deadlines(heartbeat_s=sup.heartbeat_deadline_s, progress_s=sup.progress_deadline_s,
                            startup_s=sup.startup_deadline_s, evidence_s=sup.evidence_timeout_s),
        # evaluation steps are progress too: a long evaluation is not a stall, a hung one is
        progress_phases=PROGRESSING_PHASES, startup_phases=STARTUP_PHASES, progress_counters=("env_steps", "eval_steps"),
        kill_grace_s=sup.kill_grace_s, stop_grace_s=sup.kill_grace_s, backoff=backoff, intensity=intensity,
        standby=sup.standby_workers, fatal_exit_codes=frozenset({EXIT_FATAL}), pool=WORKER,
        launch={"module": "worker", "args": ("--name", worker_name(slot), "--slot", str(slot)),
                "needs": ("gymnasium",),
                # the worker's policy is numpy's (policy.acting): its matrix products on this many threads
                "env": {"OMP_NUM_THREADS": str(cfg.workers.torch_threads),
                        "OPENBLAS_NUM_THREADS": str(cfg.workers.torch_threads)}},
        labels={"role": WORKER, "slot": str(slot)}) for slot in range(cfg.workers.count)]
    if cfg.run.engine == "ray":  # the learner here; each host's slots under that host's own supervisor
        return Plan((learner, *[host_spec(cfg, i, backoff, intensity) for i in range(cfg.cluster.hosts or 0)]))
    # run.role workers: this host's slots only, against a learner on another host (workers.learner)
    learners = (learner,) if cfg.run.role == "all" else ()
    if cfg.env.backend != "carla":
        return Plan((*learners, *workers))
    workers = [replace(w, launch={**w.launch, "needs": (*w.launch["needs"], "carla")},
                       stall_dependencies_on=frozenset({EXIT_SIMULATOR_STALLED}),
                       recycle_dependencies_on=frozenset({EXIT_SIMULATOR_RECYCLE})) for w in workers]
    if cfg.simulators.mode == "external":
        return Plan((*learners, *workers))  # servers the user runs: the workers' own health handling only
    sims = [simulator_spec(cfg, run_id, slot, backoff, intensity) for slot in range(cfg.workers.count)]
    if cfg.simulators.mode == "pod":  # the pod's sibling containers: watched and signalled, started by the kubelet
        sims = [replace(s, kind="pod_simulator", launch={"host": s.launch["host"], "rpc_port": s.launch["rpc_port"],
                                                         "needs": ()}) for s in sims]
    workers = [replace(w, depends_on=(s.name,)) for w, s in zip(workers, sims)]
    return Plan((*learners, *[c for pair in zip(sims, workers) for c in pair]))


def simulator_spec(cfg: Config, run_id: str, slot: int, backoff: Backoff, intensity: Intensity) -> ChildSpec:
    """A slot's CARLA server container: healthy while it answers a real request (``version``)."""
    sims = cfg.simulators
    server = slot_server(cfg, slot)
    command = shlex.split(sims.command.format(rpc_port=server.rpc_port, streaming_port=server.streaming_port,
                                              secondary_port=server.secondary_port, slot=slot)) + list(sims.extra_args)
    name = simulator_name(slot)
    return ChildSpec(
        name=name, kind="container", restart=PERMANENT, significant=False,
        deadlines=Deadlines(heartbeat_s=sims.liveness_deadline_s, progress_s=sims.liveness_deadline_s,
                            startup_s=sims.ready_timeout_s, evidence_s=cfg.supervisor.evidence_timeout_s),
        progress_phases=frozenset({"serving"}), startup_phases=frozenset(), progress_counters=("probes",),
        kill_grace_s=sims.kill_grace_s, stop_grace_s=sims.kill_grace_s, backoff=backoff, intensity=intensity,
        max_age_s=sims.recycle_hours * 3600.0 or None,
        launch={"image": sims.image, "command": command, "container_name": container_name(run_id, slot),
                "labels": {RUN_LABEL: run_id, SLOT_LABEL: str(slot), CHILD_LABEL: name},
                "ports": {f"{name} {what}": port for what, port in server.ports.items()},
                "host": server.host, "rpc_port": server.rpc_port, "pull": sims.pull,
                "gpu": sims.gpus[slot % len(sims.gpus)] if sims.gpus else None, "memory_limit": sims.memory_limit,
                "needs": ("docker",)},
        labels={"role": SIMULATOR, "slot": str(slot)})


def host_spec(cfg: Config, index: int, backoff: Backoff, intensity: Intensity) -> ChildSpec:
    """One host of the fleet on Ray (``run.engine: ray``): its agent, healthy while the host's own supervisor
    answers a real ``status`` request through it (each answer is progress; ``waiting_node``, while Ray reports
    its node dead, is not judged)."""
    cl, sup = cfg.cluster, cfg.supervisor
    return ChildSpec(
        name=host_name(index), kind="ray_host", restart=TRANSIENT, significant=False,
        deadlines=Deadlines(heartbeat_s=cl.host_deadline_s, progress_s=cl.host_deadline_s,
                            startup_s=cl.host_startup_s, evidence_s=sup.evidence_timeout_s),
        progress_phases=frozenset({"serving"}), startup_phases=frozenset(), progress_counters=("probes",),
        kill_grace_s=sup.kill_grace_s, stop_grace_s=sup.kill_grace_s + sup.learner_stop_grace_s, backoff=backoff,
        intensity=intensity, pool=HOST, launch={"needs": ("ray",)}, labels={"role": HOST, "slot": str(index)})


def host_agent_spec(cfg: Config, run_id: str, host: str, registry: str | None) -> dict:
    """What a host's agent (``fleet.agent.HostAgent``) is started with: the host run's id and directory, and its
    config: this run's, as a workers-only run of that host (paths only: no key is ever in it)."""
    config = cfg.model_dump(mode="json")
    config["learner"].update(listen=None, curve_key=None, curve_clients=None)  # the learner is not on that host
    config["supervisor"].update(metrics_port=None)
    config["workers"].update(curve_key=cfg.cluster.host_key)  # a path on that host; its agent adds the learner's key
    config.pop("cluster", None)
    runs_dir = cfg.cluster.host_runs_dir or str(Path(cfg.run.runs_dir).resolve())
    return {"run_id": f"{run_id}-{host}", "host": host, "runs_dir": runs_dir, "config": config,
            "registry": registry, "namespace": cfg.cluster.namespace}


def learner_silence_s(cfg: Config) -> float:
    """How long the learner may have no steps from a settled host (while it has others') before the host stops
    counting as progressing: ``cluster.learner_silence_s``, by default long enough for the host's own supervisor
    to catch a hung worker first (its heartbeat and progress deadlines); 0 is off."""
    if cfg.cluster.learner_silence_s is not None:
        return cfg.cluster.learner_silence_s
    return cfg.supervisor.heartbeat_deadline_s + cfg.supervisor.progress_deadline_s


def learner_address(cfg) -> str:
    """Where the hosts reach the learner: ``cluster.learner_address``, else ``learner.listen`` with a wildcard
    address replaced by this node's."""
    if cfg.cluster.learner_address:
        return cfg.cluster.learner_address
    from protocol.curve import parse_tcp

    host, port = parse_tcp(cfg.learner.listen, "learner.listen")
    if host in ("*", "0.0.0.0", "::", "[::]"):
        import ray

        host = ray.util.get_node_ip_address()
    return f"tcp://{host}:{port}"


def registry_info(cfg) -> dict:
    """The run's public facts for its hosts: the learner's endpoint and its public key (never the secret)."""
    public = None
    if cfg.learner.curve_key:
        from protocol.curve import load_secret

        public = load_secret(Path(cfg.learner.curve_key), "learner.curve_key")[0].decode()
    return {"learner": learner_address(cfg), "learner_public_key": public}
