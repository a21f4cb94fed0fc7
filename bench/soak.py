"""Soak: the stack under a random fault every 20 s, against the same run without faults.

``make soak`` (or ``python -m bench soak``, or ``python -m bench.soak``) runs
``configs/default.yaml`` with 3 workers for ``SOAK_S`` seconds (default 600) with
the supervisor's chaos schedule on (``chaos.every_s`` = ``SOAK_EVERY_S``, default
20; every fault the run can take: docker faults only where it has simulator
containers), then the same for ``SOAK_BASELINE_S`` seconds (default ``SOAK_S``)
without faults. It prints, and writes to ``bench/results/soak.json``:

- faults by kind, with detection (fault to ``stalled``/``exited``) and recovery
  (fault to the target ``running`` again) times, median and max, against the
  config's deadlines; for ``slow`` and ``garbage``, whether anything restarted;
  all read from ``events.jsonl`` by :func:`runreport.faults.fault_outcomes`;
- throughput (the env steps the learner stored, per second, from all running to
  the end) as a share of the fault-free run's; and the same once the rate limiter
  holds the workers (past ``learning_starts + rate_limit_slack`` stored steps, up
  to which workers step freely), which is what faults cost in a long run;
- steps lost: of those the learner acknowledged (it reports a step only once its
  replay index holds it), what a restarted learner no longer had (must be 0),
  from the learner's own count before each fault and its ``learner ready`` line
  after; and, for information, the steps lost in transit (never acknowledged:
  gaps in a worker's batch numbers, the replay's per-stream ``lost`` counters);
- zombies (before the stop), leftover processes, containers and ipc socket
  files after the stop (each must be 0);
- the supervisor's open fds and RSS when all ran and at the end.

``SOAK_KEEP=1`` keeps the run directories (printed); otherwise they go.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.stack import Stack  # noqa: E402
from protocol.states import RUNNING  # noqa: E402
from runreport.faults import (  # noqa: E402
    fault_outcomes,
    format_summary,
    summarize_outcomes,
)
from runreport.runfiles import read_jsonl  # noqa: E402

CONFIG = "configs/default.yaml"
WORKERS = 3
POLL_S = 0.5
DRAIN_S = 180.0  # at most this long after the last fault for the stack to repair it
UNSETTLED = ("not detected", "not running again", "window not over")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def start_run(runs_dir: Path, run_id: str, chaos: dict | None) -> Stack:
    """One supervisor on the default config (its own deadlines, not the tests' short ones), with chaos."""
    overrides = {"workers": {"count": WORKERS}, "run": {"max_timesteps": 10**9}}
    if chaos:
        overrides["chaos"] = chaos
    return Stack(runs_dir / run_id, overrides, base=CONFIG, fast=False, run_id=run_id).start()


def wait_running(run: Stack, timeout: float = 300) -> None:
    run.wait_running(timeout)


def drain(run: Stack, timeout: float) -> float:
    """After the last fault: until every fault is repaired (or its window over) and every child runs."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        s = run.status()
        unsettled = [o for o in fault_outcomes(run.events()) if not o["ok"] and o["note"] in UNSETTLED]
        if s is not None and not unsettled and all(p["state"] == RUNNING for p in s["processes"]):
            break
        time.sleep(POLL_S)
    return time.monotonic() - started


def run_log(run: Stack, name: str) -> list[dict]:
    return read_jsonl(run.run_dir / "logs" / f"{name}.jsonl")


def steps_lost(run: Stack) -> dict:
    """Acknowledged steps a restarted learner no longer had, and steps lost in transit (never acknowledged)."""
    ready = [r for r in run_log(run, "learner") if r.get("event") == "learner ready"]
    acked_before: dict[int, int] = {}  # the learner's stored count last reported by each incarnation
    for s in run.samples:
        acked_before[s["incarnation"]] = max(acked_before.get(s["incarnation"], 0), s["steps"])
    restarts = []
    for r in ready:
        inc = int(r.get("incarnation", 0))
        if inc == 0 or "transitions" not in r:
            continue
        before = max((v for k, v in acked_before.items() if k < inc), default=0)
        restarts.append({"incarnation": inc, "acknowledged_before": before, "resumed_with": r["transitions"],
                         "lost": max(0, before - r["transitions"])})
    index_path = run.run_dir / "replay" / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"streams": {}, "transitions_total": 0}
    sent = sum(v[2] for v in index["streams"].values())  # what each worker had stepped by its last batch stored
    in_transit = sum(v[3] for v in index["streams"].values())
    return {"acknowledged_lost": sum(r["lost"] for r in restarts), "learner_restarts": restarts,
            "stored": index.get("transitions_total", 0), "workers_sent_by_last_stored_batch": sent,
            "lost_in_transit_never_acknowledged": in_transit}


def fired_at(run: Stack) -> dict[int, float]:
    """When each fault inside a worker's step() fired (its own log), by fault id: a worker waiting for the
    learner takes it up only at its next step."""
    from datetime import datetime

    out = {}
    for path in (run.run_dir / "logs").glob("worker-*.jsonl"):
        for line in path.read_text().splitlines():
            if '"fault injected"' not in line or '"fault_id"' not in line:
                continue
            try:
                row = json.loads(line)
                out[int(row["fault_id"])] = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
    return out


def one(runs_dir: Path, run_id: str, seconds: float, chaos: dict | None) -> dict:
    run = start_run(runs_dir, run_id, chaos)
    try:
        wait_running(run)
        t0 = time.monotonic()
        at_start = run.resources()
        run.watch(seconds, POLL_S)
        t1 = time.monotonic()
        drained = drain(run, DRAIN_S) if chaos else 0.0
        at_end = run.resources()
        zombies = run.zombies()
        status = run.status()
    except BaseException:
        run.stop_supervisor(120)
        run.leftovers()
        raise
    code = run.stop_supervisor(120)
    left = run.leftovers()
    events = read_jsonl(run.run_dir / "events.jsonl")
    result = {"run_dir": str(run.run_dir), "seconds": round(t1 - t0, 1), "drain_s": round(drained, 1),
              "exit_code": code, "fired": fired_at(run),
              "steps_per_s": round(run.throughput(t0, t1), 2),
              "limited_steps_per_s": round(run.throughput(t0, t1, free_steps()), 2),
              "env_steps": status["env_steps"] if status else None,
              "restarts": {p["name"]: p["restarts"] for p in status["processes"]} if status else None,
              "supervisor": {"start": at_start, "end": at_end}, "zombies": zombies, "after_stop": left,
              "steps": steps_lost(run), "events": events}
    return result


def free_steps() -> int:
    """Stored steps up to which workers are not held by the learner's rate limiter."""
    from protocol.config import load_config

    lc = load_config(CONFIG).learner
    return lc.learning_starts + lc.rate_limit_slack


def _deadlines() -> dict:
    from protocol.config import load_config

    sup = load_config(CONFIG).supervisor
    return {k: getattr(sup, k) for k in ("heartbeat_interval_s", "heartbeat_deadline_s", "progress_deadline_s",
                                         "learner_deadline_s", "startup_deadline_s", "kill_grace_s",
                                         "evidence_timeout_s", "backoff_initial_s")}


def run(seconds: float | None = None, baseline_seconds: float | None = None) -> dict:
    seconds = seconds or _env_float("SOAK_S", 600.0)
    baseline_seconds = baseline_seconds or _env_float("SOAK_BASELINE_S", seconds)
    every = _env_float("SOAK_EVERY_S", 20.0)
    keep = os.environ.get("SOAK_KEEP") == "1"
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        print(f"soak: {CONFIG}, {WORKERS} workers, a random fault every {every:g}s for {seconds:g}s, "
              f"then {baseline_seconds:g}s without faults", flush=True)
        chaos = one(tmp, "chaos", seconds, {"every_s": every, "start_after_s": every, "stop_after_s": seconds,
                                            "seed": 1})
        print(f"  chaos run done: {chaos['env_steps']} env steps, {chaos['steps_per_s']} steps/s", flush=True)
        base = one(tmp, "baseline", baseline_seconds, None)
        print(f"  baseline run done: {base['env_steps']} env steps, {base['steps_per_s']} steps/s", flush=True)
    finally:
        if keep:
            print(f"  run directories kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    outcomes = fault_outcomes(chaos.pop("events"))
    base.pop("events")
    fired = chaos.pop("fired")
    base.pop("fired")
    for o in outcomes:  # for faults inside step(): when the worker took it up, and detection from then
        if o["id"] in fired:
            o["fired_s"] = round(fired[o["id"]] - o["time"], 3)
            if o["detect_s"] is not None:
                o["detect_after_fired_s"] = round(o["detect_s"] - o["fired_s"], 3)
    summary = summarize_outcomes(outcomes)
    deadlines = _deadlines()
    share = chaos["steps_per_s"] / base["steps_per_s"] if base["steps_per_s"] else None
    limited = (chaos["limited_steps_per_s"] / base["limited_steps_per_s"]) if base["limited_steps_per_s"] else None
    checks = {
        "every_fault_handled": all(o["ok"] for o in outcomes),
        "no_acknowledged_step_lost": chaos["steps"]["acknowledged_lost"] == 0,
        "no_zombies": not chaos["zombies"] and not base["zombies"],
        "nothing_left_after_stop": all(not r["after_stop"]["processes"] and not r["after_stop"]["socket_files"]
                                       and r["after_stop"]["containers"] == 0 for r in (chaos, base)),
        "clean_exit": chaos["exit_code"] == 0 and base["exit_code"] == 0,
    }
    result = {"config": CONFIG, "workers": WORKERS, "every_s": every, "seconds": seconds,
              "baseline_seconds": baseline_seconds, "deadlines": deadlines,
              "faults": summary, "outcomes": outcomes, "throughput_share": round(share, 3) if share else None,
              "limited_throughput_share": round(limited, 3) if limited else None,
              "chaos": chaos, "baseline": base, "checks": checks}
    print_result(result)
    return result


def print_result(r: dict) -> None:
    d = r["deadlines"]
    print(f"faults ({len(r['outcomes'])} in {r['chaos']['seconds']:g}s; deadlines: heartbeat "
          f"{d['heartbeat_deadline_s']:g}s, progress {d['progress_deadline_s']:g}s, learner "
          f"{d['learner_deadline_s']:g}s, kill grace {d['kill_grace_s']:g}s; no docker faults unless the run has "
          f"simulator containers):")
    for line in format_summary(r["faults"]):
        print(f"  {line}")
    for fault in ("hang", "crash", "slow"):
        rows = [o for o in r["outcomes"] if o["fault"] == fault]
        delays = [o["fired_s"] for o in rows if "fired_s" in o]
        after = [o["detect_after_fired_s"] for o in rows if "detect_after_fired_s" in o]
        if delays:
            print(f"  {fault}: taken up by the worker after max {max(delays):.2f}s (its next step; a worker waiting "
                  f"for the learner takes longer)" + (f"; detected max {max(after):.2f}s after firing" if after else ""))
    c, b = r["chaos"], r["baseline"]
    share = f"{r['throughput_share']:.0%}" if r["throughput_share"] is not None else "n/a"
    print(f"throughput: {c['steps_per_s']} env steps/s under faults vs {b['steps_per_s']} without = {share} "
          f"(stored steps, from all running to the end of the faults; the stack repaired the last in "
          f"{c['drain_s']:g}s)")
    lshare = f"{r['limited_throughput_share']:.0%}" if r["limited_throughput_share"] is not None else "n/a"
    print(f"  once the rate limiter holds the workers (past {free_steps()} stored steps): "
          f"{c['limited_steps_per_s']} vs {b['limited_steps_per_s']} = {lshare}; on a shared machine, other load "
          f"moves both")
    st = c["steps"]
    print(f"steps: {st['stored']} stored; acknowledged and then lost: {st['acknowledged_lost']} over "
          f"{len(st['learner_restarts'])} learner restarts; lost in transit (never acknowledged): "
          f"{st['lost_in_transit_never_acknowledged']}")
    for name, run in (("chaos", c), ("baseline", b)):
        a = run["after_stop"]
        s0, s1 = run["supervisor"]["start"], run["supervisor"]["end"]
        print(f"{name}: exit {run['exit_code']}; zombies {len(run['zombies'])}; after stop: processes "
              f"{len(a['processes'])}, containers {a['containers']}, socket files {len(a['socket_files'])}; "
              f"supervisor fds {s0['fds']} -> {s1['fds']}, RSS {s0['rss_bytes'] / 2**20:.1f} -> "
              f"{s1['rss_bytes'] / 2**20:.1f} MiB")
    failed = [k for k, ok in r["checks"].items() if not ok]
    print("checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)))


def main() -> int:
    result = run()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(f"written to {out / 'soak.json'}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
