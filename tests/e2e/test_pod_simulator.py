"""A pod's CARLA server (simulators.mode: pod): a process in a sibling container that the supervisor watches and
signals but does not own; here the kubelet that restarts the container is a stand-in (harness/restarter.py) running
the fake CARLA server. A frozen server is caught by its version probe, with its process state as evidence, signalled,
started again by the stand-in, and the slot's worker goes on with the new one. Then each of the fake server's fault
modes, one per server it starts (``--faults-from``), each stall named by its cause in the events, status and the
report; the last, slow ticks under the timeout, is no stall."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.carla import carla_overrides, free_port_block
from protocol import events as ev
from protocol.states import RUNNING
from supervisor.drivers.pod import listener_of

pytestmark = pytest.mark.timeout(240)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def wait_listener(port: int, timeout: float = 30.0, other_than: int | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = listener_of(port)
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


# the fault of each server the kubelet starts after the frozen one, and the cause its stall must be named by
FAULTS = [("stop_ticks_after=30", "simulator_tick"), ("stop_camera_after=30", "sensor_camera"),
          ("stop_world_stream_after=30", "simulator_tick"), ("exit_after=30", "simulator_exited"),
          ("never_answer", "simulator_start"), ("slow_tick=0.02", None)]


def test_a_frozen_pod_simulator_is_signalled_restarted_by_its_kubelet_and_its_worker_goes_on(stack_factory,
                                                                                              tmp_path):
    overrides = carla_overrides("unused")
    port = free_port_block(20)
    overrides["workers"]["count"] = 1
    overrides["simulators"].update(mode="pod", base_port=port, tm_base_port=port + 5, ready_timeout_s=4.0)
    overrides["supervisor"].update(max_restarts=20, backoff_initial_s=0.2)
    faults = tmp_path / "faults"
    faults.write_text("\n" + "".join(f"{fault}\n" for fault, _ in FAULTS))  # the first server: none
    kubelet = subprocess.Popen([sys.executable, "-m", "harness.restarter", "--delay-s", "0.5", "--", sys.executable,
                                "-m", "harness.fakecarla", f"-carla-rpc-port={port}", f"--faults-from={faults}"],
                               cwd=ROOT, stdout=open(tmp_path / "kubelet.out", "w"), stderr=subprocess.STDOUT)
    try:
        first = wait_listener(port)
        stack = stack_factory(overrides, base="configs/carla.yaml")
        s = stack.wait_for(lambda s: row(s, "carla-0")["state"] == RUNNING and row(s, "worker-0")["env_steps"] > 50,
                           120, "the slot stepping on the pod's server")
        assert row(s, "carla-0")["kind"] == "pod_simulator"

        os.kill(first, signal.SIGSTOP)  # a hung server: its container is up, it answers nothing
        s = stack.wait_for(lambda s: row(s, "carla-0")["incarnation"] >= 1 and row(s, "carla-0")["state"] == RUNNING
                           and row(s, "worker-0")["incarnation"] >= 1 and row(s, "worker-0")["state"] == RUNNING
                           and row(s, "worker-0")["env_steps"] > 0, 120, "the server replaced and the slot stepping")
        second = listener_of(port)
        assert second is not None and second != first, "the kubelet's new server, not the frozen one"
        assert kubelet.poll() is None, "the container's restarter is not the supervisor's to end"
        stalled = next(e for e in stack.events() if e["event"] == ev.STALLED and e["name"] == "carla-0")
        # found by its probe, or first by its worker, whose tick timed out (the worker's own timeouts are shorter)
        assert "worker-0 found it stalled (exit 76)" in stalled["reason"] or "heartbeat" in stalled["reason"] \
            or "progress" in stalled["reason"], stalled
        facts = json.loads((stack.run_dir / row(s, "carla-0")["last_incident"] / "incident.json").read_text())
        assert facts["process"]["pid"] == first and facts["process"]["status"] == "stopped", facts
        assert facts["probe"]["port"] == port and facts["probe"]["answers"] > 0
        assert facts["cause"]["cause"] == "process_stopped" and row(s, "carla-0")["cause"] == "process_stopped"

        # the fake server's fault modes, one per server: each stall of the slot named by its cause
        expected = ["process_stopped"] + [cause for _, cause in FAULTS if cause]

        def named(s):  # each stall's cause (with its evidence) and each exit's of its own
            return [e["cause"] for e in stack.events() if e["name"] == "carla-0" and e.get("cause")
                    and e["event"] in (ev.EVIDENCE_CAPTURED, ev.EXITED)]

        s = stack.wait_for(lambda s: len(named(s)) >= len(expected) and not faults.read_text().strip()
                           and row(s, "worker-0")["state"] == RUNNING and row(s, "worker-0")["env_steps"] > 60, 150,
                           "every fault named, and the slot stepping on slow ticks")
        assert named(s) == expected, named(s)
        assert row(s, "carla-0")["cause"] == expected[-1]
        # the worker's own exits: it found its simulator stalled (the others: stopped for its simulator's restart)
        worker_exits = [e["cause"] for e in stack.events() if e["event"] == ev.EXITED and e["name"] == "worker-0"
                        and e.get("cause")]
        assert len(worker_exits) >= 3 and set(worker_exits) == {"found_simulator_stalled"}, worker_exits
        steps = row(s, "worker-0")["env_steps"]
        s = stack.wait_for(lambda s: row(s, "worker-0")["env_steps"] > steps + 60, 60, "slow ticks, no stall")
        assert len(named(s)) == len(expected), "slow ticks under the timeout are no stall"
        rep = subprocess.run([sys.executable, "-m", "supervisor", "report", str(stack.run_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert "carla-0: simulator_tick x2" in rep.stdout and "sensor_camera x1" in rep.stdout, rep.stdout

        assert stack.cli("stop").returncode == 0
        assert stack.proc.wait(timeout=60) == 0
        # the run's stop signals the server as any restart does; the container (its restarter) is not the run's
        assert kubelet.poll() is None and wait_listener(port) is not None
    finally:
        kubelet.terminate()
        kubelet.wait(timeout=10)
