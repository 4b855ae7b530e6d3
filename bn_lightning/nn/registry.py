"""Norm layers by name: a network asks for ``norm`` with ``norm_kwargs`` (the layer's own options, as torch and
timm name them) and gets a layer for each place, from one table (timm's ``create_norm``, with positions).

An entry is a factory called as ``factory(num_features, ndim, index, **norm_kwargs)``: ``ndim`` is the rank
of the input the layer will see (2 for ``(N, C)`` vectors, 4 for ``(N, C, H, W)`` maps), so an entry can pick
a layer by rank (``group_norm``: GroupNorm on maps, LayerNorm on vectors); ``index`` is the layer's position
in the network, so an entry can seed a layer by it (``noisy_bn``'s noise). A key an entry does not accept is
an error that names the ones it does. A new norm is one :func:`register_norm`.

:func:`batch_norm_layers` is the one way the package finds "every BN layer" of a model, ours or torch's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from bn_lightning.nn.batchnorm import BATCH_NORMS, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bn_lightning.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d
from bn_lightning.nn.renorm import BatchRenorm1d, BatchRenorm2d

__all__ = ["BATCH_NORMS", "NORMS", "batch_norm_layers", "check_norm_kwargs", "create_norm", "is_batch_norm", "norm_options",
           "register_norm"]

NormFactory = Callable[..., nn.Module]  # (num_features, ndim, index, **norm_kwargs) -> layer
NORMS: dict[str, NormFactory] = {}
# Options a factory takes for the layer's constructor: its class's, less what the place decides.
_PLACE = {"self", "num_features", "num_channels", "normalized_shape", "num_groups", "device", "dtype"}


def register_norm(name: str, factory: NormFactory | None = None):
    """Add ``factory`` to the table under ``name`` (as a decorator without ``factory``)."""
    def add(factory: NormFactory) -> NormFactory:
        NORMS[name] = factory
        return factory
    return add if factory is None else add(factory)


def norm_options(name: str) -> list[str]:
    """The ``norm_kwargs`` keys the entry ``name`` accepts."""
    factory = _factory(name)
    if hasattr(factory, "options"):
        return list(factory.options)
    parameters = list(inspect.signature(factory).parameters.values())[3:]  # after (num_features, ndim, index)
    return [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]


def check_norm_kwargs(name: str, norm_kwargs: dict | None) -> dict:
    """``norm_kwargs`` as a dict, once every key is one the entry ``name`` accepts."""
    norm_kwargs = dict(norm_kwargs or {})
    accepted = norm_options(name)
    unknown = sorted(set(norm_kwargs) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes none"
        raise ValueError(f"norm_kwargs {', '.join(unknown)}: norm {name!r} {takes}")
    return norm_kwargs


def create_norm(name: str, num_features: int, ndim: int, index: int = 0, **norm_kwargs) -> nn.Module:
    """The layer ``name`` for ``num_features`` channels of rank-``ndim`` inputs at position ``index``."""
    factory = _factory(name)
    return factory(num_features, ndim, index, **check_norm_kwargs(name, norm_kwargs))


def _factory(name: str) -> NormFactory:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[name]


def is_batch_norm(module: nn.Module) -> bool:
    """A layer that normalizes with its batch's statistics in training: ours, Batch Renorm, noisy BN, torch's."""
    return isinstance(module, BATCH_NORMS)


def batch_norm_layers(model: nn.Module, tracked: bool = False) -> dict[str, nn.Module]:
    """Every batch-norm layer of ``model`` by its qualified name; with ``tracked``, only those that keep running
    statistics (``track_running_stats=True``)."""
    return {name: m for name, m in model.named_modules()
            if is_batch_norm(m) and not (tracked and getattr(m, "running_mean", None) is None)}


def _constructor_options(cls: type[nn.Module]) -> list[str]:
    """The keyword options of ``cls``'s constructor, through the ``*args, **kwargs`` it passes on to its bases."""
    options: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        options += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                    and p.name not in _PLACE and p.name not in options]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return options


def _by_rank(classes: dict[int, type[nn.Module]]) -> NormFactory:
    """An entry that builds ``classes[ndim]`` with the options of its constructor."""
    options = _constructor_options(next(iter(classes.values())))

    def factory(num_features: int, ndim: int, index: int, **kwargs) -> nn.Module:
        if ndim not in classes:
            names = ", ".join(dict.fromkeys(c.__name__ for c in classes.values()))
            raise ValueError(f"{names} take inputs of rank {', '.join(map(str, classes))}, not {ndim}")
        return classes[ndim](num_features, **kwargs)

    factory.options = options
    return factory


def _noisy(num_features: int, ndim: int, index: int, **kwargs) -> nn.Module:
    # The noise seed follows from torch's seed and the position: a network built after the same seed as one
    # with plain BN has the same weights, and each layer its own noise.
    kwargs.setdefault("noise_seed", torch.initial_seed() % 2**40 * 16 + index)
    return {2: NoisyBatchNorm1d, 3: NoisyBatchNorm1d, 4: NoisyBatchNorm2d}[ndim](num_features, **kwargs)


_noisy.options = [p for p in _constructor_options(NoisyBatchNorm1d) if p != "noise_seed"]


def _none(num_features: int, ndim: int, index: int) -> nn.Module:
    return nn.Identity()


def _group_norm(num_features: int, ndim: int, index: int, groups: int = 2, eps: float = 1e-5) -> nn.Module:
    """GroupNorm over ``groups`` groups of channels on feature maps; LayerNorm on vectors (Wu & He 2018)."""
    if ndim == 2:
        return nn.LayerNorm(num_features, eps=eps)
    if not (isinstance(groups, int) and groups > 0 and num_features % groups == 0):
        raise ValueError(f"groups must divide the channels of every feature map it normalizes: {groups} does not "
                         f"divide {num_features}")
    return nn.GroupNorm(groups, num_features, eps=eps)


def _layer_norm(num_features: int, ndim: int, index: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm: over (C, H, W) with per-channel gamma and beta on maps (GroupNorm with one group), over C on vectors."""
    return nn.LayerNorm(num_features, eps=eps) if ndim == 2 else nn.GroupNorm(1, num_features, eps=eps)


register_norm("none", _none)
register_norm("scratch", _by_rank({2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}))
register_norm("torch", _by_rank({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}))
register_norm("noisy_bn", _noisy)
register_norm("batch_renorm", _by_rank({2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d}))
register_norm("group_norm", _group_norm)
register_norm("layer_norm", _layer_norm)
