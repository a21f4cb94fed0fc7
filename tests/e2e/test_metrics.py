"""The Prometheus endpoint of a real stack: the supervisor serves its children's series; ``up`` refuses a metrics port
in use before writing anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from protocol.roles import LEARNER, WORKER
from protocol.states import RUNNING, STATES
from supervisor import preflight
from tests.conftest import ROOT

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
        assert res.status == 200
        text = res.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, **labels) -> float:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, samples)
    return found[0]


def value_or_none(samples, **labels) -> float | None:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return found[0] if len(found) == 1 else None


def test_a_running_stack_serves_its_childrens_series(stack_factory):
    port = free_port()
    stack = stack_factory({"supervisor": {"metrics_port": port}})
    stack.wait_running()
    deadline = time.monotonic() + 60
    while True:  # the loop publishes every half second: wait until the workers' steps show
        got = scrape(port)
        steps = got.get("rlstack_child_steps_per_second", [])
        states = got.get("rlstack_child_state", [])
        running = all(value_or_none(states, child=c, state=RUNNING) == 1.0 for c in (LEARNER, "worker-0", "worker-1"))
        stepping = all((value_or_none(steps, child=f"worker-{i}") or 0) > 0 for i in range(2))
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
    assert stack.stop() == 0
    with pytest.raises(OSError):  # the endpoint ends with the supervisor
        scrape(port)


def test_up_refuses_a_metrics_port_in_use_before_writing_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(ROOT / "configs/pendulum.yaml"),
                              "--runs-dir", str(tmp_path / "runs"), "--no-live",
                              "--set", f"supervisor.metrics_port={port}"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == preflight.EXIT_USAGE == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"metrics port {port}" in lines[0] and "supervisor.metrics_port" in lines[0], lines
    assert not (tmp_path / "runs").exists()
