"""LeNet-5 (the 6-16-120-84-10 variant on 28x28 inputs) with a pluggable normalization layer."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Optional, Union

from torch import Tensor, nn

from bn_lightning.nn.registry import NORMS, check_norm_kwargs, create_norm

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}

NormPosition = Literal["before", "after"]
Activation = Literal["sigmoid", "relu"]
Pool = Literal["avg", "max"]
# The options of the norm layers, as a config or the command line gives them (--model.net.init_args.norm_kwargs.momentum=0.01).
NormKwargs = Optional[dict[str, Optional[Union[bool, int, float]]]]


def _choose(kind: str, value: str, table: dict):
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(table)}")
    return table[value]


class LeNet(nn.Sequential):
    """conv(1->6,5) conv(6->16,5) fc(256->120) fc(120->84), each followed by norm -> act, then fc(84->10).

    Args:
        norm: the normalization layer, by its name in :mod:`bn_lightning.nn.registry` (``none``, ``scratch``
            for our BN, ``torch`` for torch's, ``noisy_bn``, ``batch_renorm``, ``group_norm``, ``layer_norm``).
        norm_kwargs: that layer's own options, e.g. ``{"momentum": 0.01}`` for a BN, ``{"r_max": 2.0}`` for
            Batch Renorm, ``{"groups": 1}`` for GroupNorm; a key the norm does not take is an error.
        activation: ``sigmoid`` (the book's) or ``relu``.
        pool: ``avg`` (the book's) or ``max``.
        norm_position: the norm between the affine layer and its activation (``before``, as in Ioffe &
            Szegedy and Dive into Deep Learning) or after the activation (``after``).
        init_gain: Xavier-uniform's gain for every weight (4 is Glorot & Bengio's advice for the sigmoid,
            whose slope at 0 is 1/4).

    Every choice gives the same module names and state_dict keys (``none`` puts an ``nn.Identity`` in the
    norm's place), so a callback or a checkpoint finds ``conv1.norm`` whatever the run. ``group_norm`` and
    ``layer_norm`` normalize each sample on its own (torch's GroupNorm on the maps, LayerNorm on the vectors)
    and have no running statistics: the BN monitors find no BN in such a network. ``noisy_bn``'s per-layer
    noise seeds follow from torch's seed, so its weights equal those of ``scratch`` built after the same seed.
    """

    input_shape = (1, 28, 28)  # one image

    def __init__(self, norm: str = "none", norm_kwargs: NormKwargs = None, activation: Activation = "sigmoid",
                 pool: Pool = "avg", norm_position: NormPosition = "before", init_gain: float = 1.0) -> None:
        _choose("norm", norm, NORMS)
        norm_kwargs = check_norm_kwargs(norm, norm_kwargs)
        act = _choose("activation", activation, ACTIVATIONS)
        pool_cls = _choose("pool", pool, POOLS)
        _choose("norm_position", norm_position, {"before": None, "after": None})
        if not init_gain > 0:
            raise ValueError(f"init_gain must be positive, it scales the Xavier-uniform weights: got {init_gain}")

        def block(affine: nn.Module, width: int, spatial: bool, index: int) -> nn.Sequential:
            layers = OrderedDict(affine=affine)
            made = create_norm(norm, width, 4 if spatial else 2, index, **norm_kwargs)
            if norm_position == "before":
                layers["norm"], layers["act"] = made, act()
            else:
                layers["act"], layers["norm"] = act(), made
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
        self.norm, self.norm_kwargs, self.activation, self.pool = norm, norm_kwargs, activation, pool
        self.norm_position, self.init_gain = norm_position, init_gain
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight, gain=init_gain)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"LeNet expects images of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        return super().forward(x)
