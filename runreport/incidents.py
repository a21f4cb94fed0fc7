"""A run's incidents in order: stalls, kills, crashes, restarts, alerts and chaos faults, with stacks.

One row per incident-related event of ``events.jsonl``, with detection and
recovery times and the top frames of each captured stack; evidence whose event
never got written (a supervisor killed meanwhile) gets a row of its own.
"""

from __future__ import annotations

from protocol import causes
from protocol import events as ev
from protocol import states
from runreport.runfiles import Run
from runreport.status import clock

TIMELINE_KINDS = {ev.STALLED, ev.EVIDENCE_CAPTURED, ev.EVIDENCE_FAILED, ev.KILLED, ev.EXITED, ev.BACKOFF, ev.FAILED,
                  ev.SPAWNED, ev.SPAWN_FAILED, ev.RUNNING, ev.ALERT, ev.FAULT_INJECTED, ev.FAULT_ENDED,
                  ev.FAULT_FAILED, ev.DEPENDENCY_RESTART, ev.RESTART_REQUESTED, ev.RECYCLED, ev.RESUMED,
                  ev.DISK_LOW, ev.DISK_FULL, ev.FORCED_STOP, ev.STOPPING, ev.RUN_ENDED, ev.LEFTOVERS_KILLED,
                  ev.ORPHANS_REMOVED}


def timeline(run: Run) -> list[dict]:
    """One row per incident-related event, with detection and recovery times and the stack of each stall."""
    events = [e for e in run.events if isinstance(e.get("time"), (int, float))]
    started = next((e["time"] for e in events if e.get("event") == ev.RUN_STARTED), None)
    by_dir = {i["dir"]: i for i in run.incidents}
    rows: list[dict] = []
    trouble: dict[str, float] = {}  # child -> when it was last found stalled or crashed
    used_dirs = set()
    for i, e in enumerate(events):
        kind, name = e.get("event"), e.get("name")
        if kind not in TIMELINE_KINDS:
            continue
        if kind in (ev.SPAWNED, ev.RUNNING) and (e.get("incarnation") or 0) == 0 and name not in trouble:
            continue
        if kind == ev.EXITED and e.get("code") == 0 and e.get("state") in (states.STOPPING, states.RUNNING, None):
            continue
        row = {"time": e["time"], "clock": clock(e["time"], started), "name": name, "event": kind, "detail": "",
               "stack": None}
        if kind == ev.STALLED:
            hb = e.get("heartbeat") or {}
            sent = hb.get("sent_at")
            # its cause, named once its evidence was written (the stall's evidence_captured, which follows)
            named = next((f.get("cause") for f in events[i + 1:] if f.get("name") == name
                          and f.get("event") in (ev.EVIDENCE_CAPTURED, ev.EVIDENCE_FAILED, ev.STALLED)), None)
            row["detail"] = f"{e.get('reason')}; phase {hb.get('phase')}" + (
                f"; detected {e['time'] - sent:.1f}s after its last heartbeat" if isinstance(sent, (int, float))
                else "") + (f"; cause {named}" if named else "")
            trouble[name] = e["time"]
        elif kind == ev.EVIDENCE_CAPTURED:
            inc = by_dir.get(e.get("incident"))
            cause = e.get("cause") or (inc or {}).get("cause") or causes.UNKNOWN
            row["detail"] = f"cause {cause}: {causes.advice(cause)} ({e.get('incident')})"
            if inc is not None:
                used_dirs.add(inc["dir"])
                row["stack"] = inc["top_frames"]
        elif kind == ev.EXITED:
            code = e.get("code")
            row["detail"] = f"exit {code} (was {e.get('state')})"
            if e.get("state") == states.RUNNING:
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
            rows.append({"time": inc.get("time") or 0, "clock": clock(inc.get("time"), started), "name": inc["name"],
                         "event": "incident", "detail": f"cause {inc['cause']}: {inc.get('reason')}; phase "
                                                        f"{inc.get('phase')} ({inc['dir']})",
                         "stack": inc["top_frames"]})
    rows.sort(key=lambda r: r["time"])
    return rows


def causes_by_child(run: Run) -> dict[str, dict[str, int]]:
    """How many incidents (stalls, and a container's exits of its own) of each cause each child had over the run
    (its slot's name: worker-3, carla-3)."""
    table: dict[str, dict[str, int]] = {}
    for inc in run.incidents:
        row = table.setdefault(str(inc["name"]), {})
        row[inc["cause"]] = row.get(inc["cause"], 0) + 1
    return dict(sorted(table.items()))


def outliers(run: Run, at_least: int = 3, times: float = 3.0) -> list[str]:
    """Children with far more incidents than their peers of the same kind (the name before its number), among every
    child the run's events name: a slot that fails far more often than the others points at its host or GPU, not
    at the code."""
    table = causes_by_child(run)
    names = {e["name"] for e in run.events if isinstance(e.get("name"), str)}
    counts = {name: sum(table.get(name, {}).values()) for name in names | set(table)}
    out = []
    for name, n in sorted(counts.items()):
        kind = name.rstrip("0123456789")
        peers = [m for other, m in counts.items() if other != name and other.rstrip("0123456789") == kind]
        if peers and n >= at_least and n >= times * max(sum(peers) / len(peers), 1.0):
            out.append(f"{name} had {n} incidents, its peers {sum(peers) / len(peers):.1f} on average: look at its "
                       "host or GPU before the code")
    return out
