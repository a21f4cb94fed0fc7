"""Figures written for people, the same way wherever they are shown (``status``, ``up``'s table, the report)."""

from __future__ import annotations

import math


def duration(seconds: float | None, missing: str = "-") -> str:
    """``42s``, ``3m07s``, ``2h05m09s``; ``missing`` for no figure (None, NaN or infinity)."""
    if seconds is None or not math.isfinite(seconds):
        return missing
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
