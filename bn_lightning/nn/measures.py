"""Measures of a network's representations and gradients, framework-free: what the probes log during training
(``bn_lightning.callbacks.probes``) and what the depth experiments take at initialization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["angle", "effective_rank", "gradient_profile", "mean_pairwise_cosine", "representation_profile",
           "same_label_cosine", "std_over_mean"]


def angle(a: Tensor, b: Tensor) -> float:
    """The angle between two tensors taken as vectors, in radians: ``2 atan2(|u - v|, |u + v|)`` of their unit
    vectors, exact for the tiny angles of one optimizer step, where ``acos`` of a cosine near 1 is not."""
    u, v = F.normalize(a.detach().double().flatten(), dim=0), F.normalize(b.detach().double().flatten(), dim=0)
    return float(2 * torch.atan2((u - v).norm(), (u + v).norm()))


def mean_pairwise_cosine(rows: Tensor) -> float:
    """Mean cosine similarity of every pair of distinct rows (1: all point the same way)."""
    unit = F.normalize(rows.double(), dim=1)
    n = unit.shape[0]
    total = unit.sum(0).square().sum() - unit.square().sum()  # sum over i != j of <u_i, u_j>
    return float(total / (n * (n - 1)))


def same_label_cosine(rows: Tensor, labels: Tensor) -> float:
    """Mean cosine similarity of the pairs of distinct rows whose labels agree (nan without such a pair)."""
    unit = F.normalize(rows.double(), dim=1)
    pairs = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return float((unit @ unit.T)[pairs].mean()) if pairs.any() else math.nan


def effective_rank(rows: Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalized singular values (1 for a
    rank-one matrix, min(n, d) when every direction is used alike)."""
    singular = torch.linalg.svdvals(rows.double())
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def std_over_mean(rows: Tensor) -> float:
    """How much the rows (images) differ relative to what they share: the root mean square over features of
    the between-row std, over that of the mean row. Small when every image gives nearly the same output on top
    of a common offset (an input-independent component, Bjorck et al. 2018), whatever the rank of the rest."""
    rows = rows.double()
    return float(rows.std(0).square().mean().sqrt() / rows.mean(0).square().mean().sqrt())


def representation_profile(rows: Tensor) -> dict[str, float]:
    """Every measure of one layer's outputs for a batch (rows: images, flattened): the uncentered cosine and
    effective rank, the centered effective rank (Daneshmand et al. 2020's rank collapse is a small value of
    it), the between-image std over the mean, and the root mean square of the values (the activation scale);
    nan for each where a value is not finite."""
    rows = rows.detach().reshape(rows.shape[0], -1)
    if not rows.isfinite().all():  # a network that diverged: nothing to measure
        return dict.fromkeys(("cosine", "erank", "centered_erank", "std_over_mean", "rms"), math.nan)
    return {"cosine": mean_pairwise_cosine(rows), "erank": effective_rank(rows),
            "centered_erank": effective_rank(rows - rows.mean(0)), "std_over_mean": std_over_mean(rows),
            "rms": float(rows.double().square().mean().sqrt())}


def gradient_profile(net: nn.Module, x: Tensor, y: Tensor, weights: Sequence[str]) -> dict[str, float]:
    """The squared norm of the cross-entropy loss's gradient for each named weight, from one forward and
    backward of ``net`` on ``(x, y)`` in its present mode (training mode: batch statistics, as Yang et al.
    2019 analyse). Gradients already on the parameters are left as they were."""
    params = dict(net.named_parameters())
    wanted = [params[name] for name in weights]
    with torch.enable_grad():
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), wanted)
    return {name: float(g.double().square().sum()) for name, g in zip(weights, grads)}
