"""The module paths of release 0.1, before the package was layered, kept importable for one release.

Every run folder's ``config.yaml`` and checkpoint of 0.1 names classes by those paths
(``bn_lightning.model.LeNet``, ``bn_lightning.callbacks.GradientICS``...). Importing an old path gives the
module that now holds its names, with a ``FutureWarning`` that names the new path.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from importlib import import_module

# Old module -> the module that holds its names now.
MOVED = {
    "bn_lightning.norm": "bn_lightning.nn.batchnorm",
    "bn_lightning.renorm": "bn_lightning.nn.renorm",
    "bn_lightning.noisy_norm": "bn_lightning.nn.noisy",
    "bn_lightning.model": "bn_lightning.nn",
    "bn_lightning.module": "bn_lightning.training.module",
    "bn_lightning.data": "bn_lightning.training.data",
    "bn_lightning.sampling": "bn_lightning.training.sampling",
    "bn_lightning.resume": "bn_lightning.training.resume",
    "bn_lightning.sync": "bn_lightning.training.sync",
    "bn_lightning.cli": "bn_lightning.training.cli",
    "bn_lightning.errors": "bn_lightning.training.errors",
    "bn_lightning._private": "bn_lightning.training._private",
    "bn_lightning.trainable": "bn_lightning.training.trainable",
    "bn_lightning.probes": "bn_lightning.callbacks.probes",
    "bn_lightning.precise_bn": "bn_lightning.callbacks.precise_bn",  # update_bn_stats: bn_lightning.nn.precise_bn
    "bn_lightning.initialization": "bn_lightning.callbacks.lsuv",  # lsuv_: bn_lightning.nn.lsuv
    "bn_lightning.results": "bn_lightning.compare.results",  # its functions now take the results folder
    "bn_lightning.saved_tensors": "bn_lightning.blog.memory",
}


# Where an old path's names are loaded from, when that is not the module its warning names.
LOADED_FROM = {"bn_lightning.model": "bn_lightning.nn.legacy"}  # LeNet taking 0.1's flat arguments


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path (after every other finder has not) and loads it as the new module itself."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        old, new = module.__name__, MOVED[module.__name__]
        warnings.warn(f"{old} is now {new}; the old path goes in the next release", FutureWarning, stacklevel=2)
        # The import system returns what sys.modules holds under the name once this returns: the new module.
        sys.modules[old] = import_module(LOADED_FROM.get(old, new))


_finder = _Alias()


def install() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
