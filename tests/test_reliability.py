"""An operator's mistakes and a hostile or failing host: each ends in one clear line, and the run survives or ends
cleanly. Unit tests here start no process; the stack tests are in test_reliability_stack.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zmq

from learner.checkpoints import Checkpoints
from learner.replay import ReplayBuffer
from protocol import events as ev
from protocol.codec import decode
from protocol.config import ConfigError, load_config, resume_conflicts
from protocol.exits import EXIT_FATAL, FatalError, fatal_message, os_error_exit
from protocol.files import atomic_write
from protocol.messages import STEPS
from protocol.sockets import make_socket, send, steps_max_bytes
from protocol.states import FAILED
from supervisor import cli, preflight
from supervisor.machine import Supervision
from supervisor.plan import build_plan
from supervisor.preflight import host_capacity_problem

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


# -- sockets: a size limit that fits what each receives ---------------------------------------------------

def test_a_real_batch_fits_the_steps_limit_and_a_bigger_message_is_cut_off():
    cfg = load_config(None)
    limit = steps_max_bytes(cfg.workers.batch_steps, cfg.env.max_frame_bytes)
    n = cfg.workers.batch_steps + 2
    frame = np.zeros((cfg.env.max_frame_bytes,), np.uint8)
    arrays = {"first": np.zeros(n, np.uint8), "frames": np.stack([frame] * n),
              "actions": np.zeros((n, 64), np.float32), "rewards": np.zeros(n, np.float32),
              "terminated": np.zeros(n, np.uint8), "truncated": np.zeros(n, np.uint8)}
    ctx = zmq.Context()
    try:
        pull = make_socket(ctx, zmq.PULL, max_bytes=limit)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = make_socket(ctx, zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        send(push, STEPS, {"worker": "w", "incarnation": 0, "seq": 0, "env_steps": n}, arrays)
        assert pull.poll(5000), "the largest legitimate batch must get through"
        assert decode(pull.recv_multipart()).type == STEPS
        push.send(b"x" * (limit + 1))  # one byte over: the peer is cut off, nothing is buffered or delivered
        assert not pull.poll(1000)
    finally:
        ctx.destroy(linger=0)


def test_a_pub_socket_refuses_a_huge_subscription():
    from protocol.sockets import SUBSCRIPTION_MAX_BYTES

    ctx = zmq.Context()
    try:
        pub = make_socket(ctx, zmq.XPUB, max_bytes=SUBSCRIPTION_MAX_BYTES)  # XPUB shows what a PUB takes in
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        evil = ctx.socket(zmq.XSUB)
        evil.connect(f"tcp://127.0.0.1:{port}")
        evil.send(b"\x01" + b"x" * (SUBSCRIPTION_MAX_BYTES + 10))
        assert not pub.poll(1000), "an oversized subscription never reaches the socket"
        good = ctx.socket(zmq.SUB)
        good.connect(f"tcp://127.0.0.1:{port}")
        good.setsockopt(zmq.SUBSCRIBE, b"")
        assert pub.poll(3000) and pub.recv() == b"\x01"
    finally:
        ctx.destroy(linger=0)


def test_carla_frames_above_the_limit_are_a_config_error():
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        load_config(None, [("env.backend", "carla"), ("env.carla.camera.width", 1024),
                           ("env.carla.camera.height", 1024), ("env.carla.camera.grayscale", False)])


# -- the machine: a child that says a restart would not help -------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def machine(**overrides):
    cfg = load_config(None, [("supervisor.max_restarts", 3)] + list(overrides.items()))
    clock = Clock()
    m = Supervision(list(build_plan(cfg).specs), clock)
    m.start()
    return m, clock


def beat(m, name, pid, **fields):
    hb = {"name": name, "pid": pid, "incarnation": m.children[name].incarnation, "phase": "training",
          "updates": 0, "env_steps": 0, **fields}
    return m.heartbeat(hb)


def test_a_fatal_exit_fails_the_learner_at_once_with_its_reason_and_ends_the_run():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    beat(m, "learner", 100, detail="runs/x/checkpoints/latest.pt is corrupt (EOFError); ...")
    actions = m.exited("learner", m.children["learner"].incarnation, EXIT_FATAL)
    failed = [a for a in actions if getattr(a, "kind", None) == ev.FAILED]
    assert failed and "latest.pt is corrupt" in failed[0].detail["reason"]
    assert m.children["learner"].state == FAILED and m.children["learner"].restarts == 0
    assert m.stopping and "latest.pt is corrupt" in m.stop_reason


def test_a_fatal_exit_of_a_worker_fails_it_alone():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    actions = m.exited("worker-0", m.children["worker-0"].incarnation, EXIT_FATAL)
    assert m.children["worker-0"].state == FAILED
    assert "restart would not help" in m.children["worker-0"].reason
    assert not m.stopping and not any(getattr(a, "kind", None) == ev.BACKOFF for a in actions)


def test_any_other_exit_code_is_restarted_as_before():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.exited("learner", m.children["learner"].incarnation, 1)
    assert m.children["learner"].state != FAILED and m.children["learner"].restarts == 1


def test_a_resumed_learner_records_the_updates_it_redoes():
    m, clock = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    beat(m, "learner", 100, updates=340)
    m.exited("learner", m.children["learner"].incarnation, -9)
    clock.t += 60
    m.tick()
    m.spawned("learner", m.children["learner"].incarnation, 200)
    actions = beat(m, "learner", 200, updates=300, resumed_from=300)
    resumed = [a for a in actions if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed and resumed[0].detail == {"resumed_from": 300, "previous": 340, "redone": 40}
    row = next(r for r in m.snapshot() if r["name"] == "learner")
    assert row["resumed"]["redone"] == 40
    assert beat(m, "learner", 200, updates=301, resumed_from=300) == [], "recorded once per incarnation"


def test_a_resume_without_a_known_previous_count_says_so():
    m, _ = machine()
    m.spawned("learner", m.children["learner"].incarnation, 100)
    resumed = [a for a in beat(m, "learner", 100, updates=300, resumed_from=300) if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed[0].detail == {"resumed_from": 300, "previous": None, "redone": None}
    m2, _ = machine()
    m2.restore_counts({"learner": 340, "stranger": 5, "worker-0": "x"})
    m2.spawned("learner", m2.children["learner"].incarnation, 100)
    resumed = [a for a in beat(m2, "learner", 100, updates=300, resumed_from=300) if getattr(a, "kind", None) == ev.RESUMED]
    assert resumed[0].detail["redone"] == 40


def test_when_every_worker_has_failed_the_run_ends():
    m, _ = machine(**{"workers.count": 2})
    m.spawned("learner", m.children["learner"].incarnation, 100)
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    m.spawned("worker-1", m.children["worker-1"].incarnation, 102)
    m.exited("worker-0", m.children["worker-0"].incarnation, EXIT_FATAL)
    assert not m.stopping, "one failed worker: the other goes on"
    m.exited("worker-1", m.children["worker-1"].incarnation, EXIT_FATAL)
    assert m.stopping and "every child of pool worker failed" in m.stop_reason


def test_drops_of_every_incarnation_add_up():
    m, clock = machine()
    m.spawned("worker-0", m.children["worker-0"].incarnation, 101)
    beat(m, "worker-0", 101, phase="stepping", dropped=5)
    m.exited("worker-0", m.children["worker-0"].incarnation, -9)
    clock.t += 60
    m.tick()
    m.spawned("worker-0", m.children["worker-0"].incarnation, 102)
    beat(m, "worker-0", 102, phase="stepping", dropped=2)
    assert next(r for r in m.snapshot() if r["name"] == "worker-0")["dropped"] == 7


# -- corrupt files: detected at load, named, with the ways on ----------------------------------------------------

def test_checkpoints_keep_the_previous_one_and_name_a_corrupt_one(tmp_path):
    ck = Checkpoints(tmp_path / "run" / "checkpoints")
    ck.save("latest", {"updates": 1}, 1, {"total": 0})
    ck.save("latest", {"updates": 2}, 2, {"total": 0})
    assert ck.load()["agent"] == {"updates": 2}
    assert ck.load("previous")["agent"] == {"updates": 1}
    latest = ck.dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # a copy cut short
    with pytest.raises(FatalError) as exc:
        ck.load()
    text = str(exc.value)
    assert str(latest) in text and "corrupt" in text and "--resume-from previous" in text and "new run" in text
    assert fatal_message(exc.value) == text


def test_a_corrupt_spec_is_named(tmp_path):
    ck = Checkpoints(tmp_path / "checkpoints")
    (ck.dir / "spec.json").write_text("{\"frame_shape\": [3")
    with pytest.raises(FatalError, match="spec.json is corrupt"):
        ck.load_spec()


def make_replay(directory, **kw):
    return ReplayBuffer(directory, 100, (3,), np.float32, 1, **kw)


def fill(replay, n):
    frames = np.ones((n, 3), np.float32)
    replay.add_batch("w/0", 0, np.r_[1, np.zeros(n - 1)].astype(np.uint8), frames, np.zeros((n, 1), np.float32),
                     np.zeros(n, np.float32), np.zeros(n, np.uint8), np.zeros(n, np.uint8))


def test_a_corrupt_replay_index_is_named_and_the_checkpoints_copy_restores_it(tmp_path):
    replay = make_replay(tmp_path / "replay")
    fill(replay, 10)
    replay.flush()
    saved = replay.index()
    (tmp_path / "replay" / "index.json").write_text("{\"total\": ")
    with pytest.raises(FatalError) as exc:
        make_replay(tmp_path / "replay")
    assert "index.json is corrupt" in str(exc.value) and "move it away" in str(exc.value)
    (tmp_path / "replay" / "index.json").unlink()  # the operator follows the advice
    restored = make_replay(tmp_path / "replay", fallback_index=saved)
    assert restored.total == 10 and restored.transitions_total == saved["transitions_total"]


def test_a_replay_index_of_the_wrong_shape_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    (tmp_path / "replay" / "index.json").write_text(json.dumps({"total": "many", "streams": {}}))
    with pytest.raises(FatalError, match="index.json is corrupt"):
        make_replay(tmp_path / "replay")


def test_a_torn_replay_array_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    (tmp_path / "replay" / "rewards.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(FatalError, match="rewards.npy is corrupt"):
        make_replay(tmp_path / "replay")


# -- a full disk --------------------------------------------------------------------------------------------------

def root_can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not root_can_mount(), reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_volume(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_up(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@needs_mount
def test_a_write_on_a_full_disk_names_the_file_and_leaves_the_old_one_whole(small_volume):
    target = small_volume / "latest.pt"
    atomic_write(target, b"old")
    fill_up(small_volume)
    with pytest.raises(OSError) as exc:
        atomic_write(target, b"x" * 1024 * 1024)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    with pytest.raises(OSError) as exc:  # torch wraps the error in its own; the cause is found again
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(300_000)}, f))
    assert exc.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and not list(small_volume.glob(".*.tmp"))
    assert "no space left on device writing" in fatal_message(exc.value)


@needs_mount
def test_a_checkpoint_that_fills_the_disk_is_named_a_full_disk_though_its_removal_frees_space(small_volume):
    filler = small_volume / "filler"
    fill_up(small_volume)
    os.truncate(filler, max(0, filler.stat().st_size - 2 * 1024 * 1024))  # 2 MiB free
    with pytest.raises(OSError) as exc:  # a 3 MiB checkpoint: torch wraps the ENOSPC in a RuntimeError
        atomic_write(small_volume / "latest.pt", lambda f: torch.save({"w": torch.zeros(800_000)}, f))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(small_volume / "latest.pt")
    assert not (small_volume / "latest.pt").exists() and not list(small_volume.glob(".*.tmp"))


@needs_mount
def test_a_replay_that_does_not_fit_is_refused_at_creation(small_volume):
    with pytest.raises(FatalError, match="no space for the replay"):
        ReplayBuffer(small_volume / "replay", 100_000, (84, 84), np.uint8, 2)
    assert not list((small_volume / "replay").glob("*.npy")), "what it reserved is given back"


# -- resuming: the run's own config; nothing that changes its model or replay -------------------------------

def test_resume_conflicts_name_each_changed_setting():
    saved = load_config(Path(ROOT / "configs/pendulum.yaml"))
    same = load_config(Path(ROOT / "configs/pendulum.yaml"), [("learner.actor_lr", 0.5), ("workers.count", 3)])
    assert resume_conflicts(saved, same) == []
    changed = load_config(Path(ROOT / "configs/pendulum.yaml"), [("learner.hidden_dim", 32)])
    assert resume_conflicts(saved, changed) == ["learner.hidden_dim=256 (asked: 32)"]
    assert any(c.startswith("env.id=") for c in resume_conflicts(saved, load_config(None)))


def up_args(*argv):
    return cli.build_parser().parse_args(["up", *argv])


def saved_run(tmp_path, *overrides) -> Path:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = load_config(ROOT / "configs/pendulum.yaml", [("run.run_id", "r1"), *overrides])
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    return run


def test_resuming_without_config_takes_the_runs_own(tmp_path):
    saved_run(tmp_path)
    cfg = preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"), "--max-timesteps", "99"))
    assert cfg.env.id == "Pendulum-v1" and cfg.run.max_timesteps == 99 and cfg.learner.hidden_dim == 256


def test_a_resume_that_changes_the_model_is_refused_in_one_line(tmp_path):
    saved_run(tmp_path)
    with pytest.raises(ConfigError) as exc:
        preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"),
                                "--set", "learner.hidden_dim=64"))
    assert "learner.hidden_dim=256 (asked: 64)" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="env.id"):
        preflight.config_from(up_args("--run-id", "r1", "--runs-dir", str(tmp_path / "runs"),
                                "--config", str(ROOT / "configs/default.yaml")))


def run_cli(*argv, timeout=60, preexec=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "supervisor", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def snapshot_tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.rglob("*"))}


@pytest.mark.timeout(120)
def test_a_refused_resume_writes_nothing(tmp_path):
    run = saved_run(tmp_path)
    before = snapshot_tree(tmp_path)
    res = run_cli("up", "--run-id", "r1", "--runs-dir", str(tmp_path / "runs"), "--set", "env.frame_stack=2")
    assert res.returncode == cli.EXIT_USAGE and "env.frame_stack" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = run_cli("up", "--run-id", "r1", "--runs-dir", str(tmp_path / "runs"), "--resume-from", "previous",
                  "--max-timesteps", "10")  # no previous checkpoint: one line, nothing changed
    assert res.returncode == cli.EXIT_USAGE, res.stderr
    assert "previous.pt" in res.stderr and "Traceback" not in res.stderr
    assert snapshot_tree(tmp_path) == before
    assert (run / "config.yaml").exists()


@pytest.mark.timeout(120)
def test_a_second_up_beside_a_live_supervisor_writes_nothing(tmp_path):
    run = saved_run(tmp_path)
    # a live supervisor of the run, as its state file names it
    sup = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "supervisor", "up"])
    try:
        started = psutil.Process(sup.pid).create_time()
        (run / "supervisor.json").write_text(json.dumps({"pid": sup.pid, "started": started, "children": [],
                                                         "run_id": "r1"}))
        before = snapshot_tree(tmp_path)
        res = run_cli("up", "--run-id", "r1", "--runs-dir", str(tmp_path / "runs"),
                      "--config", str(ROOT / "configs/pendulum.yaml"))
        assert res.returncode == cli.EXIT_RUN_BUSY, res.stderr
        assert f"another supervisor (pid {sup.pid})" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert snapshot_tree(tmp_path) == before, "a refused up changes nothing in the run"
    finally:
        sup.kill()
        sup.wait()


def test_a_dead_pid_in_the_state_file_does_not_block_a_resume(tmp_path):
    run = saved_run(tmp_path)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "supervisor"])
    try:
        (run / "supervisor.json").write_text(json.dumps({"pid": stranger.pid}))
        assert preflight.live_supervisor(run) == stranger.pid  # an old state file: its command line decides
        # the pid now belongs to another process than the one that wrote the file
        (run / "supervisor.json").write_text(json.dumps({"pid": stranger.pid, "started": 12.0}))
        assert preflight.live_supervisor(run) is None
        # the run ended; or the pid is ours (a container restarted with the same pid 1)
        (run / "supervisor.json").write_text(json.dumps({"pid": stranger.pid, "ended": {"exit_code": 0}}))
        assert preflight.live_supervisor(run) is None
        (run / "supervisor.json").write_text(json.dumps({"pid": os.getpid()}))
        assert preflight.live_supervisor(run) is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_run_directory_lock_is_held_by_one_process(tmp_path):
    from supervisor.rundir import lock_run

    code = "import sys, time; from supervisor.rundir import lock_run; print(lock_run(sys.argv[1]) is not None, flush=True)"
    fd = lock_run(tmp_path)
    try:
        assert fd is not None
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                               cwd=ROOT, timeout=30)
        assert other.stdout.strip() == "False", other.stderr
    finally:
        os.close(fd)
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                           timeout=30)
    assert other.stdout.strip() == "True" and not list(tmp_path.iterdir()), "the lock writes nothing"


# -- the host: more workers than it can hold -------------------------------------------------------------------

def test_more_workers_than_the_cores_hold_are_refused_with_the_reason():
    cores = len(os.sched_getaffinity(0))
    problem = host_capacity_problem(load_config(None, [("workers.count", 64 * cores)]))
    assert problem is not None and f"{64 * cores} workers on {cores} cores" in problem
    assert host_capacity_problem(load_config(None, [("workers.count", 1)])) is None


def test_more_workers_than_the_memory_holds_are_refused():
    problem = host_capacity_problem(load_config(None, [("workers.count", 10_000),
                                                       ("supervisor.max_workers_per_core", 1e6)]))
    assert problem is not None and "GiB of memory" in problem


@pytest.mark.timeout(120)
def test_up_refuses_64_workers_before_writing_anything(tmp_path):
    res = run_cli("up", "--config", str(ROOT / "configs/pendulum.yaml"), "--workers", "9999",
                  "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == cli.EXIT_OVERLOAD
    assert "--oversubscribe" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# -- OS errors at start-up: one line naming the path, a distinct exit code ------------------------------------------

def without_root_powers() -> list[str]:
    """A command prefix under which permission bits apply (root's DAC override dropped), or [] for a normal user."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search"]


def run_cli_limited(*argv, timeout=60):
    return subprocess.run([*without_root_powers(), sys.executable, "-m", "supervisor", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


needs_setpriv = pytest.mark.skipif(os.geteuid() == 0 and subprocess.run(["which", "setpriv"], capture_output=True)
                                   .returncode != 0, reason="root without setpriv cannot drop its DAC override")


@needs_setpriv
def test_an_unwritable_runs_dir_is_one_line(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        res = run_cli_limited("up", "--config", str(ROOT / "configs/pendulum.yaml"), "--runs-dir", str(runs))
    finally:
        runs.chmod(0o700)
    assert res.returncode == cli.EXIT_PERMISSION, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "permission denied on" in res.stderr and str(runs) in res.stderr
    assert list(runs.iterdir()) == []


@needs_setpriv
def test_status_of_a_run_dir_one_may_not_read_is_one_line(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "endpoints.json").write_text("{}")
    run.chmod(0o000)
    try:
        res = run_cli_limited("status", "--run-dir", str(run))
    finally:
        run.chmod(0o700)
    assert res.returncode == cli.EXIT_PERMISSION, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1 and str(run) in res.stderr


@needs_mount
def test_a_read_only_runs_dir_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        res = run_cli("up", "--config", str(ROOT / "configs/pendulum.yaml"), "--runs-dir", str(ro / "runs"))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert res.returncode == cli.EXIT_READ_ONLY, res.stderr
    assert "read-only file system" in res.stderr and str(ro / "runs") in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_os_errors_map_to_distinct_exit_codes():
    codes = {os_error_exit(OSError(e, os.strerror(e), "/x"))
             for e in (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EIO)}
    assert codes == {cli.EXIT_PERMISSION, cli.EXIT_READ_ONLY, cli.EXIT_NO_SPACE, cli.EXIT_OS_ERROR}
    assert len({cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_DEGRADED, cli.EXIT_NO_SUPERVISOR,
                cli.EXIT_RUN_BUSY, cli.EXIT_OVERLOAD, *codes}) == 11


def test_a_torn_state_or_endpoints_file_is_no_traceback(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "supervisor.json").write_text("{\"pid\": 12")
    (run / "endpoints.json").write_text("[1, 2")
    res = run_cli("status", "--run-dir", str(run))
    assert res.returncode == cli.EXIT_NO_SUPERVISOR and "Traceback" not in res.stderr


def test_status_of_a_run_whose_state_file_could_not_say_how_it_ended_reads_its_events(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "supervisor.json").write_text(json.dumps({"pid": 1, "started": 1.0}))  # written before the disk filled
    (run / "events.jsonl").write_text(
        json.dumps({"time": 1.0, "event": "run_started", "name": "run"}) + "\n"
        + json.dumps({"time": 2.0, "event": "run_ended", "name": "run", "exit_code": 1,
                      "reason": "learner failed: no space left on device writing /x"}) + "\n{\"time\": 3, \"ev")
    res = run_cli("status", "--run-dir", str(run))
    assert res.returncode == cli.EXIT_NO_SUPERVISOR
    assert "exit 1: learner failed: no space left on device writing /x" in res.stdout


def test_a_replay_made_for_other_spaces_or_missing_an_array_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    with pytest.raises(FatalError, match="was made for"):
        ReplayBuffer(tmp_path / "replay", 100, (4,), np.float32, 1)
    (tmp_path / "replay" / "prev.npy").unlink()
    with pytest.raises(FatalError, match="prev.npy is missing"):
        make_replay(tmp_path / "replay")
