"""Fault injection inside an environment's step() and reset(), switched on from the config.

Faults rehearse what CARLA does to a run: ``hang`` blocks forever (as a
``world.tick()`` that never returns), ``crash`` raises (the worker exits non-zero),
``slow`` sleeps (a loaded server). Each fires at a chosen env step of the worker's
incarnation, or with a probability per call; or on request (``supervisor chaos``):
the supervisor leaves a request file and sends SIGUSR1, whose handler
(:func:`on_request_signal`) only sets a flag, and the next ``step()`` reads the
request and fires it (``slow`` on request lasts ``duration_s``).
"""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np

from protocol.chaos import take_request
from protocol.config import FaultConfig

# Set by the SIGUSR1 handler, read by the next step(): a chaos request waits in the run directory.
_requested = [False]


def on_request_signal(signum, frame) -> None:
    _requested[0] = True


class InjectedCrash(RuntimeError):
    pass


class FaultInjector(gym.Wrapper):
    """Wraps an env; fires the faults that apply to this slot and incarnation."""

    def __init__(self, env: gym.Env, faults: list[FaultConfig], slot: int, incarnation: int, seed: int, log=None,
                 requests: tuple | None = None):
        super().__init__(env)
        self.requests = requests  # (run_dir, name): where on-request faults wait for this worker
        self.slow_until = 0.0
        self.slow_s = 0.0
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

    def _fire(self, fault: FaultConfig, logged: bool = False) -> None:
        if self.log is not None and not logged:
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

    def _requested_fault(self) -> None:
        if _requested[0] and self.requests is not None:
            _requested[0] = False
            request = take_request(*self.requests)
            if request is None:
                return
            kind = request["fault"]
            if self.log is not None:
                self.log.warning("fault injected", kind=kind, where="step", env_step=self.steps, source="chaos",
                                 **{k: v for k, v in request.items() if k not in ("fault", "pid", "kind")})
            if kind == "slow":
                self.slow_s = float(request.get("slow_s", 1.0))
                self.slow_until = time.monotonic() + float(request.get("duration_s", 10.0))
            else:
                self._fire(FaultConfig(kind=kind), logged=True)
        if self.slow_until and time.monotonic() < self.slow_until:
            time.sleep(self.slow_s)
        elif self.slow_until:
            self.slow_until = 0.0
            if self.log is not None:
                self.log.info("slow fault over", env_step=self.steps)

    def step(self, action):
        self._requested_fault()
        self._maybe_fire("step")
        self.steps += 1
        return self.env.step(action)
