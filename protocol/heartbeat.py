"""Progress heartbeats, sent by every child process to the supervisor from a thread.

A heartbeat thread keeps beating while the main loop is stuck (in C++ or in a
Python wait), so a heartbeat reports *progress*: the phase, how long the process
has been in it, and its counters. The supervisor judges stalls from those.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

import psutil
import zmq

from protocol.exits import EXIT_FATAL
from protocol.messages import HEARTBEAT, MAX_DETAIL_CHARS, PHASE_STARTING, ProtocolError
from protocol.roles import LEARNER
from protocol.sockets import make_socket, send


class Progress:
    """What the main loop did last; written by the main thread, read by the heartbeat thread."""

    def __init__(self):
        self.phase = PHASE_STARTING
        self.phase_since = time.monotonic()
        self.env_steps = 0
        self.episodes = 0
        self.updates = 0
        self.eval_steps = 0  # steps of evaluation episodes: progress too, but not training data
        self.frame: int | None = None
        self.alerts: list[str] = []
        self.detail: str | None = None  # why the process cannot progress, in its own words, for `status`
        self.dropped = 0  # malformed or unwanted messages this process dropped (its receivers' counts)
        self.resumed_from: int | None = None  # the learner: the update count of the checkpoint it resumed from
        self.refused = 0  # the learner: connections turned away because the host's key is not allowed (CurveZMQ)
        self.hosts: list[dict] = []  # the learner on TCP: each sending host, its slots, steps and when last seen
        self.weights: int | None = None  # a worker: the version of the learner's weights it acts with (None: its own)

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            # the clock first: a beat between the two reads the old phase as just entered (harmless), never the
            # new one with the old phase's age (a startup deadline missed by a beat's mistake)
            self.phase_since = time.monotonic()
            self.phase = phase


class HeartbeatSender(threading.Thread):
    """Beats every ``interval_s``; ends the process when its parent (the supervisor) is gone."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, name: str, role: str, incarnation: int,
                 progress: Progress, interval_s: float, watch_parent: bool = True):
        super().__init__(name=f"heartbeat-{name}", daemon=True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.fields = {"name": name, "role": role, "pid": os.getpid(), "incarnation": incarnation}
        self.progress = progress
        self.interval_s = interval_s
        self.parent_pid = os.getppid() if watch_parent else None
        self._stop_event = threading.Event()
        self._proc = psutil.Process()
        self._rate_window: deque[tuple[float, int]] = deque(maxlen=20)
        self._wake = threading.Event()
        self.beats = 0  # heartbeats handed to ZeroMQ
        self._linger_ms = 0  # how long the socket's last beats may take to leave when it closes

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

    def fatal(self, message: str) -> int:
        """Say why a restart would not help (one line, in the next beat's ``detail``), beat at once, and give the
        beat time to leave the process; returns the exit code that tells the supervisor so."""
        self.last_word(message)
        return EXIT_FATAL

    def last_word(self, message: str) -> None:
        """Say ``message`` in a last beat's ``detail`` (why this process ends), beat at once, give the beat time
        to leave the process, and stop beating: the supervisor reads it before it sees the exit."""
        self.progress.detail = message[:MAX_DETAIL_CHARS]
        if self.is_alive():
            seen = self.beats
            deadline = time.monotonic() + 5.0  # a beat counts once ZeroMQ took it: a full queue refuses it
            while self.beats < seen + 2 and time.monotonic() < deadline:  # the second was surely built after
                self._wake.set()
                time.sleep(0.02)
            # the thread closes its socket lingering, so the context's end waits until the beats have left
            self._linger_ms = 2000
            self.stop()
            self.join(timeout=3.0)

    def steps_per_s(self, now: float, steps: int) -> float:
        self._rate_window.append((now, steps))
        t0, s0 = self._rate_window[0]
        return (steps - s0) / (now - t0) if now > t0 else 0.0

    def beat(self, sock: zmq.Socket) -> None:
        p = self.progress
        now = time.monotonic()
        count = p.updates if self.fields["role"] == LEARNER else p.env_steps
        # the main thread may enter a phase after ``now`` was read: its age is then 0, not a negative time (which
        # no beat may carry)
        fields = dict(self.fields, phase=p.phase, phase_age_s=max(0.0, round(now - p.phase_since, 3)),
                      env_steps=p.env_steps, episodes=p.episodes, updates=p.updates, eval_steps=p.eval_steps,
                      steps_per_s=max(0.0, round(self.steps_per_s(now, count), 2)),
                      rss_bytes=self._proc.memory_info().rss, sent_at=time.time(), alerts=list(p.alerts))
        if p.frame is not None:
            fields["frame"] = p.frame
        if p.detail:
            fields["detail"] = p.detail[:MAX_DETAIL_CHARS]
        if p.dropped:
            fields["dropped"] = int(p.dropped)
        if p.resumed_from is not None:
            fields["resumed_from"] = int(p.resumed_from)
        if p.refused:
            fields["refused"] = int(p.refused)
        if p.hosts:
            fields["hosts"] = list(p.hosts)
        if p.weights is not None:
            fields["weights"] = int(p.weights)
        try:
            send(sock, HEARTBEAT, fields, flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the supervisor not reading: the next beat carries the same news
        self.beats += 1

    def run(self) -> None:
        sock = make_socket(self.ctx, zmq.PUSH, hwm=10)
        sock.connect(self.endpoint)
        try:
            while not self._stop_event.is_set():
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    os._exit(70)  # orphaned: the supervisor died, so must we
                try:
                    self.beat(sock)
                except ProtocolError as exc:  # a beat that cannot be encoded must not end the beating: say it
                    print(f"heartbeat not sent: {exc}", file=sys.stderr, flush=True)
                self._wake.wait(self.interval_s)
                self._wake.clear()
        finally:
            sock.close(self._linger_ms)
