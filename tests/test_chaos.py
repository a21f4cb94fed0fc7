"""Chaos: faults injected on command or on a schedule, each found and repaired (or shrugged off), from events alone."""

import json
import signal
import subprocess
import sys
import time

import pytest

from protocol import events as ev
from protocol.codec import ProtocolError, decode
from protocol.config import ConfigError, load_config
from runreport.faults import fault_outcomes, format_summary, summarize_outcomes
from supervisor.chaos import Chaos, garbage_frames
from supervisor.drivers import CRASH
from supervisor.machine import Event, Spawn, Supervision
from supervisor.plan import build_plan
from tests.conftest import ROOT


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


# -- the config section ----------------------------------------------------------------------------------

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
    # and through `supervisor up`: the usual one line, before anything starts
    path.write_text("chaos:\n  evry_s: 20\n")
    res = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(path), "--no-live"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == f"config error in {path}: chaos.evry_s: unknown key"


# -- fault_outcomes on hand-written events --------------------------------------------------------------

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
        _e(22.0, ev.EXITED, "worker-0", pid=100, code=0, state="stalled"),
        _e(22.3, ev.SPAWNED, "worker-0", pid=101, incarnation=1, standby=True),
        _e(23.0, ev.RUNNING, "worker-0", pid=101, phase="stepping"),
        _injected(30.0, 2, "learner_sigkill", "learner", 50, "restart"),
        _e(30.1, ev.EXITED, "learner", pid=50, code=-9, state="running"),
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
        _e(90.5, ev.EXITED, "worker-2", pid=300, code=1, state="running"),  # crashed in the window: a restart
        _e(92.0, ev.FAULT_ENDED, "run", id=7, fault="garbage", target="heartbeat", progress=None, dropped=8),
    ]
    out = {o["id"]: o for o in fault_outcomes(events)}
    assert out[1]["detected"] == "stalled" and out[1]["detect_s"] == 10.5 and out[1]["recover_s"] == 13.0
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


# -- the worker's side: a request file and a flag, fired at the next step() ------------------------------------

@pytest.mark.timeout(30)
def test_worker_fires_a_requested_fault_at_its_next_step_and_only_its_own(tmp_path):
    import os

    import gymnasium as gym
    import numpy as np

    from protocol.chaos import REQUEST_SIGNAL, request_path, write_request
    from worker import faults
    from worker.faults import FaultInjector, InjectedCrash

    class Recorder(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

        def __init__(self):
            self.actions = []

        def step(self, action):
            self.actions.append(action)
            return np.zeros(1, np.float32), 0.0, False, False, {}

    env = FaultInjector(Recorder(), [], slot=0, incarnation=0, seed=0, requests=(tmp_path, "worker-0"))
    old = signal.signal(REQUEST_SIGNAL, faults.on_request_signal)
    try:
        write_request(tmp_path, "worker-0", os.getpid() + 1, "crash")  # another incarnation's: ignored
        os.kill(os.getpid(), REQUEST_SIGNAL)
        env.step([0.0, 1.0])
        assert not request_path(tmp_path, "worker-0").exists(), "read and removed"
        write_request(tmp_path, "worker-0", os.getpid(), "crash", fault_id=3)
        env.step([0.0, 1.0])  # no signal yet: the file alone does nothing
        os.kill(os.getpid(), REQUEST_SIGNAL)
        with pytest.raises(InjectedCrash):
            env.step([0.0, 1.0])
        write_request(tmp_path, "worker-0", os.getpid(), "slow", slow_s=0.1, duration_s=0.35)
        os.kill(os.getpid(), REQUEST_SIGNAL)
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            env.step([0.0, 1.0])
        took = time.monotonic() - started
        steps = len(env.env.actions)
        assert 0.3 <= took < 0.6 and steps <= 8, "each step slept slow_s"
        time.sleep(0.1)
        for _ in range(100):
            env.step([0.0, 1.0])  # over: full speed again
        assert time.monotonic() - started < 1.0
    finally:
        signal.signal(REQUEST_SIGNAL, old)


# -- the schedule, on the real machine and a driver that records what it is asked -------------------------------

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


# -- the CLI without a run -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_cli_refuses_an_unknown_fault_in_one_line_and_needs_a_supervisor(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "supervisor", "chaos", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)

    res = cli("meteor", "--run-dir", str(tmp_path))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown fault 'meteor'; faults: " in res.stderr
    res = cli("hang", "--slow-s", "1", "--run-dir", str(tmp_path))
    assert res.returncode == 2 and "for slow, not hang" in res.stderr
    res = cli("hang", "--run-dir", str(tmp_path / "none"))
    assert res.returncode == 4 and "no supervisor answers" in res.stderr
    res = cli("--list")
    assert res.returncode == 0 and "docker_pause" in res.stdout and "slow" in res.stdout


# -- the real stack ------------------------------------------------------------------------------------------

def _chaos(stack, *args):
    res = stack.cli("chaos", *args)
    return res.returncode, res.stdout.strip(), res.stderr.strip()


def _outcomes(stack):
    return {o["id"]: o for o in fault_outcomes(stack.events())}


def _fired_after(stack, outcome):
    """Seconds from a fault's injection to the worker taking it up (its next step; later while it waits for the
    learner's allowance), from the worker's own log."""
    from datetime import datetime

    for line in stack.log(outcome["target"]).splitlines():
        row = json.loads(line)
        if row.get("event") == "fault injected" and row.get("fault_id") == outcome["id"]:
            return datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp() - outcome["time"]
    raise AssertionError(f"{outcome['target']} never took up fault {outcome['id']}")


def _wait_outcome(stack, fid, timeout, what):
    def done(s):
        o = _outcomes(stack).get(fid)
        return o is not None and (o["ok"] or o["note"] not in ("", "not detected", "not running again",
                                                               "window not over"))
    stack.wait_for(done, timeout, what)
    return _outcomes(stack)[fid]


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_worker_faults_and_garbage_are_repaired_or_shrugged_off(stack_factory):
    stack = stack_factory()
    stack.wait_running()
    stack.wait_for(lambda s: all(row(s, f"worker-{i}")["env_steps"] > 50 for i in range(2)), 60, "workers stepping")
    # the CLI's one-line errors, against a live run
    for args, said in [(["hang", "--target", "worker-7"], "no process named 'worker-7'"),
                       (["hang", "--target", "learner"],
                        "hang needs a worker (worker-0, worker-1), and learner is not one"),
                       (["learner_sigkill", "--target", "worker-0"], "needs a learner"),
                       (["docker_pause"], "docker_pause needs a simulator container, and this run has none"),
                       (["garbage", "--target", "worker-0"], "garbage goes to a socket"),
                       (["slow", "--slow-s", "2.5"], "more than half of"),
                       (["slow", "--duration-s", "-1"], "duration_s must be a number of seconds")]:
        code, out, err = _chaos(stack, *args)
        assert code == 1 and said in err and "\n" not in err and not out, (args, err)
    assert not [e for e in stack.events() if e["event"].startswith("fault_")], "refused faults leave no event"

    # slow on worker-0 and garbage on every socket at once, a hang in worker-1
    code, out, _ = _chaos(stack, "slow", "--target", "worker-0", "--slow-s", "0.5", "--duration-s", "4")
    assert code == 0 and "slow -> worker-0" in out and "must leave it alone" in out
    slow_pid = row(stack.status(), "worker-0")["pid"]
    assert _chaos(stack, "garbage")[0] == 0
    code, out, _ = _chaos(stack, "hang", "--target", "worker-1")
    assert code == 0 and "within 3s (progress deadline)" in out
    hang = _wait_outcome(stack, 3, 60, "the hang repaired")
    assert hang["ok"] and hang["detected"] == "stalled", hang
    assert hang["detect_s"] - _fired_after(stack, hang) < 3.0 + 1.0, "found within the progress deadline"
    slow, garbage = _wait_outcome(stack, 1, 30, "the slow window over"), _wait_outcome(stack, 2, 30, "garbage settled")
    assert slow["ok"] and not slow["restarted"] and slow["progress"] > 0, slow
    assert garbage["ok"] and not garbage["restarted"] and garbage["dropped"] > 0, garbage
    s = stack.wait_for(lambda s: s["dropped_messages"] >= 8, 20, "the supervisor counted the garbage")
    assert row(s, "worker-0")["pid"] == slow_pid and row(s, "worker-0")["restarts"] == 0
    assert row(s, "learner")["restarts"] == 0
    log = stack.log("worker-0")
    assert '"kind": "slow"' in log and '"slow fault over"' in log
    learner_log = stack.log("learner")
    for reason in ("bad_msgpack", "bad_version", "header_too_large", "spec_mismatch"):
        assert reason in learner_log, reason

    # a crash in step(), then SIGSTOP and SIGKILL (default targets: a random running worker)
    stack.wait_running()
    code, out, _ = _chaos(stack, "crash", "--target", "worker-1")
    crash = _wait_outcome(stack, 4, 60, "the crash repaired")
    assert crash["ok"] and crash["detected"] == "exited", crash
    assert crash["detect_s"] - _fired_after(stack, crash) < 1.0
    stack.wait_running()
    assert _chaos(stack, "worker_sigstop", "--target", "worker-0")[0] == 0
    assert _chaos(stack, "worker_sigkill", "--target", "worker-1")[0] == 0
    stopped, killed = _wait_outcome(stack, 5, 60, "SIGSTOP repaired"), _wait_outcome(stack, 6, 60, "SIGKILL repaired")
    assert stopped["ok"] and stopped["detected"] == "stalled" and stopped["detect_s"] < 2.0 + 1.0, stopped
    assert killed["ok"] and killed["detected"] == "exited" and killed["detect_s"] < 1.0, killed
    crashed = [e for e in stack.events() if e["event"] == ev.EXITED and e["name"] == "worker-1"]
    assert crashed[1]["code"] == 1 and crashed[2]["code"] == -signal.SIGKILL
    summary = summarize_outcomes(list(_outcomes(stack).values()))
    assert all(v["ok"] == v["injected"] for v in summary.values()), summary
    rep = subprocess.run([sys.executable, "-m", "supervisor", "report", str(stack.run_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert "chaos faults" in rep.stdout and "worker_sigstop" in rep.stdout


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_learner_sigkill_and_sigstop_are_repaired_and_workers_go_on(stack_factory):
    stack = stack_factory()
    stack.wait_running()
    s = stack.wait_for(lambda s: row(s, "learner")["updates"] >= 120, 150, "learner past a checkpoint")
    workers = {i: row(s, f"worker-{i}")["pid"] for i in range(2)}
    code, out, _ = _chaos(stack, "learner_sigkill")
    assert code == 0 and "learner_sigkill -> learner" in out
    killed = _wait_outcome(stack, 1, 120, "learner back after SIGKILL")
    assert killed["ok"] and killed["detected"] == "exited", killed
    stack.wait_running()
    code, out, _ = _chaos(stack, "learner_sigstop")
    assert code == 0 and "within 2s (heartbeat deadline)" in out
    stopped = _wait_outcome(stack, 2, 120, "learner back after SIGSTOP")
    assert stopped["ok"] and stopped["detected"] == "stalled" and stopped["detect_s"] < 2.0 + 1.0, stopped
    s = stack.wait_for(lambda s: row(s, "learner")["state"] == "running" and row(s, "learner")["incarnation"] == 2,
                       60, "the third learner running")
    steps = {i: row(s, f"worker-{i}")["env_steps"] for i in range(2)}
    s = stack.wait_for(lambda s: all(row(s, f"worker-{i}")["env_steps"] > steps[i] for i in range(2)), 60,
                       "workers go on")
    assert {i: row(s, f"worker-{i}")["pid"] for i in range(2)} == workers, "workers were not restarted"
    resumed = [json.loads(line) for line in stack.log("learner").splitlines() if '"resumed from checkpoint"' in line]
    assert len(resumed) == 2


# -- a simulator container: docker pause and docker kill through the supervisor ------------------------------

@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_docker_pause_and_kill_of_a_simulator_are_repaired(tmp_path, docker_engine, fakecarla_image):
    from tests.test_containers import SimLoop, sim_config

    run_id = f"chaos{int(time.time() * 1000) % 10**8}"
    loop = SimLoop(tmp_path, sim_config(tmp_path, fakecarla_image), run_id).start()
    try:
        loop.until(lambda r: r["carla-0"]["state"] == "running", 60, "carla-0 answering")
        reply = loop.sup.answer("chaos", "worker-0", {"fault": "docker_pause"})
        assert not reply["ok"] and "no process named 'worker-0'" in reply["error"]
        reply = loop.sup.answer("chaos", None, {"fault": "docker_pause"})
        assert reply["ok"] and reply["data"]["target"] == "carla-0" and reply["data"]["deadline_s"] == 2.0
        loop.until(lambda r: r["carla-0"]["incarnation"] == 1 and r["carla-0"]["state"] == "running", 60,
                   "the paused simulator replaced")
        reply = loop.sup.answer("chaos", "carla-0", {"fault": "docker_kill"})
        assert reply["ok"], reply
        loop.until(lambda r: r["carla-0"]["incarnation"] == 2 and r["carla-0"]["state"] == "running", 60,
                   "the killed simulator replaced")
        out = {o["fault"]: o for o in fault_outcomes(loop.events())}
        assert out["docker_pause"]["ok"] and out["docker_pause"]["detected"] == "stalled", out
        assert out["docker_kill"]["ok"] and out["docker_kill"]["detected"] == "exited", out
        assert out["docker_pause"]["detect_s"] < 2.0 + 1.5
    finally:
        loop.close()
        for c in docker_engine.containers.list(all=True, filters={"label": [f"rlstack.run={run_id}"]}):
            c.remove(force=True)
