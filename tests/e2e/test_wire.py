"""The wire across hosts on a real stack: the learner also listens on TCP with CurveZMQ, the workers come in over it
with their host's key, a stranger's key is refused and counted in `status`, and no key is written anywhere in the
run; `up` refuses a learner off loopback without keys before writing anything."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import zmq

from protocol.codec import encode
from protocol.curve import connect_curve, load_public, load_secret, write_keypair
from protocol.roles import LEARNER
from protocol.sockets import make_socket
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


def ironhouse(keys: Path, host: str) -> tuple[Path, Path, Path, Path]:
    """The learner's key pair and one host's, the host's public key in the learner's allowed directory, as a user
    sets them up (docs/hosts.md): (learner public, learner secret, host secret, allowed directory)."""
    learner_public, learner_secret = write_keypair(keys, "learner")
    host_public, host_secret = write_keypair(keys, host)
    (keys / "clients").mkdir()
    shutil.copy(host_public, keys / "clients" / f"{host}.key")
    return learner_public, learner_secret, host_secret, keys / "clients"


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


def test_workers_come_in_over_curve_a_stranger_is_refused_and_no_key_is_written(stack_factory, tmp_path):
    learner_public, learner_secret, host_secret, clients = ironhouse(tmp_path / "keys", "host-a")
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    stack = stack_factory({"learner": {"listen": endpoint, "curve_key": str(learner_secret),
                                       "curve_clients": str(clients)},
                           "workers": {"learner": endpoint, "curve_key": str(host_secret),
                                       "learner_key": str(learner_public)}})
    s = stack.wait_for(lambda s: row(s, LEARNER)["updates"] >= 50 and
                       all(row(s, f"worker-{i}")["env_steps"] > 100 for i in range(2)), 120,
                       "steps and updates over TCP")
    for i in range(2):  # each worker's steps and weights sockets are TCP connections to the learner's two ports
        conns = psutil.Process(row(s, f"worker-{i}")["pid"]).net_connections(kind="tcp")
        assert {c.raddr.port for c in conns if c.raddr and c.status == psutil.CONN_ESTABLISHED} >= {port, port + 1}
    assert '"listening on TCP"' in stack.log(LEARNER) and '"curve": true' in stack.log(LEARNER)

    # a stranger with a key of its own: refused, counted, shown; its steps never arrive
    stranger_keys = zmq.curve_keypair()
    ctx = zmq.Context()
    try:
        push = make_socket(ctx, zmq.PUSH)
        connect_curve(push, *stranger_keys, load_public(learner_public, "learner"))
        push.connect(endpoint)
        push.send_multipart(encode("control_request", {"cmd": "stop"}), zmq.NOBLOCK)
        s = stack.wait_for(lambda s: row(s, LEARNER)["refused"] >= 1, 30, "the stranger refused")
    finally:
        ctx.destroy(linger=0)
    assert row(s, LEARNER)["dropped"] == 0, "nothing of the stranger's got through to be dropped"
    table = stack.cli("status")
    assert "learner refused" in table.stdout and "whose key it does not allow" in table.stdout
    before = row(s, LEARNER)["updates"]
    stack.wait_for(lambda s: row(s, LEARNER)["updates"] > before + 20, 60, "training going on")
    assert stack.cli("stop").returncode == 0
    assert stack.proc.wait(timeout=40) == 0

    # no key in the run's files, its logs or the supervisor's output: only paths
    secrets = [*load_secret(learner_secret, "l"), *load_secret(host_secret, "h"), stranger_keys[0]]
    for path in [*stack.run_dir.rglob("*"), stack.tmp / "supervisor.out"]:
        if path.is_file():
            data = path.read_bytes()
            assert not [k for k in secrets if k in data], f"a key in {path}"


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
