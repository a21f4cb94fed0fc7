"""Structured logs: one JSON object per line in ``runs/<id>/logs/<name>.jsonl``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def get_logger(run_dir: Path | None, name: str, debug: bool = False):
    """A structlog logger for process ``name``; to its log file, or stderr without a run dir."""
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        stream = _Tolerant(open(log_dir / f"{name}.jsonl", "a", buffering=1))
    else:
        stream = sys.stderr
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # a plain traceback string, no locals
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if debug else logging.INFO),
    ).bind(process=name)


class _Tolerant:
    """A log file whose write errors (a full disk) are counted, not raised: a log line never ends a process."""

    def __init__(self, f):
        self.f = f
        self.failed = 0

    def write(self, text: str) -> int:
        try:
            return self.f.write(text)
        except OSError:
            self.failed += 1
            return 0

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError:
            self.failed += 1
