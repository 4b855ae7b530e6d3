"""LSUV, layer-sequential unit-variance initialization (Mishkin & Matas 2016): fixing a network's scale
with data instead of with BN.

Each conv and linear weight starts orthonormal; then, layer by layer from the input, it is rescaled
until that layer's output over a batch of training images has unit variance. BN enforces the same at
every step; LSUV only once, before training. :class:`bn_lightning.callbacks.LSUV` applies it when fit starts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def lsuv_(net: nn.Module, images: Tensor, tolerance: float = 0.05, max_iterations: int = 10,
          orthogonal: bool = True, generator: torch.Generator | None = None) -> dict[str, float]:
    """Rescale every ``nn.Conv2d``/``nn.Linear`` of ``net`` in place so its output over ``images`` has
    variance within ``tolerance`` of 1; return each layer's output variance after. BN buffers are left
    as they were."""
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not layers:
        raise ValueError(f"LSUV rescales conv and linear layers; {type(net).__name__} has none")
    saved = {name: b.clone() for name, b in net.named_buffers()}
    was_training = net.training
    net.train()
    variances = {}
    for name, layer in layers:
        if orthogonal:
            nn.init.orthogonal_(layer.weight, generator=generator)
        seen: list[Tensor] = []
        handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.var()))
        try:
            for _ in range(max_iterations):
                seen.clear()
                net(images)
                variance = float(seen[0])
                if abs(variance - 1) < tolerance or variance == 0:
                    break
                layer.weight.div_(variance ** 0.5)
            else:
                seen.clear()
                net(images)
                variance = float(seen[0])
        finally:
            handle.remove()
        variances[name] = variance
    for name, buffer in net.named_buffers():
        buffer.copy_(saved[name])
    net.train(was_training)
    return variances
