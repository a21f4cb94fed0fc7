"""Config validation: one clear line naming the key path, never a traceback."""

import subprocess
import sys

import pytest

from protocol.config import ConfigError, load_config, parse_value

pytestmark = pytest.mark.timeout(30)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate():
    for name in ("configs/default.yaml", "configs/pendulum.yaml"):
        cfg = load_config(name)
        assert cfg.workers.count == 2
    cfg = load_config("configs/default.yaml")
    assert cfg.env.id == "racetrack-v1" and cfg.env.frame_stack == 4 and cfg.learner.device == "auto"


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "learner:\n  batch_sise: 3\n"))
    assert "learner.batch_sise: unknown key" in str(err.value)


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "workers:\n  count: many\n"))
    assert "workers.count" in str(err.value) and "many" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "a: 1\n  b: [\n"))


def test_overrides_apply_with_types():
    cfg = load_config("configs/pendulum.yaml", [("learner.actor_lr", parse_value("1e-4")),
                                                 ("workers.count", parse_value("3")),
                                                 ("run.debug", parse_value("true"))])
    assert cfg.learner.actor_lr == 1e-4 and cfg.workers.count == 3 and cfg.run.debug is True
    with pytest.raises(ConfigError, match="learner.nope: unknown key"):
        load_config(None, [("learner.nope", 1)])


def test_layered_deadlines_are_checked():
    with pytest.raises(ConfigError, match="heartbeat_deadline_s must exceed"):
        load_config(None, [("supervisor.heartbeat_deadline_s", 0.1)])


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


@pytest.mark.e2e
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = write(tmp_path, "learner:\n  batch_sise: 3\n")
    res = run_cli("up", "--config", str(bad), "--runs-dir", str(tmp_path / "runs"), cwd=".")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.batch_sise: unknown key" in lines[0]
    res = run_cli("up", "--set", "workers.count=lots", "--runs-dir", str(tmp_path / "runs"), cwd=".")
    assert res.returncode == 2 and "workers.count" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists(), "a bad config creates no run"
