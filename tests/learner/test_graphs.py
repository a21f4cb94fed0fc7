"""Graphed updates: replays of the captured update equal eager updates from the same state and seeds.

CUDA graphs exist only on a GPU: the equivalence runs where one is present (``bench/gpu_check.sh`` runs this file
there); on a CPU the graphed updater refuses to be built, and the learner uses the eager update."""

import copy

import numpy as np
import pytest
import torch

from learner.frames import DeviceFrames
from learner.graphs import WARMUP, GraphedUpdates
from learner.replay import ReplayBuffer
from learner.td3 import TD3Agent
from protocol.config import LearnerConfig

pytestmark = pytest.mark.timeout(120)
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

K = 4
FRAME = (1, 84, 84)


def cfg(**kw):
    base = dict(batch_size=32, hidden_dim=64, feature_dim=16, encoder="nature", policy_delay=2)
    base.update(kw)
    return LearnerConfig(**base)


def test_graphed_updates_need_the_frames_on_a_cuda_device(tmp_path):
    agent = TD3Agent((4, 84, 84), 2, cfg(), torch.device("cpu"))
    assert not agent.graphed  # and its optimizers are not capturable
    with pytest.raises(ValueError, match="learner.frames"):
        GraphedUpdates(agent)


def filled(tmp_path, device, agent, frame=FRAME):
    """A replay of random frames, episodes of 20 steps, with the agent's copy of its frames on the device."""
    rb = ReplayBuffer(tmp_path / "replay", 400, frame, np.uint8, 2)
    agent.frames = DeviceFrames(rb, device, agent.copies)
    rng = np.random.default_rng(5)
    for seq in range(6):
        n = 50
        first = np.arange(n) % 20 == 0
        frames = rng.integers(0, 255, (n,) + frame, dtype=np.uint8)
        before = rb.total
        rb.add_batch("w/0", seq, first, frames, rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                     rng.normal(size=n).astype(np.float32), np.arange(n) % 40 == 39, np.zeros(n, bool))
        agent.frames.stage(before, frames)
    return rb


@GPU
@pytest.mark.parametrize("mode,amp", [("shared", False), ("separate", False), ("shared", True)])
def test_k_graphed_updates_equal_k_eager_updates_with_the_same_seeds(tmp_path, mode, amp):
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = TD3Agent((K,) + FRAME[1:], 2, cfg(encoder_mode=mode, amp=amp), device)
    graphed = TD3Agent((K,) + FRAME[1:], 2, cfg(encoder_mode=mode, amp=amp), device)
    graphed.load_state_dict(copy.deepcopy(eager.state_dict()))
    for m_e, m_g in ((eager.critic, graphed.critic), (eager.critic_target, graphed.critic_target)):
        for a, b in zip(m_e.parameters(), m_g.parameters()):
            assert torch.equal(a, b)
    rb_e = filled(tmp_path / "e", device, eager)
    rb_g = filled(tmp_path / "g", device, graphed)
    updater = GraphedUpdates(graphed)
    steps = 2 * WARMUP + 12  # warm-up of both kinds, both captures, then replays
    rng_e, rng_g = np.random.default_rng(3), np.random.default_rng(3)
    rows_e, rows_g = [], []
    torch.manual_seed(11)
    for _ in range(steps):
        keys_e, values = eager.update_deferred(rb_e.draw(32, K, 3, 0.99, rng_e))
        rows_e.append(values)
    torch.manual_seed(11)
    copied = graphed.copies.bytes
    for _ in range(steps):
        keys_g, values = updater.update_deferred(rb_g.draw(32, K, 3, 0.99, rng_g))
        rows_g.append(values)
    torch.cuda.synchronize()
    assert updater.replays == steps - 2 * WARMUP and set(updater.graphs) == {False, True}
    assert graphed.updates == eager.updates == steps
    assert (graphed.copies.bytes - copied) / steps <= 64 * 1024
    tol = dict(rtol=2e-3, atol=2e-4) if amp else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.state_dict()["critic"].values(), graphed.state_dict()["critic"].values()):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(eager.policy.parameters(), graphed.policy.parameters()):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(eager.critic_target.parameters(), graphed.critic_target.parameters()):
        torch.testing.assert_close(b, a, **tol)
    for e, g in zip(rows_e, rows_g):  # the same metrics, row by row, in the same order
        torch.testing.assert_close(g, e, rtol=1e-2 if amp else 1e-3, atol=1e-4)
    assert keys_e == keys_g


def no_capture(body):
    """Stands in for a CUDA graph's capture on a CPU: each replay runs the body itself, on the same static inputs.
    It holds what the graph's caller does (inputs filled from the draw, the copy brought up to it, the kind of
    update chosen, the update counted, the metric row) to the eager update; what a real capture adds is held by
    the test above, on a GPU."""
    return body


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_the_graphed_updater_s_inputs_and_kinds_equal_the_eager_update_on_a_cpu(tmp_path, mode):
    device, small = torch.device("cpu"), (1, 36, 36)  # the smallest frames the encoder takes: the plumbing is tested
    torch.manual_seed(0)
    eager = TD3Agent((K,) + small[1:], 2, cfg(encoder_mode=mode, batch_size=8, hidden_dim=16), device)
    graphed = TD3Agent((K,) + small[1:], 2, cfg(encoder_mode=mode, batch_size=8, hidden_dim=16), device)
    graphed.load_state_dict(copy.deepcopy(eager.state_dict()))
    rb_e, rb_g = filled(tmp_path / "e", device, eager, small), filled(tmp_path / "g", device, graphed, small)
    updater = GraphedUpdates(graphed, record=no_capture)
    steps = 2 * WARMUP + 5
    rng_e, rng_g = np.random.default_rng(3), np.random.default_rng(3)
    torch.manual_seed(11)
    rows_e = [eager.update_deferred(rb_e.draw(8, K, 3, 0.99, rng_e)) for _ in range(steps)]
    torch.manual_seed(11)
    rows_g = [updater.update_deferred(rb_g.draw(8, K, 3, 0.99, rng_g)) for _ in range(steps)]
    assert updater.replays == steps - 2 * WARMUP and set(updater.graphs) == {False, True}
    assert graphed.updates == eager.updates == steps
    for (keys_e, e), (keys_g, g) in zip(rows_e, rows_g):
        assert keys_g == keys_e
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    for a, b in zip(eager.state_dict()["critic"].values(), graphed.state_dict()["critic"].values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(eager.actor_target.parameters(), graphed.actor_target.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # each replay's inputs came through the gate: slots, actions, rewards, discounts (no frames)
    per_replay = 2 * 8 * K * 4 + 8 * 2 * 4 + 8 * 4 + 8 * 4
    assert graphed.copies.bytes <= steps * per_replay
