"""The roles of a run's children and the names the children of each role go by, spelled once.

The supervisor's plan builds its children from these; chaos, the status table
and the run report find children by them.
"""

from __future__ import annotations

LEARNER = "learner"
WORKER = "worker"
SIMULATOR = "simulator"  # a CARLA server of one slot
ROLES = (LEARNER, WORKER, SIMULATOR)

SIMULATOR_PREFIX = "carla"  # simulator children are carla-N


def worker_name(slot: int) -> str:
    return f"{WORKER}-{slot}"


def simulator_name(slot: int) -> str:
    return f"{SIMULATOR_PREFIX}-{slot}"
