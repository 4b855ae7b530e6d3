"""LeNet-5 (the 6-16-120-84-10 variant on 28x28 inputs) with a pluggable normalization layer."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn

from bn_lightning.nn import batchnorm as scratch
from bn_lightning.nn import noisy as noisy_norm
from bn_lightning.nn import renorm

# Each norm as (layer for feature vectors, layer for feature maps).
NORMS = {
    "none": None,
    "scratch": (scratch.BatchNorm1d, scratch.BatchNorm2d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
    "noisy_bn": (noisy_norm.NoisyBatchNorm1d, noisy_norm.NoisyBatchNorm2d),
    "batch_renorm": (renorm.BatchRenorm1d, renorm.BatchRenorm2d),
    "group_norm": (nn.LayerNorm, nn.GroupNorm),
    "layer_norm": (nn.LayerNorm, nn.GroupNorm),
}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}

Norm = Literal["none", "scratch", "torch", "noisy_bn", "batch_renorm", "group_norm", "layer_norm"]
NormPosition = Literal["before", "after"]
Activation = Literal["sigmoid", "relu"]
Pool = Literal["avg", "max"]


def _choose(kind: str, value: str, table: dict):
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(table)}")
    return table[value]


class LeNet(nn.Sequential):
    """conv(1->6,5) conv(6->16,5) fc(256->120) fc(120->84), each followed by norm -> act, then fc(84->10).

    The norm sits between the affine layer and its activation (``norm_position="before"``), as in
    Ioffe & Szegedy and Dive into Deep Learning, or after the activation (``"after"``). Every choice
    gives the same module names and state_dict keys (``none`` puts an ``nn.Identity`` in the norm's
    place), so a callback or a checkpoint finds ``conv1.norm`` whatever the run.

    Weights start Xavier-uniform, as in the book, with ``init_gain`` as Xavier's gain (4 is Glorot &
    Bengio's advice for the sigmoid, whose slope at 0 is 1/4). ``noise_shift`` and ``noise_scale`` set
    the noise of ``norm="noisy_bn"`` (:mod:`bn_lightning.nn.noisy`); its layers' noise seeds follow
    from torch's seed, so the weights equal those of ``norm="scratch"`` built after the same seed.
    ``bn_momentum`` is every BN layer's ``momentum`` (None: the cumulative average of all batches).
    ``renorm_*`` set the limits and their schedule of ``norm="batch_renorm"`` (:mod:`bn_lightning.nn.renorm`).

    ``group_norm`` and ``layer_norm`` normalize each sample on its own, torch's layers: on the feature
    maps ``nn.GroupNorm`` with ``norm_groups`` groups of channels, or one group for ``layer_norm`` (Wu &
    He 2018: LN over (C, H, W), with per-channel gamma and beta), on the feature vectors ``nn.LayerNorm``
    for both, as the literature has it on linear layers. Neither has running statistics: the BN
    monitors and ``trainable`` find no BN in such a network.
    """

    def __init__(self, norm: Norm = "none", activation: Activation = "sigmoid", pool: Pool = "avg",
                 norm_position: NormPosition = "before", init_gain: float = 1.0,
                 noise_shift: float = 1.0, noise_scale: float = 2.0,
                 renorm_r_max: float = 3.0, renorm_d_max: float = 5.0, renorm_warmup_steps: int = 200,
                 renorm_r_relax_steps: int = 800, renorm_d_relax_steps: int = 500, norm_groups: int = 2,
                 bn_momentum: float | None = 0.1) -> None:
        norm_classes = _choose("norm", norm, NORMS)
        act = _choose("activation", activation, ACTIVATIONS)
        pool_cls = _choose("pool", pool, POOLS)
        _choose("norm_position", norm_position, {"before": None, "after": None})
        if not init_gain > 0:
            raise ValueError(f"init_gain must be positive, it scales the Xavier-uniform weights: got {init_gain}")
        # Options of one kind of norm, set away from their defaults with another: an error, not ignored.
        defaults = {name: p.default for name, p in inspect.signature(LeNet.__init__).parameters.items()}
        given = locals()

        def changed(*names: str) -> bool:
            return any(given[name] != defaults[name] for name in names)

        if norm != "noisy_bn" and changed("noise_shift", "noise_scale"):
            raise ValueError(f"noise_shift and noise_scale set the noise of norm: noisy_bn; this network has "
                             f"norm: {norm}. Set norm: noisy_bn, or leave them out")
        schedule = dict(r_max=renorm_r_max, d_max=renorm_d_max, warmup_steps=renorm_warmup_steps,
                        r_relax_steps=renorm_r_relax_steps, d_relax_steps=renorm_d_relax_steps)
        if norm != "batch_renorm" and changed(*(f"renorm_{name}" for name in schedule)):
            raise ValueError(f"renorm_r_max, renorm_d_max, renorm_warmup_steps, renorm_r_relax_steps and "
                             f"renorm_d_relax_steps set the limits of norm: batch_renorm; this network has "
                             f"norm: {norm}. Set norm: batch_renorm, or leave them out")
        if norm != "group_norm" and changed("norm_groups"):
            raise ValueError(f"norm_groups sets the groups of norm: group_norm; this network has norm: {norm}. "
                             f"Set norm: group_norm, or leave it out")
        if norm == "group_norm" and norm_groups not in (1, 2):
            raise ValueError(f"norm_groups must divide the channels of conv1 and conv2 (6 and 16): 1 or 2, got "
                             f"{norm_groups}")
        batch_norms = ("scratch", "torch", "noisy_bn", "batch_renorm")
        if norm not in batch_norms and changed("bn_momentum"):
            raise ValueError(f"bn_momentum sets the running statistics of a batch norm ({', '.join(batch_norms)}); "
                             f"this network has norm: {norm}. Set one of those, or leave it out")
        seed = torch.initial_seed()

        def make_norm(width: int, spatial: bool, index: int) -> nn.Module:
            if norm_classes is None:
                return nn.Identity()
            cls = norm_classes[1 if spatial else 0]
            if norm == "noisy_bn":
                return cls(width, momentum=bn_momentum, noise_shift=noise_shift, noise_scale=noise_scale,
                           noise_seed=seed % 2**40 * 16 + index)
            if norm == "batch_renorm":
                return cls(width, momentum=bn_momentum, **schedule)
            if norm in batch_norms:
                return cls(width, momentum=bn_momentum)
            if cls is nn.GroupNorm:
                return cls(norm_groups if norm == "group_norm" else 1, width)
            return cls(width)

        def block(affine: nn.Module, width: int, spatial: bool, index: int) -> nn.Sequential:
            layers = OrderedDict(affine=affine)
            if norm_position == "before":
                layers["norm"] = make_norm(width, spatial, index)
                layers["act"] = act()
            else:
                layers["act"] = act()
                layers["norm"] = make_norm(width, spatial, index)
            if spatial:
                layers["pool"] = pool_cls(kernel_size=2, stride=2)
            return nn.Sequential(layers)

        super().__init__(
            OrderedDict(
                conv1=block(nn.Conv2d(1, 6, kernel_size=5), 6, spatial=True, index=0),
                conv2=block(nn.Conv2d(6, 16, kernel_size=5), 16, spatial=True, index=1),
                flatten=nn.Flatten(),
                fc1=block(nn.Linear(16 * 4 * 4, 120), 120, spatial=False, index=2),
                fc2=block(nn.Linear(120, 84), 84, spatial=False, index=3),
                head=nn.Linear(84, 10),
            )
        )
        self.norm, self.activation, self.pool, self.norm_position = norm, activation, pool, norm_position
        self.init_gain, self.noise_shift, self.noise_scale = init_gain, noise_shift, noise_scale
        self.renorm_r_max, self.renorm_d_max, self.renorm_warmup_steps = renorm_r_max, renorm_d_max, renorm_warmup_steps
        self.renorm_r_relax_steps, self.renorm_d_relax_steps = renorm_r_relax_steps, renorm_d_relax_steps
        self.norm_groups, self.bn_momentum = norm_groups, bn_momentum
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight, gain=init_gain)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"LeNet expects images of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        return super().forward(x)
