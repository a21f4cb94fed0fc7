"""Updates per second: this learner's TD3 against Stable-Baselines3's TD3, same machine, same run.

Both sample a batch of 256 from their own replay (84x84 frames, 4 stacked) and
run one TD3 update; ours uses the ``nature`` encoder in ``shared`` mode (and, for
reference, ``separate``), SB3 its ``CnnPolicy`` (the same Nature CNN, one for the
actor and one for the critic, as SB3's TD3 does by default). Target: at least 2x
SB3's rate on CPU. Ours runs as the learner does: updates whose metrics stay on the
device, read every ``learner.metrics_read_every`` updates.

Then the same at batch 2, where the compute is nil and what is left is each
update's host overhead (launches, Python, reads): ours against SB3 at batch 2.

On a GPU (``run_gpu``): shared and separate, fp32 and bf16, with the frames on the
device and the update graphed, against SB3 in the same run, and the earlier path
(frames from the host, eager updates) beside them, each with a profile: ms per
update, launches and kernels per update, the host's time blocked, bytes copied to
the device per update.
"""

from __future__ import annotations

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


def ours(mode: str, device: torch.device, steps: int, entries: int = 5000, batch: int = BATCH,
         frames: str = "host", amp: bool = False, cuda_graph: bool = True, profile: bool = False) -> dict:
    """Our updates/s through the learner's own pieces: its sampler thread, its updater (graphed on a GPU whose
    frames are on the device), its metrics pipe. ``frames``: where stacks are gathered (learner.frames).
    ``profile`` (a GPU): launches, kernels and host time blocked per update, from torch's profiler."""
    from learner.frames import DeviceFrames
    from learner.graphs import GraphedUpdates
    from learner.metrics import MetricsPipe
    from learner.replay import ReplayBuffer
    from learner.sampler import Sampler
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
        lcfg = LearnerConfig(encoder="nature", encoder_mode=mode, batch_size=batch, amp=amp, cuda_graph=cuda_graph,
                             learning_starts=0)
        agent = TD3Agent((STACK,) + FRAME[1:], 2, lcfg, device)
        draws = frames == "device"
        if draws:
            agent.frames = DeviceFrames(rb, device, agent.copies)
        updater = GraphedUpdates(agent) if draws and agent.graphed else agent
        pipe = MetricsPipe(agent.host_reads, lcfg.metrics_read_every, lambda *_: None)
        sampler = Sampler(rb, threading.Lock(), lcfg, STACK, np.random.default_rng(1), agent.augment_on_host,
                          draws=draws)
        stop = threading.Event()
        thread = threading.Thread(target=sampler.run, args=(stop.is_set,), daemon=True)
        thread.start()

        def updates(n):  # the learner's loop: the update, its metrics read with their neighbours'
            for _ in range(n):
                b = None
                while b is None:
                    b = sampler.next()
                keys, values = updater.update_deferred(b)
                pipe.add(agent.updates, keys, values, 0.0)
            pipe.flush()
            if device.type == "cuda":
                torch.cuda.synchronize()

        try:
            updates(10)  # warm-up (on a GPU: the eager updates, then both graphs captured)
            copied = agent.copies.bytes
            t0 = time.perf_counter()
            updates(steps)
            out = {"updates_per_s": steps / (time.perf_counter() - t0),
                   "h2d_bytes_per_update": (agent.copies.bytes - copied) / steps}
            if profile and device.type == "cuda":
                out.update(profiled(lambda: updates(20), 20))
            return out
        finally:
            stop.set()
            thread.join()


def profiled(work, n: int) -> dict:
    """Per update, from torch's profiler: kernel and graph launches from the host, kernels run on the device, and
    the host's time blocked on the device (synchronisations and reads)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
    launches = kernels = 0
    blocked_us = 0.0
    for e in prof.events():
        if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaGraphLaunch"):
            launches += 1
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            blocked_us += e.cpu_time_total
    return {"launches_per_update": launches / n, "kernels_per_update": kernels / n,
            "blocked_ms_per_update": blocked_us / 1000 / n}


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
    return run_gpu(device) if device.type == "cuda" else run_cpu(device, min(steps, 30))


def run_cpu(device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    base = sb3(device, steps)
    shared = ours("shared", device, steps)
    separate = ours("separate", device, steps)
    drawn = ours("shared", device, steps, frames="device")
    print(f"TD3 updates/s on {device.type} ({torch.get_num_threads()} threads), batch {BATCH}, 84x84x{STACK}, "
          f"nature encoder:")
    print(f"  SB3 TD3 CnnPolicy (baseline): {base:7.2f}")
    print(f"  ours, shared encoder:         {shared['updates_per_s']:7.2f}   ratio {shared['updates_per_s'] / base:.2f}x"
          f"   target >= 2x: {'met' if shared['updates_per_s'] / base >= 2 else 'MISSED'}")
    print(f"  ours, separate encoders:      {separate['updates_per_s']:7.2f}   ratio "
          f"{separate['updates_per_s'] / base:.2f}x")
    print(f"  ours, shared, frames gathered from a copy (learner.frames: device): {drawn['updates_per_s']:7.2f}   "
          f"ratio {drawn['updates_per_s'] / base:.2f}x; host-to-device bytes per update "
          f"{drawn['h2d_bytes_per_update']:,.0f} (frames from the host: {shared['h2d_bytes_per_update']:,.0f})")
    small = 2  # compute is nil: each update's host overhead
    small_steps = 300
    base_small = sb3(device, small_steps, small)
    shared_small = ours("shared", device, small_steps, batch=small)["updates_per_s"]
    print(f"host overhead, batch {small} (updates/s; more is less overhead):")
    print(f"  SB3 TD3 CnnPolicy (baseline): {base_small:7.2f}")
    print(f"  ours, shared encoder:         {shared_small:7.2f}   ratio {shared_small / base_small:.2f}x")
    return {"device": device.type, "sb3": base, "shared": shared, "separate": separate, "shared_frames_device": drawn,
            "ratio_shared": shared["updates_per_s"] / base, "ratio_separate": separate["updates_per_s"] / base,
            "sb3_batch2": base_small, "shared_batch2": shared_small, "ratio_shared_batch2": shared_small / base_small}


def run_gpu(device: torch.device, steps: int = 300) -> dict:
    """The GPU mode: shared and separate, fp32 and bf16, graphed with the frames on the device, against SB3 in the
    same run; the learner's earlier path (frames from the host, eager) profiled beside it. Target: >= 1,000
    updates/s shared fp32 on an H200."""
    torch.manual_seed(0)
    base = sb3(device, steps)
    print(f"TD3 updates/s on {torch.cuda.get_device_name(device)}, batch {BATCH}, 84x84x{STACK}, nature encoder:")
    print(f"  SB3 TD3 CnnPolicy (baseline): {base:8.1f}")
    out: dict = {"device": torch.cuda.get_device_name(device), "sb3": base}
    cases = [("eager_host_frames", dict(mode="shared", frames="host", cuda_graph=False)),
             ("eager_device_frames", dict(mode="shared", frames="device", cuda_graph=False))]
    cases += [(f"{mode}_{'bf16' if amp else 'fp32'}", dict(mode=mode, frames="device", amp=amp))
              for mode in ("shared", "separate") for amp in (False, True)]
    for name, kw in cases:
        r = ours(device=device, steps=steps, profile=True, **kw)
        out[name] = r
        print(f"  ours, {name:22s} {r['updates_per_s']:8.1f}   ratio {r['updates_per_s'] / base:6.2f}x   "
              f"{1000 / r['updates_per_s']:.2f} ms/update, {r['launches_per_update']:.0f} launches, "
              f"{r['kernels_per_update']:.0f} kernels, {r['blocked_ms_per_update']:.3f} ms blocked, "
              f"{r['h2d_bytes_per_update']:,.0f} B to the device per update")
    rate = out["shared_fp32"]["updates_per_s"]
    print(f"  target >= 1,000 updates/s shared fp32: {'met' if rate >= 1000 else 'MISSED'} ({rate:.0f})")
    return out
