"""status and report on the base install: torch, gymnasium, TensorBoard and Docker blocked in a process of their own."""

import json
import subprocess
import sys

import pytest

from protocol import events as ev
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)




BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'gymnasium', 'highway_env', 'tensorboard', 'docker'}:
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Block())
from supervisor.cli import main
sys.exit(main(sys.argv[1:]))
"""


REPORT_ALONE = """
import importlib, pkgutil, sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'gymnasium', 'highway_env', 'tensorboard', 'docker',
                                  'supervisor', 'learner', 'worker', 'policy'}:
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Block())
import runreport
for m in pkgutil.iter_modules(runreport.__path__):
    importlib.import_module(f'runreport.{m.name}')
from runreport.report import report
sys.exit(report(Path(sys.argv[1]), html=True))
"""


def test_the_report_runs_on_the_base_install_without_the_other_packages(tmp_path):
    """runreport, all of it, with neither torch, gymnasium, TensorBoard, Docker nor the supervisor, learner,
    worker and policy packages: a host that only reads runs."""
    from runreport.tfevents import EventWriter

    run = tmp_path / "run"
    (run / "incidents").mkdir(parents=True)
    (run / "events.jsonl").write_text(f'{{"time": 1, "event": "{ev.STALLED}", "name": "worker-0", "reason": "x"}}\n')
    w = EventWriter(run / "tb", start_time=1.0)
    for step in range(10, 200, 10):
        w.add_scalars(step, {"train/q1_value": 1.0, "train/actor_loss": -1.0, "buffer/transitions": step}, wall=step)
    w.close()
    res = subprocess.run([sys.executable, "-c", REPORT_ALONE, str(run)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "stalled: worker-0: x" in res.stdout, res.stdout + res.stderr
    assert (run / "report" / "report.html").exists() and (run / "report" / "losses.png").exists()


def test_status_and_report_run_on_the_base_install(tmp_path):
    """What a monitoring host runs needs neither torch, gymnasium, TensorBoard nor Docker."""
    def cli(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_HEAVY, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)

    res = cli("status", "--run-dir", str(tmp_path / "nothing"))
    assert res.returncode == 4 and "no supervisor answers" in res.stderr, res.stderr
    run = tmp_path / "run"
    (run / "incidents").mkdir(parents=True)
    (run / "events.jsonl").write_text(json.dumps({"time": 1, "event": ev.STALLED, "name": "worker-0", "reason": "x"})
                                      + "\n")
    res = cli("report", str(run))
    assert res.returncode == 0 and "stalled: worker-0: x" in res.stdout, res.stderr
    res = cli("up", "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "torch" in res.stderr and "[all]" in res.stderr
    assert not (tmp_path / "runs").exists(), "a refused up writes nothing"
