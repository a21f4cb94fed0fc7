"""TD3 from pixels or vectors: twin critics, target policy smoothing, delayed actor updates.

Encoder modes:
- ``shared`` (default; SAC-AE, DrQ, DrQ-v2): one encoder trained only through the
  critic loss; the actor reads detached features.
- ``separate``: the actor has its own encoder trained by the actor loss at
  ``actor_cnn_lr`` (the older design, kept for comparison).

Trunk (``trunk``), between an image encoder and each head: ``layernorm_tanh``
(the default: Linear, LayerNorm, tanh) or ``plain`` (Linear, ReLU: unbounded
features). ``separate`` with ``plain`` is the network of a user's run whose actor
loss went to -2.7e9 (``configs/users_diverging.yaml``; ``bench/diverge.py``).

Target encoder (``target_encoder``), for the TD target's ``next_obs``:
- ``polyak``: a Polyak-averaged copy of the encoder, updated with the other targets
  on actor steps only (every ``policy_delay`` updates: an effective tau of
  ``tau / policy_delay`` per update), as in SAC-AE and DrQ.
- ``online``: the online encoder under ``no_grad``, as in DrQ-v2 (only the heads
  have targets there).

With ``amp`` on a GPU, only the convolutional encoder runs in bf16; its features,
the heads, the TD targets and the losses are fp32, and backward and the optimizer
steps run outside autocast (near Q = 100 bf16's spacing is 0.5, larger than a step's
reward).

``update`` returns a dict of metrics named as TensorBoard tags.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from learner.frames import DeviceFrames, HostToDevice
from learner.replay import Batch, Draw
from policy.network import Actor, Policy, is_image, make_encoder, make_trunk, orthogonal_init, scale_frames
from protocol.config import q_max  # noqa: F401  (the learner's callers import it from here)


class Critic(nn.Module):
    """Twin Q heads on encoder features (through a trunk for images: LayerNorm+tanh unless ``trunk`` is plain)."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int, image: bool,
                 trunk: str = "layernorm_tanh"):
        super().__init__()
        self.trunk = make_trunk(repr_dim, feature_dim, image, trunk)
        in_dim = (feature_dim if image else repr_dim) + action_dim

        def head():
            return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))

        self.q1, self.q2 = head(), head()
        self.apply(orthogonal_init)

    def forward(self, h: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.trunk(h), action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ's augmentation: pad by replication, then shift each image by up to ``pad`` whole pixels.

    On a GPU one ``grid_sample`` does it for the batch; on a CPU slicing each image
    out of the padded batch is faster. Both give the same integer shifts.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    if x.device.type == "cpu":
        oy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
        ox = torch.randint(0, 2 * pad + 1, (n,)).tolist()
        return torch.stack([padded[i, :, y:y + h, x_:x_ + w] for i, (y, x_) in enumerate(zip(oy, ox))])
    if h != w:  # the grid below is built for square frames; the sampler's host shift takes any shape
        raise ValueError(f"random_shift on the device needs square frames, got {h}x{w}; "
                         f"use a square camera, or learner.augment_pad: 0")
    shift = torch.randint(0, 2 * pad + 1, size=(n, 1, 1, 2), device=x.device, dtype=x.dtype)
    return F.grid_sample(padded, torch.add(shift_grid(n, h, pad, x.device, x.dtype), shift,
                                           alpha=2.0 / (h + 2 * pad)), padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=8)
def shift_grid(n: int, h: int, pad: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The unshifted sampling grid of :func:`random_shift` (DrQ's), built once per batch shape, not per update."""
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad, device=device, dtype=dtype)[:h]
    arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
    return torch.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0).repeat(n, 1, 1, 1)


class HostReads:
    """The one gate through which the learner reads device values on the host (each read waits for the device):
    counted, so a test can hold the update loop to its budget of reads."""

    def __init__(self):
        self.count = 0

    def read(self, values: torch.Tensor) -> list:
        self.count += 1
        return values.tolist()


def metric_row(metrics: dict[str, torch.Tensor]) -> tuple[tuple[str, ...], torch.Tensor]:
    """An update's metrics as their names and one fp32 tensor of their values, on the device (read later)."""
    keys = tuple(metrics)
    return keys, torch.stack([metrics[k].detach().float().reshape(()) for k in keys])


def grad_norm(params) -> torch.Tensor:
    """The L2 norm of the parameters' gradients together (one foreach norm, then the norm of those)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class TD3Agent:
    def __init__(self, obs_shape: tuple, action_dim: int, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.obs_shape = tuple(obs_shape)
        self.action_dim = action_dim
        self.image = is_image(self.obs_shape)
        self.augment = self.image and cfg.augment_pad > 0
        # on a CPU the sampler thread shifts uint8 frames while the update runs; on a GPU grid_sample does it
        self.augment_on_host = self.augment and device.type == "cpu"
        self.amp = bool(cfg.amp) and device.type == "cuda"  # bf16 autocast; no gain on CPU
        self.critic_encoder = make_encoder(self.obs_shape, cfg.encoder).to(device)
        repr_dim = self.critic_encoder.repr_dim
        self.critic = Critic(repr_dim, action_dim, cfg.feature_dim, cfg.hidden_dim, self.image, cfg.trunk).to(device)
        self.separate = cfg.encoder_mode == "separate" and self.image
        actor_encoder = make_encoder(self.obs_shape, cfg.encoder).to(device) if self.separate else self.critic_encoder
        actor = Actor(repr_dim, action_dim, cfg.feature_dim, cfg.hidden_dim, self.image, cfg.trunk).to(device)
        self.policy = Policy(actor_encoder, actor)
        if self.image:
            self.critic_encoder.to(memory_format=torch.channels_last)
            actor_encoder.to(memory_format=torch.channels_last)
        # targets
        self.critic_encoder_target = copy.deepcopy(self.critic_encoder)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_target = copy.deepcopy(actor)
        self.actor_encoder_target = copy.deepcopy(actor_encoder) if self.separate else None
        for m in self._targets():
            m.requires_grad_(False)
        if cfg.compile:  # in place, so state_dict keys (checkpoints, weights messages) stay the same
            for m in (self.critic_encoder, self.critic, actor, self.critic_encoder_target, self.critic_target,
                      self.actor_target):
                m.compile()
        # updates captured as CUDA graphs (learner/graphs.py): their optimizers keep their step counts on the device
        self.graphed = bool(cfg.cuda_graph) and device.type == "cuda"
        # optimizers
        # fused: one kernel for all of a step's parameters, instead of a handful per parameter (and no host read
        # of each parameter's step count, as the CPU's per-parameter Adam makes)
        self.critic_opt = torch.optim.Adam(
            list(self.critic_encoder.parameters()) + list(self.critic.parameters()), lr=cfg.critic_lr, fused=True,
            capturable=self.graphed)
        groups = [{"params": list(actor.parameters()), "lr": cfg.actor_lr}]
        if self.separate:
            groups.append({"params": list(actor_encoder.parameters()), "lr": cfg.actor_cnn_lr})
        self.actor_opt = torch.optim.Adam(groups, fused=True, capturable=self.graphed)
        self.updates = 0
        self.host_reads = HostReads()
        self.copies = HostToDevice(device)
        self.frames: DeviceFrames | None = None  # the replay's frames on the device, where draws are gathered

    def _targets(self):
        return [m for m in (self.critic_encoder_target, self.critic_target, self.actor_target,
                            self.actor_encoder_target) if m is not None]

    def state_dict(self) -> dict:
        return {
            "critic_encoder": self.critic_encoder.state_dict(), "critic": self.critic.state_dict(),
            "policy": self.policy.state_dict(),
            "critic_encoder_target": self.critic_encoder_target.state_dict(),
            "critic_target": self.critic_target.state_dict(), "actor_target": self.actor_target.state_dict(),
            "actor_encoder_target": self.actor_encoder_target.state_dict() if self.separate else None,
            "critic_opt": self.critic_opt.state_dict(), "actor_opt": self.actor_opt.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.critic_encoder.load_state_dict(state["critic_encoder"])
        self.critic.load_state_dict(state["critic"])
        self.policy.load_state_dict(state["policy"])
        self.critic_encoder_target.load_state_dict(state["critic_encoder_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_target.load_state_dict(state["actor_target"])
        if self.separate:
            self.actor_encoder_target.load_state_dict(state["actor_encoder_target"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self._optimizer_flags()
        self.updates = int(state["updates"])

    def _optimizer_flags(self) -> None:
        """Fused, and capturable where updates are graphed, whatever a checkpoint's optimizers were saved with
        (loading restores the saved flags): a checkpoint from before fused Adam, or from a learner without graphs,
        resumes on the fast path. The same Adam either way; fused keeps each step count on the device, in fp32."""
        for opt in (self.critic_opt, self.actor_opt):
            for group in opt.param_groups:
                group.update(fused=True, foreach=None, capturable=self.graphed)
            for p, state in opt.state.items():
                if "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)

    # -- data ----------------------------------------------------------------

    def to_device(self, batch: Batch | Draw) -> dict[str, torch.Tensor]:
        """A batch's arrays on the device, through one counting gate (``self.copies``). A :class:`Batch` brings its
        frames (uint8 until there: a quarter of the bytes); a :class:`Draw` names them by slot, gathered from the
        replay's copy on the device (``self.frames``): then only kilobytes cross."""
        if isinstance(batch, Draw):
            obs, next_obs = self.frames.stacks(batch)
        else:
            obs, next_obs = self.copies.copy(batch.obs), self.copies.copy(batch.next_obs)
        return {"obs": obs, "next_obs": next_obs, "action": self.copies.copy(batch.action),
                "reward": self.copies.copy(batch.reward), "discount": self.copies.copy(batch.discount)}

    def _prep(self, obs: torch.Tensor, augmented: bool = False) -> torch.Tensor:
        """Scaled float frames in channels-last layout, randomly shifted unless the sampler already did."""
        if not self.image:
            return obs.float()
        x = obs.contiguous(memory_format=torch.channels_last)  # on uint8: a quarter of the bytes to move
        x = scale_frames(x)
        if self.augment and not augmented:
            x = random_shift(x, self.cfg.augment_pad).contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Encoder features in fp32; with ``amp`` the convolutions alone run in bf16."""
        if not self.amp:
            return encoder(x)
        # no cache of cast weights: a CUDA graph's capture forbids it, and each weight is cast once per call anyway
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return encoder(x).float()

    # -- update --------------------------------------------------------------

    def modules(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups that metrics are reported for."""
        groups = {"encoder": list(self.critic_encoder.parameters()), "critic": list(self.critic.parameters()),
                  "actor": list(self.policy.actor.parameters())}
        if self.separate:
            groups["actor_encoder"] = list(self.policy.encoder.parameters())
        return {k: v for k, v in groups.items() if v}

    def update(self, batch, detailed: bool = False) -> dict[str, float]:
        """One TD3 step, its metrics read at once (one host read per update: the reference form; the learner
        reads them every ``learner.metrics_read_every`` updates through :class:`learner.metrics.MetricsPipe`)."""
        keys, values = self.update_deferred(batch, detailed)
        return dict(zip(keys, self.host_reads.read(values)))

    def update_deferred(self, batch, detailed: bool = False) -> tuple[tuple[str, ...], torch.Tensor]:
        """One TD3 step: the critic always, the actor and targets every ``policy_delay`` updates.

        Returns the metrics' names and their values as one tensor on the device, not read: nothing in the step
        waits for the device. ``detailed`` adds parameter norms and update ratios (they cost a parameter copy).
        """
        b = self.to_device(batch)
        before = {k: torch.cat([p.detach().flatten() for p in ps]).clone()
                  for k, ps in self.modules().items()} if detailed else None
        metrics = self.step(b, batch.augmented, self.actor_due())
        self.updates += 1
        if detailed:
            metrics.update(self.parameter_metrics(before))
        return metric_row(metrics)

    def actor_due(self) -> bool:
        """Whether the next update steps the actor and the targets too (every ``policy_delay``-th)."""
        return (self.updates + 1) % self.cfg.policy_delay == 0

    def step(self, b: dict[str, torch.Tensor], augmented: bool, actor: bool) -> dict[str, torch.Tensor]:
        """The update's work on the device, from its inputs there (what :mod:`learner.graphs` captures): no host
        value read, no host value decides anything in it but ``augmented`` and ``actor``."""
        metrics: dict[str, torch.Tensor] = {}
        obs, next_obs = self._prep(b["obs"], augmented), self._prep(b["next_obs"], augmented)
        target_q = self.td_target(b["reward"], b["discount"], next_obs)
        h = self.encode(self.critic_encoder, obs)  # trained through the critic loss
        metrics.update(self.update_critic(h, b["action"], target_q))
        metrics["train/batch_reward"] = b["reward"].mean()
        if actor:
            metrics.update(self.update_actor(obs, h.detach()))
            self.soft_update()
        return metrics

    def parameter_metrics(self, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each group's parameter norm, and the norm of this update's change relative to the norm before it."""
        metrics = {}
        for name, params in self.modules().items():
            after = torch.cat([p.detach().flatten() for p in params])
            norm = torch.linalg.vector_norm(before[name])
            metrics[f"params/{name}_norm"] = torch.linalg.vector_norm(after)
            metrics[f"params/{name}_update_ratio"] = torch.linalg.vector_norm(after - before[name]) / (norm + 1e-12)
        return metrics

    def _clip(self, groups: dict[str, list], max_norm: float, prefix: str) -> dict[str, torch.Tensor]:
        """Clip the groups' gradients together; report each group's norm before and after, and whether it clipped.
        Each norm is computed once: the total is the norm of the groups' (as clip_grad_norm_ computes it), and one
        foreach multiply scales every gradient by the clipping coefficient."""
        norms = {k: grad_norm(ps) for k, ps in groups.items() if ps}
        total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [p.grad for ps in groups.values() for p in ps if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
        metrics = {}
        for k, n in norms.items():
            metrics[f"gradients/{k}_norm"] = n  # before clipping: what clip_grad_norm_ returns, per group
            metrics[f"gradients/{k}_norm_after_clip"] = n * coef
        metrics[f"gradients/{prefix}_norm_before_clip"] = total
        metrics[f"gradients/{prefix}_norm_after_clip"] = total * coef
        metrics[f"gradients/{prefix}_clipped"] = (total > max_norm).float()
        return metrics

    @torch.no_grad()
    def td_target(self, reward, discount, next_obs) -> torch.Tensor:
        """The clipped double-Q target, with target policy smoothing (clipped noise on the target actor's action)."""
        cfg = self.cfg
        next_h = self.encode(self.critic_encoder if cfg.target_encoder == "online" else
                             self.critic_encoder_target, next_obs)
        next_action = self.actor_target(self.encode(self.actor_encoder_target, next_obs) if self.separate
                                        else next_h)
        noise = (torch.randn_like(next_action) * cfg.target_noise).clamp(-cfg.target_noise_clip,
                                                                          cfg.target_noise_clip)
        next_action = (next_action + noise).clamp(-1.0, 1.0)
        tq1, tq2 = self.critic_target(next_h, next_action)
        return reward + discount * torch.min(tq1, tq2)

    def update_critic(self, h, action, target_q) -> dict[str, torch.Tensor]:
        """The critic's step on the critic encoder's features ``h`` of ``obs`` (its loss trains that encoder)."""
        cfg = self.cfg
        q1, q2 = self.critic(h, action)
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        # optimize encoder and critic
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        groups = {"critic_cnn": list(self.critic_encoder.parameters()) if self.image else [],
                  "critic_mlp": list(self.critic.parameters())}
        if not self.image:
            groups["critic_mlp"] += list(self.critic_encoder.parameters())
        metrics = self._clip(groups, cfg.max_grad_norm_critic, "critic")
        self.critic_opt.step()
        metrics.update({"train/critic_loss": critic_loss.detach(), "train/q1_value": q1.detach().mean(),
                        "train/q2_value": q2.detach().mean(), "train/target_q": target_q.mean(),
                        "train/q_abs_diff": (q1 - q2).detach().abs().mean()})
        return metrics

    def update_actor(self, obs, h_detached) -> dict[str, torch.Tensor]:
        """The actor's step; ``obs`` feeds a separate actor encoder, ``h_detached`` is the critic's features."""
        cfg = self.cfg
        actor = self.policy.actor
        # shared: the encoder learns from the critic only, so the actor reads the critic's features, detached
        h_actor = self.encode(self.policy.encoder, obs) if self.separate else h_detached
        action = actor(h_actor)
        # ours: the critic judges the action on its own features; the users' design judged it on the actor
        # CNN's, which the actor loss then pushes to wherever the critic extrapolates highest
        on_actor_features = self.separate and cfg.actor_loss_features == "actor"
        q1, _ = self.critic(h_actor if on_actor_features else h_detached, action)
        actor_loss = -q1.mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        groups = {"actor_mlp": list(actor.parameters()),
                  "actor_cnn": list(self.policy.encoder.parameters()) if self.separate else []}
        metrics = self._clip(groups, cfg.max_grad_norm_actor, "actor")
        self.actor_opt.step()
        # the critic's parameters got gradients from the actor loss; they are cleared before its next step
        metrics["train/actor_loss"] = actor_loss.detach()
        metrics["train/action_saturation"] = (action.detach().abs() > 0.99).float().mean()
        return metrics

    @torch.no_grad()
    def soft_update(self) -> None:
        tau = self.cfg.tau
        pairs = [(self.critic, self.critic_target), (self.policy.actor, self.actor_target)]
        if self.cfg.target_encoder == "polyak":
            pairs.append((self.critic_encoder, self.critic_encoder_target))
        if self.separate:
            pairs.append((self.policy.encoder, self.actor_encoder_target))
        targets = [tp for _, target in pairs for tp in target.parameters()]
        onlines = [p for online, _ in pairs for p in online.parameters()]
        torch._foreach_lerp_(targets, onlines, tau)  # one launch for every target parameter

