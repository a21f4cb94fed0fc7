"""The run configuration: one validated schema shared by supervisor, workers and learner.

Every section forbids unknown keys, so a typo fails at start with a line naming
the key path (``config error: learner.batch_sise: unknown key``), not hours later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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


class FaultConfig(_Section):
    """A fault injected into a worker's environment, for tests and rehearsals."""

    kind: Literal["hang", "crash", "slow"]
    where: Literal["step", "reset"] = "step"
    at_step: int | None = Field(None, ge=0)  # the worker's env step (per incarnation) at which to fire
    probability: float = Field(0.0, ge=0.0, le=1.0)  # per call, when at_step is not set
    slots: list[int] | None = None  # which worker slots; None means all
    incarnations: list[int] | None = None  # which incarnations; None means all
    slow_s: float = Field(1.0, ge=0.0)


class EnvConfig(_Section):
    backend: Literal["gymnasium"] = "gymnasium"
    id: str = "racetrack-v1"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    frame_stack: int = Field(4, ge=1)
    max_episode_steps: int | None = Field(None, gt=0)
    reward_max: float = Field(1.0, gt=0.0)  # largest |reward| per step: Qmax = reward_max / (1 - gamma)
    action_order: list[int] | None = None  # permutation from the actor's action order to the env's

    @model_validator(mode="after")
    def _permutation(self):
        if self.action_order is not None and sorted(self.action_order) != list(range(len(self.action_order))):
            raise ValueError(f"action_order {self.action_order} is not a permutation of 0..n-1")
        return self


class WorkerConfig(_Section):
    count: int = Field(2, ge=0)
    start_steps: int = Field(1000, ge=0)  # uniform random actions before the actor is used
    exploration_noise: float = Field(0.1, ge=0.0)
    batch_steps: int = Field(32, ge=1, le=1024)
    batch_interval_s: float = Field(0.5, gt=0.0)
    eval_freq: int = Field(5000, ge=0)  # env steps between evaluation runs; 0 disables
    eval_episodes: int = Field(3, ge=1)
    torch_threads: int = Field(1, ge=1)
    faults: list[FaultConfig] = Field(default_factory=list)


class LearnerConfig(_Section):
    device: str = "auto"
    encoder: Literal["nature", "drqv2"] = "nature"
    encoder_mode: Literal["shared", "separate"] = "shared"
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
    log_every: int = Field(100, ge=1)  # updates between metric writes
    torch_threads: int = Field(0, ge=0)  # 0: torch's default
    amp: bool = False
    compile: bool = False


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

    @model_validator(mode="after")
    def _layered(self):
        if self.heartbeat_deadline_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_deadline_s must exceed heartbeat_interval_s")
        return self


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
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
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Read, override and validate a config; raises ConfigError with a one-line message."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config error: file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config error in {path}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error in {path}: the top level must be a mapping")
    for dotted, value in overrides or []:
        apply_override(data, dotted, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
