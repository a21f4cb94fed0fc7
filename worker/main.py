"""The env-worker: steps one environment, acts with a local actor, streams steps to the learner.

Per step the worker sends the action, reward, terminated, truncated and the new
single frame; an episode start sends its first frame. The worker stacks frames
itself for its actor. Its jobs: acting and batching (here), the link to the
learner with its waiting (:mod:`worker.learner_link`), evaluation
(:mod:`worker.evaluation`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import zmq

from protocol.chaos import REQUEST_SIGNAL
from protocol.config import Config, load_config
from protocol.curve import KeyFileError, load_public, load_secret, tcp_endpoints
from protocol.exits import FatalError, exit_on_error
from protocol.heartbeat import HeartbeatSender, Progress
from protocol.logs import get_logger
from protocol.messages import PHASE_STARTING
from protocol.roles import WORKER, worker_name
from protocol.simulators import EXIT_SIMULATOR_RECYCLE, EXIT_SIMULATOR_STALLED, SimulatorStalled
from protocol.sockets import load_endpoints
from worker.envs import ActionScaler, FrameStack, frame_of, make_env
from worker.evaluation import evaluate
from worker.faults import FaultInjector, on_request_signal
from worker.learner_link import LearnerLink

# Seeds of evaluation episodes are this far from the worker's own, so they never repeat a training episode.
EVAL_SEED_OFFSET = 10_000


class Interrupted(Exception):
    """Raised by the SIGTERM handler when the worker is blocked inside the environment."""


class RecycleSimulator(Exception):
    """The slot's simulator has served its share of episodes: ask for a fresh one."""


class EnvWorker:
    """One env-worker: the loop of ``reset -> step* -> send`` with heartbeats on the side."""

    def __init__(self, cfg: Config, run_dir: Path, slot: int, incarnation: int, watch_parent: bool = True,
                 name: str | None = None):
        self.cfg = cfg
        self.slot = slot
        self.incarnation = incarnation
        self.name = name or worker_name(slot)
        self.run_dir = Path(run_dir)
        self.log = get_logger(run_dir, self.name, cfg.run.debug).bind(incarnation=incarnation)
        self.progress = Progress()
        self.ctx = zmq.Context()
        self.endpoints = load_endpoints(run_dir)
        self.heartbeat = HeartbeatSender(self.ctx, self.endpoints["heartbeat"], name=self.name, role=WORKER,
                                         incarnation=incarnation, progress=self.progress,
                                         interval_s=cfg.supervisor.heartbeat_interval_s, watch_parent=watch_parent)
        self.seed = cfg.run.seed + 1000 * slot + 7 * incarnation
        self.rng = np.random.default_rng(self.seed)
        self.stopping = False
        self.in_env_call = False
        self.eval_env = None

    # -- setup -------------------------------------------------------------

    def connect(self) -> None:
        self.progress.set_phase("connecting")
        endpoints, curve = self.endpoints, None
        wc = self.cfg.workers
        if wc.learner:  # a learner on another host: its TCP endpoints, with this host's key where it has one
            endpoints = dict(endpoints, **tcp_endpoints(wc.learner))
            if wc.curve_key:
                try:
                    curve = (*load_secret(Path(wc.curve_key), "workers.curve_key"),
                             load_public(Path(wc.learner_key), "workers.learner_key"))
                except KeyFileError as exc:
                    raise FatalError(str(exc)) from None
        # at a learner elsewhere this host's workers go by HOST:worker-N (each host has a worker-0)
        host = self.cfg.worker_host()
        wire_name = f"{host}:{self.name}" if host else self.name
        self.link = LearnerLink(self.ctx, endpoints, wire_name, self.incarnation, self.progress, self.log,
                                lambda: self.stopping, curve=curve, absent_s=wc.learner_absent_s if wc.learner else 0)

    def make_envs(self) -> None:
        from policy.acting import ActingPolicy

        env = make_env(self.cfg, self.slot, self.incarnation, self.seed)
        self.raw_env = env
        self.env = FaultInjector(env, self.cfg.workers.faults, self.slot, self.incarnation, self.seed, self.log,
                                 requests=(self.run_dir, self.name))
        self.scaler = ActionScaler(env.action_space)
        with self.env_call():
            obs, _ = self.env.reset(seed=self.seed)
        frame = frame_of(obs)
        if frame.nbytes > self.cfg.env.max_frame_bytes:
            raise FatalError(f"the env's frames are {frame.nbytes} bytes ({frame.dtype} {frame.shape}), above "
                             f"env.max_frame_bytes {self.cfg.env.max_frame_bytes}; raise env.max_frame_bytes")
        self.stacker = FrameStack(self.cfg.env.frame_stack)
        obs_shape = self.stacker.reset(frame).shape
        # the learner's network in numpy (no torch in a worker); its first weights, before the learner's arrive,
        # from the worker's seed
        self.policy = ActingPolicy(obs_shape, self.scaler.dim, self.cfg.learner, seed=self.seed)
        self.link.on_weights = self.load_weights
        self._first_obs = obs
        self.link.hello(self.slot, frame, self.scaler.dim)

    def load_weights(self, arrays: dict, version: int) -> None:
        """The learner's newest weights into the acting network; the version goes into the heartbeat (``status``
        shows which weights each worker acts with: weights that stop coming are a stale policy)."""
        self.policy.load(arrays)
        self.progress.weights = version

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
        if explore and self.link.run_steps() < self.cfg.workers.start_steps:
            return self.rng.uniform(-1.0, 1.0, self.scaler.dim).astype(np.float32)
        action = self.policy(stack)
        if explore and self.cfg.workers.exploration_noise > 0:
            action = action + self.rng.normal(0.0, self.cfg.workers.exploration_noise, action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def evaluate(self) -> None:
        if self.eval_env is None:
            # one simulator per slot: a CARLA worker evaluates in its own world (the training episode is cut)
            self.eval_env = self.env if self.cfg.env.backend == "carla" else make_env(self.cfg)
        at = self.link.run_steps()  # one x-axis point for the whole round

        def report(total: float, length: int, reason: str | None = None) -> None:
            self.link.episode(total, length, evaluation=True, env_steps=at, reason=reason)
            self.log.info("evaluation episode", reward=total, length=length, reason=reason)

        evaluate(self.eval_env, lambda stack: self.scaler.to_env(self.act(stack, explore=False)),
                 self.cfg.workers.eval_episodes, self.cfg.env.frame_stack, self.seed + EVAL_SEED_OFFSET,
                 self.progress, lambda: self.stopping, self.env_call, report)

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except Interrupted:
            # stopped inside the simulator: the step in flight is dropped, the episode is cut
            # (truncated, not terminal: the learner keeps bootstrapping its last stored step)
            self.progress.set_phase("closing")
            self.link.flush()
            self.log.info("worker interrupted in the environment", env_steps=self.progress.env_steps)
            return 0
        except SimulatorStalled as exc:
            # what was collected is kept; the episode is cut (truncated) and the slot's simulator replaced
            self.progress.set_phase("closing")
            self.link.flush()
            self.log.error("simulator stalled", error=str(exc), env_steps=self.progress.env_steps)
            self.heartbeat.last_word(f"simulator stalled: {exc}")  # the simulator's incident names its cause by it
            return EXIT_SIMULATOR_STALLED
        except RecycleSimulator:
            self.progress.set_phase("closing")
            self.link.flush()
            self.log.info("asking for a fresh simulator", episodes=self.progress.episodes)
            return EXIT_SIMULATOR_RECYCLE

    def _run(self) -> int:
        self.heartbeat.start()
        self.log.info("worker starting", pid=os.getpid(), seed=self.seed)
        self.connect()
        self.progress.set_phase(PHASE_STARTING)
        self.make_envs()
        wcfg = self.cfg.workers
        link, batch = self.link, self.link.batch
        eval_every = max(1, wcfg.eval_freq // max(1, wcfg.count)) if wcfg.eval_freq else 0
        no_action = np.zeros(self.scaler.dim, np.float32)
        stack = self.stacker.reset(frame_of(self._first_obs))
        batch.add(frame_of(self._first_obs), no_action, first=True)
        ep_reward, ep_len = 0.0, 0
        recycle_after = self.cfg.env.carla.recycle_episodes if self.recycles_simulator() else 0
        while not self.stopping and not link.done:
            link.wait_for_allowance()
            if self.stopping or link.done:
                break
            self.progress.set_phase("stepping")
            action = self.act(stack, explore=True)
            with self.env_call():
                obs, reward, term, trunc, info = self.env.step(self.scaler.to_env(action))
            frame = frame_of(obs)
            stack = self.stacker.push(frame)
            batch.add(frame, action, float(reward), bool(term), bool(trunc))
            self.progress.env_steps += 1
            self.progress.frame = info.get("frame")
            ep_reward += float(reward)
            ep_len += 1
            if term or trunc:
                self.progress.episodes += 1
                link.episode(ep_reward, ep_len, evaluation=False, reason=info.get("reason"))
                ep_reward, ep_len = 0.0, 0
                if recycle_after and self.progress.episodes >= recycle_after:
                    raise RecycleSimulator()
                stack = self.begin_episode()
            if batch.due(wcfg.batch_steps, wcfg.batch_interval_s):
                link.flush()
                self.progress.dropped = link.inbox.dropped_total
            if eval_every and self.progress.env_steps % eval_every == 0:
                link.flush()
                self.evaluate()
                if self.eval_env is self.env:  # the training episode was cut: it ends truncated here
                    ep_reward, ep_len = 0.0, 0
                    stack = self.begin_episode()
        self.progress.set_phase("closing")
        # An episode cut here is truncated, not terminal: the learner keeps bootstrapping it.
        link.flush()
        self.log.info("worker stopping", env_steps=self.progress.env_steps, done=link.done,
                      dropped=dict(link.inbox.dropped))
        return 0

    def begin_episode(self) -> np.ndarray:
        """Reset the env and open a new episode in the batch; returns the first frame stack."""
        self.progress.set_phase("resetting")
        with self.env_call():
            obs, _ = self.env.reset()
        self.link.batch.add(frame_of(obs), np.zeros(self.scaler.dim, np.float32), first=True)
        return self.stacker.reset(frame_of(obs))

    def recycles_simulator(self) -> bool:
        """Only a simulator the supervisor runs can be recycled on request."""
        return self.cfg.has_containers()

    def close(self) -> None:
        env = getattr(self, "raw_env", None)
        if env is not None and not self.in_env_call:
            try:
                env.close()  # bounded: a hung simulator is not waited for
            except Exception as exc:
                self.log.warning("env close failed", error=repr(exc))
        self.heartbeat.stop()
        self.ctx.destroy(linger=0)


def wait_for_activation() -> int | None:
    """A standby worker: everything heavy is imported; wait for the supervisor to hand over an incarnation.

    Starting Python with gymnasium and the simulator's client takes seconds; a standby
    process per slot takes that out of the time from a freeze to stepping again.
    """
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    import gymnasium  # noqa: F401

    import policy.acting  # noqa: F401

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
    parser.add_argument("--name", help="the name the supervisor knows this process by (default worker-SLOT)")
    parser.add_argument("--standby", action="store_true", help="import, then wait for 'activate N' on stdin")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us
    signal.signal(REQUEST_SIGNAL, on_request_signal)  # a chaos fault waits for the next step(); never the default (exit)
    if args.standby:
        incarnation = wait_for_activation()
        if incarnation is None:
            return 0
        args.incarnation = incarnation
    cfg = load_config(args.run_dir / "config.yaml")
    worker = EnvWorker(cfg, args.run_dir, args.slot, args.incarnation, name=args.name)

    def on_term(signum, frame):
        worker.stopping = True
        if worker.in_env_call:
            raise Interrupted()  # a Python-level hang ends here; a native one ends with SIGKILL

    signal.signal(signal.SIGTERM, on_term)
    try:
        return worker.run()
    except Exception as exc:
        return exit_on_error(exc, args.run_dir, worker.name, worker.log, worker.heartbeat)
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
