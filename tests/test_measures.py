"""The framework-free measures: per-weight squared gradient norms against a direct backward, and a layer's
representation profile against direct computations."""

import pytest
import torch
import torch.nn.functional as F

from bn_lightning.nn import DeepMLP
from bn_lightning.nn.measures import effective_rank, gradient_profile, representation_profile, std_over_mean


def test_gradient_profile_is_the_squared_norm_of_each_weights_gradient_and_leaves_grads_alone():
    torch.manual_seed(0)
    net = DeepMLP(depth=3, width=16, norm="torch")
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    names = ["stem.affine.weight", "block2.affine.weight", "head.weight"]
    found = gradient_profile(net, x, y, names)
    assert all(p.grad is None for p in net.parameters())
    F.cross_entropy(net(x), y).backward()
    params = dict(net.named_parameters())
    for name in names:
        assert found[name] == pytest.approx(float(params[name].grad.double().square().sum()), rel=1e-6)


def test_representation_profile_measures_the_rows():
    torch.manual_seed(0)
    rows = torch.randn(64, 8) + 3.0
    profile = representation_profile(rows.view(64, 2, 4))  # flattened per image
    assert profile["erank"] == pytest.approx(effective_rank(rows))
    assert profile["centered_erank"] == pytest.approx(effective_rank(rows - rows.mean(0)))
    assert profile["std_over_mean"] == pytest.approx(std_over_mean(rows))
    assert profile["rms"] == pytest.approx(float(rows.double().square().mean().sqrt()))
    assert 0 < profile["cosine"] <= 1
