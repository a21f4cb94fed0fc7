"""The wire codec: msgpack headers followed by raw array buffers, validated on decode.

A message is a list of ZeroMQ frames. Frame 0 is a msgpack map
``{"v": PROTOCOL_VERSION, "type": ..., <fields>, "arrays": [[name, dtype, shape], ...]}``;
frame k+1 holds the raw bytes of array k. Nothing is pickled. Decoding checks the
version, the type, every field's type, and each array's dtype, shape and byte size
against the schema in :mod:`protocol.messages`, and raises
:class:`~protocol.messages.ProtocolError` naming what is wrong; receive loops
catch it, count it and go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from protocol.messages import (
    ARRAYS_ANY,
    PROTOCOL_VERSION,
    SCHEMAS,
    MessageSchema,
    ProtocolError,
)

if TYPE_CHECKING:  # numpy is imported where arrays are met: a control request or a heartbeat has none
    import numpy as np

# Headers are small maps; anything bigger is garbage or an attack.
MAX_HEADER_BYTES = 64 * 1024


@dataclass
class Message:
    type: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    peer: str | None = None  # who the transport says sent it: the name of the CurveZMQ key it came in with

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(msg_type: str, fields: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> list:
    """Build the frames of one message; validates it as the receiver would."""
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError("unknown_type", f"cannot encode unknown message type {msg_type!r}")
    fields = dict(fields or {})
    if arrays:
        import numpy as np

        # reshape: ascontiguousarray makes a 0-d array 1-d
        arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}
    else:
        arrays = {}
    _check_fields(schema, fields)
    _check_array_set(schema, list(arrays))
    header = {"v": PROTOCOL_VERSION, "type": msg_type, **fields,
              "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}
    msg = Message(msg_type, fields, arrays)
    if schema.check is not None:
        schema.check(msg)
    # flat bytes via numpy: memoryview.cast refuses arrays with a zero in their shape
    return [msgpack.packb(header, use_bin_type=True)] + [memoryview(a.reshape(-1).view("u1"))
                                                         for a in arrays.values()]


def decode(frames: list) -> Message:
    """Parse and validate the frames of one message, or raise ProtocolError."""
    if not frames:
        raise ProtocolError("empty", "message has no frames")
    try:
        size = memoryview(frames[0]).nbytes  # measured before it is copied: a huge junk frame costs nothing
    except TypeError:
        raise ProtocolError("bad_header", f"frame 0 is a {type(frames[0]).__name__}, not bytes") from None
    if size > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"header is {size} bytes, limit {MAX_HEADER_BYTES}")
    head = bytes(frames[0])
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("bad_msgpack", f"header is not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header is a {type(header).__name__}, not a map")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    msg_type = header.pop("type", None)
    schema = SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown message type {msg_type!r}")
    specs = header.pop("arrays", [])
    _check_fields(schema, header)
    arrays = _decode_arrays(schema, specs, frames[1:])
    msg = Message(msg_type, header, arrays)
    if schema.check is not None:
        schema.check(msg)
    return msg


def _check_fields(schema: MessageSchema, fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(schema.fields)
    if unknown:
        raise ProtocolError("unknown_field", f"{schema.name}: unknown field(s) {sorted(unknown, key=repr)}")
    for name, spec in schema.fields.items():
        if name not in fields:
            if spec.required:
                raise ProtocolError("missing_field", f"{schema.name}: missing field {name!r}")
            continue
        value = fields[name]
        if not spec.accepts(value):
            raise ProtocolError("bad_field", f"{schema.name}.{name}: {value!r:.80} is not {spec.describe()}")


def _check_array_set(schema: MessageSchema, names: list[str]) -> None:
    if schema.arrays is ARRAYS_ANY:
        return
    if sorted(names) != sorted(schema.arrays):
        raise ProtocolError("bad_arrays", f"{schema.name}: arrays {sorted(names)}, expected {sorted(schema.arrays)}")


def _decode_arrays(schema: MessageSchema, specs: Any, payload: list) -> dict[str, np.ndarray]:
    import numpy as np

    if not isinstance(specs, list) or len(specs) != len(payload):
        raise ProtocolError("bad_arrays", f"{schema.name}: array list does not match the {len(payload)} payload frames")
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for spec, frame in zip(specs, payload):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and isinstance(spec[1], str) and isinstance(spec[2], list)):
            raise ProtocolError("bad_arrays", f"{schema.name}: array spec {spec!r:.80} is not [name, dtype, shape]")
        name, dtype_str, shape = spec
        if name in arrays:
            raise ProtocolError("bad_arrays", f"{schema.name}: array {name!r} given twice")
        allowed = schema.array_dtypes(name)
        if dtype_str not in allowed:
            raise ProtocolError("bad_dtype", f"{schema.name}.{name}: dtype {dtype_str!r} not in {sorted(allowed)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape) or len(shape) > 5:
            raise ProtocolError("bad_shape", f"{schema.name}.{name}: shape {shape!r:.80} is not a list of sizes")
        dtype = np.dtype(dtype_str)
        count = math.prod(shape)  # exact: an int64 product of huge sizes wraps to a small count
        if math.prod(d for d in shape if d) * dtype.itemsize > schema.max_bytes:  # numpy refuses [0, 2**63]
            raise ProtocolError("too_large", f"{schema.name}.{name}: shape {shape} exceeds {schema.max_bytes} bytes")
        total += count * dtype.itemsize
        if total > schema.max_bytes:
            raise ProtocolError("too_large", f"{schema.name}: arrays exceed {schema.max_bytes} bytes")
        buf = memoryview(frame)
        if buf.nbytes != count * dtype.itemsize:
            raise ProtocolError("bad_size",
                                f"{schema.name}.{name}: {buf.nbytes} bytes for shape {shape} of {dtype_str}")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    _check_array_set(schema, list(arrays))
    return arrays
