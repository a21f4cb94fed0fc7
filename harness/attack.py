"""Hostile input on every bound socket of a live run: oversized messages and floods, each kind from a process of
its own (libzmq may crash the *sender* of an oversized message that the receiver cuts off).

``python -m harness.attack ENDPOINTS_JSON PART STEPS_LIMIT`` runs one part; it imports zmq and the stdlib only, so
eight of them start in a moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import zmq

from protocol.sockets import SUBSCRIPTION_MAX_BYTES, load_endpoints

ROOT = Path(__file__).resolve().parent.parent


def attack_part(endpoints: dict, part: str, steps_limit: int) -> None:
    """One kind of hostile input on one bound socket of a run (run in its own process: libzmq may crash the
    *sender* of an oversized message that the receiver cuts off)."""
    ctx = zmq.Context()
    try:
        if part == "weights-big":  # the learner's weights PUB: what anyone who connects may send it
            evil = ctx.socket(zmq.XSUB)
            evil.connect(endpoints["weights"])
            evil.send(b"\x01" + b"x" * (100 * 1024 * 1024))
        elif part == "weights-flood":
            evil = ctx.socket(zmq.XSUB)
            evil.setsockopt(zmq.SNDHWM, 0)
            evil.connect(endpoints["weights"])
            for _ in range(20_000):
                evil.send(b"\x01" + os.urandom(SUBSCRIPTION_MAX_BYTES * 2))
        else:
            name, how = part.split("-")
            kind = zmq.DEALER if name == "control" else zmq.PUSH
            s = ctx.socket(kind)
            s.setsockopt(zmq.SNDHWM, 0)
            s.connect(endpoints[name])
            if how == "big":
                big = (steps_limit if name == "steps" else 64 * 1024) + 1024 * 1024
                s.send_multipart([b"", b"x" * big] if kind == zmq.DEALER else [b"x" * big])
            else:
                for i in range(3000):  # a flood of garbage that fits the limit
                    payload = os.urandom(64) if i % 2 else b"\x81\xa1v\x01"
                    s.send_multipart([b"", payload] if kind == zmq.DEALER else [payload])
                if name == "steps":
                    for _ in range(8):  # and messages as large as a real batch may be
                        s.send(b"\x00" * (steps_limit - 1024))
    finally:
        ctx.destroy(linger=3000)  # until all is sent (or 3 s, where the receiver cut the connection off)


PARTS = ("steps-big", "heartbeat-big", "control-big", "weights-big", "steps-flood", "heartbeat-flood",
         "control-flood", "weights-flood")


def attack(run_dir: Path, steps_limit: int) -> None:
    """Oversized and flooding input on every bound socket of a run, each from its own process."""
    procs = [subprocess.Popen([sys.executable, "-m", "harness.attack", json.dumps(load_endpoints(run_dir)), part,
                               str(steps_limit)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for part in PARTS]
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()




if __name__ == "__main__":
    attack_part(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
