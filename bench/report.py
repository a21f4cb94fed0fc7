"""bench report: how long ``supervisor report`` takes to read a long run's TensorBoard event files.

Writes the event files of a 100,000-update run with the learner's tags (40 scalars
per metric write, as ``learner/main.py`` writes them in an image run, plus episodes
every 1,000 updates) at ``learner.log_every`` 100 (the default) and 10, then times
:func:`runreport.tfevents.read_scalars` on them, and the whole report (analysis,
plots, markdown) at the default.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from runreport.tfevents import EventWriter, read_scalars

UPDATES = 100_000
TAGS = (["train/" + t for t in ("q1_value", "q2_value", "target_q", "q_abs_diff", "critic_loss", "actor_loss",
                                "batch_reward", "action_saturation")]
        + [f"gradients/{g}_norm{s}" for g in ("critic_cnn", "critic_mlp", "actor_mlp") for s in ("", "_after_clip")]
        + [f"gradients/{g}_norm_{w}_clip" for g in ("critic", "actor") for w in ("before", "after")]
        + ["gradients/critic_clip_fraction", "gradients/actor_clip_fraction"]
        + [f"params/{m}_{k}" for m in ("encoder", "critic", "actor") for k in ("norm", "update_ratio")]
        + ["agent/actor_lr", "agent/critic_lr", "perf/updates_per_s", "perf/update_to_data", "buffer/sample_age",
           "buffer/utilization", "buffer/transitions", "buffer/lost_steps", "protocol/dropped_messages",
           "alerts/gradient_explosion_warning", "alerts/gradient_explosion_critical", "alerts/non_finite_updates",
           "alerts/q_high", "alerts/twin_disagreement"])


def write_run(tb_dir: Path, updates: int = UPDATES, log_every: int = 100) -> int:
    """Event files of an ``updates``-update run; returns the number of records written."""
    w = EventWriter(tb_dir, start_time=1_700_000_000.0)
    records = 1
    for step in range(log_every, updates + 1, log_every):
        wall = 1_700_000_000.0 + step * 0.05
        w.add_scalars(step, {tag: (i + 1) * 0.001 * step for i, tag in enumerate(TAGS)}, wall=wall)
        records += len(TAGS)
        if step % 1000 == 0:
            w.add_scalars(step * 2, {"train/episode_reward": step * 0.01, "train/episode_length": 200.0}, wall=wall)
            records += 2
    w.close()
    return records


def time_read(tb_dir: Path, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        s = read_scalars(tb_dir)
        best = min(best, time.perf_counter() - t0)
        assert not s.problems and len(s.get("train/q1_value")) > 0
    return best


def run() -> dict:
    from runreport.report import write_report

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for log_every in (100, 10):
            run_dir = Path(tmp) / f"every{log_every}"
            records = write_run(run_dir / "tb", log_every=log_every)
            size = sum(p.stat().st_size for p in (run_dir / "tb").iterdir())
            seconds = time_read(run_dir / "tb")
            out[f"log_every_{log_every}"] = {"updates": UPDATES, "records": records, "bytes": size,
                                             "read_s": round(seconds, 3)}
            print(f"{UPDATES:,} updates at log_every {log_every}: {records:,} records ({size / 2**20:.1f} MiB) "
                  f"read in {seconds:.2f}s", flush=True)
        run_dir = Path(tmp) / "every100"
        t0 = time.perf_counter()
        write_report(run_dir)
        whole = time.perf_counter() - t0
        out["report_s_log_every_100"] = round(whole, 3)
        print(f"the whole report (read, analysis, plots, markdown) at log_every 100: {whole:.2f}s", flush=True)
    return out


if __name__ == "__main__":
    run()
