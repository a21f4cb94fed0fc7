"""The learner's TensorBoard metrics: means over each ``log_every`` window, episodes, evaluation."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable


class Metrics:
    """Collects per-update metrics and writes their window means; clip flags become clip fractions."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        # the window's time spent updating (the updates' calls and the reads of their metrics, which wait for the
        # device), and how many updates: perf/updates_per_s is their ratio, wall clock, not launch time
        self._busy_s = 0.0
        self._updates = 0
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._ages: list[float] = []

    def spent(self, seconds: float, updates: int = 0) -> None:
        """Time spent on ``updates`` updates (or, with none, on reading their metrics)."""
        self._busy_s += seconds
        self._updates += updates

    def observe(self, metrics: dict[str, float], sample_age: float) -> None:
        """One update's metrics and the mean age of its batch."""
        for k, v in metrics.items():
            self._sums[k] += v
            self._counts[k] += 1
        self._ages.append(sample_age)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """The window's means and ``scalars`` (buffer, protocol, learning rates, alert counters) at ``step``."""
        w = self.writer
        for tag, total in self._sums.items():
            w.add_scalar(tag.replace("_clipped", "_clip_fraction"), total / max(1, self._counts[tag]), step)
        self._sums.clear()
        self._counts.clear()
        if self._ages:
            w.add_scalar("buffer/sample_age", sum(self._ages) / len(self._ages), step)
            self._ages.clear()
        if self._updates:
            w.add_scalar("perf/updates_per_s", self._updates / max(self._busy_s, 1e-9), step)
        self._busy_s, self._updates = 0.0, 0
        for tag, value in scalars.items():
            w.add_scalar(tag, value, step)

    def episode(self, evaluation: bool, reward: float, length: int, env_steps: int, worker: str,
                updates: int, reason: str | None = None) -> None:
        prefix = "eval" if evaluation else "train"
        self.writer.add_scalar(f"{prefix}/episode_reward", reward, env_steps)
        self.writer.add_scalar(f"{prefix}/episode_length", length, env_steps)
        if evaluation:
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"env_steps": env_steps, "reward": reward, "length": length,
                                    "worker": worker, "updates": updates,
                                    **({"reason": reason} if reason else {})}) + "\n")

    def close(self) -> None:
        self.writer.close()


class MetricsPipe:
    """Each update's metrics kept where they were made (the device) and read every ``read_every`` updates in one
    host read (:class:`learner.td3.HostReads`); then handed on update by update, each with its own update number,
    so alerts fire at the update numbers they would fire at if every update were read at once, only later."""

    def __init__(self, reads, read_every: int, consume: Callable[[int, dict[str, float], float], None],
                 spent: Callable[[float], None] | None = None):
        self.reads = reads
        self.read_every = read_every
        self.consume = consume  # (update number, its metrics, its batch's mean age)
        self.spent = spent  # the read's seconds (it waits for the device)
        self.pending: list[tuple[int, tuple[str, ...], object, float]] = []

    def add(self, updates: int, keys: tuple[str, ...], values, sample_age: float) -> None:
        self.pending.append((updates, keys, values, sample_age))
        if len(self.pending) >= self.read_every:
            self.flush()

    def flush(self) -> None:
        """Read what is pending (one host read) and hand it on."""
        if not self.pending:
            return
        import torch

        t0 = time.perf_counter()
        pending, self.pending = self.pending, []
        flat = self.reads.read(torch.cat([values for _, _, values, _ in pending]))
        if self.spent is not None:
            self.spent(time.perf_counter() - t0)
        at = 0
        for updates, keys, _, age in pending:
            self.consume(updates, dict(zip(keys, flat[at:at + len(keys)])), age)
            at += len(keys)
