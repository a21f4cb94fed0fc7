"""The whole stack on the CARLA backend: simulator containers (the fake server's image) and their workers.

A simulator frozen with ``docker pause`` costs its slot one deadline: evidence, a
new container, a new worker; the other slot never stops, and training goes on.
"""

import json
import time

import pytest

from harness.carla import carla_overrides
from protocol import events as ev
from protocol.states import RUNNING

pytestmark = pytest.mark.timeout(300)


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def test_a_paused_simulator_costs_its_slot_one_deadline_and_the_other_slot_never_stops(
        stack_factory, docker_engine, fakecarla_image):
    stack = stack_factory(carla_overrides(fakecarla_image), base="configs/carla.yaml")
    try:
        s = stack.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"])
                           and row(s, "worker-0")["env_steps"] > 200 and row(s, "worker-1")["env_steps"] > 200,
                           150, "both slots stepping")
        assert [p["name"] for p in s["processes"]] == ["learner", "carla-0", "worker-0", "carla-1", "worker-1"]
        other = row(s, "worker-1")
        container = docker_engine.containers.get("rlstack-test-carla-0")
        paused_at = time.monotonic()
        container.pause()
        s = stack.wait_for(lambda s: row(s, "carla-0")["incarnation"] >= 1 and row(s, "worker-0")["incarnation"] >= 1
                           and row(s, "worker-0")["state"] == RUNNING and row(s, "worker-0")["env_steps"] > 0,
                           90, "slot 0 replaced and stepping")
        recovered_s = time.monotonic() - paused_at
        w1 = row(s, "worker-1")
        assert w1["pid"] == other["pid"] and w1["incarnation"] == 0 and w1["restarts"] == 0
        # it steps whenever the learner's allowance lets it (it may be waiting on the learner right now)
        s = stack.wait_for(lambda s: row(s, "worker-1")["env_steps"] > other["env_steps"] + 50, 60,
                           "the other slot stepping on")
        assert row(s, "worker-1")["pid"] == other["pid"] and row(s, "worker-1")["restarts"] == 0
        assert row(s, "carla-1")["incarnation"] == 0 and row(s, "learner")["incarnation"] == 0
        events = stack.events()
        stalled = next(e for e in events if e["event"] == ev.STALLED and e["name"] == "carla-0")
        assert "worker-0 found it stalled (exit 76)" in stalled["reason"] or "no heartbeat" in stalled["reason"]
        incident = stack.run_dir / row(s, "carla-0")["last_incident"]
        assert json.loads((incident / "incident.json").read_text())["container"]["Paused"] is True
        assert not [e for e in events if e["event"] in (ev.STALLED, "exited") and e["name"] in ("worker-1", "carla-1")]
        assert recovered_s < 30.0
        # training goes on: the learner keeps updating on both slots' steps
        steps, updates = s["env_steps"], row(s, "learner")["updates"]
        stack.wait_for(lambda s: s["env_steps"] >= steps + 100 and row(s, "learner")["updates"] >= updates + 30, 150,
                       "training going on")
        assert stack.cli("stop").returncode == 0
        assert stack.proc.wait(timeout=60) == 0
        assert not docker_engine.containers.list(all=True, filters={"label": ["rlstack.run=test"]})
    finally:
        for c in docker_engine.containers.list(all=True, filters={"label": ["rlstack.run=test"]}):
            c.remove(force=True)
