"""Batch Renormalization from scratch (Ioffe 2017, Algorithm 1): BN whose training output is its eval output,
as far as the batch statistics allow.

BN trains on each batch's mean and std and evaluates on their moving averages, so a small or
unrepresentative batch trains the network on numbers it will not see in eval. Batch Renorm corrects
the batch statistics toward the moving ones, within limits::

    sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    x_hat = (x - mu_B) / sigma_B * r + d,  y = gamma * x_hat + beta

with r and d constants to the backward. Unclipped, x_hat = (x - running_mean) / sigma, eval's
normalization; with r_max = 1 and d_max = 0 it is plain BN. r and d come from the running statistics
as they stand before this step updates them; the update and eval are our BN's (:mod:`bn_lightning.nn.batchnorm`,
momentum=None included), and so are the constructor, buffers and state_dict.

The paper keeps a moving average of sigma_B itself; we keep BN's moving unbiased variance and take
sigma = sqrt(running_var + eps), so that the layer is a BN to checkpoints and monitors. The two differ
by the unbiasing factor M / (M - 1) (M values per channel: 256 in LeNet's fc layers, far more in its conv
layers) and by averaging a variance rather than a std, which gives a slightly larger sigma (Jensen).

The limits are relaxed as in the paper's experiments: plain BN for ``warmup_steps`` steps, then r_max and
d_max grow linearly to their final values over ``r_relax_steps`` and ``d_relax_steps`` steps. The step is
``num_batches_tracked``, so a run resumed from a checkpoint continues the schedule. The paper's 5k
steps of BN, r_max 3 by 40k and d_max 5 by 25k exceed a whole d2l run (10 epochs of 55,000 images at batch
256, 2,150 steps), which would stay plain BN throughout. The defaults keep its final limits and its order (d
before r) on that run's scale: plain BN for 200 steps (0.9 epoch at batch 256), d_max by step 700, r_max by
step 1,000, so the last 5.3 of its 10 epochs run fully renormalized. A step is a different share of an epoch
at every batch size: :class:`bn_lightning.callbacks.BatchRenormSchedule` sets the schedule in epochs instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_lightning.nn.batchnorm import _NormBase
from bn_lightning.nn.functional import (
    as_dtype,
    backward_sums,
    batch_moments,
    batch_norm,
    input_gradient,
    outside_autocast,
    scale_shift,
    stats_dtype,
    update_running_stats_,
    values_per_channel,
)

__all__ = ["BatchRenorm1d", "BatchRenorm2d"]


def _forward(x, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps):
    """The training forward: the output, and the per-channel mean, invstd (``1 / sigma_B``), r, d and scale
    (``gamma * r / sigma_B``) the backward needs. BN's statistics and update (:mod:`bn_lightning.nn.functional`)."""
    xs = as_dtype(x, stats_dtype(x))
    r_max, d_max = as_dtype(r_max, xs.dtype), as_dtype(d_max, xs.dtype)
    mean, out, sum_of_squares, count = batch_moments(xs)
    invstd = sum_of_squares.div(count).add_(eps).rsqrt_()
    running_invstd = as_dtype(running_var, xs.dtype).add(eps).rsqrt_()  # 1 / sigma
    r = torch.clamp(running_invstd / invstd, 1 / r_max, r_max)
    d = torch.clamp((mean - as_dtype(running_mean, xs.dtype)) * running_invstd, -d_max, d_max)
    # Only now, r and d taken: BN's update, term for term.
    update_running_stats_(running_mean, running_var, mean, sum_of_squares, count, momentum)
    scale, shift = invstd * r, d
    if weight is not None:
        scale, shift = scale * weight, shift * weight
    if bias is not None:
        shift = shift + bias
    out = scale_shift(out, scale, shift, out=out)
    return as_dtype(out, x.dtype), mean, invstd, r, d, scale


class _BatchRenormFunction(torch.autograd.Function):
    """Batch Renorm in training, with the backward written out and r, d held constant (Ioffe 2017, section 3)::

        dx = (gamma * r / sigma_B) * (dy - mean(dy) - x_hatB * mean(dy * x_hatB)),  x_hatB = (x - mu_B) / sigma_B
        dgamma = sum(dy * x_hat),  dbeta = sum(dy)

    That is BN's backward (:func:`bn_lightning.nn.functional.input_gradient`) with gamma * r in gamma's place.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps):
        out, mean, invstd, r, d, scale = _forward(
            x, weight, bias, running_mean, running_var, r_max, d_max, momentum, eps
        )
        ctx.save_for_backward(x, mean, invstd, r, d, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, invstd, r, d, scale = ctx.saved_tensors
        count = values_per_channel(x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy, xs = as_dtype(grad_out, mean.dtype), as_dtype(x, mean.dtype)
        sum_dy, buffer, sum_dy_xmu = backward_sums(dy, xs, mean)
        grad_w = torch.addcmul(d * sum_dy, sum_dy_xmu, invstd * r) if need_w else None  # sum(dy * x_hat)
        grad_b = sum_dy if need_b else None
        grad_x = None
        if need_x:
            grad_x = as_dtype(input_gradient(xs, dy, mean, invstd, scale, sum_dy, sum_dy_xmu, count, buffer), x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _BatchRenorm(_NormBase):
    def __init__(self, num_features: int, *args, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 200,
                 r_relax_steps: int = 800, d_relax_steps: int = 500, **kwargs) -> None:
        if not r_max >= 1:
            raise ValueError(f"r_max must be >= 1, the largest factor (and 1 / it the smallest) by which r corrects "
                             f"the batch's std; 1 is plain BN: got {r_max}")
        if not d_max >= 0:
            raise ValueError(f"d_max must be >= 0, the largest shift, in running stds, by which d corrects the "
                             f"batch's mean; 0 is plain BN: got {d_max}")
        for name, steps in (("warmup_steps", warmup_steps), ("r_relax_steps", r_relax_steps),
                            ("d_relax_steps", d_relax_steps)):
            if not steps >= 0:
                raise ValueError(f"{name} must be a number of steps, >= 0: got {steps}")
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError("Batch Renorm corrects the batch statistics toward the running ones: it needs "
                             "track_running_stats=True")
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_relax_steps, self.d_relax_steps = warmup_steps, r_relax_steps, d_relax_steps

    def limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) of the next training step, from the steps taken so far (``num_batches_tracked``)."""
        return 1 + (self.r_max - 1) * self._relaxed(self.r_relax_steps), self.d_max * self._relaxed(self.d_relax_steps)

    def _relaxed(self, relax_steps: int) -> Tensor:
        """How far a limit has gone from plain BN's value to its final one: 0 until ``warmup_steps``, then
        linearly to 1 over ``relax_steps`` (at once for 0). A tensor: no device sync."""
        steps = self.num_batches_tracked.double() - self.warmup_steps
        return (steps / relax_steps).clamp(0, 1) if relax_steps else (steps >= 0).double()

    def forward(self, input: Tensor) -> Tensor:
        # Eval normalizes with the moving statistics, as BN; an empty batch has none to renormalize.
        self._check_input(input)
        if not self.training:
            return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if input.numel() == 0:  # no statistics to renormalize: BN's empty batch, buffers left as they are
            self.num_batches_tracked.add_(1)
            return batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if values_per_channel(input) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        r_max, d_max = self.limits()
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        args = (input, self.weight, self.bias, self.running_mean, self.running_var, r_max, d_max, momentum, self.eps)
        return outside_autocast(input, _BatchRenormFunction.apply, *args)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_relax_steps={self.r_relax_steps}, d_relax_steps={self.d_relax_steps}")


_ARGS = """
    Args:
        num_features, eps, momentum, affine, device, dtype, bias: as :class:`bn_lightning.nn.BatchNorm2d`'s
            (``track_running_stats`` must stay True: the running statistics are what it corrects toward).
        r_max: the largest factor by which r corrects the batch's std toward the running one (and 1 / r_max the
            smallest); 1 is plain BN.
        d_max: the largest shift, in running stds, by which d corrects the batch's mean; 0 is plain BN.
        warmup_steps: training steps of plain BN before the limits start to relax.
        r_relax_steps, d_relax_steps: steps over which r_max and d_max then grow linearly to their values.

    Eval, checkpoints and the running update are BN's. Unlike BN it has no ``sync``: each process renormalizes
    with its own batch (``Trainer(sync_batchnorm=True)`` refuses it)."""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = """Batch Renorm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.
""" + _ARGS
    _input_ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = """Batch Renorm over a 4D ``(N, C, H, W)`` input.
""" + _ARGS
    _input_ranks = (4,)
