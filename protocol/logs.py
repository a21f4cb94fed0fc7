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
        stream = open(log_dir / f"{name}.jsonl", "a", buffering=1)
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
