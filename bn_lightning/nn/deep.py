"""Networks of configurable depth, plain or residual, with a pluggable norm: where BN's effect lives in depth.

Yang et al. (2019) predict that BN makes the gradients of a deep *plain* network explode at initialization;
De & Smith (2020) that in a *residual* network BN's benefit is mostly that it down-scales the residual branch,
which a zero-initialized scalar per branch (SkipInit, no norm) does as well. These networks let both be
tested on the same data and LightningModule as LeNet:

* :class:`DeepMLP`: flatten, a stem ``Linear(in, width)``, ``depth`` blocks of width ``width``, a linear head.
* :class:`DeepConvNet`: a stem of two stride-2 3x3 convolutions (28x28 to 7x7), ``depth`` 3x3 blocks at 7x7,
  global average pooling, a linear head.

A plain block is ``act(norm(affine(x)))``, the order of Ioffe & Szegedy (and of LeNet here). A residual block
is ``x + scale * affine(act(norm(x)))``: the norm inside the branch and nothing on the skip path, as in
De & Smith's pre-activation setting; ``scale`` is SkipInit's scalar (initialized at 0, learnable) with
``skip_init=True``, which takes no norm. ``init="scaled"`` draws every weight from He's normal (ReLU) or
Xavier's normal (tanh, sigmoid) with zero biases; ``init="torch"`` keeps torch's default initialization.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn

from bn_lightning.nn.lenet import NormKwargs, _choose
from bn_lightning.nn.registry import NORMS, check_norm_kwargs, create_norm, is_batch_norm

__all__ = ["DeepConvNet", "DeepMLP", "ResidualBlock"]

DEEP_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
Activation = Literal["relu", "tanh", "sigmoid"]
Init = Literal["torch", "scaled"]


class ResidualBlock(nn.Module):
    """``x + scale * affine(act(norm(x)))``; ``scale`` is a learnable scalar initialized at 0 (SkipInit) when
    ``skip_init``, else the constant 1 (no parameter)."""

    def __init__(self, norm: nn.Module, act: nn.Module, affine: nn.Module, skip_init: bool = False) -> None:
        super().__init__()
        self.norm, self.act, self.affine = norm, act, affine
        if skip_init:
            self.scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("scale", None)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.affine(self.act(self.norm(x)))
        return x + (branch if self.scale is None else self.scale * branch)


def _plain(affine, norm: nn.Module, act) -> nn.Sequential:
    """``act(norm(affine(x)))``; the affine layer has no bias where a batch norm's mean subtraction would cancel it."""
    return nn.Sequential(OrderedDict(affine=affine(not is_batch_norm(norm)), norm=norm, act=act()))


class _Deep(nn.Sequential):
    """What both networks share: the checks, the blocks and the initialization."""

    input_shape = (1, 28, 28)

    def _check(self, depth: int, width: int, norm: str, norm_kwargs: NormKwargs, activation: str, residual: bool,
               skip_init: bool, init: str) -> tuple[dict, type[nn.Module]]:
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"depth must be a positive number of blocks, got {depth!r}")
        if not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width must be a positive number of units or channels, got {width!r}")
        _choose("norm", norm, NORMS)
        act = _choose("activation", activation, DEEP_ACTIVATIONS)
        _choose("init", init, {"torch": None, "scaled": None})
        if skip_init and not residual:
            raise ValueError("skip_init scales residual branches: set residual to true as well")
        if skip_init and norm != "none":
            raise ValueError(f"skip_init replaces the norm (De & Smith 2020's SkipInit has none): set norm to none, "
                             f"not {norm!r}")
        return check_norm_kwargs(norm, norm_kwargs), act

    def _blocks(self, affine, ndim: int, depth: int, width: int, norm: str, norm_kwargs: dict, act,
                residual: bool, skip_init: bool, first_index: int) -> OrderedDict:
        blocks = OrderedDict()
        for i in range(depth):
            made = create_norm(norm, width, ndim, first_index + i, **norm_kwargs)
            if residual:
                blocks[f"block{i + 1}"] = ResidualBlock(made, act(), affine(True), skip_init)
            else:
                blocks[f"block{i + 1}"] = _plain(affine, made, act)
        return blocks

    def _initialize(self, init: str, activation: str) -> None:
        if init == "torch":
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if activation == "relu":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                else:
                    nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(activation))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"{type(self).__name__} expects images of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        return super().forward(x)


class DeepMLP(_Deep):
    """A fully connected network: flatten, ``stem`` (784 to ``width``, a plain block), ``depth`` blocks of
    ``width`` units (plain, or residual with ``residual``), ``head`` (``width`` to 10).

    Args:
        depth: the number of blocks after the stem.
        width: units per hidden layer.
        norm, norm_kwargs: the norm by its registry name and its options, as for LeNet.
        activation: ``relu``, ``tanh`` or ``sigmoid``.
        residual: blocks ``x + f(x)`` with the norm inside ``f`` (pre-activation).
        skip_init: a zero-initialized learnable scalar on each residual branch, no norm (De & Smith 2020).
        init: ``scaled`` (He for ReLU, Xavier for tanh and sigmoid, zero biases) or ``torch`` (its default).
    """

    def __init__(self, depth: int = 8, width: int = 128, norm: str = "none", norm_kwargs: NormKwargs = None,
                 activation: Activation = "relu", residual: bool = False, skip_init: bool = False,
                 init: Init = "scaled") -> None:
        kwargs, act = self._check(depth, width, norm, norm_kwargs, activation, residual, skip_init, init)
        stem = _plain(lambda bias: nn.Linear(math.prod(self.input_shape), width, bias=bias),
                      create_norm(norm, width, 2, 0, **kwargs), act)
        blocks = self._blocks(lambda bias: nn.Linear(width, width, bias=bias), 2, depth, width, norm, kwargs, act, residual,
                              skip_init, first_index=1)
        super().__init__(OrderedDict(flatten=nn.Flatten(), stem=stem, **blocks, head=nn.Linear(width, 10)))
        self.depth, self.width, self.norm, self.norm_kwargs, self.activation = depth, width, norm, kwargs, activation
        self.residual, self.skip_init, self.init = residual, skip_init, init
        self._initialize(init, activation)


class DeepConvNet(_Deep):
    """A convolutional network: ``stem`` (two 3x3 stride-2 convolutions to ``width`` channels, 28x28 to 7x7, each
    a plain block), ``depth`` 3x3 blocks at 7x7 (plain, or residual with ``residual``), global average
    pooling, ``head`` (``width`` to 10). The arguments are :class:`DeepMLP`'s, ``width`` in channels."""

    def __init__(self, depth: int = 8, width: int = 32, norm: str = "none", norm_kwargs: NormKwargs = None,
                 activation: Activation = "relu", residual: bool = False, skip_init: bool = False,
                 init: Init = "scaled") -> None:
        kwargs, act = self._check(depth, width, norm, norm_kwargs, activation, residual, skip_init, init)

        def conv(channels_in: int, stride: int = 1):
            return lambda bias: nn.Conv2d(channels_in, width, kernel_size=3, stride=stride, padding=1, bias=bias)

        stem = nn.Sequential(OrderedDict(conv1=_plain(conv(1, 2), create_norm(norm, width, 4, 0, **kwargs), act),
                                         conv2=_plain(conv(width, 2), create_norm(norm, width, 4, 1, **kwargs), act)))
        blocks = self._blocks(conv(width), 4, depth, width, norm, kwargs, act, residual, skip_init,
                              first_index=2)
        super().__init__(OrderedDict(stem=stem, **blocks, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                     head=nn.Linear(width, 10)))
        self.depth, self.width, self.norm, self.norm_kwargs, self.activation = depth, width, norm, kwargs, activation
        self.residual, self.skip_init, self.init = residual, skip_init, init
        self._initialize(init, activation)
