"""What a checkpoint costs against the updates between two of them: could the learner checkpoint on every
weight broadcast, so a killed learner redoes at most ``publish_every`` updates instead of ``checkpoint_every``?

Measured on the embedded default's shapes (84x84 frames stacked 4, the ``nature`` encoder, batch 256): the
time of one TD3 update, and of one checkpoint as the learner writes it (replay maps flushed and fsynced, its
index, the agent with its optimizers, atomically). Prints the share of learner time a checkpoint every
``publish_every`` (50) updates would take, against today's every ``checkpoint_every`` (2000).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FRAME = (1, 84, 84)
STACK = 4
ENTRIES = 20_000


def run(updates: int = 30, checkpoints: int = 10) -> dict:
    from learner.checkpoints import Checkpoints
    from learner.replay import ReplayBuffer
    from learner.td3 import TD3Agent
    from protocol.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
    lcfg = cfg.learner
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as d:
        rb = ReplayBuffer(Path(d) / "replay", ENTRIES, FRAME, np.uint8, 2)

        def add(seq: int) -> None:
            first = np.zeros(100, np.uint8)
            first[0] = 1
            rb.add_batch("w/0", seq, first, rng.integers(0, 255, (100,) + FRAME, dtype=np.uint8),
                         rng.uniform(-1, 1, (100, 2)).astype(np.float32), rng.normal(size=100).astype(np.float32),
                         np.zeros(100, np.uint8), np.zeros(100, np.uint8))

        for seq in range(ENTRIES // 100):
            add(seq)
        agent = TD3Agent((STACK,) + FRAME[1:], 2, lcfg, device)
        t0 = time.perf_counter()
        for _ in range(updates):
            agent.update(rb.sample(lcfg.batch_size, STACK, lcfg.n_step, lcfg.gamma, rng))
        update_s = (time.perf_counter() - t0) / updates
        ck = Checkpoints(Path(d) / "checkpoints")
        seq = ENTRIES // 100
        times = []
        for _ in range(checkpoints):
            for _ in range(2):  # what arrives between two weight broadcasts, dirtying the maps
                add(seq)
                seq += 1
            t0 = time.perf_counter()
            rb.flush()
            ck.save("latest", agent.state_dict(), 1, rb.index(), None)
            times.append(time.perf_counter() - t0)
        size = (Path(d) / "checkpoints" / "latest.pt").stat().st_size
    checkpoint_s = float(np.median(times))
    share = {every: checkpoint_s / (checkpoint_s + every * update_s)
             for every in (lcfg.publish_every, lcfg.checkpoint_every)}
    result = {"update_s": round(update_s, 4), "checkpoint_s": round(checkpoint_s, 4),
              "checkpoint_mb": round(size / 2**20, 1),
              "share_every_publish": round(share[lcfg.publish_every], 4),
              "share_every_checkpoint": round(share[lcfg.checkpoint_every], 5),
              "publish_every": lcfg.publish_every, "checkpoint_every": lcfg.checkpoint_every}
    print(f"update {update_s * 1000:.1f} ms, checkpoint {checkpoint_s * 1000:.1f} ms ({size / 2**20:.1f} MiB); "
          f"a checkpoint every {lcfg.publish_every} updates would take {share[lcfg.publish_every]:.1%} of the "
          f"learner's time, every {lcfg.checkpoint_every} takes {share[lcfg.checkpoint_every]:.2%}", flush=True)
    return result


if __name__ == "__main__":
    run()
