"""Pendulum at a simulator's pace, for stacks started by tests.

A real simulator steps at a few dozen frames per second; Pendulum steps in microseconds, so a test stack's
workers step as fast as the learner's allowance lets them and keep its learner busy all the time, which is
CPU the suite's other tests need. ``harness.paced:PacedPendulum-v1`` (a gymnasium id with its module, which
``gym.make`` imports) is Pendulum-v1 whose steps each end no sooner than ``step_s`` after the one before.
"""

from __future__ import annotations

import time

import gymnasium as gym
from gymnasium.envs.registration import register

ENV_ID = "harness.paced:PacedPendulum-v1"


class Paced(gym.Wrapper):
    """Steps at most every ``step_s`` seconds (a fixed rate, like a simulator's tick)."""

    def __init__(self, env: gym.Env, step_s: float):
        super().__init__(env)
        self.step_s = step_s
        self.next_at = 0.0

    def step(self, action):
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.step_s
        return self.env.step(action)


def make(step_s: float = 0.01, **kwargs) -> gym.Env:
    return Paced(gym.make("Pendulum-v1", **kwargs).unwrapped, step_s)


register("PacedPendulum-v1", entry_point=make, max_episode_steps=200)
