"""Every bound socket takes only what it legitimately receives, and a frame too big for the run is a config error."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import zmq

from protocol.codec import decode
from protocol.config import ConfigError, load_config
from protocol.exits import os_error_exit
from protocol.messages import STEPS
from protocol.sockets import make_socket, send, steps_max_bytes
from supervisor import cli

pytestmark = pytest.mark.timeout(60)


def test_a_real_batch_fits_the_steps_limit_and_a_bigger_message_is_cut_off():
    cfg = load_config(None)
    limit = steps_max_bytes(cfg.workers.batch_steps, cfg.env.max_frame_bytes)
    n = cfg.workers.batch_steps + 2
    frame = np.zeros((cfg.env.max_frame_bytes,), np.uint8)
    arrays = {"first": np.zeros(n, np.uint8), "frames": np.stack([frame] * n),
              "actions": np.zeros((n, 64), np.float32), "rewards": np.zeros(n, np.float32),
              "terminated": np.zeros(n, np.uint8), "truncated": np.zeros(n, np.uint8)}
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL, max_bytes=limit)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = make_socket(ctx, zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        send(push, STEPS, {"worker": "w", "incarnation": 0, "seq": 0, "env_steps": n}, arrays)
        assert pull.poll(5000), "the largest legitimate batch must get through"
        assert decode(pull.recv_multipart()).type == STEPS
        push.send(b"x" * (limit + 1))  # one byte over: the peer is cut off, nothing is buffered or delivered
        assert not pull.poll(500)
    finally:
        ctx.destroy(linger=0)


def test_a_pub_socket_refuses_a_huge_subscription():
    from protocol.sockets import SUBSCRIPTION_MAX_BYTES

    ctx = zmq.Context()
    try:
        pub = make_socket(ctx, zmq.XPUB, max_bytes=SUBSCRIPTION_MAX_BYTES)  # XPUB shows what a PUB takes in
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        evil = ctx.socket(zmq.XSUB)
        evil.connect(f"tcp://127.0.0.1:{port}")
        evil.send(b"\x01" + b"x" * (SUBSCRIPTION_MAX_BYTES + 10))
        assert not pub.poll(500), "an oversized subscription never reaches the socket"
        good = ctx.socket(zmq.SUB)
        good.connect(f"tcp://127.0.0.1:{port}")
        good.setsockopt(zmq.SUBSCRIBE, b"")
        assert pub.poll(3000) and pub.recv() == b"\x01"
    finally:
        ctx.destroy(linger=0)


def test_carla_frames_above_the_limit_are_a_config_error():
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        load_config(None, [("env.backend", "carla"), ("env.carla.camera.width", 1024),
                           ("env.carla.camera.height", 1024), ("env.carla.camera.grayscale", False)])


def test_os_errors_map_to_distinct_exit_codes():
    codes = {os_error_exit(OSError(e, os.strerror(e), "/x"))
             for e in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EIO)}
    assert codes == {cli.EXIT_PERMISSION, cli.EXIT_READ_ONLY, cli.EXIT_NO_SPACE, cli.EXIT_OS_ERROR}
    assert len({cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_DEGRADED, cli.EXIT_NO_SUPERVISOR,
                cli.EXIT_RUN_BUSY, cli.EXIT_OVERLOAD, *codes}) == 11
