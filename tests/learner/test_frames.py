"""Frames on the device: a draw's slots gathered from the device's copy give what the host sampler gives, through
wraps, episode starts, orphans and truncations, and no slot a draw names is overwritten before it is gathered.

The device here is the CPU: the copy is a second tensor, kept current by staging and applying writes exactly as on
a GPU (only the pinned memory and the device's budget are CUDA's)."""

import threading

import numpy as np
import pytest
import torch

from learner.frames import DeviceFrames, HostToDevice
from learner.replay import ReplayBuffer, gather_stacks
from learner.sampler import Sampler
from learner.td3 import TD3Agent
from protocol.config import LearnerConfig
from protocol.exits import FatalError
from tests.learner.test_replay import FRAME, K, FakeWorker, make

pytestmark = pytest.mark.timeout(60)

CPU = torch.device("cpu")


def feed(rb, frames, workers, size=5, skip=()):
    """Write the workers' batches round by round, staging each stored batch's frames as the intake does; yields
    after each batch so a test can draw between writes."""
    gens = [list(w.batches(size)) for w in workers]
    for round_ in range(max(len(g) for g in gens)):
        for w, g in zip(workers, gens):
            if round_ < len(g) and (w.stream, round_) not in skip:
                seq, (first, fr, actions, rewards, term, trunc) = g[round_]
                before = rb.total
                rb.add_batch(f"w{w.stream}/0", seq, first, fr, actions, rewards, term, trunc)
                if rb.total > before:
                    frames.stage(before, fr)
                yield


def same(draw, batch):
    for name in ("action", "reward", "discount", "age"):
        np.testing.assert_array_equal(getattr(draw, name), getattr(batch, name), err_msg=name)


def test_draws_gathered_on_the_device_equal_the_host_sampler_through_wraps_starts_orphans_and_truncations(tmp_path):
    rb = make(tmp_path, capacity=97)  # wraps many times; episodes of mixed lengths, terminals and truncations
    frames = DeviceFrames(rb, CPU, HostToDevice(CPU))
    workers = [FakeWorker(s, [3, 11, 1, 7, 20, 2] * 4, terminal_every=2 + s) for s in range(3)]
    checked = 0
    for i, _ in enumerate(feed(rb, frames, workers, skip={(1, 4), (2, 9)})):  # lost batches: orphans
        if rb.transitions_total < 8 or i % 3:
            continue
        seed = 1000 + i
        host = rb.sample(16, K, 3, 0.9, np.random.default_rng(seed))
        draw = rb.draw(16, K, 3, 0.9, np.random.default_rng(seed))
        obs, next_obs = frames.stacks(draw)
        np.testing.assert_array_equal(obs.numpy(), host.obs)
        np.testing.assert_array_equal(next_obs.numpy(), host.next_obs)
        same(draw, host)
        checked += 1
    assert rb.total > 4 * rb.capacity and checked > 30
    frames.stacks(rb.draw(4, K, 3, 0.9, np.random.default_rng(0)))
    np.testing.assert_array_equal(frames.frames.numpy(), np.asarray(rb.frames))  # all applied at the last draw


def test_no_slot_a_draw_names_is_overwritten_before_it_is_gathered(tmp_path):
    rb = make(tmp_path, capacity=40)
    frames = DeviceFrames(rb, CPU, HostToDevice(CPU))
    workers = [FakeWorker(0, [30] * 6)]
    writes = feed(rb, frames, workers)
    for _ in range(10):
        next(writes)
    draws = []
    for seed in range(3):  # draws outstanding while the intake writes on: the ring turns past their slots
        d = rb.draw(12, K, 3, 0.9, np.random.default_rng(seed))
        draws.append((d, gather_stacks(rb.frames, d.obs_slots), gather_stacks(rb.frames, d.next_slots)))
        for _ in range(4):
            next(writes)
    assert rb.total - draws[0][0].total >= rb.capacity // 2
    overwritten = 0
    for d, obs_then, next_then in draws:
        overwritten += int((gather_stacks(rb.frames, d.obs_slots) != obs_then).any())  # the map has moved on
        obs, next_obs = frames.stacks(d)
        np.testing.assert_array_equal(obs.numpy(), obs_then)  # the copy has not
        np.testing.assert_array_equal(next_obs.numpy(), next_then)
        assert frames.applied == d.total
    assert overwritten >= 1
    # gathering an older draw after newer writes were applied is refused, never served stale
    with pytest.raises(RuntimeError, match="overwritten"):
        frames.stacks(draws[0][0])


def test_the_copy_starts_from_the_map_of_a_reopened_replay(tmp_path):
    rb = make(tmp_path, capacity=50)
    frames = DeviceFrames(rb, CPU, HostToDevice(CPU))
    for _ in feed(rb, frames, [FakeWorker(0, [9] * 8)]):
        pass
    rb.flush()
    again = ReplayBuffer(tmp_path / "replay", 50, FRAME, np.uint8, 2)
    copy = DeviceFrames(again, CPU, HostToDevice(CPU))
    assert copy.applied == again.total == rb.total
    np.testing.assert_array_equal(copy.frames.numpy(), np.asarray(rb.frames))
    seed = 7
    obs, _ = copy.stacks(again.draw(8, K, 2, 0.9, np.random.default_rng(seed)))
    np.testing.assert_array_equal(obs.numpy(), again.sample(8, K, 2, 0.9, np.random.default_rng(seed)).obs)


def test_a_capacity_beyond_the_device_s_budget_is_refused_in_one_line(tmp_path):
    rb = make(tmp_path, capacity=1000)  # 36,000 bytes of frames
    with pytest.raises(FatalError) as err:
        DeviceFrames(rb, CPU, HostToDevice(CPU), free_bytes=40_000)
    msg = str(err.value)
    assert "\n" not in msg and "learner.replay_capacity 1000" in msg and "learner.frames: host" in msg
    DeviceFrames(rb, CPU, HostToDevice(CPU), free_bytes=60_000)  # within 75% of it


def test_an_update_on_a_draw_copies_kilobytes_to_the_device_not_the_frames(tmp_path):
    """The issue's budget: at most 64 KiB per update from host to device once the frames live there (batch 256,
    84x84 frames, 4 stacked); a batch of frames brings megabytes through the same gate."""
    cfg = LearnerConfig(batch_size=256, feature_dim=8, hidden_dim=16)
    frame = (1, 84, 84)
    rb = ReplayBuffer(tmp_path / "replay", 600, frame, np.uint8, 2)
    rng = np.random.default_rng(0)
    agent = TD3Agent((4, 84, 84), 2, cfg, CPU)
    agent.frames = DeviceFrames(rb, CPU, agent.copies)
    for seq in range(10):
        n = 50
        first = np.zeros(n, bool)
        first[0] = seq == 0
        fr = rng.integers(0, 255, (n,) + frame, dtype=np.uint8)
        before = rb.total
        rb.add_batch("w/0", seq, first, fr, rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                     rng.normal(size=n).astype(np.float32), np.zeros(n, bool), np.zeros(n, bool))
        agent.frames.stage(before, fr)
    agent.update_deferred(rb.draw(256, 4, 3, 0.99, rng))
    per_update = agent.copies.bytes
    assert per_update <= 64 * 1024, per_update
    assert agent.frames.staged_bytes == rb.total * 84 * 84  # each stored frame crossed once, at its first draw
    agent.copies.bytes = 0
    agent.to_device(rb.sample(256, 4, 3, 0.99, rng))  # what an update on a batch of frames moves, through the gate
    assert agent.copies.bytes > 100 * per_update  # 2 x 256 x 4 x 84 x 84 bytes of frames: 14.5 MB


def test_the_sampler_hands_over_draws_and_keeps_the_writes_they_need_off_the_copy(tmp_path):
    rb = make(tmp_path, capacity=200)
    frames = DeviceFrames(rb, CPU, HostToDevice(CPU))
    writes = feed(rb, frames, [FakeWorker(0, [20] * 20)])
    for _ in range(20):
        next(writes)
    lock = threading.Lock()
    s = Sampler(rb, lock, LearnerConfig(batch_size=8, learning_starts=10), K, np.random.default_rng(0),
                shift_on_host=True, draws=True)
    assert s.safe_total() == rb.total  # nothing outstanding: every write may go to the copy
    stop = threading.Event()
    t = threading.Thread(target=s.run, args=(stop.is_set,), daemon=True)
    t.start()
    try:
        first = s.next(timeout_s=10)
        assert first is not None and first.obs_slots.shape == (8, K) and not first.augmented  # slots, unshifted
        for _ in range(8):
            next(writes)
        with lock:
            bound = s.safe_total()
        assert bound <= rb.total and bound == s.outstanding[0]  # the draws queued since bound the writes applied
        frames.apply(bound)
        second = s.next(timeout_s=10)
        assert second.total >= bound
        frames.stacks(second)  # not refused: no write past it was applied
    finally:
        stop.set()
        t.join(timeout=5)
