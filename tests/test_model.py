"""LeNet: one class for every norm, the norm between affine layer and activation."""

import itertools
import re

import pytest
import torch
from torch import nn

from bn_lightning import norm as scratch
from bn_lightning.model import LeNet

BLOCKS = ("conv1", "conv2", "fc1", "fc2")


@pytest.mark.parametrize("norm, activation, pool", list(itertools.product(["none", "scratch", "torch"], ["sigmoid", "relu"], ["avg", "max"])))
def test_every_combination_classifies_28x28_images(norm, activation, pool):
    net = LeNet(norm, activation, pool)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    act_cls = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
    pool_cls = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
    assert all(isinstance(getattr(net, b).act, act_cls) for b in BLOCKS)
    assert all(isinstance(getattr(net, b).pool, pool_cls) for b in ("conv1", "conv2"))


def test_layer_sizes_and_norm_placement():
    net = LeNet("scratch")
    expected = {
        "conv1": (nn.Conv2d, 6, scratch.BatchNorm2d),
        "conv2": (nn.Conv2d, 16, scratch.BatchNorm2d),
        "fc1": (nn.Linear, 120, scratch.BatchNorm1d),
        "fc2": (nn.Linear, 84, scratch.BatchNorm1d),
    }
    for name, (affine_cls, width, norm_cls) in expected.items():
        block = getattr(net, name)
        assert list(block._modules)[:3] == ["affine", "norm", "act"]  # norm between affine and activation
        assert isinstance(block.affine, affine_cls) and isinstance(block.norm, norm_cls)
        assert block.norm.num_features == width
    assert net.fc1.affine.in_features == 256 and net.head.out_features == 10
    assert all(isinstance(getattr(LeNet("none"), b).norm, nn.Identity) for b in BLOCKS)
    assert all(isinstance(getattr(LeNet("torch"), b).norm, (nn.BatchNorm1d, nn.BatchNorm2d)) for b in BLOCKS)


@pytest.mark.parametrize("kwargs, message", [
    ({"norm": "batch"}, "unknown norm 'batch'; choose one of: none, scratch, torch"),
    ({"activation": "tanh"}, "unknown activation 'tanh'; choose one of: sigmoid, relu"),
    ({"pool": "min"}, "unknown pool 'min'; choose one of: avg, max"),
])
def test_unknown_choice_names_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeNet(**kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (1, 28, 28), (2, 1, 32, 32)])
def test_wrong_image_shape_is_a_clear_error(shape):
    expected = re.escape(f"LeNet expects images of shape (N, 1, 28, 28), got {shape}")
    with pytest.raises(ValueError, match=expected):
        LeNet("scratch")(torch.randn(shape))


def test_scratch_and_torch_bn_train_the_same_network_identically():
    """Same seed, same init: a few SGD steps agree to float32 precision, and so do checkpoints."""
    nets = []
    for norm in ("scratch", "torch"):
        torch.manual_seed(0)
        nets.append(LeNet(norm))
    assert nets[0].state_dict().keys() == nets[1].state_dict().keys()
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    torch.manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for (key, ours), theirs in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=key)
    x = torch.randn(16, 1, 28, 28)
    torch.testing.assert_close(nets[0].eval()(x), nets[1].eval()(x), rtol=1e-4, atol=1e-5)
    fresh = LeNet("torch")
    fresh.load_state_dict(nets[0].state_dict())
    torch.testing.assert_close(fresh.eval()(x), nets[0](x))
