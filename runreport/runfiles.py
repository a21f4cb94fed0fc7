"""A run directory's files, read back: events, evaluations, progress, incidents, the state file, metrics.

:func:`load_run` reads everything the report needs into a :class:`Run`: the
TensorBoard event files (through :mod:`runreport.tfevents`, no TensorBoard),
``events.jsonl``, ``eval.jsonl``, ``progress.jsonl``, the incidents, the
supervisor's state file and ``config.yaml``. Every file may be missing, torn by a
kill or still being written: what cannot be read goes into ``Run.problems`` and
the rest is read. Also the readers more than one part of the report needs (the
learner's alerts, the run's env steps per second).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol import causes
from protocol import events as ev
from protocol.runstate import STATE_FILE
from runreport.tfevents import Scalars, read_scalars

STACK_FRAMES = 6  # top frames of each captured stack shown


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line cut by a crash (or not an object) is skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# -- a run's files ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    dir: Path
    cfg: object
    events: list[dict]
    evals: list[dict]
    state: dict
    progress: list[dict]
    scalars: Scalars
    incidents: list[dict]
    problems: list[str] = field(default_factory=list)
    read_s: float = 0.0

    @property
    def name(self) -> str:
        return self.dir.resolve().name if self.dir.exists() else self.dir.name

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        s = self.scalars.get(tag)
        return (s.steps, s.values) if s is not None else None


def load_incidents(run_dir: Path) -> list[dict]:
    """Each incident's record, with its cause: the one named when it was captured, or (a run from before causes
    were named) named now from the same evidence."""
    out = []
    root = run_dir / "incidents"
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        info = read_json(d / "incident.json")
        stack, log_tail = causes.read_texts(d)
        cause = info.get("cause") if isinstance(info.get("cause"), dict) else None
        if cause is None and info:
            cause = causes.name(info, stack, log_tail)
        out.append({"dir": f"incidents/{d.name}", "name": info.get("name"), "reason": info.get("reason"),
                    "time": info.get("time"), "phase": (info.get("last_heartbeat") or {}).get("phase"),
                    "cause": (cause or {}).get("cause") or causes.UNKNOWN,
                    "stack": stack, "top_frames": top_frames(stack)})
    return out


def top_frames(stack: str, n: int = STACK_FRAMES) -> list[str]:
    """The first frames of a py-spy dump: the main thread's, then each other thread's innermost one."""
    threads = causes.threads(stack)
    if not threads:
        return [line.strip() for line in stack.splitlines() if line.strip()][:2]
    main = causes.main_thread(threads)
    out = [main[0]] + [f"  {f}" for f in main[1][:n]]
    for head, frames in threads:
        if head is not main[0] and frames:
            out.append(f"{head}: {frames[0]}")
    return out


def load_run(run_dir: Path) -> Run:
    from protocol.config import Config, ConfigError, load_config

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    problems = []
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        cfg = Config()
        problems.append(f"config.yaml could not be used ({exc}); the defaults stand in for it")
    scalars = read_scalars(run_dir / "tb")
    problems += [f"tb/{p}" for p in scalars.problems]
    run = Run(run_dir, cfg, read_jsonl(run_dir / "events.jsonl"), read_jsonl(run_dir / "eval.jsonl"),
              read_json(run_dir / STATE_FILE), read_jsonl(run_dir / "progress.jsonl"), scalars,
              load_incidents(run_dir), problems)
    for name in ("events.jsonl", STATE_FILE, "config.yaml"):
        if not (run_dir / name).exists():
            problems.append(f"{name} is missing")
    if not scalars.files:
        problems.append("no TensorBoard event files in tb/ (the learner wrote no metrics yet)")
    run.read_s = time.perf_counter() - t0
    return run


# -- readers shared by the table, the verdict and the plots ---------------------------------------------------------

def alerts_of(run: Run) -> list[dict]:
    """The learner's alerts in order, from events.jsonl ("level:rule@update")."""
    out, seen = [], set()
    for e in run.events:
        if e.get("event") != ev.ALERT:
            continue
        m = re.match(r"(\w+):(\w+)@(\d+)", str(e.get("alert", "")))
        if m and m.group(0) not in seen:
            seen.add(m.group(0))
            out.append({"level": m.group(1), "rule": m.group(2), "update": int(m.group(3)), "time": e.get("time"),
                        "name": e.get("name")})
    return out


def steps_per_s(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Env steps per second of the whole run, from buffer/transitions against wall time (x: wall time)."""
    s = run.scalars.get("buffer/transitions")
    if s is None or len(s) < 2:
        return None
    dt = np.diff(s.wall)
    ok = dt > 0
    if not ok.any():
        return None
    return s.wall[1:][ok], np.diff(s.values)[ok] / dt[ok]
