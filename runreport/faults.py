"""What became of each chaos fault, from a run's ``events.jsonl`` alone: detection and recovery.

The supervisor's chaos (:mod:`supervisor.chaos`) records each fault as a
``fault_injected`` event, and a fault the stack must shrug off also as
``fault_ended``; what the stack did about it is in the same events (``stalled``,
``exited``, ``running``). :func:`fault_outcomes` reads each fault's outcome from
them, :func:`summarize_outcomes` sums them up per kind of fault and
:func:`format_summary` writes that for people (the run report and the soak
benchmark use all three).
"""

from __future__ import annotations

import statistics

from protocol import chaos as pc
from protocol import events as ev
from protocol.states import UP

UNPLANNED_EXIT_STATES = UP  # an exit in these states is the child's own doing


def fault_outcomes(events: list[dict]) -> list[dict]:
    """Each injected fault and what the stack did about it, from the events of a run alone.

    For a fault the stack must repair (``expect: restart``): ``detected`` (the
    first ``stalled`` or ``exited`` of the target's pid after it), ``detect_s``,
    ``cause`` (named from the stall's evidence, or the exit's status),
    ``recover_s`` (to the target's first ``running`` as a new incarnation), ``ok``
    when it was replaced. For one it must shrug off (``no_restart``): ``restarted``
    (a stall, or an exit the child did not ask for, of the target, or for
    ``garbage`` of any child not then recovering from another fault, injected
    before or after it, before ``fault_ended``), ``progress`` (``slow``: the
    target's progress in the window), ``ok`` when nothing was restarted and a slow
    target kept progressing.
    """
    events = [e for e in events if isinstance(e, dict) and "event" in e]
    injected = [(i, f) for i, f in enumerate(events) if f["event"] == ev.FAULT_INJECTED]
    rows = {i: _row(f) for i, f in injected}
    busy: list[tuple[str, float, float]] = []  # (child, from, to): recovering from a fault the stack must repair
    for i, f in injected:  # first every repair, so that a shrug-off's window knows them all
        if f.get("expect") == pc.RESTART:
            busy.append(_repaired(events, i, f, rows[i]))
    ended = {e.get("id"): (i, e) for i, e in enumerate(events) if e["event"] == ev.FAULT_ENDED}
    for i, f in injected:
        if f.get("expect") != pc.RESTART:
            _shrugged_off(events, i, f, rows[i], ended, busy)
    return [rows[i] for i, _ in injected]


def _row(f: dict) -> dict:
    return {"id": f.get("id"), "fault": f.get("fault"), "target": f.get("target"), "time": f["time"],
            "source": f.get("source"), "expect": f.get("expect"), "deadline_s": f.get("deadline_s"),
            "detected": None, "detect_s": None, "cause": None, "recover_s": None, "restarted": False, "progress": None,
            "dropped": None, "ok": False, "note": ""}


def _repaired(events: list[dict], i: int, f: dict, row: dict) -> tuple[str, float, float]:
    """Detection and recovery of a fault the stack must repair; returns the target's busy window."""
    name, pid, incarnation = f["name"], f.get("pid"), f.get("incarnation")
    detected_at, respawned = None, False
    for j in range(i + 1, len(events)):
        e = events[j]
        if e["name"] != name:
            continue
        hit = e["event"] in (ev.STALLED, ev.EXITED) and (pid is None or e.get("pid") == pid)
        if detected_at is None and hit:
            detected_at = j
            row["detected"], row["restarted"] = e["event"], True
            row["detect_s"] = round(e["time"] - f["time"], 3)
            row["cause"] = e.get("cause")  # an exit's; a stall's comes with its evidence
        elif detected_at is not None and e["event"] == ev.EVIDENCE_CAPTURED and row["cause"] is None \
                and events[detected_at]["event"] == ev.STALLED:
            row["cause"] = e.get("cause")
        elif e["event"] == ev.SPAWNED and incarnation is not None and e.get("incarnation") != incarnation:
            respawned = True  # a new incarnation, whether or not its driver knows a pid
        elif detected_at is not None and e["event"] == ev.RUNNING and (respawned or e.get("pid") != pid):
            row["recover_s"] = round(e["time"] - f["time"], 3)
            break
        elif e["event"] == ev.FAILED:
            row["note"] = f"failed: {e.get('reason')}"
            break
    row["ok"] = row["recover_s"] is not None
    if detected_at is None:
        row["note"] = row["note"] or "not detected"
    elif row["recover_s"] is None and not row["note"]:
        row["note"] = "not running again"
    return name, f["time"], f["time"] + row["recover_s"] if row["recover_s"] is not None else float("inf")


def _shrugged_off(events: list[dict], i: int, f: dict, row: dict, ended: dict,
                  busy: list[tuple[str, float, float]]) -> None:
    """Whether anything was restarted in the window of a fault the stack must leave alone."""
    name = f["name"]
    end_index, end = ended.get(f.get("id"), (len(events), None))
    restarted = []
    for e in events[i + 1:end_index]:
        if e["event"] == ev.STALLED or (e["event"] == ev.EXITED and e.get("state") in UNPLANNED_EXIT_STATES):
            if name != "run" and e["name"] != name:
                continue
            if any(b == e["name"] and lo <= e["time"] <= hi for b, lo, hi in busy):
                continue  # recovering from another fault
            restarted.append(e["name"])
    row["restarted"] = bool(restarted)
    if end is not None:
        row["progress"], row["dropped"] = end.get("progress"), end.get("dropped")
    if end is None:
        row["note"] = "window not over"
    elif restarted:
        row["note"] = f"restarted: {', '.join(sorted(set(restarted)))}"
    elif f.get("fault") == "slow" and not (row["progress"] or 0) > 0:
        # a slow step fires at the worker's next step: one held by the learner's rate limiter through the
        # whole window took no step in it, slow or not; that it was not killed is all there is to judge
        row["note"] = "no step in its window (the worker was held by the rate limiter)"
    row["ok"] = end is not None and not restarted


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3), "n": len(values)}


def summarize_outcomes(outcomes: list[dict]) -> dict[str, dict]:
    """Per fault kind: how many, how many handled as they must be, detection and recovery (median, max)."""
    out: dict[str, dict] = {}
    for fault in sorted({o["fault"] for o in outcomes}):
        rows = [o for o in outcomes if o["fault"] == fault]
        deadlines = sorted({o["deadline_s"] for o in rows if o["deadline_s"] is not None})
        out[fault] = {"injected": len(rows), "ok": sum(o["ok"] for o in rows), "expect": rows[0]["expect"],
                      "deadline_s": deadlines[-1] if deadlines else None,
                      "detect_s": _stats([o["detect_s"] for o in rows if o["detect_s"] is not None]),
                      "recover_s": _stats([o["recover_s"] for o in rows if o["recover_s"] is not None]),
                      "restarted": sum(o["restarted"] for o in rows) if rows[0]["expect"] == pc.NO_RESTART else None,
                      "causes": sorted({o["cause"] for o in rows if o.get("cause")}),
                      "notes": sorted({o["note"] for o in rows if o["note"]})}
    return out


def format_summary(summary: dict[str, dict]) -> list[str]:
    """One line per fault kind, for people."""
    lines = []
    for fault, s in summary.items():
        line = f"{fault:16s} {s['ok']}/{s['injected']} ok"
        if s["expect"] == pc.RESTART:
            d, r = s["detect_s"], s["recover_s"]
            line += (f"   detect median {d['median']:.2f}s max {d['max']:.2f}s" if d else "   never detected")
            if s["deadline_s"] is not None:
                line += f" (deadline {s['deadline_s']:g}s)"
            line += f"   recover median {r['median']:.2f}s max {r['max']:.2f}s" if r else "   never recovered"
            if s.get("causes"):
                line += f"   cause {', '.join(s['causes'])}"
        else:
            line += f"   restarted {s['restarted']}"
        if s["notes"]:
            line += "   " + "; ".join(s["notes"])
        lines.append(line)
    return lines
