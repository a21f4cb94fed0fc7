"""What became of each injected fault, from a run's events alone."""

import pytest

from protocol import events as ev
from protocol.states import RUNNING, STALLED
from runreport.faults import fault_outcomes, format_summary, summarize_outcomes


def _e(t, kind, name, **fields):
    return {"time": t, "event": kind, "name": name, **fields}


def _injected(t, fid, fault, name, pid, expect, deadline=None):
    return _e(t, ev.FAULT_INJECTED, name, id=fid, fault=fault, target=name if name != "run" else "heartbeat",
              pid=pid, incarnation=0, source="command", expect=expect, seen_by="x", deadline_s=deadline, options={})


@pytest.mark.timeout(30)
def test_fault_outcomes_from_events_alone():
    events = [
        _e(0.0, ev.RUN_STARTED, "run"),
        _injected(10.0, 1, "hang", "worker-0", 100, "restart", 10.0),
        _e(11.0, ev.RUNNING, "worker-1", pid=201, phase="stepping"),  # someone else's: not the recovery
        _e(20.5, ev.STALLED, "worker-0", pid=100, reason="no progress"),
        _e(22.0, ev.EXITED, "worker-0", pid=100, code=0, state=STALLED),
        _e(22.3, ev.SPAWNED, "worker-0", pid=101, incarnation=1, standby=True),
        _e(23.0, ev.RUNNING, "worker-0", pid=101, phase="stepping"),
        _injected(30.0, 2, "learner_sigkill", "learner", 50, "restart"),
        _e(30.1, ev.EXITED, "learner", pid=50, code=-9, state=RUNNING),
        # garbage while the learner recovers: its restart is the other fault's, not the garbage's
        _injected(31.0, 3, "garbage", "run", None, "no_restart"),
        _e(33.0, ev.FAULT_ENDED, "run", id=3, fault="garbage", target="heartbeat", progress=None, dropped=8),
        _e(36.0, ev.RUNNING, "learner", pid=51, phase="waiting_data"),
        _injected(40.0, 4, "slow", "worker-1", 201, "no_restart"),
        _e(54.0, ev.FAULT_ENDED, "worker-1", id=4, fault="slow", target="worker-1", progress=40, dropped=0),
        _injected(60.0, 5, "slow", "worker-0", 101, "no_restart"),
        _e(63.0, ev.STALLED, "worker-0", pid=101, reason="no progress"),  # a slow step killed: wrong
        _e(74.0, ev.FAULT_ENDED, "worker-0", id=5, fault="slow", target="worker-0", progress=None, dropped=0),
        _injected(80.0, 6, "worker_sigstop", "worker-1", 201, "restart", 5.0),  # never found
        _injected(90.0, 7, "garbage", "run", None, "no_restart"),
        _e(90.5, ev.EXITED, "worker-2", pid=300, code=1, state=RUNNING),  # crashed in the window: a restart
        _e(92.0, ev.FAULT_ENDED, "run", id=7, fault="garbage", target="heartbeat", progress=None, dropped=8),
    ]
    out = {o["id"]: o for o in fault_outcomes(events)}
    assert out[1]["detected"] == ev.STALLED and out[1]["detect_s"] == 10.5 and out[1]["recover_s"] == 13.0
    assert out[1]["ok"] and out[1]["deadline_s"] == 10.0
    assert out[2]["detected"] == "exited" and out[2]["detect_s"] == pytest.approx(0.1) and out[2]["recover_s"] == 6.0
    assert out[3]["ok"] and not out[3]["restarted"] and out[3]["dropped"] == 8
    assert out[4]["ok"] and out[4]["progress"] == 40 and out[4]["recover_s"] is None
    assert not out[5]["ok"] and out[5]["restarted"] and "worker-0" in out[5]["note"]
    assert not out[6]["ok"] and out[6]["detected"] is None and out[6]["note"] == "not detected"
    assert not out[7]["ok"] and out[7]["restarted"] and out[7]["note"] == "restarted: worker-2"
    summary = summarize_outcomes(list(out.values()))
    assert summary["hang"]["detect_s"] == {"median": 10.5, "max": 10.5, "n": 1} and summary["hang"]["ok"] == 1
    assert summary["slow"] == {**summary["slow"], "injected": 2, "ok": 1, "restarted": 1}
    assert summary["garbage"]["injected"] == 2 and summary["garbage"]["ok"] == 1
    lines = format_summary(summary)
    assert any(line.startswith("hang") and "deadline 10s" in line for line in lines)
    assert fault_outcomes([_injected(1.0, 1, "crash", "worker-0", 9, "restart")])[0]["note"] == "not detected"


def test_a_fault_injected_during_a_shrug_off_window_is_not_blamed_on_it():
    """garbage, then a hang inside its window: the hung worker's stall is the hang's, not the garbage's."""
    events = [
        _injected(10.0, 1, "garbage", "run", None, "no_restart"),
        _injected(11.0, 2, "hang", "worker-1", 201, "restart", 3.0),
        _e(14.0, ev.STALLED, "worker-1", pid=201, reason="no progress"),
        _e(14.5, ev.EXITED, "worker-1", pid=201, code=-15, state=STALLED),
        _e(15.0, ev.FAULT_ENDED, "run", id=1, fault="garbage", target="heartbeat", progress=None, dropped=9),
        _e(15.2, ev.SPAWNED, "worker-1", pid=202, incarnation=1, standby=False),
        _e(16.0, ev.RUNNING, "worker-1", pid=202, phase="stepping"),
    ]
    out = {o["id"]: o for o in fault_outcomes(events)}
    assert out[1]["ok"] and not out[1]["restarted"] and out[1]["dropped"] == 9, out[1]
    assert out[2]["ok"] and out[2]["detect_s"] == 3.0 and out[2]["recover_s"] == 5.0


def test_a_simulator_without_a_pid_recovers_as_its_next_incarnation():
    events = [
        _injected(10.0, 1, "docker_kill", "carla-0", None, "restart", 6.0),
        _e(10.2, ev.EXITED, "carla-0", pid=None, code=-9, state=RUNNING),
        _e(11.0, ev.SPAWNED, "carla-0", pid=None, incarnation=1, standby=False),
        _e(12.0, ev.RUNNING, "carla-0", pid=None, phase="serving"),
    ]
    (out,) = fault_outcomes(events)
    assert out["ok"] and out["recover_s"] == 2.0, out
