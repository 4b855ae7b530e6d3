"""The arithmetic of batch normalization, forward and backward, written out: what our BatchNorm and Batch
Renorm layers share (:mod:`bn_lightning.nn.batchnorm`, :mod:`bn_lightning.nn.renorm`).

Training normalizes each channel with the statistics of the current batch::

    mu = mean(x),  var = mean((x - mu)^2)            # biased, over N and spatial dims
    x_hat = (x - mu) / sqrt(var + eps)
    y = gamma * x_hat + beta

and keeps running estimates for evaluation, updated without autograd history::

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)   # unbiased

:func:`batch_norm` is the functional twin of ``torch.nn.functional.batch_norm``. The other public names
(:func:`batch_moments`, :func:`update_running_stats_`, :func:`backward_sums`, :func:`input_gradient` and the
per-channel helpers) are the layers' shared core: public within the package, not a stable API.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["batch_norm"]


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` so it broadcasts over ``(N, C, *spatial)``; a ``(N, C)``
    batch takes it as it is (one op less on a path where each op costs as much as the arithmetic)."""
    return t if ndim == 2 else t.view((1, -1) + (1,) * (ndim - 2))


def values_per_channel(x: Tensor) -> int:
    """How many values each channel's statistics are taken over: N times the spatial size."""
    channels = x.shape[1]
    return x.numel() // channels if channels else math.prod(x.shape[:1] + x.shape[2:])


def reduce_dims(ndim: int) -> list[int]:
    """Every dimension but the channel one: the statistics are per channel."""
    return [0, *range(2, ndim)]


def _rows(t: Tensor) -> Tensor | None:
    """A contiguous ``(N, C, *spatial)`` CPU tensor as ``(N, C, L)`` rows, or None when it has no such view.

    The row layout is a CPU trick (see its users); a GPU reduces or broadcasts over the whole
    tensor in one kernel, and every extra op is one more launch."""
    if t.dim() > 2 and t.numel() > 0 and t.is_cpu and t.is_contiguous():
        return t.view(t.shape[0], t.shape[1], -1)
    return None


def channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum over every other dimension.

    On a contiguous feature map it sums each (sample, channel) row, then the rows: inner, vectorized
    reductions, faster on the CPU than reducing over ``(0, 2, 3)`` at once for a large map, and as
    accurate as torch's for a mean far from zero, which the reduction over ``(0, 2, 3)`` is not.
    """
    rows = _rows(t)
    return t.sum(reduce_dims(t.dim())) if rows is None else rows.sum(2).sum(0)


def channel_sum_of_squares(t: Tensor) -> Tensor:
    """Per-channel ``sum(t * t)``: squared vector norms of the ``(N, C, L)`` rows (on the CPU several
    times faster than a norm over ``(0, 2, 3)``), a dot product per column of a ``(N, C)`` batch
    (a column norm costs five times a column dot product)."""
    if t.dim() == 2:
        return torch.linalg.vecdot(t, t, dim=0)
    rows = _rows(t)
    if rows is not None:
        return torch.linalg.vector_norm(rows, dim=2).square().sum(0)
    return torch.linalg.vector_norm(t, dim=reduce_dims(t.dim())).square()


def scale_shift(t: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``t * scale + shift`` with per-channel ``scale`` and ``shift``, into ``out`` (which may be ``t``).

    A ``(N, C)`` batch takes one fused op. A feature map takes a multiply and an in-place add: as
    stride-0 operands of the fused op the per-channel vectors take the CPU off its vectorized loop."""
    ndim = t.dim()
    if shift is None:
        return torch.mul(t, channel_view(scale, ndim), out=out)
    if ndim == 2:
        return torch.addcmul(shift, t, scale, out=out)
    return torch.mul(t, channel_view(scale, ndim), out=out).add_(channel_view(shift, ndim))


def _device_type(t: Tensor) -> str:
    """``t.device.type``, without reading it for the two common ones: on a path of a few microseconds per
    op, the attribute costs as much as an op."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def outside_autocast(input: Tensor, run, *args) -> Tensor:
    """``run(*args)`` with autocast off on ``input``'s device: autocast would run the statistics' dot
    products in half precision; they stay in float32."""
    device_type = _device_type(input)
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return run(*args)
    return run(*args)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipped when it would change nothing: even a no-op ``to`` costs as much as a small op."""
    return t if t.dtype == dtype else t.to(dtype)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Half-precision inputs are normalized in float32, as torch's kernels do under autocast."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def sum_over_processes(group, *values: Tensor) -> list[Tensor]:
    """Sum per-channel vectors over the processes of ``group`` in one all-reduce."""
    flat = torch.cat(values)
    torch.distributed.all_reduce(flat, group=group)
    return list(flat.split([v.numel() for v in values]))


def batch_moments(xs: Tensor, process_group=None) -> tuple[Tensor, Tensor, Tensor, int]:
    """The batch's per-channel mean, ``xs - mean`` (a new tensor, which becomes the output buffer), the sum of
    squared deviations and the value count; with a ``process_group``, over the union of every process's batch."""
    count = values_per_channel(xs)
    total = channel_sum(xs)
    if process_group is not None:
        total, global_count = sum_over_processes(process_group, total, total.new_tensor([count]))
        count = int(global_count.item())
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 over all processes")
    mean = total.div_(count)
    centered = xs - channel_view(mean, xs.dim())
    sum_of_squares = channel_sum_of_squares(centered)
    if process_group is not None:
        (sum_of_squares,) = sum_over_processes(process_group, sum_of_squares)
    return mean, centered, sum_of_squares, count


def update_running_stats_(running_mean: Tensor, running_var: Tensor, mean: Tensor, sum_of_squares: Tensor,
                          count: int, momentum: float) -> None:
    """``(1 - m) * running + m * batch``, in place, the variance unbiased; ``lerp_`` is the mean's in one op."""
    running_mean.lerp_(mean, momentum)
    running_var.mul_(1 - momentum).add_(sum_of_squares, alpha=momentum / (count - 1))


def backward_sums(dy: Tensor, xs: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's two reductions, ``sum(dy)`` and ``sum(dy * (x - mean))`` per channel, and the buffer
    ``dy * (x - mean)`` they were taken in, which :func:`input_gradient` reuses: one full-size allocation, as
    in torch's own kernel. Centring first keeps it exact where ``sum(dy * x) - mean * sum(dy)`` would cancel
    (a mean 1000 times the spread loses 4 digits)."""
    buffer = torch.sub(xs, channel_view(mean, xs.dim())).mul_(dy)
    return channel_sum(dy), buffer, channel_sum(buffer)


def input_gradient(xs: Tensor, dy: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, sum_dy: Tensor,
                   sum_dy_xmu: Tensor, count: int, buffer: Tensor) -> Tensor:
    """``dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` through the batch statistics (Ioffe & Szegedy
    2015, section 3), ``x_hat = (x - mean) * invstd``, into ``buffer``. As ``dx = scale * dy + coef * x + offset``
    with per-channel ``coef = -scale * a / count`` and ``offset = -scale * (sum_dy - a * mean) / count``."""
    a = sum_dy_xmu * invstd * invstd
    per_value = scale * (-1 / count)
    offset = torch.addcmul(sum_dy, a, mean, value=-1).mul_(per_value)
    grad_x = scale_shift(xs, a.mul_(per_value), offset, out=buffer)
    return grad_x.addcmul_(channel_view(scale, xs.dim()), dy)


def _forward(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, process_group):
    """The forward of :func:`batch_norm`: the output, and the per-channel mean, invstd
    (``1 / sqrt(var + eps)``), scale (``gamma * invstd``) and value count the backward needs.

    In training the batch is centred in the output buffer, its sum of squares taken there, and
    the buffer then scaled and shifted in place: one allocation of x's size.
    """
    count = values_per_channel(x)
    xs = as_dtype(x, stats_dtype(x))
    if use_batch_stats and (count > 0 or process_group is not None):
        mean, out, sum_of_squares, count = batch_moments(xs, process_group)
    if use_batch_stats and count > 0:
        invstd = sum_of_squares.div(count).add_(eps).rsqrt_()
        if running_mean is not None and running_var is not None:
            update_running_stats_(running_mean, running_var, mean, sum_of_squares, count, momentum)
        scale = invstd if weight is None else invstd * weight
        out = scale_shift(out, scale, bias, out=out)
    else:
        if use_batch_stats:
            # An empty batch has no statistics: placeholders keep the (empty) output and the
            # zero parameter gradients free of NaN, and the running buffers stay as they are.
            mean, var = xs.new_zeros(x.shape[1]), xs.new_ones(x.shape[1])
        else:
            mean, var = as_dtype(running_mean, xs.dtype), as_dtype(running_var, xs.dtype)
        invstd = var.add(eps).rsqrt_()
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
        out = scale_shift(xs, scale, shift)
    return as_dtype(out, x.dtype), mean, invstd, scale, count


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
        dy, xs = as_dtype(grad_out, mean.dtype), as_dtype(x, mean.dtype)

        # A process with no samples still joins the sums over the group.
        buffer = None
        if need_w or through_stats:
            sum_dy, buffer, sum_dy_xmu = backward_sums(dy, xs, mean)
        elif need_b:
            sum_dy = channel_sum(dy)
        if need_w:
            grad_w = sum_dy_xmu * invstd
        if need_b:
            grad_b = sum_dy
        if through_stats and group is not None:
            sum_dy, sum_dy_xmu = sum_over_processes(group, sum_dy, sum_dy_xmu)
        if need_x:
            if through_stats and count > 0:
                grad_x = input_gradient(xs, dy, mean, invstd, scale, sum_dy, sum_dy_xmu, count, buffer)
            else:
                grad_x = dy * channel_view(scale, ndim)
            grad_x = as_dtype(grad_x, x.dtype)
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
    if training and process_group is None and values_per_channel(input) == 1:
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
    return outside_autocast(input, run, *args)
