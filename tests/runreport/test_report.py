"""supervisor report: a run's status, expected against observed, the divergence verdict, incidents and plots, from its files alone."""

import base64
import json
import math
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from protocol import events as ev
from protocol.states import RUNNING, STALLED
from runreport import status
from runreport.divergence import DIVERGING, HEALTHY, WARNING
from runreport.expected import BAD, WARN
from runreport.render import render_markdown
from runreport.report import analyse, summarize, write_report
from runreport.runfiles import load_run
from runreport.tfevents import EventWriter, read_scalars
from supervisor.cli import main

pytestmark = pytest.mark.timeout(60)


PNG = b"\x89PNG\r\n\x1a\n"


# reward_max 1, gamma 0.99: Qmax = 100
CONFIG = {"env": {"reward_max": 1.0}, "learner": {"gamma": 0.99, "max_grad_norm_critic": 10.0,
                                                   "max_grad_norm_actor": 1.0, "log_every": 50,
                                                   "replay_capacity": 100000, "updates_per_step": 1.0},
          "run": {"max_timesteps": 20000}, "workers": {"eval_episodes": 2}}


def fake_run(root: Path, actor=None, q=None, updates=8000, every=50, pre_clip=(3.0, 0.5), clip_fraction=(0.1, 0.0),
             events=None, ended=True, start=1_700_000_000.0, seconds_per_update=0.01, stop_at=None,
             config=None) -> Path:
    """A run directory as the stack leaves it, with metrics made up by ``actor(t)`` and ``q(t)`` (numpy)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    rng = np.random.default_rng(0)
    t = np.arange(every, updates + 1, every)
    if stop_at is not None:
        t = t[t <= stop_at]
    qv = q(t) if q is not None else 20 + 5 * (1 - np.exp(-t / 2000)) + 0.3 * rng.standard_normal(len(t))
    av = actor(t) if actor is not None else -qv - 1
    w = EventWriter(root / "tb", start_time=start)
    for i, step in enumerate(t):
        wall = start + step * seconds_per_update
        w.add_scalars(int(step), {
            "train/actor_loss": av[i], "train/q1_value": qv[i], "train/q2_value": qv[i] * 1.001,
            "train/q_abs_diff": abs(qv[i]) * 0.01, "train/critic_loss": 5.0 * math.exp(-step / 4000) + 0.5,
            "gradients/critic_norm_before_clip": pre_clip[0], "gradients/critic_norm_after_clip": min(pre_clip[0], 10),
            "gradients/critic_mlp_norm": pre_clip[0], "gradients/critic_mlp_norm_after_clip": min(pre_clip[0], 10),
            "gradients/actor_norm_before_clip": pre_clip[1], "gradients/actor_norm_after_clip": min(pre_clip[1], 1),
            "gradients/actor_mlp_norm": pre_clip[1], "gradients/actor_mlp_norm_after_clip": min(pre_clip[1], 1),
            "gradients/critic_clip_fraction": clip_fraction[0], "gradients/actor_clip_fraction": clip_fraction[1],
            "alerts/gradient_explosion_warning": 0, "alerts/gradient_explosion_critical": 0,
            "alerts/non_finite_updates": 0, "buffer/utilization": (step + 1000) / 100000,
            "buffer/transitions": step + 1000, "perf/update_to_data": 1.0, "perf/updates_per_s": 100.0},
            wall=wall)
        if i % 4 == 0:
            w.add_scalars(int(step + 1000), {"train/episode_reward": -500 + step / 20, "train/episode_length": 200},
                          wall=wall)
    w.close()
    with open(root / "eval.jsonl", "w") as f:
        for k in range(1, 5):
            for _ in range(2):
                f.write(json.dumps({"env_steps": 2000 * k, "reward": -400 + 50 * k, "length": 200,
                                    "worker": "worker-0", "updates": 2000 * k}) + "\n")
    last = start + t[-1] * seconds_per_update
    evs = [{"time": start - 5, "event": "run_started", "name": "run", "pid": 999999999, "workers": 2,
            "children": ["learner", "worker-0", "worker-1"]}]
    evs += events or []
    if ended:
        evs += [{"time": last + 1, "event": "run_complete", "name": "learner"},
                {"time": last + 2, "event": "run_ended", "name": "run", "reason": "run complete", "exit_code": 0}]
    (root / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    state = {"pid": 999999999, "children": [], "run_id": root.name}
    if ended:
        state["ended"] = {"time": last + 2, "exit_code": 0, "reason": "run complete"}
    (root / "supervisor.json").write_text(json.dumps(state))
    with open(root / "progress.jsonl", "w") as f:
        for k, step in enumerate(t[::10]):
            f.write(json.dumps({"time": start + step * seconds_per_update, "children": {
                "learner": {"role": "learner", "state": RUNNING, "env_steps": int(step + 1000), "updates": int(step),
                            "steps_per_s": 100.0},
                "worker-0": {"role": "worker", "state": RUNNING, "env_steps": int(step // 2), "updates": 0,
                             "steps_per_s": 50.0},
                "worker-1": {"role": "worker", "state": RUNNING, "env_steps": int(step // 2), "updates": 0,
                             "steps_per_s": 45.0 + k % 3}}}) + "\n")
    return root


def exploding(t):
    return np.where(t < 3000, -20.0, -20.0 * np.exp(0.002 * (t - 3000))) * (1 + 0.02 * np.sin(t))


def test_reads_what_summary_writer_writes(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    for step in range(0, 500, 10):
        w.add_scalar("train/q1_value", step * 0.5, step)
        w.add_scalar("new/style", -step * 0.25, step, new_style=True)
        w.add_scalar("double/style", step * 2.0, step, new_style=True, double_precision=True)
    w.add_scalars("group", {"a": 1.0, "b": 2.0}, 3)
    w.close()
    s = read_scalars(tmp_path / "tb")
    assert not s.problems
    q = s.get("train/q1_value")
    assert list(q.steps) == list(range(0, 500, 10)) and np.allclose(q.values, np.arange(0, 500, 10) * 0.5)
    assert np.allclose(s.get("new/style").values, -np.arange(0, 500, 10) * 0.25)
    assert np.allclose(s.get("double/style").values, np.arange(0, 500, 10) * 2.0)
    assert abs(q.wall[-1] - time.time()) < 60
    # and what our own writer writes, TensorBoard reads
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ours = EventWriter(tmp_path / "ours")
    ours.add_scalars(7, {"x/y": 1.25})
    ours.close()
    acc = EventAccumulator(str(tmp_path / "ours"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("x/y")] == [(7, 1.25)]


def test_a_torn_event_file_is_read_up_to_the_tear_and_a_restart_purges_redone_steps(tmp_path):
    w = EventWriter(tmp_path / "tb", start_time=1000)
    for step in range(1, 101):
        w.add_scalars(step, {"a": float(step)})
    w.close()
    data = w.path.read_bytes()
    w.path.write_bytes(data[:-7])  # killed mid-write
    s = read_scalars(tmp_path / "tb")
    assert list(s.get("a").steps) == list(range(1, 100)) and "torn" in s.problems[0]
    # a restarted learner resumed at 80: its new file replaces 80 onwards
    w2 = EventWriter(tmp_path / "tb", start_time=2000)
    for step in range(80, 121):
        w2.add_scalars(step, {"a": float(-step)})
    w2.close()
    s = read_scalars(tmp_path / "tb")
    a = s.get("a")
    assert list(a.steps) == list(range(1, 121)) and a.values[78] == 79 and a.values[79] == -80
    # garbage in place of a header: stops there, no exception
    (tmp_path / "tb" / "events.out.tfevents.3000.x.0").write_bytes(b"\x00" * 5 + b"junk" * 10)
    assert read_scalars(tmp_path / "tb").get("a") is not None


def test_reading_a_100k_update_run_is_fast(tmp_path):
    from bench.report import UPDATES, time_read, write_run

    records = write_run(tmp_path / "tb", log_every=100)
    seconds = time_read(tmp_path / "tb", repeat=1)
    s = read_scalars(tmp_path / "tb")
    assert s.records == records and s.get("train/q1_value").steps[-1] == UPDATES
    assert seconds < 3.0, f"{records} records of a {UPDATES}-update run took {seconds:.2f}s"


def test_exponentially_growing_actor_loss_is_diverging_from_where_it_began(tmp_path):
    run = fake_run(tmp_path / "boom", actor=exploding, q=lambda t: -exploding(t))
    a = analyse(load_run(run))
    v = a.verdict
    assert v.verdict == DIVERGING
    assert abs(v.first_wrong - 3000) <= 100, v.first_wrong
    g = v.growth["actor_loss"]
    assert g.shape == "exponential" and g.factor > 1000 and 1.001 < g.per_update < 1.003
    rules = {f.rule for f in v.findings}
    assert {"actor_loss_exponential", "q_above_qmax"} <= rules
    assert v.blowup is not None and v.blowup > 3000  # 10 Qmax passed


def test_a_healthy_run_is_healthy(tmp_path):
    a = analyse(load_run(fake_run(tmp_path / "ok")))
    assert a.verdict.verdict == HEALTHY, [f.text for f in a.verdict.findings]
    assert a.status["status"] == "completed"
    assert all(r.stats is not None for r in a.rows), [r.metric for r in a.rows if r.stats is None]
    assert not [r.metric for r in a.rows if r.status in (WARN, BAD)]


def test_actor_loss_far_beyond_q_and_constant_clipping_are_flagged(tmp_path):
    """The hand-written analysis called this healthy: -actor_loss 934 against Q 23, pre-clip norms 2x threshold."""
    run = fake_run(tmp_path / "exploit", actor=lambda t: -934.0 + 0 * t, q=lambda t: 23.0 + 0 * t,
                   pre_clip=(22.0, 2.2), clip_fraction=(0.97, 1.0), config={**CONFIG, "env": {"reward_max": 10.0}})
    a = analyse(load_run(run))
    rules = {f.rule: f for f in a.verdict.findings}
    assert a.verdict.verdict == DIVERGING
    assert "actor_exploits_critic" in rules and rules["actor_exploits_critic"].level == DIVERGING
    assert "critic_clipping_active" in rules and "97%" in rules["critic_clipping_active"].text
    rows = {r.metric: r for r in a.rows}
    assert rows["-actor_loss - Q"].status == BAD
    assert rows["critic norm before clip"].status == WARN and rows["critic clip fraction"].status == WARN


def test_first_alert_and_its_lead_over_the_blow_up(tmp_path):
    events = [{"time": 1_700_000_040.0, "event": "alert", "name": "learner", "alert": "warning:q_high@3700"},
              {"time": 1_700_000_050.0, "event": "alert", "name": "learner", "alert": "critical:q_divergence@5000"}]
    a = analyse(load_run(fake_run(tmp_path / "alerts", actor=exploding, q=lambda t: -exploding(t), events=events)))
    v = a.verdict
    assert v.first_alert["rule"] == "q_high" and v.first_alert["update"] == 3700
    assert v.alert_lead == v.blowup - 3700 and v.alert_lead > 0


STACK = """Process 4242: python -m worker --run-dir x
Python v3.12.3 (/usr/bin/python3)

Thread 4242 (idle): "MainThread"
    _fire (worker/faults.py:70)
    step (worker/faults.py:88)
    step (worker/envs.py:120)
    run (worker/main.py:190)
Thread 4250 (idle): "heartbeat"
    wait (threading.py:359)
"""


def test_metrics_that_stop_with_a_stall_show_the_stall_and_its_stack(tmp_path):
    start = 1_700_000_000.0
    t_stall = start + 1800 * 0.01 + 5
    inc = "incidents/20240101T000000.000-learner"
    events = [{"time": t_stall, "event": ev.STALLED, "name": "learner", "pid": 4242,
               "reason": "no progress for 30.2s in phase training at count 1800 (deadline 30s)",
               "heartbeat": {"phase": "training", "sent_at": t_stall - 0.3, "updates": 1800}},
              {"time": t_stall + 1, "event": "evidence_captured", "name": "learner", "incident": inc,
               "cause": "learner_checkpoint_write"},
              {"time": t_stall + 1.5, "event": "terminating", "name": "learner", "pid": 4242, "reason": "a deadline missed"},
              {"time": t_stall + 3.6, "event": "killed", "name": "learner", "pid": 4242, "after_s": 2.0},
              {"time": t_stall + 3.7, "event": "exited", "name": "learner", "pid": 4242, "code": -9,
               "state": STALLED},
              {"time": t_stall + 4, "event": ev.BACKOFF, "name": "learner", "delay_s": 0.2, "restarts": 1,
               "code": -9}]
    run = fake_run(tmp_path / "frozen", updates=5000, stop_at=1800, events=events, ended=False)
    d = run / inc
    d.mkdir(parents=True)
    (d / "incident.json").write_text(json.dumps({"name": "learner", "pid": 4242, "reason": "no progress",
                                                 "time": t_stall + 1, "last_heartbeat": {"phase": "training"}}))
    (d / "stack.txt").write_text(STACK)
    a = analyse(load_run(run), now=t_stall + 600)
    s = a.status
    assert s["status"] == status.FAILED and "wrote no run_ended" in s["reason"]  # its pid is no live supervisor
    assert s["last_update"] == 1800
    assert any(ev.STALLED in line for line in s["since_last_progress"])
    stall = next(t for t in a.timeline if t["event"] == ev.STALLED)
    assert "no progress for 30.2s" in stall["detail"] and "phase training" in stall["detail"]
    assert stall["detail"].endswith("; cause learner_checkpoint_write"), "the stall's row names its cause"
    ev_row = next(t for t in a.timeline if t["event"] == "evidence_captured")
    assert any("_fire (worker/faults.py:70)" in f for f in ev_row["stack"])
    _, md_path, _ = write_report(run, now=t_stall + 600)
    md = md_path.read_text()
    assert "_fire (worker/faults.py:70)" in md and "no progress for 30.2s" in md and "FAILED" in md


def test_a_live_supervisor_whose_run_stopped_moving_is_frozen(tmp_path, monkeypatch):
    import runreport.status

    run = fake_run(tmp_path / "live", updates=2000, ended=False)
    monkeypatch.setattr(runreport.status, "supervisor_alive", lambda pid: True)
    last = 1_700_000_000.0 + 2000 * 0.01
    assert analyse(load_run(run), now=last + 5).status["status"] == status.RUNNING
    s = analyse(load_run(run), now=last + 1000).status
    assert s["status"] == "frozen" and s["last_update"] == 2000


def report_cli(capsys, *args):
    """`supervisor report ARGS`, run in this process as the command line runs it."""
    code = main(["report", *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_a_run_killed_mid_write_is_read(tmp_path, capsys):
    run = fake_run(tmp_path / "killed", ended=False)
    with open(run / "events.jsonl", "a") as f:
        f.write(f'{{"time": 1700000090.0, "event": "{ev.STALLED}", "name": "wor')
    with open(run / "eval.jsonl", "a") as f:
        f.write('{"env_steps": 9000, "rew')
    (run / "progress.jsonl").write_bytes((run / "progress.jsonl").read_bytes()[:-20])
    (run / "supervisor.json").write_text('{"pid": 12')
    tb = next((run / "tb").iterdir())
    tb.write_bytes(tb.read_bytes()[:-30])
    res = report_cli(capsys, str(run), "--html")
    assert res.returncode == 0, res.stderr
    assert "torn" in res.stdout and (run / "report" / "report.html").exists()
    assert summarize(run)["status"]["status"] == status.FAILED
    # missing files: still a report
    for name in ("events.jsonl", "eval.jsonl", "progress.jsonl", "supervisor.json", "config.yaml"):
        (run / name).unlink()
    res = report_cli(capsys, str(run))
    assert res.returncode == 0 and "events.jsonl is missing" in res.stdout, res.stdout + res.stderr


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    a = fake_run(tmp_path / "good")
    b = fake_run(tmp_path / "bad", actor=exploding, q=lambda t: -exploding(t))
    res = report_cli(capsys, str(a), "--compare", str(b), "--html")
    assert res.returncode == 0, res.stderr
    assert "compared with bad: completed, verdict diverging" in res.stdout
    md = (a / "report" / "report.md").read_text()
    assert "good final" in md and "bad final" in md and "bad status" in md
    assert "[bad]" not in md  # labels live in the plots
    for png in (a / "report").glob("*.png"):
        assert png.read_bytes().startswith(PNG)
    assert {"losses.png", "q_values.png", "grad_norms.png", "episodes.png", "eval.png", "workers.png"} <= \
        {p.name for p in (a / "report").glob("*.png")}
    check_html(a / "report" / "report.html", {p.name for p in (a / "report").glob("*.png")})


def check_html(path: Path, pngs: set[str]) -> None:
    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    p = Parser()
    p.feed(path.read_text())
    p.close()
    assert "table" in p.tags and "h2" in p.tags
    assert len(p.images) == len(pngs) and pngs
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


def test_report_config_section_is_validated(tmp_path):
    from protocol.config import ConfigError, load_config

    cfg = load_config(None, [("report.q_max", 50.0), ("report.eval_return_target", -250)])
    assert cfg.report.q_max == 50.0 and cfg.report.eval_return_target == -250
    with pytest.raises(ConfigError, match="report.q_maxx: unknown key"):
        load_config(None, [("report.q_maxx", 1.0)])
    with pytest.raises(ConfigError, match="growth_diverging"):
        load_config(None, [("report.growth_warn", 20.0)])
    run = fake_run(tmp_path / "q", config={**CONFIG, "report": {"q_max": 10.0}})
    a = analyse(load_run(run))
    # Q ~ 25 is above a Qmax of 10, but not rising: a warning
    assert a.q_max == 10.0 and a.verdict.verdict == WARNING
    assert "q_above_qmax" in {f.rule for f in a.verdict.findings}


def test_a_time_axis_starts_with_the_run_or_its_first_point_never_the_epoch():
    from runreport.plots import origin

    assert origin(1700000000.0, [np.array([1700000005.0])]) == 1700000000.0
    # no start in the state file (torn or missing): the earliest first point of any series
    assert origin(None, [np.array([1700000009.0, 1700000010.0]), np.array([1700000004.0]), np.array([])]) \
        == 1700000004.0
    assert origin("12", []) == 0.0


def test_each_incident_has_its_cause_and_a_slot_failing_far_more_than_its_peers_is_pointed_at(tmp_path):
    """The report names each incident's cause (the one captured with it, or one named now from an older run's
    evidence) and counts them per process; a slot with far more stalls than its peers is called out."""
    recorded = Path(__file__).resolve().parents[1] / "supervisor" / "causes"
    start = 1_700_000_000.0
    names = [f"worker-{i}" for i in range(4)] + [f"carla-{i}" for i in range(4)]
    events = [{"time": start + 1, "event": ev.SPAWNED, "name": n, "pid": 100 + i, "incarnation": 0, "standby": False}
              for i, n in enumerate(names)]
    run = fake_run(tmp_path / "causes", updates=2000, events=events)
    incidents = [("worker_hang_in_step", "worker-2")] * 5 + [("worker_hang_in_step", "worker-0"),
                                                             ("container_paused", "carla-2"),
                                                             ("container_oom_killed", "carla-2")]
    for i, (case, name) in enumerate(incidents):
        d = run / "incidents" / f"20240101T0000{i:02d}.000-{name}"
        d.mkdir(parents=True)
        for f in (recorded / case).iterdir():
            (d / f.name).write_text(f.read_text())
        info = json.loads((d / "incident.json").read_text())
        info.update(name=name, time=start + 10 + i)
        if i == 0:  # one as the supervisor now leaves it: its cause named at capture (the report keeps it)
            info["cause"] = {"cause": "simulator_tick", "advice": "x", "because": "y", "frames": []}
        (d / "incident.json").write_text(json.dumps(info))
    s = summarize(run)
    assert s["causes"] == {"carla-2": {"simulator_oom_killed": 1, "simulator_paused": 1},
                           "worker-0": {"env_step": 1}, "worker-2": {"env_step": 4, "simulator_tick": 1}}
    assert [i["cause"] for i in s["incidents"]][:2] == ["simulator_tick", "env_step"]
    assert len(s["outliers"]) == 1 and s["outliers"][0].startswith("worker-2 had 5 incidents, its peers 0.3")
    md = render_markdown([analyse(load_run(run))], [])  # the report's text (its plots are another test's)
    assert "Causes per process" in md and "| worker-2 | 4 |" in md and "look at its host or GPU" in md
