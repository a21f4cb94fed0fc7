"""up's checks before anything is written: a resume takes the run's own config and refuses what would change its model, the host must hold the workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.config import ConfigError, load_config, resume_conflicts
from supervisor import cli, preflight
from supervisor.plan import build_plan
from supervisor.preflight import host_capacity_problem
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)


def test_resume_conflicts_name_each_changed_setting():
    saved = load_config(Path(ROOT / "configs/pendulum.yaml"))
    same = load_config(Path(ROOT / "configs/pendulum.yaml"), [("learner.actor_lr", 0.5), ("workers.count", 3)])
    assert resume_conflicts(saved, same) == []
    changed = load_config(Path(ROOT / "configs/pendulum.yaml"), [("learner.hidden_dim", 32)])
    assert resume_conflicts(saved, changed) == ["learner.hidden_dim=256 (asked: 32)"]
    assert any(c.startswith("env.id=") for c in resume_conflicts(saved, load_config(None)))


def up_args(*argv):
    return cli.build_parser().parse_args(["up", *argv])


def saved_run(tmp_path, *overrides) -> Path:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = load_config(ROOT / "configs/pendulum.yaml", [("run.run_id", "r1"), *overrides])
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    return run


def test_resuming_without_config_takes_the_runs_own(tmp_path):
    saved_run(tmp_path)
    cfg = preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"), "--max-timesteps", "99"))
    assert cfg.env.id == "Pendulum-v1" and cfg.run.max_timesteps == 99 and cfg.learner.hidden_dim == 256


def test_a_resume_that_changes_the_model_is_refused_in_one_line(tmp_path):
    saved_run(tmp_path)
    with pytest.raises(ConfigError) as exc:
        preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"),
                                "--set", "learner.hidden_dim=64"))
    assert "learner.hidden_dim=256 (asked: 64)" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="env.id"):
        preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"),
                                "--config", str(ROOT / "configs/default.yaml")))


def capacity(overrides) -> str | None:
    cfg = load_config(None, overrides)
    return host_capacity_problem(cfg, build_plan(cfg))


def test_more_workers_than_the_cores_hold_are_refused_with_the_reason():
    cores = len(os.sched_getaffinity(0))
    problem = capacity([("workers.count", 64 * cores)])
    assert problem is not None and f"{64 * cores} workers on {cores} cores" in problem
    assert capacity([("workers.count", 1)]) is None
    # a fleet's head runs no workers of its own: workers.count is each host's, checked on that host
    assert capacity([("workers.count", 64 * cores), ("run.engine", "ray"), ("learner.listen", "tcp://127.0.0.1:5555"),
                     ("cluster.hosts", 2)]) is None


def test_more_workers_than_the_memory_holds_are_refused():
    problem = capacity([("workers.count", 10_000), ("supervisor.max_workers_per_core", 1e6)])
    assert problem is not None and "GiB of memory" in problem
