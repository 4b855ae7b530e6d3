"""Where our eager BN layer's time goes, against torch's, at LeNet's shapes.

    python benchmarks/bn_cost.py [--batch-sizes 16 256] [--repeats 15] [--number 50]

For each LeNet BN input, one training step of the layer alone (forward and backward, float32, CPU)
is split into what each level of our implementation adds: the arithmetic of the forward
(``functional._forward`` run bare), the autograd.Function around it, the module (input checks,
``num_batches_tracked``, buffers), and the backward. torch's layer is timed the same way in the
same process, candidates interleaved; "aten ops" counts the operators torch.profiler sees in one
step of each. What remains above torch's time is the floor of an implementation made of tensor
ops: each op costs a few microseconds of dispatch whatever its size, and torch's layer is one
fused op each way. Writes benchmarks/results/bn_cost.json and bn_cost.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bn_lightning.nn import batchnorm as norm
from bn_lightning.nn import functional
from common import median_times, report


def shapes(batch: int) -> list[tuple[int, ...]]:
    """The inputs of LeNet's four BN layers (bn_lightning.nn.lenet.LeNet) at this batch size."""
    return [(batch, 6, 24, 24), (batch, 16, 8, 8), (batch, 120), (batch, 84)]


def aten_ops(step) -> int:
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def measure(shape: tuple[int, ...], repeats: int, number: int) -> dict:
    spatial = len(shape) == 4
    ours = (norm.BatchNorm2d if spatial else norm.BatchNorm1d)(shape[1])
    theirs = (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(shape[1])
    x, grad_out = torch.randn(shape, requires_grad=True), torch.randn(shape)
    bare = (x.detach(), ours.weight.detach(), ours.bias.detach(), ours.running_mean, ours.running_var,
            True, 0.1, ours.eps, None)
    function = (x, ours.weight, ours.bias, ours.running_mean, ours.running_var, True, 0.1, ours.eps, None)
    candidates = {
        "arithmetic": lambda: functional._forward(*bare),
        "function": lambda: functional._BatchNormFunction.apply(*function),
        "module": lambda: ours(x),
        "ours": lambda: ours(x).backward(grad_out),
        "torch": lambda: theirs(x).backward(grad_out),
    }
    t = median_times(candidates, repeats, number)
    return {
        "shape": list(shape), "torch_us": 1e6 * t["torch"], "ours_us": 1e6 * t["ours"],
        "arithmetic_us": 1e6 * t["arithmetic"], "function_us": 1e6 * (t["function"] - t["arithmetic"]),
        "module_us": 1e6 * (t["module"] - t["function"]), "backward_us": 1e6 * (t["ours"] - t["module"]),
        "ours_aten_ops": aten_ops(candidates["ours"]), "torch_aten_ops": aten_ops(candidates["torch"]),
    }


def per_extra_op(row: dict) -> float:
    """Microseconds of our extra time per extra aten op: near a constant when dispatch, not arithmetic, is the gap."""
    return (row["ours_us"] - row["torch_us"]) / (row["ours_aten_ops"] - row["torch_aten_ops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=50, help="calls per timed repeat")
    args = parser.parse_args()
    rows, table = [], []
    for batch in args.batch_sizes:
        for shape in shapes(batch):
            row = measure(shape, args.repeats, max(1, args.number * 16 // batch))
            rows.append(row)
            table.append([tuple(row["shape"]), f"{row['torch_us']:.0f}", f"{row['ours_us']:.0f}",
                          f"{row['ours_us'] / row['torch_us']:.2f}x", f"{row['arithmetic_us']:.0f}",
                          f"{row['function_us']:.0f}", f"{row['module_us']:.0f}", f"{row['backward_us']:.0f}",
                          f"{row['ours_aten_ops']} / {row['torch_aten_ops']}", f"{per_extra_op(row):.1f}"])
    report("bn_cost", f"One training step of a BN layer alone, microseconds, medians of {args.repeats} interleaved "
           f"repeats, {torch.get_num_threads()} threads",
           ["input", "torch", "ours", "ours / torch", "ours: forward arithmetic", "+ autograd.Function",
            "+ module", "backward", "aten ops (ours / torch)", "(ours - torch) per extra op"], table, rows)


if __name__ == "__main__":
    main()
