"""The images of deploy/docker/Dockerfile, built offline on a locally made base (deploy/images.sh; `make
deploy-check` builds them, then runs these): non-root, their health check a real status request, no torch in the
worker's, the learner's torch importable, a host of the worker image stepping against a learner on this machine, and
a head of the learner image training on the steps of a host of the worker image (host networking, loopback only).

Marked ``images``: building takes a couple of minutes, so `make test` leaves these to `make deploy-check`, which
CI runs after the suite. The learner image built here holds the torch wheel this machine's package index gives
(its CPU build); a GPU host's index gives the CUDA build, which CI cannot prove.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from harness.carla import free_port_pair
from protocol.roles import LEARNER

pytestmark = [pytest.mark.images, pytest.mark.timeout(300)]
TAG = "rlstack-worker:test"
LEARNER_TAG = "rlstack-learner:test"


def docker(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def built(tag: str) -> str:
    if docker("image", "inspect", tag).returncode != 0:
        pytest.fail(f"no image {tag}: build it with `bash deploy/images.sh` (`make deploy-check` does)")
    return tag


@pytest.fixture(scope="module")
def image(docker_engine):
    return built(TAG)


@pytest.fixture(scope="module")
def learner_image(docker_engine):
    return built(LEARNER_TAG)


def test_the_worker_image_runs_as_its_user_with_a_status_health_check_and_no_torch(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "rlstack" and config["Entrypoint"] == ["supervisor"]
    assert config["Healthcheck"]["Test"][1:3] == ["supervisor", "status"]
    res = docker("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c",
                 "import importlib.util as u, os, worker.main, policy.acting, fleet.agent, carla, ray, zmq; "
                 "print(u.find_spec('torch') is None, os.getuid())")
    assert res.returncode == 0 and res.stdout.split() == ["True", "10001"], res.stderr
    res = docker("run", "--rm", "--network", "none", image, "status", "--runs-dir", "/var/lib/rlstack/runs")
    assert res.returncode == 4 and "no supervisor answers" in res.stderr, res.stderr


def test_a_host_of_the_image_steps_against_a_learner_here(image, stack_factory, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    head = stack_factory({"workers": {"count": 0}, "learner": {"listen": endpoint}}, start=False)
    cfg = yaml.safe_load(head.config_path.read_text())
    cfg["env"] = {"id": "Pendulum-v1"}  # the image's own gymnasium (the paced stand-in is the tests' harness)
    head.config_path.write_text(yaml.safe_dump(cfg))
    host_cfg = tmp_path / "host.yaml"
    host_cfg.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "runs_dir": "/var/lib/rlstack/runs"},
                                        "workers": {**cfg["workers"], "count": 1}}))
    host_cfg.chmod(0o644)
    head.start()
    name = f"rlstack-image-test-{int(time.time() * 1000) % 10**8}"
    try:
        res = docker("run", "-d", "--name", name, "--network", "host", "-v", f"{host_cfg}:/etc/rlstack/host.yaml:ro",
                     image, "up", "--config", "/etc/rlstack/host.yaml", "--role", "workers", "--learner", endpoint,
                     "--host", "img")
        assert res.returncode == 0, res.stderr
        h = head.wait_for(lambda s: any(x["host"] == "img" and x["steps"] > 100
                                        for x in head.proc_row(s, LEARNER)["hosts"]), 120,
                          "the image's host stepping against the learner")
        assert head.proc_row(h, LEARNER)["updates"] > 0
        health = docker("exec", name, "supervisor", "status", "--runs-dir", "/var/lib/rlstack/runs")
        assert health.returncode == 0 and "worker-0" in health.stdout, health.stderr
        assert docker("stop", "-t", "30", name).returncode == 0
        assert docker("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0", \
            docker("logs", name).stdout[-2000:]
    finally:
        docker("rm", "-f", name)


def test_the_learner_image_runs_as_its_user_with_torch_and_a_status_health_check(learner_image):
    config = json.loads(docker("image", "inspect", learner_image).stdout)[0]["Config"]
    assert config["User"] == "rlstack" and config["Entrypoint"] == ["supervisor"]
    assert config["Healthcheck"]["Test"][1:3] == ["supervisor", "status"]
    assert config["Cmd"] == ["up", "--engine", "ray", "--no-live"]
    res = docker("run", "--rm", "--network", "none", "--entrypoint", "python", learner_image, "-c",
                 "import os, torch, learner.main, fleet.agent, ray, zmq; print(torch.__version__, os.getuid())")
    assert res.returncode == 0 and res.stdout.split()[1] == "10001" and \
        res.stdout.split()[0].startswith("2.13.0"), res.stdout + res.stderr
    res = docker("run", "--rm", "--network", "none", learner_image, "status", "--runs-dir", "/var/lib/rlstack/runs")
    assert res.returncode == 4 and "no supervisor answers" in res.stderr, res.stderr


def test_a_head_of_the_learner_image_trains_on_a_host_of_the_worker_image(image, learner_image, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    cfg = yaml.safe_load(open("configs/pendulum.yaml"))
    cfg["env"] = {"id": "Pendulum-v1"}
    cfg["run"] = {**cfg.get("run", {}), "runs_dir": "/var/lib/rlstack/runs", "run_id": "img", "max_timesteps": 10**9}
    cfg["learner"] = {**cfg.get("learner", {}), "listen": endpoint, "learning_starts": 200, "batch_size": 32,
                      "hidden_dim": 64, "torch_threads": 1}
    cfg["workers"] = {**cfg.get("workers", {}), "count": 0, "start_steps": 200}
    head_cfg, host_cfg = tmp_path / "head.yaml", tmp_path / "host.yaml"
    head_cfg.write_text(yaml.safe_dump(cfg))
    host_cfg.write_text(yaml.safe_dump({**cfg, "workers": {**cfg["workers"], "count": 1}}))
    for path in (head_cfg, host_cfg):
        path.chmod(0o644)
    stamp = int(time.time() * 1000) % 10**8
    head, host = f"rlstack-image-head-{stamp}", f"rlstack-image-host-{stamp}"

    def learner_row():
        res = docker("exec", head, "supervisor", "status", "--json", "--runs-dir", "/var/lib/rlstack/runs")
        if res.returncode != 0:
            return None
        return next((p for p in json.loads(res.stdout)["processes"] if p["name"] == LEARNER), None)

    try:
        res = docker("run", "-d", "--name", head, "--network", "host", "-v", f"{head_cfg}:/etc/rlstack/head.yaml:ro",
                     learner_image, "up", "--config", "/etc/rlstack/head.yaml", "--no-live")
        assert res.returncode == 0, res.stderr
        res = docker("run", "-d", "--name", host, "--network", "host", "-v", f"{host_cfg}:/etc/rlstack/host.yaml:ro",
                     image, "up", "--config", "/etc/rlstack/host.yaml", "--role", "workers", "--learner", endpoint,
                     "--host", "img")
        assert res.returncode == 0, res.stderr
        deadline, row = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            row = learner_row()
            if row and row["updates"] > 0 and any(h["host"] == "img" and h["steps"] > 100 for h in row["hosts"]):
                break
            time.sleep(1.0)
        else:
            raise AssertionError(f"the learner image never trained on the worker image's steps: {row}\n"
                                 + docker("logs", head).stdout[-2000:] + docker("logs", host).stdout[-2000:])
        for name in (host, head):
            assert docker("stop", "-t", "30", name).returncode == 0
            assert docker("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0", \
                docker("logs", name).stdout[-2000:]
    finally:
        docker("rm", "-f", host, head)
