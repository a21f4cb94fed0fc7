"""The container driver against a real Docker engine and the fake CARLA server's image.

Each test runs its own supervisor loop over simulator containers (no learner, no
workers), on ports of its own; every container labelled for the test's run is
removed at teardown, also when the test fails.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from harness.carla import free_port_block
from protocol import events as ev
from protocol.config import load_config
from protocol.states import FAILED, RUNNING
from runreport.report import summarize
from supervisor.drivers import SpawnError
from supervisor.drivers.container import (
    RUN_LABEL,
    EngineError,
    connect_engine,
    server_version,
)
from supervisor.loop import Supervisor
from supervisor.plan import Plan, build_plan
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)

FAKE_COMMAND = "python3 -m fakecarla -carla-rpc-port={rpc_port} -carla-streaming-port={streaming_port}"


def sim_config(tmp_path, image, slots=1, **simulators):
    base = free_port_block(10 * slots)
    values = {"image": image, "command": FAKE_COMMAND, "gpus": [], "base_port": base, "port_stride": 10,
              "tm_base_port": base + 5, "ready_timeout_s": 30.0, "probe_interval_s": 0.25,
              "probe_timeout_s": 1.0, "liveness_deadline_s": 2.0, "kill_grace_s": 1.0, **simulators}
    overrides = [("env.backend", "carla"), ("workers.count", slots), ("run.runs_dir", str(tmp_path)),
                 ("env.carla.client_timeout_s", 4.0),
                 ("supervisor.backoff_initial_s", 0.2), ("supervisor.evidence_timeout_s", 2.0)]
    return load_config(None, overrides + [(f"simulators.{k}", v) for k, v in values.items()])


class SimLoop:
    """A real Supervisor whose only children are the simulator containers of a carla plan."""

    def __init__(self, tmp_path, cfg, run_id):
        self.run_dir = tmp_path / run_id
        (self.run_dir / "incidents").mkdir(parents=True)
        (self.run_dir / "logs").mkdir()
        full = build_plan(cfg, run_id)
        self.plan = Plan(tuple(replace(s, depends_on=()) for s in full.specs if s.kind == "container"))
        self.sup = Supervisor(cfg, self.run_dir, plan=self.plan)
        self.poller = None

    def start(self):
        self.sup.clean_leftovers()
        self.poller = self.sup.start()
        return self

    def until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sup.loop_once(self.poller)
            rows = {r["name"]: r for r in self.sup.status()["processes"]}
            if predicate(rows):
                return rows
        raise AssertionError(f"timed out waiting for {what}; rows {json.dumps(self.sup.status()['processes'])[:1500]}"
                             f"\nevents {self.events()[-15:]}")

    def events(self):
        path = self.run_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def close(self):
        if self.poller is not None:
            self.sup.close()


@pytest.fixture
def sims(tmp_path, docker_engine, fakecarla_image):
    """Start SimLoops; at teardown close them and remove every container labelled for their runs."""
    loops, run_ids = [], []

    def make(run_id=None, slots=1, **simulators):
        run_id = run_id or f"t{secrets.token_hex(4)}"
        run_ids.append(run_id)
        cfg = sim_config(tmp_path, simulators.pop("image", fakecarla_image), slots, **simulators)
        loop = SimLoop(tmp_path, cfg, run_id)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()
    left = [c for run_id in run_ids
            for c in docker_engine.containers.list(all=True, filters={"label": [f"{RUN_LABEL}={run_id}"]})]
    for c in left:
        try:
            c.remove(force=True)
        except Exception:
            pass
    assert not left, f"containers left behind: {[c.name for c in left]}"


def running(rows, name="carla-0", incarnation=0):
    return rows[name]["state"] == RUNNING and rows[name]["incarnation"] >= incarnation


def test_a_container_is_ready_when_it_answers_and_a_pause_ends_in_evidence_and_a_new_one(sims, docker_engine):
    loop = sims().start()
    spec = loop.plan.specs[0]
    rows = loop.until(running, 60, "carla-0 answering")
    assert server_version("127.0.0.1", spec.launch["rpc_port"], 2.0) == "0.9.16"
    container = docker_engine.containers.get(spec.launch["container_name"])
    assert container.labels[RUN_LABEL] == loop.sup.run_id and container.attrs["HostConfig"]["NetworkMode"] == "host"

    container.pause()  # TCP still connects; nothing answers
    rows = loop.until(lambda r: r["carla-0"]["incarnation"] >= 1 and r["carla-0"]["state"] == RUNNING, 60,
                      "the paused simulator replaced")
    kinds = [(e["event"], e["name"]) for e in loop.events()]
    stalled = kinds.index((ev.STALLED, "carla-0"))
    assert kinds.index((ev.EVIDENCE_CAPTURED, "carla-0")) > stalled
    assert kinds.index((ev.TERMINATING, "carla-0")) > kinds.index((ev.EVIDENCE_CAPTURED, "carla-0"))
    stall = next(e for e in loop.events() if e["event"] == ev.STALLED)
    assert "no heartbeat" in stall["reason"] or "no progress" in stall["reason"]
    evidence = next(e for e in loop.events() if e["event"] == ev.EVIDENCE_CAPTURED)
    assert evidence["cause"] == "simulator_paused" and "docker pause" in evidence["advice"]
    assert rows["carla-0"]["cause"] == "simulator_paused"
    assert summarize(loop.run_dir)["causes"]["carla-0"] == {"simulator_paused": 1}
    incident = loop.run_dir / rows["carla-0"]["last_incident"]
    facts = json.loads((incident / "incident.json").read_text())
    assert facts["container"]["Paused"] is True and facts["container"]["Status"] == "paused"
    assert "listening on 127.0.0.1" in (incident / "log_tail.txt").read_text()
    with pytest.raises(Exception):
        docker_engine.containers.get(container.id)  # the paused one was killed and removed
    assert server_version("127.0.0.1", spec.launch["rpc_port"], 2.0) == "0.9.16", "the new one answers"


def named_exits(run_dir, count: int, timeout: float = 20.0) -> dict[str, dict]:
    """The incidents of containers that exited on their own, by child, once ``count`` of them are written and named
    (each is written, then named, by a thread of its own as its container is removed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for d in (run_dir / "incidents").glob("*-exited"):
            try:
                info = json.loads((d / "incident.json").read_text())
            except (OSError, ValueError):
                continue  # its directory comes first
            if "cause" in info:
                found[info["name"]] = info
        if len(found) >= count or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def test_a_killed_a_stopped_and_a_removed_container_are_replaced_each_with_its_cause(sims, docker_engine):
    loop = sims(slots=3).start()
    loop.until(lambda r: all(running(r, f"carla-{i}") for i in range(3)), 60, "all three answering")
    docker_engine.containers.get(loop.plan.specs[0].launch["container_name"]).kill()
    docker_engine.containers.get(loop.plan.specs[1].launch["container_name"]).stop(timeout=0)
    docker_engine.containers.get(loop.plan.specs[2].launch["container_name"]).remove(force=True)
    rows = loop.until(lambda r: all(running(r, f"carla-{i}", 1) for i in range(3)), 60, "all three replaced")
    exits = {e["name"]: e for e in loop.events() if e["event"] == ev.EXITED}
    assert exits["carla-0"]["code"] == 137 and exits["carla-1"]["code"] in (0, 137, 143)
    assert not [e for e in loop.events() if e["event"] == ev.STALLED], "an exit is seen as an exit, not a stall"
    assert rows["carla-0"]["restarts"] == 1
    # each named from the container's state, in the exit's event and in status
    assert exits["carla-0"]["cause"] == "simulator_killed"
    assert exits["carla-1"]["cause"] in ("simulator_killed", "simulator_exited")
    assert exits["carla-2"]["cause"] == "simulator_removed" and exits["carla-2"]["code"] in (None, 137)
    assert [rows[f"carla-{i}"]["cause"] for i in (0, 2)] == ["simulator_killed", "simulator_removed"]
    exited = named_exits(loop.run_dir, 3)
    assert exited["carla-0"]["container"]["ExitCode"] == 137 and exited["carla-0"]["container"]["OOMKilled"] is False
    assert "exited on its own" in exited["carla-1"]["reason"]
    assert {n: exited[n]["cause"]["cause"] for n in ("carla-0", "carla-2")} == {
        "carla-0": "simulator_killed", "carla-2": "simulator_removed"}
    causes = summarize(loop.run_dir)["causes"]  # the report's table of causes per process
    assert causes["carla-0"] == {"simulator_killed": 1} and causes["carla-2"] == {"simulator_removed": 1}
    assert causes["carla-1"] in ({"simulator_exited": 1}, {"simulator_killed": 1})


def test_a_server_over_its_memory_limit_is_oom_killed_and_named_so(sims, docker_engine):
    """simulators.memory_limit: a leaking server (the fake's grow_memory_after_s fault) is OOM-killed by the kernel
    on its own, and its exit is named by the container's state."""
    loop = sims(memory_limit="96m", command=FAKE_COMMAND + " --fault grow_memory_after_s=1").start()
    container = docker_engine.containers.get(loop.plan.specs[0].launch["container_name"])
    assert container.attrs["HostConfig"]["Memory"] == 96 * 2**20
    rows = loop.until(lambda r: any(e["event"] == ev.EXITED and e["name"] == "carla-0" for e in loop.events()), 60,
                      "the leaking server's end")
    exited = next(e for e in loop.events() if e["event"] == ev.EXITED and e["name"] == "carla-0")
    assert exited["code"] == 137 and exited["cause"] == "simulator_oom_killed", exited
    assert rows["carla-0"]["cause"] == "simulator_oom_killed"
    named_exits(loop.run_dir, 1)
    assert summarize(loop.run_dir)["causes"]["carla-0"] == {"simulator_oom_killed": 1}


def test_a_container_whose_server_dies_on_start_backs_off_and_fails(sims):
    loop = sims(command="python3 -c raise(SystemExit(3))").start()  # 5 restarts within 60 s, then failed
    rows = loop.until(lambda r: r["carla-0"]["state"] == FAILED, 90, "carla-0 failed")
    assert {e["code"] for e in loop.events() if e["event"] == ev.EXITED} == {3}
    assert rows["carla-0"]["restarts"] == 5


def test_leftovers_of_a_dead_supervisor_are_removed_on_start(sims, docker_engine, fakecarla_image):
    loop = sims()
    stray = docker_engine.containers.run(fakecarla_image, ["python3", "-c", "import time; time.sleep(60)"], name=f"stray-{loop.sup.run_id}",
                                         detach=True, labels={RUN_LABEL: loop.sup.run_id}, network_mode="none")
    other = docker_engine.containers.run(fakecarla_image, ["python3", "-c", "import time; time.sleep(60)"], name=f"other-{loop.sup.run_id}",
                                         detach=True, labels={RUN_LABEL: "another-run"}, network_mode="none")
    try:
        loop.start()
        assert [e for e in loop.events() if e["event"] == ev.LEFTOVERS_KILLED]
        with pytest.raises(Exception):
            docker_engine.containers.get(stray.id)
        assert docker_engine.containers.get(other.id).status == "running", "another run's are left alone"  # Docker's word
    finally:
        other.remove(force=True)


def test_a_port_in_use_is_one_line_naming_it_and_its_holder(sims):
    loop = sims()
    spec = loop.plan.specs[0]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", spec.launch["rpc_port"]))
        holder.listen(1)
        driver = loop.sup.drivers["container"]
        with pytest.raises(SpawnError) as err:
            driver.spawn(spec, 0, False)
    line = str(err.value)
    assert "\n" not in line and f"port {spec.launch['rpc_port']} (carla-0 rpc) is in use by pid {os.getpid()}" in line


def test_a_missing_image_is_one_line_and_never_a_silent_pull(sims, docker_engine):
    loop = sims(image="rlstack/not-built:missing")
    with pytest.raises(SpawnError) as err:
        loop.sup.drivers["container"].spawn(loop.plan.specs[0], 0, False)
    assert "image rlstack/not-built:missing is not on this Docker engine" in str(err.value)
    assert "simulators.pull" in str(err.value) and "\n" not in str(err.value)
    assert not docker_engine.containers.list(all=True, filters={"label": [f"{RUN_LABEL}={loop.sup.run_id}"]})


def test_a_refused_gpu_request_is_one_line_and_leaves_no_container(sims, docker_engine):
    if "nvidia" in (docker_engine.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime: a GPU request is not refused here")
    loop = sims(gpus=["0"])
    spec = loop.plan.specs[0]
    with pytest.raises(SpawnError) as err:
        loop.sup.drivers["container"].spawn(spec, 0, False)
    assert "GPU request for carla-0 (device 0) refused" in str(err.value) and "\n" not in str(err.value)
    assert not docker_engine.containers.list(all=True, filters={"name": spec.launch["container_name"]})


def test_no_engine_is_one_line_saying_how_to_start_one(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    with pytest.raises(EngineError) as err:
        connect_engine(5)
    assert "no Docker engine answers" in str(err.value) and "dockerd" in str(err.value)
    assert "\n" not in str(err.value)


def test_supervisor_up_refuses_a_missing_image_or_engine_before_writing_anything(tmp_path, docker_engine):
    def up(*extra, env=None):
        return subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", "configs/stage1.yaml",
                               "--runs-dir", str(tmp_path / "runs"), "--no-live", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})

    res = up("--set", "simulators.image=rlstack/not-built:missing")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "rlstack/not-built:missing is not on this Docker engine" in res.stderr
    res = up(env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert res.returncode == 2 and "no Docker engine answers" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(10)
def test_gpu_memory_is_read_per_process_from_nvidia_smi_output():
    from supervisor.drivers.container import parse_gpu_apps

    out = "1234, 2048\n1234, 512\n99, 100\n[Not Supported], 0\n"
    assert parse_gpu_apps(out) == {1234: 2560 * 2**20, 99: 100 * 2**20}


@pytest.mark.timeout(10)
def test_status_table_shows_gpu_memory_only_where_known():
    from supervisor.display import plain_table

    def proc(name, counters, gpu=None, **kw):
        return {"name": name, "state": RUNNING, "pid": 1, "uptime_s": 5.0, "heartbeat_age_s": 0.1,
                "progress_counters": counters, "progress": 7, "env_steps": 40, "updates": 9, "steps_per_s": 1.0,
                "restarts": 0, "phase": "serving", "reason": None, "gpu_memory_bytes": gpu, **kw}

    status = {"run_id": "r", "processes": [proc("learner", ["updates"]), proc("carla-0", ["probes"], 3 * 2**30),
                                           proc("worker-0", ["env_steps", "eval_steps"])]}
    table = plain_table(status)
    assert "GPU MEM" in table and "3.00 GiB" in table and "7 probes" in table and "9 upd" in table
    status["processes"][1]["gpu_memory_bytes"] = None
    assert "GPU MEM" not in plain_table(status)
