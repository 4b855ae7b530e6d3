"""Gradients and representations over depth at initialization, and after a few training steps (no fit).

    python -m bn_lightning.depth.at_init --out results/depth_init [--quick]

For each network (:class:`~bn_lightning.nn.DeepMLP`: depth, norm, activation, plain or residual), seed and input
(Gaussian images with random labels, or Fashion-MNIST training images with their labels), one forward and
backward in training mode (batch statistics, as Yang et al. 2019 analyse) gives the squared norm of the loss
gradient of every affine weight; forward hooks give each block's output, over the batch's first 256 images:
centered and uncentered effective rank, between-image std over mean, root mean square
(:func:`~bn_lightning.nn.measures.representation_profile`).

The per-layer rate is the geometric mean, over the middle half of the blocks, of the ratio of consecutive
blocks' squared gradient norms, toward the input: Yang et al. predict pi / (pi - 1) = 1.467 for ReLU with BN
in the wide, large-batch limit (docs/predictions.md). Three studies, each over 3 seeds:

* ``depth``: depth 2 to 64 x {no norm, BN, LayerNorm} x {relu, tanh, sigmoid} x {plain, residual} x both
  inputs, width and batch 512; no norm with He / Xavier initialization and again with torch's default;
* ``size``: plain BN ReLU at depth 32, batch 16 to 1024 at width 512, width 128 to 1024 at batch 512;
* ``steps``: depth 32 ReLU, plain and residual, no norm and BN, measured again after 1, 10 and 100 SGD steps
  (batches of 512 training images, lr ``--lr``).

Writes ``points.csv`` (one row per network, seed, input, steps and block) and ``rates.csv`` (one row per
network, seed, input and steps) to ``--out``, then the tables and figure of :mod:`~bn_lightning.depth.report`;
notebook 05 reads them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bn_lightning.depth import report
from bn_lightning.nn.deep import DeepMLP
from bn_lightning.nn.measures import gradient_profile, representation_profile
from bn_lightning.training.data import load_fashion_mnist

__all__ = ["Point", "growth_rate", "measure", "points"]

NORMS = {"none": "none", "bn": "torch", "ln": "layer_norm"}
REPRESENTED = 256  # images whose representations are measured (an SVD per block)


@dataclass(frozen=True)
class Point:
    """One network and input of a study."""

    study: str
    depth: int
    norm: str  # none, bn, ln
    activation: str
    residual: bool
    inputs: str  # gaussian or images
    width: int = 512
    batch: int = 512
    seed: int = 0
    steps: int = 0
    init: str = "scaled"  # or "torch": its default initialization, for the no-norm networks beside He / Xavier

    def network(self) -> DeepMLP:
        torch.manual_seed(self.seed)
        return DeepMLP(self.depth, self.width, NORMS[self.norm], activation=self.activation, residual=self.residual,
                       init=self.init)


def growth_rate(squared_norms: list[float]) -> float:
    """Geometric mean over the middle half of the blocks of ``norm[l] / norm[l + 1]`` (toward the input); nan
    when a norm is zero or not finite (a gradient that vanished or overflowed has no rate)."""
    if len(squared_norms) < 2 or not all(0 < n < math.inf for n in squared_norms):
        return math.nan
    ratios = [a / b for a, b in zip(squared_norms, squared_norms[1:])]
    quarter = len(ratios) // 4
    middle = ratios[quarter: len(ratios) - quarter] or ratios
    return math.exp(sum(math.log(r) for r in middle) / len(middle))


def batch_of(point: Point, images: tuple[Tensor, Tensor] | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if point.inputs == "gaussian":
        return (torch.randn(point.batch, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (point.batch,), generator=generator))
    x, y = images
    index = torch.randperm(len(y), generator=generator)[: point.batch]
    return x[index], y[index]


def measure(net: DeepMLP, x: Tensor, y: Tensor) -> tuple[list[dict], float]:
    """Per block (the stem as block 0): squared weight-gradient norm and representation measures; and the rate."""
    blocks = ["stem", *(f"block{i}" for i in range(1, net.depth + 1))]
    weights = [f"{block}.affine.weight" for block in blocks]
    outputs: dict[str, Tensor] = {}
    handles = [net.get_submodule(block).register_forward_hook(
        lambda module, args, out, block=block: outputs.__setitem__(block, out[:REPRESENTED].detach()))
        for block in blocks]
    try:
        net.train()
        squared = gradient_profile(net, x, y, weights)
    finally:
        for handle in handles:
            handle.remove()
    rows = [{"block": i, "grad_sq": squared[w], **representation_profile(outputs[b])}
            for i, (b, w) in enumerate(zip(blocks, weights))]
    return rows, growth_rate([squared[w] for w in weights[1:]])  # the blocks of width x width


def points(quick: bool = False) -> list[Point]:
    seeds = [0] if quick else [0, 1, 2]
    depths = [2, 8] if quick else [2, 4, 8, 16, 32, 64]
    size = dict(width=32, batch=64) if quick else {}
    found = [Point("depth", d, n, a, r, i, seed=s, **size) for d, n, a, r, i, s in itertools.product(
        depths, NORMS, ["relu", "tanh", "sigmoid"], [False, True], ["gaussian", "images"], seeds)]
    found += [replace(p, init="torch") for p in found if p.norm == "none"]
    base = Point("size", 8 if quick else 32, "bn", "relu", False, "gaussian", **size)
    for s in seeds:
        found += [replace(base, batch=b, seed=s) for b in ([16, 64] if quick else [16, 64, 256, 1024])]
        found += [replace(base, width=w, seed=s) for w in ([16, 32] if quick else [128, 256, 1024])]
    for n, r, s in itertools.product(["none", "bn"], [False, True], seeds):
        found += [Point("steps", 8 if quick else 32, n, "relu", r, "images", seed=s, steps=k, **size)
                  for k in (0, 1, 10, 100)]
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for points.csv and rates.csv")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the steps study")
    parser.add_argument("--quick", action="store_true", help="a few small points (CI): 1 seed, depth 2 and 8")
    parser.add_argument("--data-dir", default=None, help="torchvision root holding FashionMNIST/raw")
    args = parser.parse_args(argv)
    images = load_fashion_mnist(train=True, root=args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    point_rows, rate_rows, start = [], [], time.perf_counter()
    todo = points(args.quick)
    for index, point in enumerate(todo):
        generator = torch.Generator().manual_seed(1000 + point.seed)
        net = point.network()
        if point.steps:
            optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
            net.train()
            for _ in range(point.steps):
                x, y = batch_of(point, images, generator)
                optimizer.zero_grad()
                F.cross_entropy(net(x), y).backward()
                optimizer.step()
        x, y = batch_of(point, images, torch.Generator().manual_seed(point.seed))  # the same batch at every step
        rows, rate = measure(net, x, y)
        point_rows += [{**asdict(point), **row} for row in rows]
        rate_rows.append({**asdict(point), "rate": rate})
        if index % 50 == 0:
            print(f"{index + 1}/{len(todo)} points, {time.perf_counter() - start:.0f} s", flush=True)
    for name, rows in (("points.csv", point_rows), ("rates.csv", rate_rows)):
        with open(args.out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()}
                             for row in rows)  # 6 significant digits: the measures' own precision is lower
    report.write(args.out)
    print(f"{len(todo)} points in {time.perf_counter() - start:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
