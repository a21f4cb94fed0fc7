"""CARLA backend: freeze recovery through the whole stack, and the env's per-step cost.

Needs a Docker engine (``bash deploy/docker-engine.sh start``); builds the fake CARLA
server's image when it is missing.

- Simulator freeze: ``docker pause`` of slot 0's simulator mid-run, to its new worker
  stepping again; target: tick timeout + container start + 2 s, where the container
  start (``docker run`` to the first answered ``version``) is measured in the same run.
- Worker freeze: SIGSTOP of worker-0, to its replacement stepping; target: its deadline
  (the shorter of heartbeat and progress deadlines) + 2 s.

Workers are not held back by the update-to-data ratio here, so they tick all the time,
as a simulator-bound run does.
- Steps/s of one CARLA env against the fake server, against the bare client calls a
  step needs (apply_control, tick, the camera image of the tick, location, velocity):
  the overhead the env adds per step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from protocol.states import RUNNING

ROOT = Path(__file__).resolve().parent.parent


def image_tag() -> str:
    import docker

    from harness.carla import ensure_fakecarla_image

    return ensure_fakecarla_image(docker.from_env())


def container_start_s(tag: str) -> float:
    """docker run to the first answered version request, host networking."""
    import docker

    from harness.carla import free_port_block
    from supervisor.drivers.container import server_version

    port = free_port_block(3)
    engine = docker.from_env()
    t0 = time.monotonic()
    c = engine.containers.run(tag, ["python3", "-m", "fakecarla", f"-carla-rpc-port={port}"], detach=True,
                              network_mode="host", labels={"rlstack.run": "bench"})
    try:
        while True:
            try:
                server_version("127.0.0.1", port, 0.5)
                return time.monotonic() - t0
            except (OSError, ValueError):
                time.sleep(0.02)
    finally:
        c.remove(force=True)


def stepping_overrides(tag: str) -> dict:
    """The test stack's settings, with workers never held back by the update-to-data ratio: they keep ticking."""
    from harness.carla import carla_overrides

    overrides = carla_overrides(tag)
    overrides["learner"] = {"updates_per_step": 0.05, "rate_limit_slack": 10**6}
    return overrides


def freeze(tag: str, what: str) -> tuple[float, dict]:
    import docker

    from harness.stack import Stack

    engine = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="bench-carla-") as d:
        stack = Stack(Path(d), stepping_overrides(tag), base="configs/carla.yaml").start()
        try:
            row = lambda s, n: next(p for p in s["processes"] if p["name"] == n)  # noqa: E731
            s = stack.wait_for(lambda s: all(p["state"] == RUNNING for p in s["processes"])
                               and row(s, "worker-0")["env_steps"] > 100, 150, "stepping")
            t0 = time.monotonic()
            if what == "simulator":
                engine.containers.get("rlstack-test-carla-0").pause()
            else:
                os.kill(row(s, "worker-0")["pid"], signal.SIGSTOP)
            stack.wait_for(lambda s: row(s, "worker-0")["incarnation"] >= 1 and row(s, "worker-0")["env_steps"] > 0,
                           120, "worker-0 replaced and stepping")
            took = time.monotonic() - t0
            return took, {"other_slot_restarts": row(stack.status(), "worker-1")["restarts"]}
        finally:
            stack.stop()
            for c in engine.containers.list(all=True, filters={"label": ["rlstack.run=test"]}):
                c.remove(force=True)


def step_cost(steps: int = 1000) -> dict:
    """The env's steps/s and the bare client's, on one fake server process."""
    import carla

    from harness.carla import free_port_block
    from protocol.config import load_config
    from worker.envs import make_env

    port = free_port_block(3)
    server = subprocess.Popen([sys.executable, "-m", "harness.fakecarla", f"-carla-rpc-port={port}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdout.readline()
        cfg = load_config(None, [("env.backend", "carla"), ("workers.count", 1), ("simulators.mode", "external"),
                                 ("simulators.external", [f"127.0.0.1:{port}"]),
                                 ("simulators.tm_base_port", free_port_block(1)), ("env.carla.route_length_m", 2000.0),
                                 ("env.carla.max_off_route_m", 1e6), ("env.carla.stuck_steps", 10**9)])
        env = make_env(cfg, 0, 0, 1)
        env.reset(seed=1)
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(np.array([0.0, 0.3], np.float32))
        env_rate = steps / (time.perf_counter() - t0)
        world, ego, camera_q = env.world, env.ego, env.queues["camera"]
        t0 = time.perf_counter()
        for _ in range(steps):  # what a step needs of the client, nothing else
            ego.apply_control(carla.VehicleControl(throttle=0.3))
            frame = world.tick(5.0)
            while camera_q.get(timeout=2.0).frame != frame:
                pass
            ego.get_location()
            ego.get_velocity()
        bare_rate = steps / (time.perf_counter() - t0)
        env.close()
    finally:
        server.terminate()
        server.wait(10)
    return {"env_steps_per_s": env_rate, "bare_steps_per_s": bare_rate,
            "overhead_ms": 1000.0 * (1.0 / env_rate - 1.0 / bare_rate)}


def run() -> dict:
    tag = image_tag()
    start_s = container_start_s(tag)
    settings = stepping_overrides(tag)
    tick_timeout = settings["env"]["carla"]["tick_timeout_s"]
    sim_s, sim_info = freeze(tag, "simulator")
    worker_s, worker_info = freeze(tag, "worker")
    # a stopped worker sends no heartbeat and makes no progress: the shorter of the two deadlines catches it
    deadline = min(settings["supervisor"]["heartbeat_deadline_s"], settings["supervisor"]["progress_deadline_s"])
    cost = step_cost()
    sim_target = tick_timeout + start_s + 2.0
    print(f"simulator freeze (docker pause) to its new worker stepping: {sim_s:.2f}s; target tick timeout "
          f"{tick_timeout:g}s + container start {start_s:.2f}s + 2s = {sim_target:.2f}s -> "
          f"{'met' if sim_s <= sim_target else 'MISSED'}; other slot's restarts: {sim_info['other_slot_restarts']}")
    print(f"worker freeze (SIGSTOP) to its replacement stepping: {worker_s:.2f}s; target its deadline "
          f"{deadline:g}s + 2s -> {'met' if worker_s <= deadline + 2.0 else 'MISSED'}")
    print(f"one CARLA env against the fake server: {cost['env_steps_per_s']:.0f} steps/s; bare client calls "
          f"(baseline) {cost['bare_steps_per_s']:.0f} steps/s; the env adds {cost['overhead_ms']:.2f} ms per step "
          f"(ratio {cost['bare_steps_per_s'] / cost['env_steps_per_s']:.2f}x)")
    return {"container_start_s": start_s, "simulator_freeze_s": sim_s, "simulator_target_s": sim_target,
            "worker_freeze_s": worker_s, "worker_target_s": deadline + 2.0, **cost}
