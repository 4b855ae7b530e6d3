"""Precise BN during training: :func:`bn_lightning.nn.precise_bn.update_bn_stats` at every validation, as a callback."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from bn_lightning.nn.precise_bn import update_bn_stats
from bn_lightning.nn.registry import batch_norm_layers

__all__ = ["PreciseBN", "update_bn_stats"]


class PreciseBN(Callback):
    """After validation at every ``every_n_epochs``-th epoch (with None, only after the last of
    ``trainer.max_epochs``: the final weights' numbers, as the comparison runner's tables report them), evaluate the validation set with the moving
    averages, with precise statistics from each of ``num_images`` training images, and with each validation
    batch's own statistics (BN in training mode, as if evaluated like the blog post did), and log
    ``precise_bn/val_acc_ema``, ``precise_bn/val_acc_<n>`` and ``precise_bn/val_acc_batch`` (epoch-level, at
    the global step). A network without BN layers gets none of them.

    The precise statistics go into a copy of the network: training goes on with its own moving averages.
    The images are the first ``n`` of one fixed random order of the datamodule's ``train_set`` (the same for
    every size and epoch, drawn from a generator of its own), in batches of the training batch size; a size
    above the train set's takes all of it.
    """

    def __init__(self, num_images: Sequence[int] = (4096,), every_n_epochs: int | None = 1, seed: int = 0) -> None:
        num_images = [num_images] if isinstance(num_images, int) else list(num_images)
        if not num_images or any(n < 2 for n in num_images):
            raise ValueError(f"num_images must list training-image counts of at least 2, got {num_images}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive number of epochs, or null for the last epoch only, "
                             f"got {every_n_epochs}")
        self.num_images, self.every_n_epochs, self.seed = sorted(num_images), every_n_epochs, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.active = bool(batch_norm_layers(pl_module.net, tracked=True))
        if not self.active:
            rank_zero_info("PreciseBN: the network has no batch-norm layer with running statistics; it logs nothing")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active or trainer.sanity_checking or not self._due(trainer):
            return
        datamodule = trainer.datamodule
        order = torch.randperm(len(datamodule.train_set), generator=torch.Generator().manual_seed(self.seed))
        val = datamodule.val_dataloader()
        pl_module.log("precise_bn/val_acc_ema", _accuracy(pl_module.net, val, pl_module.device))
        pl_module.log("precise_bn/val_acc_batch", _accuracy(copy.deepcopy(pl_module.net), val, pl_module.device,
                                                             batch_statistics=True))
        for n in self.num_images:
            net = copy.deepcopy(pl_module.net)
            chunks = order[:n].split(datamodule.hparams.batch_size)
            update_bn_stats(net, (datamodule.train_set.__getitems__(chunk.tolist()) for chunk in chunks))
            pl_module.log(f"precise_bn/val_acc_{n}", _accuracy(net, val, pl_module.device))

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch + 1
        return epoch == trainer.max_epochs if self.every_n_epochs is None else epoch % self.every_n_epochs == 0


@torch.no_grad()
def _accuracy(net: nn.Module, batches: Iterable, device: torch.device, batch_statistics: bool = False) -> float:
    """Accuracy of ``net`` over ``(images, labels)`` batches, in eval mode, or in training mode with
    ``batch_statistics`` (which updates its running statistics: give it a copy); its mode is restored."""
    was_training = net.training
    net.train(batch_statistics)
    correct = seen = 0
    try:
        for images, labels in batches:
            correct += int((net(images.to(device)).argmax(1) == labels.to(device)).sum())
            seen += len(labels)
    finally:
        net.train(was_training)
    return correct / seen
