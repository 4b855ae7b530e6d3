"""Which weights train: all of them, only the BN layers' gamma and beta, or a random control of the same size.

Frankle, Schwab & Morcos 2020 ("Training BatchNorm and only BatchNorm") freeze every other weight at
its random initialization and find that gamma and beta alone train a network far above chance. Their
control trains, instead, the same number of ordinary weights chosen at random: two per output channel
of each layer that feeds a BN, as many as that BN's gamma and beta. They are chosen among the layer's
weights, not its bias: a BN right after a layer subtracts the mean, so that bias gets no gradient. ``train_head`` also trains the output
layer, which both of their variants try; ``all`` without it is every weight but the output layer's
(Hoffer et al. 2018, "Fix your classifier").

The net's blocks must name their layers as :class:`~bn_lightning.nn.lenet.LeNet` does: ``affine`` then
``norm``; the head is its last ``nn.Linear``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from bn_lightning.nn.registry import is_batch_norm

Trainable = Literal["all", "norm", "random"]
TRAINABLE = ("all", "norm", "random")


def _head(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"train_head needs an output layer (an nn.Linear); {type(net).__name__} has none")
    return linears[-1]


def _normed_blocks(net: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(affine layer, its BN) of every block that has both."""
    return [(block.affine, block.norm) for block in net.modules()
            if isinstance(getattr(block, "affine", None), nn.Module) and is_batch_norm(getattr(block, "norm", None))]


def scale_invariant_weights(net: nn.Module) -> list[nn.Parameter]:
    """The weights of the layers whose output goes straight into a BN layer (``affine`` then ``norm``, BN before
    the activation). BN undoes their scale, so the loss does not change when one of them is scaled, and the
    step lr takes on it shrinks as 1 / ||W||^2 (van Laarhoven 2017; Arora, Li & Lyu 2019's auto-tuning)."""
    weights = []
    for block in net.modules():
        names = list(getattr(block, "_modules", {}))
        if "affine" in names and names[names.index("affine") + 1:][:1] == ["norm"] and is_batch_norm(block.norm):
            weights.append(block.affine.weight)
    return weights


def parameter_groups(net: nn.Module, params: list[nn.Parameter], rest_options: dict | None) -> list:
    """What the optimizer gets: ``params`` as one group, or, with ``rest_options``, the scale-invariant
    weights among them with the optimizer's own settings and every other one (gamma, beta, the biases, the
    output layer) with ``rest_options`` (e.g. ``{lr: 0.1}``) on top."""
    if rest_options is None:
        return params
    invariant = {id(w) for w in scale_invariant_weights(net)}
    if not invariant:
        raise ValueError("rest_options sets the optimizer for every weight that does not feed a BN layer, and no weight of "
                         "this network feeds one: give it BN before the activation (norm: scratch or torch, "
                         "norm_position: before), or leave rest_options out")
    return [{"params": [p for p in params if id(p) in invariant]},
            {"params": [p for p in params if id(p) not in invariant], **rest_options}]


def _random_mask(weight: torch.Tensor, per_channel: int, generator: torch.Generator) -> torch.Tensor:
    """A 0/1 mask of ``weight`` with ``per_channel`` ones in each output channel's row, placed at random."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    chosen = torch.rand(rows.shape, generator=generator).argsort(dim=1)[:, :per_channel]
    return torch.zeros(rows.shape).scatter_(1, chosen, 1.0).reshape(weight.shape)


def restrict_training(net: nn.Module, trainable: Trainable, train_head: bool, seed: int) -> int:
    """Freeze what does not train (``requires_grad=False``; for ``random``, a gradient mask on the chosen
    layers' weights) and return how many weights train. ``seed`` picks the random control's weights."""
    if trainable not in TRAINABLE:
        raise ValueError(f"unknown trainable {trainable!r}; choose one of: {', '.join(TRAINABLE)}")
    if trainable == "all":
        if not train_head:
            for p in _head(net).parameters():
                p.requires_grad_(False)
        return sum(p.numel() for p in net.parameters() if p.requires_grad)
    blocks = _normed_blocks(net)
    if not blocks:
        raise ValueError(f"trainable: {trainable} needs batch-norm layers (its count of weights is theirs), and this "
                         f"network has none: give it a norm (model.net.init_args.norm: scratch or torch)")
    for p in net.parameters():
        p.requires_grad_(False)
    count = 0
    generator = torch.Generator().manual_seed(seed)
    for affine, bn in blocks:
        if trainable == "norm":
            for p in bn.parameters():
                p.requires_grad_(True)
                count += p.numel()
            continue
        weight = affine.weight
        mask = _random_mask(weight, sum(p.numel() for p in bn.parameters()) // bn.num_features, generator)
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask.to(weight.dtype): grad * mask.to(grad.device))
        count += int(mask.sum())
    if train_head:
        for p in _head(net).parameters():
            p.requires_grad_(True)
            count += p.numel()
    return count
