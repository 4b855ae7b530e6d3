"""The layers and networks: BatchNorm from scratch, Batch Renorm, noisy BN, LeNet, deep MLPs and convnets.
Imports torch only.

Nothing here imports Lightning, so a user who only wants the layers pays torch's import time alone
(``tests/test_layering.py`` fails when a module here imports Lightning or a higher layer).
"""

from bn_lightning.nn.batchnorm import BATCH_NORMS, BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from bn_lightning.nn.convert import convert_batchnorm
from bn_lightning.nn.deep import DeepConvNet, DeepMLP
from bn_lightning.nn.lenet import LeNet
from bn_lightning.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d
from bn_lightning.nn.renorm import BatchRenorm1d, BatchRenorm2d

__all__ = [
    "BATCH_NORMS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d", "DeepConvNet", "DeepMLP",
    "LeNet",
    "NoisyBatchNorm1d", "NoisyBatchNorm2d", "batch_norm", "convert_batchnorm",
]
