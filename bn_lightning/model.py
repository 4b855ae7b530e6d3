"""LeNet-5 (the 6-16-120-84-10 variant on 28x28 inputs) with a pluggable normalization layer."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import Tensor, nn

from bn_lightning import norm as scratch

# Each norm as (layer for feature vectors, layer for feature maps).
NORMS = {
    "none": None,
    "scratch": (scratch.BatchNorm1d, scratch.BatchNorm2d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}

Norm = Literal["none", "scratch", "torch"]
Activation = Literal["sigmoid", "relu"]
Pool = Literal["avg", "max"]


def _choose(kind: str, value: str, table: dict):
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(table)}")
    return table[value]


class LeNet(nn.Sequential):
    """conv(1->6,5) conv(6->16,5) fc(256->120) fc(120->84), each followed by norm -> act, then fc(84->10).

    The norm sits between the affine layer and its activation, as in Ioffe & Szegedy and
    Dive into Deep Learning. Every norm choice gives the same module names and state_dict
    keys (``none`` puts an ``nn.Identity`` in the norm's place), so a callback or a
    checkpoint finds ``conv1.norm`` whatever the run. Weights start Xavier-uniform, as in the book.
    """

    def __init__(self, norm: Norm = "none", activation: Activation = "sigmoid", pool: Pool = "avg") -> None:
        norm_classes = _choose("norm", norm, NORMS)
        act = _choose("activation", activation, ACTIVATIONS)
        pool_cls = _choose("pool", pool, POOLS)

        def block(affine: nn.Module, width: int, spatial: bool) -> nn.Sequential:
            layers = OrderedDict(affine=affine)
            layers["norm"] = nn.Identity() if norm_classes is None else norm_classes[1 if spatial else 0](width)
            layers["act"] = act()
            if spatial:
                layers["pool"] = pool_cls(kernel_size=2, stride=2)
            return nn.Sequential(layers)

        super().__init__(
            OrderedDict(
                conv1=block(nn.Conv2d(1, 6, kernel_size=5), 6, spatial=True),
                conv2=block(nn.Conv2d(6, 16, kernel_size=5), 16, spatial=True),
                flatten=nn.Flatten(),
                fc1=block(nn.Linear(16 * 4 * 4, 120), 120, spatial=False),
                fc2=block(nn.Linear(120, 84), 84, spatial=False),
                head=nn.Linear(84, 10),
            )
        )
        self.norm, self.activation, self.pool = norm, activation, pool
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"LeNet expects images of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        return super().forward(x)
