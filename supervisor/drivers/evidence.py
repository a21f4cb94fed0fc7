"""Evidence captured before a stalled child is killed: where it hung and what it was doing.

Writes ``incidents/<time>-<name>/`` with ``incident.json`` (reason, last heartbeat),
``stack.txt`` (a ``py-spy dump``; ``--nonblocking`` reads a SIGSTOPped process)
and ``log_tail.txt``. Each step is bounded so evidence never holds a kill back
for more than a few seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOG_TAIL_LINES = 200


def tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def py_spy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def incident_dir(run_dir: Path, name: str, suffix: str = "") -> Path:
    """A new ``incidents/<UTC time>-<name>[-<suffix>]/`` directory."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.3f}"[1:]
    out = Path(run_dir) / "incidents" / f"{stamp}-{name}{'-' + suffix if suffix else ''}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def stack_of(pid: int | None, timeout_s: float, native: bool = False) -> str:
    """Every thread's Python stack of ``pid`` (``py-spy dump``, bounded by ``timeout_s``), or why there is none."""
    spy = py_spy_path()
    if pid is None:
        return "the process had exited before its stack could be taken\n"
    if spy is None:
        return "py-spy is not installed; no stack captured\n"
    cmd = [spy, "dump", "--nonblocking", "--pid", str(pid)] + (["--native"] if native else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        return res.stdout + (f"\n[py-spy exit {res.returncode}]\n{res.stderr}" if res.returncode else "")
    except subprocess.TimeoutExpired:
        return f"py-spy dump timed out after {timeout_s}s\n"
    except OSError as exc:
        return f"py-spy could not run: {exc}\n"


def process_state(pid: int | None) -> dict | None:
    """The process's state as the kernel has it (psutil's names: running, sleeping, disk-sleep, stopped, zombie;
    "gone" where it has ended), its CPU time, threads and memory, its command line."""
    if pid is None:
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return {"pid": pid, "status": p.status(), "cpu_s": round(sum(p.cpu_times()[:2]), 2),
                    "threads": p.num_threads(), "rss_bytes": p.memory_info().rss, "cmdline": p.cmdline()[:20]}
    except psutil.Error as exc:
        return {"pid": pid, "status": "gone" if isinstance(exc, psutil.NoSuchProcess) else "unreadable",
                "error": type(exc).__name__}


def gpu_memory(timeout_s: float = 2.0) -> list[dict] | None:
    """Each GPU's memory in use and in total (MiB) where ``nvidia-smi`` answers; None where it does not."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        res = subprocess.run([smi, "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s)
        rows = [line.split(",") for line in res.stdout.splitlines() if line.strip()]
        return [{"index": int(i), "used_mib": int(u), "total_mib": int(t)} for i, u, t in rows]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def capture(run_dir: Path, name: str, pid: int | None, reason: str, heartbeat: dict | None, timeout_s: float,
            native: bool = False) -> Path:
    """Write one incident directory and return it."""
    out = incident_dir(run_dir, name)
    (out / "incident.json").write_text(json.dumps(
        {"name": name, "pid": pid, "reason": reason, "time": time.time(), "last_heartbeat": heartbeat,
         "process": process_state(pid), "gpus": gpu_memory()}, indent=2))
    (out / "stack.txt").write_text(stack_of(pid, timeout_s, native))
    logs = Path(run_dir) / "logs"
    (out / "log_tail.txt").write_text("\n\n".join(
        f"== logs/{name}{suffix} ==\n{tail(logs / f'{name}{suffix}')}" for suffix in (".jsonl", ".out")) + "\n")
    return out
