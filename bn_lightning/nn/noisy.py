"""Batch normalization with internal covariate shift put back: Santurkar et al. 2018's "noisy" BN (section 2.1).

After normalizing, every training step scales and shifts each channel by a fresh random amount::

    y = BN(x) * s + m,   m ~ U(-shift, shift),   log s ~ U(-log scale, log scale)   # per channel, per step

so the distribution the next layer sees changes at every step, by up to ``shift`` in mean and a factor
of ``scale`` in std, however well the weights have settled. If BN helped by keeping those
distributions still, this layer would lose that help. Evaluation adds no noise.

The noise of step ``t`` comes from a generator seeded with ``(noise_seed, t)``, not from torch's global
generator: a network built with it starts with the same weights as one built with plain BN, and a probe
that runs the same step again (``bn_lightning.callbacks.GradientICS``) sees the same noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bn_lightning.nn.batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d"]


class _NoisyBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, *args, noise_shift: float = 1.0, noise_scale: float = 2.0,
                 noise_seed: int | None = None, **kwargs) -> None:
        if not noise_shift >= 0:
            raise ValueError(f"noise_shift must be >= 0, the largest shift of a channel's mean: got {noise_shift}")
        if not noise_scale >= 1:
            raise ValueError(f"noise_scale must be >= 1, the largest factor on a channel's std (and 1 / it the "
                             f"smallest): got {noise_scale}")
        super().__init__(num_features, *args, **kwargs)
        self.noise_shift, self.noise_scale = noise_shift, noise_scale
        if noise_seed is None:
            noise_seed = int(torch.randint(2**62, ()))
        # Buffers, so a checkpoint resumes the same noise sequence.
        self.register_buffer("noise_seed", torch.tensor(noise_seed, dtype=torch.long))
        self.register_buffer("noise_step", torch.tensor(0, dtype=torch.long))

    def noise(self) -> tuple[Tensor, Tensor]:
        """This step's per-channel (scale, shift)."""
        generator = torch.Generator().manual_seed((int(self.noise_seed) * 1_000_003 + int(self.noise_step)) % 2**63)
        uniform = torch.rand(2, self.num_features, generator=generator, dtype=torch.float64) * 2 - 1
        scale = torch.exp(uniform[0] * math.log(self.noise_scale))
        return scale, uniform[1] * self.noise_shift

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        if not self.training:
            return output
        scale, shift = (t.to(output.device, output.dtype) for t in self.noise())
        self.noise_step.add_(1)
        view = (1, -1) + (1,) * (output.dim() - 2)
        return output * scale.view(view) + shift.view(view)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_shift={self.noise_shift}, noise_scale={self.noise_scale}"


_ARGS = """
    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, sync, process_group:
            as :class:`bn_lightning.nn.BatchNorm2d`'s.
        noise_shift: the largest shift of a channel's mean, drawn uniformly in [-noise_shift, noise_shift].
        noise_scale: the largest factor on a channel's std; its log is drawn uniformly in +-log(noise_scale).
        noise_seed: seeds the noise of every step (with the step's number); None draws one from torch's RNG.
            ``LeNet(norm="noisy_bn")`` seeds each layer from torch's seed and the layer's position."""


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    __doc__ = """Noisy BN over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.
""" + _ARGS


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    __doc__ = """Noisy BN over a 4D ``(N, C, H, W)`` input.
""" + _ARGS
