"""``supervisor report RUN_DIR``: what happened in a run, from its files alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from protocol import events as ev
from supervisor.chaos import fault_outcomes, format_summary, summarize_outcomes


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return rows


def summarize(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    events = read_jsonl(run_dir / "events.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    kinds = Counter(e["event"] for e in events)
    stalls = [{"name": e["name"], "reason": e.get("reason")} for e in events if e["event"] == ev.STALLED]
    restarts = Counter(e["name"] for e in events if e["event"] == ev.BACKOFF)
    incidents = sorted(p.name for p in (run_dir / "incidents").glob("*") if p.is_dir())
    last_evals = evals[-10:]
    return {
        "run_dir": str(run_dir), "events": dict(kinds), "stalls": stalls, "restarts": dict(restarts),
        "failed": [e["name"] for e in events if e["event"] == ev.FAILED], "incidents": incidents,
        "eval_episodes": len(evals),
        "last_eval_mean": sum(e["reward"] for e in last_evals) / len(last_evals) if last_evals else None,
        "last_eval_env_steps": last_evals[-1]["env_steps"] if last_evals else None,
        "ended": next((e for e in reversed(events) if e["event"] == ev.RUN_ENDED), None),
        "faults": summarize_outcomes(fault_outcomes(events)),
    }


def report(run_dir: Path, as_json: bool = False) -> int:
    if not Path(run_dir).is_dir():
        print(f"report: no run directory at {run_dir}")
        return 2
    s = summarize(run_dir)
    if as_json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"run {Path(run_dir).name}")
    print(f"  events: {', '.join(f'{k}={v}' for k, v in sorted(s['events'].items()))}")
    print(f"  restarts: {s['restarts'] or 'none'}   failed: {s['failed'] or 'none'}")
    for st in s["stalls"]:
        print(f"  stalled: {st['name']}: {st['reason']}")
    print(f"  incidents: {len(s['incidents'])} (in {Path(run_dir) / 'incidents'})")
    if s["last_eval_mean"] is not None:
        print(f"  evaluation: mean return {s['last_eval_mean']:.1f} over the last episodes, "
              f"at {s['last_eval_env_steps']} env steps")
    if s["faults"]:
        print("  chaos faults (detection: fault to stalled/exited; recovery: fault to running again):")
        for line in format_summary(s["faults"]):
            print(f"    {line}")
    if s["ended"]:
        print(f"  ended: {s['ended'].get('reason')} (exit {s['ended'].get('exit_code')})")
    return 0
