"""The learner's TensorBoard metrics: means over each ``log_every`` window, episodes, evaluation."""

from __future__ import annotations

import json
from collections import Counter, deque
from pathlib import Path


class Metrics:
    """Collects per-update metrics and writes their window means; clip flags become clip fractions."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.update_times: deque[float] = deque(maxlen=200)
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._ages: list[float] = []

    def observe(self, metrics: dict[str, float], seconds: float, sample_age: float) -> None:
        """One update's metrics, its duration and the mean age of its batch."""
        self.update_times.append(seconds)
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
        w.add_scalar("perf/updates_per_s", len(self.update_times) / max(sum(self.update_times), 1e-9), step)
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
