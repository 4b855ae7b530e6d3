"""LSUV, layer-sequential unit-variance initialization (Mishkin & Matas 2016): fixing a network's scale
with data instead of with BN.

Each conv and linear weight starts orthonormal; then, layer by layer from the input, it is rescaled
until that layer's output over a batch of training images has unit variance. BN enforces the same at
every step; LSUV only once, before training. The :class:`LSUV` callback applies it when fit starts
from scratch (a resumed fit restores its weights afterwards).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from bn_lightning.nn.batchnorm import BATCH_NORMS


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


class LSUV(Callback):
    """LSUV-initialize ``pl_module.net`` from the first ``num_images`` training images before fit starts.

    The images come from the train set in its stored order (no shuffling, no global random numbers drawn),
    the orthonormal weights from a generator seeded with torch's seed.
    """

    def __init__(self, num_images: int = 512, tolerance: float = 0.05, max_iterations: int = 10,
                 orthogonal: bool = True) -> None:
        if num_images < 2:
            raise ValueError(f"LSUV needs at least 2 images to measure a variance, got num_images={num_images}")
        self.num_images, self.tolerance, self.max_iterations = num_images, tolerance, max_iterations
        self.orthogonal = orthogonal

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before the checkpoint is restored: a resumed fit overwrites these weights with its own.
        if stage != "fit":
            return
        dataset = trainer.datamodule.train_set
        images = dataset.__getitems__(list(range(min(self.num_images, len(dataset)))))[0]
        if any(isinstance(m, BATCH_NORMS) for m in pl_module.net.modules()):
            rank_zero_info("LSUV on a network with BN: BN's output variance does not depend on the scale LSUV sets")
        generator = torch.Generator().manual_seed(torch.initial_seed())
        variances = lsuv_(pl_module.net, images.to(next(pl_module.net.parameters()).device), self.tolerance, self.max_iterations,
                          self.orthogonal, generator)
        rank_zero_info("LSUV: output variance per layer " + ", ".join(f"{k} {v:.3f}" for k, v in variances.items()))
