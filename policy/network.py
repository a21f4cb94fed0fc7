"""The policy network that crosses the wire: encoders and the actor.

The learner trains it; workers act with a copy of it evaluated in numpy
(:mod:`policy.acting`, no torch), built from the same config; the weights message
carries the policy's ``state_dict`` as raw float32 tensors. A package of its own
so that ``protocol`` stays free of torch; the supervisor never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def is_image(obs_shape: tuple[int, ...]) -> bool:
    return len(obs_shape) == 3


def scale_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (0..255) as floats in [-0.5, 0.5], keeping their memory format."""
    return frames.float().mul_(1.0 / 255.0).sub_(0.5)


class ImageEncoder(nn.Module):
    """Conv encoder for stacked uint8 frames (C, H, W), scaled to [-0.5, 0.5] on the device."""

    def __init__(self, obs_shape: tuple[int, ...], arch: str = "nature"):
        super().__init__()
        c = obs_shape[0]
        if arch == "nature":  # Mnih et al. 2015: cheap on CPU
            self.convs = nn.Sequential(
                nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            )
        elif arch == "drqv2":  # Yarats et al. 2021
            self.convs = nn.Sequential(
                nn.Conv2d(c, 32, 3, stride=2), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            )
        else:
            raise ValueError(f"unknown encoder architecture {arch!r}")
        with torch.no_grad():
            self.repr_dim = int(np.prod(self.convs(torch.zeros(1, *obs_shape)).shape[1:]))
        self.apply(orthogonal_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames are scaled here; float input is taken as already scaled (the learner's augmented batch)."""
        x = scale_frames(obs) if obs.dtype == torch.uint8 else obs
        return self.convs(x).flatten(1)


class VectorEncoder(nn.Module):
    """Vector observations pass through unchanged (the heads are MLPs)."""

    def __init__(self, obs_shape: tuple[int, ...]):
        super().__init__()
        self.repr_dim = int(np.prod(obs_shape))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float().flatten(1)


def make_encoder(obs_shape: tuple[int, ...], arch: str) -> nn.Module:
    return ImageEncoder(obs_shape, arch) if is_image(obs_shape) else VectorEncoder(obs_shape)


# The bottleneck between an image encoder and a head (``learner.trunk``).
TRUNKS = ("layernorm_tanh", "plain")


def make_trunk(repr_dim: int, feature_dim: int, image: bool, kind: str = "layernorm_tanh") -> nn.Module:
    """The bottleneck in front of a head; identity for vector inputs.

    ``layernorm_tanh`` (the default, DrQ-v2): Linear, LayerNorm, tanh: features bounded in [-1, 1].
    ``plain``: Linear and ReLU, as after a Nature CNN: unbounded features (the design of a user's run
    that diverged, kept so it can be reproduced).
    """
    if not image:
        return nn.Identity()
    if kind == "layernorm_tanh":
        return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
    if kind == "plain":
        return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.ReLU())
    raise ValueError(f"unknown trunk {kind!r}; one of {', '.join(TRUNKS)}")


class Actor(nn.Module):
    """Deterministic policy head: features -> action in [-1, 1]."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int, image: bool,
                 trunk: str = "layernorm_tanh"):
        super().__init__()
        self.trunk = make_trunk(repr_dim, feature_dim, image, trunk)
        in_dim = feature_dim if image else repr_dim
        self.policy = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, action_dim),
        )
        self.apply(orthogonal_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(h)))


class Policy(nn.Module):
    """Encoder + actor: what a worker needs to act. In ``shared`` mode the encoder is the critic's."""

    def __init__(self, encoder: nn.Module, actor: Actor):
        super().__init__()
        self.encoder = encoder
        self.actor = actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.encoder(obs))


def build_policy(obs_shape: tuple[int, ...], action_dim: int, learner_cfg) -> Policy:
    encoder = make_encoder(obs_shape, learner_cfg.encoder)
    actor = Actor(encoder.repr_dim, action_dim, learner_cfg.feature_dim, learner_cfg.hidden_dim, is_image(obs_shape),
                  learner_cfg.trunk)
    return Policy(encoder, actor)


def orthogonal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
    elif isinstance(m, nn.Conv2d):
        nn.init.orthogonal_(m.weight.data, math.sqrt(2.0))  # ReLU gain
        if m.bias is not None:
            m.bias.data.fill_(0.0)


def policy_arrays(policy: Policy) -> dict[str, np.ndarray]:
    """The policy's tensors as float32 numpy arrays, for the weights message."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in policy.state_dict().items()}
