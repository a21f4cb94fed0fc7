"""The sampler thread: keeps a couple of batches ready, so an update never waits for the gather."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np


class Sampler:
    def __init__(self, replay, lock: threading.Lock, lcfg, frame_stack: int, rng: np.random.Generator,
                 shift_on_host: bool):
        self.replay = replay
        self.lock = lock
        self.lcfg = lcfg
        self.frame_stack = frame_stack
        self.rng = rng
        self.shift_on_host = shift_on_host  # on a CPU, DrQ's random shift happens here, off the update's path
        self.batches: queue.Queue = queue.Queue(maxsize=2)

    def ready(self) -> bool:
        return self.replay.transitions_total >= max(1, min(self.lcfg.learning_starts, self.lcfg.batch_size))

    def run(self, stopping: Callable[[], bool]) -> None:
        lcfg = self.lcfg
        while not stopping():
            with self.lock:
                batch = self.replay.sample(lcfg.batch_size, self.frame_stack, lcfg.n_step, lcfg.gamma,
                                           self.rng) if self.ready() else None
            if batch is None:
                time.sleep(0.01)
                continue
            if self.shift_on_host:
                batch.shift_on_host(lcfg.augment_pad, self.rng)
            while not stopping():
                try:
                    self.batches.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self, timeout_s: float = 0.1):
        """A ready batch, or None when none came in time."""
        try:
            return self.batches.get(timeout=timeout_s)
        except queue.Empty:
            return None
