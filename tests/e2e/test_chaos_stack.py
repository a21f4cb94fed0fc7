"""Chaos against real stacks: worker, learner and simulator faults repaired, garbage shrugged off, the CLI's refusals."""

import json
import signal
import subprocess
import sys
import time

import pytest

from protocol import events as ev
from protocol.states import RUNNING
from runreport.faults import fault_outcomes, summarize_outcomes
from tests.conftest import ROOT


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


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
    assert hang["ok"] and hang["detected"] == ev.STALLED, hang
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
    assert stopped["ok"] and stopped["detected"] == ev.STALLED and stopped["detect_s"] < 2.0 + 1.0, stopped
    assert killed["ok"] and killed["detected"] == "exited" and killed["detect_s"] < 1.0, killed
    crashed = [e for e in stack.events() if e["event"] == ev.EXITED and e["name"] == "worker-1"]
    assert crashed[1]["code"] == 1 and crashed[2]["code"] == -signal.SIGKILL
    summary = summarize_outcomes(list(_outcomes(stack).values()))
    assert all(v["ok"] == v["injected"] for v in summary.values()), summary
    # each named by its cause: in the events (and so the fault's outcome), in status and in the report
    causes = {o["fault"]: o["cause"] for o in _outcomes(stack).values() if o["expect"] == "restart"}
    assert causes == {"hang": "env_step", "crash": "crashed", "worker_sigstop": "process_stopped",
                      "worker_sigkill": "killed_by_SIGKILL"}, causes
    s = stack.status()
    assert row(s, "worker-0")["cause"] == "process_stopped" and row(s, "worker-1")["cause"] == "killed_by_SIGKILL"
    assert "worker-0's last trouble: process_stopped" in stack.cli("status").stdout
    rep = subprocess.run([sys.executable, "-m", "supervisor", "report", str(stack.run_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert "chaos faults" in rep.stdout and "worker_sigstop" in rep.stdout
    assert "cause env_step" in rep.stdout and "worker-1: env_step x1" in rep.stdout, rep.stdout


@pytest.mark.timeout(240)
def test_learner_sigkill_and_sigstop_are_repaired_and_workers_go_on(stack_factory):
    stack = stack_factory({"learner": {"checkpoint_every": 50}})
    stack.wait_running()
    s = stack.wait_for(lambda s: row(s, "learner")["updates"] >= 120, 150, "learner past two checkpoints")
    workers = {i: row(s, f"worker-{i}")["pid"] for i in range(2)}
    stored_before = row(s, "learner")["env_steps"]  # transitions in replay, as the learner last reported
    code, out, _ = _chaos(stack, "learner_sigkill")
    assert code == 0 and "learner_sigkill -> learner" in out
    killed = _wait_outcome(stack, 1, 120, "learner back after SIGKILL")
    assert killed["ok"] and killed["detected"] == "exited", killed
    s = stack.wait_running()
    assert row(s, "learner")["incarnation"] == 1
    resumed = [json.loads(line) for line in stack.log("learner").splitlines() if '"resumed from checkpoint"' in line]
    assert resumed and resumed[0]["updates"] >= 100 and resumed[0]["replay_entries"] > 0
    # the replay index is written after every batch: nothing the learner had reported is lost
    assert resumed[0]["transitions"] >= stored_before
    code, out, _ = _chaos(stack, "learner_sigstop")
    assert code == 0 and "within 2s (heartbeat deadline)" in out
    stopped = _wait_outcome(stack, 2, 120, "learner back after SIGSTOP")
    assert stopped["ok"] and stopped["detected"] == ev.STALLED and stopped["detect_s"] < 2.0 + 1.0, stopped
    assert (killed["cause"], stopped["cause"]) == ("killed_by_SIGKILL", "process_stopped")
    s = stack.wait_for(lambda s: row(s, "learner")["state"] == RUNNING and row(s, "learner")["incarnation"] == 2,
                       60, "the third learner running")
    assert row(s, "learner")["cause"] == "process_stopped"
    steps = {i: row(s, f"worker-{i}")["env_steps"] for i in range(2)}
    s = stack.wait_for(lambda s: all(row(s, f"worker-{i}")["env_steps"] > steps[i] for i in range(2)), 60,
                       "workers go on")
    assert {i: row(s, f"worker-{i}")["pid"] for i in range(2)} == workers, "workers were not restarted"
    resumed = [json.loads(line) for line in stack.log("learner").splitlines() if '"resumed from checkpoint"' in line]
    assert len(resumed) == 2


@pytest.mark.timeout(180)
def test_docker_pause_and_kill_of_a_simulator_are_repaired(tmp_path, docker_engine, fakecarla_image):
    from tests.e2e.test_containers import SimLoop, sim_config

    run_id = f"chaos{int(time.time() * 1000) % 10**8}"
    loop = SimLoop(tmp_path, sim_config(tmp_path, fakecarla_image), run_id).start()
    try:
        loop.until(lambda r: r["carla-0"]["state"] == RUNNING, 60, "carla-0 answering")
        reply = loop.sup.control.answer("chaos", "worker-0", {"fault": "docker_pause"})
        assert not reply["ok"] and "no process named 'worker-0'" in reply["error"]
        reply = loop.sup.control.answer("chaos", None, {"fault": "docker_pause"})
        assert reply["ok"] and reply["data"]["target"] == "carla-0" and reply["data"]["deadline_s"] == 2.0
        loop.until(lambda r: r["carla-0"]["incarnation"] == 1 and r["carla-0"]["state"] == RUNNING, 60,
                   "the paused simulator replaced")
        reply = loop.sup.control.answer("chaos", "carla-0", {"fault": "docker_kill"})
        assert reply["ok"], reply
        loop.until(lambda r: r["carla-0"]["incarnation"] == 2 and r["carla-0"]["state"] == RUNNING, 60,
                   "the killed simulator replaced")
        out = {o["fault"]: o for o in fault_outcomes(loop.events())}
        assert out["docker_pause"]["ok"] and out["docker_pause"]["detected"] == ev.STALLED, out
        assert out["docker_kill"]["ok"] and out["docker_kill"]["detected"] == "exited", out
        assert out["docker_pause"]["detect_s"] < 2.0 + 1.5
        assert (out["docker_pause"]["cause"], out["docker_kill"]["cause"]) == ("simulator_paused", "simulator_killed")
    finally:
        loop.close()
        for c in docker_engine.containers.list(all=True, filters={"label": [f"rlstack.run={run_id}"]}):
            c.remove(force=True)


@pytest.mark.timeout(60)
def test_a_bad_chaos_section_stops_up_in_one_line(tmp_path):
    """Through `supervisor up`: the usual one line, before anything starts."""
    path = tmp_path / "c.yaml"
    path.write_text("chaos:\n  evry_s: 20\n")
    res = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(path), "--no-live"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == f"config error in {path}: chaos.evry_s: unknown key"
