"""The Prometheus endpoint: the series a status payload becomes, their labels and values; the config keys; the port
check of ``up``; prometheus_client imported only by the endpoint."""

from __future__ import annotations

import ast
import socket
import urllib.request
from pathlib import Path

import pytest

from protocol.config import ConfigError, load_config
from protocol.roles import LEARNER, SIMULATOR, WORKER
from protocol.states import BACKOFF, RUNNING, STALLED, STATES
from supervisor import preflight
from supervisor.control import status_payload, status_rows
from supervisor.metrics import Endpoint, StatusCollector, port_problem
from tests.conftest import ROOT

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(60)

HOST = "node-7"


def machine_row(name, role, state, *, restarts=0, age=0.4, hb=None, dropped=0, slot=None):
    labels = {"role": role} if slot is None else {"role": role, "slot": str(slot)}
    return {"name": name, "kind": "process", "labels": labels, "state": state, "pid": 100, "incarnation": restarts,
            "restarts": restarts, "uptime_s": 5.0, "heartbeat_age_s": age, "alive": age is not None,
            "heartbeat": hb or {}, "progress": 0, "progress_counters": [], "last_exit": None, "dropped": dropped,
            "resumed": None, "last_incident": None, "reason": None, "depends_on": []}


def payload() -> dict:
    rows = status_rows([
        machine_row(LEARNER, LEARNER, RUNNING, hb={"env_steps": 5000, "updates": 1200, "steps_per_s": 0.0,
                                                   "alerts": ["q_divergence", "critic_loss"], "refused": 7}),
        machine_row("worker-0", WORKER, RUNNING, slot=0, hb={"env_steps": 2600, "updates": 1180,
                                                              "steps_per_s": 310.5}, dropped=3),
        machine_row("worker-1", WORKER, BACKOFF, slot=1, restarts=2, age=None),
        machine_row("carla-1", SIMULATOR, STALLED, slot=1, age=12.5),
    ])
    return status_payload(rows, run_dir=Path("/runs/r1"), uptime_s=60.0, env_steps=5000, max_timesteps=10**6,
                          incidents=4, supervisor_dropped=2, disk={}, stopping=False)


def scrape(data: dict | None) -> dict[str, list]:
    registry = prometheus_client.CollectorRegistry()
    registry.register(StatusCollector(lambda: data, HOST))
    text = prometheus_client.generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)} | {"_text": text}


def value(samples, name=None, **labels) -> float:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())
             and (name is None or s.name == name)]
    assert len(found) == 1, (labels, samples)
    return found[0]


def test_every_state_of_every_child_is_a_series_and_the_current_one_is_1():
    got = scrape(payload())["rlstack_child_state"]
    assert len(got) == 4 * len(STATES)
    for child, role, current in ((LEARNER, LEARNER, RUNNING), ("worker-0", WORKER, RUNNING),
                                 ("worker-1", WORKER, BACKOFF), ("carla-1", SIMULATOR, STALLED)):
        for state in STATES:
            assert value(got, child=child, role=role, host=HOST, state=state) == (1.0 if state == current else 0.0)


def test_per_child_series_carry_the_payloads_values():
    got = scrape(payload())
    restarts = got["rlstack_child_restarts"]
    assert value(restarts, "rlstack_child_restarts_total", child="worker-1", role=WORKER, host=HOST) == 2
    assert value(restarts, "rlstack_child_restarts_total", child=LEARNER) == 0
    ages = got["rlstack_child_heartbeat_age_seconds"]
    assert value(ages, child="carla-1") == 12.5 and value(ages, child=LEARNER) == 0.4
    assert not [s for s in ages if s.labels["child"] == "worker-1"], "no heartbeat: no age"
    assert value(got["rlstack_child_steps_per_second"], child="worker-0") == 310.5
    assert value(got["rlstack_child_updates"], child=LEARNER) == 1200
    assert value(got["rlstack_child_updates"], child="worker-0") == 1180
    assert value(got["rlstack_child_env_steps"], child="worker-0") == 2600
    assert value(got["rlstack_child_dropped_messages"], "rlstack_child_dropped_messages_total", child="worker-0") == 3
    assert value(got["rlstack_child_alerts"], child=LEARNER) == 2
    assert value(got["rlstack_child_alerts"], child="worker-0") == 0
    assert value(got["rlstack_child_refused_connections"], child=LEARNER) == 7
    assert value(got["rlstack_child_refused_connections"], child="worker-0") == 0


def test_run_and_host_series():
    got = scrape(payload())
    assert value(got["rlstack_run_env_steps"], host=HOST) == 5000
    assert value(got["rlstack_run_max_timesteps"], host=HOST) == 10**6
    assert value(got["rlstack_incidents"], "rlstack_incidents_total", host=HOST) == 4
    assert value(got["rlstack_supervisor_dropped_messages"], "rlstack_supervisor_dropped_messages_total") == 2
    per_host = got["rlstack_host_children"]
    assert {s.labels["state"]: s.value for s in per_host if s.labels["host"] == HOST} == \
        {s: {RUNNING: 2.0, BACKOFF: 1.0, STALLED: 1.0}.get(s, 0.0) for s in STATES}


def test_nothing_before_the_first_payload():
    assert not [k for k in scrape(None) if k.startswith("rlstack_")]


def test_the_endpoint_serves_the_latest_published_payload_on_its_own_thread():
    endpoint = Endpoint("127.0.0.1", 0)
    try:
        port = endpoint.server.server_address[1]
        first = payload()
        endpoint.publish(first, 0.0)
        assert not endpoint.due(0.1) and endpoint.due(10.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as res:
            text = res.read().decode()
        assert 'rlstack_run_env_steps{host="' in text and "rlstack_incidents_total" in text
    finally:
        endpoint.close()
    endpoint.thread.join(5)
    assert not endpoint.thread.is_alive()


def test_the_keys_are_off_by_default_and_validated():
    s = load_config(None).supervisor
    assert s.metrics_port is None and s.metrics_host == "127.0.0.1"
    assert load_config(None, [("supervisor.metrics_port", 9100)]).supervisor.metrics_port == 9100
    for bad in (0, 65536, -1, "http"):
        with pytest.raises(ConfigError, match="supervisor.metrics_port"):
            load_config(None, [("supervisor.metrics_port", bad)])
    with pytest.raises(ConfigError, match="supervisor.metrics_prot"):
        load_config(None, [("supervisor.metrics_prot", 9100)])


def test_a_port_in_use_is_refused_in_one_line_with_what_to_do():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_problem("127.0.0.1", port) == f"the metrics port {port} on 127.0.0.1 is in use"
        cfg = load_config(None, [("supervisor.metrics_port", port)])
        line = preflight.metrics_problem(cfg)
        assert str(port) in line and "supervisor.metrics_port" in line and "\n" not in line
    assert port_problem("127.0.0.1", port) is None
    assert preflight.metrics_problem(load_config(None)) is None


def test_only_the_endpoint_imports_prometheus_client_and_only_inside_a_function():
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "prometheus_client" for n in names):
                assert path.name == "metrics.py" and node not in top, f"{path.name}:{node.lineno}"
