"""Batch normalization from scratch: drop-in twins of ``torch.nn.BatchNorm1d/2d/3d``.

Training normalizes each channel with the statistics of the current batch::

    mu = mean(x),  var = mean((x - mu)^2)            # biased, over N and spatial dims
    x_hat = (x - mu) / sqrt(var + eps)
    y = gamma * x_hat + beta

and keeps running estimates for evaluation, updated without autograd history::

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   # unbiased

with ``momentum=None`` meaning the cumulative average ``1 / num_batches_tracked``.
The forward and the backward are written out in :class:`_BatchNormFunction` (Ioffe & Szegedy 2015, section 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm"]


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` so it broadcasts over ``(N, C, *spatial)``; a ``(N, C)``
    batch takes it as it is (one op less on a path where each op costs as much as the arithmetic)."""
    return t if ndim == 2 else t.view((1, -1) + (1,) * (ndim - 2))


def _values_per_channel(x: Tensor) -> int:
    """How many values each channel's statistics are taken over: N times the spatial size."""
    channels = x.shape[1]
    return x.numel() // channels if channels else math.prod(x.shape[:1] + x.shape[2:])


def _reduce_dims(ndim: int) -> list[int]:
    """Every dimension but the channel one: the statistics are per channel."""
    return [0, *range(2, ndim)]


def _rows(t: Tensor) -> Tensor | None:
    """A contiguous ``(N, C, *spatial)`` CPU tensor as ``(N, C, L)`` rows, or None when it has no such view.

    The row layout is a CPU trick (see its users); a GPU reduces or broadcasts over the whole
    tensor in one kernel, and every extra op is one more launch."""
    if t.dim() > 2 and t.numel() > 0 and t.is_cpu and t.is_contiguous():
        return t.view(t.shape[0], t.shape[1], -1)
    return None


def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum over every other dimension.

    On a contiguous feature map it sums each (sample, channel) row, then the rows: inner, vectorized
    reductions, faster on the CPU than reducing over ``(0, 2, 3)`` at once for a large map, and as
    accurate as torch's for a mean far from zero, which the reduction over ``(0, 2, 3)`` is not.
    """
    rows = _rows(t)
    return t.sum(_reduce_dims(t.dim())) if rows is None else rows.sum(2).sum(0)


def _channel_sum_of_squares(t: Tensor) -> Tensor:
    """Per-channel ``sum(t * t)``: squared vector norms of the ``(N, C, L)`` rows (on the CPU several
    times faster than a norm over ``(0, 2, 3)``), a dot product per column of a ``(N, C)`` batch
    (a column norm costs five times a column dot product)."""
    if t.dim() == 2:
        return torch.linalg.vecdot(t, t, dim=0)
    rows = _rows(t)
    if rows is not None:
        return torch.linalg.vector_norm(rows, dim=2).square().sum(0)
    return torch.linalg.vector_norm(t, dim=_reduce_dims(t.dim())).square()


def _scale_shift(t: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``t * scale + shift`` with per-channel ``scale`` and ``shift``, into ``out`` (which may be ``t``).

    A ``(N, C)`` batch takes one fused op. A feature map takes a multiply and an in-place add: as
    stride-0 operands of the fused op the per-channel vectors take the CPU off its vectorized loop."""
    ndim = t.dim()
    if shift is None:
        return torch.mul(t, _channel_view(scale, ndim), out=out)
    if ndim == 2:
        return torch.addcmul(shift, t, scale, out=out)
    return torch.mul(t, _channel_view(scale, ndim), out=out).add_(_channel_view(shift, ndim))


def _device_type(t: Tensor) -> str:
    """``t.device.type``, without reading it for the two common ones: on a path of a few microseconds per
    op, the attribute costs as much as an op."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def _outside_autocast(input: Tensor, run, *args) -> Tensor:
    """``run(*args)`` with autocast off on ``input``'s device: autocast would run the statistics' dot
    products in half precision; they stay in float32."""
    device_type = _device_type(input)
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return run(*args)
    return run(*args)


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipped when it would change nothing: even a no-op ``to`` costs as much as a small op."""
    return t if t.dtype == dtype else t.to(dtype)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """Half-precision inputs are normalized in float32, as torch's kernels do under autocast."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _sum_over_processes(group, *values: Tensor) -> list[Tensor]:
    """Sum per-channel vectors over the processes of ``group`` in one all-reduce."""
    flat = torch.cat(values)
    torch.distributed.all_reduce(flat, group=group)
    return list(flat.split([v.numel() for v in values]))


def _forward(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, process_group):
    """The forward of :func:`batch_norm`: the output, and the per-channel mean, invstd
    (``1 / sqrt(var + eps)``), scale (``gamma * invstd``) and value count the backward needs.

    In training the batch is centred in the output buffer, its sum of squares taken there, and
    the buffer then scaled and shifted in place: one allocation of x's size.
    """
    ndim, count = x.dim(), _values_per_channel(x)
    xs = _as_dtype(x, _stats_dtype(x))
    if use_batch_stats:
        total = _channel_sum(xs)
        if process_group is not None:
            total, global_count = _sum_over_processes(process_group, total, total.new_tensor([count]))
            count = int(global_count.item())
            if count == 1:
                raise ValueError("Expected more than 1 value per channel when training, got 1 over all processes")
    if use_batch_stats and count > 0:
        mean = total.div_(count)
        out = xs - _channel_view(mean, ndim)
        sum_of_squares = _channel_sum_of_squares(out)
        if process_group is not None:
            (sum_of_squares,) = _sum_over_processes(process_group, sum_of_squares)
        invstd = sum_of_squares.div(count).add_(eps).rsqrt_()
        if running_mean is not None and running_var is not None:
            # (1 - m) * running + m * batch, the variance unbiased; lerp_ is that in one op.
            running_mean.lerp_(mean, momentum)
            running_var.mul_(1 - momentum).add_(sum_of_squares, alpha=momentum / (count - 1))
        scale = invstd if weight is None else invstd * weight
        out = _scale_shift(out, scale, bias, out=out)
    else:
        if use_batch_stats:
            # An empty batch has no statistics: placeholders keep the (empty) output and the
            # zero parameter gradients free of NaN, and the running buffers stay as they are.
            mean, var = xs.new_zeros(x.shape[1]), xs.new_ones(x.shape[1])
        else:
            mean, var = _as_dtype(running_mean, xs.dtype), _as_dtype(running_var, xs.dtype)
        invstd = var.add(eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        out = _scale_shift(xs, scale, shift)
    return _as_dtype(out, x.dtype), mean, invstd, scale, count


class _BatchNormFunction(torch.autograd.Function):
    """Batch normalization with the forward and the backward written out.

    Training (or eval without running buffers) normalizes with the batch statistics, and the
    backward carries the gradient through them (Ioffe & Szegedy 2015, section 3)::

        dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))

    Eval with running buffers normalizes with those constants. Only ``x`` and per-channel
    vectors are saved; ``x_hat`` is never stored as a second full tensor.

    With a ``process_group`` the batch is the union of every process's batch: the per-channel
    sums (and counts, which may differ) are summed over the group before the statistics are
    taken, and the backward sums its two per-channel reductions the same way. Gamma and beta
    get this process's share of their gradient; DDP sums the shares as it does for any weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, process_group):
        out, mean, invstd, scale, count = _forward(
            x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, process_group
        )
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.use_batch_stats, ctx.count, ctx.process_group = use_batch_stats, count, process_group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, invstd, scale = ctx.saved_tensors
        ndim, count, group = x.dim(), ctx.count, ctx.process_group
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        through_stats = need_x and ctx.use_batch_stats
        grad_x = grad_w = grad_b = None
        dy, xs = _as_dtype(grad_out, mean.dtype), _as_dtype(x, mean.dtype)

        # The backward's only reductions: sum(dy) and sum(dy * (x - mean)) per channel, the latter
        # made in the buffer that then becomes grad_x: one full-size allocation, as in torch's own
        # kernel. Centring first keeps it exact where sum(dy * x) - mean * sum(dy) would cancel
        # (a mean 1000 times the spread loses 4 digits). A process with no samples still joins the sum.
        buffer = None
        if need_w or need_b or through_stats:
            sum_dy = _channel_sum(dy)
        if need_w or through_stats:
            buffer = torch.sub(xs, _channel_view(mean, ndim)).mul_(dy)
            sum_dy_xmu = _channel_sum(buffer)
        if need_w:
            grad_w = sum_dy_xmu * invstd
        if need_b:
            grad_b = sum_dy
        if through_stats and group is not None:
            sum_dy, sum_dy_xmu = _sum_over_processes(group, sum_dy, sum_dy_xmu)
        if need_x:
            if through_stats and count > 0:
                # dx = scale * dy + coef * x + offset, with per-channel coef and offset:
                # coef = -scale * a / count, offset = -scale * (sum_dy - a * mean) / count.
                a = sum_dy_xmu * invstd * invstd
                per_value = scale * (-1 / count)
                offset = torch.addcmul(sum_dy, a, mean, value=-1).mul_(per_value)
                coef = a.mul_(per_value)
                grad_x = _scale_shift(xs, coef, offset, out=buffer)
                grad_x.addcmul_(_channel_view(scale, ndim), dy)
            else:
                grad_x = dy * _channel_view(scale, ndim)
            grad_x = _as_dtype(grad_x, x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _check_channels(x: Tensor, name: str, t: Tensor | None) -> None:
    if t is not None and t.numel() != x.shape[1]:
        raise RuntimeError(f"{name} should contain {x.shape[1]} elements not {t.numel()}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """Functional twin of :func:`torch.nn.functional.batch_norm`.

    With ``training`` the batch statistics normalize ``input`` and, when running buffers
    are given, update them in place under ``no_grad`` (the unbiased variance goes into
    ``running_var``). Without it the running buffers normalize. With a ``process_group``
    the batch statistics are those of the whole group's batch (see :class:`_BatchNormFunction`).
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects input of at least 2 dimensions (N, C, ...), got {input.dim()}D")
    _check_channels(input, "running_mean", running_mean)
    _check_channels(input, "running_var", running_var)
    _check_channels(input, "weight", weight)
    _check_channels(input, "bias", bias)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, process_group)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, process_group) -> Tensor:
    """:func:`batch_norm` once its arguments' shapes are known to fit; the layers, which check their own, call it directly."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and process_group is None and _values_per_channel(input) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    # Batch statistics in training, and in eval when there are no buffers to normalize with;
    # the buffers are updated only when batch statistics are taken and both are given.
    use_batch_stats = training or running_mean is None or running_var is None
    group = process_group if use_batch_stats else None
    args = (input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, group)
    # Without a graph to record (eval under no_grad, inference) the forward runs as it is,
    # sparing the autograd.Function's own cost on a path of a few microseconds.
    needs_graph = torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    run = _BatchNormFunction.apply if needs_graph else lambda *a: _forward(*a)[0]
    return _outside_autocast(input, run, *args)


class _BatchNorm(nn.Module):
    """What BatchNorm1d/2d/3d share; subclasses only say which input ranks they take.

    Mirrors ``torch.nn.modules.batchnorm._BatchNorm`` attribute for attribute (and its
    state_dict version 2), so checkpoints move freely between the two implementations.
    It deliberately does not subclass torch's private class: code that converts torch's
    layers by type (``SyncBatchNorm.convert_sync_batchnorm``) must not mistake it for one.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        sync: bool = False,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
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
        # Under torch.distributed in training, take the statistics over the batches of every
        # process of process_group (default: all), as torch.nn.SyncBatchNorm does.
        self.sync = sync
        self.process_group = process_group
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
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
            + (", sync=True" if self.sync else "")
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

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
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
BATCH_NORMS = (_BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNorm1d(_BatchNorm):
    """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch normalization over a 4D ``(N, C, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Batch normalization over a 5D ``(N, C, D, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
