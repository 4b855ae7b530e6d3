"""LeNet as release 0.1 spelled it: one flat argument per option of one norm (``bn_momentum``, ``renorm_r_max``,
``noise_shift``, ``norm_groups``...), which ``norm_kwargs`` now carries. Kept for one release, so that every
run folder's ``config.yaml`` and every checkpoint of 0.1 still builds its network, with a ``FutureWarning``
that shows the new spelling.
"""

from __future__ import annotations

import warnings

from bn_lightning.nn.lenet import *  # noqa: F403  (bn_lightning.model's other names)
from bn_lightning.nn.lenet import LeNet as _LeNet
from bn_lightning.nn.registry import norm_options

# 0.1's argument -> (its default, the norm_kwargs key it became).
FLAT = {
    "noise_shift": (1.0, "noise_shift"),
    "noise_scale": (2.0, "noise_scale"),
    "renorm_r_max": (3.0, "r_max"),
    "renorm_d_max": (5.0, "d_max"),
    "renorm_warmup_steps": (200, "warmup_steps"),
    "renorm_r_relax_steps": (800, "r_relax_steps"),
    "renorm_d_relax_steps": (500, "d_relax_steps"),
    "norm_groups": (2, "groups"),
    "bn_momentum": (0.1, "momentum"),
}


def translate(init_args: dict) -> dict:
    """0.1's LeNet arguments as today's: each flat option the chosen norm takes goes into ``norm_kwargs`` when
    it differs from its default; one the norm does not take must be at its default (0.1 refused it otherwise)."""
    args = {key: value for key, value in init_args.items() if key not in FLAT}
    norm = args.get("norm", "none")
    taken = norm_options(norm)
    norm_kwargs = dict(args.get("norm_kwargs") or {})
    for old, (default, new) in FLAT.items():
        if old not in init_args or init_args[old] == default:
            continue
        if new not in taken:
            raise ValueError(f"{old} sets an option of another norm than {norm!r} (which takes "
                             f"{', '.join(taken) or 'none'}): leave it out")
        norm_kwargs[new] = init_args[old]
    if norm_kwargs:
        args["norm_kwargs"] = norm_kwargs
    return args


def uses_flat_arguments(init_args: dict) -> bool:
    return any(key in FLAT for key in init_args)


class LeNetOfRelease01(_LeNet):
    """``bn_lightning.model.LeNet`` of release 0.1: builds today's :class:`bn_lightning.nn.LeNet` from 0.1's
    arguments (``translate``), with a ``FutureWarning`` that gives the new spelling. Named apart, so that the
    command line's ``LeNet`` (a class name alone) is today's only."""

    def __new__(cls, norm: str = "none", activation: str = "sigmoid", pool: str = "avg",
                norm_position: str = "before", init_gain: float = 1.0, noise_shift: float = 1.0,
                noise_scale: float = 2.0, renorm_r_max: float = 3.0, renorm_d_max: float = 5.0,
                renorm_warmup_steps: int = 200, renorm_r_relax_steps: int = 800, renorm_d_relax_steps: int = 500,
                norm_groups: int = 2, bn_momentum: float | None = 0.1):
        given = dict(locals())
        del given["cls"]
        args = translate(given)
        warnings.warn(f"bn_lightning.model.LeNet and its flat norm options are now bn_lightning.nn.LeNet with "
                      f"norm_kwargs: this network is LeNet({', '.join(f'{k}={v!r}' for k, v in args.items())})",
                      FutureWarning, stacklevel=2)
        return _LeNet(**args)

    def __init__(self, norm: str = "none", activation: str = "sigmoid", pool: str = "avg",
                 norm_position: str = "before", init_gain: float = 1.0, noise_shift: float = 1.0,
                 noise_scale: float = 2.0, renorm_r_max: float = 3.0, renorm_d_max: float = 5.0,
                 renorm_warmup_steps: int = 200, renorm_r_relax_steps: int = 800, renorm_d_relax_steps: int = 500,
                 norm_groups: int = 2, bn_momentum: float | None = 0.1) -> None:
        raise AssertionError("unreachable: __new__ returns a bn_lightning.nn.LeNet")  # the signature jsonargparse reads


LeNet = LeNetOfRelease01  # the name 0.1's configs and checkpoints import
