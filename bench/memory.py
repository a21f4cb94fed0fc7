"""Replay memory per transition against the size of one frame (target <= 1.15x at 84x84x1, stack 4)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def run(entries: int = 10_000) -> dict:
    from learner.replay import ReplayBuffer

    frame = 84 * 84
    with tempfile.TemporaryDirectory() as d:
        rb = ReplayBuffer(Path(d), entries, (1, 84, 84), np.uint8, 2)
        per_entry = rb.bytes_per_entry()
        on_disk = sum(f.stat().st_size for f in Path(d).glob("*.npy")) / entries
    stacked_pair = 2 * 4 * frame  # what a replay storing obs and next_obs stacks would hold (SB3's default)
    print(f"replay bytes per transition at 84x84x1, stack 4: {per_entry} in arrays, {on_disk:.0f} on disk")
    print(f"  ratio to one frame ({frame} B): {per_entry / frame:.3f} (target <= 1.15: "
          f"{'met' if per_entry / frame <= 1.15 else 'MISSED'})")
    print(f"  baseline, stacked obs + next_obs: {stacked_pair} B -> ours is {per_entry / stacked_pair:.3f}x of it")
    return {"bytes_per_transition": per_entry, "on_disk": on_disk, "frame": frame,
            "ratio": per_entry / frame, "baseline_stacked_pair": stacked_pair}
