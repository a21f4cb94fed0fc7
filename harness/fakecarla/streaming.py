"""The streaming server: sensor data and world states, CARLA's framing.

A client connects to the port named in a stream token, sends the stream id as a
little-endian u32, then reads ``[u32 length][payload]`` messages for as long as it likes.
Several clients may subscribe to the same stream. Each subscriber has its own sender
thread and queue so that a slow reader never stalls the simulation.
"""

import collections
import logging
import socket
import struct
import threading
import time

from .rpc import listening_socket

log = logging.getLogger("fakecarla.streaming")

MAX_QUEUED = 64  # messages; older ones are dropped for a reader that falls behind


class _Subscriber:
    def __init__(self, conn, stream_id, on_close):
        self.conn = conn
        self.stream_id = stream_id
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.sending = False
        self.on_close = on_close
        threading.Thread(target=self._run, name=f"stream-{stream_id}", daemon=True).start()

    def push(self, payload):
        with self.cond:
            if len(self.queue) >= MAX_QUEUED:
                self.queue.popleft()
            self.queue.append(payload)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()

    def _run(self):
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    payload = self.queue.popleft()
                    self.sending = True
                self.conn.sendall(struct.pack("<I", len(payload)) + payload)
                self.sending = False
        except OSError:
            pass
        finally:
            self.on_close(self)


class StreamingServer:
    def __init__(self, port, answer=True, on_subscribe=None):
        """on_subscribe(stream_id) -> optional payload to send right away."""
        self.answer = answer
        self.on_subscribe = on_subscribe
        self.sock = listening_socket(port)
        self.port = self.sock.getsockname()[1]
        self._subs = {}  # stream id -> set of subscribers
        self._pending = {}  # stream id -> messages kept for an expected subscriber
        self._lock = threading.Lock()
        self._closed = False
        self._idle = []

    def start(self):
        threading.Thread(target=self._accept_loop, name="stream-accept", daemon=True).start()

    def close(self):
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for s in subs:
            s.close()
        for c in self._idle:
            c.close()

    def flush(self, timeout):
        """Wait (up to timeout seconds) until every queued message has been written."""
        deadline = time.monotonic() + timeout
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for s in subs:
            while (s.queue or s.sending) and not s.closed and time.monotonic() < deadline:
                time.sleep(0.01)

    def expect(self, stream_id):
        """A client is about to subscribe (it asked for the stream's token): keep what is
        published meanwhile and hand it over when it connects, so that a sensor's first
        frames after ``listen()`` are not lost to the connection race."""
        with self._lock:
            if not self._subs.get(stream_id):
                self._pending.setdefault(stream_id, collections.deque(maxlen=MAX_QUEUED))

    def has_subscribers(self, stream_id):
        with self._lock:
            return bool(self._subs.get(stream_id)) or stream_id in self._pending

    def publish(self, stream_id, payload):
        with self._lock:
            subs = list(self._subs.get(stream_id, ()))
            if not subs and stream_id in self._pending:
                self._pending[stream_id].append(payload)
        for s in subs:
            s.push(payload)

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.answer:
                self._idle.append(conn)
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b""
        try:
            while len(data) < 4:
                chunk = conn.recv(4 - len(data))
                if not chunk:
                    conn.close()
                    return
                data += chunk
        except OSError:
            conn.close()
            return
        (stream_id,) = struct.unpack("<I", data)
        sub = _Subscriber(conn, stream_id, self._remove)
        with self._lock:
            self._subs.setdefault(stream_id, set()).add(sub)
            for payload in self._pending.pop(stream_id, ()):
                sub.push(payload)
        log.debug("subscribed to stream %d", stream_id)
        if self.on_subscribe is not None:
            first = self.on_subscribe(stream_id)
            if first is not None:
                sub.push(first)

    def _remove(self, sub):
        with self._lock:
            group = self._subs.get(sub.stream_id)
            if group is not None:
                group.discard(sub)
