"""``supervisor up``'s checks before anything is written: the config (and a resumed run's own), the run free,
the modules its children need installed, the host able to hold it, the simulators' images and ports.

Each refusal is a :class:`Refused` with the one line the operator sees and the
exit code; a run that passes every check is :class:`Ready` to be created.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.runstate import live_pid, read_state

# `supervisor up`'s refusals (the CLI's exit codes): a config or usage error, a run another supervisor holds,
# a host that cannot hold the run.
EXIT_USAGE, EXIT_RUN_BUSY, EXIT_OVERLOAD = 2, 5, 6


class Refused(Exception):
    """``up`` cannot start this run; ``str`` is the one line for the operator, ``code`` the exit status."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


@dataclass
class Ready:
    cfg: object  # protocol.config.Config
    run_dir: Path | None  # the run resumed; None for a new one
    locked: bool  # this process holds the resumed run's lock
    warnings: list[str]


def _index_or_name(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def overrides_from(args) -> list[tuple[str, object]]:
    from protocol.config import ConfigError, parse_value

    out: list[tuple[str, object]] = []
    for key, value in (("run.max_timesteps", args.max_timesteps), ("workers.count", args.workers),
                       ("run.seed", args.seed), ("workers.eval_freq", args.eval_freq), ("run.debug", args.debug),
                       ("run.run_id", args.run_id), ("run.runs_dir", args.runs_dir),
                       ("env.carla.scenario", _index_or_name(args.scenario)), ("env.carla.npcs", args.npcs),
                       *((key, getattr(args, flag, None)) for key, flag in HOSTS_FLAGS)):
        if value is not None:
            out.append((key, value))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE, e.g. learner.batch_size=128")
        key, value = item.split("=", 1)
        out.append((key.strip(), parse_value(value)))
    return out


# `up`'s flags for runs on several hosts (docs/hosts.md, docs/fleet.md), and the config keys they set
HOSTS_FLAGS = (("run.role", "role"), ("workers.learner", "learner_endpoint"), ("workers.curve_key", "key"),
               ("workers.learner_key", "learner_key"), ("workers.host", "host"),
               ("run.engine", "engine"), ("cluster.address", "address"))


def config_from(args):
    """The run's config from ``up``'s arguments; raises ConfigError.

    A run that exists is resumed with its own saved config, the overrides applied
    on top (``--config`` replaces it); whatever would change its model or replay is
    refused.
    """
    return resume_config(args, requested_config(args))


def saved_config_path(args) -> Path | None:
    """A resumed run's own config file (``--run-id`` of a run that exists), or None."""
    from protocol.config import RunConfig

    if not args.run_id:
        return None
    runs_dir = args.runs_dir
    if runs_dir is None and args.config is not None:
        from protocol.config import load_config

        runs_dir = load_config(args.config).run.runs_dir
    path = Path(runs_dir or RunConfig().runs_dir) / args.run_id / "config.yaml"
    return path if path.exists() else None


def requested_config(args):
    """The config as the arguments give it: a resumed run's own config with the overrides on top (``--config``
    replaces it), or ``--config`` (or the defaults) with them."""
    from protocol.config import load_config

    overrides = overrides_from(args)
    saved = saved_config_path(args)
    if saved is not None and args.config is None:  # the run's own config, not the defaults
        cfg = load_config(saved, overrides + [("run.runs_dir", str(saved.parent.parent)),
                                              ("run.run_id", args.run_id)])
    else:
        cfg = load_config(args.config, overrides)
    carla = cfg.env.carla
    if args.npcs is not None and carla.scenario is not None:  # the flag wins over the scenario's own count
        index = carla.scenario if isinstance(carla.scenario, int) else \
            [s.name for s in carla.scenarios].index(carla.scenario)
        base = saved if saved is not None and args.config is None else args.config
        extra = [("run.runs_dir", cfg.run.runs_dir), ("run.run_id", cfg.run.run_id)] if base is saved else []
        cfg = load_config(base, overrides + extra + [(f"env.carla.scenarios.{index}.npcs", args.npcs)])
    return cfg


def resume_config(args, cfg):
    """``cfg``, checked against the saved config of the run it resumes: its model and replay cannot change."""
    from protocol.config import ConfigError, load_config, resume_conflicts

    saved_path = Path(cfg.run.runs_dir) / cfg.run.run_id / "config.yaml" if cfg.run.run_id else None
    if saved_path is None or not saved_path.exists():
        return cfg
    conflicts = resume_conflicts(load_config(saved_path), cfg)
    if conflicts:
        raise ConfigError(f"config error: run {cfg.run.run_id} was built with {'; '.join(conflicts)}: its model "
                          "and replay cannot change; resume without these changes, or start a new run "
                          "(leave out --run-id)")
    return cfg


def set_previous_checkpoint_aside(run_dir: Path) -> str:
    """``--resume-from previous``: latest.pt is set aside (renamed, kept), previous.pt takes its place."""
    ckpt = run_dir / "checkpoints"
    previous, latest = ckpt / "previous.pt", ckpt / "latest.pt"
    aside = ckpt / f"latest.pt.set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if latest.exists():
        os.replace(latest, aside)
    os.replace(previous, latest)
    return f"resuming from the checkpoint before the latest; the latest was set aside as {aside.name}"


def live_supervisor(run_dir: Path) -> int | None:
    """The pid of a supervisor running this run, from its state file; None when there is none."""
    return live_pid(read_state(run_dir))


def fleet_problem(cfg) -> str | None:
    """``run.engine: ray``: Ray installed, a cluster answering at ``cluster.address``, and nodes offering
    ``cluster.host_resource``; sets ``cluster.hosts`` to their count where it is not given."""
    import importlib.util

    cl = cfg.cluster
    if importlib.util.find_spec("ray") is None:
        return "run.engine ray needs Ray: pip install 'carla-rl-stack[fleet]'"
    from supervisor.drivers.ray import connect

    try:
        ray = connect(cl.address, cl.namespace)
        offered = ray.cluster_resources().get(cl.host_resource, 0)
    except Exception as exc:  # ConnectionError, a bad address, a cluster of another version
        where = cl.address or os.environ.get("RAY_ADDRESS") or "auto"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"no Ray cluster answers at {where} ({text}); start its head with deploy/ray/start-head.sh, or set "
                "cluster.address (or RAY_ADDRESS)")
    if cl.hosts is None:
        if offered < 1:
            return (f"no node of the Ray cluster offers the resource {cl.host_resource}: start each GPU host's node "
                    f"with --resources '{{\"{cl.host_resource}\": 1}}' (deploy/ray/start-worker.sh)")
        cl.hosts = int(offered)
    return None


def check_up(args) -> Ready:
    """Every check of ``up``, in order, before anything is written; raises Refused."""
    from protocol.config import ConfigError
    from supervisor.drivers.evidence import py_spy_path
    from supervisor.plan import build_plan
    from supervisor.rundir import lock_run

    try:
        cfg = requested_config(args)
    except ConfigError as exc:
        raise Refused(str(exc), EXIT_USAGE) from None
    run_dir = Path(cfg.run.runs_dir) / cfg.run.run_id if cfg.run.run_id else None
    resuming = run_dir is not None and run_dir.exists()
    locked = False
    if resuming:
        locked = lock_run(run_dir) is not None  # held for the life of this process: a second `up` cannot slip in
        pid = live_supervisor(run_dir)
        if not locked or pid is not None:  # refused before anything is written: the live run is left as it is
            raise Refused(f"supervisor up: another supervisor ({f'pid {pid}' if pid else 'holding its lock'}) is "
                          f"running {run_dir}; see it with `supervisor status --run-dir {run_dir}`, or stop it with "
                          f"`supervisor stop --run-dir {run_dir}`", EXIT_RUN_BUSY)
    if args.resume_from != "latest" and not (resuming and (run_dir / "checkpoints" / "previous.pt").exists()):
        raise Refused(f"supervisor up: --resume-from {args.resume_from} needs the --run-id of a run with a "
                      f"checkpoint before its latest (checkpoints/previous.pt)", EXIT_USAGE)
    try:
        cfg = resume_config(args, cfg)
    except ConfigError as exc:
        raise Refused(str(exc), EXIT_USAGE) from None
    if cfg.run.engine == "ray":
        problem = fleet_problem(cfg)
        if problem is not None:
            raise Refused(f"supervisor up: {problem}", EXIT_USAGE)
    plan = build_plan(cfg, cfg.run.run_id or "")
    missing = plan.missing_modules()
    if missing:
        raise Refused(f"supervisor up: this install lacks {', '.join(missing)}, which the run's children need; "
                      "install everything with: pip install 'carla-rl-stack[all]' (or `make up`)", EXIT_USAGE)
    problem = metrics_problem(cfg) or wire_problem(cfg, plan)
    if problem is not None:
        raise Refused(f"supervisor up: {problem}", EXIT_USAGE)
    warnings = []
    problem = host_capacity_problem(cfg, plan)
    if problem is not None:
        if not args.oversubscribe:
            raise Refused(f"supervisor up: {problem}; use fewer workers (--workers N), or --oversubscribe to start "
                          "anyway", EXIT_OVERLOAD)
        warnings.append(f"supervisor up: warning: {problem}; starting anyway (--oversubscribe)")
    containers = [s for s in plan.specs if s.kind == "container"]
    if containers:
        from supervisor.drivers import SpawnError
        from supervisor.drivers.container import ContainerDriver, EngineError

        try:
            ContainerDriver(Path("."), "", 1.0, 1.0, cfg.simulators.docker_timeout_s).preflight(
                containers, check_ports=not resuming)
        except (EngineError, SpawnError) as exc:
            raise Refused(f"supervisor up: {exc}", EXIT_USAGE) from None
    if cfg.learner.listen and not cfg.learner.curve_key and plan.runs_learner:
        warnings.append(f"supervisor up: warning: learner.listen {cfg.learner.listen} has no CurveZMQ keys: any user "
                        "of this host can connect to it (learner.curve_key and learner.curve_clients: docs/hosts.md)")
    if py_spy_path() is None:
        warnings.append("supervisor up: warning: py-spy is not installed; incidents will hold no stacks of stalled "
                        "processes (pip install 'carla-rl-stack[supervisor]')")
    return Ready(cfg, run_dir if resuming else None, locked, warnings)


def metrics_problem(cfg) -> str | None:
    """Why the Prometheus endpoint ``supervisor.metrics_port`` asks for cannot be served, with what to do; None when
    it can (or is off)."""
    import importlib.util

    from supervisor.metrics import port_problem

    port, host = cfg.supervisor.metrics_port, cfg.supervisor.metrics_host
    if port is None:
        return None
    if importlib.util.find_spec("prometheus_client") is None:
        return ("supervisor.metrics_port is set, and this install lacks prometheus_client; install it with: pip "
                "install 'carla-rl-stack[supervisor]', or leave supervisor.metrics_port out")
    problem = port_problem(host, port)
    if problem is not None:
        return (f"{problem}; free it, or choose another with --set supervisor.metrics_port=N (or leave it out: no "
                "endpoint)")
    return None


def wire_problem(cfg, plan) -> str | None:
    """Why the wire across hosts cannot be set up as configured (a key file missing, open to others or not a key;
    learner.listen's ports taken), with what to do; None when it can (or is not used). The learner and the
    workers check the same when they start; here it ends `up` before anything is written."""
    from protocol.curve import KeyFileError, allowed_keys, load_public, load_secret, parse_tcp
    from supervisor.metrics import port_problem

    lc, wc = cfg.learner, cfg.workers
    here = plan.runs_learner  # the learner runs on this host (run.role workers: elsewhere, keys and all)
    try:
        if lc.curve_key and here:
            load_secret(Path(lc.curve_key), "learner.curve_key")
            if not allowed_keys(Path(lc.curve_clients), "learner.curve_clients"):
                return (f"learner.curve_clients {lc.curve_clients} holds no public key (*.key): no host could connect; "
                        "copy each worker host's NAME.key there")
        if wc.curve_key:
            load_secret(Path(wc.curve_key), "workers.curve_key")
            load_public(Path(wc.learner_key), "workers.learner_key")
    except KeyFileError as exc:
        return str(exc)
    if lc.listen and here:
        host, port = parse_tcp(lc.listen, "learner.listen")
        for p in (port, port + 1):
            problem = port_problem(host, p, what="learner.listen's port", host_key="learner.listen's host")
            if problem is not None:
                return f"{problem}; free it, or choose another with --set learner.listen=tcp://{host}:N"
    return None


# What one child of each kind takes, for the check that a host can hold a run (measured on the embedded
# default: a worker with highway-env and its numpy policy ~0.13 GiB, with room for a simulator's client; its
# standby spare as much; the learner ~1.5 GiB).
WORKER_MEMORY_BYTES = int(0.2 * 2**30)
LEARNER_MEMORY_BYTES = int(1.5 * 2**30)


def host_capacity_problem(cfg, plan) -> str | None:
    """Why this host cannot run the workers ``plan`` puts on it (cores and memory), or None when it can."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = plan.local_workers
    most = cfg.supervisor.max_workers_per_core * cores
    if workers > most:
        return (f"{workers} workers on {cores} cores: at most {most} fit "
                f"(supervisor.max_workers_per_core {cfg.supervisor.max_workers_per_core:g})")
    per_worker = WORKER_MEMORY_BYTES * (2 if cfg.supervisor.standby_workers else 1)
    learner = LEARNER_MEMORY_BYTES if plan.runs_learner else 0  # or it runs on another host
    need = learner + workers * per_worker
    available = psutil.virtual_memory().available
    if need > available:
        return (f"{workers} workers need about {need / 2**30:.1f} GiB of memory (learner {learner / 2**30:.1f}"
                f", {per_worker / 2**30:.2f} per worker with its standby), {available / 2**30:.1f} GiB is available")
    return None
