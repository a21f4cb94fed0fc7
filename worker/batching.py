"""Steps waiting to be sent: an entry is an episode start (its frame only) or a transition."""

from __future__ import annotations

import time

import numpy as np


class StepBatch:
    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.first, self.frames, self.actions, self.rewards, self.terminated, self.truncated = [], [], [], [], [], []
        self.opened_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.first)

    def add(self, frame, action, reward=0.0, terminated=False, truncated=False, first=False) -> None:
        if not self.first:
            self.opened_at = time.monotonic()
        self.first.append(first)
        self.frames.append(frame)
        self.actions.append(action)
        self.rewards.append(reward)
        self.terminated.append(terminated)
        self.truncated.append(truncated)

    def transitions(self) -> int:
        return len(self.first) - sum(self.first)

    def due(self, max_steps: int, max_age_s: float) -> bool:
        """Full, or open long enough: send it."""
        return len(self) >= max_steps or time.monotonic() - self.opened_at >= max_age_s

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "first": np.asarray(self.first, np.uint8),
            "frames": np.stack(self.frames),
            "actions": np.asarray(self.actions, np.float32),
            "rewards": np.asarray(self.rewards, np.float32),
            "terminated": np.asarray(self.terminated, np.uint8),
            "truncated": np.asarray(self.truncated, np.uint8),
        }
