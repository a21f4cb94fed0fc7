"""The worker image of deploy/docker/Dockerfile, built offline on a locally made base (deploy/worker-image.sh;
`make deploy-check` builds it, then runs these): non-root, its health check a real status request, no torch in it,
and a host of it steps against a learner on this machine (host networking, loopback only).

Marked ``images``: building takes a couple of minutes, so `make test` leaves these to `make deploy-check`, which
CI runs after the suite.
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


def docker(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image(docker_engine):
    if docker("image", "inspect", TAG).returncode != 0:
        pytest.fail(f"no image {TAG}: build it with `bash deploy/worker-image.sh` (`make deploy-check` does)")
    return TAG


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
