"""The benchmarks' CPU memory accounting against allocations whose sizes are known, and their shapes against the model's."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bn_cost import shapes  # noqa: E402
from common import PeakAllocatedBytes  # noqa: E402

from bn_lightning.nn.lenet import LeNet  # noqa: E402
from bn_lightning.nn.batchnorm import BATCH_NORMS  # noqa: E402

MIB = 2**20


def test_peak_counts_live_tensors_and_not_what_was_freed_before_the_peak():
    with PeakAllocatedBytes() as counter:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(MIB // 2, dtype=torch.uint8)
        del a
        c = torch.empty(MIB // 4, dtype=torch.uint8)
    assert 1.5 * MIB <= counter.peak < 1.5 * MIB + 4096
    del b, c


def test_views_and_in_place_ops_allocate_nothing():
    t = torch.zeros(MIB // 4)
    with PeakAllocatedBytes() as counter:
        t.view(-1, 4).mul_(2).transpose(0, 1).add_(1)
    assert counter.peak < 4096


def test_a_temporary_freed_inside_one_op_counts():
    """torch's BN backward allocates a full-size temporary and frees it before returning:
    a step peaks at three tensors of x's size (output, input gradient, that temporary)."""
    layer = torch.nn.BatchNorm2d(4)
    x, grad_out = torch.randn(64, 4, 32, 32, requires_grad=True), torch.randn(64, 4, 32, 32)
    with PeakAllocatedBytes() as counter:
        layer(x).backward(grad_out)
    size = x.numel() * x.element_size()
    assert 3 * size <= counter.peak < 3 * size + 64 * 1024


def test_bn_cost_times_the_inputs_lenets_bn_layers_get():
    seen = []
    net = LeNet("scratch")
    for layer in net.modules():
        if isinstance(layer, BATCH_NORMS):
            layer.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    net(torch.randn(3, 1, 28, 28))
    assert seen == shapes(3)
