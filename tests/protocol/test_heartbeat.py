"""The heartbeat thread: a beat read while the main thread enters a phase, and a beat that cannot be encoded."""

import time

import pytest
import zmq

from protocol.codec import decode
from protocol.heartbeat import HeartbeatSender, Progress

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair(tmp_path):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/hb.sock"
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    yield ctx, endpoint, pull, push
    ctx.destroy(linger=0)


def test_a_phase_entered_after_the_beat_read_the_clock_is_age_zero_not_a_dead_heartbeat(pair):
    """The main thread sets phase_since after the heartbeat thread read ``now``: the age came out negative, the
    encoder refused it, and the thread died; the process then looked hung and was killed as never started."""
    ctx, endpoint, pull, push = pair
    progress = Progress()
    sender = HeartbeatSender(ctx, endpoint, name="worker-0", role="worker", incarnation=0, progress=progress,
                             interval_s=0.05, watch_parent=False)
    progress.set_phase("stepping")
    progress.phase_since = time.monotonic() + 5.0  # as if entered just after the beat's clock read
    sender.beat(push)
    assert pull.poll(2000)
    beat = decode(pull.recv_multipart())
    assert beat["phase"] == "stepping" and beat["phase_age_s"] == 0.0


def test_a_beat_that_cannot_be_encoded_does_not_end_the_beating(pair, capfd):
    ctx, endpoint, pull, _ = pair
    progress = Progress()
    sender = HeartbeatSender(ctx, endpoint, name="worker-0", role="worker", incarnation=0, progress=progress,
                             interval_s=0.05, watch_parent=False)
    progress.env_steps = -1  # no beat may carry it
    sender.start()
    try:
        said, deadline = "", time.monotonic() + 10
        while "heartbeat not sent: bad_field" not in said and time.monotonic() < deadline:
            said += capfd.readouterr().err
            time.sleep(0.01)
        assert "heartbeat not sent: bad_field" in said and sender.is_alive() and not pull.poll(0)
        progress.env_steps = 7
        assert pull.poll(3000), "beats go on once they can be sent"
        assert decode(pull.recv_multipart())["env_steps"] == 7
    finally:
        sender.stop()
        sender.join(5)
