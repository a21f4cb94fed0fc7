"""The report's PNG plots (matplotlib, Agg backend: no display needed). Other runs (``--compare``) are dashed.

Losses, Q against Qmax, gradient norms against their clip thresholds, episodes, evaluation return, and each
worker's steps/s with the incidents marked; :func:`make_plots` takes analysed runs (:class:`runreport.report.Analysed`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from protocol import events as ev  # noqa: E402
from protocol.roles import WORKER  # noqa: E402
from protocol.states import RUNNING  # noqa: E402
from runreport.runfiles import steps_per_s  # noqa: E402

STYLES = ["-", "--", ":", "-."]
MARKS = {ev.STALLED: ("tab:red", "stall"), "crashed": ("tab:purple", "crash/kill"),
         ev.FAULT_INJECTED: ("tab:orange", "chaos fault"), ev.ALERT: ("tab:brown", "alert")}


def thin(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``n`` points, evenly strided, the last one kept."""
    if len(x) <= n:
        return x, y
    idx = np.unique(np.append(np.linspace(0, len(x) - 1, n).astype(int), len(x) - 1))
    return x[idx], y[idx]


def origin(started, series_times) -> float:
    """Where a time axis starts: when the run started or, where its state file never said, its first point
    (never the epoch)."""
    if isinstance(started, (int, float)):
        return float(started)
    return min((float(ts[0]) for ts in series_times if len(ts)), default=0.0)


def _line(ax, run, tag, label, color, style, transform=None):
    s = run.run.scalars.get(tag)
    if s is None:
        return False
    x, y = thin(s.steps, s.values, run.run.cfg.report.plot_points)
    if transform is not None:
        y = transform(y)
    ax.plot(x, y, style, color=color, label=label, linewidth=1)
    return True


def _label(run, runs, text):
    return f"{text} [{run.run.name}]" if len(runs) > 1 else text


def _save(fig, out: Path, name: str, title: str, made: list) -> None:
    # fixed margins that hold every figure's labels: a layout engine would draw each figure once more to measure it
    fig.subplots_adjust(left=0.065, right=0.99, bottom=0.13, top=0.92, wspace=0.15)
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    made.append((title, name))


def _pair(runs, out: Path, made: list, file: str, title: str, xlabel: str, yscale: str | None,
          panels: list[tuple[str, str, str]]) -> None:
    """Two panels side by side, one tag each (every run's line in each), saved as ``file``."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (tag, name, color) in zip(axes, panels):
        for i, r in enumerate(runs):
            _line(ax, r, tag, _label(r, runs, name), color, STYLES[i % len(STYLES)])
        if yscale:
            ax.set_yscale(yscale)
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        ax.legend(fontsize=7)
    _save(fig, out, file, title, made)


def make_plots(runs, out: Path) -> list[tuple[str, str]]:
    """Write the plots of ``runs`` (the first is the report's run) into ``out``; returns (title, file name)."""
    made: list[tuple[str, str]] = []
    out = Path(out)
    any_tb = any(r.run.scalars.series for r in runs)
    if any_tb:
        _pair(runs, out, made, "losses.png", "Losses", "update", "symlog",
              [("train/actor_loss", "actor loss", "tab:blue"), ("train/critic_loss", "critic loss", "tab:green")])

        fig, ax = plt.subplots(figsize=(12, 4.5))
        for i, r in enumerate(runs):
            st = STYLES[i % len(STYLES)]
            _line(ax, r, "train/q1_value", _label(r, runs, "q1"), "tab:blue", st)
            _line(ax, r, "train/q2_value", _label(r, runs, "q2"), "tab:cyan", st)
            _line(ax, r, "train/actor_loss", _label(r, runs, "-actor_loss"), "tab:red", st, lambda y: -y)
            if np.isfinite(r.q_max):
                ax.axhline(r.q_max, color="black", linestyle=st, linewidth=0.8, label=_label(r, runs, "+-Qmax"))
                ax.axhline(-r.q_max, color="black", linestyle=st, linewidth=0.8)
        ax.set_yscale("symlog")
        ax.set_xlabel("update")
        ax.set_title("Q against Qmax (and -actor_loss, which should track Q)")
        ax.legend(fontsize=7)
        _save(fig, out, "q_values.png", "Q against Qmax", made)

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, group in zip(axes, ("critic", "actor")):
            for i, r in enumerate(runs):
                st = STYLES[i % len(STYLES)]
                _line(ax, r, f"gradients/{group}_norm_before_clip", _label(r, runs, "before clip"), "tab:red", st)
                _line(ax, r, f"gradients/{group}_norm_after_clip", _label(r, runs, "after clip"), "tab:green", st)
                thr = getattr(r.run.cfg.learner, f"max_grad_norm_{group}")
                ax.axhline(thr, color="gray", linestyle=st, linewidth=2.5, alpha=0.5, zorder=1,
                           label=_label(r, runs, f"threshold {thr:g}"))
            ax.set_yscale("log")
            ax.set_xlabel("update")
            ax.set_title(f"{group} gradient norm")
            ax.legend(fontsize=7)
        _save(fig, out, "grad_norms.png", "Gradient norms and clip thresholds", made)

        _pair(runs, out, made, "episodes.png", "Episode reward and length", "env step", None,
              [("train/episode_reward", "training episode reward", "tab:blue"),
               ("train/episode_length", "training episode length", "tab:purple")])

    if any(r.run.evals for r in runs):
        fig, ax = plt.subplots(figsize=(12, 4))
        for i, r in enumerate(runs):
            rows = [e for e in r.run.evals if isinstance(e.get("reward"), (int, float))
                    and isinstance(e.get("env_steps"), (int, float))]
            if rows:
                ax.plot([e["env_steps"] for e in rows], [e["reward"] for e in rows], "o" + STYLES[i % len(STYLES)],
                        markersize=3, label=_label(r, runs, "evaluation return"))
            target = r.run.cfg.report.eval_return_target
            if target is not None:
                ax.axhline(target, color="black", linewidth=0.8, label=_label(r, runs, f"target {target:g}"))
        ax.set_xlabel("env step")
        ax.set_title("evaluation return (no exploration noise)")
        ax.legend(fontsize=7)
        _save(fig, out, "eval.png", "Evaluation return", made)

    fig, ax = plt.subplots(figsize=(12, 4.5))
    drew = False
    for i, r in enumerate(runs):
        st = STYLES[i % len(STYLES)]
        start = r.status.get("started")
        per: dict[str, tuple[list, list]] = {}
        for row in r.run.progress:
            t = row.get("time")
            for name, c in (row.get("children") or {}).items():
                if not isinstance(c, dict) or c.get("role") != WORKER or not isinstance(t, (int, float)):
                    continue
                rate = c.get("steps_per_s") if c.get("state") == RUNNING else 0.0
                per.setdefault(name, ([], []))
                per[name][0].append(t)
                per[name][1].append(rate if isinstance(rate, (int, float)) else 0.0)
        sps = None if per else steps_per_s(r.run)  # older runs: the run's steps/s from the learner's transitions
        t0 = origin(start, [v[0] for v in per.values()] + ([sps[0]] if sps is not None else []))
        for name, (ts, rates) in sorted(per.items()):
            ax.plot(np.asarray(ts) - t0, rates, st, linewidth=1, label=_label(r, runs, name))
            drew = True
        if not per:
            if sps is not None:
                ax.plot(sps[0] - t0, sps[1], st, linewidth=1, label=_label(r, runs, "run steps/s (all workers)"))
                drew = True
        if i == 0:
            seen = set()
            for e in r.timeline:
                kind = e["event"] if e["event"] in MARKS else ("crashed" if e["event"].startswith(("crashed", "killed"))
                                                             else None)
                if kind is None:
                    continue
                color, label = MARKS[kind]
                ax.axvline(e["time"] - t0, color=color, linestyle=":", linewidth=1,
                           label=label if label not in seen else None)
                seen.add(label)
    if drew:
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel("env steps/s")
        ax.set_title("per-worker steps/s (from heartbeats), incidents marked")
        ax.legend(fontsize=7, ncol=2)
        _save(fig, out, "workers.png", "Per-worker steps/s with incidents", made)
    else:
        plt.close(fig)
    return made
