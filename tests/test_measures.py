"""The framework-free measures: per-weight squared gradient norms against a direct backward, and a layer's
representation profile against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from bn_lightning.nn import DeepMLP
from bn_lightning.nn.measures import angle, effective_rank, gradient_profile, representation_profile, std_over_mean


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


def test_angle_is_the_angle_between_the_vectors_even_for_the_tiny_turns_of_one_step():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    cosine = float((a * b).sum().double() / (a.double().norm() * b.double().norm()))
    assert angle(a, b) == pytest.approx(math.acos(cosine), rel=1e-6)
    assert angle(a, 3 * a) == pytest.approx(0, abs=1e-7) and angle(a, -a) == pytest.approx(math.pi)  # float32 rounding
    # A turn of 1e-6 rad in the plane of two orthogonal unit vectors, at a scale where float32's acos reads 0.
    u = torch.zeros(1000, dtype=torch.float64)
    v = u.clone()
    u[0], v[1] = 1.0, 1.0
    turned = 2.5 * (math.cos(1e-6) * u + math.sin(1e-6) * v)
    assert angle(u, turned) == pytest.approx(1e-6, rel=1e-6)
