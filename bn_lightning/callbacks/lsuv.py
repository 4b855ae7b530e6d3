"""LSUV as a callback: :func:`bn_lightning.nn.lsuv.lsuv_` applied when fit starts from scratch (a resumed fit
restores its weights afterwards)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from bn_lightning.nn.lsuv import lsuv_
from bn_lightning.nn.registry import batch_norm_layers

__all__ = ["LSUV", "lsuv_"]


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
        if batch_norm_layers(pl_module.net):
            rank_zero_info("LSUV on a network with BN: BN's output variance does not depend on the scale LSUV sets")
        generator = torch.Generator().manual_seed(torch.initial_seed())
        variances = lsuv_(pl_module.net, images.to(next(pl_module.net.parameters()).device), self.tolerance, self.max_iterations,
                          self.orthogonal, generator)
        rank_zero_info("LSUV: output variance per layer " + ", ".join(f"{k} {v:.3f}" for k, v in variances.items()))
