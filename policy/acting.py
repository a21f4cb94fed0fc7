"""The worker's policy in numpy: the learner's network, evaluated without torch.

A worker only ever runs the actor forward, one observation at a time. Importing
torch costs a worker process about 2 s of CPU and 0.2 GiB of memory at every start
and every respawn (after each stall), for a few small matrix products per step.
:class:`ActingPolicy` evaluates the very network :mod:`policy.network` defines
(same layers, same tensor names and shapes as its ``state_dict``, so the learner's
weights message loads as it is), in float32 numpy: the results equal torch's to
float rounding (``tests/policy/test_acting.py`` compares them on every encoder
and trunk). Its first weights, before the learner's arrive, are the same
initialisation (orthogonal, ReLU gain for convolutions, zero biases) from the
worker's seed.

This module must not import torch: the worker role can run without it.
"""

from __future__ import annotations

import math

import numpy as np

# Each encoder architecture of policy.network.ImageEncoder: (out_channels, kernel, stride) per conv, each with ReLU.
ENCODER_CONVS = {
    "nature": ((32, 8, 4), (64, 4, 2), (64, 3, 1)),
    "drqv2": ((32, 3, 2), (32, 3, 1), (32, 3, 1), (32, 3, 1)),
}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default
RELU_GAIN = math.sqrt(2.0)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def policy_shapes(obs_shape: tuple[int, ...], action_dim: int, learner_cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of :class:`policy.network.Policy` built from the same arguments: name -> shape, in order."""
    shapes: dict[str, tuple[int, ...]] = {}
    image = len(obs_shape) == 3
    if image:
        if learner_cfg.encoder not in ENCODER_CONVS:
            raise ValueError(f"unknown encoder architecture {learner_cfg.encoder!r}")
        c, h, w = obs_shape
        for i, (out, k, s) in enumerate(ENCODER_CONVS[learner_cfg.encoder]):
            shapes[f"encoder.convs.{2 * i}.weight"] = (out, c, k, k)
            shapes[f"encoder.convs.{2 * i}.bias"] = (out,)
            c, h, w = out, _conv_out(h, k, s), _conv_out(w, k, s)
        repr_dim = c * h * w
        feature = learner_cfg.feature_dim
        shapes["actor.trunk.0.weight"] = (feature, repr_dim)
        shapes["actor.trunk.0.bias"] = (feature,)
        if learner_cfg.trunk == "layernorm_tanh":
            shapes["actor.trunk.1.weight"] = (feature,)
            shapes["actor.trunk.1.bias"] = (feature,)
        elif learner_cfg.trunk != "plain":
            raise ValueError(f"unknown trunk {learner_cfg.trunk!r}")
        in_dim = feature
    else:
        in_dim = int(np.prod(obs_shape))
    hidden = learner_cfg.hidden_dim
    for i, (rows, cols) in enumerate(((hidden, in_dim), (hidden, hidden), (action_dim, hidden))):
        shapes[f"actor.policy.{2 * i}.weight"] = (rows, cols)
        shapes[f"actor.policy.{2 * i}.bias"] = (rows,)
    return shapes


def orthogonal(shape: tuple[int, ...], gain: float, rng: np.random.Generator) -> np.ndarray:
    """torch.nn.init.orthogonal_'s construction: a Gaussian matrix's Q factor, signs fixed by R's diagonal."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    flat = rng.standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return (gain * q).reshape(shape).astype(np.float32)


def _conv_relu(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """One Conv2d (no padding) and ReLU on a (C, H, W) float32 array, as one matrix product (im2col)."""
    out, c, k, _ = weight.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    _, ho, wo, _, _ = windows.shape
    cols = windows.transpose(1, 2, 0, 3, 4).reshape(ho * wo, c * k * k)
    y = cols @ weight.reshape(out, c * k * k).T
    y += bias
    np.maximum(y, 0.0, out=y)
    return y.T.reshape(out, ho, wo)


class ActingPolicy:
    """Encoder and actor of one observation: ``policy(obs) -> action`` in [-1, 1], float32 numpy throughout."""

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, learner_cfg, seed: int = 0):
        self.obs_shape = tuple(obs_shape)
        self.image = len(self.obs_shape) == 3
        self.shapes = policy_shapes(self.obs_shape, action_dim, learner_cfg)
        self.convs = [s for _, _, s in ENCODER_CONVS[learner_cfg.encoder]] if self.image else []
        self.layer_norm = self.image and learner_cfg.trunk == "layernorm_tanh"
        rng = np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            if name.endswith(".bias"):
                self.params[name] = np.zeros(shape, np.float32)
            elif name == "actor.trunk.1.weight":  # LayerNorm's scale
                self.params[name] = np.ones(shape, np.float32)
            else:
                self.params[name] = orthogonal(shape, RELU_GAIN if name.startswith("encoder.") else 1.0, rng)

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Load a weights message; raises ValueError naming the first tensor that does not fit (nothing changes)."""
        if set(arrays) != set(self.shapes):
            missing, extra = sorted(set(self.shapes) - set(arrays)), sorted(set(arrays) - set(self.shapes))
            raise ValueError(f"weights do not match the policy: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, shape in self.shapes.items():
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"weights tensor {name}: shape {arrays[name].shape}, expected {shape}")
        self.params = {name: np.array(arrays[name], dtype=np.float32, order="C") for name in self.shapes}

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        p = self.params
        if self.image:
            x = obs.astype(np.float32) * np.float32(1.0 / 255.0) - np.float32(0.5) if obs.dtype == np.uint8 \
                else obs.astype(np.float32)
            for i, stride in enumerate(self.convs):
                x = _conv_relu(x, p[f"encoder.convs.{2 * i}.weight"], p[f"encoder.convs.{2 * i}.bias"], stride)
            h = p["actor.trunk.0.weight"] @ x.reshape(-1) + p["actor.trunk.0.bias"]
            if self.layer_norm:
                h = (h - h.mean()) / np.sqrt(h.var() + np.float32(LAYER_NORM_EPS))
                h = np.tanh(h * p["actor.trunk.1.weight"] + p["actor.trunk.1.bias"])
            else:
                h = np.maximum(h, 0.0)
        else:
            h = obs.astype(np.float32).reshape(-1)
        for i in range(3):
            h = p[f"actor.policy.{2 * i}.weight"] @ h + p[f"actor.policy.{2 * i}.bias"]
            if i < 2:
                h = np.maximum(h, 0.0)
        return np.tanh(h).astype(np.float32, copy=False)
