"""``up`` refuses a metrics port in use before writing anything (the series of a live stack:
test_healthy_run.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from supervisor import preflight
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)


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
