"""The codec, its validation, and receive loops fed garbage over real ZeroMQ sockets."""

import msgpack
import numpy as np
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import PROTOCOL_VERSION, ProtocolError
from protocol.sockets import Receiver, make_socket

pytestmark = pytest.mark.timeout(20)


def steps_arrays(n=3, frame=(1, 8, 8)):
    return {"first": np.array([1] + [0] * (n - 1), np.uint8),
            "frames": np.arange(n * int(np.prod(frame)), dtype=np.uint8).reshape((n,) + frame),
            "actions": np.ones((n, 2), np.float32), "rewards": np.arange(n, dtype=np.float32),
            "terminated": np.zeros(n, np.uint8), "truncated": np.zeros(n, np.uint8)}


STEPS_FIELDS = {"worker": "worker-0", "incarnation": 0, "seq": 0, "env_steps": 2}


def test_steps_roundtrip_is_exact():
    arrays = steps_arrays()
    msg = decode([bytes(f) for f in encode("steps", STEPS_FIELDS, arrays)])
    assert msg.type == "steps" and msg["seq"] == 0
    for k, v in arrays.items():
        np.testing.assert_array_equal(msg.arrays[k], v)
        assert msg.arrays[k].dtype == v.dtype


def test_weights_carry_any_float32_tensors():
    arrays = {"actor.w": np.random.rand(3, 4).astype(np.float32), "actor.b": np.zeros(4, np.float32)}
    msg = decode(encode("weights", {"version": 1, "updates": 5}, arrays))
    np.testing.assert_array_equal(msg.arrays["actor.w"], arrays["actor.w"])


def header(**kw):
    base = {"v": PROTOCOL_VERSION, "type": "control_request", "cmd": "status"}
    base.update(kw)
    return msgpack.packb(base)


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xc1garbage"], "bad_msgpack"),
    ([msgpack.packb([1, 2, 3])], "bad_header"),
    ([header(v=99)], "bad_version"),
    ([header(type="nope")], "unknown_type"),
    ([header(cmd="format-disk")], "bad_field"),
    ([header(extra=1)], "unknown_field"),
    ([msgpack.packb({"v": PROTOCOL_VERSION, "type": "control_request"})], "missing_field"),
    ([b"x" * 70000], "header_too_large"),
])
def test_malformed_headers_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.reason == reason


def test_bool_is_not_an_int():
    with pytest.raises(ProtocolError, match="seq"):
        encode("steps", {**STEPS_FIELDS, "seq": True}, steps_arrays())


def test_array_payload_must_match_its_declared_size_and_dtype():
    frames = [bytes(f) for f in encode("steps", STEPS_FIELDS, steps_arrays())]
    short = list(frames)
    short[2] = short[2][:-1]
    with pytest.raises(ProtocolError) as err:
        decode(short)
    assert err.value.reason == "bad_size"
    h = msgpack.unpackb(frames[0])
    h["arrays"][0][1] = "<f8"
    with pytest.raises(ProtocolError) as err:
        decode([msgpack.packb(h)] + frames[1:])
    assert err.value.reason == "bad_dtype"
    with pytest.raises(ProtocolError) as err:
        decode(frames[:-1])
    assert err.value.reason == "bad_arrays"


def test_inconsistent_batch_lengths_are_rejected():
    arrays = steps_arrays()
    arrays["rewards"] = np.zeros(5, np.float32)
    with pytest.raises(ProtocolError, match="rewards"):
        encode("steps", STEPS_FIELDS, arrays)


def test_receiver_drops_counts_and_survives_garbage():
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = make_socket(ctx, zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        logged = []
        rx = Receiver(pull, lambda msg, **kw: logged.append(kw))
        push.send(b"\x00\x01garbage")
        push.send_multipart([header(v=7)])
        push.send_multipart(encode("control_request", {"cmd": "status"}))
        got = rx.recv(timeout_ms=2000)
        while got is None:
            got = rx.recv(timeout_ms=2000)
        assert got.type == "control_request"
        assert rx.dropped == {"bad_msgpack": 1, "bad_version": 1}
        assert {k["reason"] for k in logged} == {"bad_msgpack", "bad_version"}
    finally:
        ctx.destroy(linger=0)


def test_oversized_message_is_refused_by_the_socket():
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL, max_bytes=1024)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = make_socket(ctx, zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        rx = Receiver(pull)
        push.send(b"x" * 4096)
        assert rx.recv(timeout_ms=300) is None
        push2 = make_socket(ctx, zmq.PUSH)
        push2.connect(f"tcp://127.0.0.1:{port}")
        push2.send_multipart(encode("control_request", {"cmd": "stop"}))
        assert rx.recv(timeout_ms=3000).fields["cmd"] == "stop"
    finally:
        ctx.destroy(linger=0)


HEARTBEAT_FIELDS = {"name": "learner", "role": "learner", "pid": 7, "incarnation": 0, "phase": "training",
                    "phase_age_s": 0.1, "env_steps": 0, "episodes": 0, "updates": 3, "steps_per_s": 0.0,
                    "rss_bytes": 1, "sent_at": 0.0}


def test_heartbeat_alerts_must_be_a_short_list_of_strings():
    ok = decode(encode("heartbeat", {**HEARTBEAT_FIELDS, "alerts": ["warning:q_high@5"]}))
    assert ok["alerts"] == ["warning:q_high@5"]
    for bad in ([{"level": "warning"}], ["x" * 201], ["a"] * 21, [3]):
        frames = [msgpack.packb({"v": PROTOCOL_VERSION, "type": "heartbeat", **HEARTBEAT_FIELDS, "alerts": bad})]
        with pytest.raises(ProtocolError) as err:
            decode(frames)
        assert err.value.reason == "bad_field"
