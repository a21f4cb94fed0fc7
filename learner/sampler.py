"""The sampler thread: keeps a couple of batches ready, so an update never waits for the gather.

A failure to sample (too few live transitions, a damaged replay) never ends the
thread: it is logged at a limited rate and retried with a growing pause, and the
learner's heartbeat says why no batch comes (``failing``), so a learner stalled
for it shows the reason in ``supervisor status``.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Callable

import numpy as np

# Pauses between failed attempts grow from the first to the last, doubling.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0
LOG_EVERY_S = 10.0


class Sampler:
    def __init__(self, replay, lock: threading.Lock, lcfg, frame_stack: int, rng: np.random.Generator,
                 shift_on_host: bool, log=None, draws: bool = False):
        """``draws``: hand over :class:`learner.replay.Draw` (slots, gathered on the device by the update) instead
        of batches of frames gathered here; the totals of the draws not yet taken are kept (:meth:`safe_total`)."""
        self.replay = replay
        self.lock = lock
        self.lcfg = lcfg
        self.frame_stack = frame_stack
        self.rng = rng
        self.shift_on_host = shift_on_host  # on a CPU, DrQ's random shift happens here, off the update's path
        # frames gathered here are megabytes a batch: two ready; draws are kilobytes: a call's worth of updates
        self.batches: queue.Queue = queue.Queue(maxsize=lcfg.updates_per_call + 1 if draws else 2)
        self.draws = draws
        self.outstanding: collections.deque = collections.deque()  # the totals of draws made and not yet taken
        self.log = log
        self.failing: str | None = None  # the last error while sampling fails; None while it works
        self.failing_since: float | None = None
        self._last_log = -1e9

    def ready(self) -> bool:
        """Sampling starts with learning: once ``learning_starts`` transitions are stored."""
        return self.replay.transitions_total >= max(1, self.lcfg.learning_starts)

    def run(self, stopping: Callable[[], bool]) -> None:
        lcfg = self.lcfg
        pause = RETRY_FIRST_S
        while not stopping():
            try:
                with self.lock:
                    batch = None
                    if self.ready():
                        sample = self.replay.draw if self.draws else self.replay.sample
                        batch = sample(lcfg.batch_size, self.frame_stack, lcfg.n_step, lcfg.gamma, self.rng)
                        if self.draws:
                            self.outstanding.append(batch.total)
            except Exception as exc:  # never die silently: say why, wait, try again
                self.note_failure(exc)
                time.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)
                continue
            pause = RETRY_FIRST_S
            self.failing = self.failing_since = None
            if batch is None:
                time.sleep(0.01)
                continue
            if self.shift_on_host and not self.draws:
                batch.shift_on_host(lcfg.augment_pad, self.rng)
            while not stopping():
                try:
                    self.batches.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def note_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        self.failing = f"sampling fails for {now - self.failing_since:.0f}s: {type(exc).__name__}: {exc}"[:300]
        if self.log is not None and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self.log.error("sampling failed; retrying", error=repr(exc)[:500])

    def next(self, timeout_s: float = 0.1):
        """A ready batch, or None when none came in time (``timeout_s`` 0: none ready now)."""
        try:
            batch = self.batches.get(timeout=timeout_s) if timeout_s > 0 else self.batches.get_nowait()
        except queue.Empty:
            return None
        if self.draws:
            self.outstanding.popleft()
        return batch

    def safe_total(self) -> int:
        """Writes before this serial may reach the device's copy of the frames without overwriting a slot that a
        draw not yet taken names (call under the replay's lock, so no draw is being made meanwhile)."""
        return self.outstanding[0] if self.outstanding else self.replay.total
