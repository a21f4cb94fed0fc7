"""A run's status (completed, running, stopped, failed, frozen), its steps, wall time and restarts.

Read from ``events.jsonl``, the supervisor's state file, ``progress.jsonl`` and
the metrics' wall times: a run that ended says how; one that did not is running,
frozen (its supervisor lives, but nothing progressed for long) or failed (its
supervisor is gone without a word).
"""

from __future__ import annotations

import time
from collections import Counter

from protocol import events as ev
from protocol import states
from protocol.roles import LEARNER
from protocol.runstate import supervisor_alive
from protocol.text import duration
from runreport.runfiles import Run

# A run's status: three of them are named as a child's states are.
COMPLETED, FROZEN = "completed", "frozen"
RUNNING, STOPPED, FAILED = states.RUNNING, states.STOPPED, states.FAILED


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
                       f"{duration(now - last_t, missing='?') if last_t else 'the whole run'} "
                       f"(more than {frozen_after:g}s)")
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
        out["since_last_progress"] = [f"{clock(e['time'], started)} {e.get('name')}: {e.get('event')}"
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
        elif kind == ev.EXITED and e.get("code") not in (0, None) and e.get("state") == states.RUNNING:
            restarts.setdefault(name, Counter())["crashes"] += 1
        elif kind in (ev.RESTART_REQUESTED, ev.DEPENDENCY_RESTART, ev.RECYCLED, ev.FAILED):
            restarts.setdefault(name, Counter())[kind] += 1
    out["restarts"] = {k: dict(v) for k, v in sorted(restarts.items()) if k}
    return out


def clock(t, started) -> str:
    """``t`` as time since the run started (``+3m07s``), or as the time of day when the start is unknown."""
    if not isinstance(t, (int, float)):
        return "?"
    if isinstance(started, (int, float)):
        return f"+{duration(t - started, missing='?')}"
    return time.strftime("%H:%M:%S", time.localtime(t))
