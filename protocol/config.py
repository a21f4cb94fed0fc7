"""The run configuration: one validated schema shared by supervisor, workers and learner.

Every section forbids unknown keys, so a typo fails at start with a line naming
the key path (``config error: learner.batch_sise: unknown key``), not hours later.
"""

from __future__ import annotations

import math
import re
import shlex
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.chaos import FAULT_NAMES, FAULTS, SIMULATOR
from protocol.messages import HOST_NAME


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    runs_dir: str = "runs"
    run_id: str | None = None
    max_timesteps: int = Field(100_000, gt=0)
    seed: int = 0
    debug: bool = False
    # all: the learner and this host's slots; workers: only this host's slots (and their simulators), against the
    # learner at workers.learner on another host
    role: Literal["all", "workers"] = "all"
    # local: this host's children only; ray: the learner here and one host agent per Ray node offering
    # cluster.host_resource, each running that host's own supervisor of its slots (docs/fleet.md)
    engine: Literal["local", "ray"] = "local"


class FaultConfig(_Section):
    """A fault injected into a worker's environment, for tests and rehearsals."""

    kind: Literal["hang", "crash", "slow"]
    where: Literal["step", "reset"] = "step"
    at_step: int | None = Field(None, ge=0)  # the worker's env step (per incarnation) at which to fire
    probability: float = Field(0.0, ge=0.0, le=1.0)  # per call, when at_step is not set
    slots: list[int] | None = None  # which worker slots; None means all
    incarnations: list[int] | None = None  # which incarnations; None means all
    slow_s: float = Field(1.0, ge=0.0)


class CameraConfig(_Section):
    """The ego's RGB camera and the frame the worker makes of it."""

    width: int = Field(84, gt=0, le=1024)
    height: int = Field(84, gt=0, le=1024)
    fov: float = Field(90.0, gt=0.0, lt=180.0)
    grayscale: bool = True
    x: float = 1.5  # mount, metres ahead of the vehicle's origin
    z: float = 2.4  # mount height
    pitch: float = -10.0


class RewardConfig(_Section):
    """Per-step reward terms; the sum stays within [-1, 1] (so ``env.reward_max`` 1 holds)."""

    progress: float = Field(0.5, ge=0.0)  # route metres gained, per target-speed metres of one step
    speed: float = Field(0.3, ge=0.0)  # 1 at the target speed, 0 at standstill or twice the target
    centring: float = Field(0.2, ge=0.0)  # 1 on the lane centre, 0 at its edge
    lane_invasion: float = Field(0.2, ge=0.0)  # penalty per step that crosses a lane marking
    collision: float = Field(1.0, ge=0.0)  # penalty; the episode ends (terminal)
    off_route: float = Field(1.0, ge=0.0)  # penalty; the episode ends (terminal)

    @model_validator(mode="after")
    def _bounded(self):
        if self.progress + self.speed + self.centring > 1.0 + 1e-9:
            raise ValueError("progress + speed + centring must not exceed 1 (rewards stay within reward_max)")
        return self


class ScenarioConfig(_Section):
    """A named setting of map, traffic and route, chosen with ``env.carla.scenario`` (or ``--scenario``)."""

    name: str
    map: str | None = None
    npcs: int | None = Field(None, ge=0, le=500)
    route_length_m: float | None = Field(None, gt=0.0)


class CarlaConfig(_Section):
    """The CARLA env of each worker (``env.backend: carla``)."""

    scenarios: list[ScenarioConfig] = Field(default_factory=list)
    scenario: int | str | None = None  # an index or a name in scenarios; its settings override the ones below
    map: str = "Town01"
    fixed_delta_seconds: float = Field(0.05, gt=0.0, le=0.5)
    connect_timeout_s: float = Field(2.0, gt=0.0)  # readiness: short, so a dead server is seen at once
    client_timeout_s: float = Field(10.0, gt=0.0)  # every RPC after that (map loads take long)
    tick_timeout_s: float = Field(5.0, gt=0.0)  # world.tick(seconds); past it the simulator is stalled
    sensor_timeout_s: float = Field(2.0, gt=0.0)  # waiting for a sensor's data of the tick's frame
    vehicle: str = "vehicle.tesla.model3"
    npcs: int = Field(0, ge=0, le=500)
    route_length_m: float = Field(200.0, gt=0.0)
    waypoint_spacing_m: float = Field(2.0, gt=0.0)
    target_speed_kmh: float = Field(30.0, gt=0.0)
    max_off_route_m: float = Field(3.0, gt=0.0)
    stuck_steps: int = Field(100, ge=1)  # truncate after this many steps without moving
    camera: CameraConfig = Field(default_factory=CameraConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    recycle_episodes: int = Field(0, ge=0)  # ask for a fresh simulator after this many episodes; 0: never

    @model_validator(mode="after")
    def _scenario(self):
        if self.scenario is None:
            return self
        names = [s.name for s in self.scenarios]
        if isinstance(self.scenario, int):
            if not 0 <= self.scenario < len(self.scenarios):
                raise ValueError(f"scenario {self.scenario} is not an index of the {len(names)} scenarios {names}")
            chosen = self.scenarios[self.scenario]
        elif self.scenario in names:
            chosen = self.scenarios[names.index(self.scenario)]
        else:
            raise ValueError(f"scenario {self.scenario!r} is not one of {names}")
        for key in ("map", "npcs", "route_length_m"):
            value = getattr(chosen, key)
            if value is not None:
                self.__dict__[key] = value  # already validated by the scenario's own field
        return self


class EnvConfig(_Section):
    backend: Literal["gymnasium", "carla"] = "gymnasium"
    id: str = "racetrack-v1"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    frame_stack: int = Field(4, ge=1)
    max_episode_steps: int | None = Field(None, gt=0)
    reward_max: float = Field(1.0, gt=0.0)  # largest |reward| per step: Qmax = reward_max / (1 - gamma)
    action_order: list[int] | None = None  # permutation from the actor's action order to the env's
    # The largest single frame a worker may send (bytes): the learner's steps socket takes no bigger message.
    max_frame_bytes: int = Field(256 * 1024, ge=64, le=64 * 1024 * 1024)
    carla: CarlaConfig = Field(default_factory=CarlaConfig)

    @model_validator(mode="after")
    def _permutation(self):
        if self.action_order is not None and sorted(self.action_order) != list(range(len(self.action_order))):
            raise ValueError(f"action_order {self.action_order} is not a permutation of 0..n-1")
        if self.backend == "carla":
            cam = self.carla.camera
            frame = cam.width * cam.height * (1 if cam.grayscale else 3)
            if frame > self.max_frame_bytes:
                raise ValueError(f"carla.camera makes {frame}-byte frames, above max_frame_bytes "
                                 f"{self.max_frame_bytes}; raise env.max_frame_bytes")
        return self


def _check_wire(key: str, endpoint: str | None, first: tuple[str, str | None], second: tuple[str, str | None],
                what: str) -> None:
    """A tcp endpoint off loopback needs both of its CurveZMQ settings; either one needs the other."""
    from protocol.curve import is_loopback, parse_tcp

    if endpoint is not None:
        parse_tcp(endpoint, key)
        if not is_loopback(endpoint) and not (first[1] and second[1]):
            raise ValueError(f"{key} {endpoint} is off loopback: it needs {first[0]} and {second[0]} (CurveZMQ; "
                             "write a pair with `supervisor keys NAME`)")
    if bool(first[1]) != bool(second[1]):
        raise ValueError(f"{first[0]} and {second[0]} go together ({what})")


class WorkerConfig(_Section):
    count: int = Field(2, ge=0)
    start_steps: int = Field(1000, ge=0)  # uniform random actions before the actor is used
    exploration_noise: float = Field(0.1, ge=0.0)
    batch_steps: int = Field(32, ge=1, le=1024)
    batch_interval_s: float = Field(0.5, gt=0.0)
    eval_freq: int = Field(5000, ge=0)  # env steps between evaluation runs; 0 disables
    eval_episodes: int = Field(3, ge=1)
    torch_threads: int = Field(1, ge=1)  # threads of the worker's policy (numpy's BLAS; the key's name is older)
    faults: list[FaultConfig] = Field(default_factory=list)
    # a learner on another host, tcp://HOST:PORT (its learner.listen); null: this run's own learner, over ipc
    learner: str | None = None
    curve_key: str | None = None  # this host's secret key file (NAME.key_secret from `supervisor keys`)
    learner_key: str | None = None  # the learner's public key file (its NAME.key)
    # a learner elsewhere not heard from for this long is given up on: the worker ends with the reason (0: wait
    # for it however long; its restart is survived well within this)
    learner_absent_s: float = Field(600.0, ge=0.0)
    # what this host's workers are called at a learner elsewhere (HOST:worker-N); null: the machine's hostname
    host: str | None = Field(None, pattern=f"^{HOST_NAME}$")

    @model_validator(mode="after")
    def _remote_learner(self):
        _check_wire("workers.learner", self.learner, ("workers.curve_key", self.curve_key),
                    ("workers.learner_key", self.learner_key), "this host's pair and the learner's public key")
        return self


class LearnerConfig(_Section):
    device: str = "auto"
    encoder: Literal["nature", "drqv2"] = "nature"
    encoder_mode: Literal["shared", "separate"] = "shared"
    target_encoder: Literal["polyak", "online"] = "polyak"  # next_obs for the TD target: see learner/td3.py
    # between an image encoder and each head: Linear+LayerNorm+tanh, or Linear+ReLU (unbounded; see policy/network.py)
    trunk: Literal["layernorm_tanh", "plain"] = "layernorm_tanh"
    # separate mode: the critic judges the actor's action on the critic's features (ours), or on the actor CNN's
    # own features (the users' diverged design: the actor CNN can move its features to where the critic
    # extrapolates, and -actor_loss runs away from Q)
    actor_loss_features: Literal["critic", "actor"] = "critic"
    feature_dim: int = Field(50, gt=0)
    hidden_dim: int = Field(256, gt=0)
    batch_size: int = Field(256, gt=0)
    gamma: float = Field(0.99, gt=0.0, lt=1.0)
    tau: float = Field(0.005, gt=0.0, le=1.0)
    n_step: int = Field(3, ge=1)  # n-step returns, built at sample time
    actor_lr: float = Field(1e-4, gt=0.0)
    critic_lr: float = Field(1e-4, gt=0.0)
    actor_cnn_lr: float = Field(1e-5, gt=0.0)
    policy_delay: int = Field(2, ge=1)
    target_noise: float = Field(0.2, ge=0.0)
    target_noise_clip: float = Field(0.5, ge=0.0)
    max_grad_norm_actor: float = Field(1.0, gt=0.0)
    max_grad_norm_critic: float = Field(10.0, gt=0.0)
    augment_pad: int = Field(4, ge=0)
    replay_capacity: int = Field(100_000, gt=0)
    learning_starts: int = Field(1000, ge=0)
    updates_per_step: float = Field(1.0, gt=0.0)  # the update-to-data ratio the rate limiter enforces
    rate_limit_slack: int = Field(1000, ge=0)  # env steps workers may run ahead of the ratio
    publish_every: int = Field(100, ge=1)  # updates between weight broadcasts
    checkpoint_every: int = Field(5000, ge=1)  # updates between checkpoints
    # and at the first weight broadcast this long after the last checkpoint: a killed learner redoes at most
    # about this much work (a checkpoint costs ~0.2% of the time of 50 CPU updates: bench/checkpoint.py); 0: off
    checkpoint_every_s: float = Field(30.0, ge=0.0)
    log_every: int = Field(100, ge=1)  # updates between metric writes
    # updates whose metrics are read from the device together (one wait for the device per this many updates;
    # alerts fire at the same update numbers, up to this many updates later)
    metrics_read_every: int = Field(10, ge=1)
    # where an update's frame stacks are gathered: "device", from a copy of the replay's frames in device memory
    # (only the slots cross to it: learner/frames.py); "host", by the sampler thread from the memory map (the
    # frames cross each update); "auto": device on a GPU, host on a CPU (where a copy would only double the RAM)
    frames: Literal["auto", "device", "host"] = "auto"
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    amp: bool = False
    compile: bool = False
    # on a GPU, each update captured once as a CUDA graph and replayed (one launch instead of hundreds; its
    # frames must be on the device: learner.frames), several per call of the update loop
    cuda_graph: bool = True
    updates_per_call: int = Field(8, ge=1)  # the rate limiter, publishing and checkpoints are checked per call
    # also bind tcp://HOST:PORT (steps; weights on PORT+1) for workers on other hosts; off loopback it needs
    # CurveZMQ: the learner's key pair and a directory of the public keys of the hosts allowed in
    listen: str | None = None
    curve_key: str | None = None  # the learner's secret key file (NAME.key_secret from `supervisor keys`)
    curve_clients: str | None = None  # the directory of allowed hosts' public keys (their NAME.key files)

    @model_validator(mode="after")
    def _actor_features(self):
        if self.actor_loss_features == "actor" and self.encoder_mode != "separate":
            raise ValueError("actor_loss_features: actor needs encoder_mode: separate (an actor CNN of its own)")
        return self

    @model_validator(mode="after")
    def _listen(self):
        _check_wire("learner.listen", self.listen, ("learner.curve_key", self.curve_key),
                    ("learner.curve_clients", self.curve_clients),
                    "the learner's pair and the directory of the public keys it lets in")
        return self


class SupervisorConfig(_Section):
    heartbeat_interval_s: float = Field(0.5, gt=0.0)
    heartbeat_deadline_s: float = Field(5.0, gt=0.0)
    progress_deadline_s: float = Field(10.0, gt=0.0)
    startup_deadline_s: float = Field(60.0, gt=0.0)
    learner_deadline_s: float = Field(60.0, gt=0.0)  # an update can be slow on CPU; no progress check below this
    kill_grace_s: float = Field(2.0, ge=0.0)
    learner_stop_grace_s: float = Field(15.0, ge=0.0)  # an orderly stop lets the learner write its checkpoint
    evidence_timeout_s: float = Field(3.0, gt=0.0)
    backoff_initial_s: float = Field(0.2, ge=0.0)
    backoff_max_s: float = Field(30.0, ge=0.0)
    backoff_jitter: float = Field(0.2, ge=0.0, le=1.0)
    healthy_reset_s: float = Field(60.0, gt=0.0)  # a child running this long gets its backoff reset
    max_restarts: int = Field(5, ge=0)  # intensity: at most this many restarts ...
    restart_window_s: float = Field(60.0, gt=0.0)  # ... within this many seconds
    standby_workers: bool = True  # keep a pre-imported process per slot: respawns skip Python's start-up
    max_workers_per_core: float = Field(3.0, gt=0.0)  # `up` refuses more workers than this per CPU core
    disk_warn_gb: float = Field(2.0, ge=0.0)  # `status` warns when the runs volume has less free than this
    child_nice: int = Field(5, ge=0, le=19)  # children run this much nicer than the supervisor: it never starves
    # the Prometheus endpoint (docs/metrics.md#prometheus-endpoint): off unless a port is given
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = Field("127.0.0.1", min_length=1)  # the address it binds: this host only unless changed

    @model_validator(mode="after")
    def _layered(self):
        if self.heartbeat_deadline_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_deadline_s must exceed heartbeat_interval_s")
        return self


class SimulatorsConfig(_Section):
    """Where the CARLA servers of a ``carla`` run come from: containers per slot, servers the user runs, or the
    sibling containers of a Kubernetes pod (``pod``: the kubelet restarts them; deploy/README.md)."""

    mode: Literal["container", "external", "pod"] = "container"
    image: str = "carlasim/carla:0.9.16"
    # {rpc_port}, {streaming_port}, {secondary_port} and {slot} are filled in per slot
    command: str = "./CarlaUE4.sh -RenderOffScreen -nosound -quality-level=Low -carla-rpc-port={rpc_port}"
    extra_args: list[str] = Field(default_factory=list)
    pull: bool = False  # pull a missing image; off: a missing image is an error naming it
    host: str = "127.0.0.1"  # where the containers' servers answer (host networking)
    base_port: int = Field(2000, ge=1024, le=65000)
    port_stride: int = Field(10, ge=3)  # slot i: RPC base + i*stride, streaming +1, secondary +2
    tm_base_port: int = Field(8000, ge=1024, le=65000)  # Traffic Manager of slot i: tm_base_port + i
    gpus: list[str] = Field(default_factory=list)  # GPU ids given to slots round-robin; empty: no GPU request
    # each container's memory, swap included ("24g", "512m"; Docker's units): a leaking server is OOM-killed on its
    # own (and named so) instead of taking the host down; none: no limit
    memory_limit: str | None = Field(None, pattern=r"^[1-9][0-9]*[bkmg]$")

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, value):
        if value is not None:
            scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[value[-1]]
            if int(value[:-1]) * scale < 6 * 2**20:
                raise ValueError(f"{value} is below Docker's smallest memory limit (6m)")
        return value
    ready_timeout_s: float = Field(120.0, gt=0.0)  # from start to the first answered request (map loading)
    probe_interval_s: float = Field(1.0, gt=0.0)
    probe_timeout_s: float = Field(2.0, gt=0.0)
    liveness_deadline_s: float = Field(10.0, gt=0.0)  # no answered request for this long: stalled
    kill_grace_s: float = Field(5.0, ge=0.0)
    recycle_hours: float = Field(0.0, ge=0.0)  # restart a slot's simulator after this long; 0: never
    docker_timeout_s: float = Field(30.0, gt=0.0)  # every call to the Docker engine
    external: list[str] = Field(default_factory=list)  # "host:port" of servers the user runs, one per slot

    @model_validator(mode="after")
    def _checked(self):
        for entry in self.external:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"external entry {entry!r} is not host:port")
        if self.liveness_deadline_s <= self.probe_interval_s:
            raise ValueError("liveness_deadline_s must exceed probe_interval_s")
        try:
            keys = {name for _, name, _, _ in string.Formatter().parse(self.command) if name is not None}
            shlex.split(self.command)
        except ValueError as exc:
            raise ValueError(f"command {self.command!r}: {exc}") from None
        unknown = keys - {"rpc_port", "streaming_port", "secondary_port", "slot"}
        if unknown:
            raise ValueError(f"command: unknown placeholder(s) {sorted(unknown)}; "
                             "use {rpc_port}, {streaming_port}, {secondary_port}, {slot}")
        return self


ChaosFault = Literal[FAULT_NAMES]  # type: ignore[valid-type]


class ChaosConfig(_Section):
    """Faults injected on a schedule while the run goes on (``supervisor chaos`` injects one on command)."""

    every_s: float | None = Field(None, gt=0.0)  # one fault this often; None: no schedule (the default)
    faults: list[ChaosFault] | None = None  # drawn from at random; None: every fault the run can take
    seed: int | None = None  # the draws' seed; None: run.seed
    start_after_s: float = Field(30.0, ge=0.0)  # the first fault, this long after every child first ran
    stop_after_s: float | None = Field(None, gt=0.0)  # no new fault after this long (counted as start_after_s)
    slow_s: float = Field(1.0, gt=0.0)  # `slow`: each env step sleeps this long ...
    slow_duration_s: float = Field(10.0, gt=0.0)  # ... for this long
    settle_s: float = Field(2.0, gt=0.0)  # `garbage`: how long after it the run is checked to be untouched

    @model_validator(mode="after")
    def _some_faults(self):
        if self.faults is not None and not self.faults:
            raise ValueError("faults: an empty list; leave it out for every fault the run can take")
        return self


class ReportConfig(_Section):
    """What ``supervisor report`` expects of a run; the defaults come from the run's own config."""

    q_max: float | None = Field(None, gt=0.0)  # the bound of any honest |Q|; None: env.reward_max / (1 - gamma)
    window_updates: int = Field(5000, ge=10)  # the divergence analysis looks at this many last updates
    growth_warn: float = Field(3.0, gt=1.0)  # |actor loss| or |Q| growing this much over the window, exponentially
    growth_diverging: float = Field(10.0, gt=1.0)  # ... and this much: diverging
    fit_r2: float = Field(0.9, gt=0.0, le=1.0)  # an exponential fit counts only if it explains this much
    # (-actor_loss - Q) / (|Q| + 1): the actor finds actions its critic overrates (it exploits extrapolation)
    actor_q_gap_warn: float = Field(2.0, gt=0.0)
    actor_q_gap_diverging: float = Field(10.0, gt=0.0)
    clip_active_warn: float = Field(0.5, gt=0.0, le=1.0)  # clipping acting in more updates than this: a warning
    twin_ratio: float = Field(0.5, gt=0.0)  # |q1 - q2| above this times (|Q| + 1): a warning
    critic_loss_growth_warn: float = Field(10.0, gt=1.0)  # the critic loss growing this much over the window
    eval_return_target: float | None = None  # the evaluation return a good run reaches (None: only its trend)
    min_updates_per_s: float | None = Field(None, ge=0.0)
    min_steps_per_s: float | None = Field(None, ge=0.0)
    # no new metrics nor heartbeat progress for this long: frozen (None: twice the largest supervisor deadline)
    frozen_after_s: float | None = Field(None, gt=0.0)
    plot_points: int = Field(2000, ge=10)  # points per line in the plots (longer series are thinned)

    @model_validator(mode="after")
    def _ordered(self):
        if self.growth_diverging < self.growth_warn:
            raise ValueError("growth_diverging must be at least growth_warn")
        if self.actor_q_gap_diverging < self.actor_q_gap_warn:
            raise ValueError("actor_q_gap_diverging must be at least actor_q_gap_warn")
        return self


class ClusterConfig(_Section):
    """The fleet on Ray (``run.engine: ray``): where the cluster is and how its hosts are judged."""

    address: str | None = None  # Ray's address (ray://..., HOST:PORT, auto); None: RAY_ADDRESS, else auto
    namespace: str = Field("rlstack", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    hosts: int | None = Field(None, ge=1, le=256)  # None: one per unit of host_resource in the cluster at start
    host_resource: str = "carla_host"
    learner_resource: str = "learner_host"
    # what the hosts dial: tcp://HOST:PORT; None: learner.listen, its wildcard address replaced by this node's
    learner_address: str | None = None
    host_runs_dir: str | None = None  # each host's run directory goes under this (None: the head's runs_dir)
    # each host's own secret key (NAME.key_secret), the same path on every host (absolute: a host's supervisor runs
    # in host_runs_dir); needed where the learner has CurveZMQ keys; never read on the head, never sent through Ray
    host_key: str | None = None
    probe_interval_s: float = Field(1.0, gt=0.0)
    probe_timeout_s: float = Field(5.0, gt=0.0)
    host_deadline_s: float = Field(20.0, gt=0.0)  # no status answered by a host's supervisor for this long: hung
    host_startup_s: float = Field(180.0, gt=0.0)  # from placing an agent to its supervisor's first answer
    # a host whose children all run but whose steps the learner has not had for this long, while it has had other
    # hosts', stops counting as progressing (host_deadline_s later it is hung); None: supervisor.heartbeat_deadline_s
    # + progress_deadline_s (the host's own supervisor catches a hung worker first); 0: off
    learner_silence_s: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _probe_fits(self):
        if self.probe_timeout_s + self.probe_interval_s >= self.host_deadline_s:
            raise ValueError(f"cluster.host_deadline_s ({self.host_deadline_s:g}) must exceed probe_timeout_s + "
                             f"probe_interval_s ({self.probe_timeout_s + self.probe_interval_s:g}): one slow answer "
                             "is not a hung host")
        return self


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    simulators: SimulatorsConfig = Field(default_factory=SimulatorsConfig)
    chaos: ChaosConfig = Field(default_factory=ChaosConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    def has_containers(self) -> bool:
        """Whether the supervisor runs a simulator container per slot."""
        return self.env.backend == "carla" and self.simulators.mode == "container" and self.workers.count > 0

    def worker_host(self) -> str | None:
        """What this host's workers are called at a learner elsewhere: ``workers.host``, else the name of its key
        (``keys/host-b.key_secret``: host-b, the name the learner knows the key by), else the hostname; None when
        they send to this run's own learner."""
        if self.workers.learner is None:
            return None
        if self.workers.host:
            return self.workers.host
        if self.workers.curve_key:
            from protocol.curve import key_name

            return key_name(self.workers.curve_key)
        import socket

        return socket.gethostname().split(".")[0] or "host"

    @model_validator(mode="after")
    def _workers_role(self):
        if self.run.role == "workers" and self.workers.learner is None:
            raise ValueError("run.role workers runs only this host's slots: it needs workers.learner, the learner's "
                             "tcp://HOST:PORT (supervisor up --role workers --learner tcp://HOST:PORT)")
        host = self.worker_host()
        if host is not None and not re.fullmatch(HOST_NAME, host):
            raise ValueError(f"this host's workers would be called {host!r}:worker-N at the learner; a host name is "
                             "letters, digits, '_', '.' and '-' (set workers.host, or name the key file so)")
        if self.run.role == "all" and self.workers.learner not in (None, self.learner.listen):
            raise ValueError(f"workers.learner {self.workers.learner} is another learner than this run's own "
                             f"(learner.listen {self.learner.listen}): its learner would get no steps; run only this "
                             "host's slots with --role workers (run.role: workers)")
        return self

    @model_validator(mode="after")
    def _ray_engine(self):
        if self.run.engine != "ray":
            return self
        if self.run.role != "all":
            raise ValueError("run.engine ray runs the learner and places the hosts' supervisors: run.role all "
                             "(a host's own supervisor is started by its agent)")
        if not self.learner.listen or not self.learner.listen.startswith("tcp://"):
            raise ValueError("run.engine ray needs learner.listen, tcp://ADDRESS:PORT, for the hosts' workers to "
                             "reach the learner (docs/fleet.md)")
        if bool(self.learner.curve_key) != bool(self.cluster.host_key):
            raise ValueError("learner.curve_key and cluster.host_key go together: with CurveZMQ each host connects "
                             "with its own key, at cluster.host_key on that host (docs/fleet.md)")
        return self

    @model_validator(mode="after")
    def _chaos_fits(self):
        ch, s = self.chaos, self.supervisor
        if ch.every_s is not None and "slow" in (ch.faults or ("slow",)) and ch.slow_s * 2 > s.progress_deadline_s:
            raise ValueError(f"chaos.slow_s ({ch.slow_s:g}) must be at most half of supervisor.progress_deadline_s "
                             f"({s.progress_deadline_s:g}): a slow step must stay a progressing one")
        docker = [f for f in ch.faults or () if FAULTS[f].target == SIMULATOR]
        if docker and not self.has_containers():
            raise ValueError(f"chaos.faults: {', '.join(docker)}: only for runs with simulator containers "
                             f"(env.backend carla, simulators.mode container), and this one has none")
        return self

    @model_validator(mode="after")
    def _layered_carla_deadlines(self):
        if self.env.backend != "carla":
            return self
        c, s = self.env.carla, self.supervisor
        if s.progress_deadline_s <= c.tick_timeout_s + c.sensor_timeout_s:
            raise ValueError(f"supervisor.progress_deadline_s ({s.progress_deadline_s:g}) must exceed "
                             f"env.carla.tick_timeout_s + sensor_timeout_s ({c.tick_timeout_s + c.sensor_timeout_s:g}):"
                             f" the worker's own timeouts fire first")
        if s.heartbeat_deadline_s <= c.client_timeout_s:
            raise ValueError(f"supervisor.heartbeat_deadline_s ({s.heartbeat_deadline_s:g}) must exceed "
                             f"env.carla.client_timeout_s ({c.client_timeout_s:g}): get_world() and load_world() "
                             f"hold the worker's heartbeat thread while they wait")
        return self

    @model_validator(mode="after")
    def _simulator_ports(self):
        if self.env.backend != "carla" or self.simulators.mode not in ("container", "pod"):
            return self
        sims, used = self.simulators, {}
        for slot in range(self.workers.count):
            rpc = sims.base_port + slot * sims.port_stride
            for what, port in ((f"slot {slot} rpc", rpc), (f"slot {slot} streaming", rpc + 1),
                               (f"slot {slot} secondary", rpc + 2), (f"slot {slot} traffic manager",
                                                                     sims.tm_base_port + slot)):
                if port > 65535:
                    raise ValueError(f"simulators: {what} port {port} is past 65535; lower base_port, port_stride "
                                     f"or tm_base_port, or use fewer workers")
                if port in used:
                    raise ValueError(f"simulators: {what} port {port} is also {used[port]}'s; move tm_base_port or "
                                     f"base_port apart")
                used[port] = what
        return self

    @model_validator(mode="after")
    def _enough_simulators(self):
        if self.env.backend == "carla" and self.simulators.mode == "external" \
                and len(self.simulators.external) < self.workers.count:
            raise ValueError(f"simulators.external lists {len(self.simulators.external)} servers for "
                             f"{self.workers.count} workers; give one host:port per worker")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def q_max(reward_max: float, gamma: float) -> float:
    """The largest |Q| an honest estimate can reach: reward_max / (1 - gamma)."""
    return reward_max / (1.0 - gamma) if gamma < 1 else math.inf


# Multiples of Qmax that readers of Q compare against, spelled once: the learner's alerts, the run report's
# verdict and table, and the divergence benchmark.
Q_HIGH_MULTIPLE = 1.5  # |Q| or -actor_loss above this many Qmax: the learner's q_high warning
Q_DIVERGED_MULTIPLE = 10.0  # ... above this many: diverged (the critical q_divergence alert, the report's blow-up)


# What a run's model and replay were built for: a resume may not change them.
RESUME_FIXED = ("env.backend", "env.id", "env.kwargs", "env.frame_stack", "env.action_order", "env.carla.camera",
                "learner.encoder", "learner.encoder_mode", "learner.trunk", "learner.feature_dim", "learner.hidden_dim",
                "learner.replay_capacity")


def resume_conflicts(saved: Config, new: Config) -> list[str]:
    """``key=saved value (now new value)`` for each setting of RESUME_FIXED that differs."""
    out = []
    old_d, new_d = saved.to_dict(), new.to_dict()
    for dotted in RESUME_FIXED:
        a, b = old_d, new_d
        for key in dotted.split("."):
            a, b = a.get(key), b.get(key)
        if a != b:
            out.append(f"{dotted}={a!r:.60} (asked: {b!r:.60})")
    return out


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif err["type"] == "value_error":  # a cross-field check: its message says it all
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{path}: {err['msg']} (got {err.get('input')!r:.60})")
    return f"config error in {source}: " + "; ".join(lines)


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalar rules, so 3 is an int, 1e-4 a float, true a bool."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_override(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"config error: override {dotted!r} is not a dotted key path")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):  # a list item by its index, e.g. env.carla.scenarios.0.npcs
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"config error: {dotted}: {key} is not an index of a list of {len(node)}")
            node = node[int(key)]
            continue
        child = node.setdefault(key, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"config error: {dotted}: {key} is not a section")
        node = child
    if isinstance(node, list):
        if not keys[-1].isdigit() or int(keys[-1]) >= len(node):
            raise ConfigError(f"config error: {dotted}: {keys[-1]} is not an index of a list of {len(node)}")
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping; ``extends: OTHER.yaml`` (relative to it) is read first and overlaid."""
    if not path.is_file():
        raise ConfigError(f"config error: file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config error in {path}: extends itself (through {' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config error in {path}: not valid YAML{where}") from None
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config error in {path}: extends: expected a file name")
    return deep_merge(read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Read, override and validate a config; raises ConfigError with a one-line message."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml(Path(path))
    for dotted, value in overrides or []:
        apply_override(data, dotted, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
