"""Stability from pixels: many TD3 updates of each design on one fixed replay.

The replay is filled once from the embedded default (racetrack-v1, 84x84 grayscale
camera, uniform random actions), then learners train on it side by side: ``shared``
with the Polyak-averaged target encoder (the default), ``shared`` with the online
encoder for the TD target (DrQ-v2's design), and the older ``separate`` mode with
``actor_cnn_lr`` 1e-4 (the setting whose actor loss went to -2.7e9 for our users). Each records Q, actor
loss, pre-clip gradient norms and every alert, with the update at which it fired.
Training on a fixed replay is a harsher test than online collection: nothing new
corrects an over-estimate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def collect(replay_dir: Path, steps: int, seed: int = 0) -> None:
    from learner.replay import ReplayBuffer
    from protocol.config import load_config
    from worker.envs import frame_of, make_env

    cfg = load_config(ROOT / "configs/default.yaml")
    env = make_env(cfg)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rb = ReplayBuffer(replay_dir, steps + steps // 5, frame_of(obs).shape, np.uint8, 2)
    rows, seq, done = [], 0, 0
    rows.append((1, frame_of(obs), np.zeros(2, np.float32), 0.0, 0, 0))
    while done < steps:
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        obs, r, term, trunc, _ = env.step(action[[1, 0]])
        rows.append((0, frame_of(obs), action, float(r), int(term), int(trunc)))
        done += 1
        if term or trunc:
            obs, _ = env.reset()
            rows.append((1, frame_of(obs), np.zeros(2, np.float32), 0.0, 0, 0))
        if len(rows) >= 256 or done == steps:
            cols = list(zip(*rows))
            rb.add_batch("collector/0", seq, np.array(cols[0], np.uint8), np.stack(cols[1]),
                         np.stack(cols[2]), np.array(cols[3], np.float32), np.array(cols[4], np.uint8),
                         np.array(cols[5], np.uint8))
            seq += 1
            rows = []
    rb.flush()


VARIANTS = {"shared": ("shared", "polyak"), "shared-online": ("shared", "online"), "separate": ("separate", "polyak")}


def train(replay_dir: Path, variant: str, updates: int, batch: int, out: Path, device: str = "cpu",
          amp: bool = False) -> None:
    import torch

    from learner.alerts import AlertMonitor
    from learner.replay import ReplayBuffer
    from learner.td3 import TD3Agent, q_max
    from protocol.config import load_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode, target_encoder = VARIANTS[variant]
    cfg = load_config(ROOT / "configs/default.yaml", [("learner.encoder_mode", mode),
                                                      ("learner.target_encoder", target_encoder),
                                                      ("learner.actor_cnn_lr", 1e-4),
                                                      ("learner.batch_size", batch), ("learner.amp", amp)])
    meta = json.loads((replay_dir / "meta.json").read_text())
    rb = ReplayBuffer(replay_dir, meta["capacity"], tuple(meta["frame_shape"]), np.uint8, 2)
    agent = TD3Agent((4, 84, 84), 2, cfg.learner, torch.device(device))
    monitor = AlertMonitor(q_max(cfg.env.reward_max, cfg.learner.gamma), cfg.learner)
    rng = np.random.default_rng(0)
    trace, alerts = [], []
    t0 = time.time()
    for u in range(1, updates + 1):
        b = rb.sample(batch, 4, cfg.learner.n_step, cfg.learner.gamma, rng)
        m = agent.update(b.shift_on_host(cfg.learner.augment_pad, rng))
        alerts += monitor.observe(u, m)
        if u % 250 == 0:
            trace.append({"updates": u, "q": m["train/q1_value"], "actor_loss": m.get("train/actor_loss"),
                          "critic_norm": m["gradients/critic_norm_before_clip"],
                          "actor_norm": m.get("gradients/actor_norm_before_clip"),
                          "actor_cnn_norm": m.get("gradients/actor_cnn_norm"), "elapsed_s": time.time() - t0})
            out.write_text(json.dumps({"mode": variant + (" (bf16)" if amp else ""), "trace": trace,
                                       "alerts": alerts, "counters": monitor.counters()}))


def summarize(result: dict) -> str:
    qs = [t["q"] for t in result["trace"]]
    losses = [t["actor_loss"] for t in result["trace"] if t["actor_loss"] is not None]
    first = {}
    for a in result["alerts"]:
        first.setdefault(a["rule"], a["updates"])
    alerts = ", ".join(f"{r} first at update {u}" for r, u in first.items()) or "none"
    return (f"{result['mode']:>8}: {result['trace'][-1]['updates']} updates, Q range [{min(qs):.2f}, {max(qs):.2f}], "
            f"final Q {qs[-1]:.2f}, final actor loss {losses[-1]:.2f}, alerts: {alerts}")


def run(updates: int = 20_000, batch: int = 64, steps: int = 20_000, variants=("shared", "shared-online")) -> dict:
    """Two at a time on two cores (the ``separate`` comparison: ``python -m bench.stability --variants ...``)."""
    with tempfile.TemporaryDirectory(prefix="bench-stability-") as d:
        d = Path(d)
        t0 = time.time()
        collect(d / "replay", steps)
        print(f"collected {steps} racetrack steps with random actions in {time.time() - t0:.0f}s", flush=True)
        procs = {}
        for mode in variants:
            out = d / f"{mode}.json"
            procs[mode] = (subprocess.Popen([sys.executable, "-m", "bench.stability", "--train", str(d / "replay"),
                                             "--mode", mode, "--updates", str(updates), "--batch", str(batch),
                                             "--out", str(out)], cwd=ROOT), out)
        for proc, _ in procs.values():
            proc.wait()
        results = {mode: json.loads(out.read_text()) for mode, (_, out) in procs.items()}
    print(f"stability, {updates} updates at batch {batch} on a fixed racetrack replay (Qmax = 100):")
    for mode in variants:
        print("  " + summarize(results[mode]))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=Path, help="train one variant on this replay (else: collect, then train all)")
    p.add_argument("--collect", type=Path, help="only fill a replay in this directory")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--mode", choices=sorted(VARIANTS), default="shared")
    p.add_argument("--updates", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.collect:
        collect(a.collect, a.steps)
    elif a.train:
        train(a.train, a.mode, a.updates, a.batch, a.out, a.device, a.amp)
    else:
        run(a.updates, a.batch, a.steps)
