"""What naming a stall's cause adds to a kill: against the evidence capture it follows, in the same run.

Before a stalled child is killed the supervisor captures its evidence (the baseline
here: ``py-spy dump`` of a live Python process, as for a worker); naming the cause
then adds the process's state (one psutil read, now part of the evidence), the
GPUs' memory (``nvidia-smi`` where it answers; absent here) and reading the
incident back, matching the rules and writing the cause into ``incident.json``.
Each recorded case of ``tests/supervisor/causes`` is named; target: under 0.5 s
beyond the capture.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests" / "supervisor" / "causes"


def run(rounds: int = 20) -> dict:
    from protocol import causes
    from supervisor.drivers.evidence import gpu_memory, process_state, stack_of

    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"])
    try:
        time.sleep(0.5)
        t0 = time.perf_counter()
        for _ in range(3):
            stack_of(child.pid, 10.0)
        capture_s = (time.perf_counter() - t0) / 3
        t0 = time.perf_counter()
        for _ in range(rounds):
            process_state(child.pid)
            gpu_memory()
        state_s = (time.perf_counter() - t0) / rounds
    finally:
        child.kill()
        child.wait()
    naming: dict[str, float] = {}
    named: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(p for p in RECORDED.iterdir() if (p / "incident.json").exists()):
            times = []
            for i in range(rounds):
                d = shutil.copytree(case, Path(tmp) / f"{case.name}-{i}")
                role = json.loads((d / "incident.json").read_text())["name"].split("-")[0]
                t0 = time.perf_counter()
                named[case.name] = causes.name_incident(d, {"carla": "simulator"}.get(role, role))["cause"]
                times.append(time.perf_counter() - t0)
            naming[case.name] = statistics.median(times)
    worst = max(naming.values())
    added = state_s + worst
    print(f"evidence capture (py-spy dump of a live process, the baseline): {capture_s * 1000:.1f} ms")
    print(f"process state + GPU memory (nvidia-smi {'answers' if gpu_memory() is not None else 'absent'}): "
          f"{state_s * 1000:.2f} ms")
    for case, t in naming.items():
        print(f"  naming {case:22s} {t * 1000:6.2f} ms   -> {named[case]}")
    print(f"added to a kill: {added * 1000:.2f} ms (worst case), {added / capture_s:.3f}x the capture; "
          f"target < 500 ms: {'met' if added < 0.5 else 'MISSED'}")
    return {"capture_s": capture_s, "state_s": state_s, "naming_s": naming, "named": named, "added_s": added,
            "ratio_to_capture": added / capture_s}
