"""The replay survives a SIGKILL of the process writing it, before and after its ring wrapped."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from learner.replay import ReplayBuffer
from tests.learner.test_replay import K, add_steps, ident

pytestmark = pytest.mark.timeout(60)










CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {root!r})
    from learner.replay import ReplayBuffer
    rb = ReplayBuffer({path!r}, 1000, (1, 6, 6), np.uint8, 2)
    def batch(seq):
        n = 10
        first = np.zeros(n, np.uint8); first[0] = seq == 0
        frames = np.full((n, 1, 6, 6), seq, np.uint8)
        return first, frames, np.full((n, 2), seq, np.float32), np.arange(n, dtype=np.float32), \\
            np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    for seq in range(20):
        rb.add_batch("w/0", seq, *batch(seq))
    rb.save_index()
    for seq in range(20, 25):  # arrives after the last index write
        rb.add_batch("w/0", seq, *batch(seq))
    print("ready", flush=True)
    time.sleep(60)
""")


def killed_writer(script: str, path) -> list[str]:
    """Run a script that writes a replay and prints lines up to "ready"; SIGKILL it there; return its lines."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", script.format(root=root, path=str(path))],
                            stdout=subprocess.PIPE, text=True, cwd=root)
    lines = []
    try:
        while not lines or lines[-1] != "ready":
            line = proc.stdout.readline()
            assert line, f"the writer ended early after {lines}"
            lines.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return lines


def test_replay_survives_sigkill_of_its_process(tmp_path):
    killed_writer(CHILD, tmp_path / "replay")
    rb = ReplayBuffer(tmp_path / "replay", 1000, (1, 6, 6), np.uint8, 2)
    assert rb.total == 200 and rb.streams["w/0"].seq == 19
    assert (rb.frames[:200, 0, 0, 0] == np.repeat(np.arange(20), 10)).all()
    assert (rb.next[:200] < 200).all(), "no link points at the entries lost with the process"
    # the stream continues: seq 20..24 are a gap, the next batch is stored as a fresh start
    first = np.zeros(10, np.uint8)
    lost = rb.add_batch("w/0", 25, first, np.full((10, 1, 6, 6), 25, np.uint8), np.zeros((10, 2), np.float32),
                        np.zeros(10, np.float32), np.zeros(10, np.uint8), np.zeros(10, np.uint8),
                        worker_env_steps=259)
    assert lost == 50
    assert rb.prev[200] == -1




WRAP_CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {root!r})
    from learner.replay import ReplayBuffer
    from tests.learner.test_replay import add_steps
    rb = ReplayBuffer({path!r}, 16, (1, 6, 6), np.uint8, 2)
    t = {{1: 0, 2: 0}}
    for seq in range(12):  # two streams, 3 steps a batch: 36 entries through a ring of 16
        for s in (1, 2):
            add_steps(rb, f"s{{s}}", seq, list(range(t[s], t[s] + 3)), first=seq == 0, stream=s)
            t[s] += 3
    rb.save_index()  # what the learner reports as stored
    print("stored", rb.total, rb.transitions_total, flush=True)
    for seq in range(12, 14):  # after the last index write: overwrites slots the index still counts
        add_steps(rb, "s2", seq, list(range(t[2], t[2] + 3)), stream=2)
        t[2] += 3
    print("ready", flush=True)
    time.sleep(60)
""")


def test_replay_survives_sigkill_after_the_ring_wrapped(tmp_path):
    stored = killed_writer(WRAP_CHILD, tmp_path / "replay")[0].split()
    assert stored[0] == "stored", stored
    total, transitions = int(stored[1]), int(stored[2])
    rb = ReplayBuffer(tmp_path / "replay", 16, (1, 6, 6), np.uint8, 2)
    assert rb.total == total and rb.transitions_total == transitions, "what was reported stored is still counted"
    held = [s for s in range(total - 16, total) if rb.alive(s)]
    overwritten = set(range(total - 16, total)) - set(held)
    assert len(overwritten) == 6, "the 6 entries written after the index took 6 slots the index still counted"
    for s in held:  # every slot that proves its entry holds exactly that entry
        assert rb.serials[s % 16] == s
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = rb.sample(16, K, 2, 0.9, rng)
        for o, nx in zip(batch.obs, batch.next_obs):
            got, nxt = ident(o), ident(nx)
            assert len({stream for stream, _ in got}) == 1, f"a stack mixes streams: {got}"
            assert nxt[-1][0] == got[-1][0] and nxt[-1][1] > got[-1][1]
    # the streams go on: the next batches link to what is still there, never to an overwritten slot
    add_steps(rb, "s1", 12, [36, 37, 38], stream=1)
    assert rb.alive(rb.prev[total % 16]) or rb.prev[total % 16] == -1
