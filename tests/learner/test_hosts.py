"""The learner's table of the hosts that send it steps (learner/intake.py), and what `status` makes of it."""

import time

import pytest

from learner.intake import Intake
from protocol.messages import MAX_HOSTS
from supervisor.control import sending_hosts
from supervisor.display import status_notes

pytestmark = pytest.mark.timeout(10)


def intake() -> Intake:
    return Intake(inbox=None, lock=None, progress=None, log=None, on_spec=None, on_episode=None)


def test_each_host_is_listed_with_its_slots_steps_and_when_it_last_sent():
    i = intake()
    i.seen("host-b:worker-0", 16)
    i.seen("host-b:worker-1", 16)
    i.seen("host-b:worker-0", 8)
    i.seen("worker-0", 4)  # this run's own worker, over ipc
    rows = i.host_rows()
    assert [(r["host"], r["slots"], r["steps"]) for r in rows] == [("host-b", 2, 40), ("local", 1, 4)]
    assert all(0 <= r["last_seen_s"] < 5 for r in rows)
    i.hosts["host-b"]["last_seen"] = time.monotonic() - 30
    assert i.host_rows()[0]["last_seen_s"] >= 30


def test_made_up_names_do_not_grow_the_table():
    i = intake()
    for n in range(10 * MAX_HOSTS):
        i.seen(f"h{n}:worker-{n}", 1)
        i.seen(f"h0:worker-{n}", 1)
    assert len(i.hosts) == MAX_HOSTS and len(i.hosts["h0"]["workers"]) == MAX_HOSTS


def test_status_shows_each_sending_host_and_ignores_malformed_rows():
    hosts = sending_hosts([{"host": "host-b", "slots": 2, "steps": 12345, "last_seen_s": 0.4},
                           {"host": 7, "slots": 1, "steps": 1, "last_seen_s": 0.0}, "garbage", None,
                           {"host": "x", "slots": True, "steps": 1, "last_seen_s": 0.0}])
    assert hosts == [{"host": "host-b", "slots": 2, "steps": 12345, "last_seen_s": 0.4}]
    assert sending_hosts({"not": "a list"}) == [] and sending_hosts(None) == []
    status = {"processes": [{"name": "learner", "state": "running", "hosts": hosts}]}
    assert "learner hears from host host-b: 2 slot(s), 12,345 steps, last 0.4s ago" in status_notes(status)


def test_a_restarted_hosts_worker_is_a_new_stream_and_a_duplicate_is_not_counted(tmp_path):
    """A host whose supervisor restarted sends as host-b:worker-0 incarnation 0 again, from seq 0: its session makes
    it a stream of its own, so nothing it sends is taken for a duplicate of the last one's."""
    import numpy as np

    from learner.replay import ReplayBuffer
    from protocol.codec import decode, encode
    from protocol.messages import STEPS

    i = intake()
    i.replay = ReplayBuffer(tmp_path / "replay", 1000, (3,), np.uint8, 1)

    def steps(session, seq, n=10):
        a = {"first": np.eye(1, n, dtype=np.uint8)[0] if seq == 0 else np.zeros(n, np.uint8),
             "frames": np.zeros((n, 3), np.uint8), "actions": np.zeros((n, 1), np.float32),
             "rewards": np.zeros(n, np.float32), "terminated": np.zeros(n, np.uint8), "truncated": np.zeros(n, np.uint8)}
        return decode(encode(STEPS, {"worker": "host-b:worker-0", "incarnation": 0, "seq": seq,
                                     "env_steps": (seq + 1) * n, "session": session}, a))

    for seq in range(5):
        i.store(steps("aaaa0001", seq))
    i.store(steps("aaaa0001", 3))  # resent after a learner restart: a duplicate
    assert i.host_rows()[0]["steps"] == 50 and i.replay.total == 50
    for seq in range(3):  # the host's supervisor restarted: worker-0 incarnation 0 again, a new session
        i.store(steps("bbbb0002", seq))
    assert i.replay.total == 80 and i.host_rows()[0]["steps"] == 80
    assert set(i.replay.streams) == {"host-b:worker-0/0/aaaa0001", "host-b:worker-0/0/bbbb0002"}


@pytest.mark.parametrize("name", ["x" * 200, "a:b:c", "host-b:\x1b[31mworker", "", ":worker-0", "host b:worker-0"])
def test_a_worker_name_the_learner_would_keep_or_show_is_refused_at_the_schema(name):
    import numpy as np

    from protocol.codec import decode, encode
    from protocol.messages import STEPS, ProtocolError

    arrays = {"first": np.ones(1, np.uint8), "frames": np.zeros((1, 3), np.uint8),
              "actions": np.zeros((1, 1), np.float32), "rewards": np.zeros(1, np.float32),
              "terminated": np.zeros(1, np.uint8), "truncated": np.zeros(1, np.uint8)}
    import msgpack

    with pytest.raises(ProtocolError, match="steps.worker"):  # we never send one
        encode(STEPS, {"worker": name, "incarnation": 0, "seq": 0, "env_steps": 1}, arrays)
    frames = encode(STEPS, {"worker": "worker-0", "incarnation": 0, "seq": 0, "env_steps": 1}, arrays)
    header = msgpack.unpackb(frames[0], raw=False)
    header["worker"] = name
    with pytest.raises(ProtocolError, match="steps.worker"):  # nor take one
        decode([msgpack.packb(header, use_bin_type=True), *frames[1:]])


def test_a_host_is_who_its_key_says():
    """Steps that came in with host-b's key are host-b's workers' or nothing: dropped and counted otherwise."""
    import zmq

    from protocol.codec import Message
    from protocol.sockets import Receiver

    ctx = zmq.Context()
    try:
        inbox = Receiver(ctx.socket(zmq.PULL))
        i = Intake(inbox=inbox, lock=None, progress=None, log=None, on_spec=None, on_episode=lambda m: None)
        i.handle(Message("episode", {"worker": "host-c:worker-0", "incarnation": 0}, peer="host-b"))
        i.handle(Message("episode", {"worker": "worker-0", "incarnation": 0}, peer="host-b"))
        assert inbox.dropped["host_mismatch"] == 2
        i.handle(Message("episode", {"worker": "host-bx:worker-0", "incarnation": 0}, peer="host-b"))
        i.handle(Message("episode", {"worker": "host-b.:worker-0", "incarnation": 0}, peer="host-b"))
        i.handle(Message("episode", {"worker": "host.host-1:worker-0", "incarnation": 0}, peer="host-b"))
        assert inbox.dropped["host_mismatch"] == 5, "a longer name, an empty share, another key's share"
        i.handle(Message("episode", {"worker": "host-b:worker-0", "incarnation": 0}, peer="host-b"))
        i.handle(Message("episode", {"worker": "host-b.host-3:worker-0", "incarnation": 0}, peer="host-b"))
        i.handle(Message("episode", {"worker": "worker-0", "incarnation": 0}))  # ipc: no key, this run's own
        assert inbox.dropped_total == 5
    finally:
        ctx.destroy(linger=0)


def test_a_hosts_workers_are_called_by_its_keys_name_unless_told_otherwise():
    from protocol.config import ConfigError, load_config

    remote = [("run.role", "workers"), ("workers.learner", "tcp://10.0.0.5:7000"),
              ("workers.learner_key", "keys/learner.key")]
    assert load_config(None, remote + [("workers.curve_key", "keys/host-b.key_secret")]).worker_host() == "host-b"
    assert load_config(None, remote + [("workers.curve_key", "keys/host-b.key_secret"),
                                       ("workers.host", "rack2-n7")]).worker_host() == "rack2-n7"
    with pytest.raises(ConfigError, match="a host name is letters"):
        load_config(None, remote + [("workers.curve_key", "keys/my key.key_secret")])
