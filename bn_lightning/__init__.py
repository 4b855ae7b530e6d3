"""What batch normalization does to training: BatchNorm from scratch, LeNet, Fashion-MNIST, Lightning."""

from bn_lightning.data import FashionMNISTDataModule
from bn_lightning.model import LeNet
from bn_lightning.module import Classifier
from bn_lightning.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Classifier", "FashionMNISTDataModule", "LeNet"]
