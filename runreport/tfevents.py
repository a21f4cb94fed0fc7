"""TensorBoard event files without TensorBoard: scalars out of TFRecord files, and a small writer for tests.

A TFRecord file is a run of records: ``uint64 length``, ``uint32 masked crc32c of
the length``, ``data``, ``uint32 masked crc32c of the data`` (little-endian). The
data is an ``Event`` protobuf: ``wall_time`` (1, double), ``step`` (2, int64),
``summary`` (5) whose ``value`` (1, repeated) each hold a ``tag`` (1) and either
``simple_value`` (2, float) or a ``tensor`` (8, a ``TensorProto``: ``dtype`` 1,
``tensor_content`` 4, ``float_val`` 5, ``double_val`` 6, ``int_val`` 7,
``int64_val`` 10). ``torch.utils.tensorboard.SummaryWriter.add_scalar`` writes
``simple_value``, or a tensor with ``float_val`` when ``new_style=True``.

Reading stops quietly at a torn record (a learner killed mid-write): a short
header or body, or a length whose crc does not match. The data crc is not
checked by default (crc32c in pure Python would be most of the read time); an
``Event`` that does not parse is skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_CRC_TABLE: list[int] = []


def _crc_table() -> list[int]:
    if not _CRC_TABLE:
        poly = 0x82F63B78  # Castagnoli, reflected
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ poly if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE


def crc32c(data: bytes) -> int:
    table = _crc_table()
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- protobuf, just enough ------------------------------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of each field; length-delimited values as (start, end) offsets."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = (pos, pos + n)
            pos += n
        elif wire == 5:
            value = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field past the end")
        yield num, wire, value


_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_INT64, _DT_HALF = 1, 2, 3, 9, 19


def _tensor_value(buf: bytes, start: int, end: int) -> float | None:
    dtype = _DT_FLOAT
    content = None
    value = None
    for num, wire, v in _fields(buf, start, end):
        if num == 1 and wire == 0:
            dtype = v
        elif num == 4 and wire == 2:
            content = buf[v[0]:v[1]]
        elif num == 5:  # float_val: packed or not
            if wire == 2 and v[1] - v[0] >= 4:
                value = struct.unpack_from("<f", buf, v[0])[0]
            elif wire == 5:
                value = struct.unpack("<f", v)[0]
        elif num == 6:  # double_val
            if wire == 2 and v[1] - v[0] >= 8:
                value = struct.unpack_from("<d", buf, v[0])[0]
            elif wire == 1:
                value = struct.unpack("<d", v)[0]
        elif num in (7, 10):  # int_val, int64_val
            if wire == 0:
                value = float(v)
            elif wire == 2 and v[1] > v[0]:
                value = float(_varint(buf, v[0])[0])
    if value is None and content:
        fmt = {_DT_FLOAT: "<f", _DT_DOUBLE: "<d", _DT_INT32: "<i", _DT_INT64: "<q", _DT_HALF: "<e"}.get(dtype)
        if fmt and len(content) >= struct.calcsize(fmt):
            value = float(struct.unpack_from(fmt, content)[0])
    return value


def parse_event(buf: bytes) -> tuple[float, int, list[tuple[str, float]]]:
    """(wall_time, step, [(tag, value), ...]) of one Event; raises ValueError if it does not parse."""
    wall, step, values = 0.0, 0, []
    try:
        for num, wire, v in _fields(buf):
            if num == 1 and wire == 1:
                wall = struct.unpack("<d", v)[0]
            elif num == 2 and wire == 0:
                step = v - (1 << 64) if v >= 1 << 63 else v
            elif num == 5 and wire == 2:
                for snum, swire, sv in _fields(buf, *v):
                    if snum != 1 or swire != 2:
                        continue
                    tag, value = None, None
                    for vnum, vwire, vv in _fields(buf, *sv):
                        if vnum == 1 and vwire == 2:
                            tag = buf[vv[0]:vv[1]].decode("utf-8", "replace")
                        elif vnum == 2 and vwire == 5:
                            value = struct.unpack("<f", vv)[0]
                        elif vnum == 8 and vwire == 2:
                            value = _tensor_value(buf, *vv)
                    if tag is not None and value is not None:
                        values.append((tag, value))
    except (IndexError, struct.error) as exc:
        raise ValueError(f"malformed event: {exc}") from None
    return wall, step, values


# -- records -----------------------------------------------------------------------------------------------------

def record_spans(data: bytes, verify_data: bool = False) -> tuple[list[tuple[int, int]], str | None]:
    """Offsets of each whole record's data, and why reading stopped early (None at a clean end)."""
    spans = []
    pos, n = 0, len(data)
    unpack_q, unpack_i = struct.Struct("<Q").unpack_from, struct.Struct("<I").unpack_from
    while pos < n:
        if n - pos < 12:
            return spans, f"torn record header at byte {pos}"
        length = unpack_q(data, pos)[0]
        if unpack_i(data, pos + 8)[0] != masked_crc(data[pos:pos + 8]):
            return spans, f"bad length checksum at byte {pos}"
        start = pos + 12
        end = start + length
        if end + 4 > n:
            return spans, f"torn record at byte {pos} ({n - start} of {length + 4} bytes)"
        if verify_data and unpack_i(data, end)[0] != masked_crc(data[start:end]):
            return spans, f"bad data checksum at byte {pos}"
        spans.append((start, end))
        pos = end + 4
    return spans, None


@dataclass
class Series:
    """One tag's points in step order."""

    steps: np.ndarray
    values: np.ndarray
    wall: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Scalars:
    """Every scalar tag of a run's event files, and what went wrong reading them."""

    series: dict[str, Series] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    records: int = 0

    def get(self, tag: str) -> Series | None:
        s = self.series.get(tag)
        return s if s is not None and len(s) else None

    def tags(self) -> list[str]:
        return sorted(self.series)

    def last_wall_time(self) -> float | None:
        walls = [float(s.wall[-1]) for s in self.series.values() if len(s)]
        return max(walls) if walls else None


def _file_order(path: Path) -> tuple:
    parts = path.name.split(".")  # events.out.tfevents.<time>.<host>...
    try:
        return (int(parts[3]), path.name)
    except (IndexError, ValueError):
        return (0, path.name)


def read_file(path: Path, verify_data: bool = False) -> tuple[dict[str, tuple[list, list, list]], int, str | None]:
    """One event file: per tag (steps, values, wall times) in file order, the record count, a problem or None."""
    data = Path(path).read_bytes()
    spans, problem = record_spans(data, verify_data)
    out: dict[str, tuple[list, list, list]] = {}
    bad = 0
    for start, end in spans:
        try:
            wall, step, values = parse_event(data[start:end])
        except ValueError:
            bad += 1
            continue
        for tag, value in values:
            s = out.get(tag)
            if s is None:
                s = out[tag] = ([], [], [])
            s[0].append(step)
            s[1].append(value)
            s[2].append(wall)
    if bad:
        problem = (problem + "; " if problem else "") + f"{bad} record(s) did not parse"
    return out, len(spans), problem


def read_scalars(tb_dir: Path, verify_data: bool = False) -> Scalars:
    """Every scalar under ``tb_dir`` (its event files, oldest first).

    A restarted learner writes a new file and may log steps again that an earlier
    file already has (it resumed from a checkpoint before them): as TensorBoard
    does, a later file's first step of a tag drops the earlier points at or past it.
    """
    result = Scalars()
    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        return result
    files = sorted((p for p in tb_dir.rglob("events.out.tfevents.*") if p.is_file()), key=_file_order)
    merged: dict[str, tuple[list, list, list]] = {}
    for path in files:
        try:
            per_tag, count, problem = read_file(path, verify_data)
        except OSError as exc:
            result.problems.append(f"{path.name}: {exc.strerror or exc}")
            continue
        result.files.append(path.name)
        result.records += count
        if problem:
            result.problems.append(f"{path.name}: {problem}")
        for tag, (steps, values, walls) in per_tag.items():
            old = merged.get(tag)
            if old is None:
                merged[tag] = (steps, values, walls)
                continue
            first = steps[0]
            if old[0] and old[0][-1] >= first:  # purge what the new incarnation redoes
                keep = np.searchsorted(np.asarray(old[0]), first, side="left") if _sorted(old[0]) else \
                    sum(1 for s in old[0] if s < first)
                del old[0][keep:], old[1][keep:], old[2][keep:]
            old[0].extend(steps)
            old[1].extend(values)
            old[2].extend(walls)
    for tag, (steps, values, walls) in merged.items():
        st = np.asarray(steps, dtype=np.int64)
        va = np.asarray(values, dtype=np.float64)
        wa = np.asarray(walls, dtype=np.float64)
        if len(st) > 1 and np.any(np.diff(st) < 0):
            order = np.argsort(st, kind="stable")
            st, va, wa = st[order], va[order], wa[order]
        result.series[tag] = Series(st, va, wa)
    return result


def _sorted(steps: list) -> bool:
    return all(a <= b for a, b in zip(steps, steps[1:])) if len(steps) < 64 else \
        bool(np.all(np.diff(np.asarray(steps)) >= 0))


# -- writing (tests, benchmarks) --------------------------------------------------------------------------------------

def _enc_varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_len(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def encode_event(wall: float, step: int, values: list[tuple[str, float]] | None = None,
                 file_version: str | None = None, tensor: bool = False) -> bytes:
    """An Event with scalars (as ``simple_value``, or as a float tensor with ``tensor=True``)."""
    out = bytearray(_enc_varint(1 << 3 | 1) + struct.pack("<d", wall))
    if step:
        out += _enc_varint(2 << 3) + _enc_varint(step)
    if file_version is not None:
        out += _enc_len(3, file_version.encode())
    if values:
        summary = bytearray()
        for tag, value in values:
            v = _enc_len(1, tag.encode())
            if tensor:
                proto = _enc_varint(1 << 3) + _enc_varint(_DT_FLOAT) + _enc_len(5, struct.pack("<f", value))
                v += _enc_len(8, proto)
            else:
                v += _enc_varint(2 << 3 | 5) + struct.pack("<f", value)
            summary += _enc_len(1, v)
        out += _enc_len(5, bytes(summary))
    return bytes(out)


def encode_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class EventWriter:
    """Writes scalars to a new event file (for tests and benchmarks; the learner uses TensorBoard's writer)."""

    def __init__(self, tb_dir: Path, start_time: float | None = None, suffix: str = "", tensor: bool = False):
        import socket
        import time

        tb_dir = Path(tb_dir)
        tb_dir.mkdir(parents=True, exist_ok=True)
        self.time = time.time() if start_time is None else start_time
        self.tensor = tensor
        self.path = tb_dir / f"events.out.tfevents.{int(self.time)}.{socket.gethostname()}.{suffix or 0}"
        self.f = open(self.path, "wb")
        self.f.write(encode_record(encode_event(self.time, 0, file_version="brain.Event:2")))

    def add_scalars(self, step: int, values: dict[str, float], wall: float | None = None) -> None:
        """Scalars of one step, one Event each (as SummaryWriter writes them)."""
        wall = self.time if wall is None else wall
        self.f.write(b"".join(encode_record(encode_event(wall, step, [(tag, v)], tensor=self.tensor))
                              for tag, v in values.items()))

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()
