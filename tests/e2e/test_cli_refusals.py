"""The supervisor CLI refuses what it cannot do in one line, and a refused command writes nothing: busy runs, changed models, too many workers, unreadable, unwritable and read-only run directories, torn state files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from supervisor import cli, preflight
from tests.conftest import ROOT
from tests.e2e.test_full_disk import needs_mount
from tests.supervisor.test_preflight import saved_run

pytestmark = pytest.mark.timeout(60)








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


@pytest.mark.timeout(120)
def test_up_refuses_64_workers_before_writing_anything(tmp_path):
    res = run_cli("up", "--config", str(ROOT / "configs/pendulum.yaml"), "--workers", "9999",
                  "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == cli.EXIT_OVERLOAD
    assert "--oversubscribe" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


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
