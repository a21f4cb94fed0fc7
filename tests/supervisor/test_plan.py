"""The supervision tree as data: the plan is built from the config alone, and the machine knows no roles."""

import ast
import re
from pathlib import Path

import pytest

from protocol.config import SupervisorConfig, load_config
from supervisor.machine import Supervision
from supervisor.plan import build_plan
from supervisor.specs import PERMANENT, TRANSIENT

pytestmark = pytest.mark.timeout(60)


ROOT = Path(__file__).resolve().parents[2]


# Read by the children themselves (how often they beat), not by the machine.
READ_BY_CHILDREN = {"heartbeat_interval_s"}


# read by `up` and the supervisor process, not the machine (tests: test_reliability.py)
READ_BY_SUPERVISOR = {"max_workers_per_core", "disk_warn_gb", "child_nice", "metrics_port", "metrics_host"}


def plan_of(**supervisor):
    return build_plan(load_config(None, [(f"supervisor.{k}", v) for k, v in supervisor.items()]))


def distinct_value(name, default):
    """A valid value unlike the default (and unlike any other default), so its use can be traced."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if name == "backoff_jitter":
        return 0.37
    if name == "heartbeat_deadline_s":
        return 4.25  # still above the heartbeat interval
    return default + 0.37


@pytest.mark.parametrize("name", sorted(set(SupervisorConfig.model_fields) - READ_BY_CHILDREN - READ_BY_SUPERVISOR))
def test_every_supervisor_setting_reaches_the_machine(name):
    default = SupervisorConfig.model_fields[name].default
    changed = plan_of(**{name: distinct_value(name, default)})
    baseline = plan_of()
    assert changed.specs != baseline.specs, f"supervisor.{name} changes nothing the machine decides by"
    machine = Supervision(list(changed.specs), clock=lambda: 0.0)
    assert [c.spec for c in machine.children.values()] == list(changed.specs)


def test_the_settings_read_by_children_are_real_settings():
    assert READ_BY_CHILDREN | READ_BY_SUPERVISOR <= set(SupervisorConfig.model_fields)


def test_plan_policies():
    plan = build_plan(load_config(None, [("workers.count", 3)]))
    assert plan.names == ["learner", "worker-0", "worker-1", "worker-2"]
    learner, *workers = plan.specs
    assert learner.significant and learner.restart == TRANSIENT and learner.progress_counters == ("updates",)
    assert learner.stop_grace_s == 15.0 and learner.deadlines.progress_s == 60.0
    for w in workers:
        assert not w.significant and w.restart == TRANSIENT and w.depends_on == () and w.standby
        assert w.deadlines.progress_s == 10.0 and w.stop_grace_s == w.kill_grace_s
        assert "evaluating" in w.progress_phases and "waiting_learner" not in w.progress_phases
    assert PERMANENT not in {s.restart for s in plan.specs}
    # a worker needs no torch (its policy is numpy's), and its BLAS threads are workers.torch_threads
    assert "torch" in learner.launch["needs"] and all("torch" not in w.launch["needs"] for w in workers)
    threads = build_plan(load_config(None, [("workers.torch_threads", 3)])).specs[1].launch["env"]
    assert threads == {"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}
    assert plan.run_env_steps([{"name": "worker-0", "env_steps": 5}, {"name": "learner", "env_steps": 42}]) == 42


def test_the_state_machine_names_no_role_and_speaks_no_posix():
    for name in ("machine.py", "specs.py"):
        text = (ROOT / "supervisor" / name).read_text()
        assert not re.search(r"learner|worker|\brole\b", text, re.IGNORECASE), f"{name} reads specs, not roles"
        assert not re.search(r"\bSIG[A-Z]+|import signal|signum|\bpid\s*[:=]=", text), f"{name}: no POSIX signal"


def test_only_the_plan_names_the_children():
    """Other supervisor modules read specs and labels; no child name or role literal outside the plan."""
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        if path.name == "plan.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.fullmatch(r"learner|worker(-\d+)?", node.value), f"{path.name}: {node.value!r}"
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Attribute):
                        assert side.attr != "role", f"{path.name}:{node.lineno} compares a role"


def test_a_workers_only_host_runs_its_slots_and_no_learner():
    from protocol.config import ConfigError

    remote = [("run.role", "workers"), ("workers.learner", "tcp://127.0.0.1:7000"), ("workers.host", "host-b")]
    plan = build_plan(load_config(None, remote))
    assert plan.names == ["worker-0", "worker-1"] and not plan.runs_learner
    rows = [{"name": "worker-0", "role": "worker", "env_steps": 30}, {"name": "worker-1", "role": "worker",
                                                                      "env_steps": 12}]
    assert plan.run_env_steps(rows) == 42, "this host's steps, its learner being elsewhere"
    assert build_plan(load_config(None, [])).runs_learner
    with pytest.raises(ConfigError, match="run.role workers .* needs workers.learner"):
        load_config(None, [("run.role", "workers")])
    with pytest.raises(ConfigError, match="workers.host"):
        load_config(None, remote[:2] + [("workers.host", "has space")])
    assert load_config(None, remote).worker_host() == "host-b"
    assert load_config(None, []).worker_host() is None
