"""The worker's side of chaos: a request file and a signal, fired at its next step, its own only."""

import signal
import time

import pytest


@pytest.mark.timeout(30)
def test_worker_fires_a_requested_fault_at_its_next_step_and_only_its_own(tmp_path):
    import os

    import gymnasium as gym
    import numpy as np

    from protocol.chaos import REQUEST_SIGNAL, request_path, write_request
    from worker import faults
    from worker.faults import FaultInjector, InjectedCrash

    class Recorder(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

        def __init__(self):
            self.actions = []

        def step(self, action):
            self.actions.append(action)
            return np.zeros(1, np.float32), 0.0, False, False, {}

    env = FaultInjector(Recorder(), [], slot=0, incarnation=0, seed=0, requests=(tmp_path, "worker-0"))
    old = signal.signal(REQUEST_SIGNAL, faults.on_request_signal)
    try:
        write_request(tmp_path, "worker-0", os.getpid() + 1, "crash")  # another incarnation's: ignored
        os.kill(os.getpid(), REQUEST_SIGNAL)
        env.step([0.0, 1.0])
        assert not request_path(tmp_path, "worker-0").exists(), "read and removed"
        write_request(tmp_path, "worker-0", os.getpid(), "crash", fault_id=3)
        env.step([0.0, 1.0])  # no signal yet: the file alone does nothing
        os.kill(os.getpid(), REQUEST_SIGNAL)
        with pytest.raises(InjectedCrash):
            env.step([0.0, 1.0])
        write_request(tmp_path, "worker-0", os.getpid(), "slow", slow_s=0.1, duration_s=0.35)
        os.kill(os.getpid(), REQUEST_SIGNAL)
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            env.step([0.0, 1.0])
        took = time.monotonic() - started
        steps = len(env.env.actions)
        assert 0.3 <= took < 0.6 and steps <= 8, "each step slept slow_s"
        time.sleep(0.1)
        for _ in range(100):
            env.step([0.0, 1.0])  # over: full speed again
        assert time.monotonic() - started < 1.0
    finally:
        signal.signal(REQUEST_SIGNAL, old)
