"""Training plumbing: the LightningModule, the DataModule, stopping and resuming, the command line.

Imports Lightning and ``bn_lightning.nn``; nothing here imports ``callbacks``, ``compare`` or ``blog``.
``Classifier`` and ``FashionMNISTDataModule`` load on first use, so that a light module here
(``errors``) can be imported without Lightning.
"""

from importlib import import_module

_EXPORTS = {"Classifier": "bn_lightning.training.module", "FashionMNISTDataModule": "bn_lightning.training.data"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bn_lightning.training' has no attribute {name!r}")
