"""Batch Renorm's relaxation schedule counted in epochs, so that every batch size gets the same one.

:class:`~bn_lightning.nn.renorm.BatchRenorm2d` counts its schedule in steps, as Ioffe (2017) does. An epoch is
13,750 steps at batch 4 and 215 at batch 256, so one schedule in steps is a different experiment at each batch
size: 1,000 steps of relaxation are 7% of an epoch at batch 4 and nearly 5 epochs at batch 256.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from bn_lightning.nn.renorm import _BatchRenorm

__all__ = ["BatchRenormSchedule"]


class BatchRenormSchedule(Callback):
    """Set every Batch Renorm layer's ``warmup_steps``, ``r_relax_steps`` and ``d_relax_steps`` from epochs,
    with the training batches of an epoch (``trainer.num_training_batches``), when training starts.

    The defaults keep the paper's order (plain BN first, then d relaxed before r) on a 5-epoch run: plain BN
    for half an epoch, d_max reached at epoch 2, r_max at epoch 3, the last 2 epochs fully renormalized.
    The layers count steps in ``num_batches_tracked``, so a resumed run continues the schedule where it was.
    """

    def __init__(self, warmup_epochs: float = 0.5, r_relax_epochs: float = 2.5, d_relax_epochs: float = 1.5) -> None:
        for name, epochs in (("warmup_epochs", warmup_epochs), ("r_relax_epochs", r_relax_epochs),
                             ("d_relax_epochs", d_relax_epochs)):
            if not epochs >= 0:
                raise ValueError(f"{name} must be a number of epochs, >= 0: got {epochs}")
        self.warmup_epochs, self.r_relax_epochs, self.d_relax_epochs = warmup_epochs, r_relax_epochs, d_relax_epochs

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, _BatchRenorm)]
        if not layers:
            rank_zero_info("BatchRenormSchedule: the model has no Batch Renorm layer; it sets nothing")
            return
        per_epoch = trainer.num_training_batches
        for layer in layers:
            layer.warmup_steps = round(self.warmup_epochs * per_epoch)
            layer.r_relax_steps = round(self.r_relax_epochs * per_epoch)
            layer.d_relax_steps = round(self.d_relax_epochs * per_epoch)
        rank_zero_info(f"BatchRenormSchedule: {per_epoch} steps an epoch: plain BN for {layers[0].warmup_steps} steps, "
                       f"d_max by step {layers[0].warmup_steps + layers[0].d_relax_steps}, "
                       f"r_max by step {layers[0].warmup_steps + layers[0].r_relax_steps}")
