"""What batch normalization does to training: BatchNorm from scratch, LeNet, Fashion-MNIST, Lightning.

The package is layered (docs/architecture.md): ``bn_lightning.nn`` holds the layers and networks and
imports torch only; ``training`` the Lightning plumbing; ``callbacks`` what observes training;
``compare`` and ``blog`` the experiments. The names below are loaded on first use, so that
``from bn_lightning import BatchNorm2d`` does not import Lightning.
"""

from importlib import import_module

from bn_lightning import _compat

_EXPORTS = {
    "BatchNorm1d": "bn_lightning.nn",
    "BatchNorm2d": "bn_lightning.nn",
    "BatchNorm3d": "bn_lightning.nn",
    "BatchRenorm1d": "bn_lightning.nn",
    "BatchRenorm2d": "bn_lightning.nn",
    "LeNet": "bn_lightning.nn",
    "Classifier": "bn_lightning.training.module",
    "FashionMNISTDataModule": "bn_lightning.training.data",
}
__all__ = sorted(_EXPORTS)

_compat.install()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'bn_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
