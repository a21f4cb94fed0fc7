"""Divergence alerts computed from each update's metrics.

Qmax = reward_max / (1 - gamma) bounds any honest Q estimate. Rules:

- warning ``q_high``: mean Q or -actor_loss above 1.5 Qmax;
- warning ``<group>_norm_growth``: a pre-clip gradient norm 10x the median of the
  last 1,000 updates and above its clip threshold, once past the first 5,000
  updates (while the critic first learns, the actor's gradient grows from near
  zero by far more than 10x in any healthy run);
- warning ``twin_disagreement``: |q1 - q2| large relative to |Q|;
- warning ``action_saturation``: more than 80% of the actor's actions at |a| > 0.99, on average over
  the last 100 updates (one small batch saturating is noise, not a trend);
- critical ``q_divergence``: mean Q or -actor_loss above 10 Qmax;
- critical ``non_finite``: any metric NaN or infinite.

``alerts/gradient_explosion_warning`` and ``alerts/gradient_explosion_critical``
count warnings and critical alerts, as they always have; each rule also has its
own counter ``alerts/<rule>``.
"""

from __future__ import annotations

import math
from collections import Counter, deque

from protocol.config import Q_DIVERGED_MULTIPLE, Q_HIGH_MULTIPLE

# An alert repeats at most this often per rule, so a diverged run does not flood the log.
REPEAT_EVERY_UPDATES = 1000
GROWTH_WINDOW = 1000
GROWTH_FACTOR = 10.0
GROWTH_ARMED_AFTER = 5000
# A norm is recorded every this many updates for the growth rule (100 points per window).
GROWTH_STRIDE = 10
# Before this many recorded points the growth rule has no baseline yet.
GROWTH_MIN_POINTS = 50
TWIN_RATIO = 0.5
SATURATION = 0.8
SATURATION_WINDOW = 100


class AlertMonitor:
    def __init__(self, q_max: float, lcfg):
        self.q_max = q_max
        self.clip = {"critic": lcfg.max_grad_norm_critic, "actor": lcfg.max_grad_norm_actor}
        self.warnings = 0
        self.criticals = 0
        self.non_finite = 0
        self.by_rule: Counter[str] = Counter()
        self._last_fired: dict[str, int] = {}
        self._recent: deque[str] = deque(maxlen=5)
        self._norms: dict[str, deque[tuple[int, float]]] = {}
        self._saturation: deque[float] = deque(maxlen=SATURATION_WINDOW)

    def counters(self) -> dict[str, int]:
        out = {"alerts/gradient_explosion_warning": self.warnings,
               "alerts/gradient_explosion_critical": self.criticals, "alerts/non_finite_updates": self.non_finite}
        out.update({f"alerts/{rule}": n for rule, n in self.by_rule.items()})
        return out

    def recent(self) -> list[str]:
        return list(self._recent)

    def observe(self, updates: int, m: dict[str, float]) -> list[dict]:
        """Check one update's metrics; returns the alerts that fire now."""
        fired: list[dict] = []

        def fire(level: str, rule: str, value: float, limit: float) -> None:
            if updates - self._last_fired.get(rule, -10**12) < REPEAT_EVERY_UPDATES:
                return
            self._last_fired[rule] = updates
            self.by_rule[rule] += 1
            if level == "critical":
                self.criticals += 1
            else:
                self.warnings += 1
            self._recent.append(f"{level}:{rule}@{updates}")
            fired.append({"level": level, "rule": rule, "value": value, "limit": limit, "updates": updates})

        bad = sorted(k for k, v in m.items() if not math.isfinite(v))
        if bad:
            self.non_finite += 1
            fire("critical", "non_finite", float("nan"), 0.0)
        q = max(abs(m.get("train/q1_value", 0.0)), abs(m.get("train/q2_value", 0.0)))
        worst = max(q, -m.get("train/actor_loss", 0.0))
        if math.isfinite(worst):
            if worst > Q_DIVERGED_MULTIPLE * self.q_max:
                fire("critical", "q_divergence", worst, Q_DIVERGED_MULTIPLE * self.q_max)
            elif worst > Q_HIGH_MULTIPLE * self.q_max:
                fire("warning", "q_high", worst, Q_HIGH_MULTIPLE * self.q_max)
        diff = m.get("train/q_abs_diff")
        if diff is not None and math.isfinite(diff) and math.isfinite(q) and diff > TWIN_RATIO * (q + 1.0):
            fire("warning", "twin_disagreement", diff, TWIN_RATIO * (q + 1.0))
        sat = m.get("train/action_saturation")
        if sat is not None and math.isfinite(sat):
            self._saturation.append(sat)
            mean = sum(self._saturation) / len(self._saturation)
            if len(self._saturation) == SATURATION_WINDOW and mean > SATURATION:
                fire("warning", "action_saturation", mean, SATURATION)
        for group in ("critic", "actor"):
            norm = m.get(f"gradients/{group}_norm_before_clip")
            if norm is None or not math.isfinite(norm):
                continue
            window = self._norms.setdefault(group, deque())
            while window and updates - window[0][0] > GROWTH_WINDOW:
                window.popleft()
            if updates >= GROWTH_ARMED_AFTER and len(window) >= GROWTH_MIN_POINTS:
                typical = sorted(v for _, v in window)[len(window) // 2]
                if typical > 1e-8 and norm > GROWTH_FACTOR * typical and norm > self.clip[group]:
                    fire("warning", f"{group}_norm_growth", norm, GROWTH_FACTOR * typical)
            if not window or updates - window[-1][0] >= GROWTH_STRIDE:
                window.append((updates, norm))
        return fired
