"""``supervisor report [RUN_DIR]``: what happened in a run, from its files alone.

Reads the run's files (:mod:`runreport.runfiles`) and writes
``RUN_DIR/report/report.md`` with PNG plots beside it (``--html``: one
self-contained ``report.html``):

1. run status (completed, running, stopped, failed, frozen), steps, wall time, restarts
   (:mod:`runreport.status`);
2. expected against observed, one row per key metric (:mod:`runreport.expected`);
3. divergence analysis and a verdict (:mod:`runreport.divergence`);
4. incidents: stalls, kills, crashes, restarts, alerts and chaos faults, with stacks
   (:mod:`runreport.incidents`, :mod:`runreport.faults`);
5. plots (:mod:`runreport.plots`).

Every file may be missing, torn by a kill or still being written: what cannot be
read is said in the report, and the rest goes on. Runs on the base install.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol import events as ev
from protocol.config import q_max
from runreport import divergence as dv
from runreport.expected import BAD, WARN, Row, table
from runreport.faults import fault_outcomes, format_summary, summarize_outcomes
from runreport.incidents import causes_by_child, outliers, timeline
from runreport.render import markdown_to_html, render_markdown, status_lines
from runreport.runfiles import Run, alerts_of, load_run
from runreport.status import run_status


def q_max_of(cfg) -> float:
    """The run's Qmax: ``report.q_max`` when set, else ``env.reward_max / (1 - learner.gamma)``."""
    if cfg.report.q_max is not None:
        return cfg.report.q_max
    return q_max(cfg.env.reward_max, cfg.learner.gamma)


# -- the whole report -----------------------------------------------------------------------------------------------

@dataclass
class Analysed:
    """A run and what the report made of it: one per run of a report (``--compare`` adds the others)."""

    run: Run
    status: dict
    q_max: float
    rows: list[Row]
    verdict: dv.Verdict
    timeline: list[dict]
    faults: dict


def analyse(run: Run, now: float | None = None) -> Analysed:
    q_max = q_max_of(run.cfg)
    tags = ("train/actor_loss", "train/q1_value", "train/q2_value", "train/q_abs_diff", "train/critic_loss",
            "gradients/critic_norm_before_clip", "gradients/actor_norm_before_clip",
            "gradients/critic_clip_fraction", "gradients/actor_clip_fraction")
    series = {t: s for t in tags if (s := run.series(t)) is not None}
    lc = run.cfg.learner
    alerts = alerts_of(run)
    if not alerts:  # no events: the counters in TensorBoard say when (within log_every) the first one fired
        for tag, level in (("alerts/gradient_explosion_critical", "critical"),
                           ("alerts/gradient_explosion_warning", "warning")):
            s = run.series(tag)
            if s is not None and (s[1] > 0).any():
                alerts.append({"level": level, "rule": "(from TensorBoard counters)",
                               "update": int(s[0][np.argmax(s[1] > 0)])})
        alerts.sort(key=lambda a: a["update"])
    verdict = dv.judge(series, q_max, {"critic": lc.max_grad_norm_critic, "actor": lc.max_grad_norm_actor},
                       run.cfg.report, alerts)
    return Analysed(run, run_status(run, now), q_max, table(run, q_max), verdict, timeline(run),
                    summarize_outcomes(fault_outcomes(run.events)))


def summarize(run_dir: Path) -> dict:
    """The short summary (``--json``): status, verdict, table, events, stalls, restarts, evaluation, faults."""
    return summary_of(analyse(load_run(Path(run_dir))))


def summary_of(a: Analysed) -> dict:
    run = a.run
    events = run.events
    evals = run.evals
    last_evals = [e for e in evals if isinstance(e.get("reward"), (int, float))][-10:]
    return {
        "run_dir": str(run.dir), "status": a.status, "verdict": a.verdict.verdict,
        "first_wrong_update": a.verdict.first_wrong,
        "findings": [{"level": f.level, "rule": f.rule, "text": f.text, "since": f.since} for f in a.verdict.findings],
        "table": [{"section": r.section, "metric": r.metric, "expected": r.expected, "observed": r.stats,
                   "status": r.status, "delta": r.delta, "note": r.note} for r in a.rows],
        "events": dict(Counter(e.get("event") for e in events)),
        "stalls": [{"name": e.get("name"), "reason": e.get("reason")} for e in events if e.get("event") == ev.STALLED],
        "restarts": dict(Counter(e.get("name") for e in events if e.get("event") == ev.BACKOFF)),
        "failed": [e.get("name") for e in events if e.get("event") == ev.FAILED],
        "incidents": [{"dir": i["dir"].split("/", 1)[1], "name": i["name"], "cause": i["cause"]}
                      for i in run.incidents],
        "causes": causes_by_child(run),
        "outliers": outliers(run),
        "eval_episodes": len(evals),
        "last_eval_mean": sum(e["reward"] for e in last_evals) / len(last_evals) if last_evals else None,
        "last_eval_env_steps": last_evals[-1].get("env_steps") if last_evals else None,
        "ended": next((e for e in reversed(events) if e.get("event") == ev.RUN_ENDED), None),
        "faults": a.faults, "problems": run.problems, "read_s": round(run.read_s, 3),
    }


def write_report(run_dir: Path, compare: list[Path] = (), html: bool = False,
                 now: float | None = None) -> tuple[list[Analysed], Path, Path | None]:
    runs = [analyse(load_run(Path(d)), now) for d in [run_dir, *compare]]
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, str]] = []
    try:
        from runreport.plots import make_plots
    except ImportError:
        make_plots = None
    if make_plots is not None:
        plots = make_plots(runs, out)
    md = render_markdown(runs, plots)
    md_path = out / "report.md"
    md_path.write_text(md)
    html_path = None
    if html:
        html_path = out / "report.html"
        html_path.write_text(markdown_to_html(md, out, f"Run report: {runs[0].run.name}"))
    return runs, md_path, html_path


def report(run_dir: Path, as_json: bool = False, html: bool = False, compare: list[Path] = ()) -> int:
    """``supervisor report``: write the report, print its gist (``as_json``: the summary); the exit status."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        print(f"report: no run directory at {run_dir}")
        return 2
    for other in compare:
        if not Path(other).is_dir():
            print(f"report: no run directory at {other} (--compare)")
            return 2
    runs, md_path, html_path = write_report(run_dir, list(compare), html)
    a = runs[0]
    s = summary_of(a)
    if as_json:
        s["report"] = str(md_path)
        s["html"] = str(html_path) if html_path else None
        print(json.dumps(s, indent=2, default=str))
        return 0
    print(f"run {a.run.name}: " + "; ".join(status_lines(a)[:1]).replace("**", ""))
    for line in status_lines(a)[1:]:
        print(f"  {line}")
    print(f"  events: {', '.join(f'{k}={v}' for k, v in sorted(s['events'].items()))}")
    v = a.verdict
    print(f"  verdict: {v.verdict}" + (f" (first went wrong at update {v.first_wrong})"
                                       if v.first_wrong is not None else ""))
    for f in v.findings[:5]:
        print(f"    {f.level}: {f.text}")
    flagged = [r for r in a.rows if r.status in (WARN, BAD)]
    if flagged:
        print("  table: " + "; ".join(f"{r.metric} {r.status} ({r.delta})" for r in flagged))
    for st in s["stalls"]:
        print(f"  stalled: {st['name']}: {st['reason']}")
    print(f"  incidents: {len(s['incidents'])} (in {run_dir / 'incidents'})")
    for name, row in s["causes"].items():
        print(f"    {name}: " + ", ".join(f"{cause} x{n}" for cause, n in sorted(row.items(), key=lambda kv: -kv[1])))
    for line in s["outliers"]:
        print(f"    {line}")
    if s["last_eval_mean"] is not None:
        print(f"  evaluation: mean return {s['last_eval_mean']:.1f} over the last episodes, "
              f"at {s['last_eval_env_steps']} env steps")
    if s["faults"]:
        print("  chaos faults (detection: fault to stalled/exited; recovery: fault to running again):")
        for line in format_summary(s["faults"]):
            print(f"    {line}")
    if s["ended"]:
        print(f"  ended: {s['ended'].get('reason')} (exit {s['ended'].get('exit_code')})")
    for p in a.run.problems:
        print(f"  read problem: {p}")
    for other in runs[1:]:
        print(f"  compared with {other.run.name}: {other.status['status']}, verdict {other.verdict.verdict}")
    print(f"  report: {md_path}" + (f" and {html_path}" if html_path else ""))
    return 0
