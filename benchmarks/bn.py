"""Our BN against torch's and against the blog's chain of small ops (bn_lightning.blog.BlogBatchNorm): time and peak memory.

    python benchmarks/bn.py [--repeats 15] [--device cpu|cuda]

Forward+backward in train mode and forward in eval mode, float32, at LeNet's BN shapes and a
larger map. Prints medians and ratios to torch's layer measured in this same process, and
writes benchmarks/results/bn.json and bn.md. "compiled" is our layer under ``torch.compile``
(what ``model.compile: true`` does to the whole network); its compile time is not counted.
Peak memory is what the allocator holds at its highest during one training step, above what
it held before (``torch.cuda.max_memory_allocated`` on a GPU, torch.profiler's memory events
on the CPU), so temporaries freed inside an op count and views do not.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bn_lightning.blog import BlogBatchNorm
from bn_lightning.nn.batchnorm import BatchNorm1d, BatchNorm2d
from common import PeakAllocatedBytes, median_times, report

SHAPES = [(256, 6, 24, 24), (256, 16, 8, 8), (256, 120), (256, 64, 32, 32)]


def layers(shape, device):
    spatial = len(shape) == 4
    channels = shape[1]
    return {
        "torch": (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(channels).to(device),
        "ours": (BatchNorm2d if spatial else BatchNorm1d)(channels).to(device),
        "compiled": torch.compile((BatchNorm2d if spatial else BatchNorm1d)(channels).to(device)),
        # The blog's layer as the speed baseline, detached: here its speed is measured, not its leak (benchmarks/memory.py).
        "blog": BlogBatchNorm(channels, 4 if spatial else 2, alpha=0.1, detach=True).to(device),
    }


def train_step(layer, x, grad_out):
    x.grad = None
    layer(x).backward(grad_out)


def peak_bytes(layer, x, grad_out) -> int:
    """Peak memory of one training step above what was held before it (x's old gradient freed first)."""
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(layer, x, grad_out)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakAllocatedBytes() as counter:
        train_step(layer, x, grad_out)
    return counter.peak


def synced(fn, device):
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    rows, table = [], []
    for shape in SHAPES:
        x = torch.randn(shape, device=device).requires_grad_()
        grad_out = torch.randn(shape, device=device)
        candidates = layers(shape, device)
        number = max(1, int(2e7 // x.numel()))  # about the same work per repeat at every shape
        train = median_times(
            {n: synced(lambda l=l: train_step(l, x, grad_out), device) for n, l in candidates.items()},
            args.repeats, number,
        )
        for layer in candidates.values():
            layer.eval()
        with torch.no_grad():
            evals = median_times(
                {n: synced(lambda l=l: l(x), device) for n, l in candidates.items()}, args.repeats, number
            )
        for layer in candidates.values():
            layer.train()
        memory = {n: peak_bytes(l, x, grad_out) for n, l in candidates.items() if n != "compiled"}
        row = {"shape": list(shape), "train_s": train, "eval_s": evals, "peak_bytes": memory}
        rows.append(row)
        ratio = lambda d, n: d[n] / d["torch"]
        table.append([
            "x".join(map(str, shape)),
            f"{train['torch'] * 1e3:.3f}", f"{ratio(train, 'ours'):.2f}x", f"{ratio(train, 'compiled'):.2f}x",
            f"{ratio(train, 'blog'):.2f}x",
            f"{evals['torch'] * 1e3:.3f}", f"{ratio(evals, 'ours'):.2f}x", f"{ratio(evals, 'compiled'):.2f}x",
            f"{ratio(evals, 'blog'):.2f}x",
            f"{memory['torch'] / 2**20:.1f}", f"{ratio(memory, 'ours'):.2f}x", f"{ratio(memory, 'blog'):.2f}x",
        ])
    header = ["shape", "train ms (torch)", "ours/torch", "compiled/torch", "blog/torch", "eval ms (torch)",
              "ours/torch", "compiled/torch", "blog/torch", "peak MiB (torch)", "ours/torch", "blog/torch"]
    report("bn", f"BatchNorm forward+backward (train) and forward (eval), float32, {device}, "
           f"{torch.get_num_threads()} threads, median of {args.repeats}", header, table, rows)


if __name__ == "__main__":
    main()
