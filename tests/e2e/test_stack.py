"""The whole stack with real processes: it trains, and each failure is found and repaired."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from protocol import events as ev
from protocol.states import FAILED, RUNNING

pytestmark = pytest.mark.timeout(240)


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def test_hang_inside_step_is_killed_and_respawned_within_deadline(stack_factory):
    stack = stack_factory({"workers": {"faults": [
        {"kind": "hang", "where": "step", "at_step": 150, "slots": [0], "incarnations": [0]}]}})
    stack.wait_for(lambda s: row(s, "worker-0")["incarnation"] >= 1 and row(s, "worker-0")["state"] == RUNNING
                   and row(s, "worker-0")["env_steps"] > 0, 120, "worker-0 respawned and stepping")
    events = stack.events()
    stalled = next(e for e in events if e["event"] == ev.STALLED and e["name"] == "worker-0")
    assert "no progress" in stalled["reason"] and "stepping" in stalled["reason"]
    hb = stalled["heartbeat"]
    assert hb["env_steps"] == 150 and hb["phase"] == "stepping"
    # evidence came before the kill: the incident of that stall (the stalled incarnation's pid)
    incidents = [d for d in (stack.run_dir / "incidents").glob("*-worker-0")
                 if json.loads((d / "incident.json").read_text())["pid"] == stalled["pid"]]
    assert len(incidents) == 1
    stack_txt = (incidents[0] / "stack.txt").read_text()
    assert "_fire" in stack_txt and "step" in stack_txt, stack_txt
    assert json.loads((incidents[0] / "incident.json").read_text())["last_heartbeat"]["env_steps"] == 150
    assert (incidents[0] / "log_tail.txt").read_text().count("fault injected") >= 1
    order = [e["event"] for e in events if e["name"] == "worker-0"]
    assert order.index(ev.STALLED) < order.index(ev.TERMINATING) < order.index(ev.EXITED) < order.index(ev.BACKOFF)
    s = stack.status()
    assert row(s, "worker-0")["restarts"] == 1 and row(s, "worker-1")["restarts"] == 0
    assert s["incidents"] == 1


def test_sigstopped_and_sigkilled_workers_are_replaced_by_their_standbys(stack_factory):
    stack = stack_factory({"supervisor": {"standby_workers": True}})
    s = stack.wait_running()
    stack.wait_for(lambda s: row(s, "worker-0")["env_steps"] > 20 and row(s, "worker-1")["env_steps"] > 20, 60,
                   "workers stepping")
    s = stack.status()
    stopped_pid, killed_pid = row(s, "worker-0")["pid"], row(s, "worker-1")["pid"]
    os.kill(stopped_pid, signal.SIGSTOP)
    os.kill(killed_pid, signal.SIGKILL)
    s = stack.wait_for(lambda s: all(row(s, f"worker-{i}")["incarnation"] == 1 and
                                     row(s, f"worker-{i}")["state"] == RUNNING for i in range(2)),
                       90, "both workers replaced")
    assert row(s, "worker-0")["pid"] != stopped_pid and row(s, "worker-1")["pid"] != killed_pid
    events = stack.events()
    stalled = [e for e in events if e["event"] == ev.STALLED]
    assert [e["name"] for e in stalled] == ["worker-0"] and "no heartbeat" in stalled[0]["reason"]
    killed = [e for e in events if e["event"] == ev.EXITED and e["name"] == "worker-1"]
    assert killed[0]["code"] == -signal.SIGKILL
    respawns = [e for e in events if e["event"] == ev.SPAWNED and e["incarnation"] == 1]
    assert sorted(e["name"] for e in respawns) == ["worker-0", "worker-1"]
    assert all(e["standby"] for e in respawns), "each replacement was its slot's pre-started standby"
    # the stopped one was really killed and reaped
    assert not os.path.exists(f"/proc/{stopped_pid}")
    stack.wait_for(lambda s: row(s, "worker-0")["env_steps"] > 20 and row(s, "worker-1")["env_steps"] > 20, 60,
                   "replacements stepping")


def test_crash_looping_worker_ends_failed_while_the_other_keeps_stepping(stack_factory):
    stack = stack_factory({"workers": {"faults": [{"kind": "crash", "where": "step", "at_step": 5, "slots": [1]}]},
                           "supervisor": {"max_restarts": 2}})
    s = stack.wait_for(lambda s: row(s, "worker-1")["state"] == FAILED, 120, "worker-1 failed")
    assert row(s, "worker-1")["restarts"] == 2
    steps = row(s, "worker-0")["env_steps"]
    stack.wait_for(lambda s: row(s, "worker-0")["env_steps"] > steps + 20 and row(s, "worker-0")["state"] == RUNNING,
                   60, "worker-0 still stepping")
    res = stack.cli("status", "--json")
    assert res.returncode == 3, "some process is not running"
    assert row(json.loads(res.stdout), "worker-1")["state"] == FAILED
    failed = [e for e in stack.events() if e["event"] == ev.FAILED]
    assert [e["name"] for e in failed] == ["worker-1"]
    # a user can bring a failed slot back by hand
    assert stack.cli("restart", "worker-1").returncode == 0
    stack.wait_for(lambda s: row(s, "worker-1")["incarnation"] == 3, 30, "worker-1 respawned by hand")


def test_default_image_config_runs_to_completion(stack_factory):
    """The embedded default (racetrack camera frames, stacked by the workers) end to end, tiny; its frames gathered
    from a copy as a GPU's learner keeps one (staged by the intake, applied in order by the update loop)."""
    stack = stack_factory({"run": {"max_timesteps": 300},
                           "workers": {"start_steps": 100},
                           "learner": {"batch_size": 16, "learning_starts": 100, "replay_capacity": 2000,
                                       "updates_per_step": 0.1, "hidden_dim": 32, "feature_dim": 16,
                                       "checkpoint_every": 10, "publish_every": 5, "log_every": 5,
                                       "frames": "device"}},
                          base="configs/default.yaml")
    assert stack.proc.wait(timeout=200) == 0, stack.diagnostics()
    events = stack.events()
    assert any(e["event"] == "run_complete" for e in events)
    meta = json.loads((stack.run_dir / "replay" / "meta.json").read_text())
    assert meta["frame_shape"] == [1, 84, 84] and meta["frame_dtype"] == "|u1" and meta["action_dim"] == 2
    index = json.loads((stack.run_dir / "replay" / "index.json").read_text())
    assert index["transitions_total"] >= 300
    frames = np.load(stack.run_dir / "replay" / "frames.npy", mmap_mode="r")
    assert frames[: index["total"]].max() > 0, "camera frames are rendered, not blank"
    ready = [json.loads(line) for line in stack.log("learner").splitlines() if '"learner ready"' in line]
    assert ready and ready[0]["frames_on"] == "device"


def test_children_die_with_a_killed_supervisor_and_the_run_resumes(stack_factory):
    stack = stack_factory({"learner": {"checkpoint_every": 50}})
    stack.wait_running()
    s = stack.wait_for(lambda s: row(s, "learner")["updates"] >= 70, 150, "a checkpoint")
    children = [p["pid"] for p in s["processes"]]
    os.killpg(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")], "children outlived the supervisor"
    # the same run id again: the learner resumes from its checkpoint and replay
    again = stack_factory(start=False)
    again.config_path.write_text(stack.config_path.read_text().replace(str(again.tmp), str(stack.tmp)))
    again.run_dir = stack.run_dir
    again.start()
    again.wait_running()
    resumed = [json.loads(line) for line in stack.log("learner").splitlines()
               if '"resumed from checkpoint"' in line]
    assert resumed and resumed[-1]["updates"] >= 50
    # a second supervisor for the same run is refused with a clear line
    res = again.cli("status")
    assert res.returncode in (0, 3)
    second = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(again.config_path),
                             "--no-live"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 5 and "another supervisor" in second.stderr
    assert again.status() is not None, "the running supervisor is untouched"


def test_a_diverging_learner_raises_alerts_that_the_supervisor_shows(stack_factory):
    stack = stack_factory({"learner": {"critic_lr": 5.0, "actor_lr": 5.0, "max_grad_norm_critic": 1e9,
                                       "max_grad_norm_actor": 1e9}})
    stack.wait_running()
    s = stack.wait_for(lambda s: any(a.startswith("critical:") for a in row(s, "learner")["alerts"]), 150,
                       "a critical alert in status")
    res = stack.cli("status")
    assert "alert from learner: critical:" in res.stdout
    alerts = [e for e in stack.events() if e["event"] == "alert"]
    assert alerts and alerts[0]["name"] == "learner"
    labelled = list((stack.run_dir / "checkpoints").glob("alert-*.pt"))
    assert labelled, "a critical alert writes a checkpoint labelled with it"
    assert row(s, "learner")["state"] == RUNNING, "an alert informs; it does not stop the run"
