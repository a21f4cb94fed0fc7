"""The learner's TCP weights publisher stores no peer's subscriptions but a whole-stream one (XPUB, manual)."""

import time

import pytest
import zmq

from learner.main import accept_subscriptions

pytestmark = pytest.mark.timeout(20)


def test_only_whole_stream_subscriptions_are_applied_and_prefixes_are_dropped():
    ctx = zmq.Context()
    try:
        xpub = ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        xpub.setsockopt(zmq.LINGER, 0)
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        worker = ctx.socket(zmq.SUB)
        worker.setsockopt(zmq.SUBSCRIBE, b"")
        hostile = ctx.socket(zmq.SUB)
        for i in range(200):  # 200 kilobyte-scale prefixes, and one that real messages start with
            hostile.setsockopt(zmq.SUBSCRIBE, f"{i:04d}".encode() * 125)
        hostile.setsockopt(zmq.SUBSCRIBE, b"\x92")
        for sock in (worker, hostile):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
        applied, deadline = 0, time.monotonic() + 10
        while applied < 1 and time.monotonic() < deadline:
            applied += accept_subscriptions(xpub)
            time.sleep(0.02)
        time.sleep(0.3)
        applied += accept_subscriptions(xpub)  # the rest of the hostile ones, dropped
        assert applied == 1, "the worker's subscription only"
        for _ in range(20):
            xpub.send(b"\x92 a message")
            time.sleep(0.01)
        assert worker.poll(2000) and worker.recv() == b"\x92 a message"
        assert not hostile.poll(300), "a prefix subscription is never applied"
    finally:
        ctx.destroy(linger=0)
