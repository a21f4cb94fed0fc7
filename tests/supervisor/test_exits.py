"""What the machine makes of a child's exit: fatal exits, redone work after a resume, drops over incarnations, a pool that failed."""

from __future__ import annotations

import pytest

from protocol import events as ev
from protocol.config import load_config
from protocol.exits import EXIT_FATAL
from protocol.states import FAILED
from supervisor.machine import Supervision
from supervisor.plan import build_plan
from tests.supervisor.test_machine import FakeClock

pytestmark = pytest.mark.timeout(60)


def machine(**overrides):
    cfg = load_config(None, [("supervisor.max_restarts", 3)] + list(overrides.items()))
    clock = FakeClock()
    m = Supervision(list(build_plan(cfg).specs), clock)
    m.start()
    return m, clock


def beat(m, name, pid, **fields):
    hb = {"name": name, "pid": pid, "incarnation": m.children[name].incarnation, "phase": "training",
          "updates": 0, "env_steps": 0, **fields}
    return m.heartbeat(hb)


def test_a_fatal_exit_fails_the_learner_at_once_with_its_reason_and_ends_the_run():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    beat(m, "learner", 100, detail="runs/x/checkpoints/latest.pt is corrupt (EOFError); ...")
    actions = m.exited("learner", m.children["learner"].incarnation, EXIT_FATAL)
    failed = [a for a in actions if getattr(a, "kind", None) == ev.FAILED]
    assert failed and "latest.pt is corrupt" in failed[0].detail["reason"]
    assert m.children["learner"].state == FAILED and m.children["learner"].restarts == 0
    assert m.stopping and "latest.pt is corrupt" in m.stop_reason


def test_a_fatal_exit_of_a_worker_fails_it_alone():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    actions = m.exited("worker-0", m.children["worker-0"].incarnation, EXIT_FATAL)
    assert m.children["worker-0"].state == FAILED
    assert "restart would not help" in m.children["worker-0"].reason
    assert not m.stopping and not any(getattr(a, "kind", None) == ev.BACKOFF for a in actions)


def test_any_other_exit_code_is_restarted_as_before():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.exited("learner", m.children["learner"].incarnation, 1)
    assert m.children["learner"].state != FAILED and m.children["learner"].restarts == 1


def test_a_resumed_learner_records_the_updates_it_redoes():
    m, clock = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    beat(m, "learner", 100, updates=340)
    m.exited("learner", m.children["learner"].incarnation, -9)
    clock.advance(60)
    m.tick()
    m.spawned("learner", m.children["learner"].incarnation, 200)
    actions = beat(m, "learner", 200, updates=300, resumed_from=300)
    resumed = [a for a in actions if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed and resumed[0].detail == {"resumed_from": 300, "previous": 340, "redone": 40}
    row = next(r for r in m.snapshot() if r["name"] == "learner")
    assert row["resumed"]["redone"] == 40
    assert beat(m, "learner", 200, updates=301, resumed_from=300) == [], "recorded once per incarnation"


def test_a_resume_without_a_known_previous_count_says_so():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    resumed = [a for a in beat(m, "learner", 100, updates=300, resumed_from=300) if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed[0].detail == {"resumed_from": 300, "previous": None, "redone": None}
    m2, _ = machine()
    m2.restore_counts({"learner": 340, "stranger": 5, "worker-0": "x"})
    m2.spawned("learner", m2.children["learner"].incarnation, 100)
    resumed = [a for a in beat(m2, "learner", 100, updates=300, resumed_from=300) if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed[0].detail["redone"] == 40


def test_when_every_worker_has_failed_the_run_ends():
    m, _ = machine(**{"workers.count": 2})
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    m.spawned("worker-1", m.children["worker-1"].incarnation, 102)
    m.exited("worker-0", m.children["worker-0"].incarnation, EXIT_FATAL)
    assert not m.stopping, "one failed worker: the other goes on"
    m.exited("worker-1", m.children["worker-1"].incarnation, EXIT_FATAL)
    assert m.stopping and "every child of pool worker failed" in m.stop_reason


def test_drops_of_every_incarnation_add_up():
    m, clock = machine()
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    beat(m, "worker-0", 101, phase="stepping", dropped=5)
    m.exited("worker-0", m.children["worker-0"].incarnation, -9)
    clock.advance(60)
    m.tick()
    m.spawned("worker-0", m.children["worker-0"].incarnation, 102)
    beat(m, "worker-0", 102, phase="stepping", dropped=2)
    assert next(r for r in m.snapshot() if r["name"] == "worker-0")["dropped"] == 7
