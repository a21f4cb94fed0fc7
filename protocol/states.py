"""The states a child of a run can be in, and the groups of them that readers test.

Stdlib only: the machine (:mod:`supervisor.machine`) enters them, ``status``
shows them, the run report reads them back from ``supervisor.json`` and
``progress.jsonl``, and tests compare against them; none spells the strings
again. They are part of the status protocol (``supervisor status --json``), so
they live beside it.
"""

from __future__ import annotations

STARTING = "starting"  # spawned, before its first heartbeat outside its start-up phases
RUNNING = "running"  # beating and progressing
STALLED = "stalled"  # a deadline was missed: evidence, then terminate, grace, kill
STOPPING = "stopping"  # asked to stop (a stop of the run, a user restart, a dependency's restart, a recycle)
BACKOFF = "backoff"  # exited, waiting to be started again
FAILED = "failed"  # past its restart limit, or fatal: not started again without a user restart
STOPPED = "stopped"  # finished, or stopped with the run

STATES = (STARTING, RUNNING, STALLED, STOPPING, BACKOFF, FAILED, STOPPED)
ALIVE = (STARTING, RUNNING, STALLED, STOPPING)  # an incarnation exists
UP = (STARTING, RUNNING)  # what a dependent needs of what it depends on
ENDED = (FAILED, STOPPED)  # nothing more happens without a user restart
