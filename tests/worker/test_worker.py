"""Worker pieces: fault injection, frame stacking, action mapping."""

import threading
import time

import gymnasium as gym
import numpy as np
import pytest

from protocol.config import FaultConfig, load_config
from worker.envs import ActionScaler, FrameStack, ReorderActions, frame_of, make_env
from worker.faults import FaultInjector, InjectedCrash

pytestmark = pytest.mark.timeout(30)


class Recorder(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 5.0], np.float32))

    def __init__(self):
        self.actions = []

    def reset(self, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.actions.append(np.asarray(action))
        return np.zeros(1, np.float32), 0.0, False, False, {}


def test_crash_fires_at_the_chosen_step_for_the_chosen_slot_only():
    faults = [FaultConfig(kind="crash", at_step=3, slots=[1])]
    env = FaultInjector(Recorder(), faults, slot=1, incarnation=0, seed=0)
    env.reset()
    for _ in range(3):
        env.step(np.zeros(2))
    with pytest.raises(InjectedCrash, match="env step 3"):
        env.step(np.zeros(2))
    other = FaultInjector(Recorder(), faults, slot=0, incarnation=0, seed=0)
    for _ in range(10):
        other.step(np.zeros(2))


def test_fault_limited_to_an_incarnation_spares_the_replacement():
    faults = [FaultConfig(kind="crash", where="reset", at_step=0, incarnations=[0])]
    with pytest.raises(InjectedCrash):
        FaultInjector(Recorder(), faults, 0, 0, 0).reset()
    FaultInjector(Recorder(), faults, 0, 1, 0).reset()


def test_hang_never_returns():
    env = FaultInjector(Recorder(), [FaultConfig(kind="hang", at_step=0)], 0, 0, 0)
    t = threading.Thread(target=env.step, args=(np.zeros(2),), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()


def test_slow_and_probability():
    env = FaultInjector(Recorder(), [FaultConfig(kind="slow", probability=1.0, slow_s=0.2)], 0, 0, 0)
    t0 = time.monotonic()
    env.step(np.zeros(2))
    assert time.monotonic() - t0 >= 0.2
    never = FaultInjector(Recorder(), [FaultConfig(kind="crash", probability=0.0)], 0, 0, 0)
    for _ in range(100):
        never.step(np.zeros(2))


def test_frame_stack_fills_on_reset_and_rolls():
    fs = FrameStack(3)
    a, b = np.full((1, 2, 2), 1, np.uint8), np.full((1, 2, 2), 2, np.uint8)
    assert fs.reset(a)[:, 0, 0].tolist() == [1, 1, 1]
    assert fs.push(b)[:, 0, 0].tolist() == [1, 1, 2]
    assert frame_of(np.zeros((84, 84), np.uint8)).shape == (1, 84, 84)
    assert frame_of(np.zeros(3, np.float64)).dtype == np.float32


def test_actions_map_to_bounds_and_order():
    inner = Recorder()
    env = ReorderActions(inner, [1, 0])
    assert env.action_space.low.tolist() == [0.0, -1.0] and env.action_space.high.tolist() == [5.0, 1.0]
    scaler = ActionScaler(env.action_space)
    env.step(scaler.to_env(np.array([1.0, -1.0], np.float32)))  # actor: [max of dim 0, min of dim 1]
    assert inner.actions[-1].tolist() == [-1.0, 5.0]


def test_default_env_gives_rendered_grayscale_frames():
    cfg = load_config("configs/default.yaml")
    env = make_env(cfg)
    obs, _ = env.reset(seed=0)
    f = frame_of(obs)
    assert f.shape == (1, 84, 84) and f.dtype == np.uint8 and f.max() > 0
    assert env.action_space.shape == (2,)
    env.close()


def test_unknown_env_id_is_a_clear_error():
    cfg = load_config(None, [("env.id", "NoSuchEnv-v9")])
    with pytest.raises(RuntimeError, match="NoSuchEnv-v9"):
        make_env(cfg)
