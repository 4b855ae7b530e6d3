"""Batch normalization from scratch: drop-in twins of ``torch.nn.BatchNorm1d/2d/3d``.

The layers hold parameters and buffers as torch's do (:class:`_NormBase`, shared with Batch Renorm) and
run the arithmetic of :mod:`bn_lightning.nn.functional`, whose forward and backward are written out
(Ioffe & Szegedy 2015, section 3). What differs from torch's: nothing in the numbers, checkpoints or
options, and one option more, ``sync``, which takes the statistics over every process's batch, on CPU
processes too, where ``torch.nn.SyncBatchNorm`` needs CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bn_lightning.nn.functional import _batch_norm, batch_norm

__all__ = ["BATCH_NORMS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm"]


class _NormBase(nn.Module):
    """Parameters, buffers and checks of a batch norm layer, without its forward: what our BatchNorm and Batch
    Renorm share (torch's ``_NormBase``). Subclasses set ``_input_ranks``, the input ranks they take.

    Mirrors ``torch.nn.modules.batchnorm._NormBase`` attribute for attribute (and its state_dict version 2),
    so checkpoints move freely between the two implementations. It deliberately does not subclass torch's
    private class: code that converts torch's layers by type (``SyncBatchNorm.convert_sync_batchnorm``)
    must not mistake it for one.
    """

    _version = 2
    _input_ranks: tuple[int, ...] = ()
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        # torch's layers accept these and fail (or drift) only later; ours say so at once.
        if not eps > 0:
            raise ValueError(f"eps must be a positive number, it keeps 1 / sqrt(var + eps) finite: "
                             f"got {eps} (torch uses 1e-5)")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], the weight of each new batch in the running statistics, "
                             f"or None for their cumulative average: got {momentum} (torch uses 0.1)")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """gamma = 1 and beta = 0: the layer starts as a pure standardization."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._input_ranks:
            ranks = " or ".join(f"{rank}D" for rank in self._input_ranks)
            raise ValueError(f"expected {ranks} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints from before version 2 have no num_batches_tracked: start it at 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input(self, input: Tensor) -> None:
        """The input's rank, then its channel count (which torch reports as a mismatch of running_mean,
        or not at all without buffers and affine)."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise RuntimeError(
                f"{type(self).__name__}({self.num_features}) got an input of shape {tuple(input.shape)}, whose "
                f"{input.shape[1]} channels (dim 1) should be {self.num_features}: give the layer "
                f"num_features={input.shape[1]} or check the layer that feeds it"
            )

    def _momentum_of_this_step(self) -> float:
        """Count a tracked training step and return the weight of its batch in the running statistics:
        ``momentum``, or ``1 / num_batches_tracked`` (the cumulative average) for None."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor


class _BatchNorm(_NormBase):
    """What BatchNorm1d/2d/3d share: the forward, and ``sync``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True, sync: bool = False,
                 process_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        # Under torch.distributed in training, take the statistics over the batches of every
        # process of process_group (default: all), as torch.nn.SyncBatchNorm does.
        self.sync = sync
        self.process_group = process_group

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = self._momentum_of_this_step()
        # Batch statistics in training, and in eval when there are no running buffers.
        use_batch_stats = self.training or self.running_mean is None
        # Buffers go in when they normalize (eval) or are to be updated (tracked training).
        pass_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            self._sync_group(),
        )

    def _sync_group(self) -> torch.distributed.ProcessGroup | None:
        """The group whose joint batch gives the statistics, or None for this process's batch alone."""
        dist = torch.distributed
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


# Every batch-norm layer, ours and torch's (its LazyBatchNorm classes, once built, are subclasses of these).
BATCH_NORMS = (_NormBase, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

_ARGS = """
    Args:
        num_features: C, the channels of the input (dim 1).
        eps: added to the variance before its square root.
        momentum: the weight of each new batch in the running statistics, or None for their cumulative
            average over every batch so far (``1 / num_batches_tracked``).
        affine: learn a per-channel scale gamma (``weight``, starts at 1) and shift beta (``bias``, starts at 0).
        track_running_stats: keep ``running_mean`` and ``running_var`` and normalize with them in eval; without
            them every forward normalizes with its batch's statistics.
        device, dtype: where and in what type the parameters and buffers are made.
        bias: learn beta (with ``affine``); False leaves ``bias`` None, as torch's ``bias=False`` does.
        sync: in training under ``torch.distributed``, take the statistics over the union of every process's
            batch (of ``process_group``), as ``torch.nn.SyncBatchNorm`` does, on CPU processes (gloo) too.
            ``Trainer(sync_batchnorm=True)`` switches it on (``bn_lightning.training.sync.BatchNormSync``).
        process_group: the processes ``sync`` takes the statistics over; None for all.

    Same as torch's layer: the numbers (forward, backward, running statistics, the unbiased variance in
    ``running_var``), the attributes, the ``state_dict`` (version 2) and the errors on bad input."""


class BatchNorm1d(_BatchNorm):
    __doc__ = """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input, twin of ``torch.nn.BatchNorm1d``.
""" + _ARGS
    _input_ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = """Batch normalization over a 4D ``(N, C, H, W)`` input, twin of ``torch.nn.BatchNorm2d``.
""" + _ARGS
    _input_ranks = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = """Batch normalization over a 5D ``(N, C, D, H, W)`` input, twin of ``torch.nn.BatchNorm3d``.
""" + _ARGS
    _input_ranks = (5,)
