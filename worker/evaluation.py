"""Evaluation episodes: the current policy without exploration noise, on an env of its own."""

from __future__ import annotations

from typing import Callable

import numpy as np

from protocol.heartbeat import Progress
from worker.envs import FrameStack, frame_of


def evaluate(env, act: Callable[[np.ndarray], np.ndarray], episodes: int, frame_stack: int, seed: int,
             progress: Progress, stopping: Callable[[], bool], env_call,
             on_episode: Callable[..., None]) -> None:
    """Run ``episodes`` episodes, reporting each finished one. Steps count as progress (``eval_steps``).

    ``env_call`` marks each call into the simulator (a stop may interrupt it); an
    episode cut by a stop is not reported.
    """
    progress.set_phase("evaluating")
    stacker = FrameStack(frame_stack)
    for i in range(episodes):
        with env_call():
            obs, _ = env.reset(seed=seed + i)
        stack = stacker.reset(frame_of(obs))
        total, length, done, info = 0.0, 0, False, {}
        while not done and not stopping():
            with env_call():
                obs, reward, term, trunc, info = env.step(act(stack))
            stack = stacker.push(frame_of(obs))
            total += float(reward)
            length += 1
            done = term or trunc
            progress.eval_steps += 1
        if not done:
            return
        on_episode(total, length, info.get("reason"))
