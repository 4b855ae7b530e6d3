"""Precise BN: population statistics computed with the final weights, instead of the moving average.

Ioffe & Szegedy's Algorithm 2 evaluates with the mean and unbiased variance of each BN layer's input
over the training data, taken with the trained weights fixed. The exponential moving average exists
so that a model can be evaluated *during* training; it mixes statistics of older weights into the
estimate. Recomputing them is what fvcore's ``update_bn_stats`` and Wu & Johnson 2021 ("Rethinking
'Batch' in BatchNorm", section 3) call precise BN. Theirs, and ``torch.optim.swa_utils.update_bn``,
find BN layers by torch's classes and average the per-batch variances; :func:`update_bn_stats` finds
ours as well and takes the variance over every value seen, which also counts how the batch means
differ from one another.

As in fvcore, each batch goes through the network in training mode: a layer's input is what it is in
training, normalized upstream by batch statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from bn_lightning.nn.batchnorm import BATCH_NORMS, _reduce_dims

__all__ = ["update_bn_stats", "PreciseBN"]


def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The BN layers of ``model`` that keep running statistics, ours and torch's (and their subclasses)."""
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.running_mean is not None]


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch in float64
    (Chan et al.'s pairwise update: exact, and free of the cancellation of sum(x^2) - n * mean^2)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        dims = _reduce_dims(x.dim())
        x = x.detach().to(torch.float64)
        count = x.numel() // x.shape[1]
        mean = x.mean(dims)
        m2 = (x - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> int:
    """Set every BN layer's ``running_mean`` and ``running_var`` to the mean and unbiased variance of its
    input over the images of ``batches``, passed through ``model`` in training mode with its weights fixed.

    ``batches`` yields inputs, or ``(input, target, ...)`` sequences whose first element is the input;
    ``num_batches`` takes only that many. Everything else is left as it was: parameters, the modules'
    training flags, the other buffers (``num_batches_tracked``, a noisy BN's step). Returns the number of
    images used.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no batch-norm layer with running statistics to update; "
                         "precise BN applies to BN layers built with track_running_stats=True")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive number of batches, or None for all: got {num_batches}")
    moments = {layer: _Moments() for layer in layers}
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    modes = {module: module.training for module in model.modules()}
    device = next(iter(saved.values())).device
    handles = [layer.register_forward_pre_hook(lambda layer, inputs: moments[layer].add(inputs[0])) for layer in layers]
    images = 0
    try:
        model.train()
        for index, batch in enumerate(batches):
            if num_batches is not None and index >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            images += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])
    if images == 0:
        raise ValueError("update_bn_stats got no batch: give it an iterable of inputs or (input, target) pairs")
    for layer, found in moments.items():
        if found.count < 2:
            raise ValueError(f"{type(layer).__name__} saw {found.count} value per channel: an unbiased variance "
                             "needs at least 2; give update_bn_stats more images")
        layer.running_mean.copy_(found.mean)
        layer.running_var.copy_(found.m2 / (found.count - 1))
    return images


class PreciseBN(Callback):
    """After validation at every ``every_n_epochs``-th epoch, evaluate the validation set with the moving
    averages, with precise statistics from each of ``num_images`` training images, and with each validation
    batch's own statistics (BN in training mode, as if evaluated like the blog post did), and log
    ``precise_bn/val_acc_ema``, ``precise_bn/val_acc_<n>`` and ``precise_bn/val_acc_batch`` (epoch-level, at
    the global step). A network without BN layers gets none of them.

    The precise statistics go into a copy of the network: training goes on with its own moving averages.
    The images are the first ``n`` of one fixed random order of the datamodule's ``train_set`` (the same for
    every size and epoch, drawn from a generator of its own), in batches of the training batch size; a size
    above the train set's takes all of it.
    """

    def __init__(self, num_images: Sequence[int] = (4096,), every_n_epochs: int = 1, seed: int = 0) -> None:
        num_images = [num_images] if isinstance(num_images, int) else list(num_images)
        if not num_images or any(n < 2 for n in num_images):
            raise ValueError(f"num_images must list training-image counts of at least 2, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive number of epochs, got {every_n_epochs}")
        self.num_images, self.every_n_epochs, self.seed = sorted(num_images), every_n_epochs, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.active = bool(batch_norm_layers(pl_module.net))
        if not self.active:
            rank_zero_info("PreciseBN: the network has no batch-norm layer with running statistics; it logs nothing")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
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
