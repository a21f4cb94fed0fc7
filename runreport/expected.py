"""Expected against observed: one row per key metric of a run, with the value it should have and a status.

Values (Q and -actor_loss against Qmax, the twin critics, the critic loss),
gradients against their clip thresholds, the learner's alert counters, learning
(episodes, evaluation return) and throughput (buffer, update-to-data ratio,
updates and env steps per second), each judged ok, warning or bad.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from protocol.config import Q_DIVERGED_MULTIPLE
from runreport import divergence as dv
from runreport.runfiles import Run, steps_per_s

# the status of a row
OK, WARN, BAD, INFO, NO_DATA = "ok", "warning", "bad", "info", "no data"


@dataclass
class Row:
    section: str
    metric: str
    expected: str
    stats: dict | None
    status: str
    delta: str = ""
    note: str = ""


def _trend(values: np.ndarray) -> tuple[float, float, float | None]:
    v = dv.finite(np.asarray(values, dtype=float))
    q = max(1, len(v) // 4)
    first, last = float(v[:q].mean()), float(v[-q:].mean())
    change = (last - first) / abs(first) if first != 0 else None
    return first, last, change


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.0%}"


def main_table_metrics() -> list[str]:
    """The rows every run's table has (gradient sub-groups and per-rule alert counters come on top when logged)."""
    return ["actor loss", "q1", "q2", "|q1 - q2|", "-actor_loss - Q", "critic loss trend", "critic norm before clip",
            "critic norm after clip", "critic clip fraction", "actor norm before clip", "actor norm after clip",
            "actor clip fraction", "gradient_explosion_warning", "gradient_explosion_critical", "non_finite_updates",
            "episode length", "episode reward", "evaluation return", "buffer utilisation", "update-to-data ratio",
            "updates/s", "env steps/s"]


def table(run: Run, q_max: float) -> list[Row]:
    cfg, rc, lc = run.cfg, run.cfg.report, run.cfg.learner
    rows: list[Row] = []
    window = rc.window_updates

    def get(tag):
        return run.series(tag)

    def add(section, metric, expected, values, judge=None):
        stats = dv.describe(values) if values is not None and len(values) else None
        if stats is None:
            rows.append(Row(section, metric, expected, None, NO_DATA))
            return
        status, delta, note = judge(stats) if judge else (INFO, "", "")
        rows.append(Row(section, metric, expected, stats, status, delta, note))

    qm = f"{q_max:.4g}"

    def bounded(stats, sign=1.0):
        worst = max(abs(stats["min"]), abs(stats["max"]))
        final = abs(stats["final"])
        if stats["non_finite"]:
            return BAD, "non-finite", f"{stats['non_finite']} non-finite points"
        status = BAD if worst > Q_DIVERGED_MULTIPLE * q_max else WARN if final > q_max else OK
        return status, f"{final / q_max:.0%} of Qmax", ""

    for tag, metric in (("train/actor_loss", "actor loss"), ("train/q1_value", "q1"), ("train/q2_value", "q2")):
        s = get(tag)
        add("values", metric, f"within +-Qmax = +-{qm}" + (" (-actor_loss ~ Q)" if "actor" in tag else ""),
            s[1] if s else None, bounded)
    diff = get("train/q_abs_diff")
    q1 = get("train/q1_value")
    if diff is not None and q1 is not None:
        common, d, qq = dv.align(diff[0], diff[1], q1[0], q1[1])
        ratio = d / (np.abs(qq) + 1)

        def twin(stats, ratio=ratio):
            r = float(np.median(dv.finite(ratio[-max(1, len(ratio) // 10):]))) if len(dv.finite(ratio)) else 0.0
            return (WARN if r > rc.twin_ratio else OK), f"{r:.2f} x (|Q|+1)", ""
        add("values", "|q1 - q2|", f"<= {rc.twin_ratio:g} x (|Q| + 1)", d, twin)
    else:
        add("values", "|q1 - q2|", f"<= {rc.twin_ratio:g} x (|Q| + 1)", diff[1] if diff else None)
    actor = get("train/actor_loss")
    if actor is not None and q1 is not None:
        common, a, qq = dv.align(actor[0], actor[1], q1[0], q1[1])
        gap = (-a - qq) / (np.abs(qq) + 1)

        def gap_judge(stats):
            tail = dv.finite(dv.last_window(common, gap, window)[1])
            r = float(np.median(tail[-max(1, len(tail) // 10):])) if len(tail) else 0.0
            st = BAD if r > rc.actor_q_gap_diverging else WARN if r > rc.actor_q_gap_warn else OK
            return st, f"{r:.3g} x (|Q|+1)", ""
        add("values", "-actor_loss - Q", f"<= {rc.actor_q_gap_warn:g} x (|Q| + 1)", -a - qq, gap_judge)
    else:
        add("values", "-actor_loss - Q", f"<= {rc.actor_q_gap_warn:g} x (|Q| + 1)", None)
    closs = get("train/critic_loss")

    def closs_judge(stats):
        w = dv.finite(dv.last_window(closs[0], closs[1], window)[1])
        a, b = dv.ends(w) if len(w) else (0.0, 0.0)
        g = b / a if a > 0 else None
        return (WARN if g is not None and g > rc.critic_loss_growth_warn else OK), \
            (f"x{g:.3g} over the window" if g is not None else ""), f"{a:.3g} -> {b:.3g}"
    add("values", "critic loss trend", f"not growing (< x{rc.critic_loss_growth_warn:g} over {window} updates)",
        closs[1] if closs else None, closs_judge)

    # gradients
    thresholds = {"critic": lc.max_grad_norm_critic, "actor": lc.max_grad_norm_actor}
    subgroups = sorted({m.group(1) for t in run.scalars.tags()
                        if (m := re.fullmatch(r"gradients/((?:critic|actor)_(?:cnn|mlp))_norm", t))})
    for group, thr in thresholds.items():
        names = [f"{group}_norm_before_clip"] + [f"{g}_norm" for g in subgroups if g.startswith(group)]
        for name in names:
            s = get(f"gradients/{name}")

            def before(stats, s=s, thr=thr):
                fv = dv.finite(dv.last_window(s[0], s[1], window)[1])
                share = float(np.mean(fv > thr)) if len(fv) else 0.0
                st = BAD if stats["mean"] > 10 * thr else WARN if share > rc.clip_active_warn else OK
                return st, f"mean {stats['mean'] / thr - 1:+.0%} vs threshold", f"{share:.0%} of logged points above"
            label = name.replace("_norm_before_clip", " norm before clip").replace("_norm", " norm (before clip)")
            add("gradients", label, f"<= {thr:g} (clip threshold) in most updates", s[1] if s else None, before)
            after_tag = name.replace("_before_clip", "_after_clip") if "before" in name else name + "_after_clip"
            after = get(f"gradients/{after_tag}")

            def after_j(stats, thr=thr):
                st = BAD if stats["max"] > thr * 1.01 else OK
                return st, f"max {stats['max'] / thr:.0%} of threshold", ""
            add("gradients", label.replace("before clip", "after clip"), f"<= {thr:g} always",
                after[1] if after else None, after_j)
        frac = get(f"gradients/{group}_clip_fraction")

        def frac_j(stats):
            tail = stats["final"]
            return (WARN if stats["mean"] > rc.clip_active_warn else OK), f"clipping in {stats['mean']:.0%}", \
                f"final {tail:.0%}"
        add("gradients", f"{group} clip fraction", f"<= {rc.clip_active_warn:.0%} of updates",
            frac[1] if frac else None, frac_j)

    # alerts
    alert_tags = ["alerts/gradient_explosion_warning", "alerts/gradient_explosion_critical",
                  "alerts/non_finite_updates"]
    alert_tags += [t for t in run.scalars.tags() if t.startswith("alerts/") and t not in alert_tags]
    for tag in alert_tags:
        s = get(tag)
        critical = "critical" in tag or "non_finite" in tag or "q_divergence" in tag

        def count_j(stats, critical=critical):
            n = stats["final"]
            return (OK if n == 0 else BAD if critical else WARN), f"{n:+g}", ""
        add("alerts", tag.split("/", 1)[1], "0", s[1] if s else None, count_j)

    # learning
    limit = cfg.env.max_episode_steps
    for tag, metric, expected in (("train/episode_length", "episode length",
                                   f"<= {limit}, not shrinking" if limit else "not shrinking"),
                                  ("train/episode_reward", "episode reward", "growing")):
        s = get(tag)

        def trend_j(stats, s=s, tag=tag):
            first, last, change = _trend(s[1])
            falling = change is not None and change < -0.25 if "length" in tag else last < first - 0.05 * abs(first)
            st = INFO if "length" in tag and not falling else WARN if falling else OK
            return st, _pct(change) + " first to last quarter", f"{first:.4g} -> {last:.4g} (quarter means)"
        add("learning", metric, expected, s[1] if s else None, trend_j)
    ev_rewards = np.array([e["reward"] for e in run.evals if isinstance(e.get("reward"), (int, float))], dtype=float)
    target = rc.eval_return_target

    def eval_j(stats):
        k = max(1, min(len(ev_rewards), cfg.workers.eval_episodes))
        last = float(ev_rewards[-k:].mean())
        stats["final"] = last  # the last evaluation round, not its last episode
        if target is not None:
            return (OK if last >= target else WARN), f"{last - target:+.4g} vs target", \
                f"last {k} episode(s)"
        first, lastq, change = _trend(ev_rewards)
        return (OK if lastq >= first else WARN), _pct(change) + " first to last quarter", f"last {k} episode(s)"
    add("learning", "evaluation return", f">= {target:g}" if target is not None else "growing",
        ev_rewards if len(ev_rewards) else None, eval_j)

    # throughput
    util = get("buffer/utilization")
    trans = get("buffer/transitions")

    def util_j(stats):
        if trans is None:
            return INFO, "", ""
        want = min(1.0, float(trans[1][-1]) / lc.replay_capacity)
        return (OK if abs(stats["final"] - want) <= 0.1 * max(want, 0.01) + 0.01 else WARN), \
            f"{stats['final'] - want:+.1%}", f"{int(trans[1][-1]):,} transitions / {lc.replay_capacity:,}"
    add("throughput", "buffer utilisation", "min(1, transitions / replay_capacity)", util[1] if util else None, util_j)
    utd = get("perf/update_to_data")

    def utd_j(stats):
        d = stats["final"] / lc.updates_per_step - 1
        return (OK if abs(d) <= 0.1 else WARN), _pct(d), ""
    add("throughput", "update-to-data ratio", f"{lc.updates_per_step:g} (learner.updates_per_step)",
        utd[1] if utd else None, utd_j)
    ups = get("perf/updates_per_s")

    def rate_j(minimum):
        def j(stats):
            if minimum is None:
                return INFO, "", ""
            return (OK if stats["mean"] >= minimum else WARN), _pct(stats["mean"] / minimum - 1), ""
        return j
    add("throughput", "updates/s", f">= {rc.min_updates_per_s:g}" if rc.min_updates_per_s is not None else
        "(no target set)", ups[1] if ups else None, rate_j(rc.min_updates_per_s))
    sps = steps_per_s(run)
    exp_steps = (f">= {rc.min_steps_per_s:g}" if rc.min_steps_per_s is not None else
                 f"~ updates/s / {lc.updates_per_step:g} once learning")
    add("throughput", "env steps/s", exp_steps, sps[1] if sps else None, rate_j(rc.min_steps_per_s))
    return rows
