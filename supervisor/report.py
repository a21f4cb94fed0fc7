"""``supervisor report [RUN_DIR]``: what happened in a run, from its files alone.

Reads the run's TensorBoard event files (with :mod:`supervisor.tfevents`, no
TensorBoard), ``events.jsonl``, ``eval.jsonl``, ``progress.jsonl``, the incidents,
``supervisor.json`` and ``config.yaml``, and writes ``RUN_DIR/report/report.md``
with PNG plots beside it (``--html``: one self-contained ``report.html``):

1. run status (completed, running, stopped, failed, frozen), steps, wall time, restarts;
2. expected against observed, one row per key metric;
3. divergence analysis and a verdict (:mod:`supervisor.analysis`);
4. incidents: stalls, kills, crashes, restarts, alerts and chaos faults, with stacks;
5. plots (:mod:`supervisor.plots`).

Every file may be missing, torn by a kill or still being written: what cannot be
read is said in the report, and the rest goes on. Runs on the base install.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol import events as ev
from protocol.config import q_max
from supervisor import analysis as an
from runreport.faults import fault_outcomes, format_summary, summarize_outcomes
from supervisor.plan import LEARNER
from supervisor.tfevents import Scalars, read_scalars

COMPLETED, RUNNING, STOPPED, FAILED, FROZEN = "completed", "running", "stopped", "failed", "frozen"
STACK_FRAMES = 6  # top frames of each captured stack shown


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line cut by a crash (or not an object) is skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# -- a run's files ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    dir: Path
    cfg: object
    events: list[dict]
    evals: list[dict]
    state: dict
    progress: list[dict]
    scalars: Scalars
    incidents: list[dict]
    problems: list[str] = field(default_factory=list)
    read_s: float = 0.0

    @property
    def name(self) -> str:
        return self.dir.resolve().name if self.dir.exists() else self.dir.name

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        s = self.scalars.get(tag)
        return (s.steps, s.values) if s is not None else None


def q_max_of(cfg) -> float:
    if cfg.report.q_max is not None:
        return cfg.report.q_max
    return q_max(cfg.env.reward_max, cfg.learner.gamma)


def load_incidents(run_dir: Path) -> list[dict]:
    out = []
    root = run_dir / "incidents"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        info = read_json(d / "incident.json")
        try:
            stack = (d / "stack.txt").read_text(errors="replace")
        except OSError:
            stack = ""
        out.append({"dir": f"incidents/{d.name}", "name": info.get("name"), "reason": info.get("reason"),
                    "time": info.get("time"), "phase": (info.get("last_heartbeat") or {}).get("phase"),
                    "stack": stack, "top_frames": top_frames(stack)})
    return out


def top_frames(stack: str, n: int = STACK_FRAMES) -> list[str]:
    """The first frames of a py-spy dump: the main thread's, then each other thread's innermost one."""
    threads: list[tuple[str, list[str]]] = []
    for line in stack.splitlines():
        if line.startswith("Thread "):
            threads.append((line.strip(), []))
        elif threads and line.startswith("    ") and line.strip():
            threads[-1][1].append(line.strip())
    if not threads:
        return [line.strip() for line in stack.splitlines() if line.strip()][:2]
    main = next((t for t in threads if '"MainThread"' in t[0]), threads[0])
    out = [main[0]] + [f"  {f}" for f in main[1][:n]]
    for head, frames in threads:
        if head is not main[0] and frames:
            out.append(f"{head}: {frames[0]}")
    return out


def load_run(run_dir: Path) -> Run:
    from protocol.config import Config, ConfigError, load_config

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    problems = []
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        cfg = Config()
        problems.append(f"config.yaml could not be used ({exc}); the defaults stand in for it")
    scalars = read_scalars(run_dir / "tb")
    problems += [f"tb/{p}" for p in scalars.problems]
    run = Run(run_dir, cfg, read_jsonl(run_dir / "events.jsonl"), read_jsonl(run_dir / "eval.jsonl"),
              read_json(run_dir / "supervisor.json"), read_jsonl(run_dir / "progress.jsonl"), scalars,
              load_incidents(run_dir), problems)
    for name in ("events.jsonl", "supervisor.json", "config.yaml"):
        if not (run_dir / name).exists():
            problems.append(f"{name} is missing")
    if not scalars.files:
        problems.append("no TensorBoard event files in tb/ (the learner wrote no metrics yet)")
    run.read_s = time.perf_counter() - t0
    return run


# -- 1. status ---------------------------------------------------------------------------------------------------

def alerts_of(run: Run) -> list[dict]:
    """The learner's alerts in order, from events.jsonl ("level:rule@update")."""
    out, seen = [], set()
    for e in run.events:
        if e.get("event") != ev.ALERT:
            continue
        m = re.match(r"(\w+):(\w+)@(\d+)", str(e.get("alert", "")))
        if m and m.group(0) not in seen:
            seen.add(m.group(0))
            out.append({"level": m.group(1), "rule": m.group(2), "update": int(m.group(3)), "time": e.get("time"),
                        "name": e.get("name")})
    return out


def last_progress_time(run: Run) -> tuple[float | None, str]:
    """When the run last moved: the newest metric written, or the newest heartbeat sample whose counters grew."""
    best, what = None, ""
    wall = run.scalars.last_wall_time()
    if wall is not None:
        best, what = wall, "TensorBoard metric"
    prev: dict = {}
    for row in run.progress:
        children = row.get("children") or {}
        counts = {k: (c.get("env_steps"), c.get("updates")) for k, c in children.items() if isinstance(c, dict)}
        if any(k in prev and v != prev[k] and all(isinstance(x, (int, float)) for x in v) for k, v in counts.items()):
            t = row.get("time")
            if isinstance(t, (int, float)) and (best is None or t > best):
                best, what = float(t), "heartbeat progress"
        prev = counts
    return best, what


def supervisor_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    from supervisor.run import supervisor_alive as alive

    try:
        return alive(pid)
    except Exception:  # noqa: BLE001 - a pid we may not inspect is not proof of life
        return False


def run_status(run: Run, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    cfg = run.cfg
    events = run.events
    ended = next((e for e in reversed(events) if e.get("event") == ev.RUN_ENDED), None)
    state_end = run.state.get("ended") if isinstance(run.state.get("ended"), dict) else None
    started = next((e.get("time") for e in events if e.get("event") == ev.RUN_STARTED), None)
    complete = any(e.get("event") == ev.RUN_COMPLETE for e in events)
    last_t, last_what = last_progress_time(run)
    sv = cfg.supervisor
    frozen_after = cfg.report.frozen_after_s or 2 * max(sv.heartbeat_deadline_s, sv.progress_deadline_s,
                                                        sv.learner_deadline_s)
    out: dict = {"frozen_after_s": frozen_after, "last_progress_time": last_t, "last_progress_what": last_what}
    end_info = ended or state_end
    if end_info is not None:
        code = end_info.get("exit_code")
        reason = end_info.get("reason")
        status = COMPLETED if code == 0 and complete else STOPPED if code == 0 else FAILED
        out.update(status=status, reason=reason, exit_code=code, end_time=end_info.get("time"))
        if ended is None:
            out["note"] = "events.jsonl has no run_ended line (torn?); supervisor.json says how it ended"
    else:
        pid = run.state.get("pid") or next((e.get("pid") for e in reversed(events)
                                            if e.get("event") == ev.RUN_STARTED), None)
        alive = supervisor_alive(pid)
        stale = last_t is None or now - last_t > frozen_after
        if alive and not stale:
            out.update(status=RUNNING, reason=f"supervisor pid {pid} is running")
        elif alive:
            out.update(status=FROZEN, reason=f"supervisor pid {pid} is alive, but nothing has progressed for "
                       f"{_dur(now - last_t) if last_t else 'the whole run'} (more than {frozen_after:g}s)")
        else:
            out.update(status=FAILED, reason="ended without warning: the supervisor"
                       + (f" (pid {pid})" if pid else "") + " is gone and wrote no run_ended (killed, or the host "
                       "went down)")
        out["end_time"] = last_t
    # the last step and time seen, and what the supervisor did since
    last_update, last_update_time = None, None
    for tag in ("train/critic_loss", "train/q1_value", "perf/updates_per_s"):
        s = run.scalars.get(tag)
        if s is not None:
            last_update, last_update_time = int(s.steps[-1]), float(s.wall[-1])
            break
    out["last_update"], out["last_update_time"] = last_update, last_update_time
    if last_t is not None and out["status"] in (FROZEN, FAILED):
        after = [e for e in events if isinstance(e.get("time"), (int, float)) and e["time"] > last_t
                 and e.get("event") in (ev.STALLED, ev.TERMINATING, ev.KILLED, ev.EXITED, ev.BACKOFF, ev.FAILED,
                                        ev.SPAWNED, ev.EVIDENCE_CAPTURED)]
        out["since_last_progress"] = [f"{_clock(e['time'], started)} {e.get('name')}: {e.get('event')}"
                                      + (f" ({e['reason']})" if e.get("reason") else "") for e in after[:20]]
        if not after:
            out["since_last_progress"] = ["the supervisor recorded nothing after it"]
    steps = None
    s = run.scalars.get("buffer/transitions")
    if s is not None:
        steps = int(s.values[-1])
    for row in reversed(run.progress):  # the learner's count of stored transitions is the run's
        learners = [c for c in (row.get("children") or {}).values() if isinstance(c, dict) and c.get("role") == LEARNER]
        if learners and isinstance(learners[0].get("env_steps"), int):
            steps = max(steps or 0, learners[0]["env_steps"])
            break
    out["env_steps"], out["max_timesteps"] = steps, cfg.run.max_timesteps
    end_t = out.get("end_time") if out["status"] != RUNNING else now
    out["started"] = started
    out["wall_s"] = (end_t - started) if started is not None and end_t is not None else None
    restarts: dict[str, Counter] = {}
    for e in events:
        name, kind = e.get("name"), e.get("event")
        if kind == ev.SPAWNED and (e.get("incarnation") or 0) > 0:
            restarts.setdefault(name, Counter())["restarts"] += 1
        elif kind == ev.STALLED:
            restarts.setdefault(name, Counter())["stalls"] += 1
        elif kind == ev.EXITED and e.get("code") not in (0, None) and e.get("state") == "running":
            restarts.setdefault(name, Counter())["crashes"] += 1
        elif kind in (ev.RESTART_REQUESTED, ev.DEPENDENCY_RESTART, ev.RECYCLED, ev.FAILED):
            restarts.setdefault(name, Counter())[kind] += 1
    out["restarts"] = {k: dict(v) for k, v in sorted(restarts.items()) if k}
    return out


def _dur(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _clock(t, started) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    if isinstance(started, (int, float)):
        return f"+{_dur(t - started)}"
    return time.strftime("%H:%M:%S", time.localtime(t))


# -- 2. expected against observed ------------------------------------------------------------------------------------

@dataclass
class Row:
    section: str
    metric: str
    expected: str
    stats: dict | None
    status: str
    delta: str = ""
    note: str = ""


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e7):
        return f"{int(x):,}"
    ax = abs(x)
    return f"{x:.3g}" if ax >= 1e5 or ax < 1e-3 else f"{x:.4g}"


def _trend(values: np.ndarray) -> tuple[float, float, float | None]:
    v = an.finite(np.asarray(values, dtype=float))
    q = max(1, len(v) // 4)
    first, last = float(v[:q].mean()), float(v[-q:].mean())
    change = (last - first) / abs(first) if first != 0 else None
    return first, last, change


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:+.0%}"


def steps_per_s(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Env steps per second of the whole run, from buffer/transitions against wall time (x: wall time)."""
    s = run.scalars.get("buffer/transitions")
    if s is None or len(s) < 2:
        return None
    dt = np.diff(s.wall)
    ok = dt > 0
    if not ok.any():
        return None
    return s.wall[1:][ok], np.diff(s.values)[ok] / dt[ok]


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
        stats = an.describe(values) if values is not None and len(values) else None
        if stats is None:
            rows.append(Row(section, metric, expected, None, an.NO_DATA))
            return
        status, delta, note = judge(stats) if judge else (an.INFO, "", "")
        rows.append(Row(section, metric, expected, stats, status, delta, note))

    qm = f"{q_max:.4g}"

    def bounded(stats, sign=1.0):
        worst = max(abs(stats["min"]), abs(stats["max"]))
        final = abs(stats["final"])
        if stats["non_finite"]:
            return an.BAD, "non-finite", f"{stats['non_finite']} non-finite points"
        status = an.BAD if worst > an.BLOWUP_QMAX * q_max else an.WARN if final > q_max else an.OK
        return status, f"{final / q_max:.0%} of Qmax", ""

    for tag, metric in (("train/actor_loss", "actor loss"), ("train/q1_value", "q1"), ("train/q2_value", "q2")):
        s = get(tag)
        add("values", metric, f"within +-Qmax = +-{qm}" + (" (-actor_loss ~ Q)" if "actor" in tag else ""),
            s[1] if s else None, bounded)
    diff = get("train/q_abs_diff")
    q1 = get("train/q1_value")
    if diff is not None and q1 is not None:
        common, d, qq = an.align(diff[0], diff[1], q1[0], q1[1])
        ratio = d / (np.abs(qq) + 1)

        def twin(stats, ratio=ratio):
            r = float(np.median(an.finite(ratio[-max(1, len(ratio) // 10):]))) if len(an.finite(ratio)) else 0.0
            return (an.WARN if r > rc.twin_ratio else an.OK), f"{r:.2f} x (|Q|+1)", ""
        add("values", "|q1 - q2|", f"<= {rc.twin_ratio:g} x (|Q| + 1)", d, twin)
    else:
        add("values", "|q1 - q2|", f"<= {rc.twin_ratio:g} x (|Q| + 1)", diff[1] if diff else None)
    actor = get("train/actor_loss")
    if actor is not None and q1 is not None:
        common, a, qq = an.align(actor[0], actor[1], q1[0], q1[1])
        gap = (-a - qq) / (np.abs(qq) + 1)

        def gap_judge(stats):
            tail = an.finite(an.last_window(common, gap, window)[1])
            r = float(np.median(tail[-max(1, len(tail) // 10):])) if len(tail) else 0.0
            st = an.BAD if r > rc.actor_q_gap_diverging else an.WARN if r > rc.actor_q_gap_warn else an.OK
            return st, f"{r:.3g} x (|Q|+1)", ""
        add("values", "-actor_loss - Q", f"<= {rc.actor_q_gap_warn:g} x (|Q| + 1)", -a - qq, gap_judge)
    else:
        add("values", "-actor_loss - Q", f"<= {rc.actor_q_gap_warn:g} x (|Q| + 1)", None)
    closs = get("train/critic_loss")

    def closs_judge(stats):
        w = an.finite(an.last_window(closs[0], closs[1], window)[1])
        a, b = an.ends(w) if len(w) else (0.0, 0.0)
        g = b / a if a > 0 else None
        return (an.WARN if g is not None and g > rc.critic_loss_growth_warn else an.OK), \
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
                fv = an.finite(an.last_window(s[0], s[1], window)[1])
                share = float(np.mean(fv > thr)) if len(fv) else 0.0
                st = an.BAD if stats["mean"] > 10 * thr else an.WARN if share > rc.clip_active_warn else an.OK
                return st, f"mean {stats['mean'] / thr - 1:+.0%} vs threshold", f"{share:.0%} of logged points above"
            label = name.replace("_norm_before_clip", " norm before clip").replace("_norm", " norm (before clip)")
            add("gradients", label, f"<= {thr:g} (clip threshold) in most updates", s[1] if s else None, before)
            after_tag = name.replace("_before_clip", "_after_clip") if "before" in name else name + "_after_clip"
            after = get(f"gradients/{after_tag}")

            def after_j(stats, thr=thr):
                st = an.BAD if stats["max"] > thr * 1.01 else an.OK
                return st, f"max {stats['max'] / thr:.0%} of threshold", ""
            add("gradients", label.replace("before clip", "after clip"), f"<= {thr:g} always",
                after[1] if after else None, after_j)
        frac = get(f"gradients/{group}_clip_fraction")

        def frac_j(stats):
            tail = stats["final"]
            return (an.WARN if stats["mean"] > rc.clip_active_warn else an.OK), f"clipping in {stats['mean']:.0%}", \
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
            return (an.OK if n == 0 else an.BAD if critical else an.WARN), f"{n:+g}", ""
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
            st = an.INFO if "length" in tag and not falling else an.WARN if falling else an.OK
            return st, _pct(change) + " first to last quarter", f"{first:.4g} -> {last:.4g} (quarter means)"
        add("learning", metric, expected, s[1] if s else None, trend_j)
    ev_rewards = np.array([e["reward"] for e in run.evals if isinstance(e.get("reward"), (int, float))], dtype=float)
    target = rc.eval_return_target

    def eval_j(stats):
        k = max(1, min(len(ev_rewards), cfg.workers.eval_episodes))
        last = float(ev_rewards[-k:].mean())
        stats["final"] = last  # the last evaluation round, not its last episode
        if target is not None:
            return (an.OK if last >= target else an.WARN), f"{last - target:+.4g} vs target", \
                f"last {k} episode(s)"
        first, lastq, change = _trend(ev_rewards)
        return (an.OK if lastq >= first else an.WARN), _pct(change) + " first to last quarter", f"last {k} episode(s)"
    add("learning", "evaluation return", f">= {target:g}" if target is not None else "growing",
        ev_rewards if len(ev_rewards) else None, eval_j)

    # throughput
    util = get("buffer/utilization")
    trans = get("buffer/transitions")

    def util_j(stats):
        if trans is None:
            return an.INFO, "", ""
        want = min(1.0, float(trans[1][-1]) / lc.replay_capacity)
        return (an.OK if abs(stats["final"] - want) <= 0.1 * max(want, 0.01) + 0.01 else an.WARN), \
            f"{stats['final'] - want:+.1%}", f"{int(trans[1][-1]):,} transitions / {lc.replay_capacity:,}"
    add("throughput", "buffer utilisation", "min(1, transitions / replay_capacity)", util[1] if util else None, util_j)
    utd = get("perf/update_to_data")

    def utd_j(stats):
        d = stats["final"] / lc.updates_per_step - 1
        return (an.OK if abs(d) <= 0.1 else an.WARN), _pct(d), ""
    add("throughput", "update-to-data ratio", f"{lc.updates_per_step:g} (learner.updates_per_step)",
        utd[1] if utd else None, utd_j)
    ups = get("perf/updates_per_s")

    def rate_j(minimum):
        def j(stats):
            if minimum is None:
                return an.INFO, "", ""
            return (an.OK if stats["mean"] >= minimum else an.WARN), _pct(stats["mean"] / minimum - 1), ""
        return j
    add("throughput", "updates/s", f">= {rc.min_updates_per_s:g}" if rc.min_updates_per_s is not None else
        "(no target set)", ups[1] if ups else None, rate_j(rc.min_updates_per_s))
    sps = steps_per_s(run)
    exp_steps = (f">= {rc.min_steps_per_s:g}" if rc.min_steps_per_s is not None else
                 f"~ updates/s / {lc.updates_per_step:g} once learning")
    add("throughput", "env steps/s", exp_steps, sps[1] if sps else None, rate_j(rc.min_steps_per_s))
    return rows


# -- 4. incidents ------------------------------------------------------------------------------------------------------

TIMELINE_KINDS = {ev.STALLED, ev.EVIDENCE_CAPTURED, ev.EVIDENCE_FAILED, ev.KILLED, ev.EXITED, ev.BACKOFF, ev.FAILED,
                  ev.SPAWNED, ev.SPAWN_FAILED, ev.RUNNING, ev.ALERT, ev.FAULT_INJECTED, ev.FAULT_ENDED,
                  ev.FAULT_FAILED, ev.DEPENDENCY_RESTART, ev.RESTART_REQUESTED, ev.RECYCLED, ev.RESUMED,
                  ev.DISK_LOW, ev.DISK_FULL, ev.FORCED_STOP, ev.STOPPING, ev.RUN_ENDED, ev.LEFTOVERS_KILLED}


def timeline(run: Run) -> list[dict]:
    """One row per incident-related event, with detection and recovery times and the stack of each stall."""
    events = [e for e in run.events if isinstance(e.get("time"), (int, float))]
    started = next((e["time"] for e in events if e.get("event") == ev.RUN_STARTED), None)
    by_dir = {i["dir"]: i for i in run.incidents}
    rows: list[dict] = []
    trouble: dict[str, float] = {}  # child -> when it was last found stalled or crashed
    used_dirs = set()
    for e in events:
        kind, name = e.get("event"), e.get("name")
        if kind not in TIMELINE_KINDS:
            continue
        if kind in (ev.SPAWNED, ev.RUNNING) and (e.get("incarnation") or 0) == 0 and name not in trouble:
            continue
        if kind == ev.EXITED and e.get("code") == 0 and e.get("state") in ("stopping", "running", None):
            continue
        row = {"time": e["time"], "clock": _clock(e["time"], started), "name": name, "event": kind, "detail": "",
               "stack": None}
        if kind == ev.STALLED:
            hb = e.get("heartbeat") or {}
            sent = hb.get("sent_at")
            row["detail"] = f"{e.get('reason')}; phase {hb.get('phase')}" + (
                f"; detected {e['time'] - sent:.1f}s after its last heartbeat" if isinstance(sent, (int, float))
                else "")
            trouble[name] = e["time"]
        elif kind == ev.EVIDENCE_CAPTURED:
            inc = by_dir.get(e.get("incident"))
            row["detail"] = str(e.get("incident"))
            if inc is not None:
                used_dirs.add(inc["dir"])
                row["stack"] = inc["top_frames"]
        elif kind == ev.EXITED:
            code = e.get("code")
            row["detail"] = f"exit {code} (was {e.get('state')})"
            if e.get("state") == "running":
                row["event"] = "crashed" if isinstance(code, int) and code > 0 else "killed (signal)"
                trouble[name] = e["time"]
        elif kind == ev.SPAWNED:
            row["event"] = "restarted"
            row["detail"] = f"incarnation {e.get('incarnation')}, pid {e.get('pid')}" + (
                " (standby)" if e.get("standby") else "")
        elif kind == ev.RUNNING:
            if name in trouble:
                row["event"] = "recovered"
                row["detail"] = f"running again {e['time'] - trouble.pop(name):.1f}s after it was found"
            else:
                continue
        elif kind == ev.FAULT_INJECTED:
            row["detail"] = f"chaos {e.get('fault')} -> {e.get('target')} (expect {e.get('expect')}, seen by " \
                            f"{e.get('seen_by')}, deadline {e.get('deadline_s')})"
        else:
            row["detail"] = "; ".join(f"{k}={v}" for k, v in e.items()
                                      if k not in ("time", "event", "name", "heartbeat", "pid", "children"))[:200]
        rows.append(row)
    for inc in run.incidents:  # evidence whose event never got written (a supervisor killed meanwhile)
        if inc["dir"] not in used_dirs:
            rows.append({"time": inc.get("time") or 0, "clock": _clock(inc.get("time"), started), "name": inc["name"],
                         "event": "incident", "detail": f"{inc['dir']}: {inc.get('reason')}; phase {inc.get('phase')}",
                         "stack": inc["top_frames"]})
    rows.sort(key=lambda r: r["time"])
    return rows


# -- the whole report ------------------------------------------------------------------------------------------------

@dataclass
class Analysed:
    run: Run
    status: dict
    q_max: float
    rows: list[Row]
    verdict: an.Verdict
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
    verdict = an.judge(series, q_max, {"critic": lc.max_grad_norm_critic, "actor": lc.max_grad_norm_actor},
                       run.cfg.report, alerts)
    return Analysed(run, run_status(run, now), q_max, table(run, q_max), verdict, timeline(run),
                    summarize_outcomes(fault_outcomes(run.events)))


STATUS_MARK = {an.OK: "ok", an.WARN: "**WARNING**", an.BAD: "**BAD**", an.INFO: "info", an.NO_DATA: "no data"}


def _status_lines(a: Analysed) -> list[str]:
    s = a.status
    lines = [f"**{s['status'].upper()}**: {s.get('reason')}" + (f" (exit {s['exit_code']})"
                                                              if s.get("exit_code") is not None else "")]
    if s.get("note"):
        lines.append(s["note"])
    steps = s.get("env_steps")
    if steps is not None:
        lines.append(f"env steps {steps:,} of max_timesteps {s['max_timesteps']:,} ({steps / s['max_timesteps']:.1%})")
    if s.get("last_update") is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_update_time"]))
        lines.append(f"last update logged: {s['last_update']:,} at {when}")
    lines.append(f"wall time {_dur(s.get('wall_s'))}")
    if s["status"] in (FROZEN, FAILED) and s.get("last_progress_time"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_progress_time"]))
        lines.append(f"last progress seen ({s['last_progress_what']}) at {when}; what the supervisor did since: "
                     + "; ".join(s.get("since_last_progress") or []))
    if s["restarts"]:
        lines.append("restarts: " + ", ".join(
            f"{k} {v.get('restarts', 0)} (" + ", ".join(f"{n} {c}" for c, n in sorted(v.items()) if c != "restarts")
            + ")" for k, v in s["restarts"].items()))
    else:
        lines.append("restarts: none")
    return lines


def _row_cells(r: Row) -> list[str]:
    st = r.stats or {}
    return [_fmt(st.get("final")), _fmt(st.get("mean")), _fmt(st.get("min")), _fmt(st.get("max")),
            STATUS_MARK[r.status], r.delta + (f" ({r.note})" if r.note else "")]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]


def verdict_lines(a: Analysed) -> list[str]:
    v = a.verdict
    out = [f"**Verdict: {v.verdict.upper()}**" + (f", first went wrong at update {v.first_wrong:,}"
                                                   if v.first_wrong is not None else "")]
    for f in v.findings:
        out.append(f"- {f.level}: {f.text}")
    if not v.findings:
        out.append("- no rule fired: values within Qmax, -actor_loss consistent with Q, clipping in at most half of the updates, no alerts")
    for name, label in (("actor_loss", "actor loss"), ("q", "Q (mean of q1, q2)")):
        g = v.growth.get(name)
        out.append(f"- {label}: " + (g.text() if g is not None else "too few points"))
    if v.gap is not None:
        out.append(f"- -actor_loss against Q: -actor_loss {v.gap['actor']:.4g}, Q {v.gap['q']:.4g}; gap "
                   f"(-actor_loss - Q)/(|Q|+1) = {v.gap['final_ratio']:.3g} over the last window (largest "
                   f"{v.gap['max_ratio']:.3g})")
    for group, c in v.clipping.items():
        active = f"clipping active in {c['clip_active']:.0%} of updates" if c["clip_active"] is not None else \
            f"{c['share_logged_above']:.0%} of logged means above the threshold"
        out.append(f"- {group} gradients: pre-clip median {_fmt(c['median'])}, max {_fmt(c['max'])} against "
                   f"threshold {c['threshold']:g}: {active}")
    if v.first_alert is not None:
        fa = v.first_alert
        tail = (f"{v.alert_lead:,} updates before the blow-up at update {v.blowup:,}" if v.alert_lead is not None
                and v.alert_lead >= 0 else f"{-v.alert_lead:,} updates after the blow-up at update {v.blowup:,}"
                if v.alert_lead is not None else "no blow-up (|Q| never passed 10 Qmax)")
        out.append(f"- first alert: {fa['level']}:{fa['rule']} at update {fa['update']:,}; {tail}")
    else:
        out.append("- no alert fired" + (f"; blow-up at update {v.blowup:,}" if v.blowup is not None else ""))
    return out


def render_markdown(runs: list[Analysed], plots: list[tuple[str, str]]) -> str:
    a = runs[0]
    names = [r.run.name for r in runs]
    md = [f"# Run report: {a.run.name}" + (f" (compared with {', '.join(names[1:])})" if len(runs) > 1 else ""), "",
          f"Run directory `{a.run.dir}`; written {time.strftime('%Y-%m-%d %H:%M:%S')}. Qmax = "
          f"{a.q_max:.4g} ({'report.q_max' if a.run.cfg.report.q_max else 'env.reward_max / (1 - gamma)'}).", ""]
    md += ["## 1. Run status", ""]
    for r in runs:
        if len(runs) > 1:
            md.append(f"**{r.run.name}**")
            md.append("")
        md += [f"- {line}" for line in _status_lines(r)]
        for p in r.run.problems:
            md.append(f"- read problem: {p}")
        md.append("")
    md += ["## 2. Expected against observed", ""]
    if len(runs) == 1:
        md += _md_table(["metric", "expected", "final", "mean", "min", "max", "status", "delta"],
                        [[r.metric, r.expected] + _row_cells(r) for r in a.rows])
    else:
        head = ["metric", "expected"]
        for r in runs:
            head += [f"{r.run.name} final", f"{r.run.name} mean", f"{r.run.name} status"]
        by = [{row.metric: row for row in r.rows} for r in runs]
        body = []
        for row in a.rows:
            cells = [row.metric, row.expected]
            for b in by:
                other = b.get(row.metric)
                st = other.stats if other is not None else None
                cells += [_fmt((st or {}).get("final")), _fmt((st or {}).get("mean")),
                          STATUS_MARK[other.status] if other is not None else "no data"]
            body.append(cells)
        md += _md_table(head, body)
    md += ["", "final: the last logged value (evaluation: the mean of the last round); each logged value is a "
           "mean over `learner.log_every` updates. Gradient norms are taken before clipping unless the row says "
           "after.", ""]
    md += ["## 3. Divergence analysis", ""]
    for r in runs:
        if len(runs) > 1:
            md += [f"**{r.run.name}**", ""]
        md += verdict_lines(r) + [""]
    md += ["## 4. Incidents", ""]
    for r in runs:
        if len(runs) > 1:
            md += [f"**{r.run.name}**", ""]
        if not r.timeline:
            md += ["No stalls, kills, crashes, restarts or alerts.", ""]
        else:
            md += _md_table(["time", "process", "event", "detail"],
                            [[t["clock"], str(t["name"]), t["event"], t["detail"]] for t in r.timeline])
            md.append("")
            for t in r.timeline:
                if t.get("stack"):
                    md += [f"Stack of {t['name']} at {t['clock']} ({t['detail'].split(';')[0]}):", "", "```"]
                    md += t["stack"] + ["```", ""]
        if r.faults:
            md += ["Chaos faults (detection: fault to stalled/exited; recovery: fault to running again):", "", "```"]
            md += format_summary(r.faults) + ["```", ""]
    md += ["## 5. Plots", ""]
    for title, fname in plots:
        md += [f"![{title}]({fname})", ""]
    if not plots:
        md += ["No plots (matplotlib is missing, or there was nothing to plot).", ""]
    md += ["Per-worker steps/s comes from `progress.jsonl`, which the supervisor writes from its children's "
           "heartbeats every 2 s; runs without it show the run's steps/s from `buffer/transitions`.", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    import html

    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_to_html(md: str, image_dir: Path, title: str) -> str:
    """The report's markdown (our own subset: headings, tables, lists, code, images) as one self-contained page."""
    import base64
    import html

    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}pre{background:#f4f4f4;padding:6px}"
           "img{max-width:100%}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            block = []
            while j < len(lines) and not lines[j].startswith("```"):
                block.append(lines[j])
                j += 1
            out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
            i = j + 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip())[1:-1]] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>")
            for r in cells[2:]:
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif (m := re.fullmatch(r"!\[(.*)\]\((.+)\)", line)):
            try:
                data = base64.b64encode((image_dir / m.group(2)).read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(m.group(1))}</figcaption></figure>")
            except OSError:
                out.append(f"<p>(missing plot {html.escape(m.group(2))})</p>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


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
        "incidents": [i["dir"].split("/", 1)[1] for i in run.incidents],
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
        from supervisor.plots import make_plots
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
    print(f"run {a.run.name}: " + "; ".join(_status_lines(a)[:1]).replace("**", ""))
    for line in _status_lines(a)[1:]:
        print(f"  {line}")
    print(f"  events: {', '.join(f'{k}={v}' for k, v in sorted(s['events'].items()))}")
    v = a.verdict
    print(f"  verdict: {v.verdict}" + (f" (first went wrong at update {v.first_wrong})"
                                       if v.first_wrong is not None else ""))
    for f in v.findings[:5]:
        print(f"    {f.level}: {f.text}")
    flagged = [r for r in a.rows if r.status in (an.WARN, an.BAD)]
    if flagged:
        print("  table: " + "; ".join(f"{r.metric} {r.status} ({r.delta})" for r in flagged))
    for st in s["stalls"]:
        print(f"  stalled: {st['name']}: {st['reason']}")
    print(f"  incidents: {len(s['incidents'])} (in {run_dir / 'incidents'})")
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
