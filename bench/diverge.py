"""Divergence: our users' network against the default design, on one racetrack replay.

The users' run (``configs/users_diverging.yaml``: an actor CNN of its own trained by
the actor loss at ``actor_cnn_lr`` 1e-4, the ``plain`` trunk without LayerNorm and
tanh, clipping at 1.0 and 10.0) had its actor loss go from -250 to -2.7e9. Here it
and ``configs/default.yaml`` train on the same replay, collected once from the
embedded default (racetrack-v1, 84x84 grayscale, uniform random actions, with
:func:`bench.stability.collect`), with the same seeds, batches drawn the same way,
through the learner's own parts: :class:`TD3Agent`, :class:`AlertMonitor` and the
:class:`Metrics` writer. A fixed replay is harsher than online collection: nothing
new corrects an over-estimate.

Each variant leaves a run directory that ``supervisor report`` can read:
``<out>/<variant>/config.yaml`` (the resolved config), ``tb/`` (TensorBoard, window
means every ``log_every`` updates, as the learner writes them), ``events.jsonl``
(each alert as the supervisor records it from the learner's heartbeat: event
``alert``, name ``learner``, ``alert`` = ``level:rule@update``) and
``checkpoints/alert-<update>-<rule>.pt`` for critical alerts, as the learner writes.

Blow-up: the first update whose |Q| (either critic's batch mean) or |actor loss|
passes 10 Qmax, or whose losses or Q are not finite. The ``q_divergence`` alert
uses the same line, so it fires at the blow-up itself; the question is which
warnings come first, and by how many updates. After a blow-up a variant trains on
for ``after`` updates (so TensorBoard shows it), then stops.

    python -m bench diverge                      # the CI setting on a CPU (results: bench/results/diverge.json)
    python -m bench.diverge --setting gpu --device cuda
    python -m bench.diverge --collect DIR --steps N
    python -m bench.diverge --train DIR --variant users|default --out RUN_DIR [--updates N --batch B --device D]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from protocol.config import (
    Q_DIVERGED_MULTIPLE,  # |Q| or |actor loss| past this many Qmax is a blow-up
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "diverge"

VARIANTS = {"users": "configs/users_diverging.yaml", "default": "configs/default.yaml"}
# steps: racetrack steps collected once; updates: the most either variant trains; batch: its batch size.
SETTINGS = {
    "ci": {"steps": 5000, "batch": 32, "updates": 4000, "device": "cpu"},  # 2 CPU cores, under 10 minutes
    "gpu": {"steps": 20000, "batch": 256, "updates": 20000, "device": "cuda"},  # the config's batch size
}
AFTER_BLOWUP = 500  # updates trained after a blow-up, so the logs show it
SEED = 0
CHECKED = ("train/q1_value", "train/q2_value", "train/actor_loss", "train/critic_loss", "train/target_q")


def blown_up(m: dict, qmax: float) -> float | None:
    """The value that makes this update a blow-up (inf for a non-finite one), or None."""
    values = [m[k] for k in CHECKED if k in m]
    if any(not math.isfinite(v) for v in values):
        return math.inf
    worst = max(abs(m.get("train/q1_value", 0.0)), abs(m.get("train/q2_value", 0.0)),
                abs(m.get("train/actor_loss", 0.0)))
    return worst if worst > Q_DIVERGED_MULTIPLE * qmax else None


def variant_config(variant: str, batch: int, device: str):
    from protocol.config import load_config

    return load_config(ROOT / VARIANTS[variant], [("learner.batch_size", batch), ("learner.device", device),
                                                  ("run.seed", SEED), ("run.run_id", variant)])


def train(replay_dir: Path, variant: str, updates: int, batch: int, run_dir: Path, device: str = "cpu",
          after: int = AFTER_BLOWUP) -> dict:
    """Train one variant on the replay, writing a run directory; returns its figures (also ``result.json``)."""
    import torch
    import yaml

    from learner.alerts import AlertMonitor
    from learner.checkpoints import Checkpoints
    from learner.main import learner_seed, seed_torch
    from learner.metrics import Metrics
    from learner.replay import ReplayBuffer
    from learner.td3 import TD3Agent, q_max
    from protocol import events as ev

    torch.set_num_threads(1 if device == "cpu" else 2)
    cfg = variant_config(variant, batch, device)
    lc = cfg.learner
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    meta = json.loads((replay_dir / "meta.json").read_text())
    rb = ReplayBuffer(replay_dir, meta["capacity"], tuple(meta["frame_shape"]), np.uint8, meta["action_dim"])
    seed = learner_seed(cfg.run.seed, 0)
    seed_torch(seed)  # as the learner: the same initial weights for the same config, the same noise
    rng = np.random.default_rng(seed)  # the same batches for both variants
    obs_shape = (meta["frame_shape"][0] * cfg.env.frame_stack,) + tuple(meta["frame_shape"][1:])
    agent = TD3Agent(obs_shape, meta["action_dim"], lc, torch.device(device))
    qmax = q_max(cfg.env.reward_max, lc.gamma)
    monitor = AlertMonitor(qmax, lc)
    metrics = Metrics(run_dir)
    checkpoints = Checkpoints(run_dir / "checkpoints", run_id=variant)
    events = open(run_dir / "events.jsonl", "w", buffering=1)

    def event(kind: str, name: str, **fields) -> None:  # as the supervisor writes them
        ev.check_event(kind, fields)
        events.write(json.dumps(ev.line(kind, name, fields)) + "\n")

    event(ev.RUN_STARTED, "run", run_dir=str(run_dir), pid=os.getpid(), workers=0, children=["learner"])
    blowup, first_alert, trace, peak = None, {}, [], {"q": 0.0, "actor_loss": 0.0}
    onset = None  # the first update past a diverging line of the report (-actor_loss far above Q, or past Qmax)
    rc = cfg.report
    stop_at = updates
    t0 = time.time()
    for u in range(1, updates + 1):
        b = rb.sample(lc.batch_size, cfg.env.frame_stack, lc.n_step, lc.gamma, rng)
        if agent.augment_on_host:
            b.shift_on_host(lc.augment_pad, rng)  # the sampler thread's job in the learner
        t = time.perf_counter()
        m = agent.update(b, detailed=u % lc.log_every == 0)
        metrics.spent(time.perf_counter() - t, 1)
        metrics.observe(m, float(b.age.mean()))
        for alert in monitor.observe(u, m):
            event(ev.ALERT, "learner", alert=f"{alert['level']}:{alert['rule']}@{u}")
            first_alert.setdefault(alert["rule"], {"updates": u, "level": alert["level"],
                                                   "value": alert["value"], "limit": alert["limit"]})
            if alert["level"] == "critical":  # the learner keeps the weights that raised it
                checkpoints.save(f"alert-{u}-{alert['rule']}", agent.state_dict(), 0, {})
        if u % lc.log_every == 0:  # the scalars learner.main.Learner.write_metrics adds to the window means
            scalars = dict(monitor.counters())
            scalars.update({"buffer/utilization": rb.size / rb.capacity, "buffer/transitions": rb.transitions_total,
                            "agent/actor_lr": agent.actor_opt.param_groups[0]["lr"],
                            "agent/critic_lr": agent.critic_opt.param_groups[0]["lr"]})
            if agent.separate:
                scalars["agent/actor_cnn_lr"] = agent.actor_opt.param_groups[1]["lr"]
            metrics.write(u, scalars)
        q = max(abs(m["train/q1_value"]), abs(m["train/q2_value"]))
        if math.isfinite(q):
            peak["q"] = max(peak["q"], q)
        if math.isfinite(m.get("train/actor_loss", 0.0)):
            peak["actor_loss"] = max(peak["actor_loss"], abs(m.get("train/actor_loss", 0.0)))
        if onset is None and "train/actor_loss" in m:
            qm, al = (m["train/q1_value"] + m["train/q2_value"]) / 2.0, m["train/actor_loss"]
            if not (math.isfinite(qm) and math.isfinite(al)) or (-al - qm) / (abs(qm) + 1.0) > rc.actor_q_gap_diverging \
                    or max(abs(qm), abs(al)) > qmax:
                onset = u
        if blowup is None:
            value = blown_up(m, qmax)
            if value is not None:
                blowup = {"updates": u, "value": value, "q1": m["train/q1_value"],
                          "actor_loss": m.get("train/actor_loss")}
                stop_at = min(updates, -(-(u + after) // lc.log_every) * lc.log_every)
        if u % 50 == 0 or u == stop_at:
            trace.append({"updates": u, "q1": m["train/q1_value"], "actor_loss": m.get("train/actor_loss"),
                          "critic_loss": m["train/critic_loss"],
                          "critic_norm": m["gradients/critic_norm_before_clip"],
                          "actor_norm": m.get("gradients/actor_norm_before_clip"),
                          "actor_cnn_norm": m.get("gradients/actor_cnn_norm"), "elapsed_s": time.time() - t0})
        if u >= stop_at:
            break
    metrics.close()
    event(ev.RUN_COMPLETE, "learner")
    event(ev.RUN_ENDED, "run", reason=f"bench: {u} updates on a fixed replay", exit_code=0)
    events.close()
    result = {"variant": variant, "config": VARIANTS[variant], "device": device, "batch": lc.batch_size,
              "log_every": lc.log_every, "q_max": qmax, "blowup_limit": Q_DIVERGED_MULTIPLE * qmax, "updates_done": u,
              "updates_max": updates, "seconds": time.time() - t0, "updates_per_s": u / (time.time() - t0),
              "blowup": blowup, "onset": onset, "report": report_verdict(run_dir), "first_alerts": first_alert, "counters": monitor.counters(), "peak": peak,
              "tb_first_blowup_step": tb_first_blowup(run_dir / "tb", Q_DIVERGED_MULTIPLE * qmax), "trace": trace,
              "run_dir": str(run_dir)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def report_verdict(run_dir: Path) -> dict:
    """What ``supervisor report`` makes of the run directory: its verdict and the update it first went wrong."""
    from runreport.report import analyse, load_run

    v = analyse(load_run(run_dir)).verdict
    return {"verdict": v.verdict, "first_wrong": v.first_wrong}


def tb_first_blowup(tb_dir: Path, limit: float) -> int | None:
    """Read the TensorBoard files back: the first logged step whose window mean of Q or actor loss passes
    ``limit`` or is not finite (what a reader of ``tb/`` sees; the window ends at or after the blow-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = []
    for tag in ("train/q1_value", "train/q2_value", "train/actor_loss"):
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag) if not math.isfinite(e.value) or abs(e.value) > limit]
    return min(steps) if steps else None


def collect(replay_dir: Path, steps: int) -> float:
    from bench.stability import collect as stability_collect

    t0 = time.time()
    stability_collect(replay_dir, steps, seed=SEED)
    return time.time() - t0


def describe(r: dict) -> list[str]:
    b = r["blowup"]
    lines = []
    if b:
        what = "non-finite" if math.isinf(b["value"]) else f"{b['value']:.3g} > {r['blowup_limit']:.0f}"
        lines.append(f"DIVERGED at update {b['updates']} ({what}; Q {b['q1']:.3g}, actor loss "
                     f"{b['actor_loss'] if b['actor_loss'] is None else format(b['actor_loss'], '.3g')}); "
                     f"TensorBoard's first window past it ends at step {r['tb_first_blowup_step']}; "
                     f"stopped at {r['updates_done']}")
    else:
        lines.append(f"no blow-up in {r['updates_done']} updates: max |Q| {r['peak']['q']:.3g}, "
                     f"max |actor loss| {r['peak']['actor_loss']:.3g} (limit {r['blowup_limit']:.0f})")
    if r["first_alerts"]:
        parts = []
        for rule, a in sorted(r["first_alerts"].items(), key=lambda kv: kv[1]["updates"]):
            lead = f", {b['updates'] - a['updates']} updates before the blow-up" if b else ""
            parts.append(f"{a['level']}:{rule} first at {a['updates']}{lead}")
        lines.append("alerts: " + "; ".join(parts))
    else:
        lines.append("alerts: none")
    rep = r["report"]
    lines.append(f"supervisor report: {rep['verdict']}" + (f", first went wrong at update {rep['first_wrong']}"
                                                           if rep["first_wrong"] is not None else "")
                 + (f" (the per-update onset past its lines: {r['onset']})" if r["onset"] is not None else ""))
    lines.append(f"{r['updates_per_s']:.1f} updates/s, {r['seconds']:.0f}s; run directory {r['run_dir']}")
    return lines


def report_right(r: dict) -> bool:
    """The report calls a blown-up run diverging, first wrong within the log window of the per-update onset (a
    window mean reaches a line in the window it is crossed, or the next), and never after the blow-up."""
    rep, onset = r["report"], r["onset"]
    if r["blowup"] is None:
        return rep["verdict"] != "diverging"
    return (rep["verdict"] == "diverging" and rep["first_wrong"] is not None and onset is not None
            and onset <= rep["first_wrong"] < onset + 2 * r["log_every"] and rep["first_wrong"] <= r["blowup"]["updates"])


def run(setting: str = "ci", device: str | None = None, out: Path = OUT, replay: Path | None = None,
        **overrides) -> dict:
    """Collect once, train both variants side by side (one process each), print and return the figures."""
    s = {**SETTINGS[setting], **{k: v for k, v in overrides.items() if v is not None}}
    if device is not None:
        s["device"] = device
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-diverge-") as tmp:
        replay_dir = replay or Path(tmp) / "replay"
        collect_s = 0.0
        if not (replay_dir / "meta.json").exists():
            collect_s = collect(replay_dir, s["steps"])
            print(f"collected {s['steps']} racetrack steps (random actions) in {collect_s:.0f}s", flush=True)
        procs = {}
        for variant in VARIANTS:
            res = Path(tmp) / f"{variant}.json"
            procs[variant] = (subprocess.Popen(
                [sys.executable, "-m", "bench.diverge", "--train", str(replay_dir), "--variant", variant,
                 "--updates", str(s["updates"]), "--batch", str(s["batch"]), "--device", s["device"],
                 "--out", str(out / variant), "--result", str(res)], cwd=ROOT), res)
        for variant, (proc, _) in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"training {variant} failed with exit code {proc.returncode}")
        results = {v: json.loads(res.read_text()) for v, (_, res) in procs.items()}
    wall = time.time() - t0
    users, default = results["users"], results["default"]
    print(f"diverge ({setting}): {s['steps']} racetrack steps, batch {s['batch']}, up to {s['updates']} updates, "
          f"{s['device']}, seed {SEED}; blow-up: |Q| or |actor loss| > {Q_DIVERGED_MULTIPLE:g} Qmax "
          f"({users['blowup_limit']:.0f}) or non-finite")
    for name, r, what in (("users", users, "separate actor CNN at 1e-4, plain trunk, clip 1/10"),
                          ("default", default, "shared encoder, LayerNorm+tanh trunk")):
        print(f"  {name} ({what}):")
        for line in describe(r):
            print(f"    {line}")
    alerts_first = bool(users["blowup"]) and any(a["updates"] < users["blowup"]["updates"]
                                                 for a in users["first_alerts"].values())
    reported = report_right(users) and report_right(default)
    ok = users["blowup"] is not None and default["blowup"] is None and alerts_first and reported
    print(f"  {'as expected' if ok else 'NOT as expected'}: the users' network "
          f"{'diverges' if users['blowup'] else 'does not diverge'}, the default "
          f"{'diverges' if default['blowup'] else 'does not'}; an alert before the blow-up: {alerts_first}; "
          f"the report's verdicts and first updates right: {reported}; wall {wall:.0f}s (collection {collect_s:.0f}s)")
    print(f"  compare: supervisor report {out / 'users'} --compare {out / 'default'}")
    return {"setting": setting, **s, "seed": SEED, "collect_s": collect_s, "wall_s": wall, "as_expected": ok,
            "variants": results}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.diverge")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="ci")
    p.add_argument("--collect", type=Path, help="only fill a replay in this directory")
    p.add_argument("--train", type=Path, help="only train --variant on this replay, into --out")
    p.add_argument("--replay", type=Path, help="train both variants on this replay (else: collect one)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="users")
    p.add_argument("--steps", type=int)
    p.add_argument("--updates", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--device")
    p.add_argument("--out", type=Path, help="the run directory (--train) or the parent of both (default "
                                            f"{OUT.relative_to(ROOT)})")
    p.add_argument("--result", type=Path, help="--train: also write the figures here")
    a = p.parse_args()
    s = {**SETTINGS[a.setting], **{k: v for k, v in (("steps", a.steps), ("updates", a.updates), ("batch", a.batch),
                                                     ("device", a.device)) if v is not None}}
    if a.collect:
        print(f"collected {s['steps']} steps in {collect(a.collect, s['steps']):.0f}s")
    elif a.train:
        r = train(a.train, a.variant, s["updates"], s["batch"], a.out or OUT / a.variant, s["device"])
        if a.result:
            a.result.write_text(json.dumps(r))
    else:
        result = run(a.setting, a.device, a.out or OUT, a.replay, steps=a.steps, updates=a.updates, batch=a.batch)
        (ROOT / "bench" / "results" / "diverge.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
