"""A second kind of child needs a driver and a spec, not a change to the state machine.

A real :class:`supervisor.loop.Supervisor` (run directory, sockets, event log)
drives a plan that holds the run's own learner and worker plus a simulator of a
kind the machine has never heard of; recording drivers stand in for processes and
simulators, so the test sees which driver each action went to.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from protocol import events as ev
from protocol.config import load_config
from protocol.states import RUNNING
from supervisor.drivers import Beat, Exited, SpawnError
from supervisor.loop import Supervisor
from supervisor.plan import Plan, build_plan
from supervisor.specs import PERMANENT, ChildSpec
from tests.supervisor.test_machine import FakeClock

pytestmark = pytest.mark.timeout(30)


class RecordingDriver:
    """Children that 'run' until terminated or killed; each beat carries a growing counter."""

    def __init__(self, kind, log, counter, phase):
        self.kind, self.log, self.counter, self.phase = kind, log, counter, phase
        self.running: dict[str, tuple[int, int]] = {}  # name -> (incarnation, pid)
        self.frozen: set[str] = set()
        self.exits: list[Exited] = []
        self.pid = 1000 if kind == "process" else 5000
        self.fail_next_spawn = False
        self.count = 0

    def spawn(self, spec, incarnation, standby):
        if self.fail_next_spawn:
            self.fail_next_spawn = False
            raise SpawnError("engine unavailable")
        self.pid += 1
        self.running[spec.name] = (incarnation, self.pid)
        self.log.append((self.kind, "spawn", spec.name, incarnation))
        return self.pid, False

    def start_standby(self, spec):
        self.log.append((self.kind, "standby", spec.name, None))

    def drop_standby(self, name):
        pass

    def terminate(self, name, incarnation):
        self._end(name, incarnation, "terminate", -15)

    def kill(self, name, incarnation):
        self._end(name, incarnation, "kill", -9)

    def _end(self, name, incarnation, what, code):
        self.log.append((self.kind, what, name, incarnation))
        if self.running.get(name, (None,))[0] == incarnation:
            del self.running[name]
            self.frozen.discard(name)
            self.exits.append(Exited(name, incarnation, code))

    def inject(self, name, incarnation, what):
        self.log.append((self.kind, what, name, incarnation))

    def poll(self):
        self.count += 1
        seen = list(self.exits)
        self.exits.clear()
        seen += [Beat({"name": n, "incarnation": i, "pid": p, "phase": self.phase, self.counter: self.count})
                 for n, (i, p) in self.running.items() if n not in self.frozen]
        return seen

    def capture(self, run_dir, action, timeout_s):
        path = Path(run_dir) / "incidents" / f"{self.kind}-{action.name}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "incident.json").write_text(json.dumps({"reason": action.reason}))
        self.log.append((self.kind, "capture", action.name, action.incarnation))
        return path

    def kill_leftovers(self, saved):
        return []

    def pids(self):
        return [pid for _, pid in self.running.values()]

    def kill_all(self):
        self.running.clear()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr("supervisor.loop.TICK_S", 0.001)  # the clock is fake: no loop needs to wait for sockets
    cfg = load_config(None, [("workers.count", 1), ("run.runs_dir", str(tmp_path)), ("supervisor.standby_workers", False),
                             ("supervisor.backoff_jitter", 0.0)])
    base = build_plan(cfg)
    learner, worker = base.specs
    sim = ChildSpec(name="sim-0", kind="simulator", restart=PERMANENT, significant=False,
                    deadlines=replace(worker.deadlines, heartbeat_s=3.0), progress_phases=frozenset({"serving"}),
                    startup_phases=frozenset({"loading"}), progress_counters=("frame",), kill_grace_s=1.0,
                    stop_grace_s=1.0, backoff=worker.backoff, intensity=worker.intensity,
                    launch={"image": "sim:test"}, labels={"role": "simulator", "slot": "0"})
    plan = Plan((learner, replace(worker, depends_on=("sim-0",)), sim))
    run_dir = tmp_path / "run"
    (run_dir / "incidents").mkdir(parents=True)
    log = []
    drivers = {"process": RecordingDriver("process", log, "env_steps", "stepping"),
               "simulator": RecordingDriver("simulator", log, "frame", "serving")}
    clock = FakeClock()
    sup = Supervisor(cfg, run_dir, plan=plan, drivers=drivers, clock=clock)
    poller = sup.start()
    yield sup, poller, drivers, log, clock
    sup.close()


def loop(sup, poller, clock, seconds, step=0.5):
    for _ in range(int(seconds / step)):
        clock.now += step
        sup.loop_once(poller)


def events(sup):
    return [json.loads(line) for line in (sup.run_dir / "events.jsonl").read_text().splitlines()]


def test_a_second_kind_of_child_is_driven_by_its_own_driver(setup):
    sup, poller, drivers, log, clock = setup
    assert [(k, n) for k, what, n, _ in log if what == "spawn"] == [("process", "learner"), ("simulator", "sim-0")], \
        "the worker waits for its simulator"
    loop(sup, poller, clock, 2)
    assert [(k, n) for k, what, n, _ in log if what == "spawn"][2:] == [("process", "worker-0")], \
        "and starts once the simulator answers"
    rows = {r["name"]: r for r in sup.status()["processes"]}
    assert {n: r["state"] for n, r in rows.items()} == {"learner": RUNNING, "sim-0": RUNNING,
                                                         "worker-0": RUNNING}
    assert rows["sim-0"]["kind"] == "simulator" and rows["sim-0"]["role"] == "simulator"
    assert rows["worker-0"]["depends_on"] == ["sim-0"]

    # the simulator freezes: evidence by its own driver, killed by its own driver, its worker restarted after it
    log.clear()
    drivers["simulator"].frozen.add("sim-0")
    loop(sup, poller, clock, 8)
    sim_actions = [(what, n) for k, what, n, _ in log if k == "simulator"]
    assert sim_actions[:2] == [("capture", "sim-0"), ("terminate", "sim-0")]
    assert ("spawn", "sim-0") in sim_actions
    process_actions = [(what, n) for k, what, n, _ in log if k == "process"]
    assert process_actions[:2] == [("terminate", "worker-0"), ("spawn", "worker-0")]
    assert not [a for a in process_actions if a[1] == "learner"], "what does not depend on the simulator is untouched"
    assert log.index(("simulator", "spawn", "sim-0", 1)) < log.index(("process", "spawn", "worker-0", 1))
    kinds = [e["event"] for e in events(sup)]
    assert ev.STALLED in kinds and ev.EVIDENCE_CAPTURED in kinds and ev.DEPENDENCY_RESTART in kinds
    rows = {r["name"]: r for r in sup.status()["processes"]}
    assert rows["sim-0"]["incarnation"] == 1 and rows["worker-0"]["incarnation"] == 1
    assert rows["sim-0"]["last_incident"] == "incidents/simulator-sim-0"
    loop(sup, poller, clock, 2)
    assert all(r["state"] == RUNNING for r in sup.status()["processes"])


def test_a_drivers_spawn_error_backs_off_and_retries(setup):
    sup, poller, drivers, log, clock = setup
    loop(sup, poller, clock, 1)
    drivers["simulator"].fail_next_spawn = True
    sup.execute(sup.machine.request_restart("sim-0"))
    loop(sup, poller, clock, 5)
    evs = events(sup)
    failed = [e for e in evs if e["event"] == ev.SPAWN_FAILED]
    assert failed and failed[0]["name"] == "sim-0" and failed[0]["error"] == "engine unavailable"
    assert [e for e in evs if e["event"] == ev.BACKOFF and e["name"] == "sim-0"]
    assert {r["name"]: r["state"] for r in sup.status()["processes"]}["sim-0"] == RUNNING


def test_a_plan_with_a_kind_no_driver_serves_is_refused(tmp_path):
    cfg = load_config(None, [("workers.count", 0)])
    plan = build_plan(cfg)
    odd = replace(plan.specs[0], name="odd", kind="teleporter", significant=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ValueError, match="teleporter"):
        Supervisor(cfg, run_dir, plan=plan.with_children(odd))


def test_children_import_the_supervisors_own_tree():
    """The process driver puts the directory holding the packages first on a child's path (not a package's own
    directory, where supervisor's modules would shadow installed ones)."""
    from supervisor.drivers.process import PROJECT_ROOT

    assert (PROJECT_ROOT / "supervisor" / "loop.py").is_file() and (PROJECT_ROOT / "learner" / "main.py").is_file()
