"""Resident memory over many LeNet training steps: our BN stays flat, the blog's layer grows.

    python benchmarks/memory.py [--steps 1000] [--blog-steps 100] [--batch-size 256]

Our layer trains for --steps steps and the process's RSS is sampled as it goes; it must be flat
after warm-up. The blog's layer (``bn_lightning.blog.BlogBatchNorm``: running statistics computed from tensors that keep their
autograd history, so every step's graph stays reachable from the buffers) runs a shorter while,
enough to show it grows by megabytes a step. Writes benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from bn_lightning.blog import BlogBatchNorm, rss_bytes
from bn_lightning.nn.lenet import LeNet
from common import report


def with_blog_bn(net: LeNet) -> LeNet:
    """LeNet with the blog's layer, weighting the new batch by 0.1 as ours does, its statistics not detached."""
    for name in ("conv1", "conv2", "fc1", "fc2"):
        block = getattr(net, name)
        block.norm = BlogBatchNorm(block.norm.num_features, 4 if name.startswith("conv") else 2, alpha=0.1)
    return net


def train(net: nn.Module, steps: int, batch_size: int, every: int) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    x, y = torch.rand(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    samples = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        if step % every == 0:
            samples.append((step, rss_bytes() / 2**20))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--blog-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    runs = {
        "ours": train(LeNet("scratch"), args.steps, args.batch_size, every=max(1, args.steps // 20)),
        "blog": train(with_blog_bn(LeNet("scratch")), args.blog_steps, args.batch_size,
                      every=max(1, args.blog_steps // 10)),
    }
    rows, table = [], []
    for layer, samples in runs.items():
        # Past the first tenth of the run: the allocator has reached its working set.
        kept = [(step, mib) for step, mib in samples if step > samples[-1][0] // 10]
        steps, mibs = zip(*kept)
        slope = statistics.linear_regression(steps, mibs).slope * 1024
        rows.append({"layer": layer, "rss_mib": samples, "slope_kib_per_step": slope})
        table.append([layer, samples[-1][0], f"{mibs[0]:.1f}", f"{mibs[-1]:.1f}", f"{min(mibs):.1f} - {max(mibs):.1f}",
                      f"{slope:+.1f}"])
    report("memory", f"LeNet with BN, batch {args.batch_size}, SGD; resident set size of this process",
           ["layer", "steps", "RSS after warm-up (MiB)", "RSS at the end (MiB)", "range (MiB)", "trend (KiB/step)"],
           table, rows)


if __name__ == "__main__":
    main()
