"""The learner process: receives steps into replay, runs TD3 updates, publishes weights.

It binds the steps (PULL) and weights (PUB) endpoints of the run, so workers can
come and go. It enforces the update-to-data ratio by publishing an allowance of
env steps (``progress.allowed``); workers hold when they reach it. Checkpoints
(model, optimizers, replay index) are atomic and resumed on restart.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import torch
import zmq

from learner.alerts import AlertMonitor
from learner.replay import ReplayBuffer, atomic_write_text
from learner.td3 import TD3Agent, q_max
from protocol.config import Config, load_config
from protocol.heartbeat import HeartbeatSender, Progress
from protocol.logs import get_logger
from protocol.messages import EPISODE, HELLO, PROGRESS, STEPS, WEIGHTS
from protocol.models import policy_arrays
from protocol.sockets import Receiver, load_endpoints, make_socket, send

# How often the learner tells workers its counts; also bounds how stale their allowance is.
PROGRESS_EVERY_S = 0.2


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Learner:
    def __init__(self, cfg: Config, run_dir: Path, incarnation: int = 0, watch_parent: bool = True):
        self.cfg = cfg
        self.lcfg = cfg.learner
        self.run_dir = Path(run_dir)
        self.log = get_logger(run_dir, "learner", cfg.run.debug).bind(incarnation=incarnation)
        self.progress = Progress()
        self.ctx = zmq.Context()
        self.endpoints = load_endpoints(run_dir)
        self.heartbeat = HeartbeatSender(self.ctx, self.endpoints["heartbeat"], name="learner", role="learner",
                                         incarnation=incarnation, progress=self.progress,
                                         interval_s=cfg.supervisor.heartbeat_interval_s, watch_parent=watch_parent)
        self.device = pick_device(self.lcfg.device)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.agent: TD3Agent | None = None
        self.replay: ReplayBuffer | None = None
        self.spec: dict | None = None
        self.rng = np.random.default_rng(cfg.run.seed + 17 * incarnation)
        self.stopping = False
        self.done = False
        self.weights_version = 0
        self.lost_steps = 0
        self.writer = None
        self.alerts = AlertMonitor(q_max(cfg.env.reward_max, self.lcfg.gamma), self.lcfg)
        self._update_times: deque[float] = deque(maxlen=200)
        self._sums: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._ages: list[float] = []
        self.lock = threading.Lock()  # the replay and its stream table, shared by the receive and sample threads
        self.batches: queue.Queue = queue.Queue(maxsize=2)
        self.data_arrived = threading.Event()
        if self.lcfg.torch_threads:
            torch.set_num_threads(self.lcfg.torch_threads)

    # -- setup ---------------------------------------------------------------

    def bind(self) -> None:
        self.pull = make_socket(self.ctx, zmq.PULL, hwm=256)
        self.pull.bind(self.endpoints["steps"])
        self.pub = make_socket(self.ctx, zmq.PUB, hwm=4)
        self.pub.bind(self.endpoints["weights"])
        self.inbox = Receiver(self.pull, self.log.warning)

    def build(self, spec: dict) -> None:
        """Agent and replay for the run's spaces; resume both from the checkpoint if there is one."""
        self.spec = spec
        frame_shape = tuple(spec["frame_shape"])
        obs_shape = (frame_shape[0] * self.cfg.env.frame_stack,) + frame_shape[1:]
        self.agent = TD3Agent(obs_shape, spec["action_dim"], self.lcfg, self.device)
        self.replay = ReplayBuffer(self.run_dir / "replay", self.lcfg.replay_capacity, frame_shape,
                                   np.dtype(spec["frame_dtype"]), spec["action_dim"])
        ckpt = self.ckpt_dir / "latest.pt"
        if ckpt.exists():
            state = torch.load(ckpt, map_location=self.device, weights_only=True)
            self.agent.load_state_dict(state["agent"])
            self.weights_version = int(state.get("weights_version", 0))
            self.log.info("resumed from checkpoint", updates=self.agent.updates, replay_entries=self.replay.total,
                          transitions=self.replay.transitions_total)
        self.progress.updates = self.agent.updates
        self.progress.env_steps = self.replay.transitions_total
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self.log.info("learner ready", device=str(self.device), obs_shape=obs_shape, action_dim=spec["action_dim"],
                      encoder=self.lcfg.encoder, encoder_mode=self.lcfg.encoder_mode)

    def load_spec(self) -> dict | None:
        path = self.ckpt_dir / "spec.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- messages ------------------------------------------------------------

    def handle(self, msg) -> None:
        if msg.type == HELLO:
            spec = {"frame_shape": msg["frame_shape"], "frame_dtype": msg["frame_dtype"],
                    "action_dim": msg["action_dim"]}
            if self.spec is None:
                atomic_write_text(self.ckpt_dir / "spec.json", json.dumps(spec))
                self.build(spec)
            elif spec != self.spec:
                self.inbox.drop("spec_mismatch", f"{msg['worker']} sends {spec}, run has {self.spec}")
        elif msg.type == STEPS:
            if self.replay is None:
                self.inbox.drop("steps_before_hello", f"{msg['worker']}: steps before any hello")
                return
            a = msg.arrays
            if tuple(a["frames"].shape[1:]) != self.replay.frame_shape or a["frames"].dtype != self.replay.frame_dtype \
                    or a["actions"].shape[1] != self.replay.action_dim:
                self.inbox.drop("spec_mismatch", f"{msg['worker']}: steps of shape {a['frames'].shape[1:]}")
                return
            lost = self.replay.add_batch(f"{msg['worker']}/{msg['incarnation']}", msg["seq"], a["first"], a["frames"],
                                         a["actions"], a["rewards"], a["terminated"], a["truncated"],
                                         msg["env_steps"])
            if lost:
                self.lost_steps += lost
                self.log.warning("steps lost in transit", worker=msg["worker"], incarnation=msg["incarnation"],
                                 lost=lost)
        elif msg.type == EPISODE:
            self.log_episode(msg)

    def log_episode(self, msg) -> None:
        prefix = "eval" if msg["eval"] else "train"
        step = msg["env_steps"]
        if self.writer is not None:
            self.writer.add_scalar(f"{prefix}/episode_reward", msg["reward"], step)
            self.writer.add_scalar(f"{prefix}/episode_length", msg["length"], step)
        if msg["eval"]:
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"env_steps": step, "reward": msg["reward"], "length": msg["length"],
                                    "worker": msg["worker"], "updates": self.progress.updates}) + "\n")

    def allowed_steps(self) -> int:
        """Env steps the run may have collected: what keeps updates-per-step at the configured ratio."""
        updates = self.agent.updates if self.agent else 0
        return int(self.lcfg.learning_starts + updates / self.lcfg.updates_per_step + self.lcfg.rate_limit_slack)

    def updates_due(self) -> int:
        """Updates the data collected so far pays for."""
        if self.replay is None:
            return 0
        collected = min(self.replay.transitions_total, self.cfg.run.max_timesteps)
        if collected < max(self.lcfg.learning_starts, 1):
            return 0
        return int((collected - self.lcfg.learning_starts) * self.lcfg.updates_per_step) + 1

    def publish_progress(self) -> None:
        with self.lock:
            streams = {k: s.transitions for k, s in self.replay.streams.items()} if self.replay else {}
            received = self.replay.transitions_total if self.replay else 0
        send(self.pub, PROGRESS, {"updates": self.agent.updates if self.agent else 0, "received": received,
                                  "allowed": self.allowed_steps(), "done": self.done, "streams": streams})

    def publish_weights(self) -> None:
        self.weights_version += 1
        send(self.pub, WEIGHTS, {"version": self.weights_version, "updates": self.agent.updates},
             policy_arrays(self.agent.policy))

    # -- checkpoints -----------------------------------------------------------

    def checkpoint(self, label: str = "latest") -> Path | None:
        if self.agent is None:
            return None
        with self.lock:
            self.replay.flush()
            replay_index = self.replay.index()
        path = self.ckpt_dir / f"{label}.pt"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"agent": self.agent.state_dict(), "weights_version": self.weights_version,
                        "replay": replay_index, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.log.info("checkpoint written", path=path.name, updates=self.agent.updates)
        return path

    # -- threads: receiving and sampling never wait on an update -----------------

    def receive_loop(self) -> None:
        """Owns the steps socket: stores what arrives, and the replay index after each batch."""
        while not self.stopping:
            first = self.inbox.recv(timeout_ms=50)
            msgs = ([first] if first is not None else []) + self.inbox.drain(limit=64)
            if not msgs:
                continue
            with self.lock:
                for msg in msgs:
                    self.handle(msg)
                if any(m.type == STEPS for m in msgs):
                    self.replay.save_index()  # no fsync: this guards against a killed process, not a dead host
                    self.progress.env_steps = self.replay.transitions_total  # reported only once it is durable
            self.data_arrived.set()

    def sample_loop(self) -> None:
        """Keeps a couple of batches ready, so an update never waits for the gather."""
        lcfg = self.lcfg
        while not self.stopping:
            with self.lock:
                ready = self.replay.transitions_total >= max(1, min(lcfg.learning_starts, lcfg.batch_size))
                batch = self.replay.sample(lcfg.batch_size, self.cfg.env.frame_stack, lcfg.n_step, lcfg.gamma,
                                           self.rng) if ready else None
            if batch is None:
                time.sleep(0.01)
                continue
            if self.agent.augment_on_host:
                batch.shift_on_host(lcfg.augment_pad, self.rng)
            while not self.stopping:
                try:
                    self.batches.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    # -- the loop --------------------------------------------------------------

    def train_step(self) -> bool:
        try:
            batch = self.batches.get(timeout=0.1)
        except queue.Empty:
            return False
        lcfg = self.lcfg
        t0 = time.perf_counter()
        detailed = (self.agent.updates + 1) % lcfg.log_every == 0
        metrics = self.agent.update(batch, detailed=detailed)
        self._update_times.append(time.perf_counter() - t0)
        self.progress.updates = self.agent.updates
        for alert in self.alerts.observe(self.agent.updates, metrics):
            self.log.warning("alert", **alert)
            self.progress.alerts = self.alerts.recent()
            if alert["level"] == "critical":
                self.checkpoint(f"alert-{self.agent.updates}-{alert['rule']}")
        for k, v in metrics.items():
            self._sums[k] += v
            self._counts[k] += 1
        self._ages.append(float(batch.age.mean()))
        if self.agent.updates % lcfg.log_every == 0:
            self.write_metrics()
        return True

    def write_metrics(self) -> None:
        """Means over the updates since the last write; clip flags become clip fractions."""
        step = self.agent.updates
        w = self.writer
        for tag, total in self._sums.items():
            mean = total / max(1, self._counts[tag])
            w.add_scalar(tag.replace("_clipped", "_clip_fraction"), mean, step)
        self._sums.clear()
        self._counts.clear()
        for tag, value in self.alerts.counters().items():
            w.add_scalar(tag, value, step)
        with self.lock:
            w.add_scalar("buffer/utilization", self.replay.size / self.replay.capacity, step)
            w.add_scalar("buffer/transitions", self.replay.transitions_total, step)
            w.add_scalar("buffer/lost_steps", self.lost_steps, step)
            w.add_scalar("perf/update_to_data", step / max(1, self.replay.transitions_total), step)
        if self._ages:
            w.add_scalar("buffer/sample_age", sum(self._ages) / len(self._ages), step)
            self._ages.clear()
        w.add_scalar("perf/updates_per_s", len(self._update_times) / max(sum(self._update_times), 1e-9), step)
        w.add_scalar("protocol/dropped_messages", self.inbox.dropped_total, step)
        w.add_scalar("agent/actor_lr", self.agent.actor_opt.param_groups[0]["lr"], step)
        w.add_scalar("agent/critic_lr", self.agent.critic_opt.param_groups[0]["lr"], step)
        if self.agent.separate:
            w.add_scalar("agent/actor_cnn_lr", self.agent.actor_opt.param_groups[1]["lr"], step)

    def run(self) -> int:
        self.heartbeat.start()
        self.log.info("learner starting", pid=os.getpid())
        self.progress.set_phase("connecting")
        self.bind()
        spec = self.load_spec()
        if spec is not None:
            self.build(spec)
        while self.agent is None and not self.stopping:  # until the first hello says what the run's spaces are
            self.publish_progress()
            msg = self.inbox.recv(timeout_ms=200)
            if msg is not None:
                self.handle(msg)
        threads = [threading.Thread(target=self.receive_loop, name="receive", daemon=True),
                   threading.Thread(target=self.sample_loop, name="sample", daemon=True)]
        for t in threads:
            t.start()
        last_progress = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                self.publish_progress()
                last_progress = now
            if self.agent.updates < self.updates_due():
                self.progress.set_phase("training")
                if not self.train_step():
                    continue
                updates = self.agent.updates
                if updates % self.lcfg.publish_every == 0 or self.weights_version == 0:
                    self.publish_weights()
                if updates % self.lcfg.checkpoint_every == 0:
                    self.checkpoint()
            else:
                if self.replay.transitions_total >= self.cfg.run.max_timesteps and not self.done:
                    self.done = True
                    self.log.info("run complete", env_steps=self.replay.transitions_total, updates=self.agent.updates)
                    break
                self.progress.set_phase("waiting_data")
                if self.weights_version == 0:
                    self.publish_weights()  # workers act with the learner's initial policy, not their own
                self.data_arrived.wait(0.02)
                self.data_arrived.clear()
        self.progress.set_phase("closing")
        stopping_by_signal = self.stopping
        self.stopping = True
        for t in threads:
            t.join(timeout=5)
        self.checkpoint()
        if self.done and not stopping_by_signal:
            # tell the workers, a few times: PUB drops messages to late subscribers
            for _ in range(10):
                self.publish_progress()
                time.sleep(0.05)
        if self.writer is not None:
            self.writer.close()
        self.log.info("learner stopped", updates=self.agent.updates if self.agent else 0,
                      dropped=dict(self.inbox.dropped), lost_steps=self.lost_steps)
        return 0

    def close(self) -> None:
        self.heartbeat.stop()
        self.ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="learner", description="Run the learner of a run.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--incarnation", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.yaml")
    learner = Learner(cfg, args.run_dir, args.incarnation)

    def on_term(signum, frame):
        learner.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return learner.run()
    except Exception:
        learner.log.exception("learner failed")
        return 1
    finally:
        learner.close()


if __name__ == "__main__":
    sys.exit(main())
