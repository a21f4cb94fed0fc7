"""Fault injection inside an environment's step() and reset(), switched on from the config.

Faults rehearse what CARLA does to a run: ``hang`` blocks forever (as a
``world.tick()`` that never returns), ``crash`` raises (the worker exits non-zero),
``slow`` sleeps (a loaded server). Each fires at a chosen env step of the worker's
incarnation, or with a probability per call.
"""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np

from protocol.config import FaultConfig


class InjectedCrash(RuntimeError):
    pass


class FaultInjector(gym.Wrapper):
    """Wraps an env; fires the faults that apply to this slot and incarnation."""

    def __init__(self, env: gym.Env, faults: list[FaultConfig], slot: int, incarnation: int, seed: int, log=None):
        super().__init__(env)
        self.faults = [f for f in faults
                       if (f.slots is None or slot in f.slots)
                       and (f.incarnations is None or incarnation in f.incarnations)]
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.log = log

    def _maybe_fire(self, where: str) -> None:
        for fault in self.faults:
            if fault.where != where:
                continue
            if fault.at_step is not None:
                fire = self.steps == fault.at_step
            else:
                fire = fault.probability > 0 and self.rng.random() < fault.probability
            if fire:
                self._fire(fault)

    def _fire(self, fault: FaultConfig) -> None:
        if self.log is not None:
            self.log.warning("fault injected", kind=fault.kind, where=fault.where, env_step=self.steps)
        if fault.kind == "hang":
            threading.Event().wait()  # never set: a call that never returns
        elif fault.kind == "crash":
            raise InjectedCrash(f"injected crash in {fault.where}() at env step {self.steps}")
        elif fault.kind == "slow":
            time.sleep(fault.slow_s)

    def reset(self, **kwargs):
        self._maybe_fire("reset")
        return self.env.reset(**kwargs)

    def step(self, action):
        self._maybe_fire("step")
        self.steps += 1
        return self.env.step(action)
