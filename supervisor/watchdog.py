"""The watchdog of a run's simulator containers: none outlives its supervisor for long.

A supervisor that is SIGKILLed (or dies of anything it cannot catch) cannot remove
its CARLA containers, and a container holds its GPU until someone does. The
supervisor of a run with ``container`` children therefore starts this small
process in a session of its own (killing the supervisor or its process group does
not kill it)::

    python -m supervisor.watchdog --run-dir DIR --run-id ID --supervisor-pid PID --supervisor-started T

Once a second (:data:`POLL_S`) it asks whether that very supervisor still runs
(its pid and its start time, as :func:`protocol.runstate.live_pid` does) and
whether the run's ``supervisor.json`` says the run ended. When either says the
supervisor is done, it removes (forced) every container labelled for the run *and*
started by that supervisor (:func:`label_filter`: never another run's, nor a later
supervisor's of the same run), writes one ``orphans_removed`` line to the run's
``events.jsonl`` when it removed any, and exits. After a clean stop the supervisor
has removed its containers itself, writes ``ended`` and sends SIGTERM: the watchdog
looks at once, finds nothing left to remove (no line is written) and exits; if the
supervisor could not remove them all (the engine did not answer), the watchdog does.

Bound: a container outlives a killed supervisor by at most :data:`POLL_S` plus
the Docker engine's forced removal (about a second on an idle engine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from protocol import events as ev
from protocol.runstate import process_start_time, read_state, same_process

POLL_S = 1.0
# Two readings of one process's start time differ by less than this (live_pid's tolerance).
# An engine that does not answer is asked again, once a second, for this long before the watchdog gives up.
ENGINE_PATIENCE_S = 600.0
REMOVE_TIMEOUT_S = 60.0

GONE = "gone"
ENDED = "ended"


def owner_tag(pid: int, started: float | None) -> str:
    """The value of a container's owner label: the supervisor that started it (pid and start time)."""
    return f"{pid}-{started:.2f}" if started is not None else str(pid)


def label_filter(run_id: str, owner: str) -> dict:
    """The Docker filter of the containers a watchdog may remove: its run's, started by its supervisor."""
    from supervisor.drivers.container import OWNER_LABEL, RUN_LABEL

    return {"label": [f"{RUN_LABEL}={run_id}", f"{OWNER_LABEL}={owner}"]}


def decide(state: dict, pid: int, started: float, now_started: float | None) -> str | None:
    """What the watchdog does now: :data:`ENDED` when ``supervisor.json`` says this supervisor's run ended,
    :data:`GONE` when that very process no longer runs (its pid is free or belongs to another process),
    None while it runs on."""
    if state.get("ended") and state.get("pid") == pid and isinstance(state.get("started"), (int, float)) \
            and same_process(started, state["started"]):
        return ENDED
    if not same_process(started, now_started):
        return GONE
    return None


def reason_text(decision: str, pid: int) -> str:
    if decision == ENDED:
        return f"the run ended (supervisor.json) with containers of supervisor pid {pid} still there"
    return f"supervisor pid {pid} is gone"


def watch(run_dir: Path, pid: int, started: float, poll_s: float = POLL_S,
          start_time_of: Callable[[int], float | None] = process_start_time,
          sleep: Callable[[float], None] = time.sleep, asked_to_end: Callable[[], bool] = lambda: False) -> str | None:
    """Wait until the supervisor is done; the decision. ``asked_to_end`` (SIGTERM, sent by the supervisor's
    clean close once supervisor.json says the run ended) makes it decide at once: None when the supervisor
    still runs a run that has not ended (then it removes nothing)."""
    while True:
        asked = asked_to_end()  # before reading the state: the supervisor writes `ended` before it asks
        decision = decide(read_state(run_dir), pid, started, start_time_of(pid))
        if decision is not None or asked:
            return decision
        sleep(poll_s)


def connect(patience_s: float = ENGINE_PATIENCE_S):
    from supervisor.drivers.container import EngineError, connect_engine

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return connect_engine(10)
        except EngineError:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)


def remove_all(engine, filters: dict) -> tuple[list[str], list[str]]:
    """Force-remove every container the filter finds, all at once; (names removed, names that failed)."""
    import docker

    found = engine.containers.list(all=True, filters=filters, ignore_removed=True)
    removed: list[str] = []
    failed: list[str] = []

    def remove(container) -> None:
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.NotFound:
            pass  # removed meanwhile (by the supervisor's own close)
        except Exception as exc:
            if "already in progress" in str(exc):
                removed.append(container.name)
            else:
                failed.append(container.name)

    threads = [threading.Thread(target=remove, args=(c,), daemon=True) for c in found]
    for t in threads:
        t.start()
    deadline = time.monotonic() + REMOVE_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return sorted(removed), sorted(failed)


def write_event(run_dir: Path, fields: dict) -> None:
    """One line of ``events.jsonl``, appended in a single write (the supervisor may still hold the file)."""
    ev.check_event(ev.ORPHANS_REMOVED, fields)
    line = ev.line(ev.ORPHANS_REMOVED, "run", fields)
    fd = os.open(Path(run_dir) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m supervisor.watchdog", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--run-id", required=True)
    p.add_argument("--supervisor-pid", required=True, type=int)
    p.add_argument("--supervisor-started", required=True, type=float)
    p.add_argument("--owner", help="the containers' owner label (default: from the pid and start time)")
    args = p.parse_args(argv)
    owner = args.owner or owner_tag(args.supervisor_pid, args.supervisor_started)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the supervisor is not for its watchdog
    decision = watch(args.run_dir, args.supervisor_pid, args.supervisor_started, sleep=terminated.wait,
                     asked_to_end=terminated.is_set)
    if decision is None:
        return 0
    filters = label_filter(args.run_id, owner)
    try:
        engine = connect()
        removed, failed = remove_all(engine, filters)
        if failed:  # once more: a removal the engine refused while the container was still stopping
            time.sleep(POLL_S)
            again, failed = remove_all(engine, filters)
            removed = sorted(set(removed) | set(again))
    except Exception as exc:
        print(f"watchdog: containers of run {args.run_id} could not be removed: {exc}", file=sys.stderr, flush=True)
        return 1
    if removed or failed:
        fields = {"containers": removed, "reason": reason_text(decision, args.supervisor_pid),
                  "supervisor_pid": args.supervisor_pid}
        if failed:
            fields["failed"] = failed
        try:
            write_event(args.run_dir, fields)
        except OSError as exc:
            print(f"watchdog: events.jsonl: {exc}", file=sys.stderr, flush=True)
        print(f"watchdog: {fields['reason']}: removed {', '.join(removed) or 'none'}"
              + (f"; could not remove {', '.join(failed)}" if failed else ""), file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
