"""The fleet's decisions about hosts, on a fake clock: the machine's, for a child kind of its own.

A real :class:`supervisor.loop.Supervisor` (run directory, sockets, event log) runs
the plan of ``run.engine: ray`` (the learner and two hosts); a recording driver
stands in for Ray and the agents and beats for each host as told: ``serving`` (its
supervisor answered), ``waiting_node`` (Ray reports its node dead), or nothing (a
hung host, which Ray would still call alive).
"""

from pathlib import Path

import pytest

from protocol import events as ev
from protocol.config import load_config
from protocol.states import FAILED, RUNNING
from supervisor.loop import Supervisor
from supervisor.plan import build_plan, host_agent_spec
from tests.supervisor.test_drivers import RecordingDriver, events, loop
from tests.supervisor.test_machine import FakeClock

pytestmark = pytest.mark.timeout(30)


class HostsDriver(RecordingDriver):
    """Hosts that beat with the phase set for each (None: silent)."""

    def __init__(self, log):
        super().__init__("ray_host", log, "probes", "serving")
        self.phases: dict[str, str | None] = {}
        self.answers: dict[str, int] = {}

    def poll(self):
        self.count += 1
        seen = list(self.exits)
        self.exits.clear()
        for name, (inc, pid) in self.running.items():
            phase = self.phases.get(name, "serving")
            if phase is not None:
                seen.append(self.beat(name, inc, phase))
        return seen

    def beat(self, name, inc, phase):
        from supervisor.drivers import Beat

        if phase == "serving":  # as the Ray driver counts: answers of the host's supervisor, nothing else
            self.answers[name] = self.answers.get(name, 0) + 1
        return Beat({"name": name, "incarnation": inc, "pid": None, "phase": phase, "probes": self.answers.get(name, 0),
                     "children": [{"name": "worker-0", "state": RUNNING, "env_steps": self.count, "restarts": 0}]})

    def spawn(self, spec, incarnation, standby):
        super().spawn(spec, incarnation, standby)
        return None, False


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    monkeypatch.setattr("supervisor.loop.TICK_S", 0.001)  # the clock is fake: no loop needs to wait for its sockets
    cfg = load_config(None, [("run.engine", "ray"), ("learner.listen", "tcp://127.0.0.1:5555"), ("cluster.hosts", 2),
                             ("cluster.host_deadline_s", 6.0), ("cluster.probe_timeout_s", 2.0), ("cluster.host_startup_s", 30.0),
                             ("run.runs_dir", str(tmp_path)), ("supervisor.backoff_jitter", 0.0),
                             ("supervisor.max_restarts", 2), ("supervisor.restart_window_s", 600.0)])
    plan = build_plan(cfg, "run")
    run_dir = tmp_path / "run"
    (run_dir / "incidents").mkdir(parents=True)
    log = []
    hosts = HostsDriver(log)
    drivers = {"process": RecordingDriver("process", log, "updates", "training"), "ray_host": hosts}
    clock = FakeClock()
    sup = Supervisor(cfg, run_dir, plan=plan, drivers=drivers, clock=clock)
    poller = sup.start()
    yield sup, poller, hosts, log, clock
    sup.close()


def states(sup):
    return {r["name"]: (r["state"], r["incarnation"]) for r in sup.status()["processes"]}


def test_a_healthy_fleet_is_left_alone_and_status_shows_each_hosts_children(fleet):
    sup, poller, hosts, log, clock = fleet
    loop(sup, poller, clock, 60)
    assert states(sup) == {"learner": (RUNNING, 0), "host-0": (RUNNING, 0), "host-1": (RUNNING, 0)}
    assert not [e for e in events(sup) if e["event"] == ev.STALLED]
    row = next(r for r in sup.status()["processes"] if r["name"] == "host-0")
    assert row["role"] == "host" and row["children"][0]["name"] == "worker-0"


def test_a_silent_host_gets_evidence_then_a_kill_then_a_new_agent_and_the_other_is_untouched(fleet):
    sup, poller, hosts, log, clock = fleet
    loop(sup, poller, clock, 5)
    log.clear()
    hosts.phases["host-0"] = None  # its supervisor answers nothing; Ray would still call the agent alive
    loop(sup, poller, clock, 5)
    assert not [a for a in log if a[2] == "host-0"], "within its deadline (6 s) nothing happens"
    loop(sup, poller, clock, 10)
    actions = [(what, inc) for kind, what, name, inc in log if name == "host-0"]
    assert actions[:2] == [("capture", 0), ("terminate", 0)] and ("spawn", 1) in actions, actions
    hosts.phases["host-0"] = "serving"
    loop(sup, poller, clock, 5)
    assert states(sup)["host-0"] == (RUNNING, 1) and states(sup)["host-1"] == (RUNNING, 0)
    assert (sup.run_dir / "incidents" / "ray_host-host-0" / "incident.json").exists()


def test_a_host_waiting_for_its_node_is_waited_for_not_killed(fleet):
    sup, poller, hosts, log, clock = fleet
    loop(sup, poller, clock, 5)
    log.clear()
    hosts.phases["host-1"] = "waiting_node"  # Ray reports its node dead: the driver beats, no progress
    loop(sup, poller, clock, 120)
    assert not [a for a in log if a[2] == "host-1"], log
    assert states(sup)["host-1"] == (RUNNING, 0)
    hosts.phases["host-1"] = "serving"
    loop(sup, poller, clock, 5)
    assert not [e for e in events(sup) if e["event"] == ev.STALLED]


def test_a_host_that_keeps_hanging_fails_and_the_run_goes_on_with_the_others(fleet):
    sup, poller, hosts, log, clock = fleet
    loop(sup, poller, clock, 5)
    hosts.phases["host-0"] = None  # every agent it gets hangs too
    loop(sup, poller, clock, 200)
    assert states(sup)["host-0"][0] == FAILED
    assert states(sup)["learner"] == (RUNNING, 0) and states(sup)["host-1"] == (RUNNING, 0)
    assert sup.machine.end is None, "the run goes on with the other host"


def test_each_hosts_agent_is_given_paths_and_the_learners_address_never_a_key(tmp_path):
    cfg = load_config(None, [("run.engine", "ray"), ("learner.listen", "tcp://127.0.0.1:5555"), ("cluster.hosts", 1),
                             ("run.runs_dir", str(tmp_path))])
    spec = host_agent_spec(cfg, "r", "host-0", "rlstack-r-registry")
    assert spec["run_id"] == "r-host-0" and Path(spec["runs_dir"]).is_absolute()
    assert spec["config"]["learner"]["listen"] is None and "cluster" not in spec["config"]
    assert load_config(None, [("run.engine", "ray"), ("learner.listen", "tcp://127.0.0.1:5555")]).cluster.hosts is None
    with pytest.raises(Exception, match="learner.listen"):
        load_config(None, [("run.engine", "ray")])
    with pytest.raises(Exception, match="cluster.host_key go together"):
        load_config(None, [("run.engine", "ray"), ("learner.listen", "tcp://127.0.0.1:5555"),
                           ("learner.curve_key", "k/l.key_secret"), ("learner.curve_clients", "k/c")])
    fleet = load_config("configs/fleet.yaml")  # the shipped fleet setting: keys on the wire, each host's by path
    spec = host_agent_spec(fleet, "r", "host-3", None)
    assert spec["config"]["workers"]["curve_key"] == fleet.cluster.host_key and "secret-key" not in str(spec)


def test_the_learner_s_last_seen_judges_a_settled_host_only_against_the_others():
    from supervisor.drivers.ray import learner_silence

    heard = {"a.host-0": 30.0, "b.host-1": 0.5}
    why = learner_silence("a.host-0", heard, settled_s=40.0, limit_s=15.0)
    assert why and "a.host-0 for 30s" in why and "b.host-1" in why
    # negative twins: heard lately; settled too briefly (a slot being repaired or started); nobody else heard (the
    # learner's own trouble, or its rate limit holding everyone); the rule off; a host never heard counts from when
    # it settled
    assert learner_silence("a.host-0", {"a.host-0": 3.0, "b.host-1": 0.5}, 40.0, 15.0) is None
    assert learner_silence("a.host-0", heard, settled_s=10.0, limit_s=15.0) is None
    assert learner_silence("a.host-0", {"a.host-0": 30.0, "b.host-1": 20.0}, 40.0, 15.0) is None
    assert learner_silence("a.host-0", {"a.host-0": 30.0}, 40.0, 15.0) is None
    assert learner_silence("a.host-0", heard, 40.0, 0.0) is None
    assert "for 20s" in learner_silence("c.host-2", heard, settled_s=20.0, limit_s=15.0)


def test_a_host_delivering_nothing_stops_counting_as_progress_by_the_learner_s_view():
    from supervisor.drivers.ray import HostRun, LearnerView

    clock = FakeClock()
    view = LearnerView(limit_s=15.0, fresh_s=5.0, clock=clock)
    run = HostRun("host-0", 0, actor=None, actor_name="x", identity="a.host-0")
    running = {"processes": [{"name": "worker-0", "state": RUNNING}]}

    def learner(a_seen, b_seen=0.2, state=RUNNING):
        return [{"name": "learner", "state": state, "heartbeat_age_s": 0.3,
                 "hosts": [{"host": "a.host-0", "last_seen_s": a_seen}, {"host": "b.host-1", "last_seen_s": b_seen}]},
                {"name": "host-0", "state": RUNNING, "heartbeat_age_s": 0.1, "hosts": []}]

    assert view.judge(run, running) is None  # settles now
    for t in range(0, 30):
        clock.advance(1.0)
        view.see(learner(a_seen=float(t + 1)))
        why = view.judge(run, running)
        assert (why is not None) == (t + 1 > 15.0), (t, why)  # settled for t + 1 s, unheard for longer
    # a slot of the host restarting: not judged, and settling starts again afterwards
    assert view.judge(run, {"processes": [{"name": "worker-0", "state": "backoff"}]}) is None
    view.see(learner(a_seen=60.0))
    assert view.judge(run, running) is None
    # a learner just restarted has not had the host yet: it counts from the learner's start, not from ever
    clock.advance(20.0)
    view.see([{"name": "learner", "state": RUNNING, "heartbeat_age_s": 0.0, "uptime_s": 4.0,
               "hosts": [{"host": "b.host-1", "last_seen_s": 0.2}]}])
    assert view.judge(run, running) is None
    clock.advance(12.0)
    view.see([{"name": "learner", "state": RUNNING, "heartbeat_age_s": 0.0, "uptime_s": 16.0,
               "hosts": [{"host": "b.host-1", "last_seen_s": 0.2}]}])
    assert "for 16s" in view.judge(run, running)
    # no learner running, or a view gone stale: nothing judged
    clock.advance(20.0)
    view.see(learner(a_seen=80.0, state="backoff"))
    assert view.judge(run, running) is None
    view.see(learner(a_seen=80.0))
    clock.advance(6.0)
    assert view.judge(run, running) is None


def test_a_full_hosts_table_judges_only_the_hosts_it_shows():
    from protocol.messages import MAX_HOSTS
    from supervisor.drivers.ray import HostRun, LearnerView

    clock = FakeClock()
    view = LearnerView(limit_s=15.0, fresh_s=5.0, clock=clock)
    run = HostRun("host-99", 0, actor=None, actor_name="x", identity="k.host-99")
    running = {"processes": [{"name": "worker-0", "state": RUNNING}]}
    table = [{"host": f"k.host-{i}", "last_seen_s": 0.5} for i in range(MAX_HOSTS)]
    view.judge(run, running)
    clock.advance(100.0)
    view.see([{"name": "learner", "state": RUNNING, "heartbeat_age_s": 0.0, "uptime_s": 100.0, "hosts": table}])
    assert view.judge(run, running) is None, "a host the full table has no room for is not taken for silent"
    view.see([{"name": "learner", "state": RUNNING, "heartbeat_age_s": 0.0, "uptime_s": 100.0, "hosts": table[:-1]}])
    assert view.judge(run, running) is not None
