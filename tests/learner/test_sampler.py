"""The sampler thread: it starts with learning, and a failure to sample is said, retried, never silent."""

import threading
import time

import numpy as np
import pytest

from learner.sampler import RETRY_FIRST_S, RETRY_MAX_S, Sampler
from protocol.config import LearnerConfig

pytestmark = pytest.mark.timeout(30)


class FlakyReplay:
    """A replay whose sampling fails until told otherwise."""

    def __init__(self, transitions):
        self.transitions_total = transitions
        self.broken = True
        self.calls = 0

    def sample(self, batch_size, k, n_step, gamma, rng):
        self.calls += 1
        if self.broken:
            raise RuntimeError("replay has too few transitions to sample from")
        return "a batch"


class Log:
    def __init__(self):
        self.errors = []

    def error(self, event, **kw):
        self.errors.append((event, kw))


def sampler(replay, log=None, learning_starts=100):
    return Sampler(replay, threading.Lock(), LearnerConfig(learning_starts=learning_starts, batch_size=256), 1,
                   np.random.default_rng(0), shift_on_host=False, log=log)


def test_sampling_starts_with_learning_not_with_a_batch_worth_of_steps():
    replay = FlakyReplay(300)
    assert not sampler(replay, learning_starts=1000).ready()
    replay.transitions_total = 1000
    assert sampler(replay, learning_starts=1000).ready()


def test_a_failing_sampler_says_why_retries_with_backoff_and_recovers():
    replay, log = FlakyReplay(500), Log()
    s = sampler(replay, log)
    stop = threading.Event()
    thread = threading.Thread(target=s.run, args=(stop.is_set,), daemon=True)
    started = time.monotonic()  # before the thread's first call: on a loaded machine it comes before the next line
    thread.start()
    try:
        deadline = started + 10
        while replay.calls < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        took = time.monotonic() - started
        assert replay.calls >= 4 and thread.is_alive(), "the thread survives the failure and tries again"
        # three pauses, each twice the last, lie between the first call and the fourth: no busy loop
        assert took >= RETRY_FIRST_S * (1 + 2 + 4), took
        assert s.failing and "too few transitions" in s.failing and s.failing.startswith("sampling fails for")
        assert len(log.errors) == 1, "logged at a limited rate"
        replay.broken = False
        # its pause may have grown meanwhile (to RETRY_MAX_S): on a loaded machine the next attempt comes later
        assert s.next(timeout_s=RETRY_MAX_S + 10.0) == "a batch"
        assert s.failing is None
    finally:
        stop.set()
        thread.join(5)
