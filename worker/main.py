"""The env-worker: steps one environment, acts with a local actor, streams steps to the learner.

Per step the worker sends the action, reward, terminated, truncated and the new
single frame; an episode start sends its first frame. Steps go in batches
numbered per incarnation (``seq``), so the learner can count what was lost. The
worker stacks frames itself for its actor. It waits (phase ``waiting_learner``)
when the learner's update-to-data ratio says it is too far ahead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from protocol.config import Config, load_config
from protocol.heartbeat import HeartbeatSender, Progress
from protocol.logs import get_logger
from protocol.messages import EPISODE, HELLO, PROGRESS, STEPS, WEIGHTS
from protocol.sockets import Receiver, load_endpoints, make_socket, send
from worker.envs import ActionScaler, FrameStack, frame_of, make_env
from worker.faults import FaultInjector

# Steps a worker may buffer towards a dead learner before send() would block:
# ZeroMQ queues up to this many batches, then the worker waits.
STEPS_HWM = 64


class Interrupted(Exception):
    """Raised by the SIGTERM handler when the worker is blocked inside the environment."""


class StepBatch:
    """Entries waiting to be sent: an entry is an episode start (frame only) or a transition."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.first, self.frames, self.actions, self.rewards, self.terminated, self.truncated = [], [], [], [], [], []
        self.opened_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.first)

    def add(self, frame, action, reward=0.0, terminated=False, truncated=False, first=False) -> None:
        if not self.first:
            self.opened_at = time.monotonic()
        self.first.append(first)
        self.frames.append(frame)
        self.actions.append(action)
        self.rewards.append(reward)
        self.terminated.append(terminated)
        self.truncated.append(truncated)

    def transitions(self) -> int:
        return len(self.first) - sum(self.first)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "first": np.asarray(self.first, np.uint8),
            "frames": np.stack(self.frames),
            "actions": np.asarray(self.actions, np.float32),
            "rewards": np.asarray(self.rewards, np.float32),
            "terminated": np.asarray(self.terminated, np.uint8),
            "truncated": np.asarray(self.truncated, np.uint8),
        }


class EnvWorker:
    """One env-worker: the loop of ``reset -> step* -> send`` with heartbeats on the side."""

    def __init__(self, cfg: Config, run_dir: Path, slot: int, incarnation: int, watch_parent: bool = True):
        self.cfg = cfg
        self.slot = slot
        self.incarnation = incarnation
        self.name = f"worker-{slot}"
        self.log = get_logger(run_dir, self.name, cfg.run.debug).bind(incarnation=incarnation)
        self.progress = Progress()
        self.ctx = zmq.Context()
        eps = load_endpoints(run_dir)
        self.heartbeat = HeartbeatSender(self.ctx, eps["heartbeat"], name=self.name, role="worker",
                                         incarnation=incarnation, progress=self.progress,
                                         interval_s=cfg.supervisor.heartbeat_interval_s, watch_parent=watch_parent)
        self.endpoints = eps
        self.seed = cfg.run.seed + 1000 * slot + 7 * incarnation
        self.rng = np.random.default_rng(self.seed)
        self.batch = StepBatch()
        self.seq = 0
        self.sent_transitions = 0
        # what the learner last told us (progress messages)
        self.learner_received = 0
        self.learner_allowed = 0
        self.learner_seen_mine = 0
        self.learner_heard = False
        self.done = False
        self.weights_version = -1
        self.stopping = False
        self.in_env_call = False

    # -- setup -------------------------------------------------------------

    def connect(self) -> None:
        self.progress.set_phase("connecting")
        self.steps_sock = make_socket(self.ctx, zmq.PUSH, hwm=STEPS_HWM)
        self.steps_sock.connect(self.endpoints["steps"])
        self.sub = make_socket(self.ctx, zmq.SUB, hwm=4)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(self.endpoints["weights"])
        self.inbox = Receiver(self.sub, self.log.warning)

    def make_envs(self) -> None:
        import torch

        from protocol.models import build_policy

        torch.set_num_threads(self.cfg.workers.torch_threads)
        env = make_env(self.cfg)
        self.env = FaultInjector(env, self.cfg.workers.faults, self.slot, self.incarnation, self.seed, self.log)
        self.eval_env = None
        self.scaler = ActionScaler(env.action_space)
        with self.env_call():
            obs, _ = self.env.reset(seed=self.seed)
        frame = frame_of(obs)
        self.frame_shape = frame.shape
        self.frame_dtype = frame.dtype
        self.stacker = FrameStack(self.cfg.env.frame_stack)
        self.obs_shape = self.stacker.reset(frame).shape
        self.policy = build_policy(self.obs_shape, self.scaler.dim, self.cfg.learner).eval()
        self._first_obs = obs
        send(self.steps_sock, HELLO, {"worker": self.name, "slot": self.slot, "incarnation": self.incarnation,
                                      "frame_shape": list(self.frame_shape), "frame_dtype": self.frame_dtype.str,
                                      "action_dim": self.scaler.dim})

    @contextlib.contextmanager
    def env_call(self):
        """Marks a call into the simulator, which SIGTERM may interrupt (see :func:`main`)."""
        self.in_env_call = True
        try:
            yield
        finally:
            self.in_env_call = False

    # -- acting ------------------------------------------------------------

    def act(self, stack: np.ndarray, explore: bool) -> np.ndarray:
        import torch

        if explore and self.global_steps() < self.cfg.workers.start_steps:
            return self.rng.uniform(-1.0, 1.0, self.scaler.dim).astype(np.float32)
        with torch.no_grad():
            action = self.policy(torch.from_numpy(stack).unsqueeze(0))[0].numpy()
        if explore and self.cfg.workers.exploration_noise > 0:
            action = action + self.rng.normal(0.0, self.cfg.workers.exploration_noise, action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def global_steps(self) -> int:
        """The run's env steps as far as this worker knows: the learner's count plus ours in flight."""
        return self.learner_received + max(0, self.sent_transitions + self.batch.transitions() - self.learner_seen_mine)

    # -- messages ----------------------------------------------------------

    def flush(self) -> None:
        if not len(self.batch):
            return
        fields = {"worker": self.name, "incarnation": self.incarnation, "seq": self.seq,
                  "env_steps": self.progress.env_steps}
        arrays = self.batch.arrays()
        while True:
            try:
                send(self.steps_sock, STEPS, fields, arrays, flags=zmq.NOBLOCK)
                break
            except zmq.Again:  # learner gone and our queue is full: wait, keep the batch
                self.progress.set_phase("waiting_learner")
                self.poll_learner(timeout_ms=200)
                if self.stopping:
                    return
        self.sent_transitions += self.batch.transitions()
        self.seq += 1
        self.batch.clear()

    def poll_learner(self, timeout_ms: int = 0) -> None:
        msg = self.inbox.recv(timeout_ms) if timeout_ms else None
        msgs = ([msg] if msg else []) + self.inbox.drain()
        latest_weights = None
        for m in msgs:
            if m.type == WEIGHTS:
                latest_weights = m
            elif m.type == PROGRESS:
                self.learner_heard = True
                self.learner_received = m["received"]
                self.learner_allowed = m["allowed"]
                self.learner_seen_mine = int(m["streams"].get(f"{self.name}/{self.incarnation}", 0))
                self.progress.updates = m["updates"]
                self.done = self.done or m["done"]
        if latest_weights is not None and latest_weights["version"] != self.weights_version:
            from protocol.models import load_policy_arrays

            try:
                load_policy_arrays(self.policy, latest_weights.arrays)
                self.weights_version = latest_weights["version"]
            except ValueError as exc:
                self.inbox.drop("bad_weights", str(exc))

    def wait_for_learner(self) -> None:
        """Rate limiting: hold while our steps would push the run past the learner's allowance."""
        while not self.stopping and not self.done:
            self.poll_learner()
            if not self.learner_heard or self.global_steps() < self.learner_allowed:
                return
            self.flush()
            self.progress.set_phase("waiting_learner")
            self.poll_learner(timeout_ms=100)

    def send_episode(self, reward: float, length: int, evaluation: bool, env_steps: int | None = None) -> None:
        try:
            send(self.steps_sock, EPISODE, {"worker": self.name, "incarnation": self.incarnation,
                                            "reward": float(reward), "length": int(length), "eval": evaluation,
                                            "env_steps": self.global_steps() if env_steps is None else env_steps},
                 flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the learner is gone; an episode summary is not worth blocking for

    # -- evaluation --------------------------------------------------------

    def evaluate(self) -> None:
        """Episodes without exploration noise, on an env of their own."""
        if self.eval_env is None:
            self.eval_env = make_env(self.cfg)
        self.progress.set_phase("evaluating")
        stacker = FrameStack(self.cfg.env.frame_stack)
        at = self.global_steps()  # one x-axis point for the whole round
        for i in range(self.cfg.workers.eval_episodes):
            with self.env_call():
                obs, _ = self.eval_env.reset(seed=self.seed + 10_000 + i)
            stack = stacker.reset(frame_of(obs))
            total, length, done = 0.0, 0, False
            while not done and not self.stopping:
                action = self.scaler.to_env(self.act(stack, explore=False))
                with self.env_call():
                    obs, reward, term, trunc, _ = self.eval_env.step(action)
                stack = stacker.push(frame_of(obs))
                total += float(reward)
                length += 1
                done = term or trunc
                self.progress.eval_steps += 1
            self.send_episode(total, length, evaluation=True, env_steps=at)
            self.log.info("evaluation episode", reward=total, length=length)

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except Interrupted:
            # stopped inside the simulator: the step in flight is dropped, the episode is cut
            # (truncated, not terminal: the learner keeps bootstrapping its last stored step)
            self.progress.set_phase("closing")
            self.flush()
            self.log.info("worker interrupted in the environment", env_steps=self.progress.env_steps)
            return 0

    def _run(self) -> int:
        self.heartbeat.start()
        self.log.info("worker starting", pid=os.getpid(), seed=self.seed)
        self.connect()
        self.progress.set_phase("starting")
        self.make_envs()
        wcfg = self.cfg.workers
        eval_every = max(1, wcfg.eval_freq // max(1, wcfg.count)) if wcfg.eval_freq else 0
        obs = self._first_obs
        stack = self.stacker.reset(frame_of(obs))
        self.batch.add(frame_of(obs), np.zeros(self.scaler.dim, np.float32), first=True)
        ep_reward, ep_len = 0.0, 0
        while not self.stopping and not self.done:
            self.wait_for_learner()
            if self.stopping or self.done:
                break
            self.progress.set_phase("stepping")
            action = self.act(stack, explore=True)
            with self.env_call():
                obs, reward, term, trunc, _ = self.env.step(self.scaler.to_env(action))
            frame = frame_of(obs)
            stack = self.stacker.push(frame)
            self.batch.add(frame, action, float(reward), bool(term), bool(trunc))
            self.progress.env_steps += 1
            ep_reward += float(reward)
            ep_len += 1
            if term or trunc:
                self.progress.episodes += 1
                self.send_episode(ep_reward, ep_len, evaluation=False)
                ep_reward, ep_len = 0.0, 0
                self.progress.set_phase("resetting")
                with self.env_call():
                    obs, _ = self.env.reset()
                stack = self.stacker.reset(frame_of(obs))
                self.batch.add(frame_of(obs), np.zeros(self.scaler.dim, np.float32), first=True)
            if len(self.batch) >= wcfg.batch_steps or time.monotonic() - self.batch.opened_at >= wcfg.batch_interval_s:
                self.flush()
            if eval_every and self.progress.env_steps % eval_every == 0:
                self.flush()
                self.evaluate()
        self.progress.set_phase("closing")
        # An episode cut here is truncated, not terminal: the learner keeps bootstrapping it.
        self.flush()
        self.log.info("worker stopping", env_steps=self.progress.env_steps, done=self.done,
                      dropped=dict(self.inbox.dropped))
        return 0

    def close(self) -> None:
        self.heartbeat.stop()
        self.ctx.destroy(linger=0)


def wait_for_activation() -> int | None:
    """A standby worker: everything heavy is imported; wait for the supervisor to hand over an incarnation.

    Starting Python with torch and the simulator's client takes seconds; a standby
    process per slot takes that out of the time from a freeze to stepping again.
    """
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    import gymnasium  # noqa: F401
    import torch  # noqa: F401

    import protocol.models  # noqa: F401

    try:
        import highway_env  # noqa: F401
    except ImportError:
        pass
    line = sys.stdin.readline()  # EOF: the supervisor is gone or does not need us
    if not line.startswith("activate "):
        return None
    return int(line.split()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker", description="Run one env-worker of a run.")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--slot", required=True, type=int)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--standby", action="store_true", help="import, then wait for 'activate N' on stdin")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us
    if args.standby:
        incarnation = wait_for_activation()
        if incarnation is None:
            return 0
        args.incarnation = incarnation
    cfg = load_config(args.run_dir / "config.yaml")
    worker = EnvWorker(cfg, args.run_dir, args.slot, args.incarnation)

    def on_term(signum, frame):
        worker.stopping = True
        if worker.in_env_call:
            raise Interrupted()  # a Python-level hang ends here; a native one ends with SIGKILL

    signal.signal(signal.SIGTERM, on_term)
    try:
        return worker.run()
    except Exception:
        worker.log.exception("worker failed")
        return 1
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
