"""A real stack under hostile input, a full disk, corrupt files and resumes: it survives, or ends with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from harness.attack import attack
from protocol import events as ev
from protocol.roles import WORKER
from protocol.sockets import load_endpoints, steps_max_bytes
from protocol.states import RUNNING
from supervisor import cli
from tests.e2e.test_full_disk import fill_up, needs_mount

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def supervisor_pid(stack) -> int:
    return stack.proc.pid


@pytest.mark.timeout(300)
def test_hostile_input_on_every_socket_leaves_the_run_alone_and_a_second_up_changes_nothing(stack_factory):
    # checkpoints by time only (every second, at a weight broadcast), so a killed learner redoes little
    stack = stack_factory({"learner": {"checkpoint_every": 10**6, "checkpoint_every_s": 1.0}})
    stack.wait_for(lambda s: stack.proc_row(s, "learner")["updates"] >= 100, 120, "100 updates")
    status = stack.wait_running()
    learner = stack.proc_row(status, "learner")
    before = {"learner": rss(learner["pid"]), "supervisor": rss(supervisor_pid(stack))}
    updates_before = learner["updates"]
    cfg_path = stack.run_dir / "config.yaml"
    config_before = (cfg_path.read_bytes(), cfg_path.stat().st_mtime_ns)
    latest_before = os.readlink(stack.run_dir.parent / "latest")

    attack(stack.run_dir, steps_max_bytes(16, 256 * 1024))

    status = stack.wait_for(lambda s: stack.proc_row(s, "learner")["updates"] > updates_before + 20, 60,
                            "updates going on after the attack")
    for p in status["processes"]:
        assert p["restarts"] == 0 and p["state"] == RUNNING, f"{p['name']} was restarted by garbage"
        assert psutil.Process(p["pid"]).nice() == 5, "children run nicer than the supervisor (child_nice)"
    assert status["disk"]["free_bytes"] > 0 and status["disk"]["warning"] is None
    learner = stack.proc_row(status, "learner")
    grew = {"learner": rss(learner["pid"]) - before["learner"],
            "supervisor": rss(supervisor_pid(stack)) - before["supervisor"]}
    print(f"memory growth under the attack: {grew}")
    assert grew["learner"] < 150 * 2**20 and grew["supervisor"] < 100 * 2**20, grew
    # every process's drops are in status: the learner's (the steps flood), the supervisor's (heartbeat, control)
    assert learner["dropped"] >= 1000 and status["supervisor_dropped"] >= 1000
    assert status["dropped_messages"] >= learner["dropped"] + status["supervisor_dropped"]
    out = stack.cli("status", "--json")
    data = json.loads(out.stdout)
    assert next(p for p in data["processes"] if p["name"] == "learner")["dropped"] >= 1000
    table = stack.cli("status").stdout
    assert "DROPS" in table and "dropped messages: supervisor" in table

    # requests the supervisor cannot answer get an error reply; the supervisor goes on
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(load_endpoints(stack.run_dir)["control"])
        req.send(msgpack.packb({"v": 1, "type": "control_request", "cmd": "chaos", "fault": "garbage",
                                "options": {b"x": 1}}, use_bin_type=True))
        assert req.poll(5000), "the supervisor answers"
        reply = msgpack.unpackb(req.recv_multipart()[0], raw=False)
        assert reply["ok"] is False
    finally:
        ctx.destroy(linger=0)
    assert stack.status() is not None and stack.proc.poll() is None

    # a second `up` of the same run is refused and writes nothing: the live run keeps its config
    second = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(ROOT / "configs/default.yaml"),
                             "--run-id", "test", "--runs-dir", str(stack.run_dir.parent), "--no-live"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode == cli.EXIT_RUN_BUSY and "another supervisor" in second.stderr, second.stderr
    assert (cfg_path.read_bytes(), cfg_path.stat().st_mtime_ns) == config_before
    assert os.readlink(stack.run_dir.parent / "latest") == latest_before
    assert sum(1 for e in stack.events() if e["event"] == "run_started") == 1

    # a killed learner resumes from its checkpoint, and status says how much it redoes
    before_kill = stack.proc_row(stack.status(), "learner")
    reached, rate = before_kill["updates"], before_kill["steps_per_s"]  # a learner's steps/s counts its updates
    os.kill(learner["pid"], signal.SIGKILL)
    status = stack.wait_for(lambda s: stack.proc_row(s, "learner").get("resumed") is not None, 90, "a resume")
    resumed = stack.proc_row(status, "learner")["resumed"]
    assert resumed["previous"] >= reached and resumed["resumed_from"] > 0 and resumed["resumed_from"] % 20 == 0
    # at most the updates of one checkpoint_every_s (1 s) and one broadcast interval (20), plus a heartbeat's lag:
    # what the learner did since its last time-based checkpoint, not the checkpoint_every (10**6) it would otherwise
    # (none when the checkpoint came after the learner's last heartbeat: it resumes past what status last saw)
    assert resumed["redone"] == max(0, resumed["previous"] - resumed["resumed_from"]) <= 2 * rate + 20 + 50, \
        (resumed, rate)
    assert any(e["event"] == "resumed" and e["name"] == "learner" for e in stack.events())
    assert "redone" in stack.cli("status").stdout


def up(runs: Path, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", "up", "--run-id", "test", "--runs-dir", str(runs),
                           "--no-live", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def learner_restarts(run_dir: Path) -> int:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    return sum(1 for e in events if e["event"] == ev.BACKOFF and e["name"] == "learner")


@pytest.mark.timeout(420)
def test_resumes_use_the_runs_config_and_a_corrupt_checkpoint_ends_the_run_in_one_line(stack_factory):
    stack = stack_factory({"learner": {"checkpoint_every": 50}})
    stack.wait_for(lambda s: stack.proc_row(s, "learner")["updates"] >= 120, 150, "two checkpoints")
    assert stack.stop() == 0
    run, runs = stack.run_dir, stack.run_dir.parent
    ckpt = run / "checkpoints"
    assert (ckpt / "latest.pt").exists() and (ckpt / "previous.pt").exists()
    steps = json.loads((run / "replay" / "index.json").read_text())["transitions_total"]
    saved_config = (run / "config.yaml").read_bytes()

    # an override that would change the model is refused, and nothing is written
    before = (run / "config.yaml").read_bytes()
    res = up(runs, "--set", "learner.hidden_dim=32")
    assert res.returncode == cli.EXIT_USAGE and "learner.hidden_dim" in res.stderr
    assert (run / "config.yaml").read_bytes() == before

    # a corrupt latest checkpoint: one failure, no crash loop, one line with the ways on
    latest = ckpt / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    t0 = time.monotonic()
    res = up(runs, "--max-timesteps", str(steps + 600))
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - t0 < 120
    assert learner_restarts(run) == 0, "a corrupt checkpoint is not retried"
    assert str(latest) in res.stdout and "--resume-from previous" in res.stdout
    ended = subprocess.run([sys.executable, "-m", "supervisor", "status", "--run-dir", str(run)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert ended.returncode == cli.EXIT_NO_SUPERVISOR
    assert "learner failed" in ended.stdout and "latest.pt is corrupt" in ended.stdout

    # the way on it named: the checkpoint before it; resumed without --config: the run's own config (pendulum,
    # small nets), not the defaults
    res = up(runs, "--max-timesteps", str(steps + 600), "--resume-from", "previous")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "set aside" in res.stderr and list(ckpt.glob("latest.pt.set-aside-*"))
    assert learner_restarts(run) == 0, "the resumed learner built the run's own model"
    assert "Pendulum-v1" in (run / "config.yaml").read_text()
    assert saved_config.splitlines()[0] == (run / "config.yaml").read_bytes().splitlines()[0]


@needs_mount
@pytest.mark.timeout(300)
def test_a_full_disk_ends_the_run_cleanly_with_the_reason(stack_factory, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(vol)], check=True)
    try:
        stack = stack_factory(start=False)
        cfg = __import__("yaml").safe_load(stack.config_path.read_text())
        cfg["run"]["runs_dir"] = str(vol / "runs")
        stack.config_path.write_text(__import__("yaml").safe_dump(cfg))
        stack.run_dir = vol / "runs" / "test"
        stack.start()
        stack.wait_for(lambda s: stack.proc_row(s, "learner")["updates"] >= 50, 150, "training")
        fill_up(vol)
        stack.proc.wait(timeout=120)  # the run ends by itself
        out = (stack.tmp / "supervisor.out").read_text()
        assert stack.proc.returncode == 1, out
        assert "Traceback" not in out
        assert "no space left on device" in out.lower()
        events = [json.loads(line) for line in (stack.run_dir / "events.jsonl").read_text().splitlines()]
        assert events[-1]["event"] == "run_ended" and "space" in events[-1]["reason"].lower(), events[-3:]
        assert not [e for e in events if e["event"] == ev.BACKOFF and e["name"] == "learner"], \
            "a full disk is not a crash to retry"
        assert [e for e in events if e["event"] == "disk_low"], "a 64 MiB volume is below disk_warn_gb"
        assert not [p for p in stack.run_dir.rglob("*.tmp")], "nothing half-written is left"
        latest = stack.run_dir / "checkpoints" / "latest.pt"
        if latest.exists():
            import torch

            torch.load(latest, weights_only=True)  # whatever is there is whole
        stack.stop()
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=False)


@pytest.mark.alone  # eight workers on two cores by design: beside another test, that one's deadlines would suffer
@pytest.mark.timeout(240)
def test_status_answers_while_an_oversubscribed_run_starts(stack_factory):
    cores = len(os.sched_getaffinity(0))
    stack = stack_factory({"workers": {"count": 4 * cores}, "supervisor": {"max_workers_per_core": 1.0}},
                          start=False)
    stack.extra_args = ["--oversubscribe"]
    stack.start()
    slow, started = [], False
    deadline = time.monotonic() + 150
    while not started and time.monotonic() < deadline:  # until every worker has stepped: the start is over
        t0 = time.monotonic()
        reply = cli.request(stack.run_dir, "status", timeout_ms=3000) if (stack.run_dir / "endpoints.json").exists() \
            else {"ok": True}
        if reply is None:
            slow.append(round(time.monotonic() - t0, 2))
        elif "data" in reply:
            workers = [p for p in reply["data"]["processes"] if p.get("role") == WORKER]
            started = len(workers) == 4 * cores and all(p["state"] == RUNNING and p["env_steps"] > 0 for p in workers)
        time.sleep(0.5)
    assert started, f"{4 * cores} workers not all stepping within 150 s"
    assert not slow, f"status went unanswered {len(slow)} times while {4 * cores} workers started"
    assert "warning" in (stack.tmp / "supervisor.out").read_text()
