"""The learner process: receives steps into replay, runs TD3 updates, publishes weights.

It binds the steps (PULL) and weights (PUB) endpoints of the run, so workers can
come and go. Its jobs live in their own modules: :mod:`learner.intake` (the
receive thread: the run's spaces, steps into replay), :mod:`learner.sampler` (the
sample thread), :mod:`learner.checkpoints` (atomic checkpoints, resumed on
restart), :mod:`learner.metrics` (TensorBoard) and :mod:`protocol.ratelimit` (the
update-to-data ratio: the learner publishes an allowance of env steps in
``progress.allowed``; workers hold when they reach it). This module wires them
together and runs the update loop.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from learner.alerts import AlertMonitor
from learner.checkpoints import LATEST, Checkpoints
from learner.frames import DeviceFrames
from learner.graphs import GraphedUpdates
from learner.intake import Intake
from learner.metrics import Metrics, MetricsPipe
from learner.replay import ReplayBuffer
from learner.sampler import Sampler
from learner.td3 import TD3Agent, q_max
from policy.network import policy_arrays
from protocol.config import Config, load_config
from protocol.curve import (CURVE_HANDSHAKE_BYTES, Gatekeeper, KeyFileError, allowed_keys, load_secret, prepare_tcp,
                            raise_open_files_limit, serve_curve, tcp_endpoints)
from protocol.exits import FatalError, exit_on_error
from protocol.heartbeat import HeartbeatSender, Progress
from protocol.logs import get_logger
from protocol.messages import PROGRESS, WEIGHTS
from protocol.ratelimit import UpdateToData
from protocol.roles import LEARNER
from protocol.sockets import (STEPS_RCVHWM, SUBSCRIPTION_MAX_BYTES, Receiver, load_endpoints, make_socket, send,
                              steps_max_bytes)

# Steps messages queued per TCP peer (ipc: STEPS_RCVHWM); with the size limit it bounds what a host can make the
# learner hold.
TCP_STEPS_RCVHWM = 4
# How often the learner tells workers its counts; also bounds how stale their allowance is.
PROGRESS_EVERY_S = 0.2
# How many worker incarnations' acknowledged counts a progress message carries (the newest).
PROGRESS_STREAMS = 256


def learner_seed(run_seed: int, incarnation: int) -> int:
    return run_seed + 17 * incarnation


def seed_torch(seed: int) -> None:
    torch.manual_seed(seed)  # every device's generator, CUDA's included


def rng_state(rng: np.random.Generator) -> dict:
    """The learner's random streams (torch's, CUDA's, the sampler's numpy one), for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    rng.bit_generator.state = state["numpy"]
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def call_size(updates: int, due: int, per_call: int, *every: int) -> int:
    """How many updates one call of the update loop makes: at most ``per_call`` and the updates due, and none past
    the next multiple of any of ``every`` (the updates that log, publish and checkpoint end a call)."""
    return max(0, min(per_call, due - updates, *(e - updates % e for e in every)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)



def accept_subscriptions(xpub: zmq.Socket, limit: int = 1000) -> int:
    """Apply the subscriptions a manual XPUB received that are to the whole stream (a worker's ``b""``) and drop every
    other one (a prefix, an unsubscription): nothing a peer sends is stored but one subscription each. Returns how
    many were applied."""
    applied = 0
    for _ in range(limit):
        try:
            msg = xpub.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        if msg == b"\x01":  # subscribe, to everything
            xpub.setsockopt(zmq.SUBSCRIBE, b"")
            applied += 1
    return applied

class Learner:
    def __init__(self, cfg: Config, run_dir: Path, incarnation: int = 0, watch_parent: bool = True,
                 name: str = LEARNER):
        self.cfg = cfg
        self.lcfg = cfg.learner
        self.run_dir = Path(run_dir)
        self.log = get_logger(run_dir, name, cfg.run.debug).bind(incarnation=incarnation)
        self.progress = Progress()
        self.ctx = zmq.Context()
        self.endpoints = load_endpoints(run_dir)
        self.heartbeat = HeartbeatSender(self.ctx, self.endpoints["heartbeat"], name=name, role=LEARNER,
                                         incarnation=incarnation, progress=self.progress,
                                         interval_s=cfg.supervisor.heartbeat_interval_s, watch_parent=watch_parent)
        self.device = pick_device(self.lcfg.device)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints")
        self.ratio = UpdateToData.from_config(self.lcfg)
        self.agent: TD3Agent | None = None
        self.replay: ReplayBuffer | None = None
        self.sampler: Sampler | None = None
        self.metrics: Metrics | None = None
        self.seed = learner_seed(cfg.run.seed, incarnation)
        self.rng = np.random.default_rng(self.seed)
        seed_torch(self.seed)  # network initialisation, target smoothing noise, device-side shifts
        self.stopping = False
        self.failure: BaseException | None = None  # what ended a receive or sample thread
        self.checkpointed_at = time.monotonic()
        self.done = False
        self.weights_version = 0
        self.alerts = AlertMonitor(q_max(cfg.env.reward_max, self.lcfg.gamma), self.lcfg)
        self.lock = threading.Lock()  # the replay and its stream table, shared by the receive and sample threads
        self.gate: Gatekeeper | None = None  # the TCP sockets' authenticator (learner.curve_key)
        self.refused_logged_at = -math.inf  # the last log line of a refused connection (one every 5 s at most)
        if self.lcfg.torch_threads:
            torch.set_num_threads(self.lcfg.torch_threads)

    # -- setup ---------------------------------------------------------------

    def bind(self) -> None:
        max_bytes = steps_max_bytes(self.cfg.workers.batch_steps, self.cfg.env.max_frame_bytes)
        self.pull = make_socket(self.ctx, zmq.PULL, hwm=STEPS_RCVHWM, max_bytes=max_bytes)
        self.pull.bind(self.endpoints["steps"])
        self.pub = make_socket(self.ctx, zmq.PUB, hwm=4, max_bytes=SUBSCRIPTION_MAX_BYTES)
        self.pub.bind(self.endpoints["weights"])
        self.pubs = [self.pub]
        self.xpubs: list[zmq.Socket] = []  # the TCP weights publisher, which takes only whole-stream subscriptions
        self.inbox = Receiver(self.pull, self.log.warning)
        if self.lcfg.listen:
            self.bind_tcp(max_bytes)
        self.intake = Intake(self.inbox, self.lock, self.progress, self.log, self.on_spec, self.on_episode)

    def bind_tcp(self, max_bytes: int) -> None:
        """learner.listen: the same steps and weights sockets on TCP, for workers on other hosts; with
        learner.curve_key, CurveZMQ servers that let in only the allowed hosts' keys."""
        keys = None
        if self.lcfg.curve_key:
            try:
                keys = load_secret(Path(self.lcfg.curve_key), "learner.curve_key")
                allowed = allowed_keys(Path(self.lcfg.curve_clients), "learner.curve_clients")
            except KeyFileError as exc:
                raise FatalError(str(exc)) from None
            self.gate = Gatekeeper(self.ctx, allowed, on_refused=self.on_refused)
        eps = tcp_endpoints(self.lcfg.listen)
        raise_open_files_limit()  # each TCP peer holds a descriptor (a silent one for HANDSHAKE_MS at most)
        # a CurveZMQ handshake (HELLO 200 bytes, INITIATE with metadata) passes the same size limit as a message;
        # a TCP peer's queue is shorter than an ipc one's: there may be many hosts
        for kind, name, max_b, hwm in ((zmq.PULL, "steps", max_bytes, TCP_STEPS_RCVHWM),
                                       (zmq.XPUB, "weights", max(SUBSCRIPTION_MAX_BYTES, CURVE_HANDSHAKE_BYTES), 4)):
            sock = make_socket(self.ctx, kind, hwm=hwm, max_bytes=max_b)
            if kind == zmq.XPUB:  # its handshake's room would let a peer store kilobyte subscriptions: it chooses
                sock.setsockopt(zmq.XPUB_MANUAL, 1)
            prepare_tcp(sock, eps[name])
            if keys is not None:
                serve_curve(sock, *keys)
            try:
                sock.bind(eps[name])
            except zmq.ZMQError as exc:
                raise FatalError(f"learner.listen {self.lcfg.listen}: cannot bind {eps[name]} ({exc.strerror}); "
                                 "free the port or pick another") from None
            if kind == zmq.PULL:
                self.inbox.add(sock, authenticated=keys is not None)
            else:
                self.pubs.append(sock)
                self.xpubs.append(sock)
        self.log.info("listening on TCP", steps=eps["steps"], weights=eps["weights"], curve=keys is not None,
                      allowed_hosts=len(allowed) if keys is not None else None)

    def on_refused(self, count: int) -> None:
        """A host whose key is not allowed tried to connect (the authenticator's thread)."""
        self.progress.refused = count
        now = time.monotonic()
        if now - self.refused_logged_at >= 5.0:
            self.refused_logged_at = now
            self.log.warning("client refused: its key is not in learner.curve_clients", refused=count)

    def on_spec(self, spec: dict) -> None:
        """The first hello of the run: record its spaces, then build."""
        self.checkpoints.save_spec(spec)
        self.build(spec)

    def build(self, spec: dict) -> None:
        """Agent and replay for the run's spaces; resume both from the checkpoint if there is one."""
        self.intake.spec = spec
        frame_shape = tuple(spec["frame_shape"])
        obs_shape = (frame_shape[0] * self.cfg.env.frame_stack,) + frame_shape[1:]
        self.agent = TD3Agent(obs_shape, spec["action_dim"], self.lcfg, self.device)
        state = self.checkpoints.load()
        self.replay = ReplayBuffer(self.run_dir / "replay", self.lcfg.replay_capacity, frame_shape,
                                   np.dtype(spec["frame_dtype"]), spec["action_dim"],
                                   fallback_index=state.get("replay") if state else None)
        self.intake.replay = self.replay
        if state is not None:
            try:
                self.agent.load_state_dict(state["agent"])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise FatalError(f"the checkpoint in {self.checkpoints.dir} was made for another model "
                                 f"({str(exc).splitlines()[0][:100]}); resume with the run's own config "
                                 "(leave out --config) or start a new run") from None
            self.weights_version = int(state.get("weights_version", 0))
            if state.get("rng"):  # a resumed run draws on where its random streams were
                restore_rng(state["rng"], self.rng)
            self.progress.resumed_from = self.agent.updates
            self.log.info("resumed from checkpoint", updates=self.agent.updates, replay_entries=self.replay.total,
                          transitions=self.replay.transitions_total)
        self.progress.updates = self.agent.updates
        self.progress.env_steps = self.replay.transitions_total
        on_device = self.lcfg.frames == "device" or (self.lcfg.frames == "auto" and self.device.type != "cpu")
        if on_device:  # the frames copied to the device once; each update's draw gathered there
            try:
                self.agent.frames = self.intake.frames = DeviceFrames(self.replay, self.device, self.agent.copies)
            except FatalError as exc:
                if self.lcfg.frames == "device":
                    raise
                on_device = False  # auto: a replay too large for the device is gathered on the host, as before
                self.log.warning("the replay's frames stay on the host", reason=str(exc))
        self.sampler = Sampler(self.replay, self.lock, self.lcfg, self.cfg.env.frame_stack, self.rng,
                               self.agent.augment_on_host, self.log, draws=on_device)
        # on a GPU whose update is graphed, updates are replayed; the eager update is the reference
        self.updater = GraphedUpdates(self.agent, lock=self.lock) if on_device and self.agent.graphed \
            else self.agent
        self.metrics = Metrics(self.run_dir)
        self.pipe = MetricsPipe(self.agent.host_reads, self.lcfg.metrics_read_every, self.take_metrics,
                                self.metrics.spent)
        self.log.info("learner ready", device=str(self.device), frames_on="device" if on_device else "host",
                      obs_shape=obs_shape, action_dim=spec["action_dim"],
                      encoder=self.lcfg.encoder, encoder_mode=self.lcfg.encoder_mode, updates=self.agent.updates,
                      transitions=self.replay.transitions_total, lost_steps=sum(s.lost for s in
                                                                                self.replay.streams.values()))

    def on_episode(self, msg) -> None:
        if self.metrics is not None:
            self.metrics.episode(msg["eval"], msg["reward"], msg["length"], msg["env_steps"], msg["worker"],
                                 self.progress.updates, msg.get("reason"))

    # -- the rate limiter's learner side -------------------------------------------

    def updates_due(self) -> int:
        """Updates the data collected so far pays for."""
        if self.replay is None:
            return 0
        return self.ratio.updates_due(min(self.replay.transitions_total, self.cfg.run.max_timesteps))

    def publish_progress(self) -> None:
        for xpub in self.xpubs:
            accept_subscriptions(xpub)
        with self.lock:
            # the newest incarnations' streams only: the table would outgrow a header after thousands of restarts
            recent = list(self.replay.streams.items())[-PROGRESS_STREAMS:] if self.replay else []
            streams = {k: s.transitions for k, s in recent}
            received = self.replay.transitions_total if self.replay else 0
        updates = self.agent.updates if self.agent else 0
        for pub in self.pubs:
            send(pub, PROGRESS, {"updates": updates, "received": received,
                                 "allowed": self.ratio.allowed_steps(updates), "done": self.done,
                                 "streams": streams})

    def publish_weights(self) -> None:
        self.weights_version += 1
        arrays = policy_arrays(self.agent.policy)
        for pub in self.pubs:
            send(pub, WEIGHTS, {"version": self.weights_version, "updates": self.agent.updates}, arrays)

    # -- checkpoints -----------------------------------------------------------

    def checkpoint(self, label: str = LATEST) -> Path | None:
        if self.agent is None:
            return None
        replay_index = self.replay.flush(self.lock)  # the lock only to take the index: sampling goes on
        path = self.checkpoints.save(label, self.agent.state_dict(), self.weights_version, replay_index,
                                     rng_state(self.rng))
        if label == LATEST:
            self.checkpointed_at = time.monotonic()
        self.log.info("checkpoint written", path=path.name, updates=self.agent.updates)
        return path

    # -- updates ----------------------------------------------------------------

    def train_step(self) -> int:
        """Up to ``learner.updates_per_call`` updates (as many as are due and ready), ending at the next update that
        logs, publishes or checkpoints, so the loop checks those, and the rate limiter, once per call. Returns how
        many updates it made."""
        lcfg = self.lcfg
        room = call_size(self.agent.updates, self.updates_due(), lcfg.updates_per_call, lcfg.log_every,
                         lcfg.publish_every, lcfg.checkpoint_every)
        batches = [self.sampler.next()]
        if batches[0] is None:
            return 0
        while len(batches) < room and (batch := self.sampler.next(timeout_s=0)) is not None:
            batches.append(batch)
        t0 = time.perf_counter()
        for batch in batches:
            detailed = (self.agent.updates + 1) % lcfg.log_every == 0
            keys, values = self.updater.update_deferred(batch, detailed=detailed)  # nothing waits for the device
            self.pipe.add(self.agent.updates, keys, values, float(batch.age.mean()))
        self.metrics.spent(time.perf_counter() - t0, len(batches))
        self.progress.updates = self.agent.updates
        if self.agent.updates % lcfg.log_every == 0:
            self.pipe.flush()
            self.write_metrics()
        return len(batches)

    def take_metrics(self, updates: int, metrics: dict[str, float], sample_age: float) -> None:
        """One update's metrics, read from the device with its neighbours': TensorBoard's window and the alerts."""
        self.metrics.observe(metrics, sample_age)
        for alert in self.alerts.observe(updates, metrics):
            self.log.warning("alert", **alert)
            self.progress.alerts = self.alerts.recent()
            if alert["level"] == "critical":
                self.checkpoint(f"alert-{updates}-{alert['rule']}")

    def write_metrics(self) -> None:
        step = self.agent.updates
        scalars = dict(self.alerts.counters())
        with self.lock:
            scalars.update({
                "buffer/utilization": self.replay.size / self.replay.capacity,
                "buffer/transitions": self.replay.transitions_total,
                "buffer/lost_steps": self.intake.lost_steps,
                "perf/update_to_data": self.ratio.ratio(step, self.replay.transitions_total)})
        scalars["protocol/dropped_messages"] = self.inbox.dropped_total
        scalars["agent/actor_lr"] = self.agent.actor_opt.param_groups[0]["lr"]
        scalars["agent/critic_lr"] = self.agent.critic_opt.param_groups[0]["lr"]
        if self.agent.separate:
            scalars["agent/actor_cnn_lr"] = self.agent.actor_opt.param_groups[1]["lr"]
        self.metrics.write(step, scalars)

    # -- the loop --------------------------------------------------------------

    def wait_for_spec(self) -> None:
        """Until the first hello (or a saved spec) says what the run's spaces are."""
        spec = self.checkpoints.load_spec()
        if spec is not None:
            self.build(spec)
        while self.agent is None and not self.stopping:
            self.publish_progress()
            msg = self.inbox.recv(timeout_ms=200)
            if msg is not None:
                self.intake.handle(msg)

    def run(self) -> int:
        self.heartbeat.start()
        self.log.info("learner starting", pid=os.getpid())
        self.progress.set_phase("connecting")
        self.bind()
        self.wait_for_spec()
        if self.agent is None:
            return 0  # stopped before any worker spoke
        stopping = lambda: self.stopping  # noqa: E731
        threads = [threading.Thread(target=self.guarded, args=(self.intake.receive_loop, stopping), name="receive",
                                    daemon=True),
                   threading.Thread(target=self.guarded, args=(self.sampler.run, stopping), name="sample",
                                    daemon=True)]
        for t in threads:
            t.start()
        last_progress = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                self.publish_progress()
                self.progress.dropped = self.inbox.dropped_total
                if self.lcfg.listen:  # who sends from where: status lists the hosts
                    self.progress.hosts = self.intake.host_rows()
                last_progress = now
            if self.agent.updates < self.updates_due():
                self.progress.set_phase("training")
                self.progress.detail = self.sampler.failing  # why no batch comes, if it does not
                if not self.train_step():
                    continue
                updates = self.agent.updates
                due = updates % self.lcfg.checkpoint_every == 0
                if updates % self.lcfg.publish_every == 0 or self.weights_version == 0:
                    self.publish_weights()
                    every_s = self.lcfg.checkpoint_every_s
                    due = due or (every_s > 0 and time.monotonic() - self.checkpointed_at >= every_s)
                if due:
                    self.checkpoint()
            else:
                if self.replay.transitions_total >= self.cfg.run.max_timesteps and not self.done:
                    self.done = True
                    self.log.info("run complete", env_steps=self.replay.transitions_total, updates=self.agent.updates)
                    break
                self.progress.set_phase("waiting_data")
                if self.weights_version == 0:
                    self.publish_weights()  # workers act with the learner's initial policy, not their own
                if self.agent.frames is not None:  # the frames stored meanwhile, to the device (pinned RAM freed)
                    with self.lock:
                        upto = self.sampler.safe_total()
                    self.agent.frames.apply(upto)
                self.intake.data_arrived.wait(0.02)
                self.intake.data_arrived.clear()
        self.progress.set_phase("closing")
        stopping_by_signal = self.stopping
        self.stopping = True
        for t in threads:
            t.join(timeout=5)
        if self.failure is not None:
            raise self.failure  # a thread's error (a full disk, say) ends the learner; no checkpoint over it
        if self.metrics is not None:
            self.pipe.flush()  # the last updates' metrics and alerts, before the last checkpoint
        self.checkpoint()
        if self.done and not stopping_by_signal:
            # tell the workers, a few times: PUB drops messages to late subscribers
            for _ in range(10):
                self.publish_progress()
                time.sleep(0.05)
        if self.metrics is not None:
            self.metrics.close()
        self.log.info("learner stopped", updates=self.agent.updates, dropped=dict(self.inbox.dropped),
                      lost_steps=self.intake.lost_steps)
        return 0

    def guarded(self, loop, stopping) -> None:
        """A thread's loop; its error stops the learner (and is raised by :meth:`run`)."""
        try:
            loop(stopping)
        except BaseException as exc:
            self.failure = exc
            self.stopping = True

    def close(self) -> None:
        self.heartbeat.stop()
        if self.gate is not None:
            self.gate.stop()
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="learner", description="Run the learner of a run.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--name", default=LEARNER, help="the name the supervisor knows this process by")
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    learner = Learner(cfg, args.run_dir, args.incarnation, name=args.name)

    def on_term(signum, frame):
        learner.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return learner.run()
    except Exception as exc:
        return exit_on_error(exc, args.run_dir, args.name, learner.log, learner.heartbeat)
    finally:
        learner.close()


if __name__ == "__main__":
    sys.exit(main())
