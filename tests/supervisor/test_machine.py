"""The supervisor's state machine, driven by a fake clock: no processes, no sleeping."""

import itertools
import math
import random

import pytest

from protocol import events as ev
from protocol.config import load_config
from protocol.states import (
    BACKOFF,
    FAILED,
    RUNNING,
    STALLED,
    STARTING,
    STOPPED,
    STOPPING,
)
from supervisor.control import status_rows
from supervisor.machine import (
    CaptureEvidence,
    DropStandby,
    EndRun,
    Event,
    Kill,
    Spawn,
    StartStandby,
    Supervision,
    Terminate,
)
from supervisor.plan import build_plan
from supervisor.specs import (
    PERMANENT,
    TEMPORARY,
    TRANSIENT,
    Backoff,
    ChildSpec,
    Deadlines,
    Intensity,
)

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


SUPERVISOR = dict(heartbeat_deadline_s=5, progress_deadline_s=10, startup_deadline_s=30, learner_deadline_s=60,
                  kill_grace_s=2, learner_stop_grace_s=15, evidence_timeout_s=3, backoff_initial_s=1, backoff_max_s=8,
                  backoff_jitter=0.0, healthy_reset_s=60, max_restarts=3, restart_window_s=100,
                  standby_workers=False)


def plan_specs(workers=2, **supervisor):
    """The run's real plan (learner + workers) with the deadlines above."""
    overrides = [(f"supervisor.{k}", v) for k, v in {**SUPERVISOR, **supervisor}.items()]
    return list(build_plan(load_config(None, overrides + [("workers.count", workers)])).specs)


def start(specs):
    clock = FakeClock()
    sup = Supervision(specs, clock, random.Random(0))
    pids = iter(range(100, 10_000))
    for a in sup.start():
        assert isinstance(a, Spawn)
        sup.spawned(a.name, a.incarnation, next(pids))
    return sup, clock, pids


def make(workers=2, **supervisor):
    return start(plan_specs(workers, **supervisor))


def beat(sup, name, phase="stepping", env_steps=0, updates=0, phase_age_s=0.0):
    c = sup.children[name]
    return sup.heartbeat({"name": name, "pid": c.pid, "incarnation": c.incarnation, "phase": phase, "env_steps": env_steps, "updates": updates,
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
    sup = Supervision(plan_specs(1), clock)
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
    c = sup.children["worker-0"]
    sup.heartbeat({"name": "worker-0", "pid": c.pid, "incarnation": c.incarnation + 1, "phase": "stepping"})
    sup.heartbeat({"name": "worker-0", "pid": c.pid + 1, "incarnation": c.incarnation, "phase": "stepping"})
    assert c.state == STARTING, "another incarnation's beat, or another process's, does not count"


def test_a_child_without_a_pid_counts_only_beats_without_one():
    """A container that exited at once has no pid: a forged beat naming any pid is still a stranger's."""
    clock = FakeClock()
    sup = Supervision([spec("sim")], clock)
    sup.start()
    sup.spawned("sim", 0, None)
    assert not sup.heartbeat({"name": "sim", "pid": 7_000_000, "incarnation": 0, "phase": "busy", "count": 1})
    assert sup.children["sim"].state == STARTING
    assert of(sup.heartbeat({"name": "sim", "pid": None, "incarnation": 0, "phase": "busy", "count": 1}), Event)
    assert sup.children["sim"].state == RUNNING


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
        assert sup.children["worker-0"].state == RUNNING, "within its progress deadline"
        sup.tick()
    clock.advance(1.5)
    beat(sup, "worker-0", "stepping", env_steps=7)
    actions = sup.tick()
    assert sup.children["worker-0"].state == STALLED
    cap = of(actions, CaptureEvidence)
    assert cap and cap[0].name == "worker-0" and "no progress" in cap[0].reason
    assert not of(actions, (Terminate, Kill)), "evidence is captured before any signal"
    incarnation = sup.children["worker-0"].incarnation
    actions = sup.evidence_done("worker-0", "incidents/x")
    sigs = [type(a) for a in of(actions, (Terminate, Kill))]
    assert sigs == [Terminate] and of(actions, (Terminate, Kill))[0].incarnation == incarnation


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
    assert not of(sup.tick(), (Terminate, Kill))
    clock.advance(1.0)
    assert [type(a) for a in of(sup.tick(), (Terminate, Kill)) if a.name == "worker-0"] == [Terminate]


def test_transition_kills_unkillable_after_grace():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(6)
    sup.tick()
    sup.evidence_done("worker-0", None)
    clock.advance(1.9)
    assert not [a for a in of(sup.tick(), (Terminate, Kill)) if a.name == "worker-0"]
    clock.advance(0.2)
    sigs = [a for a in of(sup.tick(), (Terminate, Kill)) if a.name == "worker-0"]
    assert [type(a) for a in sigs] == [Kill]
    clock.advance(5)
    assert not [a for a in of(sup.tick(), (Terminate, Kill)) if a.name == "worker-0"], "SIGKILL is sent once"


def test_killed_worker_backs_off_then_respawns_with_new_incarnation():
    sup, clock, pids = make()
    run_all(sup, clock)
    actions = sup.exited("worker-0", sup.children["worker-0"].incarnation, -9)
    assert sup.children["worker-0"].state == BACKOFF
    assert [a.kind for a in of(actions, Event)] == ["exited", "backoff"] and not of(actions, Spawn)
    clock.advance(0.9)
    assert not of(sup.tick(), Spawn)
    clock.advance(0.2)
    spawns = of(sup.tick(), Spawn)
    assert spawns == [Spawn("worker-0", 1)]
    assert sup.children["worker-0"].state == STARTING


def test_backoff_grows_exponentially_and_is_capped():
    sup, clock, pids = make(max_restarts=100, restart_window_s=1e9)
    delays = []
    for _ in range(6):
        c = sup.children["worker-0"]
        sup.exited("worker-0", c.incarnation, 1)
        delays.append(c.restart_at - clock.now)
        clock.advance(c.restart_at - clock.now)
        spawn = of(sup.tick(), Spawn)[0]
        sup.spawned(spawn.name, spawn.incarnation, next(pids))
    assert delays == [1, 2, 4, 8, 8, 8]


def test_backoff_jitter_stays_within_bounds():
    sup, clock, _ = make(backoff_jitter=0.25)
    c = sup.children["worker-0"]
    sup.exited("worker-0", c.incarnation, 1)
    assert 0.75 <= c.restart_at - clock.now <= 1.25


def test_healthy_period_resets_backoff():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    sup.exited("worker-0", c.incarnation, 1)
    clock.advance(1.0)
    assert of(sup.tick(), Spawn) == [Spawn("worker-0", 1)], "after the initial backoff"
    sup.spawned("worker-0", 1, next(pids))
    beat(sup, "worker-0", "stepping", env_steps=1)
    for i in range(61):
        clock.advance(1.0)
        beat(sup, "worker-0", "stepping", env_steps=i + 2)
        beat(sup, "worker-1", "stepping", env_steps=i + 2)
        beat(sup, "learner", "training", updates=i + 2)
        sup.tick()
    assert c.consecutive == 0
    sup.exited("worker-0", c.incarnation, 1)
    assert c.restart_at - clock.now == pytest.approx(1.0)


def test_crash_looping_worker_fails_after_intensity_limit_while_others_go_on():
    sup, clock, pids = make()
    run_all(sup, clock)
    c = sup.children["worker-0"]
    for _ in range(3):
        sup.exited("worker-0", c.incarnation, 1)
        clock.advance(c.restart_at - clock.now)
        beat(sup, "worker-1", "stepping", env_steps=int(clock.now))
        beat(sup, "learner", "training", updates=int(clock.now))
        spawn = of(sup.tick(), Spawn)[0]
        sup.spawned("worker-0", spawn.incarnation, next(pids))
    actions = sup.exited("worker-0", c.incarnation, 1)
    assert c.state == FAILED
    assert not of(actions, EndRun) and not sup.stopping
    assert sup.children["worker-1"].state == RUNNING
    clock.advance(100)
    assert not [a for a in of(sup.tick(), Spawn) if a.name == "worker-0"], "a failed slot is not restarted"


def test_restarts_outside_the_window_do_not_count():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    for _ in range(6):  # twice the limit, but spread over far more than the window
        sup.exited("worker-0", c.incarnation, 1)
        assert c.state == BACKOFF
        clock.advance(101)
        assert of(sup.tick(), Spawn) == [Spawn("worker-0", c.incarnation)]
        sup.spawned("worker-0", sup.children["worker-0"].incarnation, next(pids))
    assert c.state == STARTING


def test_learner_failing_past_its_limit_ends_the_run_nonzero():
    sup, clock, pids = make()
    run_all(sup, clock)
    c = sup.children["learner"]
    for _ in range(3):
        sup.exited("learner", c.incarnation, 1)
        clock.advance(c.restart_at - clock.now)
        of(sup.tick(), Spawn)
        sup.spawned("learner", sup.children["learner"].incarnation, next(pids))
    actions = sup.exited("learner", c.incarnation, 1)
    assert c.state == FAILED and sup.stopping
    assert {a.name for a in of(actions, (Terminate, Kill)) if isinstance(a, Terminate)} == {"worker-0", "worker-1"}
    for name in ("worker-0", "worker-1"):
        sup.exited(name, sup.children[name].incarnation, 0)
    assert sup.end == EndRun(1, sup.stop_reason)


def test_worker_exiting_zero_is_finished_not_restarted():
    sup, clock, _ = make()
    run_all(sup, clock)
    sup.exited("worker-1", sup.children["worker-1"].incarnation, 0)
    assert sup.children["worker-1"].state == STOPPED
    clock.advance(100)
    assert not of(sup.tick(), Spawn)


def test_stalled_worker_exiting_zero_is_still_restarted():
    sup, clock, _ = make()
    run_all(sup, clock)
    clock.advance(6)
    sup.tick()
    sup.exited("worker-0", sup.children["worker-0"].incarnation, 0)
    assert sup.children["worker-0"].state == BACKOFF


def test_learner_exiting_zero_completes_the_run():
    sup, clock, _ = make()
    run_all(sup, clock)
    actions = sup.exited("learner", sup.children["learner"].incarnation, 0)
    assert sup.stopping
    assert {a.name for a in of(actions, (Terminate, Kill)) if isinstance(a, Terminate)} == {"worker-0", "worker-1"}
    for name in ("worker-0", "worker-1"):
        actions = sup.exited(name, sup.children[name].incarnation, 0)
    assert of(actions, EndRun) == [EndRun(0, "run complete")]


def test_user_restart_respawns_at_once_outside_intensity():
    sup, clock, _ = make()
    run_all(sup, clock)
    c = sup.children["worker-1"]
    actions = sup.request_restart("worker-1")
    assert c.state == STOPPING and not of(actions, CaptureEvidence)
    assert [type(a) for a in of(actions, (Terminate, Kill))] == [Terminate]
    actions = sup.exited("worker-1", c.incarnation, 0)
    assert of(actions, Spawn) == [Spawn("worker-1", 1)]
    assert c.restarts == 0


def test_user_restart_of_failed_worker_spawns_it():
    sup, clock, pids = make()
    c = sup.children["worker-0"]
    c.state = FAILED
    c.inc.live = False
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
    assert len([a for a in of(actions, (Terminate, Kill)) if isinstance(a, Terminate)]) == 3
    clock.advance(2.5)
    kills = [a.name for a in of(sup.tick(), (Terminate, Kill)) if isinstance(a, Kill)]
    assert sorted(kills) == ["worker-0", "worker-1"], "the learner gets the longer stop grace to checkpoint"
    clock.advance(13)
    assert [a.name for a in of(sup.tick(), (Terminate, Kill)) if isinstance(a, Kill)] == ["learner"]
    end = []
    for name, c in sup.children.items():
        end += of(sup.exited(name, c.incarnation, -9), EndRun)
    assert end == [EndRun(0, "stop requested")]


def test_no_restart_while_stopping():
    sup, clock, _ = make()
    run_all(sup, clock)
    sup.request_stop()
    sup.exited("worker-0", sup.children["worker-0"].incarnation, -9)
    assert sup.children["worker-0"].state == STOPPED
    clock.advance(100)
    assert not of(sup.tick(), Spawn)


def test_snapshot_reports_fields_for_status():
    sup, clock, _ = make()
    beat(sup, "worker-0", "stepping", env_steps=42)
    clock.advance(1.5)
    row = next(r for r in status_rows(sup.snapshot()) if r["name"] == "worker-0")
    assert row["state"] == RUNNING and row["env_steps"] == 42 and row["phase"] == "stepping"
    assert row["heartbeat_age_s"] == pytest.approx(1.5) and row["uptime_s"] == pytest.approx(1.5)
    assert [r["name"] for r in status_rows(sup.snapshot())] == ["learner", "worker-0", "worker-1"]
    c = sup.children["worker-0"]
    sup.heartbeat({"name": "worker-0", "pid": c.pid, "incarnation": c.incarnation, "phase": "stepping",
                   "env_steps": 43, "alerts": None})  # the schema lets an optional field be null
    row = next(r for r in status_rows(sup.snapshot()) if r["name"] == "worker-0")
    assert row["alerts"] == [] and row["env_steps"] == 43


def test_new_learner_alerts_become_events_once():
    sup, clock, _ = make()
    c = sup.children["learner"]
    hb = {"name": "learner", "pid": c.pid, "incarnation": c.incarnation, "phase": "training", "updates": 5, "alerts": ["warning:q_high@5"]}
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
        sup.heartbeat({"name": "worker-0", "pid": c.pid, "incarnation": c.incarnation, "phase": "evaluating", "env_steps": 50, "eval_steps": i})
        beat(sup, "worker-1", "stepping", env_steps=i + 1)
        beat(sup, "learner", "training", updates=i + 1)
        assert not of(sup.tick(), CaptureEvidence)
    for i in range(11):  # then the evaluation env hangs
        clock.advance(1.0)
        sup.heartbeat({"name": "worker-0", "pid": c.pid, "incarnation": c.incarnation, "phase": "evaluating", "env_steps": 50, "eval_steps": 29})
        sup.tick()
    assert c.state == STALLED


# -- the spec's policy fields, each with its negative twin -------------------------------------------------------

def spec(name, **kw):
    """A child spec with short deadlines; names and kinds here mean nothing to the machine."""
    base = dict(name=name, kind="process", restart=TRANSIENT, significant=False,
                deadlines=Deadlines(heartbeat_s=5, progress_s=10, startup_s=30, evidence_s=3),
                progress_phases=frozenset({"busy"}), startup_phases=frozenset({"booting"}),
                progress_counters=("count",), kill_grace_s=2, stop_grace_s=4,
                backoff=Backoff(initial_s=1, max_s=8, jitter=0.0, healthy_reset_s=60),
                intensity=Intensity(max_restarts=3, window_s=100))
    return ChildSpec(**{**base, **kw})


PIDS = itertools.count(50_000)


def up(sup, *names):
    """Beat every started child into running; what waited for them starts and is beaten too."""
    for _ in range(len(sup.children) + 1):
        pending = []
        for name in names or list(sup.children):
            c = sup.children[name]
            if c.pid is not None and c.state in (STARTING, RUNNING):
                pending += sup.heartbeat({"name": name, "pid": c.pid, "incarnation": c.incarnation, "phase": "busy", "count": 0})
        feed(sup, PIDS, pending)
    for name in names or list(sup.children):
        assert sup.children[name].state == RUNNING, name


def respawn(sup, clock, pids, name):
    """Let the backoff run out and report each spawn (and the spawns that one releases)."""
    c = sup.children[name]
    clock.advance(max(0.0, c.restart_at - clock.now))
    return feed(sup, pids, sup.tick())


def feed(sup, pids, actions, ready=True):
    """Carry out Spawn actions as a driver would (and, when ``ready``, see each new child's first beat,
    which starts what waits for it); return every Spawn carried out."""
    pending = [a for a in actions if isinstance(a, Spawn)]
    done = []
    while pending:
        a = pending.pop(0)
        if sup.wants_spawn(a):
            done.append(a)
            pid = next(pids)
            sup.spawned(a.name, a.incarnation, pid)
            if ready:
                pending += of(sup.heartbeat({"name": a.name, "pid": pid, "incarnation": a.incarnation, "phase": "busy",
                                             "count": 0}), Spawn)
    return done


def sim_pair():
    """A simulator and the worker that drives it: the worker depends on the simulator."""
    return start([spec("drv", depends_on=("sim",)), spec("sim", kind="sim", restart=PERMANENT), spec("other")])


def test_start_order_follows_dependencies():
    clock = FakeClock()
    sup = Supervision([spec("drv", depends_on=("sim",)), spec("sim"), spec("other")], clock)
    assert [a.name for a in of(sup.start(), Spawn)] == ["sim", "other"], "drv waits until sim is ready"
    assert sup.children["drv"].state == BACKOFF and sup.children["drv"].reason == "waiting for sim"
    sup.spawned("sim", sup.children["sim"].incarnation, 10)
    assert not of(sup.heartbeat({"name": "sim", "pid": 10, "incarnation": 0, "phase": "booting"}), Spawn), "still starting up"
    assert of(sup.heartbeat({"name": "sim", "pid": 10, "incarnation": 0, "phase": "busy", "count": 1}), Spawn) == [Spawn("drv", 0)]


def test_unknown_dependency_cycle_and_duplicates_are_refused():
    with pytest.raises(ValueError, match="depends on 'nope'"):
        Supervision([spec("a", depends_on=("nope",))], FakeClock())
    with pytest.raises(ValueError, match="cycle"):
        Supervision([spec("a", depends_on=("b",)), spec("b", depends_on=("a",))], FakeClock())
    with pytest.raises(ValueError, match="two children"):
        Supervision([spec("a"), spec("a")], FakeClock())
    with pytest.raises(ValueError, match="restart type"):
        Supervision([spec("a", restart="sometimes")], FakeClock())


def test_dependency_restart_restarts_its_dependent_after_it():
    sup, clock, pids = sim_pair()
    up(sup)
    sim, drv, other = sup.children["sim"], sup.children["drv"], sup.children["other"]
    drv_inc = drv.incarnation
    actions = sup.exited("sim", sim.incarnation, 1)
    assert sim.state == BACKOFF
    assert drv.state == STOPPING and drv.held
    assert [type(a) for a in of(actions, (Terminate, Kill)) if a.name == "drv"] == [Terminate]
    assert [e.detail for e in of(actions, Event) if e.kind == ev.DEPENDENCY_RESTART] == [{"dependency": "sim"}]
    assert not of(actions, CaptureEvidence), "a dependent stopped for its dependency is not an incident"
    assert other.state == RUNNING, "a child that does not depend on sim is left alone"
    sup.exited("drv", drv_inc, 0)
    assert drv.state == BACKOFF and math.isinf(drv.restart_at), "it waits for sim, not for a timer"
    clock.advance(100)
    assert of(sup.tick(), Spawn) == [Spawn("sim", 1)], "the dependency first"
    assert not of(sup.spawned("sim", sup.children["sim"].incarnation, 77), Spawn)
    assert of(sup.heartbeat({"name": "sim", "pid": 77, "incarnation": 1, "phase": "busy", "count": 0}), Spawn) == [Spawn("drv", 1)], \
        "then, once it is ready, its dependent"
    assert drv.incarnation == 1 and drv.restarts == 1
    assert len(drv.restart_times) == 0, "restarting with a dependency does not count against its own intensity"


def test_dependent_not_yet_running_waits_for_a_failed_dependency_and_fails_with_it():
    sup, clock, pids = start([spec("drv", depends_on=("sim",)), spec("sim", intensity=Intensity(0, 100))])
    sup.spawn_failed("drv", "no such file")  # drv is in its backoff when sim fails
    sup.exited("sim", sup.children["sim"].incarnation, 1)
    assert sup.children["sim"].state == FAILED and sup.children["drv"].state == FAILED
    clock.advance(100)
    assert not of(sup.tick(), Spawn)


def test_a_restarted_dependency_waits_until_its_stopping_dependents_are_gone():
    sup, clock, pids = sim_pair()
    up(sup)
    drv = sup.children["drv"]
    drv_inc = drv.incarnation
    sup.exited("sim", sup.children["sim"].incarnation, 1)
    assert respawn(sup, clock, pids, "sim") == [], "the old drv is still stopping: no new sim beside it"
    clock.advance(30)
    assert not of(sup.tick(), Spawn)
    assert not of(sup.exited("drv", drv_inc, -15), Spawn), "drv waits for sim"
    assert respawn(sup, clock, pids, "sim") == [Spawn("sim", 1), Spawn("drv", 1)]


def test_a_spawn_the_machine_no_longer_wants_is_not_carried_out():
    clock = FakeClock()
    sup = Supervision([spec("drv", depends_on=("sim",)), spec("sim")], clock)
    sup.start()
    sup.spawned("sim", sup.children["sim"].incarnation, 10)
    release = sup.heartbeat({"name": "sim", "pid": 10, "incarnation": 0, "phase": "busy", "count": 0})
    assert of(release, Spawn) == [Spawn("drv", 0)]
    sup.exited("sim", 0, 1)  # before the driver got to drv's spawn
    assert not sup.wants_spawn(Spawn("drv", 0)), "its dependency is down again"
    assert sup.children["drv"].state == BACKOFF and sup.children["drv"].held
    assert of(sup.spawned("drv", sup.children["drv"].incarnation, 77), (Terminate, Kill)) == [Kill("drv", 0)], "a late spawn is killed"
    assert sup.children["drv"].pid is None
    assert respawn(sup, clock, iter(range(200, 300)), "sim") == [Spawn("sim", 1), Spawn("drv", 1)]


def test_dependents_restart_leaves_its_dependency_alone():
    sup, clock, pids = sim_pair()
    up(sup)
    sim = sup.children["sim"]
    sim_pid = sim.pid
    actions = sup.exited("drv", sup.children["drv"].incarnation, 1)
    assert not [a for a in actions if getattr(a, "name", None) == "sim"]
    respawn(sup, clock, pids, "drv")
    assert sim.state == RUNNING and sim.pid == sim_pid and sim.incarnation == 0


def test_user_restart_of_a_dependency_restarts_its_dependent():
    sup, clock, pids = sim_pair()
    up(sup)
    sim, drv = sup.children["sim"], sup.children["drv"]
    sim_inc, drv_inc = sim.incarnation, drv.incarnation
    sup.request_restart("sim")
    actions = sup.exited("sim", sim_inc, 0)
    assert not of(actions, Spawn), "sim waits until drv, stopped for it, is gone"
    assert drv.state == STOPPING and [a.name for a in of(actions, (Terminate, Kill))] == ["drv"]
    assert not of(sup.exited("drv", drv_inc, 0), Spawn)
    assert feed(sup, pids, sup.tick()) == [Spawn("sim", 1), Spawn("drv", 1)]
    assert sim.restarts == 0, "a user's restart is outside the intensity limit"


def test_a_user_restart_of_a_held_dependent_waits_for_its_dependency():
    sup, clock, pids = sim_pair()
    up(sup)
    sup.exited("sim", sup.children["sim"].incarnation, 1)
    sup.exited("drv", sup.children["drv"].incarnation, -15)
    actions = sup.request_restart("drv")
    assert not of(actions, Spawn) and sup.children["drv"].held


def test_a_failed_dependency_fails_its_dependent_and_a_user_restart_brings_both_back():
    sup, clock, pids = sim_pair()
    up(sup)
    sim, drv = sup.children["sim"], sup.children["drv"]
    for _ in range(3):
        sup.exited("sim", sim.incarnation, 1)
        sup.exited("drv", drv.incarnation, -15)
        assert respawn(sup, clock, pids, "sim") == [Spawn("sim", sim.incarnation), Spawn("drv", drv.incarnation)]
        assert drv.state == RUNNING and drv.pid is not None
    actions = sup.exited("sim", sim.incarnation, 1)
    assert sim.state == FAILED and drv.state == STOPPING
    actions = sup.exited("drv", drv.incarnation, -15)
    assert drv.state == FAILED and drv.reason == "sim failed"
    assert [e.detail for e in of(actions, Event) if e.kind == ev.FAILED] == [{"reason": "sim failed"}]
    assert sup.children["other"].state != FAILED and not sup.stopping
    actions = sup.request_restart("sim")
    assert not [e for e in of(actions, Event) if e.kind == ev.FAILED], "no second failed event for drv"
    assert feed(sup, pids, actions) == [Spawn("sim", 4), Spawn("drv", 4)]


def test_transient_is_restarted_after_a_crash_and_not_after_exit_zero():
    sup, clock, pids = start([spec("t", restart=TRANSIENT), spec("u", restart=TRANSIENT)])
    up(sup)
    sup.exited("t", sup.children["t"].incarnation, 3)
    assert sup.children["t"].state == BACKOFF and respawn(sup, clock, pids, "t") == [Spawn("t", 1)]
    actions = sup.exited("u", sup.children["u"].incarnation, 0)
    assert sup.children["u"].state == STOPPED and [e.kind for e in of(actions, Event)] == [ev.EXITED, ev.FINISHED]
    clock.advance(100)
    assert not [a for a in sup.tick() if isinstance(a, Spawn)]


def test_permanent_is_restarted_even_after_exit_zero():
    sup, clock, pids = start([spec("p", restart=PERMANENT)])
    up(sup)
    sup.exited("p", sup.children["p"].incarnation, 0)
    assert sup.children["p"].state == BACKOFF and respawn(sup, clock, pids, "p") == [Spawn("p", 1)]


def test_temporary_is_never_restarted():
    sup, clock, pids = start([spec("crashes", restart=TEMPORARY), spec("ends", restart=TEMPORARY)])
    up(sup)
    sup.exited("crashes", sup.children["crashes"].incarnation, 1)
    sup.exited("ends", sup.children["ends"].incarnation, 0)
    assert sup.children["crashes"].state == FAILED and sup.children["ends"].state == STOPPED
    clock.advance(1000)
    assert not [a for a in sup.tick() if isinstance(a, Spawn)]
    assert sup.children["crashes"].restarts == 0 and not sup.stopping


def test_significant_child_past_its_limit_ends_the_run_and_an_insignificant_one_does_not():
    for significant in (True, False):
        sup, clock, pids = start([spec("a", significant=significant, intensity=Intensity(1, 100)), spec("b")])
        up(sup)
        sup.exited("a", sup.children["a"].incarnation, 1)
        respawn(sup, clock, pids, "a")
        actions = sup.exited("a", sup.children["a"].incarnation, 1)
        assert sup.children["a"].state == FAILED
        if significant:
            assert sup.stopping and [type(a) for a in of(actions, (Terminate, Kill))] == [Terminate]
            assert of(sup.exited("b", sup.children["b"].incarnation, -15), EndRun)[0].exit_code == 1
        else:
            assert not sup.stopping and sup.children["b"].state == RUNNING and not of(actions, (Terminate, Kill))


def test_significant_child_finishing_completes_the_run_with_zero():
    sup, clock, pids = start([spec("a", significant=True), spec("b")])
    up(sup)
    actions = sup.exited("a", sup.children["a"].incarnation, 0)
    assert ev.RUN_COMPLETE in [e.kind for e in of(actions, Event)] and sup.stopping
    assert of(sup.exited("b", sup.children["b"].incarnation, 0), EndRun) == [EndRun(0, "run complete")]


def test_stop_order_is_the_reverse_of_start_order():
    sup, clock, pids = sim_pair()
    up(sup)
    actions = sup.request_stop()
    assert {a.name for a in of(actions, (Terminate, Kill))} == {"drv", "other"}, "sim waits until its dependent is gone"
    assert sup.children["sim"].state == STOPPING
    clock.advance(60)
    assert not [a for a in sup.tick() if isinstance(a, (Terminate, Kill)) and a.name == "sim"], "no grace runs before SIGTERM"
    actions = sup.exited("drv", sup.children["drv"].incarnation, 0)
    assert [a.name for a in of(actions, (Terminate, Kill))] == ["sim"]
    clock.advance(4.1)
    assert [type(a) for a in sup.tick() if isinstance(a, (Terminate, Kill))] == [Kill], "after sim's stop grace"


def test_stop_grace_is_the_specs_own():
    sup, clock, pids = start([spec("slow", stop_grace_s=15), spec("quick", stop_grace_s=2)])
    up(sup)
    sup.request_stop()
    clock.advance(2.1)
    assert [a.name for a in sup.tick() if isinstance(a, (Terminate, Kill))] == ["quick"]
    clock.advance(13)
    assert [a.name for a in sup.tick() if isinstance(a, (Terminate, Kill))] == ["slow"]


def test_a_second_stop_request_is_harmless():
    sup, clock, pids = start([spec("a"), spec("b")])
    up(sup)
    first = sup.request_stop("stop requested")
    assert len(of(first, (Terminate, Kill))) == 2
    assert sup.request_stop("stop requested") == []
    assert sup.request_stop("another reason", 1) == [] and sup.stop_reason == "stop requested"


def test_second_signal_forces_the_stop_and_a_third_is_harmless():
    sup, clock, pids = start([spec("a", stop_grace_s=30), spec("b", stop_grace_s=30)])
    up(sup)
    first = sup.signal_received("SIGINT")
    assert sup.stopping and {type(a) for a in of(first, (Terminate, Kill))} == {Terminate}
    forced = sup.signal_received("SIGINT")
    assert [e.kind for e in of(forced, Event)] == [ev.FORCED_STOP]
    assert sorted((a.name, type(a).__name__) for a in of(forced, (Terminate, Kill))) == [("a", "Kill"), ("b", "Kill")]
    assert sup.signal_received("SIGINT") == []
    sup.exited("a", sup.children["a"].incarnation, -9)
    assert of(sup.exited("b", sup.children["b"].incarnation, -9), EndRun) == [EndRun(0, "signal SIGINT")]


def test_one_signal_is_an_orderly_stop_not_a_forced_one():
    sup, clock, pids = start([spec("a", stop_grace_s=30)])
    up(sup)
    actions = sup.signal_received("SIGTERM")
    assert not [a for a in actions if isinstance(a, (Terminate, Kill)) and isinstance(a, Kill)]
    clock.advance(29)
    assert not [a for a in sup.tick() if isinstance(a, (Terminate, Kill))]


def test_a_forced_stop_ends_even_if_a_child_never_reports_its_exit():
    sup, clock, pids = start([spec("a"), spec("b")])
    up(sup)
    sup.force_stop("test")
    sup.exited("a", sup.children["a"].incarnation, -9)
    clock.advance(1.9)
    assert not of(sup.tick(), EndRun)
    clock.advance(0.2)
    assert of(sup.tick(), EndRun) == [EndRun(1, "test")]


def test_spawn_failure_enters_backoff_and_counts_against_the_limit():
    clock = FakeClock()
    sup = Supervision([spec("a", intensity=Intensity(1, 100))], clock)
    sup.start()
    actions = sup.spawn_failed("a", "no such file")
    assert sup.children["a"].state == BACKOFF
    assert [e.kind for e in of(actions, Event)] == [ev.SPAWN_FAILED, ev.BACKOFF]
    clock.advance(1.0)
    assert of(sup.tick(), Spawn) == [Spawn("a", 1)]
    sup.spawn_failed("a", "no such file")
    assert sup.children["a"].state == FAILED


def test_successful_spawn_does_not_back_off():
    clock = FakeClock()
    sup = Supervision([spec("a")], clock)
    sup.start()
    sup.spawned("a", sup.children["a"].incarnation, 42)
    assert sup.children["a"].state == STARTING and sup.children["a"].pid == 42


def test_standby_is_asked_for_once_running_and_used_by_the_next_spawn():
    sup, clock, pids = start([spec("w", standby=True), spec("plain")])
    assert not [a for a in sup.tick() if isinstance(a, StartStandby)], "not while starting: it would slow the start"
    up(sup)
    assert of(sup.tick(), StartStandby) == [StartStandby("w")]
    assert not of(sup.tick(), StartStandby), "asked for once"
    sup.exited("w", sup.children["w"].incarnation, 1)
    assert respawn(sup, clock, pids, "w") == [Spawn("w", 1, standby=True)]
    sup.exited("plain", sup.children["plain"].incarnation, 1)
    assert respawn(sup, clock, pids, "plain") == [Spawn("plain", 1, standby=False)]


def test_a_lost_standby_is_replaced_and_the_next_spawn_starts_cold():
    sup, clock, pids = start([spec("w", standby=True)])
    up(sup)
    sup.tick()
    sup.standby_lost("w")
    assert of(sup.tick(), StartStandby) == [StartStandby("w")]
    sup.standby_lost("w")
    sup.exited("w", sup.children["w"].incarnation, 1)
    assert respawn(sup, clock, pids, "w") == [Spawn("w", 1, standby=False)]


def test_stop_drops_standbys_and_asks_for_none():
    sup, clock, pids = start([spec("w", standby=True)])
    up(sup)
    sup.tick()
    assert of(sup.request_stop(), DropStandby) == [DropStandby("w")]
    assert not of(sup.tick(), StartStandby)


def test_progress_counters_and_phases_are_the_specs_own():
    sup, clock, pids = start([spec("a", progress_counters=("x", "y"), progress_phases=frozenset({"work"}))])
    c = sup.children["a"]
    for i in range(20):  # x frozen, y growing: progress
        clock.advance(1.0)
        sup.heartbeat({"name": "a", "pid": c.pid, "incarnation": c.incarnation, "phase": "work", "x": 5, "y": i})
        assert not of(sup.tick(), CaptureEvidence)
    for i in range(20):  # in a phase outside progress_phases, nothing has to grow
        clock.advance(1.0)
        sup.heartbeat({"name": "a", "pid": c.pid, "incarnation": c.incarnation, "phase": "idle", "x": 5, "y": 19})
        assert not of(sup.tick(), CaptureEvidence)
    for i in range(12):  # back in a progressing phase with nothing growing: stalled past the deadline
        clock.advance(1.0)
        sup.heartbeat({"name": "a", "pid": c.pid, "incarnation": c.incarnation, "phase": "work", "x": 5, "y": 19})
        sup.tick()
    assert c.state == STALLED


def test_events_are_checked_against_the_vocabulary():
    Event(ev.SPAWNED, "a", {"pid": 1, "incarnation": 0, "standby": False})
    with pytest.raises(ValueError, match="unknown event kind"):
        Event("exploded", "a", {})
    with pytest.raises(ValueError, match="undocumented field"):
        Event(ev.SPAWNED, "a", {"pid": 1, "colour": "red"})


def test_a_significant_child_cannot_be_permanent():
    with pytest.raises(ValueError, match="significant"):
        Supervision([spec("a", significant=True, restart=PERMANENT)], FakeClock())
    Supervision([spec("a", significant=True, restart=TRANSIENT)], FakeClock())


def test_alerts_that_are_not_strings_are_ignored():
    sup, clock, pids = start([spec("a")])
    c = sup.children["a"]
    actions = sup.heartbeat({"name": "a", "pid": c.pid, "incarnation": c.incarnation, "phase": "busy", "count": 1,
                             "alerts": [{"level": "warning"}, "warning:x@1"]})
    assert [e.detail for e in of(actions, Event) if e.kind == ev.ALERT] == [{"alert": "warning:x@1"}]


def test_a_finished_child_drops_its_standby():
    sup, clock, pids = start([spec("w", standby=True)])
    up(sup)
    assert of(sup.tick(), StartStandby)
    assert of(sup.exited("w", sup.children["w"].incarnation, 0), DropStandby) == [DropStandby("w")]
    assert not of(sup.tick(), StartStandby)


def stalling_pair(**sim):
    return start([spec("drv", depends_on=("sim",), stall_dependencies_on=frozenset({76}),
                       recycle_dependencies_on=frozenset({75})), spec("sim", restart=PERMANENT, **sim)])


def test_a_dependent_that_finds_its_dependency_stalled_gets_it_replaced_at_once():
    sup, clock, pids = stalling_pair()
    up(sup)
    sim, drv = sup.children["sim"], sup.children["drv"]
    actions = sup.exited("drv", drv.incarnation, 76)
    assert sim.state == STALLED, "no waiting for sim's own deadline"
    cap = of(actions, CaptureEvidence)
    assert [c.name for c in cap] == ["sim"] and "drv found it stalled (exit 76)" in cap[0].reason
    assert drv.state == BACKOFF and drv.held and len(drv.restart_times) == 0, "not drv's own failure"
    sup.evidence_done("sim", "incidents/x-sim")
    sup.exited("sim", sim.incarnation, -15)
    assert respawn(sup, clock, pids, "sim") == [Spawn("sim", 1), Spawn("drv", 1)]


def test_a_dependents_ordinary_crash_leaves_its_dependency_alone():
    sup, clock, pids = stalling_pair()
    up(sup)
    sim, drv = sup.children["sim"], sup.children["drv"]
    actions = sup.exited("drv", drv.incarnation, 1)
    assert sim.state == RUNNING and not of(actions, CaptureEvidence)
    assert drv.state == BACKOFF and not drv.held and len(drv.restart_times) == 1


def test_a_dependent_asking_for_a_fresh_dependency_recycles_it_without_evidence():
    sup, clock, pids = stalling_pair()
    up(sup)
    sim, drv = sup.children["sim"], sup.children["drv"]
    actions = sup.exited("drv", drv.incarnation, 75)
    assert sim.state == STOPPING and not of(actions, CaptureEvidence)
    assert [e.kind for e in of(actions, Event) if e.name == "sim"] == [ev.RECYCLED, ev.TERMINATING]
    assert feed(sup, pids, sup.exited("sim", sim.incarnation, -15)) == [Spawn("sim", 1), Spawn("drv", 1)]
    assert len(sim.restart_times) == 0 and len(drv.restart_times) == 0, "planned: outside the intensity limit"


def test_a_child_past_its_max_age_is_recycled_and_not_before():
    sup, clock, pids = start([spec("drv", depends_on=("sim",)), spec("sim", restart=PERMANENT, max_age_s=3600)])
    up(sup)
    sim = sup.children["sim"]
    for _ in range(35):
        clock.advance(100)
        for name in ("sim", "drv"):
            sup.heartbeat({"name": name, "pid": sup.children[name].pid, "incarnation": sup.children[name].incarnation, "phase": "busy", "count": clock.now})
        assert not [e for e in of(sup.tick(), Event) if e.kind == ev.RECYCLED]
    clock.advance(100)
    for name in ("sim", "drv"):
        sup.heartbeat({"name": name, "pid": sup.children[name].pid, "incarnation": sup.children[name].incarnation, "phase": "busy", "count": clock.now})
    actions = sup.tick()
    assert [e.name for e in of(actions, Event) if e.kind == ev.RECYCLED] == ["sim"] and sim.state == STOPPING
    actions = sup.exited("sim", sim.incarnation, -15)
    assert sup.children["drv"].state == STOPPING, "its dependent restarts after it"


def test_a_stall_reason_carries_what_the_child_says_of_itself():
    sup, clock, pids = start([spec("a")])
    c = sup.children["a"]
    for _ in range(12):
        clock.advance(1.0)
        sup.heartbeat({"name": "a", "pid": c.pid, "incarnation": c.incarnation, "phase": "busy", "count": 3,
                       "detail": "sampling fails for 11s: RuntimeError: too few transitions"})
        sup.tick()
    assert c.state == STALLED and "it reports: sampling fails" in c.reason
    assert "sampling fails" in status_rows(sup.snapshot())[0]["detail"]


def worker_host_specs(**supervisor):
    """The plan of a host whose learner runs elsewhere (run.role workers): its two workers only."""
    overrides = [(f"supervisor.{k}", v) for k, v in {**SUPERVISOR, **supervisor}.items()]
    return list(build_plan(load_config(None, overrides + [("run.role", "workers"),
                                                           ("workers.learner", "tcp://127.0.0.1:7000")])).specs)


def test_a_host_without_the_learner_ends_its_run_when_its_workers_have_finished():
    """run.role workers: the plan has no significant child; the learner says done and each worker exits 0."""
    specs = worker_host_specs()
    assert [s.name for s in specs] == ["worker-0", "worker-1"] and not any(s.significant for s in specs)
    sup, clock, _ = start(specs)
    run_all(sup, clock)
    assert not of(sup.exited("worker-0", sup.children["worker-0"].incarnation, 0), EndRun)
    assert not sup.stopping, "one worker finished, the other steps on"
    actions = sup.exited("worker-1", sup.children["worker-1"].incarnation, 0)
    assert of(actions, EndRun) == [EndRun(0, "every child of pool worker finished")]


@pytest.mark.parametrize("order", [(("worker-0", 1), ("worker-1", 0)), (("worker-1", 0), ("worker-0", 1))])
def test_a_worker_host_with_a_failed_worker_ends_nonzero_once_the_other_has_finished(order):
    sup, clock, _ = start(worker_host_specs(max_restarts=0))
    run_all(sup, clock)
    (first, code), (second, last_code) = order
    assert not of(sup.exited(first, sup.children[first].incarnation, code), EndRun) and not sup.stopping
    actions = sup.exited(second, sup.children[second].incarnation, last_code)
    assert sup.children["worker-0"].state == FAILED
    assert of(actions, EndRun) == [EndRun(1, "every child of pool worker finished or failed (worker-0)")]


def test_a_carla_worker_host_whose_simulator_failed_ends_nonzero():
    """run.role workers with simulator containers: carla-0 fails, worker-0 fails with it, and the host's run ends."""
    overrides = [(f"supervisor.{k}", v) for k, v in {**SUPERVISOR, "max_restarts": 0}.items()] + [
        ("run.role", "workers"), ("workers.learner", "tcp://127.0.0.1:7000"), ("env.backend", "carla"),
        ("simulators.mode", "container"), ("workers.count", 1), ("env.carla.client_timeout_s", 2)]
    sup, clock, pids = start([s for s in build_plan(load_config(None, overrides)).specs])
    for a in sup.heartbeat({"name": "carla-0", "pid": sup.children["carla-0"].pid, "incarnation": 0,
                            "phase": "serving", "probes": 1}):
        if isinstance(a, Spawn):
            sup.spawned(a.name, a.incarnation, next(pids))
    beat(sup, "worker-0")
    actions = sup.exited("carla-0", sup.children["carla-0"].incarnation, 1)
    for _ in range(30):
        clock.advance(1)
        actions += sup.tick()
        for name, c in sup.children.items():
            if c.state == STOPPING and c.pid:
                actions += sup.exited(name, c.incarnation, -15)
    assert sup.children["worker-0"].state == FAILED and sup.children["worker-0"].reason == "carla-0 failed"
    assert of(actions, EndRun) == [EndRun(1, "every child of pool worker finished or failed (worker-0)")]
