"""The wire: a worker's step batches to the learner's steps socket over ipc (one host), TCP on loopback, and TCP
with CurveZMQ (the wire across hosts, docs/hosts.md), in the same run; steps/s and bytes per step, and each
transport's steps/s against ipc's.

A sender process builds real batches (32 steps of 84x84 grayscale frames, the embedded default's, with actions,
rewards and flags: :class:`worker.batching.StepBatch`) and pushes them with the worker's socket options as fast as
the receiver takes them; the receiver decodes each with the learner's :class:`protocol.sockets.Receiver` and its
size limit. Both ends on this host share its cores, so the figures are a floor for two hosts; what they show is
what CurveZMQ's encryption costs per step, not the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BATCH, FRAME = 32, (1, 84, 84)
SECONDS = 4.0


def batch_arrays():
    import numpy as np

    from worker.batching import StepBatch

    rng = np.random.default_rng(0)
    batch = StepBatch()
    for i in range(BATCH):
        batch.add(rng.integers(0, 256, FRAME, dtype=np.uint8), rng.uniform(-1, 1, 2).astype(np.float32), 0.5,
                  first=i == 0)
    return batch.arrays()


def send(endpoint: str, curve, seconds: float) -> None:
    import zmq

    from protocol.codec import encode
    from protocol.curve import connect_curve
    from protocol.messages import STEPS
    from protocol.sockets import make_socket
    from worker.learner_link import STEPS_HWM

    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PUSH, hwm=STEPS_HWM)
    if curve is not None:
        connect_curve(sock, *curve)
    sock.connect(endpoint)
    arrays = batch_arrays()
    end = time.monotonic() + seconds
    seq = 0
    while time.monotonic() < end:
        sock.send_multipart(encode(STEPS, {"worker": "bench:worker-0", "incarnation": 0, "seq": seq,
                                           "env_steps": seq * BATCH}, arrays), copy=False)
        seq += 1
    sock.send_multipart(encode(STEPS, {"worker": "bench:end", "incarnation": 0, "seq": seq, "env_steps": 0},
                               arrays))  # the end
    sock.close(linger=5000)
    ctx.term()


def one(kind: str, tmp: Path) -> dict:
    import zmq

    from protocol.curve import Gatekeeper, serve_curve
    from protocol.sockets import STEPS_RCVHWM, Receiver, make_socket, steps_max_bytes

    ctx = zmq.Context()
    pull = make_socket(ctx, zmq.PULL, hwm=STEPS_RCVHWM, max_bytes=steps_max_bytes(BATCH, 256 * 1024))
    gate, curve = None, None
    if kind == "tcp+curve":
        server, client = zmq.curve_keypair(), zmq.curve_keypair()
        gate = Gatekeeper(ctx, {client[0]})
        serve_curve(pull, *server)
        curve = (*client, server[0])
    if kind == "ipc":
        endpoint = f"ipc://{tmp}/steps.sock"
        pull.bind(endpoint)
    else:
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    inbox = Receiver(pull)
    # the sender: a process of its own, as a worker is (its throwaway keys on stdin, not on its command line)
    sender = subprocess.Popen([sys.executable, "-c", "import json, sys; from bench.wire import send; "
                               "a = json.load(sys.stdin); send(a['endpoint'], a['curve'] and [k.encode() for k in "
                               "a['curve']], a['seconds'])"], cwd=ROOT, stdin=subprocess.PIPE, text=True)
    sender.stdin.write(json.dumps({"endpoint": endpoint, "curve": curve and [k.decode() for k in curve],
                                   "seconds": SECONDS}))
    sender.stdin.close()
    steps = messages = wire_bytes = 0
    started = None
    try:
        while True:
            frames = pull.recv_multipart(copy=False)
            if started is None:
                started = time.monotonic()
            msg = inbox.decode_frames(frames)
            assert msg is not None, inbox.dropped
            if msg["worker"] == "bench:end":
                break
            messages += 1
            steps += BATCH
            wire_bytes += sum(len(f.buffer) for f in frames)
        seconds = time.monotonic() - started
    finally:
        sender.wait(timeout=30)
        if gate is not None:
            gate.stop()
        ctx.destroy(linger=0)
    return {"steps_per_s": steps / seconds, "messages": messages, "bytes_per_step": wire_bytes / max(steps, 1),
            "seconds": seconds}


def run() -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as d:
        for kind in ("ipc", "tcp", "tcp+curve"):
            results[kind] = one(kind, Path(d))
    base = results["ipc"]["steps_per_s"]
    print(f"step batches of {BATCH} x {FRAME} uint8 frames, {SECONDS:g} s each, sender and receiver on this host:")
    for kind, r in results.items():
        r["ratio_to_ipc"] = r["steps_per_s"] / base
        print(f"  {kind:10s} {r['steps_per_s']:10,.0f} steps/s  ({r['ratio_to_ipc']:.2f}x ipc)   "
              f"{r['bytes_per_step']:,.0f} bytes per step (the message; CurveZMQ adds 33 per frame, 7 frames a batch)")
    return results


if __name__ == "__main__":
    run()
