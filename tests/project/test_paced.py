"""The test stacks' Pendulum at a simulator's pace (harness/paced.py): Pendulum's own episodes, no faster than
its pace."""

import time

import gymnasium as gym
import numpy as np
import pytest

from harness.paced import ENV_ID

pytestmark = pytest.mark.timeout(30)


def test_paced_pendulum_is_pendulum_at_its_pace():
    paced, plain = gym.make(ENV_ID, step_s=0.002), gym.make("Pendulum-v1")
    a, _ = paced.reset(seed=3)
    b, _ = plain.reset(seed=3)
    assert np.array_equal(a, b)
    rng = np.random.default_rng(0)
    t0, steps, done = time.monotonic(), 0, False
    while not done:
        action = rng.uniform(-2, 2, 1).astype(np.float32)
        a, ra, ta, tra, _ = paced.step(action)
        b, rb, tb, trb, _ = plain.step(action)
        assert np.array_equal(a, b) and ra == rb and (ta, tra) == (tb, trb)
        steps, done = steps + 1, ta or tra
    assert steps == 200, "Pendulum's time limit"
    assert time.monotonic() - t0 >= 199 * 0.002
