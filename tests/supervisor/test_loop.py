"""The supervisor's loop reads its children's beats before it judges them.

A real :class:`supervisor.loop.Supervisor` with its real heartbeat socket; a child
beats over ZeroMQ while the loop is busy with its own work (a slow disk under a
status answer, a slow state file), and the loop must count those beats before the
machine weighs the child's silence.
"""

import time

import pytest
import zmq

from protocol import events as ev
from protocol.messages import HEARTBEAT
from protocol.sockets import make_socket, send
from tests.supervisor.test_drivers import events, loop, setup  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(30)


def test_beats_that_came_while_the_loop_was_busy_count_before_silence_is_judged(setup):  # noqa: F811
    sup, poller, drivers, log, clock = setup
    loop(sup, poller, clock, 2)
    incarnation, pid = drivers["process"].running["worker-0"]
    drivers["process"].frozen.add("worker-0")  # from now on, worker-0 beats over the socket only
    deadline = sup.specs["worker-0"].deadlines.heartbeat_s
    push = make_socket(sup.ctx, zmq.PUSH, hwm=10)
    push.connect(sup.endpoints["heartbeat"])
    steps = [0]

    def beat():
        steps[0] += 10
        send(push, HEARTBEAT, {"name": "worker-0", "role": "worker", "pid": pid, "incarnation": incarnation,
                               "phase": "stepping", "phase_age_s": 1.0, "env_steps": steps[0], "episodes": 0,
                               "updates": 0, "steps_per_s": 10.0, "rss_bytes": 1, "sent_at": time.time()})
        assert sup.hb_sock.poll(5000), "the beat reached the supervisor's socket"

    busy_check_disk = sup.check_disk

    def slow_check_disk():  # the loop's own work takes longer than the deadline; the child beats meanwhile
        clock.now += deadline * 0.6
        beat()
        clock.now += deadline * 0.6
        beat()
        busy_check_disk()

    try:
        beat()
        sup.loop_once(poller)
        sup.check_disk = slow_check_disk
        for _ in range(5):
            sup.loop_once(poller)
    finally:
        push.close(2000)  # its last beats delivered
    stalled = [e for e in events(sup) if e["event"] == ev.STALLED]
    assert stalled == [], stalled
    # (a beat counts when the loop reads it; the socket answered readable at the first of the two: read the rest)
    deadline = time.monotonic() + 5
    while sup.machine.children["worker-0"].inc.heartbeat["env_steps"] != steps[0] and time.monotonic() < deadline:
        sup.take_heartbeats()
        time.sleep(0.01)
    assert sup.machine.children["worker-0"].inc.heartbeat["env_steps"] == steps[0]
