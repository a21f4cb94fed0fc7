"""Environment backends of an env-worker, and the worker's own frame stacking."""

from __future__ import annotations

import os
from collections import deque

import gymnasium as gym
import numpy as np

from protocol.config import Config


def make_env(cfg: Config, slot: int = 0, incarnation: int = 0, seed: int = 0):
    """The env of a worker slot: CARLA (``env.backend: carla``) or a gymnasium id (highway-env's registered)."""
    if cfg.env.backend == "carla":
        from worker.carla_env import CarlaEnv  # the only place carla is imported

        return CarlaEnv(cfg, slot, incarnation, seed)
    # highway-env renders camera frames with pygame off-screen; its "dummy" video
    # driver switches rendering off entirely, so ask SDL for its off-screen driver.
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    if ":" not in cfg.env.id and cfg.env.id not in gym.registry:  # ("module:id": gym.make imports the module)
        try:
            import highway_env  # noqa: F401  (registers highway-v0, racetrack-v1, ...: 0.6 s, only when needed)
        except ImportError:
            pass
    kwargs = _tuples_for_shapes(dict(cfg.env.kwargs))
    if cfg.env.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.env.max_episode_steps
    try:
        env = gym.make(cfg.env.id, **kwargs)
    except gym.error.Error as exc:
        raise RuntimeError(f"env.id {cfg.env.id!r} cannot be made: {exc}") from None
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise RuntimeError(f"env {cfg.env.id!r} has action space {space}; a 1-d continuous Box is needed")
    if cfg.env.action_order is not None:
        if len(cfg.env.action_order) != space.shape[0]:
            raise RuntimeError(f"env.action_order has {len(cfg.env.action_order)} entries; "
                               f"{cfg.env.id} has {space.shape[0]} action dimensions")
        env = ReorderActions(env, cfg.env.action_order)
    return env


class ReorderActions(gym.ActionWrapper):
    """The actor's action i drives the env's action ``order[i]``."""

    def __init__(self, env, order):
        super().__init__(env)
        self.order = np.asarray(order)
        self._inverse = np.argsort(self.order)
        self.action_space = gym.spaces.Box(env.action_space.low[self.order], env.action_space.high[self.order],
                                           dtype=env.action_space.dtype)

    def action(self, action):
        return np.asarray(action)[self._inverse]


def _tuples_for_shapes(node):
    """YAML has no tuples; environments (highway-env among them) want ``*_shape`` values as tuples."""
    if isinstance(node, dict):
        return {k: tuple(v) if k.endswith("_shape") and isinstance(v, list) else _tuples_for_shapes(v)
                for k, v in node.items()}
    return node


def frame_of(obs: np.ndarray) -> np.ndarray:
    """The single frame a worker stores: uint8 images as (C, H, W), anything else as float32."""
    obs = np.asarray(obs)
    if obs.dtype == np.uint8:
        return obs if obs.ndim == 3 else obs.reshape((1,) + obs.shape) if obs.ndim == 2 else obs
    return obs.astype(np.float32).reshape(-1)


class FrameStack:
    """The last ``k`` frames concatenated along axis 0; a reset fills the stack with its frame."""

    def __init__(self, k: int):
        self.k = k
        self.frames: deque[np.ndarray] = deque(maxlen=k)

    def reset(self, frame: np.ndarray) -> np.ndarray:
        self.frames.clear()
        for _ in range(self.k):
            self.frames.append(frame)
        return self.stack()

    def push(self, frame: np.ndarray) -> np.ndarray:
        self.frames.append(frame)
        return self.stack()

    def stack(self) -> np.ndarray:
        return np.concatenate(list(self.frames), axis=0)


class ActionScaler:
    """Maps actions in [-1, 1] (what the actor outputs) to the env's Box bounds."""

    def __init__(self, space):
        self.low = space.low.astype(np.float32)
        self.high = space.high.astype(np.float32)
        self.dim = int(space.shape[0])

    def to_env(self, action: np.ndarray) -> np.ndarray:
        return self.low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)
