"""Freeze recovery: time from a worker's freeze to its replacement stepping again.

A hang is injected inside ``step()``; the time runs from the fault (the frozen
worker's own log) to the first status in which the replacement has stepped. The
target is the configured progress deadline plus at most 2 s. The baseline in the
same run is the same freeze with standby workers off (a cold Python start).
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

from harness.stack import Stack


def one_freeze(tmp: Path, deadline_s: float, standby: bool) -> float:
    stack = Stack(tmp, {
        "workers": {"faults": [{"kind": "hang", "where": "step", "at_step": 300, "slots": [0],
                                "incarnations": [0]}]},
        "supervisor": {"progress_deadline_s": deadline_s, "heartbeat_interval_s": 0.2,
                       "heartbeat_deadline_s": 2.0, "kill_grace_s": 2.0, "backoff_initial_s": 0.2,
                       "standby_workers": standby},
    }, paced=False).start()  # Pendulum at full speed, as the figures measured before the paced one existed
    try:
        seen_at = None
        deadline = time.monotonic() + deadline_s + 120
        while time.monotonic() < deadline:
            s = stack.status()
            if s is not None:
                w = next(p for p in s["processes"] if p["name"] == "worker-0")
                if w["incarnation"] >= 1 and w["env_steps"] > 0:
                    seen_at = time.time()
                    break
            time.sleep(0.02)
        if seen_at is None:
            raise RuntimeError("the frozen worker was not replaced\n" + stack.diagnostics())
        fault = next(json.loads(line) for line in stack.log("worker-0").splitlines()
                     if '"fault injected"' in line)
        fault_at = datetime.fromisoformat(fault["timestamp"].replace("Z", "+00:00")).timestamp()
        return seen_at - fault_at
    finally:
        stack.stop()


def run(deadline_s: float = 10.0, repeats: int = 2) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-freeze-") as d:
        for standby in (False, True):
            times = [one_freeze(Path(d) / f"{standby}-{i}", deadline_s, standby) for i in range(repeats)]
            results["standby" if standby else "cold"] = times
    best = max(results["standby"])
    cold = max(results["cold"])
    print(f"freeze recovery, progress deadline {deadline_s:g}s (worst of {repeats}):")
    print(f"  cold start (baseline): {cold:.2f}s = deadline + {cold - deadline_s:.2f}s   runs {results['cold']}")
    print(f"  standby worker:        {best:.2f}s = deadline + {best - deadline_s:.2f}s   runs {results['standby']}")
    print(f"  overshoot ratio standby/cold: {(best - deadline_s) / max(cold - deadline_s, 1e-9):.2f}   "
          f"target: deadline + 2s -> {'met' if best - deadline_s <= 2.0 else 'MISSED'}")
    return {"deadline_s": deadline_s, **results}
