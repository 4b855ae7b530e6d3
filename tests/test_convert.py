"""convert_batchnorm puts our BN into a model we did not write, torchvision's ResNet-18 (no weights downloaded):
the same outputs in eval, the same training step, the same running statistics, checkpoints both ways."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from bn_lightning.nn import BatchNorm1d, BatchNorm2d, convert_batchnorm
from bn_lightning.nn.batchnorm import _BatchNorm


def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.num_batches_tracked.fill_(7)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model


def test_every_bn_of_a_resnet18_becomes_ours_with_its_tensors():
    theirs = resnet18()
    ours = convert_batchnorm(copy.deepcopy(theirs))
    kinds = {type(m) for m in ours.modules()}
    assert BatchNorm2d in kinds and nn.BatchNorm2d not in kinds
    assert sum(isinstance(m, _BatchNorm) for m in ours.modules()) == 20
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1)  # built before: still trains the converted layers
    convert_batchnorm(theirs)
    assert {id(p) for p in theirs.parameters()} == {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_same_outputs_in_eval_and_the_same_training_step():
    """One step, forward and backward, then SGD: float32 rounding apart, the same network. (Over several steps of a
    deep network at batch 8 the rounding grows, as it does between two runs of torch's own layers on two machines.)"""
    theirs = resnet18()
    ours = convert_batchnorm(copy.deepcopy(theirs))
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    losses = []
    for model in (theirs, ours):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4 * a.grad.abs().max().item(), msg=name)
    for model in (theirs, ours):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_options_and_mode_carry_over_and_a_bn_layer_itself_converts():
    layer = nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=False).eval()
    converted = convert_batchnorm(layer)
    assert type(converted) is BatchNorm1d and not converted.training
    assert (converted.eps, converted.momentum, converted.affine, converted.weight) == (1e-3, None, False, None)
    untracked = convert_batchnorm(nn.BatchNorm2d(3, track_running_stats=False, bias=False))
    assert untracked.running_mean is None and untracked.bias is None and untracked.weight is not None
    with pytest.raises(ValueError, match="not SyncBatchNorm"):
        convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)))
