"""Chaos: faults drawn into running children on a schedule and handed to their drivers; the garbage it sends is refused or ignored."""

import pytest

from protocol import events as ev
from protocol.codec import ProtocolError, decode
from protocol.config import ConfigError, load_config
from supervisor.chaos import Chaos, garbage_frames
from supervisor.drivers import CRASH
from supervisor.machine import Event, Spawn, Supervision
from supervisor.plan import build_plan


@pytest.mark.timeout(30)
def test_chaos_section_is_off_by_default_and_validated(tmp_path):
    assert load_config("configs/default.yaml").chaos.every_s is None
    cfg = load_config("configs/default.yaml", [("chaos.every_s", 20), ("chaos.faults", ["hang", "garbage"]),
                                               ("chaos.seed", 3), ("chaos.start_after_s", 5)])
    assert cfg.chaos.faults == ["hang", "garbage"] and cfg.chaos.every_s == 20.0
    path = tmp_path / "c.yaml"
    for text, said in [
        ("chaos:\n  evry_s: 20\n", "chaos.evry_s: unknown key"),
        ("chaos:\n  every_s: 20\n  faults: [hang, meteor]\n", "chaos.faults.1"),
        ("chaos:\n  every_s: -1\n", "chaos.every_s"),
        ("chaos:\n  every_s: 20\n  faults: [docker_pause]\n", "docker_pause: only for runs with simulator containers"),
        ("chaos:\n  every_s: 20\n  slow_s: 6\n", "chaos.slow_s (6) must be at most half"),
        ("chaos:\n  faults: []\n", "chaos: faults: an empty list"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        message = str(err.value)
        assert said in message and "\n" not in message, message



@pytest.mark.timeout(30)
def test_garbage_is_refused_by_the_codec_or_ignored_as_a_stranger():
    frames = garbage_frames({"learner": 10, "worker-0": 11})
    assert set(frames) == {"heartbeat", "control", "steps"}
    for socket_name, messages in frames.items():
        for msg in messages:
            try:
                decoded = decode(msg)
            except ProtocolError:
                continue
            # what decodes is the wrong type for its socket, a heartbeat from nobody the machine knows, or steps
            # from a stranger whose spaces are not the run's (dropped as spec_mismatch)
            assert decoded.type != {"heartbeat": "heartbeat", "control": "control_request",
                                    "steps": "steps"}[socket_name] or decoded.get("pid", 0) >= 1_000_000 \
                or decoded.get("name") == "intruder" or decoded.get("worker") == "intruder", (socket_name, decoded)


class InjectionRecorder:
    """A driver's inject, recorded: chaos hands every fault to the target's driver."""

    def __init__(self):
        self.injected = []

    def inject(self, name, incarnation, what):
        self.injected.append((name, incarnation, what))


@pytest.mark.timeout(30)
def test_schedule_draws_faults_into_running_children_and_waits_for_their_recovery(tmp_path):
    cfg = load_config("configs/pendulum.yaml", [("chaos.every_s", 1.0), ("chaos.start_after_s", 5.0),
                                                ("chaos.stop_after_s", 7.5), ("chaos.faults", ["worker_sigkill"]),
                                                ("chaos.seed", 7)])
    plan = build_plan(cfg, "t")
    now = [0.0]
    machine = Supervision(list(plan.specs), lambda: now[0])
    driver, recorded = InjectionRecorder(), []
    chaos = Chaos(cfg.chaos, cfg.run.seed, machine, {s.name: s for s in plan.specs}, tmp_path,
                  driver_of=lambda name: driver, record=recorded.append, dropped=lambda: 0,
                  garbage=lambda sockets, pids: None, clock=lambda: now[0])
    pids = {s.name: 100 + i for i, s in enumerate(plan.specs)}
    for action in machine.start():
        machine.spawned(action.name, action.incarnation, pids[action.name])
    now[0] = 100.0
    chaos.tick()
    assert chaos.state.next_at is None, "the schedule waits for every child to run"
    now[0] = 110.0
    for name, pid in pids.items():
        machine.heartbeat({"name": name, "pid": pid, "incarnation": 0,
                           "phase": "training" if name == "learner" else "stepping"})
    chaos.tick()
    assert not recorded and chaos.state.next_at == 115.0, "the first fault comes start_after_s after that"
    for t in (115.0, 116.0, 117.0):
        now[0] = t
        chaos.tick()
    hits = [e for e in recorded if e.kind == ev.FAULT_INJECTED]
    assert [e.detail["source"] for e in hits] == ["schedule", "schedule"]
    assert sorted(e.name for e in hits) == ["worker-0", "worker-1"], "one each: a hit one waits for its recovery"
    assert sorted(driver.injected) == [("worker-0", 0, CRASH), ("worker-1", 0, CRASH)], "through the driver"
    assert all(e.detail["pid"] == pids[e.name] and e.detail["incarnation"] == 0 for e in hits)
    assert isinstance(hits[0], Event) and hits[0].detail["expect"] == "restart"
    now[0] = 118.0
    chaos.tick()
    assert chaos.state.next_at == float("inf"), "no fault after stop_after_s"
    # the hit worker is replaced: it may be hit again
    machine.exited("worker-0", 0, -9)
    now[0] = 200.0
    for action in machine.tick():
        if isinstance(action, Spawn):
            machine.spawned(action.name, action.incarnation, 300)
    machine.heartbeat({"name": "worker-0", "pid": 300, "incarnation": 1, "phase": "stepping"})
    chaos.tick()
    assert "worker-0" not in chaos.state.busy and "worker-1" in chaos.state.busy
