"""Divergence alerts computed from each update's metrics.

Qmax = reward_max / (1 - gamma) bounds any honest Q estimate. A *warning* fires
when mean Q or -actor_loss passes 1.5 Qmax, or when a pre-clip gradient norm is
more than 10x its clip threshold; a *critical* alert fires at 10 Qmax or on any
non-finite metric. The counters keep the established tag names
``alerts/gradient_explosion_warning`` and ``alerts/gradient_explosion_critical``.
"""

from __future__ import annotations

import math
from collections import deque

# Alerts repeat at most this often per rule, so a diverged run does not flood the log.
REPEAT_EVERY_UPDATES = 1000


class AlertMonitor:
    def __init__(self, q_max: float, lcfg):
        self.q_max = q_max
        self.lcfg = lcfg
        self.warnings = 0
        self.criticals = 0
        self._last_fired: dict[str, int] = {}
        self._recent: deque[str] = deque(maxlen=5)

    def counters(self) -> dict[str, int]:
        return {"alerts/gradient_explosion_warning": self.warnings,
                "alerts/gradient_explosion_critical": self.criticals}

    def recent(self) -> list[str]:
        return list(self._recent)

    def observe(self, updates: int, m: dict[str, float]) -> list[dict]:
        fired = []

        def fire(level: str, rule: str, value: float, limit: float) -> None:
            if updates - self._last_fired.get(rule, -10**12) < REPEAT_EVERY_UPDATES:
                return
            self._last_fired[rule] = updates
            if level == "critical":
                self.criticals += 1
            else:
                self.warnings += 1
            self._recent.append(f"{level}:{rule}@{updates}")
            fired.append({"level": level, "rule": rule, "value": value, "limit": limit, "updates": updates})

        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            fire("critical", "non_finite", float("nan"), 0.0)
        q = max(abs(m.get("train/q1_value", 0.0)), abs(m.get("train/q2_value", 0.0)))
        neg_actor = -m.get("train/actor_loss", 0.0)
        worst = max(q, neg_actor)
        if math.isfinite(worst):
            if worst > 10 * self.q_max:
                fire("critical", "q_divergence", worst, 10 * self.q_max)
            elif worst > 1.5 * self.q_max:
                fire("warning", "q_high", worst, 1.5 * self.q_max)
        for tag, limit in (("gradients/critic_norm_before_clip", self.lcfg.max_grad_norm_critic),
                           ("gradients/actor_norm_before_clip", self.lcfg.max_grad_norm_actor)):
            v = m.get(tag)
            if v is not None and math.isfinite(v) and v > 10 * limit:
                fire("warning", tag.split("/")[1].replace("_before_clip", "_explosion"), v, 10 * limit)
        return fired
