"""Training plumbing: the LightningModule, the DataModule, stopping and resuming, the command line.

Imports Lightning and ``bn_lightning.nn``; nothing here imports ``callbacks``, ``compare`` or ``blog``.
"""

from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.training.module import Classifier

__all__ = ["Classifier", "FashionMNISTDataModule"]
