"""Two hosts: a learner host (no workers of its own, the learner on TCP with CurveZMQ) and a workers-only host
(`up --role workers --learner tcp://...`) in a network namespace of its own, joined by a veth pair, whose slots come in
over TCP with its key. The learner's status lists the host; a stranger's key is refused and counted; the link cut
and mended, the host's steps flow again; the learner SIGKILLed on its host is replaced there while the other host's
workers wait and go on with no restart, and nothing the learner had acknowledged is lost; the workers-only host ends
its run when the learner says the run is complete; no key is written anywhere in either run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import zmq

from harness.netns import OtherHost
from protocol.codec import encode
from protocol.curve import connect_curve, load_public, load_secret
from protocol.roles import LEARNER
from protocol.sockets import make_socket
from protocol.states import RUNNING
from harness.carla import free_port_pair
from harness.keys import ironhouse

pytestmark = pytest.mark.timeout(240)


def row(status, name):
    return next(p for p in status["processes"] if p["name"] == name)


@pytest.fixture
def other_host():
    host = OtherHost()
    yield host
    assert not host.remove(), "processes left on the other host"


def test_a_workers_only_host_steps_against_a_learner_elsewhere_and_outlives_its_restart(other_host, stack_factory,
                                                                                       tmp_path):
    learner_public, learner_secret, secrets, clients = ironhouse(tmp_path / "keys", "host-b")
    host_secret = secrets["host-b"]
    endpoint = f"tcp://{other_host.here}:{free_port_pair()}"
    head = stack_factory({"workers": {"count": 0}, "run": {"max_timesteps": 3000},
                          "learner": {"listen": endpoint, "curve_key": str(learner_secret),
                                      "curve_clients": str(clients), "checkpoint_every": 50}})
    host = stack_factory(start=False)
    host.extra_args = ["--role", "workers", "--learner", endpoint, "--key", str(host_secret),
                       "--learner-key", str(learner_public), "--host", "host-b"]
    host.prefix = other_host.prefix  # its supervisor and its workers on the other host's network
    host.start()

    s = host.wait_for(lambda s: all(row(s, f"worker-{i}")["state"] == RUNNING and row(s, f"worker-{i}")["env_steps"]
                                    > 100 for i in range(2)), 120, "host-b's workers stepping")
    assert [p["name"] for p in s["processes"]] == ["worker-0", "worker-1"], "no learner on a workers-only host"
    workers = {i: row(s, f"worker-{i}")["pid"] for i in range(2)}
    # (a worker steps its first random steps before the learner is up: its steps wait in its queue meanwhile)
    h = head.wait_for(lambda s: row(s, LEARNER)["updates"] >= 100 and row(s, LEARNER)["hosts"], 120,
                      "the learner training on host-b's steps")
    port = int(endpoint.rsplit(":", 1)[1])
    for pid in workers.values():  # each worker's steps and weights sockets: TCP connections to the learner's ports
        assert other_host.tcp_peers(pid) >= {port, port + 1}
    assert [(x["host"], x["slots"]) for x in row(h, LEARNER)["hosts"]] == [("host-b", 2)]
    assert row(h, LEARNER)["hosts"][0]["steps"] > 0 and row(h, LEARNER)["hosts"][0]["last_seen_s"] < 5
    assert "learner hears from host host-b: 2 slot(s)" in head.cli("status").stdout
    assert '"listening on TCP"' in head.log(LEARNER) and '"curve": true' in head.log(LEARNER)

    # a stranger with a key of its own: refused, counted, shown; nothing it sends arrives
    stranger_keys = zmq.curve_keypair()
    ctx = zmq.Context()
    try:
        push = make_socket(ctx, zmq.PUSH)
        connect_curve(push, *stranger_keys, load_public(learner_public, "learner"))
        push.connect(endpoint)
        push.send_multipart(encode("control_request", {"cmd": "stop"}), zmq.NOBLOCK)
        h = head.wait_for(lambda s: row(s, LEARNER)["refused"] >= 1, 30, "the stranger refused")
    finally:
        ctx.destroy(linger=0)
    assert row(h, LEARNER)["dropped"] == 0, "nothing of the stranger's got through to be dropped"
    assert "whose key it does not allow" in head.cli("status").stdout

    # the link between the hosts cut: the learner stops hearing from host-b; mended: its steps flow again
    def heard(s):
        return next((x for x in row(s, LEARNER)["hosts"] if x["host"] == "host-b"), None)

    other_host.cut()
    try:
        h = head.wait_for(lambda s: heard(s)["last_seen_s"] >= 2.0, 30, "the learner missing host-b")
        steps_at_cut = heard(h)["steps"]
    finally:
        other_host.mend()
    h = head.wait_for(lambda s: heard(s)["steps"] > steps_at_cut and heard(s)["last_seen_s"] < 1.0, 60,
                      "host-b's steps flowing again")

    # the learner SIGKILLed on its host: replaced there; host-b's workers wait for it and go on, never restarted;
    # what the learner had stored (and so acknowledged) before it died is all there after its resume
    updates, stored = row(h, LEARNER)["updates"], row(h, LEARNER)["env_steps"]
    os.kill(row(h, LEARNER)["pid"], signal.SIGKILL)
    head.wait_for(lambda s: row(s, LEARNER)["incarnation"] == 1 and row(s, LEARNER)["updates"] > updates, 120,
                  "the learner back and training past where it was")
    resumed = [json.loads(line) for line in head.log(LEARNER).splitlines() if '"resumed from checkpoint"' in line]
    assert resumed and resumed[0]["transitions"] >= stored, (resumed, stored)
    s = host.wait_for(lambda s: all(row(s, f"worker-{i}")["env_steps"] > 0 for i in range(2)), 30, "host-b stepping")
    for i in range(2):
        assert row(s, f"worker-{i}")["pid"] == workers[i] and row(s, f"worker-{i}")["restarts"] == 0
    assert not [e for e in host.events() if e["event"] in ("stalled", "exited")], "waiting is not a stall"

    # the learner completes the run: host-b's workers finish and its supervisor ends its run, exit 0
    assert head.proc.wait(timeout=150) == 0, head.diagnostics()
    assert host.proc.wait(timeout=60) == 0, host.diagnostics()
    ended = host.events()[-1]
    assert ended["event"] == "run_ended" and "every child of pool worker finished" in ended["reason"]

    # no key in either run's files, their logs or the supervisors' output: only paths
    secrets = [*load_secret(learner_secret, "l"), *load_secret(host_secret, "h"), stranger_keys[0]]
    for stack in (head, host):
        for path in [*stack.run_dir.rglob("*"), stack.tmp / "supervisor.out"]:
            if path.is_file():
                assert not [k for k in secrets if k in path.read_bytes()], f"a key in {path}"
