"""The divergence verdict of a run, and the numbers behind it: trends, fits and onsets (numpy only).

Everything here takes plain arrays (update steps and values) so it is tested on
series made up for the purpose; :mod:`runreport.report` feeds it a run's scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from protocol.config import Q_DIVERGED_MULTIPLE  # |Q| beyond this many Qmax is a blow-up (as for the learner)

HEALTHY, WARNING, DIVERGING = "healthy", "warning", "diverging"


def finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def describe(values: np.ndarray) -> dict | None:
    """final, mean, min, max of the finite values (final: the last finite one); None when there is none."""
    v = finite(np.asarray(values, dtype=float))
    if not len(v):
        return None
    return {"final": float(v[-1]), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
            "points": int(len(values)), "non_finite": int(len(values) - len(v))}


def last_window(steps: np.ndarray, values: np.ndarray, updates: int) -> tuple[np.ndarray, np.ndarray]:
    """The points of the last ``updates`` updates (all of them when the series is shorter)."""
    if not len(steps):
        return steps, values
    keep = steps >= steps[-1] - updates
    return steps[keep], values[keep]


def ends(values: np.ndarray, share: float = 0.1) -> tuple[float, float]:
    """Medians of the first and the last ``share`` of the points: a trend's start and end, robust to noise."""
    v = np.asarray(values, dtype=float)
    k = max(1, int(round(len(v) * share)))
    return float(np.median(v[:k])), float(np.median(v[-k:]))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot <= 0:
        return 0.0
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


@dataclass
class Growth:
    """How a series grew over a window: factor, per-update multiplier, and which fit explains it."""

    start_update: int
    end_update: int
    start: float  # median of the first 10% of the window's points
    end: float  # ... and of the last 10%
    factor: float | None  # |end| / |start|
    per_update: float | None  # factor ** (1 / updates)
    r2_linear: float
    r2_exponential: float | None  # None when the series changes sign or touches 0 (no exponential fits it)
    shape: str  # exponential, linear, flat or noisy
    slope: float  # the linear fit's slope, per update
    rate: float | None  # the exponential fit's log-slope, per update

    def text(self) -> str:
        if self.factor is None:
            return f"from {self.start:.4g} to {self.end:.4g} over updates {self.start_update}-{self.end_update}"
        return (f"x{self.factor:.3g} over updates {self.start_update}-{self.end_update} "
                f"(x{self.per_update:.5f} per update); {self.shape}"
                f" (R2 linear {self.r2_linear:.2f}, exponential "
                f"{'n/a' if self.r2_exponential is None else f'{self.r2_exponential:.2f}'})")


def growth(steps: np.ndarray, values: np.ndarray, fit_r2: float = 0.9) -> Growth | None:
    """Fit a line and an exponential to the window; None with fewer than 5 finite points."""
    ok = np.isfinite(values)
    t, y = np.asarray(steps, dtype=float)[ok], np.asarray(values, dtype=float)[ok]
    if len(t) < 5 or t[-1] <= t[0]:
        return None
    start, end = ends(y)
    factor = abs(end) / abs(start) if start != 0 else None
    span = t[-1] - t[0]
    per_update = float(factor ** (1.0 / span)) if factor is not None and factor > 0 else None
    slope, icpt = np.polyfit(t, y, 1)
    r2_lin = _r2(y, slope * t + icpt)
    r2_exp = rate = None
    same_sign = bool(np.all(y > 0) or np.all(y < 0))
    if same_sign:
        sign = 1.0 if y[0] > 0 else -1.0
        rate, lc = np.polyfit(t, np.log(np.abs(y)), 1)
        r2_exp = _r2(y, sign * np.exp(lc + rate * t))
        rate = float(rate)
    if factor is not None and 1 / 1.5 < factor < 1.5 and abs(slope) * span <= 0.5 * max(abs(start), abs(end), 1e-12):
        shape = "flat"
    elif r2_exp is not None and r2_exp >= fit_r2 and r2_exp >= r2_lin:
        shape = "exponential"
    elif r2_lin >= fit_r2:
        shape = "linear"
    elif r2_exp is not None and r2_exp >= fit_r2:
        shape = "exponential"
    else:
        shape = "noisy"
    return Growth(int(t[0]), int(t[-1]), start, end, factor, per_update, float(r2_lin), r2_exp, shape,
                  float(slope), rate)


def growth_onset(steps: np.ndarray, values: np.ndarray) -> int | None:
    """The update where |values| began to grow: the best split into a flat stretch, then a log-linear rise.

    Fits log|y| with a constant before a split and a line after it, for every split
    (prefix sums make each O(1)), and returns the step at the best split whose rise
    has a positive slope; None when no split beats a single line by a clear margin.
    """
    ok = np.isfinite(values) & (np.asarray(values) != 0)
    t = np.asarray(steps, dtype=float)[ok]
    y = np.log(np.abs(np.asarray(values, dtype=float)[ok]))
    n = len(t)
    if n < 8:
        return None
    c1, cy, cyy = np.cumsum(np.ones(n)), np.cumsum(y), np.cumsum(y * y)
    ct, ctt, cty = np.cumsum(t), np.cumsum(t * t), np.cumsum(t * y)

    def seg(a: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:  # sum over [i, j)
        return a[j - 1] - np.where(i > 0, a[np.maximum(i - 1, 0)], 0.0)

    k = np.arange(3, n - 3)  # the rise starts at index k
    zero = np.zeros_like(k)
    end = np.full_like(k, n)
    # before: a constant
    m0, s0, q0 = seg(c1, zero, k), seg(cy, zero, k), seg(cyy, zero, k)
    sse_before = q0 - s0 * s0 / m0
    # after: a line
    m1 = seg(c1, k, end)
    st, stt, sy, syy, sty = seg(ct, k, end), seg(ctt, k, end), seg(cy, k, end), seg(cyy, k, end), seg(cty, k, end)
    var_t = stt - st * st / m1
    cov = sty - st * sy / m1
    slope = np.where(var_t > 0, cov / np.where(var_t > 0, var_t, 1), 0.0)
    sse_after = (syy - sy * sy / m1) - slope * cov
    sse = sse_before + sse_after
    sse = np.where(slope > 0, sse, np.inf)
    if not np.isfinite(sse).any():
        return None
    best = int(np.argmin(sse))
    # against one line over everything: the split must explain clearly more
    a, b = np.polyfit(t, y, 1)
    sse_line = float(np.sum((y - (a * t + b)) ** 2))
    if sse[best] > 0.7 * sse_line:
        return None
    return int(t[k[best]])


def first_bad(steps: np.ndarray, bad: np.ndarray) -> tuple[int, bool] | None:
    """Where a condition first went wrong: the start of the stretch it ends the series in (persistent), or else
    its first point (a passing blip); None when it never held."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return None
    if bad[-1]:
        good = np.nonzero(~bad)[0]
        start = int(good[-1]) + 1 if len(good) else 0
        return int(steps[start]), True
    return int(steps[int(np.argmax(bad))]), False


@dataclass
class Finding:
    level: str  # warning or diverging
    rule: str
    text: str
    since: int | None = None  # the update it began at


@dataclass
class Verdict:
    verdict: str
    findings: list[Finding] = field(default_factory=list)
    first_wrong: int | None = None
    growth: dict[str, Growth | None] = field(default_factory=dict)
    gap: dict | None = None
    clipping: dict[str, dict] = field(default_factory=dict)
    first_alert: dict | None = None
    blowup: int | None = None
    alert_lead: int | None = None
    q_max: float = math.inf


def align(a_steps, a_vals, b_steps, b_vals) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps two series share, with each one's values there."""
    common, ia, ib = np.intersect1d(a_steps, b_steps, assume_unique=False, return_indices=True)
    return common, np.asarray(a_vals)[ia], np.asarray(b_vals)[ib]


def judge(series: dict[str, tuple[np.ndarray, np.ndarray]], q_max: float, clip: dict[str, float], rc,
          alerts: list[dict] | None = None) -> Verdict:
    """The divergence verdict from a run's series (tag -> (steps, values)), Qmax, clip thresholds per group
    (``critic``, ``actor``) and the report config ``rc``; ``alerts``: [{update, level, rule}] in order."""
    v = Verdict(HEALTHY, q_max=q_max)
    find = v.findings.append
    actor = series.get("train/actor_loss")
    q1, q2 = series.get("train/q1_value"), series.get("train/q2_value")
    q = None
    if q1 is not None and q2 is not None:
        common, a, b = align(q1[0], q1[1], q2[0], q2[1])
        q = (common, (a + b) / 2)
    elif q1 is not None:
        q = q1

    # non-finite values
    for tag in ("train/actor_loss", "train/q1_value", "train/q2_value", "train/critic_loss"):
        s = series.get(tag)
        if s is not None and len(s[1]) and not np.all(np.isfinite(s[1])):
            at = int(s[0][np.argmax(~np.isfinite(s[1]))])
            find(Finding(DIVERGING, "non_finite", f"{tag} is NaN or infinite from update {at}", at))
            v.blowup = at if v.blowup is None else min(v.blowup, at)

    # growth over the last window, and where it began
    for name, s in (("actor_loss", actor), ("q", q)):
        if s is None or len(s[0]) < 5:
            v.growth[name] = None
            continue
        w = last_window(s[0], s[1], rc.window_updates)
        g = growth(*w, fit_r2=rc.fit_r2)
        v.growth[name] = g
        if g is None or g.factor is None or g.shape != "exponential" or g.rate is None or g.rate <= 0:
            continue
        label = "actor loss" if name == "actor_loss" else "Q"
        if g.factor >= rc.growth_warn:
            level = DIVERGING if g.factor >= rc.growth_diverging else WARNING
            since = growth_onset(*s)
            find(Finding(level, f"{name}_exponential", f"|{label}| grows exponentially: {g.text()}"
                         + (f"; the rise began near update {since}" if since is not None else ""), since))

    # beyond Qmax
    if math.isfinite(q_max):
        for name, s, sign in (("q", q, 1.0), ("actor_loss", actor, -1.0)):
            if s is None or not len(s[0]):
                continue
            mag = np.abs(s[1]) if name == "q" else sign * s[1]
            over = np.nan_to_num(mag, nan=np.inf) > q_max
            hit = first_bad(s[0], over)
            label = "|Q|" if name == "q" else "-actor_loss"
            if hit is not None and hit[1]:
                final = float(finite(mag)[-1]) if len(finite(mag)) else math.inf
                g = v.growth.get(name)
                rising = g is not None and g.factor is not None and g.factor > 1.5 and g.slope * np.sign(g.end) > 0
                level = DIVERGING if final > Q_DIVERGED_MULTIPLE * q_max or rising else WARNING
                find(Finding(level, f"{name}_above_qmax", f"{label} is {final:.4g}, above Qmax {q_max:.4g} "
                             f"(no honest estimate exceeds it) since update {hit[0]}"
                             + ("; still rising" if rising else ""), hit[0]))
            blow = np.nonzero(np.nan_to_num(mag, nan=np.inf) > Q_DIVERGED_MULTIPLE * q_max)[0]
            if len(blow):
                at = int(s[0][blow[0]])
                v.blowup = at if v.blowup is None else min(v.blowup, at)

    # -actor_loss against Q: the actor exploiting the critic's extrapolation
    if actor is not None and q is not None:
        common, a, qq = align(actor[0], actor[1], q[0], q[1])
        if len(common):
            gap = (-a - qq) / (np.abs(qq) + 1.0)
            fin = np.isfinite(gap)
            if fin.any():
                tail = last_window(common[fin], gap[fin], rc.window_updates)[1]
                final_gap = float(np.median(tail[-max(1, len(tail) // 10):]))
                v.gap = {"final_ratio": final_gap, "actor": float(-a[fin][-1]), "q": float(qq[fin][-1]),
                         "max_ratio": float(gap[fin].max())}
                for level, limit in ((DIVERGING, rc.actor_q_gap_diverging), (WARNING, rc.actor_q_gap_warn)):
                    if final_gap > limit:
                        hit = first_bad(common[fin], gap[fin] > rc.actor_q_gap_warn)
                        find(Finding(level, "actor_exploits_critic",
                                     f"-actor_loss ({-a[fin][-1]:.4g}) is far above Q ({qq[fin][-1]:.4g}): "
                                     f"(-actor_loss - Q)/(|Q|+1) = {final_gap:.3g} > {limit:g}; the actor finds "
                                     "actions its critic overrates (extrapolation), which Q alone does not show",
                                     hit[0] if hit else None))
                        break

    # clipping: pre-clip norms against thresholds
    for group, threshold in clip.items():
        s = series.get(f"gradients/{group}_norm_before_clip")
        frac = series.get(f"gradients/{group}_clip_fraction")
        if s is None or not len(s[0]):
            continue
        w = last_window(s[0], s[1], rc.window_updates)
        fv = finite(w[1])
        above = float(np.mean(fv > threshold)) if len(fv) else 0.0
        active = None
        if frac is not None and len(frac[0]):
            fw = finite(last_window(frac[0], frac[1], rc.window_updates)[1])
            active = float(fw.mean()) if len(fw) else None
        share = active if active is not None else above
        info = {"threshold": threshold, "median": float(np.median(fv)) if len(fv) else None,
                "max": float(fv.max()) if len(fv) else None, "share_logged_above": above, "clip_active": active}
        v.clipping[group] = info
        if share > rc.clip_active_warn:
            hit = first_bad(s[0], np.nan_to_num(s[1], nan=np.inf) > threshold)
            find(Finding(WARNING, f"{group}_clipping_active",
                         f"{group} gradients clipped in {share:.0%} of updates (pre-clip median "
                         f"{info['median']:.3g}, max {info['max']:.3g}, threshold {threshold:g}): the threshold, "
                         "not the loss, sets the step size; clipping hides the growth, it does not make it healthy",
                         hit[0] if hit else None))

    # twin critics
    diff = series.get("train/q_abs_diff")
    if diff is not None and q is not None:
        common, d, qq = align(diff[0], diff[1], q[0], q[1])
        if len(common):
            ratio = d / (np.abs(qq) + 1.0)
            tail = finite(last_window(common, ratio, rc.window_updates)[1])
            if len(tail) and np.median(tail) > rc.twin_ratio:
                hit = first_bad(common, ratio > rc.twin_ratio)
                find(Finding(WARNING, "twin_disagreement", f"|q1 - q2| is {np.median(tail):.2f} x (|Q|+1) "
                             f"(above {rc.twin_ratio:g}): the twin critics disagree", hit[0] if hit else None))

    # critic loss growth
    closs = series.get("train/critic_loss")
    if closs is not None and len(closs[0]) >= 5:
        w = last_window(closs[0], closs[1], rc.window_updates)
        fv = finite(w[1])
        if len(fv) >= 5:
            a, b = ends(fv)
            if a > 0 and b / a > rc.critic_loss_growth_warn:
                find(Finding(WARNING, "critic_loss_growing", f"the critic loss grew x{b / a:.3g} over the last "
                             f"{w[0][-1] - w[0][0]} updates ({a:.3g} -> {b:.3g})", int(w[0][0])))

    # alerts the learner raised
    alerts = alerts or []
    if alerts:
        v.first_alert = alerts[0]
        crit = [a for a in alerts if a.get("level") == "critical"]
        if crit:
            find(Finding(DIVERGING, "critical_alert", f"the learner raised {len(crit)} critical alert(s), the first "
                         f"{crit[0]['rule']} at update {crit[0]['update']}", crit[0]["update"]))
        else:
            find(Finding(WARNING, "alerts", f"the learner raised {len(alerts)} warning(s), the first "
                         f"{alerts[0]['rule']} at update {alerts[0]['update']}", alerts[0]["update"]))
    levels = {f.level for f in v.findings}
    v.verdict = DIVERGING if DIVERGING in levels else WARNING if WARNING in levels else HEALTHY
    at_level = [f.since for f in v.findings if f.level == v.verdict and f.since is not None]
    v.first_wrong = min(at_level) if at_level else None
    if v.first_alert is not None and v.blowup is not None:
        v.alert_lead = v.blowup - v.first_alert["update"]
    return v
