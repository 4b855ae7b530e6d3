"""LeNet: one class for every norm, the norm between affine layer and activation."""

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_lightning.nn import batchnorm as scratch
from bn_lightning.nn.lenet import LeNet

BLOCKS = ("conv1", "conv2", "fc1", "fc2")


NORMS = ["none", "scratch", "torch", "noisy_bn", "batch_renorm", "group_norm", "layer_norm"]


@pytest.mark.parametrize("norm, activation, pool", list(itertools.product(NORMS, ["sigmoid", "relu"], ["avg", "max"])))
def test_every_combination_classifies_28x28_images(norm, activation, pool):
    net = LeNet(norm, activation=activation, pool=pool)
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


# Group and layer norm: torch's layers, each sample normalized on its own

def group_norm_by_hand(x, groups, weight, bias, eps=1e-5):
    """Wu & He 2018, eq. 1-3: each sample's channels in ``groups`` groups, standardized over the group's
    channels and positions, then a per-channel gamma and beta."""
    grouped = x.reshape(x.shape[0], groups, -1)
    mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, correction=0, keepdim=True)
    x_hat = ((grouped - mean) / (var + eps).sqrt()).reshape(x.shape)
    return x_hat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def layer_norm_by_hand(x, weight, bias, eps=1e-5):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, correction=0, keepdim=True)
    return (x - mean) / (var + eps).sqrt() * weight + bias


@pytest.mark.parametrize("norm, groups", [("group_norm", 2), ("group_norm", 1), ("layer_norm", 1)])
def test_group_and_layer_norm_place_torchs_group_norm_on_feature_maps_and_layer_norm_on_vectors(norm, groups):
    net = LeNet(norm, {"groups": groups}) if norm == "group_norm" else LeNet(norm)
    for name, width in (("conv1", 6), ("conv2", 16)):
        layer = getattr(net, name).norm
        assert type(layer) is nn.GroupNorm and (layer.num_groups, layer.num_channels, layer.affine) == (groups, width, True)
    for name, width in (("fc1", 120), ("fc2", 84)):
        layer = getattr(net, name).norm
        assert type(layer) is nn.LayerNorm and layer.normalized_shape == (width,) and layer.elementwise_affine
    # The keys of every other norm, less the running statistics they do not have.
    assert list(net.state_dict()) == [key for key in LeNet("scratch").state_dict()
                                      if key.rsplit(".", 1)[1] not in ("running_mean", "running_var", "num_batches_tracked")]


@pytest.mark.parametrize("norm, groups", [("group_norm", 2), ("group_norm", 1), ("layer_norm", 1)])
def test_group_and_layer_norm_networks_compute_the_papers_normalizations(norm, groups):
    torch.manual_seed(0)
    net = LeNet(norm, {"groups": groups}) if norm == "group_norm" else LeNet(norm)
    with torch.no_grad():
        for block in BLOCKS:
            getattr(net, block).norm.weight.uniform_(0.5, 1.5), getattr(net, block).norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 1, 28, 28)
    h = x
    for name in ("conv1", "conv2"):
        b = getattr(net, name)
        h = F.avg_pool2d(torch.sigmoid(group_norm_by_hand(b.affine(h), groups, b.norm.weight, b.norm.bias)), 2)
    h = h.flatten(1)
    for name in ("fc1", "fc2"):
        b = getattr(net, name)
        h = torch.sigmoid(layer_norm_by_hand(b.affine(h), b.norm.weight, b.norm.bias))
    torch.testing.assert_close(net(x), net.head(h))


@pytest.mark.parametrize("norm", ["group_norm", "layer_norm", "scratch"])
def test_group_and_layer_norm_give_a_sample_the_same_output_in_any_batch_and_bn_does_not(norm):
    torch.manual_seed(0)
    net = LeNet(norm).train()
    x, others = torch.randn(4, 1, 28, 28), torch.randn(6, 1, 28, 28) * 3 + 1
    in_one_batch, in_another = net(x)[:1], net(torch.cat([x[:1], others]))[:1]
    if norm == "scratch":
        assert not torch.allclose(in_one_batch, in_another, atol=1e-3)
    else:
        torch.testing.assert_close(in_one_batch, in_another)


@pytest.mark.parametrize("kwargs, message", [
    ({"norm": "group_norm", "norm_kwargs": {"groups": 3}}, r"groups must divide the channels of every feature map "
                                                          r"it normalizes: 3 does not divide 16"),
    ({"norm": "group_norm", "norm_kwargs": {"groups": 4}}, r"4 does not divide 6"),
    ({"norm": "group_norm", "norm_kwargs": {"groups": 0}}, r"0 does not divide 6"),
    ({"norm": "layer_norm", "norm_kwargs": {"groups": 1}}, r"norm_kwargs groups: norm 'layer_norm' takes eps"),
])
def test_a_bad_group_count_says_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeNet(**kwargs)


@pytest.mark.parametrize("norm", ["scratch", "torch", "noisy_bn", "batch_renorm"])
@pytest.mark.parametrize("momentum", [0.01, None])
def test_momentum_sets_every_batch_norms_running_average(norm, momentum):
    torch.manual_seed(0)
    net = LeNet(norm, {"momentum": momentum})
    layers = [getattr(net, block).norm for block in ("conv1", "conv2", "fc1", "fc2")]
    assert [layer.momentum for layer in layers] == [momentum] * 4
    # One training batch moves fc1's running mean from 0 by momentum times the batch mean (all of it for None).
    captured = []
    net.fc1.norm.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach().mean(0)))
    net(torch.randn(16, 1, 28, 28))
    expected = captured[0] * (1.0 if momentum is None else momentum)
    torch.testing.assert_close(net.fc1.norm.running_mean, expected, rtol=1e-4, atol=1e-6)


def test_momentum_without_a_batch_norm_says_what_is_wrong():
    with pytest.raises(ValueError, match=r"norm_kwargs momentum: norm 'group_norm' takes groups, eps"):
        LeNet("group_norm", {"momentum": None})
