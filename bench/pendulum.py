"""Learning is correct: configs/pendulum.yaml through the full stack (supervisor, 2 workers, learner).

Targets: a mean evaluation return of at least -250 within 20,000 env steps, and
no worse than Stable-Baselines3's TD3 at the same budget, trained in the same run
with the same hyperparameters (lr 1e-3, batch 256, 1,000 random steps, N(0, 0.1)
exploration noise, 256x256 MLPs); both final policies are evaluated without noise on
the same 50 start states.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = -250.0


def eval_rounds(run_dir: Path) -> list[tuple[int, float, int]]:
    """(env steps, mean return, episodes) per evaluation round, in order."""
    rounds: dict[tuple[int, str], list[float]] = defaultdict(list)
    for line in (run_dir / "eval.jsonl").read_text().splitlines():
        e = json.loads(line)
        rounds[(e["env_steps"], e["worker"])].append(e["reward"])
    return [(steps, sum(r) / len(r), len(r)) for (steps, _), r in sorted(rounds.items())]


EVAL_SEEDS = range(1000, 1050)  # the same 50 start states for both policies


def evaluate(act, seeds=EVAL_SEEDS) -> float:
    """Mean return of a deterministic policy (obs -> action in [-1, 1]) on fixed start states."""
    import gymnasium as gym
    import numpy as np

    env = gym.make("Pendulum-v1")
    total = 0.0
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            obs, r, term, trunc, _ = env.step(2.0 * np.clip(act(obs), -1.0, 1.0))
            total += r
            done = term or trunc
    return total / len(seeds)


def ours_final(run_dir: Path) -> float:
    import numpy as np
    import torch

    from policy.network import build_policy
    from protocol.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    policy = build_policy((3,), 1, cfg.learner)
    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    policy.load_state_dict(state["agent"]["policy"])
    policy.eval()

    def act(obs):
        with torch.no_grad():
            return policy(torch.from_numpy(np.asarray(obs, np.float32)).unsqueeze(0))[0].numpy()

    return evaluate(act)


def sb3_pendulum(steps: int = 20_000, seed: int = 0) -> float:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import TD3
    from stable_baselines3.common.noise import NormalActionNoise

    env = gym.make("Pendulum-v1")
    noise = NormalActionNoise(mean=np.zeros(1), sigma=0.1 * np.ones(1))  # on the [-1, 1]-scaled action, as ours
    model = TD3("MlpPolicy", env, learning_rate=1e-3, batch_size=256, learning_starts=1000, action_noise=noise,
                policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=steps)
    return evaluate(lambda obs: model.policy.scale_action(model.predict(obs, deterministic=True)[0]))


def run(config: str = "configs/pendulum.yaml", extra: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pendulum-") as d:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "supervisor", "up", "--config", config, "--runs-dir", d, "--run-id", "bench",
               "--no-live", *(extra or [])]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"pendulum run failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rounds = eval_rounds(Path(d) / "bench")
        final = ours_final(Path(d) / "bench")
    within = [r for r in rounds if r[0] <= 20_000]
    best = max(within, key=lambda r: r[1])
    baseline = rounds[0]
    t0 = time.monotonic()
    sb3 = sb3_pendulum()
    sb3_wall = time.monotonic() - t0
    print(f"pendulum via the full stack: {wall:.0f}s wall, {len(rounds)} evaluation rounds")
    for steps, mean, n in rounds:
        print(f"  {steps:>6} env steps: mean return {mean:8.1f} over {n} episodes")
    print(f"  baseline (first evaluation, {baseline[0]} steps): {baseline[1]:.1f}")
    print(f"  best within 20,000 steps: {best[1]:.1f} at {best[0]} steps; last: {rounds[-1][1]:.1f}")
    print(f"  target >= {TARGET:g}: {'met' if best[1] >= TARGET else 'MISSED'}")
    print(f"  final policies at 20,000 env steps on the same {len(EVAL_SEEDS)} start states: ours {final:.1f}, "
          f"SB3 TD3 (baseline, {sb3_wall:.0f}s wall) {sb3:.1f} -> {'no worse' if final >= sb3 else 'WORSE'} "
          f"(difference {final - sb3:+.1f})")
    return {"wall_s": wall, "rounds": rounds, "best": best, "baseline": baseline, "target": TARGET,
            "final": final, "sb3": sb3, "sb3_wall_s": sb3_wall}


def ours_pendulum(seed: int, config: str = "configs/pendulum.yaml") -> tuple[float, float]:
    """One full-stack run with ``run.seed`` = seed: (final policy's mean return, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-pendulum-") as d:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "supervisor", "up", "--config", config, "--runs-dir", d, "--run-id", "bench",
               "--no-live", "--seed", str(seed), "--eval-freq", "0"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"pendulum run failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return ours_final(Path(d) / "bench"), time.monotonic() - t0


def run_seeds(seeds=(0, 1, 2)) -> dict:
    """Three seeds of ours and of SB3's TD3, each final policy on the same 50 start states."""
    import numpy as np

    ours, sb3 = [], []
    for seed in seeds:
        final, wall = ours_pendulum(seed)
        ours.append(final)
        sb3.append(sb3_pendulum(seed=seed))
        print(f"  seed {seed}: ours {final:.1f} ({wall:.0f}s), SB3 TD3 {sb3[-1]:.1f}", flush=True)
    o, s = np.array(ours), np.array(sb3)
    print(f"pendulum, final policies at 20,000 env steps over seeds {list(seeds)}: ours {o.mean():.1f} +- {o.std():.1f}"
          f" (min {o.min():.1f}), SB3 TD3 (baseline) {s.mean():.1f} +- {s.std():.1f} (min {s.min():.1f}) -> "
          f"{'no worse' if o.mean() >= s.mean() else 'WORSE'}")
    return {"seeds": list(seeds), "ours": ours, "sb3": sb3}
