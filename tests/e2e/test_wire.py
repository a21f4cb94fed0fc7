"""The wire across hosts: `up` refuses a learner off loopback without keys before writing anything (test_hosts.py
runs it: workers in over CurveZMQ, a stranger refused, no key written; its keys from harness/keys.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def test_up_refuses_a_learner_off_loopback_without_keys_before_writing_anything(tmp_path):
    res = subprocess.run([sys.executable, "-m", "supervisor", "up", "--config", str(ROOT / "configs/pendulum.yaml"),
                          "--runs-dir", str(tmp_path / "runs"), "--no-live",
                          "--set", "learner.listen=tcp://0.0.0.0:7000"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "learner.listen tcp://0.0.0.0:7000 is off loopback" in lines[0], lines
    assert "learner.curve_key" in lines[0] and "supervisor keys" in lines[0]
    assert not (tmp_path / "runs").exists()
