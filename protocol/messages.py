"""Message types shared by supervisor, workers and learner, and their schemas.

Each schema lists the header fields (with their types) and the arrays (with their
allowed dtypes) a message must carry, plus an optional cross-field check. The codec
in :mod:`protocol.codec` enforces them on both ends, raising :class:`ProtocolError`
(defined here, with the schema, so that the checks below need no import of the codec).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.roles import LEARNER, WORKER
from protocol.states import STARTING

# Bump on any incompatible change; a peer speaking another version is dropped.
PROTOCOL_VERSION = 1

HELLO = "hello"
STEPS = "steps"
EPISODE = "episode"
WEIGHTS = "weights"
PROGRESS = "progress"
HEARTBEAT = "heartbeat"
CONTROL_REQUEST = "control_request"
CONTROL_REPLY = "control_reply"

# Phases a process reports in its heartbeat. The supervisor expects progress
# (a growing step counter) only in the phases listed in PROGRESSING_PHASES.
PHASE_STARTING = STARTING  # a process's first phase bears the name of the state the supervisor holds it in
PHASES = (PHASE_STARTING, "connecting", "resetting", "stepping", "evaluating", "waiting_learner", "training",
          "waiting_data", "closing")
PROGRESSING_PHASES = frozenset({"resetting", "stepping", "evaluating"})
LEARNER_PROGRESSING_PHASES = frozenset({"training"})
STARTUP_PHASES = frozenset({PHASE_STARTING, "connecting"})

CONTROL_COMMANDS = ("status", "restart", "stop", "chaos")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Frames are at most 4 x 512 x 512 x 3 bytes per step; batches hold at most MAX_BATCH steps.
MAX_BATCH = 1024
MAX_STEPS_BYTES = 256 * 1024 * 1024
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024
MAX_MESSAGE_BYTES = MAX_WEIGHTS_BYTES + 1024 * 1024


@dataclass(frozen=True)
class FieldSpec:
    types: tuple
    required: bool = True
    choices: tuple | None = None
    nonnegative: bool = False
    pattern: str | None = None  # a string must match it whole

    def accepts(self, value: Any) -> bool:
        if value is None:
            return not self.required
        if isinstance(value, bool) and bool not in self.types:
            return False
        if not isinstance(value, self.types):
            return False
        if self.choices is not None and value not in self.choices:
            return False
        if self.nonnegative and isinstance(value, (int, float)) and value < 0:
            return False
        if self.pattern is not None and not (isinstance(value, str) and re.fullmatch(self.pattern, value)):
            return False
        return True

    def describe(self) -> str:
        names = "/".join(t.__name__ for t in self.types)
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.pattern:
            return f"a {names} matching {self.pattern}"
        return f"a {'non-negative ' if self.nonnegative else ''}{names}"


ARRAYS_ANY = object()


@dataclass(frozen=True)
class MessageSchema:
    name: str
    fields: dict[str, FieldSpec]
    arrays: Any = field(default_factory=dict)  # name -> allowed dtype strings, or ARRAYS_ANY
    any_dtypes: frozenset = frozenset({"<f4"})
    max_bytes: int = 0
    check: Callable | None = None

    def array_dtypes(self, name: str) -> frozenset:
        if self.arrays is ARRAYS_ANY:
            return self.any_dtypes
        return self.arrays.get(name, frozenset())


def _f(*types, **kw) -> FieldSpec:
    return FieldSpec(types, **kw)


_INT = (int,)
_NUM = (int, float)
_STR = (str,)
MAX_HOSTS = 64  # rows of the learner's hosts table (and workers per host) it keeps and `status` shows
# A worker as the learner knows it: worker-N of this run, or HOST:worker-N of a host whose learner runs elsewhere
# (names are shown by status and keyed in the replay index: short, and nothing a terminal would act on).
HOST_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
WORKER_NAME = rf"(?:{HOST_NAME}:)?[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"
# A worker process's own stream id: a restarted host's worker-0 incarnation 0 is another stream than the last one's.
SESSION = r"[0-9a-f]{8,16}"


def _check_steps(msg) -> None:
    a = msg.arrays
    n = a["first"].shape[0] if a["first"].ndim == 1 else -1
    if not 1 <= n <= MAX_BATCH:
        raise ProtocolError("bad_shape", f"steps: batch of {n} steps, expected 1..{MAX_BATCH}")
    for name in ("rewards", "terminated", "truncated"):
        if a[name].shape != (n,):
            raise ProtocolError("bad_shape", f"steps.{name}: shape {a[name].shape}, expected ({n},)")
    if a["actions"].ndim != 2 or a["actions"].shape[0] != n:
        raise ProtocolError("bad_shape", f"steps.actions: shape {a['actions'].shape}, expected ({n}, action_dim)")
    if a["frames"].ndim < 2 or a["frames"].shape[0] != n:
        raise ProtocolError("bad_shape", f"steps.frames: shape {a['frames'].shape}, expected ({n}, *frame_shape)")


def _check_hello(msg) -> None:
    # The learner sizes its replay and networks from these: one step's frame and action must fit a steps message.
    shape = msg["frame_shape"]
    if not (1 <= len(shape) <= 4 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ProtocolError("bad_field", f"hello.frame_shape: {shape!r:.80} is not 1 to 4 positive sizes")
    itemsize = {"|u1": 1, "<f4": 4}[msg["frame_dtype"]]
    if math.prod(shape) * itemsize > MAX_STEPS_BYTES or msg["action_dim"] * 4 > MAX_STEPS_BYTES:
        raise ProtocolError("bad_field", f"hello: frame_shape {shape} or action_dim {msg['action_dim']} "
                                         f"exceeds a steps message ({MAX_STEPS_BYTES} bytes)")


# A heartbeat names at most this many recent alerts, each a short "level:rule@update" string.
MAX_ALERTS = 20
MAX_ALERT_CHARS = 200
MAX_DETAIL_CHARS = 1000


def _check_heartbeat(msg) -> None:
    alerts = msg.get("alerts") or []
    if len(alerts) > MAX_ALERTS or not all(isinstance(a, str) and len(a) <= MAX_ALERT_CHARS for a in alerts):
        raise ProtocolError("bad_field", f"heartbeat.alerts: at most {MAX_ALERTS} strings of {MAX_ALERT_CHARS} chars")
    if len(msg.get("detail") or "") > MAX_DETAIL_CHARS:
        raise ProtocolError("bad_field", f"heartbeat.detail: longer than {MAX_DETAIL_CHARS} chars")


def _check_weights(msg) -> None:
    if not msg.arrays:
        raise ProtocolError("bad_arrays", "weights: no tensors")


SCHEMAS: dict[str, MessageSchema] = {
    s.name: s
    for s in [
        MessageSchema(HELLO, {
            "worker": _f(*_STR, pattern=WORKER_NAME), "slot": _f(*_INT, nonnegative=True),
            "incarnation": _f(*_INT, nonnegative=True),
            "frame_shape": _f(list), "frame_dtype": _f(*_STR, choices=("|u1", "<f4")),
            "action_dim": _f(*_INT, nonnegative=True),
        }, check=_check_hello),
        MessageSchema(STEPS, {
            "worker": _f(*_STR, pattern=WORKER_NAME), "incarnation": _f(*_INT, nonnegative=True),
            "seq": _f(*_INT, nonnegative=True), "env_steps": _f(*_INT, nonnegative=True),
            "session": _f(*_STR, required=False, pattern=SESSION),
        }, arrays={
            "first": frozenset({"|u1"}), "frames": frozenset({"|u1", "<f4"}),
            "actions": frozenset({"<f4"}), "rewards": frozenset({"<f4"}),
            "terminated": frozenset({"|u1"}), "truncated": frozenset({"|u1"}),
        }, max_bytes=MAX_STEPS_BYTES, check=_check_steps),
        MessageSchema(EPISODE, {
            "worker": _f(*_STR, pattern=WORKER_NAME), "incarnation": _f(*_INT, nonnegative=True),
            "reward": _f(*_NUM), "length": _f(*_INT, nonnegative=True),
            "eval": _f(bool), "env_steps": _f(*_INT, nonnegative=True),
            "reason": _f(*_STR, required=False),  # why it ended: collision, route_done, time_limit, ...
        }),
        MessageSchema(WEIGHTS, {
            "version": _f(*_INT, nonnegative=True), "updates": _f(*_INT, nonnegative=True),
        }, arrays=ARRAYS_ANY, max_bytes=MAX_WEIGHTS_BYTES, check=_check_weights),
        MessageSchema(PROGRESS, {
            "updates": _f(*_INT, nonnegative=True), "received": _f(*_INT, nonnegative=True),
            "allowed": _f(*_INT, nonnegative=True), "done": _f(bool),
            "streams": _f(dict),
        }),
        MessageSchema(HEARTBEAT, {
            "name": _f(*_STR), "role": _f(*_STR, choices=(LEARNER, WORKER)),
            "pid": _f(*_INT, nonnegative=True), "incarnation": _f(*_INT, nonnegative=True),
            "phase": _f(*_STR, choices=PHASES), "phase_age_s": _f(*_NUM, nonnegative=True),
            "env_steps": _f(*_INT, nonnegative=True), "episodes": _f(*_INT, nonnegative=True),
            "updates": _f(*_INT, nonnegative=True), "frame": _f(*_INT, required=False),
            "eval_steps": _f(*_INT, nonnegative=True, required=False),
            "steps_per_s": _f(*_NUM, nonnegative=True), "rss_bytes": _f(*_INT, nonnegative=True),
            "sent_at": _f(*_NUM), "alerts": _f(list, required=False),
            "detail": _f(*_STR, required=False),  # why it cannot progress, when it knows
            "dropped": _f(*_INT, nonnegative=True, required=False),  # messages it dropped as malformed/unwanted
            "resumed_from": _f(*_INT, nonnegative=True, required=False),  # the count its saved state held
            "refused": _f(*_INT, nonnegative=True, required=False),  # connections refused for a key not allowed
            "hosts": _f(list, required=False),  # the learner: [{host, slots, steps, last_seen_s}], MAX_HOSTS rows
            "weights": _f(*_INT, nonnegative=True, required=False),  # a worker: the learner's weights it acts with
        }, check=_check_heartbeat),
        MessageSchema(CONTROL_REQUEST, {
            "cmd": _f(*_STR, choices=CONTROL_COMMANDS), "name": _f(*_STR, required=False),
            "fault": _f(*_STR, required=False), "options": _f(dict, required=False),  # chaos: the fault, its options
        }),
        MessageSchema(CONTROL_REPLY, {
            "ok": _f(bool), "error": _f(*_STR, required=False), "data": _f(dict, required=False),
        }),
    ]
}
