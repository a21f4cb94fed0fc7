"""The wire across hosts: `up` refuses a learner off loopback without keys before writing anything; the helpers of
the tests that run it (test_hosts.py: workers in over CurveZMQ, a stranger refused, no key written)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def free_port_pair() -> int:
    """A port P with P+1 free as well (the learner's steps and weights ports)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two free ports in a row on 127.0.0.1")


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
