"""Property-based fuzzing of the wire codec (hypothesis).

What the decoder must do with any list of frames, however malformed: return a
``Message`` that re-encodes to the same content, or raise ``ProtocolError`` --
never another exception, and never allocate memory from a declared array shape
(decoded arrays are views of the payload frames, sized by the real bytes). And
every message type built from valid fields and arrays round-trips exactly.

The inputs: random bytes; random msgpack values (nested maps and lists, non-str
keys, bin vs str, ints at the edges of msgpack's range, NaN, ext types); and
headers built from the real schemas in ``protocol.messages`` then mutated (wrong
field types and values, unknown, missing and bytes keys, other versions and
types, array specs with bad names, dtypes and shapes, huge shapes whose product
overflows int64 against tiny frames, payload frames of the wrong size or count,
flipped header bytes).

By default the tests run a fixed, derandomized set of about 2,000 examples in all
(reproducible in CI; no example database, and Hypothesis's caches go to the
temp directory, so nothing is written into the repository): about 7 s of CPU,
well under 20 s on a slow 2-core machine. To fuzz by hand for longer, with fresh
random inputs on each run, no deadline and no per-test timeout, set the number
of examples per test (5,000 take a few minutes)::

    FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/protocol/test_fuzz.py -q

A failure prints the smallest input found and a ``@reproduce_failure`` blob; add
the input as an ``@example`` on the test once the codec is fixed.
"""

from __future__ import annotations

import math
import os
import tempfile
import tracemalloc
from datetime import timedelta

import msgpack
import numpy as np
import pytest
from hypothesis import (
    HealthCheck,
    currently_in_test_context,
    event,
    example,
    given,
    settings,
)
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from protocol.codec import MAX_HEADER_BYTES, Message, decode, encode
from protocol.messages import (
    ARRAYS_ANY,
    HEARTBEAT,
    HELLO,
    MAX_ALERT_CHARS,
    MAX_ALERTS,
    MAX_BATCH,
    MAX_DETAIL_CHARS,
    MAX_STEPS_BYTES,
    PROTOCOL_VERSION,
    SCHEMAS,
    STEPS,
    WEIGHTS,
    ProtocolError,
)

# -- Run size: a short reproducible run by default, a long random one on request --------------------

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 0)
# `make test-fast` runs the same derandomized examples, fewer of each (FUZZ_SCALE=0.1); the full suite runs all.
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE") or 1.0)
# Hypothesis caches (Unicode tables, constants) go outside the repository; with database=None below
# nothing is written into it.
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                        or os.path.join(tempfile.gettempdir(), f"hypothesis-{os.getuid()}"))
_COMMON = dict(database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("fuzz-ci", max_examples=max(10, int(100 * FUZZ_SCALE)), deadline=timedelta(seconds=2),
                          derandomize=True, **_COMMON)
settings.register_profile("fuzz-long", max_examples=max(FUZZ_EXAMPLES, 1), deadline=None,
                          derandomize=False, **_COMMON)
FUZZ = settings.get_profile("fuzz-long" if FUZZ_EXAMPLES else "fuzz-ci")
TIMEOUT = 0 if FUZZ_EXAMPLES else 60  # pytest-timeout: 0 is no limit


def runs(n: int) -> settings:
    """The profile with ``n`` examples for this test (FUZZ_EXAMPLES overrides)."""
    return settings(FUZZ, max_examples=FUZZ_EXAMPLES or max(10, int(n * FUZZ_SCALE)))


REASONS = {"empty", "header_too_large", "bad_msgpack", "bad_header", "bad_version", "unknown_type",
           "unknown_field", "missing_field", "bad_field", "bad_arrays", "bad_dtype", "bad_shape", "too_large",
           "bad_size"}

# -- The oracle ---------------------------------------------------------------------------------------


def same(a, b) -> bool:
    """Equal content, types included (True is not 1) and NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def same_message(m1: Message, m2: Message) -> bool:
    return (m1.type == m2.type and same(m1.fields, m2.fields) and list(m1.arrays) == list(m2.arrays)
            and all(m1.arrays[k].dtype == m2.arrays[k].dtype and m1.arrays[k].shape == m2.arrays[k].shape
                    and m1.arrays[k].tobytes() == m2.arrays[k].tobytes() for k in m1.arrays))


def note_event(name: str) -> None:
    """Counts outcomes: --hypothesis-show-statistics shows how deep the inputs get into the decoder."""
    if currently_in_test_context():
        event(name)


def check_decode(frames: list) -> Message | None:
    """decode(frames) is a ProtocolError, or a message of views that re-encodes to itself."""
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        assert exc.reason in REASONS, exc.reason
        note_event(f"rejected: {exc.reason}")
        return None
    assert isinstance(msg, Message) and msg.type in SCHEMAS
    note_event(f"decoded: {msg.type}")
    schema = SCHEMAS[msg.type]
    payload = frames[1:]
    assert len(msg.arrays) == len(payload)
    for arr, frame in zip(msg.arrays.values(), payload):
        raw = np.frombuffer(frame, np.uint8)
        assert arr.nbytes == raw.nbytes, (arr.shape, arr.dtype, raw.nbytes)  # sized by the real frame
        assert not arr.flags.owndata  # a view, not a copy or an allocation
        assert arr.nbytes == 0 or np.shares_memory(arr, raw)
    assert sum(a.nbytes for a in msg.arrays.values()) <= schema.max_bytes
    if msg.type == HELLO:  # the learner sizes its replay and networks from these
        shape, dtype = msg["frame_shape"], np.dtype(msg["frame_dtype"])
        assert 1 <= len(shape) <= 4 and all(type(d) is int and d >= 1 for d in shape), shape
        assert math.prod(shape) * dtype.itemsize <= MAX_STEPS_BYTES, shape
        assert msg["action_dim"] * 4 <= MAX_STEPS_BYTES
    again = decode([bytes(f) for f in encode(msg.type, msg.fields, msg.arrays)])
    assert same_message(msg, again), (msg, again)
    return msg


# -- Generic msgpack values ---------------------------------------------------------------------------

INT64_MIN, UINT64_MAX = -2 ** 63, 2 ** 64 - 1
EDGE_INTS = [0, 1, 2, 3, 4, 255, 256, 1023, 1024, 1025, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1,
             2 ** 53 + 1, 2 ** 62 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -1, -2 ** 31, -2 ** 63]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(INT64_MIN, UINT64_MAX))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=12), st.binary(max_size=12))
ext = st.one_of(st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
                st.builds(msgpack.Timestamp, st.integers(0, 2 ** 34 - 1), st.integers(0, 999_999_999)))
wire_keys = st.one_of(st.text(max_size=8), st.binary(max_size=8))  # what strict_map_key lets through
keys = st.one_of(wire_keys, ints, st.none(), st.booleans(), st.floats())
values = st.recursive(st.one_of(scalars, ext), lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(wire_keys, c, max_size=4)), max_leaves=12)
# With maps keyed by ints, None, floats...: the decoder's msgpack refuses them (strict_map_key).
any_values = st.recursive(st.one_of(scalars, ext), lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(keys, c, max_size=4)), max_leaves=12)
# What a valid message field can hold and round-trip: str-keyed maps, lists, no ext types.
plain = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=4)),
                     max_leaves=10)


def pack(draw, value) -> bytes:
    # Mostly as encode packs; else bytes go out as (maybe invalid UTF-8) strs, the old msgpack way.
    return msgpack.packb(value, use_bin_type=draw(st.sampled_from([True, True, True, False])))


def as_frames(draw, frames: list) -> list:
    """Frames as they may reach decode: bytes, or buffers (what ZeroMQ hands over)."""
    kind = draw(st.sampled_from([bytes, memoryview, bytearray]))
    return [kind(f) for f in frames]


# -- Valid messages from the real schemas -------------------------------------------------------------


def field_values(spec) -> st.SearchStrategy:
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    options = []
    for t in spec.types:
        if t is bool:
            options.append(st.booleans())
        elif t is int:
            options.append(st.integers(0 if spec.nonnegative else INT64_MIN, UINT64_MAX))
        elif t is float:
            options.append(st.floats(min_value=0.0) | st.sampled_from([-0.0, math.nan]) if spec.nonnegative
                           else st.floats())  # what "non-negative" lets through: -0.0 and NaN too
        elif t is str:
            options.append(st.from_regex(spec.pattern, fullmatch=True) if spec.pattern else st.text(max_size=30))
        elif t is list:
            options.append(st.lists(plain, max_size=4))
        elif t is dict:
            options.append(st.dictionaries(st.text(max_size=8), plain, max_size=4))
        else:
            raise AssertionError(f"no strategy for field type {t}")
    return st.one_of(options)


# Fields whose schema check asks for more than their type.
FIELD_OVERRIDES = {
    (HELLO, "frame_shape"): st.lists(st.integers(1, 96), min_size=1, max_size=4),
    (HELLO, "action_dim"): st.integers(0, 64),
    (HEARTBEAT, "alerts"): st.lists(st.text(max_size=MAX_ALERT_CHARS), max_size=MAX_ALERTS),
    (HEARTBEAT, "detail"): st.text(max_size=MAX_DETAIL_CHARS),
}


@st.composite
def valid_fields(draw, msg_type: str) -> dict:
    fields = {}
    for name, spec in SCHEMAS[msg_type].fields.items():
        if not spec.required:
            choice = draw(st.sampled_from(["absent", "none", "value"]))
            if choice == "absent":
                continue
            if choice == "none":
                fields[name] = None
                continue
        fields[name] = draw(FIELD_OVERRIDES.get((msg_type, name), field_values(spec)))
    return fields


def filled(draw, shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if np.dtype(dtype).kind == "f":
        a = rng.standard_normal(shape).astype(dtype)
        if a.size and draw(st.booleans()):
            a.flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -0.0]))
        return a
    return rng.integers(0, 256, shape, dtype=np.uint8)


@st.composite
def valid_arrays(draw, msg_type: str) -> dict:
    if msg_type == STEPS:
        n = draw(st.one_of(st.integers(1, 6), st.just(MAX_BATCH)))
        frame = tuple(draw(st.lists(st.integers(0 if n < MAX_BATCH else 1, 4), min_size=1, max_size=4)))
        action_dim = draw(st.integers(0, 3))
        return {"first": filled(draw, (n,), np.uint8), "frames": filled(draw, (n,) + frame,
                                                                         draw(st.sampled_from(["|u1", "<f4"]))),
                "actions": filled(draw, (n, action_dim), "<f4"), "rewards": filled(draw, (n,), "<f4"),
                "terminated": filled(draw, (n,), np.uint8), "truncated": filled(draw, (n,), np.uint8)}
    schema = SCHEMAS[msg_type]
    if schema.arrays is ARRAYS_ANY:  # weights: named float32 tensors of any shape, scalars and empties too
        names = draw(st.lists(st.text(max_size=12), min_size=1, max_size=4, unique=True))
        shapes = [tuple(draw(st.lists(st.integers(0, 4), max_size=5))) for _ in names]
        return {name: filled(draw, shape, "<f4") for name, shape in zip(names, shapes)}
    assert not schema.arrays, f"no array strategy for {msg_type}"
    return {}


@st.composite
def valid_messages(draw, msg_type: str | None = None):
    msg_type = msg_type or draw(st.sampled_from(sorted(SCHEMAS)))
    return msg_type, draw(valid_fields(msg_type)), draw(valid_arrays(msg_type))


# -- Mutations of valid messages ----------------------------------------------------------------------

DTYPES = ["|u1", "<f4", "<f8", ">f4", "=f4", "f4", "float32", "|b1", "<i8", ">u8", "|O", "O", "|V8", "<U4",
          "<M8[s]", "", "|u0", "<f4\x00"]
SHAPE_ITEMS = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-3, 1100), st.booleans(), st.floats(),
                        st.none(), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=2))
# Shapes whose element count overflows int64 (or wraps to a small number) against tiny frames.
HUGE_SHAPES = [[2 ** 32, 2 ** 32], [2 ** 62 + 1, 4], [2 ** 64 - 1, 2 ** 64 - 1, 4], [2 ** 63, 2], [2 ** 64 - 1],
               [2 ** 63 - 1, 2 ** 63 - 1], [2 ** 21] * 5, [2 ** 40, 0], [0, 2 ** 64 - 1], [1024, 2 ** 32 + 1, 2 ** 32],
               [2 ** 31] * 4 + [4], [3, 2 ** 63 + 3]]


def mutate_field(draw, header, payload, schema):
    key = draw(st.sampled_from(sorted(schema.fields)))
    header[key] = draw(st.one_of(scalars, values, st.lists(SHAPE_ITEMS, max_size=6), any_values))


def mutate_drop_key(draw, header, payload, schema):
    if header:
        del header[draw(st.sampled_from(list(header)))]


def mutate_extra_key(draw, header, payload, schema):
    key = draw(st.one_of(wire_keys, st.sampled_from(sorted(schema.fields) + ["v", "type", "arrays"]).map(str.encode)))
    if draw(st.sampled_from([False, False, False, True])):
        key = draw(keys)  # an int, None, float... key: msgpack refuses the header
    header[key] = draw(values)


def mutate_bytes_key(draw, header, payload, schema):
    str_keys = [k for k in header if isinstance(k, str)]
    if str_keys:
        key = draw(st.sampled_from(str_keys))
        header[key.encode()] = header.pop(key)


def mutate_version(draw, header, payload, schema):
    header["v"] = draw(st.sampled_from([0, 2, -1, 1.0, True, "1", b"\x01", None, [1], 2 ** 64 - 1]))


def mutate_type(draw, header, payload, schema):
    header["type"] = draw(st.one_of(st.sampled_from(sorted(SCHEMAS)), st.sampled_from(sorted(SCHEMAS)).map(str.encode),
                                    st.text(max_size=10), ints, st.none()))


def mutate_spec(draw, header, payload, schema):
    specs = header.get("arrays")
    if not isinstance(specs, list) or not specs:
        header["arrays"] = draw(st.lists(st.lists(values, max_size=4), max_size=3))
        return
    i = draw(st.integers(0, len(specs) - 1))
    spec = specs[i] if isinstance(specs[i], list) and len(specs[i]) == 3 else ["x", "<f4", [1]]
    what = draw(st.sampled_from(["shape", "dtype", "fit_huge", "huge", "name", "spec", "length"]))
    if what == "name":
        names = [s[0] for s in specs if isinstance(s, list) and s] or ["first"]
        spec[0] = draw(st.one_of(st.sampled_from(names), st.text(max_size=8), st.binary(max_size=8), ints))
    elif what == "dtype":
        spec[1] = draw(st.one_of(st.sampled_from(DTYPES), st.text(max_size=6), st.binary(max_size=4), ints))
    elif what == "shape":
        spec[2] = draw(st.one_of(st.lists(SHAPE_ITEMS, max_size=7), st.lists(st.integers(0, 8), max_size=7),
                                 values))
    elif what in ("huge", "fit_huge"):
        spec[2] = list(draw(st.sampled_from(HUGE_SHAPES)))
        if what == "fit_huge" and i < len(payload):  # a frame as big as the int64-wrapped element count
            itemsize = np.dtype(spec[1]).itemsize if spec[1] in ("|u1", "<f4") else 4
            wrapped = int(np.prod(np.array(spec[2], dtype=np.uint64), dtype=np.uint64)) % 2 ** 64
            wrapped = wrapped - 2 ** 64 if wrapped >= 2 ** 63 else wrapped
            if 0 <= wrapped * itemsize <= 4096:
                payload[i] = bytes(wrapped * itemsize)
    elif what == "spec":
        spec = draw(values)
    else:
        spec = (spec + draw(st.lists(values, min_size=1, max_size=2)) if draw(st.booleans())
                else spec[:draw(st.integers(0, 2))])
    specs[i] = spec


def mutate_spec_list(draw, header, payload, schema):
    specs = header.get("arrays")
    if not isinstance(specs, list):
        return
    what = draw(st.sampled_from(["drop", "duplicate", "append"]))
    if what == "drop" and specs:
        del specs[draw(st.integers(0, len(specs) - 1))]
    elif what == "duplicate" and specs:
        specs.append(specs[draw(st.integers(0, len(specs) - 1))])
    elif what == "append":
        specs.append([draw(st.text(max_size=8)), draw(st.sampled_from(DTYPES)),
                      draw(st.lists(st.integers(0, 4), max_size=3))])


def mutate_payload(draw, header, payload, schema):
    what = draw(st.sampled_from(["shorten", "extend", "random", "drop", "add", "empty"]))
    if what == "add" or not payload:
        payload.insert(draw(st.integers(0, len(payload))), draw(st.binary(max_size=64)))
        return
    i = draw(st.integers(0, len(payload) - 1))
    if what == "shorten":
        payload[i] = payload[i][:draw(st.integers(0, max(0, len(payload[i]) - 1)))]
    elif what == "extend":
        payload[i] = payload[i] + draw(st.binary(min_size=1, max_size=9))
    elif what == "random":
        payload[i] = draw(st.binary(max_size=64))
    elif what == "drop":
        del payload[i]
    else:
        payload[i] = b""


# Array specs get the most weight: their checks guard the allocations.
MUTATIONS = [mutate_spec, mutate_spec, mutate_spec, mutate_payload, mutate_field, mutate_spec_list, mutate_payload,
             mutate_drop_key, mutate_extra_key, mutate_bytes_key, mutate_version, mutate_type]


def header_of(msg_type: str, fields: dict, arrays: dict) -> tuple[dict, list]:
    """The header map and payload frames encode would build, without going through encode."""
    header = {"v": PROTOCOL_VERSION, "type": msg_type, **fields,
              "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}
    return header, [a.tobytes() for a in arrays.values()]


@st.composite
def mutated_messages(draw):
    # Mostly the messages that declare shapes: arrays (steps, weights) or the frame shape (hello).
    msg_type, fields, arrays = draw(valid_messages(draw(st.sampled_from([STEPS, WEIGHTS, HELLO, None]))))
    header, payload = header_of(msg_type, fields, arrays)
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        mutation(draw, header, payload, SCHEMAS[msg_type])
    head = pack(draw, header)
    if draw(st.sampled_from([False] * 9 + [True])) and head:  # flip a few header bytes, or cut it short
        head = bytearray(head)
        for _ in range(draw(st.integers(1, 3))):
            head[draw(st.integers(0, len(head) - 1))] = draw(st.integers(0, 255))
        head = bytes(head[:draw(st.integers(0, len(head)))] if draw(st.booleans()) else head)
    return as_frames(draw, [head] + payload)


# -- Properties ---------------------------------------------------------------------------------------
# The @example inputs after a comment are ones the fuzzer found breaking the codec, kept as regressions;
# the others are edge cases worth running every time.


@pytest.mark.timeout(TIMEOUT)
@runs(300)
@given(st.lists(st.binary(max_size=80), max_size=6))
@example([])
@example([b"\xc1"])
@example([b"\x91" * 2000 + b"\xc0"])  # nested past msgpack's stack
@example([b"x" * (MAX_HEADER_BYTES + 1)])
def test_random_bytes_decode_or_raise_protocol_error(frames):
    check_decode(frames)


@st.composite
def random_headers(draw):
    header = draw(st.one_of(st.dictionaries(keys, any_values, max_size=6), st.dictionaries(wire_keys, values),
                            any_values))
    if isinstance(header, dict) and draw(st.booleans()):  # often get past the version and type checks
        header = {"v": PROTOCOL_VERSION, "type": draw(st.sampled_from(sorted(SCHEMAS))), **header}
    return as_frames(draw, [pack(draw, header)] + draw(st.lists(st.binary(max_size=32), max_size=4)))


@pytest.mark.timeout(TIMEOUT)
@runs(300)
@given(random_headers())
# found: unknown keys of both str and bytes; sorting them for the error message raised TypeError
@example([msgpack.packb({"v": 1, "type": "control_reply", "": None, b"": None}, use_bin_type=True)])
def test_random_msgpack_headers_decode_or_raise_protocol_error(frames):
    check_decode(frames)


def _steps_arrays(n: int, action_dim: int) -> dict:
    return {"first": np.ones(n, np.uint8), "frames": np.zeros((n, 1, 2), np.uint8),
            "actions": np.zeros((n, action_dim), np.float32), "rewards": np.zeros(n, np.float32),
            "terminated": np.zeros(n, np.uint8), "truncated": np.zeros(n, np.uint8)}


STEPS_FIELDS = {"worker": "w", "incarnation": 0, "seq": 0, "env_steps": 2}


def _steps_frames(shape, frame_bytes) -> list:
    """A valid steps message whose ``actions`` spec declares ``shape`` over ``frame_bytes``."""
    header, payload = header_of(STEPS, STEPS_FIELDS, _steps_arrays(2, action_dim=2))
    header["arrays"][2][2] = shape
    payload[2] = frame_bytes
    return [msgpack.packb(header, use_bin_type=True)] + payload


def _hello_frames(frame_shape, action_dim=2) -> list:
    return [msgpack.packb({"v": PROTOCOL_VERSION, "type": HELLO, "worker": "w", "slot": 0, "incarnation": 0,
                           "frame_shape": frame_shape, "frame_dtype": "<f4", "action_dim": action_dim})]


WEIGHTS_HEADER = {"v": PROTOCOL_VERSION, "type": WEIGHTS, "version": 0, "updates": 0}


@pytest.mark.timeout(TIMEOUT)
@runs(700)
@given(mutated_messages())
# found: element counts computed in int64 wrapped; reshape of the real frame raised ValueError
@example(_steps_frames([2 ** 32, 2 ** 32], b""))  # wraps to 0 elements
@example(_steps_frames([2 ** 62 + 1, 4], bytes(16)))  # wraps to 4 elements, exactly the frame
@example(_steps_frames([2 ** 64 - 1, 2 ** 64 - 1, 2], bytes(8)))  # uint64 sizes: (-1) * (-1) * 2
# found: zero elements, but a size numpy cannot hold; reshape raised ValueError
@example([msgpack.packb({**WEIGHTS_HEADER, "arrays": [["", "<f4", [0, 2 ** 64 - 1]]]}), b""])
# found: hello frame shapes the learner cannot build from (it indexes frame_shape[0], sizes its replay by it)
@example(_hello_frames([]))
@example(_hello_frames([2 ** 40, 2 ** 40]))
@example(_hello_frames(["3", None]))
@example(_hello_frames([3], action_dim=2 ** 63))
def test_mutated_schema_messages_decode_or_raise_protocol_error(frames):
    check_decode(frames)


@st.composite
def huge_shape_messages(draw):
    msg_type, fields, arrays = draw(valid_messages(draw(st.sampled_from([STEPS, WEIGHTS]))))
    header, payload = header_of(msg_type, fields, arrays)
    i = draw(st.integers(0, len(payload) - 1))
    header["arrays"][i][2] = draw(st.one_of(
        st.sampled_from(HUGE_SHAPES), st.lists(st.integers(2 ** 16, UINT64_MAX), min_size=1, max_size=5),
        st.lists(st.sampled_from([2 ** 16, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 0]),
                 min_size=1, max_size=5)))  # a 0 among huge sizes: no elements, but no numpy shape either
    payload[i] = bytes(draw(st.sampled_from([0, 1, 4, 8, 16, 64])))
    return as_frames(draw, [pack(draw, header)] + payload)


@pytest.mark.timeout(TIMEOUT)
@runs(150)
@given(huge_shape_messages())
# found: int64 count wrapped to 0; a 0 among sizes numpy cannot hold (both ValueError from reshape)
@example([msgpack.packb({**WEIGHTS_HEADER, "arrays": [["w", "<f4", [2 ** 32, 2 ** 32]]]}), b""])
@example([msgpack.packb({**WEIGHTS_HEADER, "arrays": [["w", "<f4", [0, 2 ** 62, 2 ** 62]]]}), b""])
def test_huge_declared_shapes_allocate_nothing(frames):
    tracemalloc.start()
    try:
        check_decode(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"decode peaked at {peak} bytes for {sum(len(f) for f in frames)} bytes of frames"


@pytest.mark.timeout(TIMEOUT)
@runs(500)
@given(valid_messages())
# found: encode's memoryview.cast raised TypeError on an array with a 0 in its shape
@example((STEPS, STEPS_FIELDS, _steps_arrays(2, action_dim=0)))
@example((WEIGHTS, {"version": 0, "updates": 0}, {"": np.zeros((0, 0), np.float32)}))
# found: encode's ascontiguousarray sent a 0-d tensor as shape [1]
@example((WEIGHTS, {"version": 0, "updates": 0}, {"log_alpha": np.array(0.5, np.float32)}))
def test_every_message_type_round_trips(message):
    msg_type, fields, arrays = message
    frames = encode(msg_type, fields, arrays)
    for received in (frames, [bytes(f) for f in frames]):  # in process, and as copies off the wire
        msg = check_decode(received)
        assert msg is not None
        assert msg.type == msg_type and same(msg.fields, fields), (msg.fields, fields)
        assert list(msg.arrays) == list(arrays)
        for name, a in arrays.items():
            got = msg.arrays[name]
            assert got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes(), name


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("msg_type", sorted(SCHEMAS))
@runs(10)
@given(data=st.data())
def test_every_message_type_has_a_strategy_and_round_trips(msg_type, data):
    """A new message type needs its arrays described in valid_arrays."""
    _, fields, arrays = data.draw(valid_messages(msg_type))
    msg = check_decode(encode(msg_type, fields, arrays))
    assert msg is not None and msg.type == msg_type
