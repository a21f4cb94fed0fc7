"""Each stall's cause, named from its evidence: the recorded real cases (tests/supervisor/causes/), and the rules'
other signs without a stack.

The recorded cases: incidents the supervisor captured in real runs (a worker's step hung by the chaos fault, a
SIGSTOPped worker and learner, simulator containers paused, killed, stopped, removed and OOM-killed), and the
CARLA env against the fake server through the real client (harness/record_stacks.py): where its main thread
waits when the server stops ticking, streaming or sending camera images, or never answers (stack.txt), and what
the env raises with its own timeouts (said.txt), which the worker says as its last word and the supervisor puts
in the reason of the simulator's stall.
"""

import json
import shutil
from pathlib import Path

import pytest

from protocol import causes
from protocol.roles import HOST, LEARNER, SIMULATOR, WORKER

pytestmark = pytest.mark.timeout(30)

RECORDED = Path(__file__).parent / "causes"
RUNNING = {"Status": "running", "Paused": False, "ExitCode": 0, "OOMKilled": False, "Error": ""}


@pytest.mark.parametrize("case,cause", [
    ("worker_hang_in_step", "env_step"),
    ("worker_sigstopped", "process_stopped"),  # its stack says waiting_learner: the process state comes first
    ("learner_sigstopped", "process_stopped"),
    ("container_paused", "simulator_paused"),
    ("container_killed", "simulator_killed"),
    ("container_stopped", "simulator_exited"),
    ("container_removed", "simulator_removed"),
    ("container_oom_killed", "simulator_oom_killed"),
])
def test_each_recorded_incident_is_named_by_its_cause_and_the_cause_written_into_it(tmp_path, case, cause):
    incident = shutil.copytree(RECORDED / case, tmp_path / case)
    role = {"worker": WORKER, "learner": LEARNER, "carla": SIMULATOR}[json.loads(
        (incident / "incident.json").read_text())["name"].split("-")[0]]
    named = causes.name_incident(incident, role)
    assert named["cause"] == cause, named
    assert named["advice"] == causes.advice(cause) and named["because"]
    assert json.loads((incident / "incident.json").read_text())["cause"] == named


def simulator_incident(case: str, container: dict) -> dict:
    """A simulator's stall as the supervisor records it when its worker found it stalled and said why."""
    said = (RECORDED / case / "said.txt").read_text().strip()
    return {"name": "carla-0", "reason": f"worker-0 found it stalled (exit 76): simulator stalled: {said}",
            "last_heartbeat": {"phase": "serving", "probes": 120}, "container": container}


@pytest.mark.parametrize("case,cause", [
    ("carla_tick", "simulator_tick"),
    ("carla_world_stream", "simulator_tick"),
    ("carla_camera", "sensor_camera"),
    ("carla_connect", "simulator_connect"),
    ("carla_tm_port_held", "traffic_manager_port_in_use"),
])
def test_a_simulator_its_worker_found_stalled_is_named_by_the_worker_s_last_word(case, cause):
    assert causes.name(simulator_incident(case, RUNNING), role=SIMULATOR)["cause"] == cause


def test_which_side_was_gone_comes_before_what_the_worker_said():
    paused = dict(RUNNING, Status="paused", Paused=True)
    assert causes.name(simulator_incident("carla_tick", paused), role=SIMULATOR)["cause"] == "simulator_paused"
    exited = dict(RUNNING, Status="exited", ExitCode=0)
    assert causes.name(simulator_incident("carla_exit", exited), role=SIMULATOR)["cause"] == "simulator_exited"
    oom = dict(RUNNING, Status="exited", ExitCode=137, OOMKilled=True)
    assert causes.name(simulator_incident("carla_tick", oom), role=SIMULATOR)["cause"] == "simulator_oom_killed"
    removed = {"error": '404 Client Error: Not Found ("No such container: 65e53e")'}
    assert causes.name(simulator_incident("carla_tick", removed), role=SIMULATOR)["cause"] == "simulator_removed"


def worker_incident(case: str, reason: str, phase: str = "stepping") -> tuple[dict, str]:
    return ({"name": "worker-0", "reason": reason, "last_heartbeat": {"role": WORKER, "phase": phase},
             "process": {"status": "sleeping"}}, (RECORDED / case / "stack.txt").read_text())


@pytest.mark.parametrize("case,reason,phase,cause", [
    ("carla_tick", "no progress for 12.0s in phase stepping at count 40 (deadline 10s)", "stepping", "simulator_tick"),
    ("carla_world_stream", "no progress for 12.0s in phase stepping at count 40 (deadline 10s)", "stepping",
     "simulator_tick"),
    ("carla_camera", "no progress for 12.0s in phase stepping at count 25 (deadline 10s)", "stepping",
     "sensor_camera"),
    ("carla_connect", "in phase connecting for 61.0s (startup deadline 60s)", "connecting", "simulator_connect"),
    # the same wait with the heartbeat silent: the call held the GIL
    ("carla_connect", "no heartbeat for 6.0s (deadline 5s)", "connecting", "client_holds_gil"),
])
def test_a_worker_stalled_inside_the_carla_client_is_named_by_where_it_waits(case, reason, phase, cause):
    incident, stack = worker_incident(case, reason, phase)
    named = causes.name(incident, stack, role=WORKER)
    assert named["cause"] == cause, named
    assert named["frames"] and named["frames"][0].startswith("CarlaEnv.") or "Queue.get" in named["frames"][1]


LEARNER_STACK = """Process 4242: python -m learner --run-dir RUN_DIR --incarnation 0 --name learner
Python v3.11.7 (python3.11)

Thread 4242 (idle): "MainThread"
{frames}
    Learner.run (learner/main.py:395)
    main (learner/main.py:460)
Thread 4250 (idle): "heartbeat-learner"
    Condition.wait (threading.py:331)
    HeartbeatSender.run (protocol/heartbeat.py:129)
"""


@pytest.mark.parametrize("frames,detail,cause", [
    ("    fsync (<built-in>)\n    atomic_write (protocol/files.py:52)\n    Checkpoints.save (learner/checkpoints.py:60)"
     "\n    Learner.checkpoint (learner/main.py:300)", None, "learner_checkpoint_write"),
    ("    Socket.send (zmq/sugar/socket.py:701)\n    send (protocol/sockets.py:150)\n"
     "    Learner.publish_weights (learner/main.py:290)", None, "learner_socket"),
    ("    Queue.get (queue.py:180)\n    Sampler.next (learner/sampler.py:95)\n    Learner.train_step (learner/main.py:320)",
     "sampling fails for 40s: RuntimeError: replay has too few transitions to sample from", "learner_sampling"),
])
def test_a_stalled_learner_is_named_by_its_own_trouble(frames, detail, cause):
    incident = {"name": "learner", "reason": "no progress for 130.0s in phase training at count 5000 (deadline 120s)",
                "last_heartbeat": {"role": LEARNER, "phase": "training", "detail": detail},
                "process": {"status": "sleeping"}}
    assert causes.name(incident, LEARNER_STACK.format(frames=frames), role=LEARNER)["cause"] == cause


def test_signs_without_a_stack_gpu_memory_start_and_a_frozen_process():
    gpus = [{"index": 0, "used_mib": 80500, "total_mib": 81559}]
    silent = {"name": "carla-0", "reason": "no heartbeat for 10.0s (deadline 10s)", "container": RUNNING}
    assert causes.name(dict(silent, gpus=gpus), role=SIMULATOR)["cause"] == "gpu_memory_full"
    # its own GPU only, where it has one; and a simulator's sign only (a learner's GPU is full of its cache)
    two = gpus + [{"index": 1, "used_mib": 20000, "total_mib": 81559}]
    assert causes.name(dict(silent, gpus=two, gpu="1"), role=SIMULATOR)["cause"] == "simulator_silent"
    assert causes.name(dict(silent, gpus=two, gpu="0"), role=SIMULATOR)["cause"] == "gpu_memory_full"
    learner = {"name": "learner", "reason": "no heartbeat for 3.0s (deadline 2s)", "gpus": gpus}
    assert causes.name(learner, role=LEARNER)["cause"] == causes.UNKNOWN
    host = {"name": "host-1", "reason": "no progress for 4.1s ...; it reports: the learner has had no steps from x"}
    assert causes.name(host, log_tail="Out of video memory\n", role=HOST)["cause"] == "host_cut_off_from_learner"
    assert causes.name(dict(silent, gpus=[dict(gpus[0], used_mib=30000)]), role=SIMULATOR)["cause"] \
        == "simulator_silent"
    log = "LogRHI: Error: Out of video memory trying to allocate a rendering resource\n"
    assert causes.name(silent, log_tail=log, role=SIMULATOR)["cause"] == "gpu_memory_full"
    start = {"name": "carla-0", "reason": "no heartbeat within the startup deadline (120s)"}
    assert causes.name(start, role=SIMULATOR)["cause"] == "simulator_start"
    # a container that runs while its server never answers is still one that never started
    assert causes.name(dict(start, container=RUNNING), role=SIMULATOR)["cause"] == "simulator_start"
    assert causes.name(dict(start, name="worker-0"), role=WORKER)["cause"] == "never_started"
    frozen = {"name": "worker-0", "reason": "no heartbeat for 5.0s (deadline 5s)", "process": {"status": "running"}}
    assert causes.name(frozen, "py-spy dump timed out after 2.0s\n", role=WORKER)["cause"] == "frozen_native"
    # a host without py-spy says nothing of the frames: no name from their absence
    assert causes.name(frozen, "py-spy is not installed; no stack captured\n", role=WORKER)["cause"] \
        == causes.UNKNOWN


def test_an_unrecognised_stall_is_unknown_with_its_top_frames_never_a_wrong_name():
    incident, _ = worker_incident("carla_tick", "no progress for 12.0s in phase stepping at count 40 (deadline 10s)")
    stack = ('Thread 1 (idle): "MainThread"\n    spin (mymodule/planner.py:88)\n    plan (mymodule/planner.py:40)\n'
             '    EnvWorker._run (worker/main.py:199)\n')
    named = causes.name(incident, stack, role=WORKER)
    assert named["cause"] == causes.UNKNOWN and named["frames"][:2] == ["spin (mymodule/planner.py:88)",
                                                                        "plan (mymodule/planner.py:40)"]
    assert "protocol/causes.py" in named["advice"]
    # the worker's CARLA frames mean nothing for the learner: rules hold for their roles only
    tick = (RECORDED / "carla_tick" / "stack.txt").read_text()
    assert causes.name(dict(incident, name="learner"), tick, role=LEARNER)["cause"] == causes.UNKNOWN


def test_every_rule_names_a_cause_with_advice_and_a_sign():
    for rule in causes.RULES:
        signs = [rule.reason, rule.phase, rule.detail, rule.frames, rule.process, rule.container, rule.log]
        assert any(signs) or rule.gpu_full or rule.no_stack, rule
        assert rule.advice and causes.advice(rule.cause) and rule.cause.replace("_", "").isalnum()


@pytest.mark.parametrize("code,cause", [(-9, "killed_by_SIGKILL"), (137, "killed_by_SIGKILL"), (143, "killed_by_SIGTERM"),
                                        (1, "crashed"), (78, "fatal"), (76, "found_simulator_stalled"), (9, "os_error"),
                                        (None, "gone"), (0, None), (75, None)])
def test_an_exit_is_named_by_its_status(code, cause):
    assert causes.of_exit(code) == cause
    if cause:
        assert causes.advice(cause) != causes.advice(causes.UNKNOWN)


def test_a_fleet_host_is_named_by_its_agent_s_evidence():
    cut_off = {"name": "host-1", "reason": "no progress for 4.1s in phase running at count 812 (deadline 3s); it "
               "reports: the learner has had no steps from far.host-1 for 12s (limit 2s) while it has them from "
               "near.host-0", "node_alive": True, "learner_silence": "the learner has had no steps from far.host-1"}
    assert causes.name(cut_off, role=HOST)["cause"] == "host_cut_off_from_learner"
    unanswering = {"name": "host-0", "reason": "no heartbeat for 3.2s (deadline 3s)", "node_alive": True}
    assert causes.name(unanswering, role=HOST)["cause"] == "host_supervisor_unanswering"
