"""The supervisor's state machine, driven by a fake clock: no processes, no sleeping."""

import random
import signal

import pytest

from supervisor.state import (BACKOFF, FAILED, RUNNING, STALLED, STARTING, STOPPED, STOPPING, CaptureEvidence,
                              ChildSpec, EndRun, Event, Limits, Signal, Spawn, Supervision)

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


LIMITS = Limits(heartbeat_deadline_s=5, progress_deadline_s=10, startup_deadline_s=30, learner_deadline_s=60,
                kill_grace_s=2, stop_grace_s=15, evidence_timeout_s=3, backoff_initial_s=1, backoff_max_s=8,
                backoff_jitter=0.0, healthy_reset_s=60, max_restarts=3, restart_window_s=100)


def make(limits=LIMITS, workers=2):
    clock = FakeClock()
    specs = [ChildSpec("learner", "learner")] + [ChildSpec(f"worker-{i}", "worker", i) for i in range(workers)]
    sup = Supervision(specs, limits, clock, random.Random(0))
    pids = iter(range(100, 10_000))
    for a in sup.start():
        assert isinstance(a, Spawn)
        sup.spawned(a.name, next(pids))
    return sup, clock, pids


def beat(sup, name, phase="stepping", env_steps=0, updates=0, phase_age_s=0.0):
    c = sup.children[name]
    return sup.heartbeat({"name": name, "pid": c.pid, "phase": phase, "env_steps": env_steps, "updates": updates,
                          "phase_age_s": phase_age_s})


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def run_all(sup, clock):
    """Bring every child to running."""
    for name in sup.children:
        beat(sup, name, "training" if name == "learner" else "stepping")
    assert all(c.state == RUNNING for c in sup.children.values())


def test_start_spawns_learner_first():
    clock = FakeClock()
    sup = Supervision([ChildSpec("worker-0", "worker", 0), ChildSpec("learner", "learner")], LIMITS, clock)
    actions = sup.start()
    assert [a.name for a in actions] == ["learner", "worker-0"]
    assert all(c.state == STARTING for c in sup.children.values())


def test_first_progressing_heartbeat_makes_running():
    sup, clock, _ = make()
    beat(sup, "worker-0", "connecting")
    assert sup.children["worker-0"].state == STARTING
    beat(sup, "worker-0", "stepping")
    assert sup.children["worker-0"].state == RUNNING


def test_heartbeat_from_old_incarnation_is_ignored():
    sup, clock, _ = make()
    sup.heartbeat({"name": "worker-0", "pid": 99999, "phase": "stepping", "env_steps": 5})
    assert sup.children["worker-0"].state == STARTING


def test_progressing_worker_is_not_killed():
    sup, clock, _ = make()
    run_all(sup, clock)
    for step in range(1, 60):  # slow (one step per second) but progressing, for a minute
        clock.advance(1.0)
        beat(sup, "worker-0", "stepping", env_steps=step)
        beat(sup, "worker-1", "stepping", env_steps=step)
        beat(sup, "learner", "training", updates=step)
        assert not of(sup.tick(), CaptureEvidence)
    assert sup.children["worker-0"].state == RUNNING


def test_worker_without_progress_is_stalled_with_evidence_first():
    sup, clock, _ = make()
    run_all(sup, clock)
    for _ in range(10):
        clock.advance(1.0)
        beat(sup, "worker-0", "stepping", env_steps=7)  # heartbeats keep coming, steps do not
        assert sup.children["worker-0"].state == RUNNING or clock.now - 1000 > 10
        sup.tick()
    clock.advance(1.5)
    beat(sup, "worker-0", "stepping", env_steps=7)
    actions = sup.tick()
    assert sup.children["worker-0"].state == STALLED
    cap = of(actions, CaptureEvidence)
    assert cap and cap[0].name == "worker-0" and "no progress" in cap[0].reason
    assert not of(actions, Signal), "evidence is captured before any signal"
    pid = sup.children["worker-0"].pid
    actions = sup.evidence_done("worker-0", "incidents/x")
    sigs = [a.signum for a in of(actions, Signal)]
    assert sigs == [signal.SIGTERM, signal.SIGCONT] and of(actions, Signal)[0].pid == pid


def test_worker_waiting_on_a_dead_learner_is_not_killed():
    sup, clock, _ = make()
    run_all(sup, clock)
    for _ in range(120):
        clock.advance(1.0)
        beat(sup, "worker-0", "waiting_learner", env_steps=7)
        assert not of(sup.tick(), CaptureEvidence) or sup.children["worker-0"].state != STALLED
    assert sup.children["worker-0"].state == RUNNING


def test_silent_worker_is_stalled():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(4.9)
    assert not of(sup.tick(), CaptureEvidence)
    clock.advance(0.2)
    actions = sup.tick()
    assert sup.children["worker-0"].state == STALLED
    assert "no heartbeat" in of(actions, CaptureEvidence)[0].reason


def test_stuck_in_startup_phase_is_stalled_after_startup_deadline_only():
    sup, clock, _ = make()
    for t in range(29):
        clock.advance(1.0)
        beat(sup, "worker-0", "connecting", phase_age_s=t + 1)
        assert not [a for a in of(sup.tick(), CaptureEvidence) if a.name == "worker-0"]
    clock.advance(2.0)
    beat(sup, "worker-0", "connecting", phase_age_s=31)
    actions = sup.tick()
    assert "worker-0" in [a.name for a in of(actions, CaptureEvidence)]
    assert "phase connecting" in next(a.reason for a in of(actions, CaptureEvidence) if a.name == "worker-0")


def test_no_first_heartbeat_within_startup_deadline():
    sup, clock, _ = make()
    clock.advance(29)
    assert not of(sup.tick(), CaptureEvidence)
    clock.advance(2)
    assert {a.name for a in of(sup.tick(), CaptureEvidence)} == {"learner", "worker-0", "worker-1"}


def test_learner_has_its_own_longer_deadline():
    sup, clock, _ = make()
    run_all(sup, clock)
    for _ in range(50):
        clock.advance(1.0)
        beat(sup, "learner", "training", updates=3)
        beat(sup, "worker-0", "stepping", env_steps=int(clock.now))
        beat(sup, "worker-1", "stepping", env_steps=int(clock.now))
        assert not of(sup.tick(), CaptureEvidence)
    for _ in range(15):
        clock.advance(1.0)
        beat(sup, "learner", "training", updates=3)
        sup.tick()
    assert sup.children["learner"].state == STALLED


def test_learner_waiting_for_data_is_not_killed():
    sup, clock, _ = make()
    run_all(sup, clock)
    for _ in range(200):
        clock.advance(1.0)
        beat(sup, "learner", "waiting_data", updates=3)
        beat(sup, "worker-0", "waiting_learner")
        beat(sup, "worker-1", "waiting_learner")
        assert not of(sup.tick(), CaptureEvidence)


def test_evidence_timeout_does_not_hold_back_the_kill():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(6)
    sup.tick()
    assert sup.children["worker-0"].state == STALLED
    clock.advance(3.5)
    assert not of(sup.tick(), Signal)
    clock.advance(1.0)
    assert [a.signum for a in of(sup.tick(), Signal) if a.name == "worker-0"] == [signal.SIGTERM, signal.SIGCONT]


def test_transition_kills_unkillable_after_grace():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(6)
    sup.tick()
    sup.evidence_done("worker-0", None)
    clock.advance(1.9)
    assert not [a for a in of(sup.tick(), Signal) if a.name == "worker-0"]
    clock.advance(0.2)
    sigs = [a for a in of(sup.tick(), Signal) if a.name == "worker-0"]
    assert [a.signum for a in sigs] == [signal.SIGKILL]
    clock.advance(5)
    assert not [a for a in of(sup.tick(), Signal) if a.name == "worker-0"], "SIGKILL is sent once"


def test_killed_worker_backs_off_then_respawns_with_new_incarnation():
    sup, clock, pids = make()
    run_all(sup, clock)
    pid = sup.children["worker-0"].pid
    actions = sup.exited("worker-0", pid, -9)
    assert sup.children["worker-0"].state == BACKOFF
    assert [a.kind for a in of(actions, Event)] == ["exited", "backoff"] and not of(actions, Spawn)
    clock.advance(0.9)
    assert not of(sup.tick(), Spawn)
    clock.advance(0.2)
    spawns = of(sup.tick(), Spawn)
    assert spawns == [Spawn("worker-0", 1)]
    assert sup.children["worker-0"].state == STARTING


def test_backoff_grows_exponentially_and_is_capped():
    limits = Limits(**{**LIMITS.__dict__, "max_restarts": 100, "restart_window_s": 1e9})
    sup, clock, pids = make(limits)
    delays = []
    for _ in range(6):
        c = sup.children["worker-0"]
        sup.exited("worker-0", c.pid, 1)
        delays.append(c.restart_at - clock.now)
        clock.advance(c.restart_at - clock.now)
        spawn = of(sup.tick(), Spawn)[0]
        sup.spawned(spawn.name, next(pids))
    assert delays == [1, 2, 4, 8, 8, 8]


def test_backoff_jitter_stays_within_bounds():
    limits = Limits(**{**LIMITS.__dict__, "backoff_jitter": 0.25})
    sup, clock, _ = make(limits)
    c = sup.children["worker-0"]
    sup.exited("worker-0", c.pid, 1)
    assert 0.75 <= c.restart_at - clock.now <= 1.25


def test_healthy_period_resets_backoff():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    sup.exited("worker-0", c.pid, 1)
    clock.advance(1.0)
    sup.spawned("worker-0", next(pids)) if not of(sup.tick(), Spawn) else None
    sup.spawned("worker-0", next(pids))
    beat(sup, "worker-0", "stepping", env_steps=1)
    for i in range(61):
        clock.advance(1.0)
        beat(sup, "worker-0", "stepping", env_steps=i + 2)
        beat(sup, "worker-1", "stepping", env_steps=i + 2)
        beat(sup, "learner", "training", updates=i + 2)
        sup.tick()
    assert c.consecutive == 0
    sup.exited("worker-0", c.pid, 1)
    assert c.restart_at - clock.now == pytest.approx(1.0)


def test_crash_looping_worker_fails_after_intensity_limit_while_others_go_on():
    sup, clock, pids = make()
    run_all(sup, clock)
    c = sup.children["worker-0"]
    for _ in range(3):
        sup.exited("worker-0", c.pid, 1)
        clock.advance(c.restart_at - clock.now)
        beat(sup, "worker-1", "stepping", env_steps=int(clock.now))
        beat(sup, "learner", "training", updates=int(clock.now))
        sup.spawned("worker-0", of(sup.tick(), Spawn)[0] and next(pids))
    actions = sup.exited("worker-0", c.pid, 1)
    assert c.state == FAILED
    assert not of(actions, EndRun) and not sup.stopping
    assert sup.children["worker-1"].state == RUNNING
    clock.advance(100)
    assert not [a for a in of(sup.tick(), Spawn) if a.name == "worker-0"], "a failed slot is not restarted"


def test_restarts_outside_the_window_do_not_count():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    for _ in range(6):  # twice the limit, but spread over far more than the window
        sup.exited("worker-0", c.pid, 1)
        assert c.state == BACKOFF
        clock.advance(101)
        assert of(sup.tick(), Spawn) == [Spawn("worker-0", c.incarnation)]
        sup.spawned("worker-0", next(pids))
    assert c.state == STARTING


def test_learner_failing_past_its_limit_ends_the_run_nonzero():
    sup, clock, pids = make()
    run_all(sup, clock)
    c = sup.children["learner"]
    for _ in range(3):
        sup.exited("learner", c.pid, 1)
        clock.advance(c.restart_at - clock.now)
        of(sup.tick(), Spawn)
        sup.spawned("learner", next(pids))
    actions = sup.exited("learner", c.pid, 1)
    assert c.state == FAILED and sup.stopping
    assert {a.name for a in of(actions, Signal) if a.signum == signal.SIGTERM} == {"worker-0", "worker-1"}
    for name in ("worker-0", "worker-1"):
        sup.exited(name, sup.children[name].pid, 0)
    assert sup.end == EndRun(1, sup.stop_reason)


def test_worker_exiting_zero_is_finished_not_restarted():
    sup, clock, _ = make()
    run_all(sup, clock)
    sup.exited("worker-1", sup.children["worker-1"].pid, 0)
    assert sup.children["worker-1"].state == STOPPED
    clock.advance(100)
    assert not of(sup.tick(), Spawn)


def test_stalled_worker_exiting_zero_is_still_restarted():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(6)
    sup.tick()
    sup.exited("worker-0", sup.children["worker-0"].pid, 0)
    assert sup.children["worker-0"].state == BACKOFF


def test_learner_exiting_zero_completes_the_run():
    sup, clock, _ = make()
    run_all(sup, clock)
    actions = sup.exited("learner", sup.children["learner"].pid, 0)
    assert sup.stopping
    assert {a.name for a in of(actions, Signal) if a.signum == signal.SIGTERM} == {"worker-0", "worker-1"}
    for name in ("worker-0", "worker-1"):
        actions = sup.exited(name, sup.children[name].pid, 0)
    assert of(actions, EndRun) == [EndRun(0, "run complete")]


def test_user_restart_respawns_at_once_outside_intensity():
    sup, clock, _ = make()
    run_all(sup, clock)
    c = sup.children["worker-1"]
    actions = sup.request_restart("worker-1")
    assert c.state == STOPPING and not of(actions, CaptureEvidence)
    assert [a.signum for a in of(actions, Signal)] == [signal.SIGTERM, signal.SIGCONT]
    actions = sup.exited("worker-1", c.pid, 0)
    assert of(actions, Spawn) == [Spawn("worker-1", 1)]
    assert c.restarts == 0


def test_user_restart_of_failed_worker_spawns_it():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    c.state = FAILED
    c.pid = None
    assert of(sup.request_restart("worker-0"), Spawn) == [Spawn("worker-0", 1)]


def test_user_restart_of_unknown_name_raises():
    sup, _, _ = make()
    with pytest.raises(KeyError):
        sup.request_restart("worker-9")


def test_stop_terminates_everyone_then_ends_with_zero():
    sup, clock, _ = make()
    run_all(sup, clock)
    actions = sup.request_stop()
    assert all(c.state == STOPPING for c in sup.children.values())
    assert len([a for a in of(actions, Signal) if a.signum == signal.SIGTERM]) == 3
    clock.advance(2.5)
    kills = [a.name for a in of(sup.tick(), Signal) if a.signum == signal.SIGKILL]
    assert sorted(kills) == ["worker-0", "worker-1"], "the learner gets the longer stop grace to checkpoint"
    clock.advance(13)
    assert [a.name for a in of(sup.tick(), Signal) if a.signum == signal.SIGKILL] == ["learner"]
    end = []
    for name, c in sup.children.items():
        end += of(sup.exited(name, c.pid, -9), EndRun)
    assert end == [EndRun(0, "stop requested")]


def test_no_restart_while_stopping():
    sup, clock, _ = make()
    run_all(sup, clock)
    sup.request_stop()
    sup.exited("worker-0", sup.children["worker-0"].pid, -9)
    assert sup.children["worker-0"].state == STOPPED
    clock.advance(100)
    assert not of(sup.tick(), Spawn)


def test_snapshot_reports_fields_for_status():
    sup, clock, _ = make()
    beat(sup, "worker-0", "stepping", env_steps=42)
    clock.advance(1.5)
    row = next(r for r in sup.snapshot() if r["name"] == "worker-0")
    assert row["state"] == RUNNING and row["env_steps"] == 42 and row["phase"] == "stepping"
    assert row["heartbeat_age_s"] == pytest.approx(1.5) and row["uptime_s"] == pytest.approx(1.5)
    assert [r["name"] for r in sup.snapshot()] == ["learner", "worker-0", "worker-1"]


def test_new_learner_alerts_become_events_once():
    sup, clock, _ = make()
    c = sup.children["learner"]
    hb = {"name": "learner", "pid": c.pid, "phase": "training", "updates": 5, "alerts": ["warning:q_high@5"]}
    assert [a.detail for a in of(sup.heartbeat(hb), Event) if a.kind == "alert"] == [{"alert": "warning:q_high@5"}]
    assert not [a for a in of(sup.heartbeat(hb), Event) if a.kind == "alert"]
    hb["alerts"] = ["warning:q_high@5", "critical:non_finite@9"]
    assert [a.detail["alert"] for a in of(sup.heartbeat(hb), Event) if a.kind == "alert"] == ["critical:non_finite@9"]


def test_evaluation_steps_count_as_progress_and_a_hung_evaluation_does_not():
    sup, clock, _ = make()
    run_all(sup, clock)
    c = sup.children["worker-0"]
    for i in range(30):  # a long evaluation: env_steps frozen, eval_steps growing
        clock.advance(1.0)
        sup.heartbeat({"name": "worker-0", "pid": c.pid, "phase": "evaluating", "env_steps": 50, "eval_steps": i})
        beat(sup, "worker-1", "stepping", env_steps=i + 1)
        beat(sup, "learner", "training", updates=i + 1)
        assert not of(sup.tick(), CaptureEvidence)
    for i in range(11):  # then the evaluation env hangs
        clock.advance(1.0)
        sup.heartbeat({"name": "worker-0", "pid": c.pid, "phase": "evaluating", "env_steps": 50, "eval_steps": 29})
        sup.tick()
    assert c.state == STALLED
