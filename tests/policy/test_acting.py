"""The worker's numpy policy is the learner's network: same tensors, same actions, same initialisation."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from policy.acting import ActingPolicy, orthogonal, policy_shapes
from policy.network import build_policy, policy_arrays
from protocol.config import LearnerConfig

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]

CASES = [((4, 84, 84), "nature", "layernorm_tanh"), ((4, 84, 84), "nature", "plain"),
         ((3, 64, 48), "drqv2", "layernorm_tanh"), ((1, 36, 36), "drqv2", "plain"),
         ((3,), "nature", "layernorm_tanh"), ((12,), "drqv2", "plain")]


def cfg(encoder, trunk):
    return LearnerConfig(hidden_dim=32, feature_dim=16, encoder=encoder, trunk=trunk)


def observations(obs_shape, n, seed):
    rng = np.random.default_rng(seed)
    if len(obs_shape) == 3:
        return rng.integers(0, 256, (n, *obs_shape), dtype=np.uint8)
    return rng.normal(size=(n, *obs_shape)).astype(np.float32)


@pytest.mark.parametrize("obs_shape,encoder,trunk", CASES)
def test_the_learners_weights_give_the_learners_actions(obs_shape, encoder, trunk):
    torch.manual_seed(len(obs_shape) + len(encoder))
    net = build_policy(obs_shape, 2, cfg(encoder, trunk)).eval()
    for p in net.parameters():  # not the zero biases and unit scales of a fresh network: every tensor counts
        p.data.add_(torch.randn_like(p) * 0.05)
    arrays = policy_arrays(net)
    acting = ActingPolicy(obs_shape, 2, cfg(encoder, trunk))
    assert acting.shapes == {k: tuple(v.shape) for k, v in arrays.items()}, "the same tensors, in the same order"
    acting.load(arrays)
    obs = observations(obs_shape, 16, seed=3)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    got = np.stack([acting(o) for o in obs])
    assert got.dtype == np.float32 and got.shape == (16, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
    assert np.ptp(got) > 0.01, "the actions differ between observations (the test would pass on a constant)"


@pytest.mark.parametrize("obs_shape,encoder,trunk", CASES[:1] + CASES[4:5])
def test_the_first_weights_are_the_networks_initialisation(obs_shape, encoder, trunk):
    a, b = ActingPolicy(obs_shape, 2, cfg(encoder, trunk), seed=7), ActingPolicy(obs_shape, 2, cfg(encoder, trunk), seed=7)
    c = ActingPolicy(obs_shape, 2, cfg(encoder, trunk), seed=8)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params), "one seed, one network"
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params if k.endswith("weight"))
    torch.manual_seed(0)
    net = build_policy(obs_shape, 2, cfg(encoder, trunk))
    for name, tensor in net.state_dict().items():
        mine = a.params[name]
        if name.endswith(".bias"):
            assert not mine.any() and not tensor.any(), name
            continue
        flat, theirs = mine.reshape(mine.shape[0], -1), tensor.numpy().reshape(tensor.shape[0], -1)
        small = min(flat.shape)
        gram = flat @ flat.T if flat.shape[0] == small else flat.T @ flat
        gram_t = theirs @ theirs.T if theirs.shape[0] == small else theirs.T @ theirs
        np.testing.assert_allclose(gram, gram_t, atol=1e-4, err_msg=name)  # orthogonal with torch's gain


def test_orthogonal_is_orthogonal_with_its_gain():
    w = orthogonal((8, 3, 4, 4), 2.0, np.random.default_rng(0)).reshape(8, -1)
    np.testing.assert_allclose(w @ w.T, 4.0 * np.eye(8), atol=1e-5)
    w = orthogonal((10, 4), 1.0, np.random.default_rng(0))
    np.testing.assert_allclose(w.T @ w, np.eye(4), atol=1e-5)


def test_weights_that_do_not_fit_are_refused_by_name_and_change_nothing():
    shape = (4, 84, 84)
    acting = ActingPolicy(shape, 2, cfg("nature", "layernorm_tanh"))
    before = {k: v.copy() for k, v in acting.params.items()}
    other = {k: np.zeros(v) for k, v in policy_shapes(shape, 2, cfg("nature", "plain")).items()}
    with pytest.raises(ValueError, match=r"missing \['actor.trunk.1.bias'"):
        acting.load(other)
    wrong = {k: np.zeros(v, np.float32) for k, v in acting.shapes.items()}
    wrong["actor.policy.4.weight"] = np.zeros((3, 32), np.float32)
    with pytest.raises(ValueError, match=r"actor.policy.4.weight: shape \(3, 32\), expected \(2, 32\)"):
        acting.load(wrong)
    assert all(np.array_equal(before[k], acting.params[k]) for k in before)
    with pytest.raises(ValueError, match="unknown encoder"):
        ActingPolicy(shape, 2, LearnerConfig.model_construct(**{**cfg("nature", "plain").__dict__, "encoder": "vit"}))


def test_the_worker_and_its_policy_import_no_torch():
    """The worker role runs without torch: it imports policy.acting only, and that imports no torch."""
    def imports(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
        return found

    assert not {n for n in imports(ROOT / "policy" / "acting.py") if n.split(".")[0] == "torch"}
    for path in (ROOT / "worker").rglob("*.py"):
        names = imports(path)
        assert not {n for n in names if n.split(".")[0] == "torch"}, f"{path.name} imports torch"
        assert not {n for n in names if n.split(".")[0] == "policy"} - {"policy.acting"}, \
            f"{path.name} imports policy modules other than policy.acting"
