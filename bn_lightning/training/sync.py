"""``Trainer(sync_batchnorm=True)`` for the from-scratch BN too.

Lightning's default LayerSync converts torch's BatchNorm classes to ``torch.nn.SyncBatchNorm`` by
type, so our layers would silently keep per-process statistics. This plugin switches on their
``sync`` option as well (and still converts torch's layers as Lightning does), and refuses a batch
norm that cannot synchronize (Batch Renorm), rather than leave it on per-process statistics unsaid.
"""

from __future__ import annotations

from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.nn import Module

from bn_lightning.nn.batchnorm import _BatchNorm
from bn_lightning.nn.registry import is_batch_norm

# What Lightning's TorchSyncBatchNorm converts to torch.nn.SyncBatchNorm.
TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormSync(TorchSyncBatchNorm):
    """``Trainer(sync_batchnorm=True, plugins=[BatchNormSync()])``; the CLI adds it by itself."""

    def __init__(self) -> None:
        self._switched: list[_BatchNorm] = []

    def apply(self, model: Module) -> Module:
        unsyncable = [m for m in model.modules() if is_batch_norm(m)
                      and not isinstance(m, (_BatchNorm, *TORCH_BATCH_NORMS))]
        if unsyncable:
            raise ValueError(f"{type(unsyncable[0]).__name__} takes each process's own batch statistics: it cannot "
                             f"synchronize them across processes; set trainer.sync_batchnorm to false")
        self._switched = [m for m in model.modules() if isinstance(m, _BatchNorm) and not m.sync]
        for layer in self._switched:
            layer.sync = True
        return super().apply(model)

    def revert(self, model: Module) -> Module:
        for layer in self._switched:
            layer.sync = False
        self._switched = []
        return super().revert(model)
