"""Updates per second: this learner's TD3 against Stable-Baselines3's TD3, same machine, same run.

Both sample a batch of 256 from their own replay (84x84 frames, 4 stacked) and
run one TD3 update; ours uses the ``nature`` encoder in ``shared`` mode (and, for
reference, ``separate``), SB3 its ``CnnPolicy`` (the same Nature CNN, one for the
actor and one for the critic, as SB3's TD3 does by default). Target: at least 2x
SB3's rate on CPU. Ours runs as the learner does: updates whose metrics stay on the
device, read every ``learner.metrics_read_every`` updates.

Then the same at batch 2, where the compute is nil and what is left is each
update's host overhead (launches, Python, reads): ours against SB3 at batch 2.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

BATCH = 256
FRAME = (1, 84, 84)
STACK = 4


class ImageEnv(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (STACK,) + FRAME[1:], np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def ours(mode: str, device: torch.device, steps: int, entries: int = 5000, batch: int = BATCH) -> float:
    from learner.metrics import MetricsPipe
    from learner.replay import ReplayBuffer
    from learner.td3 import TD3Agent
    from protocol.config import LearnerConfig

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        rb = ReplayBuffer(Path(d), entries, FRAME, np.uint8, 2)
        for seq in range(entries // 100):
            first = np.zeros(100, np.uint8)
            first[0] = seq % 10 == 0
            rb.add_batch("w/0", seq, first, rng.integers(0, 255, (100,) + FRAME, dtype=np.uint8),
                         rng.uniform(-1, 1, (100, 2)).astype(np.float32), rng.normal(size=100).astype(np.float32),
                         np.zeros(100, np.uint8), np.zeros(100, np.uint8))
        lcfg = LearnerConfig(encoder="nature", encoder_mode=mode, batch_size=batch)
        agent = TD3Agent((STACK,) + FRAME[1:], 2, lcfg, device)
        pipe = MetricsPipe(agent.host_reads, lcfg.metrics_read_every, lambda *_: None)

        def update(b):  # the learner's loop: the update, its metrics read with their neighbours'
            keys, values = agent.update_deferred(b)
            pipe.add(agent.updates, keys, values, 0.0)

        # the learner's pipeline: a sampler thread (gather, stack, shift on the host) feeds the update loop
        batches: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def sample_loop():
            srng = np.random.default_rng(1)
            while not stop.is_set():
                b = rb.sample(batch, STACK, 3, 0.99, srng)
                if agent.augment_on_host:
                    b.shift_on_host(4, srng)
                while not stop.is_set():
                    try:
                        batches.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        pass

        sampler = threading.Thread(target=sample_loop, daemon=True)
        sampler.start()
        try:
            for _ in range(3):  # warm-up
                update(batches.get())
            pipe.flush()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                update(batches.get())
            pipe.flush()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return steps / (time.perf_counter() - t0)
        finally:
            stop.set()
            sampler.join()


def sb3(device: torch.device, steps: int, batch: int = BATCH) -> float:
    from stable_baselines3 import TD3

    model = TD3("CnnPolicy", ImageEnv(), buffer_size=2000, batch_size=batch, learning_starts=0, device=device,
                verbose=0, seed=0)
    buf = model.replay_buffer
    rng = np.random.default_rng(0)
    n = 2000
    buf.observations[:n] = rng.integers(0, 255, buf.observations[:n].shape, dtype=np.uint8)
    buf.next_observations[:n] = rng.integers(0, 255, buf.next_observations[:n].shape, dtype=np.uint8)
    buf.actions[:n] = rng.uniform(-1, 1, buf.actions[:n].shape)
    buf.rewards[:n] = rng.normal(size=buf.rewards[:n].shape)
    buf.full = True
    model._setup_learn(total_timesteps=1)
    model.train(gradient_steps=3, batch_size=batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.train(gradient_steps=steps, batch_size=batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def run(steps: int = 30) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cpu":
        steps = min(steps, 30)
    base = sb3(device, steps)
    shared = ours("shared", device, steps)
    separate = ours("separate", device, steps)
    print(f"TD3 updates/s on {device.type} ({torch.get_num_threads()} threads), batch {BATCH}, 84x84x{STACK}, "
          f"nature encoder:")
    print(f"  SB3 TD3 CnnPolicy (baseline): {base:7.2f}")
    print(f"  ours, shared encoder:         {shared:7.2f}   ratio {shared / base:.2f}x   target >= 2x: "
          f"{'met' if shared / base >= 2 else 'MISSED'}")
    print(f"  ours, separate encoders:      {separate:7.2f}   ratio {separate / base:.2f}x")
    small = 2  # compute is nil: each update's host overhead
    small_steps = 300 if device.type == "cpu" else 1000
    base_small = sb3(device, small_steps, small)
    shared_small = ours("shared", device, small_steps, batch=small)
    print(f"host overhead, batch {small} (updates/s; more is less overhead):")
    print(f"  SB3 TD3 CnnPolicy (baseline): {base_small:7.2f}")
    print(f"  ours, shared encoder:         {shared_small:7.2f}   ratio {shared_small / base_small:.2f}x")
    return {"device": device.type, "sb3": base, "shared": shared, "separate": separate,
            "ratio_shared": shared / base, "ratio_separate": separate / base, "sb3_batch2": base_small,
            "shared_batch2": shared_small, "ratio_shared_batch2": shared_small / base_small}
