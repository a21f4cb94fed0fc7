"""A worker's link to the learner: steps out (PUSH), weights and progress in (SUB), and the waiting.

Steps go in batches numbered per incarnation (``seq``), so the learner can count
what was lost. When the learner's update-to-data allowance is reached, or the
learner is gone and ZeroMQ's queue is full, the worker waits here in phase
``waiting_learner``, which the supervisor does not count as a stall.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable

import numpy as np
import zmq

from protocol.curve import connect_curve, prepare_tcp
from protocol.exits import FatalError
from protocol.heartbeat import Progress
from protocol.messages import EPISODE, HELLO, PROGRESS, STEPS, WEIGHTS
from protocol.ratelimit import Allowance
from protocol.sockets import Receiver, make_socket, send
from worker.batching import StepBatch

# Steps a worker may buffer towards a dead learner before send() would block:
# ZeroMQ queues up to this many batches, then the worker waits.
STEPS_HWM = 64


class LearnerLink:
    def __init__(self, ctx: zmq.Context, endpoints: dict[str, str], name: str, incarnation: int,
                 progress: Progress, log, stopping: Callable[[], bool],
                 curve: tuple[bytes, bytes, bytes] | None = None, absent_s: float = 0.0):
        """``curve``: this host's public and secret key and the learner's public key, for a CurveZMQ learner.
        ``absent_s``: a learner on another host not heard from for this long is given up on (0: never)."""
        self.name = name
        self.incarnation = incarnation
        self.progress = progress
        self.stopping = stopping
        self.steps_sock = make_socket(ctx, zmq.PUSH, hwm=STEPS_HWM)
        self.sub = make_socket(ctx, zmq.SUB, hwm=4)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        for sock, endpoint in ((self.steps_sock, endpoints["steps"]), (self.sub, endpoints["weights"])):
            if endpoint.startswith("tcp://"):
                prepare_tcp(sock, endpoint)
            if curve is not None:
                connect_curve(sock, *curve)
        self.steps_sock.connect(endpoints["steps"])
        self.sub.connect(endpoints["weights"])
        self.inbox = Receiver(self.sub, log.warning)
        # this process's stream at the learner: a restarted host's worker-N incarnation 0 is not the last one's
        self.session = secrets.token_hex(4)
        self.allowance = Allowance(f"{name}/{incarnation}/{self.session}")
        self.batch = StepBatch()
        self.seq = 0
        self.done = False  # the learner said the run is complete
        self.weights_version = -1
        # (arrays, version); raises ValueError on a misfit
        self.on_weights: Callable[[dict[str, np.ndarray], int], None] | None = None
        self.endpoint = endpoints["weights"]
        self.absent_s = absent_s
        self.heard_at = time.monotonic()  # when the learner last published anything

    def run_steps(self) -> int:
        """The run's env steps as far as this worker knows, counting what it has batched."""
        return self.allowance.run_steps(self.batch.transitions())

    def hello(self, slot: int, frame: np.ndarray, action_dim: int) -> None:
        send(self.steps_sock, HELLO, {"worker": self.name, "slot": slot, "incarnation": self.incarnation,
                                      "frame_shape": list(frame.shape), "frame_dtype": frame.dtype.str,
                                      "action_dim": action_dim})

    def flush(self) -> None:
        """Send the batch; while the learner's queue is full, wait (keeping the batch)."""
        if not len(self.batch):
            return
        fields = {"worker": self.name, "incarnation": self.incarnation, "seq": self.seq,
                  "env_steps": self.progress.env_steps, "session": self.session}
        arrays = self.batch.arrays()
        while True:
            try:
                send(self.steps_sock, STEPS, fields, arrays, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                self.progress.set_phase("waiting_learner")
                self.poll(timeout_ms=200)
                if self.stopping():
                    return
        self.allowance.sent += self.batch.transitions()
        self.seq += 1
        self.batch.clear()

    def poll(self, timeout_ms: int = 0) -> None:
        """Take in what the learner published: progress (the allowance) and the newest weights."""
        msg = self.inbox.recv(timeout_ms) if timeout_ms else None
        msgs = ([msg] if msg else []) + self.inbox.drain()
        now = time.monotonic()
        if msgs:
            self.heard_at = now
        elif self.absent_s and now - self.heard_at > self.absent_s and not self.done:
            raise FatalError(f"no word from the learner at {self.endpoint} for {now - self.heard_at:.0f}s "
                             f"(workers.learner_absent_s {self.absent_s:g}): it ended or cannot be reached; "
                             "check it, then restart this host's workers (supervisor restart NAME)")
        latest_weights = None
        for m in msgs:
            if m.type == WEIGHTS:
                latest_weights = m
            elif m.type == PROGRESS:
                self.allowance.hear(m["received"], m["allowed"], m["streams"])
                self.progress.updates = m["updates"]
                self.done = self.done or m["done"]
        if latest_weights is not None and latest_weights["version"] != self.weights_version \
                and self.on_weights is not None:
            try:
                self.on_weights(latest_weights.arrays, latest_weights["version"])
                self.weights_version = latest_weights["version"]
            except ValueError as exc:
                self.inbox.drop("bad_weights", str(exc))

    def wait_for_allowance(self) -> None:
        """Hold while one more step would push the run past the learner's allowance."""
        while not self.stopping() and not self.done:
            self.poll()
            if self.allowance.may_step(self.batch.transitions()):
                return
            self.flush()
            self.progress.set_phase("waiting_learner")
            self.poll(timeout_ms=100)

    def episode(self, reward: float, length: int, evaluation: bool, env_steps: int | None = None,
                reason: str | None = None) -> None:
        fields = {"worker": self.name, "incarnation": self.incarnation, "reward": float(reward), "length": int(length),
                  "eval": evaluation, "env_steps": self.run_steps() if env_steps is None else env_steps}
        if reason:
            fields["reason"] = reason[:64]
        try:
            send(self.steps_sock, EPISODE, fields, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the learner is gone; an episode summary is not worth blocking for
