"""What arrives on the learner's steps socket: the run's spaces, steps into replay, episode summaries.

The first ``hello`` fixes the run's spaces (frame shape and dtype, action size);
a worker whose hello or steps disagree is dropped and counted, never stored. The
receive thread stores each batch and then the replay index, and only then counts
the steps as stored (what ``status`` reports survives a SIGKILL).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from protocol.codec import Message
from protocol.curve import key_admits
from protocol.heartbeat import Progress
from protocol.messages import EPISODE, HELLO, MAX_HOSTS, STEPS
from protocol.sockets import Receiver


def stream_key(msg: Message) -> str:
    """A worker process's stream in the replay's table: its name, incarnation and, when it sends one, its session
    (a restarted host's worker-0 incarnation 0 is a new stream, not the old one's duplicate)."""
    key = f"{msg['worker']}/{msg['incarnation']}"
    return f"{key}/{msg['session']}" if msg.get("session") else key


LOCAL_HOST = "local"


class Intake:
    def __init__(self, inbox: Receiver, lock: threading.Lock, progress: Progress, log,
                 on_spec: Callable[[dict], None], on_episode: Callable[[Message], None]):
        self.inbox = inbox
        self.lock = lock  # the replay and its stream table, shared with the sampler thread
        self.progress = progress
        self.log = log
        self.on_spec = on_spec  # called with the first hello's spec (builds agent and replay)
        self.on_episode = on_episode
        self.spec: dict | None = None
        self.replay = None  # set once the spec is known
        self.frames = None  # the replay's frames on the device (learner.frames.DeviceFrames), where there is a copy
        self.lost_steps = 0
        self.data_arrived = threading.Event()
        # who sends: per host (HOST of a worker called HOST:worker-N; "local" for this run's own workers), its
        # workers, the steps stored from it and when it last sent
        self.hosts: dict[str, dict] = {}

    def handle(self, msg: Message) -> None:
        if msg.peer and not key_admits(msg.peer, msg.get("worker", "").rpartition(":")[0]):
            # a host is who its key says: host-b's key sends as host-b:worker-N (or, a key several hosts share,
            # as host-b.SUB:worker-N), never as another key's host's worker
            self.inbox.drop("host_mismatch", f"{msg.get('worker')} came in with the key of host {msg.peer}")
            return
        if msg.type == HELLO:
            spec = {"frame_shape": msg["frame_shape"], "frame_dtype": msg["frame_dtype"],
                    "action_dim": msg["action_dim"]}
            if self.spec is None:
                self.on_spec(spec)
            elif spec != self.spec:
                self.inbox.drop("spec_mismatch", f"{msg['worker']} sends {spec}, run has {self.spec}")
        elif msg.type == STEPS:
            self.store(msg)
        elif msg.type == EPISODE:
            self.on_episode(msg)

    def store(self, msg: Message) -> None:
        if self.replay is None:
            self.inbox.drop("steps_before_hello", f"{msg['worker']}: steps before any hello")
            return
        a = msg.arrays
        if tuple(a["frames"].shape[1:]) != self.replay.frame_shape or a["frames"].dtype != self.replay.frame_dtype \
                or a["actions"].shape[1] != self.replay.action_dim:
            self.inbox.drop("spec_mismatch", f"{msg['worker']}: steps of shape {a['frames'].shape[1:]}")
            return
        entries = self.replay.total
        lost = self.replay.add_batch(stream_key(msg), msg["seq"], a["first"], a["frames"], a["actions"], a["rewards"],
                                     a["terminated"], a["truncated"], msg["env_steps"])
        if self.replay.total > entries:  # stored, not a duplicate
            self.seen(msg["worker"], self.replay.total - entries)
            if self.frames is not None:
                self.frames.stage(entries, a["frames"])
        if lost:
            self.lost_steps += lost
            self.log.warning("steps lost in transit", worker=msg["worker"], incarnation=msg["incarnation"], lost=lost)

    def seen(self, worker: str, steps: int) -> None:
        host, _, name = worker.rpartition(":")
        entry = self.hosts.get(host or LOCAL_HOST)
        if entry is None:
            if len(self.hosts) >= MAX_HOSTS:
                return  # a flood of made-up names does not grow the table
            entry = self.hosts[host or LOCAL_HOST] = {"workers": set(), "steps": 0, "last_seen": 0.0}
        if len(entry["workers"]) < MAX_HOSTS:
            entry["workers"].add(name)
        entry["steps"] += steps
        entry["last_seen"] = time.monotonic()

    def host_rows(self) -> list[dict]:
        """The hosts table for the heartbeat (``status`` shows it under the learner)."""
        now = time.monotonic()
        return [{"host": host, "slots": len(e["workers"]), "steps": e["steps"],
                 "last_seen_s": round(now - e["last_seen"], 1)} for host, e in sorted(self.hosts.items())]

    def receive_loop(self, stopping: Callable[[], bool]) -> None:
        """Stores what arrives, and the replay index after each batch, until ``stopping()``."""
        while not stopping():
            first = self.inbox.recv(timeout_ms=50)
            msgs = ([first] if first is not None else []) + self.inbox.drain(limit=64)
            if not msgs:
                continue
            index = None
            with self.lock:
                for msg in msgs:
                    self.handle(msg)
                if any(m.type == STEPS for m in msgs):
                    index = self.replay.index()
            if index is not None:  # written outside the lock: the sampler never waits for a file
                self.replay.save_index(index=index)  # atomic, no fsync: guards against a killed learner
                self.progress.env_steps = index["transitions_total"]  # reported only once it is durable
            self.data_arrived.set()
