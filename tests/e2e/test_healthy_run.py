"""One healthy run, driven as its user drives it: status (on a monitoring host's base install), the Prometheus
series, garbage on its sockets, a restart by hand, the report while it runs, then Ctrl-C and what it leaves.

The tests share one stack (started once for the module, stopped and checked for leftovers after the last) and run
in this order on one pytest worker: each starts from what the one before left, a healthy run.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest
import zmq

from protocol import events as ev
from protocol.codec import decode, encode
from protocol.roles import LEARNER, WORKER
from protocol.sockets import load_endpoints, make_socket
from protocol.states import RUNNING, STATES
from runreport import status as run_status
from runreport.expected import main_table_metrics
from runreport.report import analyse
from runreport.runfiles import load_run
from tests.conftest import ROOT
from tests.e2e.test_base_install import BLOCK_HEAVY
from tests.runreport.test_report import PNG, check_html

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("healthy_run")]
CHILDREN = [LEARNER, "worker-0", "worker-1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared stack: Pendulum, two workers, an evaluation episode every 300 steps, the Prometheus endpoint on."""
    from harness.stack import Stack

    port = free_port()
    stack = Stack(tmp_path_factory.mktemp("healthy"), {"workers": {"eval_freq": 300, "eval_episodes": 1},
                                                        "supervisor": {"metrics_port": port}})
    stack.metrics_port = port
    stack.start()
    try:
        stack.wait_running()
        yield stack
    finally:
        stack.stop()


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
        assert res.status == 200
        text = res.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, **labels) -> float | None:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (labels, samples)
    return found[0] if found else None


def test_status_shows_the_live_run_on_the_base_install(run):
    s = run.wait_for(lambda s: row(s, LEARNER)["updates"] >= 100 and
                     all(row(s, f"worker-{i}")["env_steps"] > 100 for i in range(2)), 120, "steps and updates")
    before = row(s, "worker-0")["env_steps"]
    # the real CLI, as a user runs it, on a monitoring host's base install (torch, gymnasium, TensorBoard and
    # Docker blocked): it shows the live run
    res = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, "status", "--json", "--run-dir", str(run.run_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["run_id"] == "test" and out["run_dir"] == str(run.run_dir.resolve())
    assert [p["name"] for p in out["processes"]] == CHILDREN
    for p in out["processes"]:
        assert {"name", "role", "state", "pid", "restarts", "uptime_s", "heartbeat_age_s", "phase",
                "env_steps", "updates"} <= set(p)
        assert p["state"] == RUNNING and p["restarts"] == 0 and p["heartbeat_age_s"] < 2
        assert p["alerts"] == [], "a healthy run raises no alert"
    table = run.cli("status")
    assert table.returncode == 0
    assert any(all(col in line for col in ("NAME", "STATE", "PID", "UPTIME", "STEPS", "STEPS/S", "HEARTBEAT",
                                           "RESTARTS")) for line in table.stdout.splitlines())
    run.wait_for(lambda s: row(s, "worker-0")["env_steps"] > before, 30, "worker-0 keeps stepping")
    # a worker acts with its numpy policy: torch is never loaded, and its BLAS threads are the config's
    worker = psutil.Process(row(s, "worker-0")["pid"])
    assert not [m.path for m in worker.memory_maps() if "libtorch" in m.path]
    assert worker.environ()["OPENBLAS_NUM_THREADS"] == "1"


def test_the_prometheus_endpoint_serves_every_childs_series(run):
    deadline = time.monotonic() + 60
    while True:  # the loop publishes every half second: wait until the workers' steps show
        got = scrape(run.metrics_port)
        steps = got.get("rlstack_child_steps_per_second", [])
        states = got.get("rlstack_child_state", [])
        running = all(value(states, child=c, state=RUNNING) == 1.0 for c in CHILDREN)
        stepping = all((value(steps, child=f"worker-{i}") or 0) > 0 for i in range(2))
        if (running and stepping) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    host = socket.gethostname()
    for child, role in ((LEARNER, LEARNER), ("worker-0", WORKER), ("worker-1", WORKER)):
        for state in STATES:
            assert value(got["rlstack_child_state"], child=child, role=role, host=host, state=state) == \
                (1.0 if state == RUNNING else 0.0)
        assert value(got["rlstack_child_restarts"], child=child, role=role, host=host) == 0
        assert 0 <= value(got["rlstack_child_heartbeat_age_seconds"], child=child) < 2.0
        assert value(got["rlstack_child_dropped_messages"], child=child) == 0
        assert value(got["rlstack_child_alerts"], child=child) == 0
    assert all(value(got["rlstack_child_steps_per_second"], child=f"worker-{i}") > 0 for i in range(2))
    assert value(got["rlstack_child_env_steps"], child="worker-0") > 0
    assert value(got["rlstack_run_env_steps"], host=host) >= 0
    assert value(got["rlstack_incidents"], host=host) == 0
    assert value(got["rlstack_host_children"], host=host, state=RUNNING) == 3
    assert sum(s.value for s in got["rlstack_host_children"]) == 3


def test_garbage_on_the_learners_and_supervisors_sockets_is_counted_and_ignored(run):
    eps = load_endpoints(run.run_dir)
    ctx = zmq.Context()
    try:
        steps = make_socket(ctx, zmq.PUSH)
        steps.connect(eps["steps"])
        hb = make_socket(ctx, zmq.PUSH)
        hb.connect(eps["heartbeat"])
        for sock in (steps, hb):
            sock.send(b"\xc1\xc1 not msgpack")
            sock.send_multipart([b"\x81\xa1v\x63"])  # {"v": 99}
            sock.send_multipart(encode("control_request", {"cmd": "stop"}))  # valid, but wrong socket
        # steps with a frame of the wrong shape for this run
        steps.send_multipart(encode("steps", {"worker": "intruder", "incarnation": 0, "seq": 0, "env_steps": 1},
                                    {"first": np.array([1], np.uint8), "frames": np.zeros((1, 7), np.float32),
                                     "actions": np.zeros((1, 1), np.float32), "rewards": np.zeros(1, np.float32),
                                     "terminated": np.zeros(1, np.uint8), "truncated": np.zeros(1, np.uint8)}))
        ctl = make_socket(ctx, zmq.REQ)
        ctl.connect(eps["control"])
        ctl.send(b"garbage")
        assert ctl.poll(5000)
        reply = decode(ctl.recv_multipart())
        assert reply.fields["ok"] is False and "malformed" in reply.fields["error"]
        # all delivered: the supervisor counted its four, the learner reported its own in a heartbeat
        s = run.wait_for(lambda s: s["supervisor_dropped"] >= 4 and row(s, LEARNER)["dropped"] >= 3, 20,
                         "supervisor and learner counted the garbage")
    finally:
        ctx.destroy(linger=0)
    assert all(p["state"] == RUNNING for p in s["processes"]) and not s["stopping"]
    learner_log = run.log(LEARNER)
    for reason in ("bad_msgpack", "bad_version", "spec_mismatch"):
        assert reason in learner_log, reason
    before = row(s, LEARNER)["updates"]
    run.wait_for(lambda s: row(s, LEARNER)["updates"] > before, 60, "learner keeps updating")


def test_a_restart_by_hand_and_an_unknown_name(run):
    res = run.cli("restart", "worker-7")
    assert res.returncode == 1 and "no process named 'worker-7'" in res.stderr
    incarnation = row(run.status(), "worker-1")["incarnation"]
    assert run.cli("restart", "worker-1").returncode == 0
    s = run.wait_for(lambda s: row(s, "worker-1")["incarnation"] == incarnation + 1
                     and row(s, "worker-1")["state"] == RUNNING, 60, "worker-1 restarted")
    assert row(s, "worker-1")["restarts"] == 0 and not list((run.run_dir / "incidents").iterdir())


def test_the_report_of_the_running_run_on_the_base_install(run):
    run.wait_for(lambda s: row(s, LEARNER)["updates"] >= 300, 180, "learner updating")
    run.wait_for(lambda s: (run.run_dir / "eval.jsonl").exists(), 120, "an evaluation episode")
    res = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, "report", str(run.run_dir), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"]["status"] == run_status.RUNNING


def test_ctrl_c_stops_everything_cleanly_and_leaves_a_full_record(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run.wait_for(lambda s: (run.run_dir / "eval.jsonl").exists(), 120, "an evaluation episode")
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=40) == 0
    ended = run.events()[-1]
    assert ended["event"] == ev.RUN_ENDED and "SIGINT" in ended["reason"]
    assert (run.run_dir / "checkpoints" / "latest.pt").exists()
    assert not list(run.run_dir.glob("*.sock"))
    log = [json.loads(line) for line in run.log(LEARNER).splitlines()]
    assert log[-1]["event"] == "learner stopped"
    with pytest.raises(OSError):  # the endpoint ends with the supervisor
        scrape(run.metrics_port)
    # TensorBoard has every series the users' dashboards read
    acc = EventAccumulator(str(run.run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/actor_loss", "train/q1_value", "train/q2_value", "train/critic_loss",
                "gradients/critic_mlp_norm", "gradients/actor_mlp_norm", "alerts/gradient_explosion_warning",
                "alerts/gradient_explosion_critical", "train/episode_reward", "train/episode_length",
                "eval/episode_reward", "eval/episode_length", "buffer/utilization"):
        assert tag in tags, tag
    # and the report of the stopped run, on the base install: every section, every row observed, the plots
    res = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, "report", str(run.run_dir), "--html"], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert "STOPPED" in res.stdout and "verdict:" in res.stdout, res.stdout
    out = run.run_dir / "report"
    md = (out / "report.md").read_text()
    for section in ("## 1. Run status", "## 2. Expected against observed", "## 3. Divergence analysis",
                    "## 4. Incidents", "## 5. Plots"):
        assert section in md
    a = analyse(load_run(run.run_dir))
    missing = [r.metric for r in a.rows if r.stats is None]
    transitions = a.run.scalars.get("buffer/transitions")
    assert not missing, (f"rows without an observed value: {missing}; tb files {a.run.scalars.files}, problems "
                         f"{a.run.scalars.problems}, buffer/transitions {transitions}")
    assert set(main_table_metrics()) <= {r.metric for r in a.rows}
    pngs = {p.name for p in out.glob("*.png")}
    assert {"losses.png", "q_values.png", "grad_norms.png", "episodes.png", "eval.png", "workers.png"} <= pngs
    for name in pngs:
        assert (out / name).read_bytes().startswith(PNG)
    check_html(out / "report.html", pngs)
