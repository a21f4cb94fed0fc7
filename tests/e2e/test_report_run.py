"""supervisor report of a real run, on the base install (torch, gymnasium, TensorBoard and Docker blocked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runreport import status
from runreport.expected import main_table_metrics
from runreport.report import analyse
from runreport.runfiles import load_run
from tests.runreport.test_report import PNG, check_html

pytestmark = pytest.mark.timeout(60)


ROOT = Path(__file__).resolve().parents[2]






BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'gymnasium', 'highway_env', 'tensorboard'}:
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Block())
from supervisor.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(240)
def test_report_of_a_real_run(stack_factory):
    stack = stack_factory({"workers": {"eval_freq": 300, "eval_episodes": 1}})
    stack.wait_running()

    def row(s, name):
        return next(p for p in s["processes"] if p["name"] == name)

    stack.wait_for(lambda s: row(s, "learner")["updates"] >= 300, 180, "learner updating")
    stack.wait_for(lambda s: (stack.run_dir / "eval.jsonl").exists(), 120, "an evaluation episode")
    # while it runs: the report says so, on the base install
    res = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, "report", str(stack.run_dir), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"]["status"] == status.RUNNING
    assert stack.cli("stop").returncode == 0
    assert stack.proc.wait(timeout=40) == 0
    res = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, "report", str(stack.run_dir), "--html"], cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert "STOPPED" in res.stdout and "verdict:" in res.stdout, res.stdout
    out = stack.run_dir / "report"
    md = (out / "report.md").read_text()
    for section in ("## 1. Run status", "## 2. Expected against observed", "## 3. Divergence analysis",
                    "## 4. Incidents", "## 5. Plots"):
        assert section in md
    a = analyse(load_run(stack.run_dir))
    missing = [r.metric for r in a.rows if r.stats is None]
    assert not missing, f"rows without an observed value: {missing}"
    assert set(main_table_metrics()) <= {r.metric for r in a.rows}
    pngs = {p.name for p in out.glob("*.png")}
    assert {"losses.png", "q_values.png", "grad_norms.png", "episodes.png", "eval.png", "workers.png"} <= pngs
    for name in pngs:
        assert (out / name).read_bytes().startswith(PNG)
    check_html(out / "report.html", pngs)
