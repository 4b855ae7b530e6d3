"""Put our BatchNorm into a model built with torch's: ``convert_batchnorm(model)``, as torch's
``SyncBatchNorm.convert_sync_batchnorm`` does for its own layer."""

from __future__ import annotations

from torch import nn

from bn_lightning.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["convert_batchnorm"]

TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` (its lazy forms once built too) with our twin,
    and return the module: ``module`` itself, changed in place, or the new layer when it is a BN layer.

    Each new layer takes the old one's options (eps, momentum, affine, track_running_stats), its training
    mode, and its very parameter and buffer tensors: an optimizer built before the conversion still trains
    it, and outputs, gradients and running statistics are those of torch's layer. ``SyncBatchNorm`` is
    refused: convert first, then synchronize with our ``sync`` option (``Trainer(sync_batchnorm=True)``).
    """
    if isinstance(module, nn.SyncBatchNorm):
        raise ValueError("convert_batchnorm takes torch's BatchNorm1d/2d/3d, not SyncBatchNorm: convert the model "
                         "before convert_sync_batchnorm, and synchronize ours with sync=True (or sync_batchnorm)")
    twin = next((ours for theirs, ours in TWINS.items() if isinstance(module, theirs)), None)
    if twin is not None:
        layer = twin(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                     bias=module.bias is not None if module.affine else True)
        for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            setattr(layer, name, tensor)
        layer.train(module.training)
        return layer
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
