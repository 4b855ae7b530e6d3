"""The BN doctor: finds the classic batch-norm mistakes in anyone's model and training loop (docs/doctor.md).

``check(model, example_input)`` and ``watch(model)`` are plain PyTorch (this package's modules import torch
and ``bn_lightning.nn`` only); ``BatchNormDoctor``, the Lightning callback, loads Lightning on first use;
``python -m bn_lightning doctor MODULE:FACTORY`` runs ``check`` from the command line.
"""

from importlib import import_module

from bn_lightning.doctor.checks import check, watch
from bn_lightning.doctor.findings import CODES, Finding

__all__ = ["CODES", "BatchNormDoctor", "Finding", "check", "watch"]


def __getattr__(name: str):
    if name == "BatchNormDoctor":
        return import_module("bn_lightning.doctor.callback").BatchNormDoctor
    raise AttributeError(f"module 'bn_lightning.doctor' has no attribute {name!r}")
