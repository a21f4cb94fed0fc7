"""The control socket: requests served (status, restart, stop, chaos) and the status payload.

The supervisor's loop binds the socket and hands requests here first in every
turn, so an operator's request is answered however busy the run is. A request
the supervisor cannot answer gets an error reply and is counted as dropped: it
never ends the run. The status payload is the machine's snapshot with the fields
people read taken from each child's last heartbeat, as it came.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable

import zmq

from protocol.messages import CONTROL_REPLY, CONTROL_REQUEST, HOST_NAME, MAX_HOSTS, WORKER_NAME
from protocol.sockets import Receiver, send

# Requests served per turn of the loop, at most (the rest wait for the next turn).
REQUESTS_PER_TURN = 20

Handler = Callable[[str | None, dict], dict]


class ControlServer:
    """Answers requests on a bound REP socket with one handler per command (``handler(name, fields)``)."""

    def __init__(self, sock: zmq.Socket, inbox: Receiver, handlers: dict[str, Handler]):
        self.sock = sock
        self.inbox = inbox
        self.handlers = handlers

    def serve(self) -> None:
        for _ in range(REQUESTS_PER_TURN):
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self.inbox.decode_frames(frames)
            if msg is None or msg.type != CONTROL_REQUEST:
                if msg is not None:
                    self.inbox.drop("wrong_type", f"{msg.type} on the control socket")
                reply = {"ok": False, "error": "malformed request"}
            else:
                try:
                    reply = self.answer(msg["cmd"], msg.get("name"), msg.fields)
                except Exception as exc:  # a request the supervisor cannot answer must not end the run
                    self.inbox.drop("unanswerable", f"{msg.get('cmd')!r}: {exc!r:.200}")
                    reply = {"ok": False, "error": f"cannot answer {msg.get('cmd')!r}: {type(exc).__name__}"}
            try:
                send(self.sock, CONTROL_REPLY, reply)
            except Exception as exc:  # a reply that cannot be encoded: the REP socket still owes one
                send(self.sock, CONTROL_REPLY, {"ok": False, "error": f"reply not encodable: {type(exc).__name__}"})

    def answer(self, cmd: str, name: str | None, fields: dict | None = None) -> dict:
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return handler(name, fields or {})


def status_rows(snapshot: list[dict]) -> list[dict]:
    """The machine's rows with what ``status`` shows of each child's last heartbeat (a child that is not alive
    shows its last counters, no phase or detail)."""
    rows = []
    for row in snapshot:
        row = dict(row)
        hb = row.pop("heartbeat") or {}
        alive = row.pop("alive")
        row.update({
            "role": row["labels"].get("role"),
            "phase": hb.get("phase") if alive else None,
            "env_steps": int(hb.get("env_steps", 0)), "updates": int(hb.get("updates", 0)),
            "steps_per_s": float(hb.get("steps_per_s", 0.0)), "rss_bytes": int(hb.get("rss_bytes", 0)),
            "gpu_memory_bytes": hb.get("gpu_memory_bytes") if alive else None,
            "alerts": [a for a in hb.get("alerts") or [] if isinstance(a, str)],
            "detail": hb.get("detail") if alive else None,
            "refused": int(hb.get("refused") or 0),
            "weights": int(hb["weights"]) if alive and _countable(hb.get("weights")) else None,
            "hosts": sending_hosts(hb.get("hosts")) if alive else [],
        })
        if "children" in hb:  # a host of the fleet on Ray: its node and its own supervisor's children
            row["node"] = hb.get("node") if isinstance(hb.get("node"), str) else None
            identity = hb.get("identity")
            row["identity"] = identity if isinstance(identity, str) and re.fullmatch(HOST_NAME, identity) else None
            row["children"] = host_children(hb.get("children")) if alive else []
        rows.append(row)
    return rows


def host_children(children) -> list[dict]:
    """A fleet host's children as status shows them: well-formed rows only (names a terminal shows as they are)."""
    out = []
    for c in children[:256] if isinstance(children, list) else ():
        if isinstance(c, dict) and isinstance(c.get("name"), str) and re.fullmatch(WORKER_NAME, c["name"]) \
                and isinstance(c.get("state"), str) and re.fullmatch(r"[a-z_]{1,32}", c["state"]):
            out.append({"name": c["name"], "state": c["state"], "env_steps": _count(c.get("env_steps")),
                        "restarts": _count(c.get("restarts")),
                        "weights": _count(c["weights"]) if _countable(c.get("weights")) else None})
    return out


def _countable(value) -> bool:
    """A finite number, not negative (a bool is no count)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _count(value) -> int:
    return int(value) if _countable(value) else 0


def sending_hosts(hosts) -> list[dict]:
    """The learner's hosts table as status shows it: well-formed rows only (a heartbeat is input like any other:
    a host is a name a terminal shows as it is, the counts finite numbers)."""
    out = []
    for h in hosts[:MAX_HOSTS] if isinstance(hosts, list) else ():
        if isinstance(h, dict) and isinstance(h.get("host"), str) and re.fullmatch(HOST_NAME, h["host"]) and all(
                _countable(h.get(k)) for k in ("slots", "steps", "last_seen_s")):
            out.append({"host": h["host"], "slots": int(h["slots"]), "steps": int(h["steps"]),
                        "last_seen_s": float(h["last_seen_s"])})
    return out


def status_payload(rows: list[dict], *, run_dir: Path, uptime_s: float, env_steps: int, max_timesteps: int,
                   incidents: int, supervisor_dropped: int, disk: dict, stopping: bool) -> dict:
    """What a ``status`` request answers (``supervisor status --json`` prints a selection of it)."""
    return {"run_id": run_dir.name, "run_dir": str(run_dir), "supervisor_pid": os.getpid(),
            "uptime_s": round(uptime_s, 2), "env_steps": env_steps, "max_timesteps": max_timesteps,
            "incidents": incidents,
            "dropped_messages": supervisor_dropped + sum(int(r.get("dropped") or 0) for r in rows),
            "supervisor_dropped": supervisor_dropped, "disk": disk, "stopping": stopping, "processes": rows}


def progress_row(row: dict) -> dict:
    """A child's entry in ``progress.jsonl`` (what the report plots per worker and judges a frozen run by)."""
    return {"role": row["role"], "state": row["state"], "phase": row["phase"], "incarnation": row["incarnation"],
            "env_steps": row["env_steps"], "updates": row["updates"], "steps_per_s": row["steps_per_s"],
            "heartbeat_age_s": row["heartbeat_age_s"]}
