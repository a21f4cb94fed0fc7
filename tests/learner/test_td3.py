"""TD3 updates on tiny inputs: smoothing, policy delay, where the encoder's gradients come from."""

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from learner.alerts import AlertMonitor
from learner.replay import Batch
from learner.td3 import TD3Agent, random_shift
from policy.acting import ActingPolicy
from policy.network import policy_arrays
from protocol.config import LearnerConfig

pytestmark = pytest.mark.timeout(60)

IMG = (4, 84, 84)
USERS = Path(__file__).resolve().parents[2] / "configs" / "users_diverging.yaml"


def cfg(**kw):
    base = dict(batch_size=8, hidden_dim=32, feature_dim=16, encoder="nature", policy_delay=2)
    base.update(kw)
    return LearnerConfig(**base)


def batch(obs_shape, n=8, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        obs = rng.integers(0, 255, (n,) + obs_shape, dtype=np.uint8)
        nxt = rng.integers(0, 255, (n,) + obs_shape, dtype=np.uint8)
    else:
        obs = rng.normal(size=(n,) + obs_shape).astype(np.float32)
        nxt = rng.normal(size=(n,) + obs_shape).astype(np.float32)
    return Batch(obs=obs, action=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                 reward=rng.normal(size=n).astype(np.float32), discount=np.full(n, 0.99, np.float32),
                 next_obs=nxt, age=np.ones(n, np.int64))


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_actor_updates_only_every_policy_delay():
    torch.manual_seed(0)
    agent = TD3Agent((3,), 2, cfg(policy_delay=3), torch.device("cpu"))
    b = batch((3,), dtype=np.float32)
    for i in range(1, 7):
        before = params(agent.policy.actor)
        metrics = agent.update(b)
        assert changed(before, agent.policy.actor) == (i % 3 == 0)
        assert ("train/actor_loss" in metrics) == (i % 3 == 0)


def test_target_policy_smoothing_noise_is_clipped(monkeypatch):
    torch.manual_seed(0)
    agent = TD3Agent((3,), 2, cfg(target_noise=5.0, target_noise_clip=0.1), torch.device("cpu"))
    seen = []
    real = agent.critic_target.forward

    def spy(h, action):
        seen.append(action.detach().clone())
        return real(h, action)

    monkeypatch.setattr(agent.critic_target, "forward", spy)
    b = batch((3,), dtype=np.float32)
    agent.update(b)
    with torch.no_grad():
        clean = agent.actor_target(torch.from_numpy(b.next_obs))
    noise = seen[0] - clean.clamp(-1, 1)
    assert noise.abs().max() <= 0.1 + 1e-6
    assert noise.abs().max() > 0.05, "noise is applied (and large before clipping)"


def test_shared_encoder_gets_no_gradient_from_the_actor_loss():
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, cfg(encoder_mode="shared"), torch.device("cpu"))
    assert agent.policy.encoder is agent.critic_encoder
    for i in range(4):
        agent.critic_encoder.zero_grad(set_to_none=True)
        obs = agent._prep(torch.from_numpy(batch(IMG, seed=i).obs))
        h = agent.critic_encoder(obs)
        m = agent.update_actor(obs, h.detach())
        assert all(p.grad is None for p in agent.critic_encoder.parameters())
        assert "gradients/actor_cnn_norm" not in m and "train/actor_loss" in m
    # and through whole updates: the encoder moves only by the critic's step
    metrics = agent.update(batch(IMG), detailed=True)
    assert metrics["params/encoder_update_ratio"] > 0 and "params/actor_encoder_norm" not in metrics


def test_separate_encoder_is_trained_by_the_actor_loss():
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, cfg(encoder_mode="separate", actor_cnn_lr=1e-3), torch.device("cpu"))
    assert agent.policy.encoder is not agent.critic_encoder
    obs = agent._prep(torch.from_numpy(batch(IMG).obs))
    before_actor_cnn, before_critic_cnn = params(agent.policy.encoder), params(agent.critic_encoder)
    m = agent.update_actor(obs, agent.critic_encoder(obs).detach())
    assert changed(before_actor_cnn, agent.policy.encoder)
    assert not changed(before_critic_cnn, agent.critic_encoder)
    assert m["gradients/actor_cnn_norm"] > 0
    assert agent.actor_opt.param_groups[1]["lr"] == 1e-3


def test_critic_update_trains_the_shared_encoder_and_logs_norms_before_and_after_clip():
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, cfg(max_grad_norm_critic=1e-3), torch.device("cpu"))
    before = params(agent.critic_encoder)
    m = agent.update(batch(IMG))
    assert changed(before, agent.critic_encoder)
    for tag in ("train/critic_loss", "train/q1_value", "train/q2_value", "gradients/critic_cnn_norm",
                "gradients/critic_mlp_norm"):
        assert np.isfinite(m[tag]), tag
    assert m["gradients/critic_norm_before_clip"] > 1e-3
    assert m["gradients/critic_norm_after_clip"] == pytest.approx(1e-3, rel=1e-3)
    assert m["gradients/critic_clipped"] == 1.0
    # per group: after = before x the common clip coefficient
    coef = m["gradients/critic_norm_after_clip"] / m["gradients/critic_norm_before_clip"]
    assert m["gradients/critic_cnn_norm_after_clip"] == pytest.approx(m["gradients/critic_cnn_norm"] * coef, rel=1e-4)


def test_random_shift_moves_images_by_at_most_pad():
    x = torch.zeros(16, 1, 20, 20)
    x[:, :, 10, 10] = 1.0
    y = random_shift(x, 4)
    for img in y:
        r, c = divmod(int(img[0].argmax()), 20)
        assert abs(r - 10) <= 4 and abs(c - 10) <= 4
        assert img.sum() == pytest.approx(1.0, abs=1e-4), "integer shifts: no blurring"


def test_weights_message_roundtrip_into_a_worker_policy():
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, cfg(), torch.device("cpu"))
    worker_policy = ActingPolicy(IMG, 2, cfg())  # what a worker acts with (numpy)
    worker_policy.load(policy_arrays(agent.policy))
    obs = batch(IMG).obs
    with torch.no_grad():
        expected = agent.policy(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(np.stack([worker_policy(o) for o in obs]), expected, rtol=1e-4, atol=2e-5)
    bad = policy_arrays(agent.policy)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        worker_policy.load(bad)


def healthy_metrics(i):
    return {"train/q1_value": 20.0, "train/q2_value": 20.1, "train/actor_loss": -20.0, "train/q_abs_diff": 0.3,
            "train/action_saturation": 0.1, "gradients/critic_norm_before_clip": 5.0 + (i % 7) * 0.3,
            "gradients/actor_norm_before_clip": 0.5}


def test_alert_rules_fire_on_their_signal_and_stay_silent_when_healthy():
    mon = AlertMonitor(100.0, cfg())
    assert all(not mon.observe(i, healthy_metrics(i)) for i in range(6000))
    assert mon.counters()["alerts/gradient_explosion_warning"] == 0
    assert mon.counters()["alerts/gradient_explosion_critical"] == 0
    cases = [
        ({"train/actor_loss": -2.7e9}, "critical", "q_divergence"),
        ({"train/q1_value": 180.0, "train/q2_value": 180.0}, "warning", "q_high"),
        ({"gradients/actor_norm_before_clip": 50.0}, "warning", "actor_norm_growth"),
        ({"train/q_abs_diff": 40.0}, "warning", "twin_disagreement"),
        ({"train/critic_loss": float("nan")}, "critical", "non_finite"),
    ]
    for n, (change, level, rule) in enumerate(cases):
        fired = mon.observe(6000 + n, {**healthy_metrics(0), **change})
        assert [(a["level"], a["rule"]) for a in fired] == [(level, rule)], rule
        assert mon.counters()[f"alerts/{rule}"] == 1
    # saturation is judged on the mean of the last 100 updates: after 0.1s, the 83rd 0.95 takes it past 0.8
    fired = [(i, a["rule"]) for i in range(100)
             for a in mon.observe(6100 + i, {**healthy_metrics(0), "train/action_saturation": 0.95})]
    assert fired == [(82, "action_saturation")]
    assert mon.counters()["alerts/gradient_explosion_critical"] == 2
    assert mon.counters()["alerts/gradient_explosion_warning"] == 4
    assert not mon.observe(6300, {**healthy_metrics(0), "train/action_saturation": 0.95}), "rate-limited"


def test_one_saturated_batch_among_healthy_ones_is_not_an_alert():
    mon = AlertMonitor(100.0, cfg())
    for i in range(300):
        sat = 0.85 if i % 10 == 0 else 0.3  # an occasional batch past the limit, a healthy mean
        assert not mon.observe(i, {**healthy_metrics(i), "train/action_saturation": sat})


def test_slow_norm_growth_over_more_than_the_window_is_not_an_alert():
    mon = AlertMonitor(1e9, cfg())
    for i in range(20000):  # 10x over 20,000 updates: drift, not an explosion
        m = {**healthy_metrics(0), "gradients/critic_norm_before_clip": 1.0 * 10 ** (i / 20000)}
        assert not mon.observe(i, m)


def diverging_agent(lr):
    torch.manual_seed(0)
    return TD3Agent((3,), 2, cfg(actor_lr=lr, critic_lr=lr, max_grad_norm_actor=1e9, max_grad_norm_critic=1e9),
                    torch.device("cpu"))


@pytest.mark.parametrize("lr, expect_alert", [(3e-4, False), (3.0, True)])
def test_alert_on_a_really_diverging_learner_and_silence_on_a_healthy_one(lr, expect_alert):
    """Real TD3 updates on a fixed batch with reward 1 (Qmax = 100): a huge lr diverges."""
    agent = diverging_agent(lr)
    mon = AlertMonitor(1.0 / (1 - 0.99), cfg())
    b = batch((3,), n=32, dtype=np.float32)
    b.reward[:] = 1.0
    fired = []
    for _ in range(300):
        fired += mon.observe(agent.updates + 1, agent.update(b))
    assert bool(fired) == expect_alert, fired
    if expect_alert:
        assert any(a["level"] == "critical" for a in fired)


def test_host_shift_matches_the_device_shift_semantics():
    from learner.replay import host_random_shift

    x = np.zeros((64, 2, 20, 20), np.uint8)
    x[:, :, 10, 10] = 255
    y = host_random_shift(x, 4, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == np.uint8
    offsets = set()
    for img in y:
        assert (img[0] == img[1]).all(), "both channels of an image shift together"
        r, c = divmod(int(img[0].argmax()), 20)
        assert abs(r - 10) <= 4 and abs(c - 10) <= 4 and img[0].sum() == 255
        offsets.add((r, c))
    assert len(offsets) > 20, "offsets are random per image"
    edge = np.arange(20, dtype=np.uint8)[None, None, :, None].repeat(20, 3).repeat(2, 0)
    shifted = host_random_shift(edge, 4, np.random.default_rng(1))
    assert shifted.min() == 0 and shifted.max() == 19, "replicate padding: no new values"


def test_norms_growing_from_their_initial_values_are_not_an_alert():
    mon = AlertMonitor(1e9, cfg())
    for i in range(8000):  # 0.03 -> 1.2 over the first 3,000 updates, as a healthy actor does, then steady
        norm = 0.03 * 40 ** min(1.0, i / 3000)
        assert not mon.observe(i, {**healthy_metrics(0), "gradients/actor_norm_before_clip": norm})


def image_batch(n=8, shape=(4, 84, 84), seed=0):
    rng = np.random.default_rng(seed)
    return Batch(obs=rng.integers(0, 255, (n,) + shape, dtype=np.uint8), action=rng.uniform(-1, 1, (n, 2)).astype(
        np.float32), reward=np.ones(n, np.float32), discount=np.full(n, 0.99, np.float32),
        next_obs=rng.integers(0, 255, (n,) + shape, dtype=np.uint8), age=np.ones(n, np.int64))


def test_with_amp_only_the_encoder_runs_in_bf16():
    torch.manual_seed(0)
    agent = TD3Agent((4, 84, 84), 2, cfg(policy_delay=1), torch.device("cpu"))
    agent.amp = True  # CPU autocast does bf16 too, so the dtypes can be checked here
    seen = {}

    def record(name):
        return lambda module, inputs, output: seen.setdefault(name, set()).add(
            (output[0] if isinstance(output, tuple) else output).dtype)

    agent.critic_encoder.convs.register_forward_hook(record("convs"))
    agent.critic.q1.register_forward_hook(record("q1"))
    agent.critic_target.q1.register_forward_hook(record("target_q1"))
    agent.policy.actor.policy.register_forward_hook(record("actor"))
    metrics = agent.update(image_batch())
    assert seen["convs"] == {torch.bfloat16}
    assert seen["q1"] == {torch.float32} and seen["target_q1"] == {torch.float32} and seen["actor"] == {torch.float32}
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("design", ["polyak", "online"])
def test_the_target_encoder_design_is_a_choice(design):
    torch.manual_seed(0)
    agent = TD3Agent((4, 84, 84), 2, cfg(target_encoder=design, policy_delay=1), torch.device("cpu"))
    calls = {"online": 0, "target": 0}
    agent.critic_encoder.register_forward_hook(lambda *a: calls.__setitem__("online", calls["online"] + 1))
    agent.critic_encoder_target.register_forward_hook(lambda *a: calls.__setitem__("target", calls["target"] + 1))
    before = [p.clone() for p in agent.critic_encoder_target.parameters()]
    for i in range(3):
        agent.update(image_batch(seed=i))
    moved = any(not torch.equal(a, b) for a, b in zip(before, agent.critic_encoder_target.parameters()))
    if design == "polyak":
        assert calls["target"] == 3 and moved, "next_obs through the averaged encoder, which follows the online one"
    else:
        assert calls["target"] == 0 and not moved, "next_obs through the online encoder (no_grad); no target copy"
        assert calls["online"] == 6


def test_seeds_make_the_networks_and_their_noise_reproducible():
    from learner.main import restore_rng, rng_state, seed_torch

    def build(seed):
        seed_torch(seed)
        return TD3Agent((3,), 2, cfg(), torch.device("cpu"))

    a, b, c = build(5), build(5), build(6)
    pa, pb, pc = (torch.cat([p.flatten() for p in x.critic.parameters()]) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    rng = np.random.default_rng(3)
    state = rng_state(rng)
    draws = (torch.randn(4), rng.random(3))
    torch.randn(10)
    rng.random(7)
    restore_rng(state, rng)
    assert torch.equal(torch.randn(4), draws[0]) and np.array_equal(rng.random(3), draws[1])


def test_the_device_shift_refuses_frames_that_are_not_square():
    with pytest.raises(ValueError, match="square"):
        random_shift(torch.zeros(2, 1, 8, 6, device="meta"), 2)
    assert random_shift(torch.zeros(2, 1, 8, 6), 2).shape == (2, 1, 8, 6), "the CPU path takes any shape"


def test_checkpoints_carry_the_random_generators_through_a_restart(tmp_path):
    from learner.checkpoints import Checkpoints
    from learner.main import restore_rng, rng_state

    ckpt = Checkpoints(tmp_path)
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    ckpt.save("latest", {"w": torch.zeros(2)}, 1, {}, rng_state(rng))
    expected = (torch.rand(3), rng.random(3))
    fresh = np.random.default_rng(0)  # a restarted learner, seeded afresh
    torch.manual_seed(0)
    restore_rng(ckpt.load()["rng"], fresh)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(fresh.random(3), expected[1])


def users_cfg(**kw):
    """configs/users_diverging.yaml's learner, on the tiny test shapes."""
    from protocol.config import load_config

    users = load_config(USERS).learner
    keys = ("encoder_mode", "trunk", "actor_lr", "critic_lr", "actor_cnn_lr", "max_grad_norm_actor",
            "max_grad_norm_critic")
    return cfg(**{**{k: getattr(users, k) for k in keys}, **kw})


def test_the_plain_trunk_has_no_layernorm_or_tanh():
    torch.manual_seed(0)
    plain = TD3Agent(IMG, 2, users_cfg(), torch.device("cpu"))
    default = TD3Agent(IMG, 2, cfg(), torch.device("cpu"))

    def kinds(agent):
        return {type(m) for net in (agent.critic, agent.policy, agent.critic_target, agent.actor_target)
                for m in net.modules()}

    assert nn.LayerNorm not in kinds(plain) and nn.Tanh not in kinds(plain)
    assert [type(m) for m in plain.critic.trunk] == [nn.Linear, nn.ReLU] == [type(m) for m in plain.policy.actor.trunk]
    assert nn.LayerNorm in kinds(default) and nn.Tanh in kinds(default)
    with torch.no_grad():  # actions stay in [-1, 1]: the tanh on the actor's output is not the trunk's
        a = plain.policy(torch.from_numpy(batch(IMG).obs))
    assert a.abs().max() <= 1.0
    assert type(TD3Agent((3,), 2, users_cfg(), torch.device("cpu")).critic.trunk) is nn.Identity, "vectors: none"


def test_in_the_users_network_the_actor_cnn_learns_from_the_actor_loss_only():
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, users_cfg(), torch.device("cpu"))
    actor_cnn, critic_cnn = agent.policy.encoder, agent.critic_encoder
    assert actor_cnn is not critic_cnn
    # the actor optimizer's second group is the actor CNN, at actor_cnn_lr; the critic's holds none of it
    assert {id(p) for p in agent.actor_opt.param_groups[1]["params"]} == {id(p) for p in actor_cnn.parameters()}
    assert agent.actor_opt.param_groups[1]["lr"] == 1e-4
    assert not {id(p) for g in agent.critic_opt.param_groups for p in g["params"]} & {id(p) for p in
                                                                                     actor_cnn.parameters()}
    b = agent.to_device(batch(IMG))
    obs, next_obs = agent._prep(b["obs"]), agent._prep(b["next_obs"])
    before = params(actor_cnn)
    target_q = agent.td_target(b["reward"], b["discount"], next_obs)
    h = agent.encode(critic_cnn, obs)
    m = agent.update_critic(h, b["action"], target_q)
    assert all(p.grad is None for p in actor_cnn.parameters()), "the critic loss reaches no actor CNN weight"
    assert not changed(before, actor_cnn) and "gradients/actor_cnn_norm" not in m
    critic_cnn.zero_grad(set_to_none=True)
    m = agent.update_actor(obs, h.detach())
    assert all(p.grad is None for p in critic_cnn.parameters()), "the actor loss reaches no critic CNN weight"
    assert m["gradients/actor_cnn_norm"] > 0 and changed(before, actor_cnn)


def test_the_trunk_option_is_validated_and_fixed_on_resume():
    from protocol.config import ConfigError, load_config, resume_conflicts

    users = load_config(USERS)
    lc = users.learner
    assert (lc.encoder_mode, lc.trunk, lc.actor_lr, lc.critic_lr, lc.actor_cnn_lr, lc.max_grad_norm_actor,
            lc.max_grad_norm_critic) == ("separate", "plain", 1e-4, 1e-4, 1e-4, 1.0, 10.0)
    assert load_config(None).learner.trunk == "layernorm_tanh"
    with pytest.raises(ConfigError, match=r"learner\.trunk: .*'layernorm_tanh' or 'plain'"):
        load_config(None, [("learner.trunk", "layernorm")])
    assert any(c.startswith("learner.trunk='plain'") for c in
               resume_conflicts(users, load_config(USERS, [("learner.trunk",
                                                                                      "layernorm_tanh")])))


def test_the_users_network_checkpoints_resumes_and_crosses_the_wire(tmp_path):
    from learner.checkpoints import Checkpoints

    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, users_cfg(), torch.device("cpu"))
    for i in range(2):
        agent.update(batch(IMG, seed=i))
    Checkpoints(tmp_path).save("latest", agent.state_dict(), 1, {})
    state = Checkpoints(tmp_path).load()
    torch.manual_seed(1)
    resumed = TD3Agent(IMG, 2, users_cfg(), torch.device("cpu"))
    resumed.load_state_dict(state["agent"])
    assert resumed.updates == 2
    obs = torch.from_numpy(batch(IMG, seed=5).obs)
    with torch.no_grad():
        assert torch.equal(resumed.policy(obs), agent.policy(obs))
        x = agent._prep(obs)
        assert torch.equal(resumed.actor_encoder_target(x), agent.actor_encoder_target(x))
    # a checkpoint of one trunk does not load into the other (the learner names this as another model's)
    with pytest.raises(RuntimeError, match="trunk"):
        TD3Agent(IMG, 2, users_cfg(trunk="layernorm_tanh"), torch.device("cpu")).load_state_dict(state["agent"])
    worker_policy = ActingPolicy(IMG, 2, users_cfg())
    worker_policy.load(policy_arrays(agent.policy))
    with torch.no_grad():
        expected = agent.policy(obs).numpy()  # channels-last there
    np.testing.assert_allclose(np.stack([worker_policy(o) for o in obs.numpy()]), expected, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="missing"):
        ActingPolicy(IMG, 2, cfg()).load(policy_arrays(agent.policy))


class OpCount:
    """Every torch op dispatched inside it, counted (a per-parameter loop or an extra copy shows as more ops)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                if func.overloadpacket is torch.ops.aten._local_scalar_dense:  # .item(): a wait for the device
                    counter.local_reads += 1
                return func(*args, **(kwargs or {}))

        self.ops = 0
        self.local_reads = 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


# ops per update at batch 2 (a critic and an actor step averaged), measured 394 shared and 422 separate with fused
# Adam, foreach norms, one foreach clip and one foreach target update (696 and 759 with a per-parameter Adam,
# norms computed twice and a loop of lerp_): the budget leaves about 5% for a new metric
@pytest.mark.parametrize("mode,budget", [("shared", 415), ("separate", 445)])
def test_an_update_stays_within_its_budget_of_torch_ops(mode, budget):
    torch.manual_seed(0)
    agent = TD3Agent(IMG, 2, cfg(encoder_mode=mode, policy_delay=2), torch.device("cpu"))
    b = batch(IMG, n=2)
    agent.update(b)
    agent.update(b)
    with OpCount() as count:
        agent.update(b)
        agent.update(b)
    assert count.ops / 2 <= budget, f"{count.ops / 2:.0f} ops per update, budget {budget}"


def test_clipping_and_target_updates_match_torch_s_own_per_parameter_forms():
    """The foreach clip (norms once) against clip_grad_norm_, the foreach lerp against a loop of lerp_."""
    torch.manual_seed(0)
    agent = TD3Agent((3,), 2, cfg(max_grad_norm_critic=0.01), torch.device("cpu"))
    params = list(agent.critic.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for rp, g in zip(ref_params, reference):
        rp.grad = g
    total = torch.nn.utils.clip_grad_norm_(ref_params, 0.01)
    metrics = agent._clip({"critic_mlp": params}, 0.01, "critic")
    assert torch.allclose(metrics["gradients/critic_norm_before_clip"], total, rtol=1e-5)
    for p, rp in zip(params, ref_params):
        assert torch.allclose(p.grad, rp.grad, rtol=1e-5, atol=1e-9)
    targets = [tp.detach().clone() for tp in agent.critic_target.parameters()]
    for p in agent.critic.parameters():
        p.data.add_(1.0)
    agent.soft_update()
    for t0, tp, p in zip(targets, agent.critic_target.parameters(), agent.critic.parameters()):
        assert torch.equal(tp, t0.lerp(p.detach(), agent.cfg.tau))


@pytest.mark.parametrize("lr", [3e-4, 3.0])
def test_metrics_read_every_n_updates_fire_the_same_alerts_at_the_same_updates_with_few_host_reads(lr):
    """The diverging and the healthy learner of the alert test, their metrics read through the pipe every 1, 7
    and 64 updates: the same alerts at the same update numbers as reading each update at once, the same metrics,
    and at most ceil(N / read_every) host reads over N updates (none inside an update)."""
    import math

    from learner.metrics import MetricsPipe

    n = 60
    b = batch((3,), n=32, dtype=np.float32)
    b.reward[:] = 1.0
    torch.manual_seed(0)
    reference, mon = diverging_agent(lr), AlertMonitor(1.0 / (1 - 0.99), cfg())
    expected, rows = [], []
    for _ in range(n):
        m = reference.update(b)
        rows.append(m)
        expected += [(reference.updates, a["rule"], a["level"]) for a in mon.observe(reference.updates, m)]
    assert (lr == 3.0) == bool(expected), expected

    for read_every in (1, 7, 64):
        torch.manual_seed(0)
        agent, mon = diverging_agent(lr), AlertMonitor(1.0 / (1 - 0.99), cfg())
        fired, seen = [], []

        def take(updates, m, age):
            seen.append(m)
            fired.extend((updates, a["rule"], a["level"]) for a in mon.observe(updates, m))

        pipe = MetricsPipe(agent.host_reads, read_every, take)
        for i in range(n):
            with OpCount() if i < 4 else contextlib.nullcontext() as count:  # counting every op is slow
                keys, values = agent.update_deferred(b)
            if count is not None:
                assert count.local_reads == 0, "no host read of a device value inside an update"
            pipe.add(agent.updates, keys, values, 1.0)
        pipe.flush()
        assert fired == expected, (read_every, fired[:3], expected[:3])
        assert seen == rows, "the same metrics, update by update"
        assert agent.host_reads.count <= math.ceil(n / read_every), agent.host_reads.count


def test_the_device_shift_grid_is_built_once_and_shifts_by_whole_pixels():
    import torch.nn.functional as F

    from learner.td3 import shift_grid

    n, h, pad = 5, 12, 3
    grid = shift_grid(n, h, pad, torch.device("cpu"), torch.float32)
    assert shift_grid(n, h, pad, torch.device("cpu"), torch.float32) is grid, "one grid per batch shape"
    x = torch.rand(n, 2, h, h)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.tensor([[0, 0], [1, 2], [6, 6], [3, 0], [0, 5]], dtype=torch.float32)  # (x, y) in pixels
    out = F.grid_sample(padded, torch.add(grid, offsets.view(n, 1, 1, 2), alpha=2.0 / (h + 2 * pad)),
                        padding_mode="zeros", align_corners=False)
    for i, (ox, oy) in enumerate(offsets.int().tolist()):
        assert torch.allclose(out[i], padded[i, :, oy:oy + h, ox:ox + h], atol=1e-5), i


def test_a_checkpoint_of_unfused_optimizers_resumes_fused_with_the_same_steps():
    """Loading an optimizer restores the flags it was saved with: a checkpoint from before fused Adam would have
    resumed on the per-parameter path (same math, slower, a host read per parameter on a CPU)."""
    torch.manual_seed(0)
    old = TD3Agent((5,), 2, cfg(batch_size=4), torch.device("cpu"))
    for opt in (old.critic_opt, old.actor_opt):  # as an older learner made them
        for group in opt.param_groups:
            group.update(fused=None, foreach=None)
    for i in range(4):
        old.update(batch((5,), n=4, dtype=np.float32, seed=i))
    state = old.state_dict()
    assert state["critic_opt"]["param_groups"][0]["fused"] is None
    new = TD3Agent((5,), 2, cfg(batch_size=4), torch.device("cpu"))
    new.load_state_dict(state)
    for opt in (new.critic_opt, new.actor_opt):
        assert all(g["fused"] is True and not g["capturable"] for g in opt.param_groups)
        steps = {float(s["step"]) for s in opt.state.values()}
        assert steps == ({4.0} if opt is new.critic_opt else {2.0})
        assert all(s["step"].dtype == torch.float32 for s in opt.state.values())
    before = params(new.critic)
    new.update(batch((5,), n=4, dtype=np.float32, seed=9))
    assert changed(before, new.critic)
    assert float(next(iter(new.critic_opt.state.values()))["step"]) == 5.0


def test_a_call_of_the_update_loop_ends_at_the_updates_that_log_publish_or_checkpoint():
    from learner.main import call_size
    assert call_size(0, 1000, 8, 100, 100, 5000) == 8
    assert call_size(96, 1000, 8, 100, 100, 5000) == 4  # update 100 logs and publishes: the call ends there
    assert call_size(100, 1000, 8, 100, 30, 5000) == 8
    assert call_size(118, 1000, 8, 100, 30, 5000) == 2  # 120 publishes
    assert call_size(50, 53, 8, 100, 100, 5000) == 3  # only three are due
    assert call_size(53, 53, 8, 100, 100, 5000) == 0
    assert call_size(7, 1000, 1, 100, 100, 5000) == 1
