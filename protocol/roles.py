"""The roles of a run's children and the names the children of each role go by, spelled once.

The supervisor's plan builds its children from these; chaos, the status table
and the run report find children by them.
"""

from __future__ import annotations

LEARNER = "learner"
WORKER = "worker"
SIMULATOR = "simulator"  # a CARLA server of one slot
HOST = "host"  # the fleet on Ray: one host's agent and, under it, that host's own supervisor and slots
ROLES = (LEARNER, WORKER, SIMULATOR, HOST)

SIMULATOR_PREFIX = "carla"  # simulator children are carla-N


def worker_name(slot: int) -> str:
    return f"{WORKER}-{slot}"


def simulator_name(slot: int) -> str:
    return f"{SIMULATOR_PREFIX}-{slot}"


def host_name(index: int) -> str:
    return f"{HOST}-{index}"
