"""The supervisor's event kinds: what ``events.jsonl`` may hold, named once.

Each line of ``runs/<id>/events.jsonl`` is one JSON object with ``time`` (Unix
seconds), ``event`` (a kind below), ``name`` (the child it concerns, or ``run``)
and the kind's own fields. The supervisor writes them; ``supervisor report``, the
tests and any tool of the user read them. An event with a kind or a field not
listed here is a bug: :func:`check_event` refuses it where events are made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

from protocol import states

# Fields every line carries, whatever its kind.
COMMON_FIELDS = {
    "time": "Unix time the supervisor wrote the line (seconds)",
    "event": "the event kind",
    "name": "the child it concerns, or 'run' for the run as a whole",
}


@dataclass(frozen=True)
class EventKind:
    kind: str
    meaning: str
    fields: Mapping[str, str]


RUN_STARTED = "run_started"
LEFTOVERS_KILLED = "leftovers_killed"
ORPHANS_REMOVED = "orphans_removed"
SPAWNED = "spawned"
SPAWN_FAILED = "spawn_failed"
RUNNING = states.RUNNING  # the event of entering that state
ALERT = "alert"
STALLED = states.STALLED  # the event of entering that state
EVIDENCE_CAPTURED = "evidence_captured"
EVIDENCE_FAILED = "evidence_failed"
TERMINATING = "terminating"
KILLED = "killed"
EXITED = "exited"
BACKOFF = states.BACKOFF  # the event of entering that state
FAILED = states.FAILED  # the event of entering that state
FINISHED = "finished"
RUN_COMPLETE = "run_complete"
DEPENDENCY_RESTART = "dependency_restart"
RESTART_REQUESTED = "restart_requested"
RECYCLED = "recycled"
STOPPING = states.STOPPING  # the event of entering that state
FORCED_STOP = "forced_stop"
RUN_ENDED = "run_ended"
RESUMED = "resumed"
DISK_LOW = "disk_low"
DISK_FULL = "disk_full"
MALFORMED = "malformed"
FAULT_INJECTED = "fault_injected"
FAULT_FAILED = "fault_failed"
FAULT_ENDED = "fault_ended"

EVENT_KINDS: dict[str, EventKind] = {k.kind: k for k in [
    EventKind(RUN_STARTED, "the supervisor began a run (or resumed one)", {
        "run_dir": "the run directory", "pid": "the supervisor's pid", "workers": "env-worker slots",
        "children": "the children of the run, in start order"}),
    EventKind(LEFTOVERS_KILLED, "children of an earlier supervisor of this run that died were killed", {
        "pids": "the process groups killed"}),
    EventKind(ORPHANS_REMOVED, "the run's watchdog (supervisor.watchdog) removed simulator containers its supervisor "
              "left: the supervisor died (or the run ended) with them still there; written by the watchdog", {
                  "containers": "the names of the containers removed",
                  "reason": "why: the supervisor is gone, or the run ended",
                  "supervisor_pid": "the pid of the supervisor that started them",
                  "failed": "names of containers the Docker engine would not remove (only when there are any)"}),
    EventKind(SPAWNED, "a child was started", {
        "pid": "its pid", "incarnation": "0 for the first start, +1 for each restart",
        "standby": "true when a pre-imported standby process took over"}),
    EventKind(SPAWN_FAILED, "a child could not be started; it backs off like a crash", {
        "error": "what the driver reported"}),
    EventKind(RUNNING, "a child left its start-up phases", {"pid": "its pid", "phase": "the phase it reported"}),
    EventKind(ALERT, "a child reported a new alert (the learner's divergence alerts)", {
        "alert": "level:rule@update"}),
    EventKind(STALLED, "a child missed a deadline; evidence is captured before it is killed", {
        "pid": "its pid", "reason": "which deadline, by how much", "heartbeat": "its last heartbeat"}),
    EventKind(EVIDENCE_CAPTURED, "evidence of a stall was written and the stall's cause named from it", {
        "incident": "the incident directory, relative to the run directory",
        "cause": "the stall's cause (protocol/causes.py; unknown where no rule names it)",
        "advice": "what to do about it, in one line", "because": "the signs that named it"}),
    EventKind(EVIDENCE_FAILED, "evidence could not be captured; the kill went on without it", {
        "error": "what went wrong"}),
    EventKind(TERMINATING, "SIGTERM (and SIGCONT) sent; SIGKILL follows after the grace period", {
        "pid": "its pid", "reason": "why it is being stopped"}),
    EventKind(KILLED, "SIGKILL sent after the grace period ran out", {
        "pid": "its pid", "after_s": "seconds since SIGTERM"}),
    EventKind(EXITED, "a child's process ended", {
        "pid": "its pid", "code": "exit status; -N for signal N",
        "state": "its state when it ended (running, stalled, stopping, ...)",
        "cause": "why it ended, where it ended on its own (protocol/causes.py of_exit: crashed, killed_by_SIGKILL, "
                 "fatal, ...)"}),
    EventKind(BACKOFF, "a child will be restarted after a delay", {
        "delay_s": "the delay", "restarts": "restarts so far", "code": "the exit status that caused it"}),
    EventKind(FAILED, "a child is not restarted again", {
        "reason": "why", "restarts": "restarts within the window", "window_s": "the intensity window"}),
    EventKind(FINISHED, "a child exited normally and is not restarted (transient or temporary)", {}),
    EventKind(RUN_COMPLETE, "a significant child finished its work: the run stops with exit 0", {}),
    EventKind(DEPENDENCY_RESTART, "a child is restarted because a child it depends on is (rest_for_one)", {
        "dependency": "the child it depends on"}),
    EventKind(RESTART_REQUESTED, "a user asked for a restart", {"state": "the child's state at the time"}),
    EventKind(RECYCLED, "a planned restart: the child ran its maximum age, or a dependent asked for a fresh one", {
        "reason": "why"}),
    EventKind(RESUMED, "a restarted child resumed from its saved state (the learner from its checkpoint)", {
        "resumed_from": "the progress count its saved state held (the learner's updates)",
        "previous": "the count its previous incarnation had reached (null: not known)",
        "redone": "previous - resumed_from: work done again (null: not known)"}),
    EventKind(DISK_LOW, "free space on the run's volume fell below supervisor.disk_warn_gb", {
        "free_bytes": "bytes free", "path": "the run directory"}),
    EventKind(DISK_FULL, "the supervisor could not write for want of space: the run stops", {
        "path": "the file it was writing", "error": "the operating system's words"}),
    EventKind(STOPPING, "the run is stopping; children stop in reverse start order", {"reason": "why"}),
    EventKind(FORCED_STOP, "a second stop signal: every child is killed at once", {"reason": "why"}),
    EventKind(RUN_ENDED, "the last line of a run", {"reason": "why it ended", "exit_code": "the supervisor's exit"}),
    EventKind(MALFORMED, "a malformed message was dropped (logged at a limited rate)", {
        "reason": "a short counter key", "detail": "what was wrong", "count": "drops for this reason so far"}),
    EventKind(FAULT_INJECTED, "chaos: a fault was injected (`supervisor chaos`, or the chaos schedule); the line's "
              "name is the child hit, or 'run' for garbage on the sockets", {
                  "id": "the fault's number in this run (fault_ended names it)",
                  "fault": "its kind, one of protocol.chaos.FAULTS",
                  "target": "the child hit, or the sockets garbage went to (comma-separated)",
                  "pid": "the target's pid when hit (a container's main pid); null for garbage",
                  "incarnation": "the target's incarnation when hit; null for garbage",
                  "source": "command (supervisor chaos) or schedule (chaos.every_s)",
                  "expect": "restart (the stack must replace the target) or no_restart (it must leave it alone)",
                  "seen_by": "what should find it: heartbeat, progress or liveness deadline, exit, or nothing",
                  "deadline_s": "that deadline for the target, from the config; null for exits and no_restart faults",
                  "options": "the fault's options (slow: slow_s, duration_s)"}),
    EventKind(FAULT_FAILED, "chaos: a fault could not be injected (its target vanished, the Docker engine refused)", {
        "fault": "its kind", "error": "what went wrong", "source": "command or schedule"}),
    EventKind(FAULT_ENDED, "chaos: the window of a no_restart fault is over (slow: duration_s plus the progress "
              "deadline; garbage: chaos.settle_s)", {
                  "id": "the fault_injected it closes", "fault": "its kind", "target": "as in fault_injected",
                  "progress": "slow: the target's progress count gained in the window (null if it was replaced)",
                  "dropped": "messages the supervisor dropped as malformed in the window"}),
]}


def line(kind: str, name: str, fields: Mapping[str, object]) -> dict:
    """One line of ``events.jsonl`` as every writer of it writes one: time, event, name, then the kind's fields
    (checked where the event is made: :func:`check_event`)."""
    return {"time": round(time.time(), 3), "event": kind, "name": name, **fields}


def check_event(kind: str, fields: Mapping[str, object]) -> None:
    """Raise ValueError unless ``kind`` is a known event kind and every field is one it documents."""
    spec = EVENT_KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(sorted(EVENT_KINDS))}")
    unknown = set(fields) - set(spec.fields)
    if unknown:
        raise ValueError(f"event {kind!r}: undocumented field(s) {sorted(unknown)}")
