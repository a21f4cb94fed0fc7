"""The update-to-data ratio, on both sides of the wire.

The learner enforces ``updates_per_step`` by publishing an *allowance*: the env
steps the run may have collected given the updates done so far. Workers hold
(phase ``waiting_learner``) when their steps would pass it. The learner side is
:class:`UpdateToData`; the worker side is :class:`Allowance`. Both are plain
arithmetic, tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateToData:
    """The learner's side: updates the data pays for, and steps the updates allow."""

    updates_per_step: float
    learning_starts: int
    slack: int  # env steps workers may run ahead of the ratio, so they never idle on a busy learner

    @classmethod
    def from_config(cls, learner_cfg) -> "UpdateToData":
        return cls(learner_cfg.updates_per_step, learner_cfg.learning_starts, learner_cfg.rate_limit_slack)

    def allowed_steps(self, updates: int) -> int:
        """Env steps the run may have collected after ``updates`` updates."""
        return int(self.learning_starts + updates / self.updates_per_step + self.slack)

    def ratio(self, updates: int, collected: int) -> float:
        """The update-to-data ratio the limiter enforces: updates per step collected since learning started."""
        return updates / max(1, collected - self.learning_starts)

    def updates_due(self, collected: int) -> int:
        """Updates that ``collected`` env steps pay for (none before ``learning_starts``)."""
        if collected < max(self.learning_starts, 1):
            return 0
        return int((collected - self.learning_starts) * self.updates_per_step) + 1


class Allowance:
    """A worker's side: what the learner last said, and whether one more step fits in its allowance.

    The learner counts what it has stored of each stream; a worker adds what it has
    sent or batched since, so the run's total is never under-estimated.
    """

    def __init__(self, stream: str):
        self.stream = stream
        self.heard = False  # until the learner speaks, nobody limits us
        self.received = 0  # the run's env steps the learner has stored
        self.allowed = 0  # the learner's allowance
        self.seen_mine = 0  # of ours, what the learner has stored
        self.sent = 0  # transitions we sent

    def hear(self, received: int, allowed: int, streams: dict) -> None:
        """Take in one progress message from the learner."""
        self.heard = True
        self.received = int(received)
        self.allowed = int(allowed)
        self.seen_mine = int(streams.get(self.stream, 0))

    def run_steps(self, pending: int = 0) -> int:
        """The run's env steps as far as we know: the learner's count plus ours in flight and ``pending``."""
        return self.received + max(0, self.sent + pending - self.seen_mine)

    def may_step(self, pending: int = 0) -> bool:
        return not self.heard or self.run_steps(pending) < self.allowed
