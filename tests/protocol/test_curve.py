"""The wire across hosts (protocol/curve.py): key files, which endpoints need CurveZMQ, and the ironhouse itself on
real ZeroMQ sockets over loopback TCP."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from protocol.config import ConfigError, load_config
from protocol.curve import (CURVE_HANDSHAKE_BYTES, Gatekeeper, KeyFileError, allowed_keys, connect_curve, is_loopback,
                            load_public, load_secret, serve_curve, tcp_endpoints, write_keypair)
from protocol.sockets import SUBSCRIPTION_MAX_BYTES, Receiver, make_socket
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)
PENDULUM = ROOT / "configs" / "pendulum.yaml"


def test_a_key_file_that_cannot_serve_is_named_with_what_to_do(tmp_path):
    public_path, secret_path = write_keypair(tmp_path, "host")
    os.chmod(secret_path, 0o644)
    with pytest.raises(KeyFileError, match=f"workers.curve_key {secret_path} can be read by others .*chmod 600"):
        load_secret(secret_path, "workers.curve_key")
    with pytest.raises(KeyFileError, match="does not exist .*supervisor keys NAME"):
        load_secret(tmp_path / "none.key_secret", "learner.curve_key")
    with pytest.raises(KeyFileError, match="is not a secret key file"):
        load_secret(public_path, "learner.curve_key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match="holds no valid CurveZMQ key"):
        load_public(garbage, "workers.learner_key")
    with pytest.raises(KeyFileError, match="is not a directory of public keys"):
        allowed_keys(tmp_path / "nowhere", "learner.curve_clients")


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:7000", True), ("tcp://127.1.2.3:7000", True), ("tcp://[::1]:7000", True),
    ("tcp://localhost:7000", True), ("tcp://0.0.0.0:7000", False), ("tcp://10.0.0.5:7000", False),
    ("tcp://learner.example.org:7000", False), ("tcp://[::]:7000", False)])
def test_which_endpoints_leave_loopback(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_off_loopback_needs_keys_and_a_bad_endpoint_is_named():
    def err(*overrides):
        with pytest.raises(ConfigError) as info:
            load_config(PENDULUM, list(overrides))
        return str(info.value)

    assert "needs learner.curve_key and learner.curve_clients" in err(("learner.listen", "tcp://0.0.0.0:7000"))
    assert "needs workers.curve_key and workers.learner_key" in err(("workers.learner", "tcp://10.0.0.5:7000"))
    assert "go together" in err(("learner.curve_key", "k.key_secret"))
    assert "go together" in err(("workers.learner_key", "learner.key"))
    assert "not tcp://HOST:PORT" in err(("learner.listen", "ipc:///tmp/x"))
    assert "port from 1 to 65534" in err(("learner.listen", "tcp://127.0.0.1:65535"))
    assert load_config(PENDULUM, [("learner.listen", "tcp://127.0.0.1:7000")]).learner.listen
    cfg = load_config(PENDULUM, [("learner.listen", "tcp://0.0.0.0:7000"), ("learner.curve_key", "a.key_secret"),
                                 ("learner.curve_clients", "clients")])
    assert tcp_endpoints(cfg.learner.listen) == {"steps": "tcp://0.0.0.0:7000", "weights": "tcp://0.0.0.0:7001"}
    assert tcp_endpoints("tcp://[::1]:9") == {"steps": "tcp://[::1]:9", "weights": "tcp://[::1]:10"}


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_only_allowed_keys_get_in_and_each_refusal_is_counted(tmp_path, ctx):
    server_public, server_secret = zmq.curve_keypair()
    write_keypair(tmp_path / "clients", "host-a")
    allowed = allowed_keys(tmp_path / "clients", "learner.curve_clients")
    host_a = load_secret(tmp_path / "clients" / "host-a.key_secret", "k")
    refusals = []
    gate = Gatekeeper(ctx, allowed, on_refused=refusals.append)
    try:
        pull = make_socket(ctx, zmq.PULL, max_bytes=2**20)
        serve_curve(pull, server_public, server_secret)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        stranger = make_socket(ctx, zmq.PUSH)
        connect_curve(stranger, *zmq.curve_keypair(), server_public)
        stranger.connect(f"tcp://127.0.0.1:{port}")
        stranger.send(b"from a stranger", zmq.NOBLOCK)
        deadline = time.monotonic() + 10
        while gate.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gate.refused >= 1 and refusals and refusals[-1] == gate.refused
        friend = make_socket(ctx, zmq.PUSH)
        connect_curve(friend, *host_a, server_public)
        friend.connect(f"tcp://127.0.0.1:{port}")
        friend.send(b"from host-a")
        assert pull.poll(5000)
        frame = pull.recv(copy=False)
        assert frame.bytes == b"from host-a" and frame.get("User-Id") == "host-a", "the key's name comes with it"
        assert not pull.poll(300), "the stranger's message never arrives"
    finally:
        gate.stop()


def test_a_curve_subscriber_needs_the_handshakes_room_on_the_publisher(ctx):
    """A PUB's size limit (a subscription's, 64 bytes) applies to the CurveZMQ handshake too: with it no subscriber
    ever gets in; with CURVE_HANDSHAKE_BYTES (what the learner's TCP publisher takes) one does."""
    server_public, server_secret = zmq.curve_keypair()
    client = zmq.curve_keypair()
    gate = Gatekeeper(ctx, {client[0]})
    try:
        got = {}
        for limit in (SUBSCRIPTION_MAX_BYTES, CURVE_HANDSHAKE_BYTES):
            pub = make_socket(ctx, zmq.PUB, hwm=4, max_bytes=limit)
            serve_curve(pub, server_public, server_secret)
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            sub = make_socket(ctx, zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            connect_curve(sub, *client, server_public)
            sub.connect(f"tcp://127.0.0.1:{port}")
            got[limit] = False
            deadline = time.monotonic() + (0.5 if limit == SUBSCRIPTION_MAX_BYTES else 10)
            while not got[limit] and time.monotonic() < deadline:
                pub.send(b"weights")
                got[limit] = bool(sub.poll(50))
        assert got == {SUBSCRIPTION_MAX_BYTES: False, CURVE_HANDSHAKE_BYTES: True}
    finally:
        gate.stop()


def test_a_receiver_takes_from_each_of_its_sockets(ctx):
    a, b = make_socket(ctx, zmq.PULL), make_socket(ctx, zmq.PULL)
    a.bind("inproc://a")
    b.bind("inproc://b")
    inbox = Receiver(a)
    inbox.add(b)
    from protocol.codec import encode

    for name in ("a", "b"):
        push = make_socket(ctx, zmq.PUSH)
        push.connect(f"inproc://{name}")
        for i in range(3):
            push.send_multipart(encode("control_request", {"cmd": "status", "name": f"{name}{i}"}))
    first = inbox.recv(timeout_ms=2000)
    rest = inbox.drain()
    names = sorted(m["name"] for m in [first, *rest])
    assert names == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_keys_that_are_not_keys_or_not_a_pair_and_a_directory_are_named(tmp_path):
    tilde = tmp_path / "tilde.key_secret"
    tilde.write_text(f'curve\n    public-key = "{"~" * 40}"\n    secret-key = "{"~" * 40}"\n')
    os.chmod(tilde, 0o600)
    with pytest.raises(KeyFileError, match="holds no valid CurveZMQ key"):
        load_secret(tilde, "learner.curve_key")
    public, _ = zmq.curve_keypair()
    _, secret = zmq.curve_keypair()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(f'curve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    os.chmod(mixed, 0o600)
    with pytest.raises(KeyFileError, match="its public key is not the secret key's"):
        load_secret(mixed, "workers.curve_key")
    (tmp_path / "dir.key_secret").mkdir(mode=0o755)
    with pytest.raises(KeyFileError, match="is a directory"):
        load_secret(tmp_path / "dir.key_secret", "learner.curve_key")


def test_an_ipv6_endpoint_carries_steps_and_a_silent_peer_is_cut_off(ctx):
    """prepare_tcp: IPv6 where the endpoint's host is an IPv6 address, and a short handshake deadline."""
    from protocol.curve import HANDSHAKE_MS, prepare_tcp

    server_public, server_secret = zmq.curve_keypair()
    client = zmq.curve_keypair()
    gate = Gatekeeper(ctx, {client[0]})
    try:
        pull = make_socket(ctx, zmq.PULL)
        prepare_tcp(pull, "tcp://[::1]:1")
        assert pull.handshake_ivl == HANDSHAKE_MS
        serve_curve(pull, server_public, server_secret)
        port = pull.bind_to_random_port("tcp://[::1]")
        push = make_socket(ctx, zmq.PUSH)
        endpoint = tcp_endpoints(f"tcp://[::1]:{port}")["steps"]
        prepare_tcp(push, endpoint)
        connect_curve(push, *client, server_public)
        push.connect(endpoint)
        push.send(b"over IPv6")
        assert pull.poll(5000) and pull.recv() == b"over IPv6"
    finally:
        gate.stop()


def test_a_receiver_names_the_key_of_what_an_authenticated_socket_took_and_nothing_else(tmp_path, ctx):
    from protocol.codec import encode

    server_public, server_secret = zmq.curve_keypair()
    write_keypair(tmp_path / "clients", "host-a")
    host_a = load_secret(tmp_path / "clients" / "host-a.key_secret", "k")
    gate = Gatekeeper(ctx, allowed_keys(tmp_path / "clients", "learner.curve_clients"))
    try:
        plain = make_socket(ctx, zmq.PULL)
        plain.bind("inproc://plain")
        pull = make_socket(ctx, zmq.PULL)
        serve_curve(pull, server_public, server_secret)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        inbox = Receiver(plain)
        inbox.add(pull, authenticated=True)
        friend = make_socket(ctx, zmq.PUSH)
        connect_curve(friend, *host_a, server_public)
        friend.connect(f"tcp://127.0.0.1:{port}")
        friend.send_multipart(encode("control_request", {"cmd": "status"}))
        local = make_socket(ctx, zmq.PUSH)
        local.connect("inproc://plain")
        local.send_multipart(encode("control_request", {"cmd": "stop"}))
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            msg = inbox.recv(timeout_ms=200)
            if msg is not None:
                got[msg["cmd"]] = msg.peer
        assert got == {"status": "host-a", "stop": None}
    finally:
        gate.stop()


def test_no_allowed_key_may_be_named_under_another_ones_name(tmp_path):
    clients = tmp_path / "clients"
    for name in ("gpu", "gpu-b", "gpu.lab"):
        write_keypair(clients, name)
    with pytest.raises(KeyFileError, match=r"gpu\.lab\.key's name falls under gpu\.key's .*rename one"):
        allowed_keys(clients, "learner.curve_clients")
    (clients / "gpu.lab.key").unlink()
    assert sorted(allowed_keys(clients, "learner.curve_clients").values()) == ["gpu", "gpu-b"], \
        "gpu-b is not under gpu (a name, not a prefix)"
