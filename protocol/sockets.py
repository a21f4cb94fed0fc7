"""Endpoints of a run, socket options, and a receive loop that never raises on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import zmq

from protocol.codec import Message, decode, encode
from protocol.files import atomic_write
from protocol.messages import MAX_MESSAGE_BYTES, ProtocolError

# Unix socket paths are limited to 108 bytes (sun_path); longer run dirs put their
# sockets in a private 0700 directory under the temp dir instead.
_MAX_IPC_PATH = 100

ENDPOINT_NAMES = ("steps", "weights", "heartbeat", "control")


def endpoints_for(run_dir: Path) -> dict[str, str]:
    """The ipc endpoints of a run: inside the run directory when the path fits."""
    run_dir = Path(run_dir).resolve()
    sock_dir = run_dir
    if len(str(run_dir / "heartbeat.sock")) > _MAX_IPC_PATH:
        digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
        sock_dir = Path(tempfile.gettempdir()) / f"rlstack-{digest}"
    return {name: f"ipc://{sock_dir / (name + '.sock')}" for name in ENDPOINT_NAMES}


def prepare_endpoints(run_dir: Path) -> dict[str, str]:
    """Create the socket directory (mode 0700) and record the endpoints in the run dir."""
    eps = endpoints_for(run_dir)
    sock_dir = Path(eps["control"][len("ipc://"):]).parent
    sock_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(sock_dir, 0o700)
    atomic_write(Path(run_dir) / "endpoints.json", json.dumps(eps, indent=2), fsync=False)
    return eps


def load_endpoints(run_dir: Path) -> dict[str, str]:
    path = Path(run_dir) / "endpoints.json"
    if path.exists():
        try:
            eps = json.loads(path.read_text())
            if isinstance(eps, dict) and all(isinstance(eps.get(n), str) for n in ENDPOINT_NAMES):
                return eps
        except (ValueError, UnicodeDecodeError):
            pass  # torn: the endpoints follow from the run directory anyway
    return endpoints_for(run_dir)


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


# What each bound socket legitimately receives, and no more (a peer sending more is disconnected
# before its message is buffered). A PUB socket receives only subscriptions: our workers subscribe to
# everything (one byte), and ZeroMQ's handshake needs a few dozen bytes; a peer with a longer topic is cut
# off before it can grow the socket's subscription table.
SUBSCRIPTION_MAX_BYTES = 64
HEARTBEAT_MAX_BYTES = 64 * 1024
CONTROL_MAX_BYTES = 64 * 1024
# Queues of bound sockets, per connected peer: together with the size limits they bound the memory a
# flood can take (the steps queue is short: workers hold what does not fit, nothing is lost).
STEPS_RCVHWM = 16
HEARTBEAT_RCVHWM = 1000
CONTROL_RCVHWM = 100


def steps_max_bytes(batch_steps: int, max_frame_bytes: int) -> int:
    """The largest steps message a worker sends: a batch of up to ``batch_steps`` entries (and the episode start
    that may close it), each a frame with its action, reward and flags; plus the header."""
    per_entry = max_frame_bytes + 4 * 64 + 16
    return 64 * 1024 + (batch_steps + 2) * per_entry


def make_socket(ctx: zmq.Context, kind: int, *, hwm: int = 1000, max_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    """A socket with the options every socket of the stack carries."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)  # never hang a shutdown on undelivered messages
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # peers sending more are disconnected
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


class Receiver:
    """Receives and decodes messages; malformed ones are dropped, counted and logged (rate-limited)."""

    LOG_EVERY_S = 5.0

    def __init__(self, sock: zmq.Socket, log: Callable[..., None] | None = None):
        self.sock = sock
        self.socks = [sock]  # the learner's steps arrive on ipc and, with learner.listen, on TCP too
        self.authenticated: set[zmq.Socket] = set()  # sockets whose peers come in with a named CurveZMQ key
        self.log = log
        self.dropped: Counter[str] = Counter()
        self.received = 0
        self._last_log: dict[str, float] = {}
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def add(self, sock: zmq.Socket, authenticated: bool = False) -> None:
        """Receive from one more socket as well (the same kind of messages); ``authenticated``: a CurveZMQ server
        whose messages carry the name of the key they came in with (``Message.peer``)."""
        self.socks.append(sock)
        self._poller.register(sock, zmq.POLLIN)
        if authenticated:
            self.authenticated.add(sock)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def recv(self, timeout_ms: int = 0) -> Message | None:
        """One valid message, or None when none arrived in time (bad ones are skipped)."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            ready = self._poller.poll(remaining)
            if not ready:
                return None
            sock = ready[0][0]
            msg = self.decode_frames(sock.recv_multipart(copy=False), sock in self.authenticated)
            if msg is not None:
                self.received += 1
                return msg
            if time.monotonic() >= deadline:
                return None

    def drain(self, limit: int = 1000) -> list[Message]:
        """All messages already waiting, up to ``limit`` (taken from each socket in turn)."""
        out = []
        open_socks = list(self.socks)
        while open_socks and len(out) < limit:
            for sock in list(open_socks):
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    open_socks.remove(sock)
                    continue
                msg = self.decode_frames(frames, sock in self.authenticated)
                if msg is not None:
                    self.received += 1
                    out.append(msg)
                    if len(out) >= limit:
                        break
        return out

    def decode_frames(self, frames, authenticated: bool = False) -> Message | None:
        try:
            msg = decode([f.buffer for f in frames])
            if authenticated:  # the name of the key the peer was let in with (protocol.curve.Gatekeeper)
                msg.peer = frames[0].get("User-Id") or None
            return msg
        except ProtocolError as exc:
            self.drop(exc.reason, exc.detail)
        except Exception as exc:  # a decoder bug must not take the loop down either
            self.drop("decode_error", repr(exc))
        return None

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        now = time.monotonic()
        if self.log is not None and now - self._last_log.get(reason, -1e9) >= self.LOG_EVERY_S:
            self._last_log[reason] = now
            self.log("malformed message dropped", reason=reason, detail=detail, count=self.dropped[reason])


def send(sock: zmq.Socket, msg_type: str, fields: dict | None = None, arrays: dict | None = None,
         flags: int = 0) -> None:
    sock.send_multipart(encode(msg_type, fields, arrays), flags=flags, copy=False)
