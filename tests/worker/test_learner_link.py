"""A worker's link to a learner on another host (worker/learner_link.py), on real ZeroMQ sockets in this process:
a learner that goes quiet for longer than workers.learner_absent_s is given up on with the reason; one that keeps
publishing never is."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from protocol.codec import encode
from protocol.exits import FatalError
from protocol.heartbeat import Progress
from protocol.messages import PROGRESS
from protocol.sockets import make_socket
from worker.learner_link import LearnerLink

pytestmark = pytest.mark.timeout(30)


class Log:
    def warning(self, *args, **kwargs):
        pass


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def link(ctx, port: int, absent_s: float) -> LearnerLink:
    eps = {"steps": f"tcp://127.0.0.1:{port}", "weights": f"tcp://127.0.0.1:{port + 1}"}
    return LearnerLink(ctx, eps, "host-b:worker-0", 0, Progress(), Log(), lambda: False, absent_s=absent_s)


def test_a_learner_gone_quiet_is_given_up_on_with_the_reason(ctx):
    lk = link(ctx, 1, absent_s=0.3)  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(FatalError, match=r"no word from the learner at tcp://127.0.0.1:2 for \d+s "
                                         r"\(workers.learner_absent_s 0.3\)"):
        while time.monotonic() - t0 < 10:
            lk.wait_for_allowance()
    assert time.monotonic() - t0 < 5


def test_a_learner_that_publishes_is_waited_for_however_long_the_allowance_holds(ctx):
    pub = make_socket(ctx, zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1") - 1  # the link subscribes to PORT+1
    lk = link(ctx, port, absent_s=0.3)
    stop = threading.Event()

    def learner():  # progress twenty times a second, and an allowance of nothing: the worker waits
        while not stop.is_set():
            pub.send_multipart(encode(PROGRESS, {"updates": 0, "received": 0, "allowed": 0, "done": False,
                                                 "streams": {}}))
            time.sleep(0.05)

    thread = threading.Thread(target=learner, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 0.9  # three times the absence allowed
        while time.monotonic() < end:
            lk.poll(timeout_ms=100)  # never raises: the learner is there
        assert time.monotonic() - lk.heard_at < 0.5
    finally:
        stop.set()
        thread.join()


def test_the_newest_weights_reach_the_policy_with_their_version(ctx):
    import numpy as np

    from protocol.messages import WEIGHTS

    pub = make_socket(ctx, zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1") - 1
    lk = link(ctx, port, absent_s=0.0)
    got = []
    lk.on_weights = lambda arrays, version: got.append((version, float(arrays["w"][0])))
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:  # a SUB joins a moment after it connects: publish until heard
        pub.send_multipart(encode(WEIGHTS, {"version": 3, "updates": 30}, {"w": np.full(2, 0.5, np.float32)}))
        lk.poll(timeout_ms=50)
    assert got and got[0] == (3, 0.5) and lk.weights_version == 3
    for version in (4, 5):
        pub.send_multipart(encode(WEIGHTS, {"version": version, "updates": 10 * version},
                                  {"w": np.full(2, version, np.float32)}))
    deadline = time.monotonic() + 10
    while lk.weights_version != 5 and time.monotonic() < deadline:
        lk.poll(timeout_ms=50)
    assert got[-1] == (5, 5.0), "the newest of what came, with its version"
