"""Replay: one frame stored per step, stacks and n-step returns rebuilt exactly at sample time."""

import os

import numpy as np
import pytest

from learner.replay import ReplayBuffer
from worker.envs import FrameStack

pytestmark = pytest.mark.timeout(60)


K = 4


FRAME = (1, 6, 6)


def frame(stream: int, t: int) -> np.ndarray:
    """A frame whose pixels encode (stream, step) so a stack can be read back."""
    f = np.zeros(FRAME, np.uint8)
    f[0, 0, 0] = stream
    f[0, 0, 1] = t % 256
    f[0, 0, 2] = t // 256
    return f


def ident(stack: np.ndarray) -> list[tuple[int, int]]:
    return [(int(stack[i, 0, 0]), int(stack[i, 0, 1]) + 256 * int(stack[i, 0, 2])) for i in range(stack.shape[0])]


class FakeWorker:
    """Produces entries as a worker does, and remembers the stacks its actor saw."""

    def __init__(self, stream: int, ep_lengths: list[int], terminal_every: int = 2):
        self.stream = stream
        self.entries = []  # (first, frame, action, reward, term, trunc)
        self.seen = {}  # step id -> stack the actor saw at that state
        fs = FrameStack(K)
        t = 0
        for e, length in enumerate(ep_lengths):
            f = frame(stream, t)
            self.seen[t] = ident(fs.reset(f))
            self.entries.append((True, f, np.zeros(2, np.float32), 0.0, False, False))
            t += 1
            for i in range(length):
                f = frame(stream, t)
                last = i == length - 1
                term = last and e % terminal_every == 0
                self.seen[t] = ident(fs.push(f))
                self.entries.append((False, f, np.array([t, -t], np.float32), float(t), term, last and not term))
                t += 1

    def batches(self, size: int):
        for seq, i in enumerate(range(0, len(self.entries), size)):
            chunk = self.entries[i:i + size]
            yield seq, [np.array([c[j] for c in chunk]) for j in range(6)]


def fill(rb, workers, size=5, skip=()):
    gens = [list(w.batches(size)) for w in workers]
    for round_ in range(max(len(g) for g in gens)):
        for w, g in zip(workers, gens):
            if round_ < len(g) and (w.stream, round_) not in skip:
                seq, (first, frames, actions, rewards, term, trunc) = g[round_]
                rb.add_batch(f"w{w.stream}/0", seq, first, frames, actions, rewards, term, trunc)


def make(tmp_path, capacity=10_000):
    return ReplayBuffer(tmp_path / "replay", capacity, FRAME, np.uint8, 2)


def test_stacks_rebuilt_at_sample_time_equal_what_the_worker_saw(tmp_path):
    workers = [FakeWorker(1, [7, 3, 12, 2]), FakeWorker(2, [5, 9, 1, 6])]
    rb = make(tmp_path)
    fill(rb, workers)
    seen = {w.stream: w.seen for w in workers}
    batch = rb.sample(512, K, 1, 0.9, np.random.default_rng(0))
    for obs, nxt, action in zip(batch.obs, batch.next_obs, batch.action):
        o, n = ident(obs), ident(nxt)
        stream, t = o[-1]
        assert o == seen[stream][t], "the state's stack is what the worker's actor saw"
        assert n == seen[stream][t + 1], "the next stack follows in the same episode"
        assert action.tolist() == [t + 1, -(t + 1)]
        assert {s for s, _ in o + n} == {stream}, "no stack mixes streams"


def test_no_sample_crosses_an_episode_start(tmp_path):
    w = FakeWorker(1, [3, 3, 3, 3, 3], terminal_every=1)  # every episode ends terminal
    rb = make(tmp_path)
    fill(rb, [w])
    firsts = {t for t, e in enumerate(w.entries) if e[0]}
    batch = rb.sample(1024, K, 3, 0.5, np.random.default_rng(1))
    for obs, nxt in zip(batch.obs, batch.next_obs):
        (_, t0), (_, t1) = ident(obs)[-1], ident(nxt)[-1]
        episode_start = max(f for f in firsts if f <= t0)
        assert t1 > t0 and not any(t0 < f <= t1 for f in firsts), "next state is in the same episode"
        assert all(t >= episode_start for _, t in ident(obs)), "the stack holds only this episode's frames"


def test_n_step_targets_are_exact_with_truncation_and_terminal(tmp_path):
    rb = make(tmp_path)
    gamma = 0.5
    # episode A: 4 steps then truncated; episode B: 2 steps then terminal; rewards are 1, 2, 3, ...
    first = np.array([1, 0, 0, 0, 0, 1, 0, 0], np.uint8)
    rewards = np.array([0, 1, 2, 3, 4, 0, 5, 6], np.float32)
    term = np.array([0, 0, 0, 0, 0, 0, 0, 1], np.uint8)
    trunc = np.array([0, 0, 0, 0, 1, 0, 0, 0], np.uint8)
    frames = np.stack([frame(1, t) for t in range(8)])
    rb.add_batch("w/0", 0, first, frames, np.zeros((8, 2), np.float32), rewards, term, trunc)
    batch = rb.sample(2000, 1, 3, gamma, np.random.default_rng(2))
    expected = {  # start state t -> (reward sum, discount, bootstrap state)
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.125, 3),
        1: (2 + 0.5 * 3 + 0.25 * 4, 0.125, 4),
        2: (3 + 0.5 * 4, 0.25, 4),  # truncated after 2 steps: still bootstraps
        3: (4, 0.5, 4),
        5: (5 + 0.5 * 6, 0.0, 7),  # terminal: no bootstrap
        6: (6, 0.0, 7),
    }
    seen = set()
    for obs, r, d, nxt in zip(batch.obs, batch.reward, batch.discount, batch.next_obs):
        t = ident(obs)[-1][1]
        seen.add(t)
        er, ed, en = expected[t]
        assert r == pytest.approx(er) and d == pytest.approx(ed) and ident(nxt)[-1][1] == en
    assert seen == set(expected), "every transition start is sampled, and no episode end is a start"


def test_ring_overwrite_never_serves_dead_frames(tmp_path):
    workers = [FakeWorker(1, [20] * 10), FakeWorker(2, [13] * 15)]
    rb = make(tmp_path, capacity=64)
    fill(rb, workers)
    assert rb.total > 300 and rb.size == 64
    lo = rb.total - rb.capacity
    batch = rb.sample(256, K, 3, 0.9, np.random.default_rng(3))
    seen = {w.stream: w.seen for w in workers}
    exact = 0
    for obs, nxt in zip(batch.obs, batch.next_obs):
        got = ident(obs)
        stream, t = got[-1]
        want = seen[stream][t]
        # where the history was overwritten, the stack repeats its oldest living frame instead
        diverge = next((i for i in range(K) if got[i:] == want[i:]), K)
        assert all(g == got[diverge] for g in got[:diverge]), (got, want)
        exact += diverge == 0
        assert ident(nxt)[-1][1] > t
    assert (batch.age <= rb.capacity).all() and (batch.age >= 1).all()
    assert lo > 0 and exact > 200


def test_memory_per_transition_is_close_to_one_frame(tmp_path):
    rb = ReplayBuffer(tmp_path / "r", 100, (1, 84, 84), np.uint8, 2)
    frame_bytes = 84 * 84
    assert rb.bytes_per_entry() <= 1.15 * frame_bytes
    on_disk = sum(f.stat().st_size for f in (tmp_path / "r").glob("*.npy"))
    assert on_disk / 100 <= 1.15 * frame_bytes + 200  # plus the .npy headers


def test_a_lost_batch_is_counted_and_not_bridged(tmp_path):
    w = FakeWorker(1, [30])
    rb = make(tmp_path)
    fill(rb, [w], size=5, skip={(1, 2)})  # the third batch never arrives
    st = rb.streams["w1/0"]
    assert st.seq == 6 and st.lost == 0  # without the worker's count the size of a loss is unknown
    batch = rb.sample(1000, K, 1, 0.9, np.random.default_rng(4))
    for obs, nxt in zip(batch.obs, batch.next_obs):
        t0, t1 = ident(obs)[-1][1], ident(nxt)[-1][1]
        assert t1 == t0 + 1, "no transition bridges the lost steps"
        assert not (10 <= t1 < 15), "the lost steps are not invented"


def test_lost_steps_are_counted_from_the_workers_count(tmp_path):
    rb = make(tmp_path)
    mk = lambda n, first: ([np.array([first] + [0] * (n - 1), np.uint8), np.zeros((n,) + FRAME, np.uint8),
                            np.zeros((n, 2), np.float32), np.zeros(n, np.float32), np.zeros(n, np.uint8),
                            np.zeros(n, np.uint8)])
    assert rb.add_batch("w/0", 0, *mk(5, 1), worker_env_steps=4) == 0
    assert rb.add_batch("w/0", 2, *mk(5, 0), worker_env_steps=14) == 5  # seq 1 (5 steps) went missing
    assert rb.add_batch("w/0", 2, *mk(5, 0), worker_env_steps=14) == 0  # a duplicate is ignored
    assert rb.streams["w/0"].lost == 5 and rb.transitions_total == 9


def test_reopened_replay_has_the_same_contents(tmp_path):
    workers = [FakeWorker(1, [9, 4]), FakeWorker(2, [6, 6])]
    rb = make(tmp_path)
    fill(rb, workers)
    rb.flush()
    before = rb.stack(np.arange(rb.total), K)
    rb2 = make(tmp_path)
    assert rb2.total == rb.total and rb2.transitions_total == rb.transitions_total
    np.testing.assert_array_equal(rb2.stack(np.arange(rb2.total), K), before)
    with pytest.raises(RuntimeError, match="move it away"):
        ReplayBuffer(tmp_path / "replay", 10_000, (1, 8, 8), np.uint8, 2)


def add_steps(rb, key, seq, ts, first=False, stream=1):
    """A batch of a stream whose frames encode (stream, t) for each t in ts."""
    n = len(ts)
    f = np.zeros(n, np.uint8)
    f[0] = first
    return rb.add_batch(key, seq, f, np.stack([frame(stream, t) for t in ts]),
                        np.array([[t, -t] for t in ts], np.float32), np.ones(n, np.float32),
                        np.zeros(n, np.uint8), np.zeros(n, np.uint8))


def test_an_idle_stream_never_links_to_the_slot_being_overwritten(tmp_path):
    """Stream a is idle while b writes about a ring's worth: a's next entry must not take itself as its past."""
    rb = make(tmp_path, capacity=8)
    add_steps(rb, "a", 0, [0, 1, 2], first=True, stream=1)
    add_steps(rb, "b", 0, list(range(100, 105)), first=True, stream=2)
    add_steps(rb, "b", 1, [105, 106], stream=2)
    add_steps(rb, "a", 1, [3], stream=1)  # serial 10 overwrites slot 2, which held a's last entry (serial 2)
    assert rb.prev[10 % 8] == -1 and rb.flags[10 % 8] & 8, "an orphan: its predecessor is gone"
    batch = rb.sample(256, 1, 1, 0.9, np.random.default_rng(0))
    pairs = [(ident(o)[-1], ident(n)[-1]) for o, n in zip(batch.obs, batch.next_obs)]
    assert all(o != n for o, n in pairs), "no fake s -> s transition"
    assert all(n[1] == o[1] + 1 and n[0] == o[0] for o, n in pairs)


def test_every_sample_is_a_real_transition_through_many_wraps(tmp_path):
    rng = np.random.default_rng(1)
    rb = make(tmp_path, capacity=16)
    seqs, ts = {1: 0, 2: 0, 3: 0}, {1: 0, 2: 0, 3: 0}
    for _ in range(300):  # streams of very different rates, so some idle across whole wraps
        s = int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))
        n = int(rng.integers(1, 4))
        add_steps(rb, f"s{s}", seqs[s], list(range(ts[s], ts[s] + n)), first=seqs[s] == 0, stream=s)
        seqs[s] += 1
        ts[s] += n
        if rb.transitions_total > 4:
            batch = rb.sample(32, 2, 2, 0.9, rng)
            for o, nx in zip(batch.obs, batch.next_obs):
                (so, to), (sn, tn) = ident(o)[-1], ident(nx)[-1]
                assert so == sn and tn > to, ((so, to), (sn, tn))
                assert ident(o)[0][0] == so, "a stack never mixes streams"


def test_the_index_is_fsynced_with_checkpoints_not_after_every_batch(tmp_path, monkeypatch):
    rb = make(tmp_path, capacity=64)
    add_steps(rb, "a", 0, [0, 1, 2], first=True)
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    rb.save_index()
    assert calls == [], "after a batch: atomic, no fsync"
    rb.flush()
    assert len(calls) == 1, "with a checkpoint: fsynced"


def filled(tmp_path, n_batches: int = 6) -> ReplayBuffer:
    rb = ReplayBuffer(tmp_path, 64, FRAME, np.uint8, 2)
    w = FakeWorker(1, [20, 20, 20])
    for seq, (first, frames, actions, rewards, term, trunc) in list(w.batches(8))[:n_batches]:
        rb.add_batch("w1/0", seq, first, frames, actions, rewards, term, trunc)
    return rb


def test_a_checkpoint_s_flush_holds_the_lock_only_to_take_the_index(tmp_path, monkeypatch):
    """The msyncs and the index's fsync of a checkpoint go without the replay's lock: sampling goes on during a
    slow flush (a busy disk), and the flush returns the index it took."""
    import threading
    import time

    rb = filled(tmp_path)
    lock = threading.Lock()
    in_flush, release = threading.Event(), threading.Event()
    real = np.memmap.flush

    def slow_flush(self):
        in_flush.set()
        release.wait(10)  # the disk takes its time
        real(self)

    monkeypatch.setattr(np.memmap, "flush", slow_flush)
    result = {}
    flusher = threading.Thread(target=lambda: result.setdefault("index", rb.flush(lock)))
    flusher.start()
    try:
        assert in_flush.wait(10)
        t0 = time.monotonic()
        with lock:  # the sampler's turn, while the flush waits on the disk
            batch = rb.sample(4, K, 1, 0.99, np.random.default_rng(0))
        assert time.monotonic() - t0 < 1.0 and len(batch.action) == 4 and flusher.is_alive()
    finally:
        release.set()
        flusher.join(10)
    assert result["index"]["total"] == rb.total


def test_an_older_index_never_replaces_a_newer_one(tmp_path):
    import json

    rb = filled(tmp_path, 2)
    old = rb.index()
    w = FakeWorker(2, [10])
    for seq, (first, frames, actions, rewards, term, trunc) in w.batches(8):
        rb.add_batch("w2/0", seq, first, frames, actions, rewards, term, trunc)
    rb.save_index()  # the intake's write of the newer index
    rb.save_index(fsync=True, index=old)  # a checkpoint's older snapshot, written late: the newer stays
    assert json.loads((tmp_path / "index.json").read_text())["total"] == rb.total > old["total"]
