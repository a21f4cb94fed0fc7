"""A bad config stops `supervisor up` at once with one line and exit 2."""

import subprocess
import sys

import pytest

from tests.protocol.test_config import write

pytestmark = pytest.mark.timeout(30)




def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = write(tmp_path, "learner:\n  batch_sise: 3\n")
    res = run_cli("up", "--config", str(bad), "--runs-dir", str(tmp_path / "runs"), cwd=".")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.batch_sise: unknown key" in lines[0]
    res = run_cli("up", "--set", "workers.count=lots", "--runs-dir", str(tmp_path / "runs"), cwd=".")
    assert res.returncode == 2 and "workers.count" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists(), "a bad config creates no run"
