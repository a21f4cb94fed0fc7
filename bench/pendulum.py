"""Learning is correct: configs/pendulum.yaml through the full stack (supervisor, 2 workers, learner).

Target: a mean evaluation return of at least -250 within 20,000 env steps. The
baseline in the same run is the first evaluation, taken before any learning
counts (the policy is still near its random start).
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
    within = [r for r in rounds if r[0] <= 20_000]
    best = max(within, key=lambda r: r[1])
    baseline = rounds[0]
    print(f"pendulum via the full stack: {wall:.0f}s wall, {len(rounds)} evaluation rounds")
    for steps, mean, n in rounds:
        print(f"  {steps:>6} env steps: mean return {mean:8.1f} over {n} episodes")
    print(f"  baseline (first evaluation, {baseline[0]} steps): {baseline[1]:.1f}")
    print(f"  best within 20,000 steps: {best[1]:.1f} at {best[0]} steps; last: {rounds[-1][1]:.1f}")
    print(f"  target >= {TARGET:g}: {'met' if best[1] >= TARGET else 'MISSED'}")
    return {"wall_s": wall, "rounds": rounds, "best": best, "baseline": baseline, "target": TARGET}
