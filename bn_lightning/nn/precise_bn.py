"""Precise BN: population statistics computed with the final weights, instead of the moving average.

Ioffe & Szegedy's Algorithm 2 evaluates with the mean and unbiased variance of each BN layer's input
over the training data, taken with the trained weights fixed. The exponential moving average exists
so that a model can be evaluated *during* training; it mixes statistics of older weights into the
estimate. Recomputing them is what fvcore's ``update_bn_stats`` and Wu & Johnson 2021 ("Rethinking
'Batch' in BatchNorm", section 3) call precise BN. How the variance is pooled differs:
``torch.optim.swa_utils.update_bn`` (a cumulative average, ``momentum=None``) and fvcore's first versions
average the per-batch unbiased variances, which leaves out how the batch means differ from one another;
fvcore's current version (``_PopulationVarianceEstimator``, with Wu & Johnson's appendix) pools every batch's
mean and biased variance, weighted by its size, into the variance of all values, biased. Both find BN
layers by torch's classes. :func:`update_bn_stats` finds ours as well and takes the unbiased variance of
every value seen, what BN's running variance estimates.

As in fvcore, each batch goes through the network in training mode: a layer's input is what it is in
training, normalized upstream by batch statistics.
"""


from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bn_lightning.nn.functional import reduce_dims
from bn_lightning.nn.registry import batch_norm_layers

__all__ = ["update_bn_stats"]


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch in float64
    (Chan et al.'s pairwise update: exact, and free of the cancellation of sum(x^2) - n * mean^2)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        dims = reduce_dims(x.dim())
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
    layers = list(batch_norm_layers(model, tracked=True).values())
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
