"""Callbacks that watch training, so runs with and without BN can be compared in TensorBoard.

``BatchNormMonitor`` logs each BN layer's running statistics, gamma and beta, and how far the
current batch sits from the running estimates; ``ActivationMonitor`` logs percentiles of what
goes into each activation; ``ExamplesPerSecond`` logs throughput; ``TensorBoardComparison``
writes, once per run, the custom-scalars layout that puts those series side by side and the
HParams session that compares runs by their final accuracy.

The two layer monitors hook their layers only for the training batches they log, compute their
numbers inside the hook (under ``no_grad``, nothing in place, no global RNG) and keep only those
numbers, so training runs as it would without them.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from time import perf_counter

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn

from bn_lightning.callbacks.base import EveryNSteps, LayerMonitor, channel_subset, positive
from bn_lightning.callbacks.tensorboard import Layout, exact, histogram_summary, log_scalars, write_histogram
from bn_lightning.nn.registry import BATCH_NORMS
from bn_lightning.training.tags import PERCENTILES

# What ActivationMonitor watches, found by type in any network: torch's elementwise activations.
ACTIVATIONS = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)


def _percentiles(values: Tensor) -> list[float]:
    """``PERCENTILES`` of ``values``, interpolated as ``torch.quantile`` does. On the CPU through numpy's
    selection, faster there than ``torch.quantile`` on a layer's whole input (benchmarks/logging_overhead.py)."""
    values = values.float()
    if values.device.type == "cpu":
        return np.percentile(values.numpy(), PERCENTILES).tolist()
    return torch.quantile(values, torch.tensor(PERCENTILES, device=values.device) / 100).tolist()


class BatchNormMonitor(LayerMonitor):
    """Running statistics, gamma and beta of every BN layer (ours and torch's), and how far each batch is from them.

    Scalars per layer: ``bn/<block>/running_mean/ch<i>`` and ``bn/<block>/running_var/ch<i>``
    (as they stand after the step), ``bn/<block>/mean_gap`` = mean over channels of
    ``|batch mean - running mean|``, ``bn/<block>/mean_gap_std`` = the same gap in running stds,
    ``|batch mean - running mean| / sqrt(running var + eps)`` (what the gap does to a normalized value,
    comparable across layers and batch sizes), and ``bn/<block>/var_ratio`` = mean over channels of
    ``batch var / running var``. The batch statistics are those of the layer's input (the
    variance unbiased, like ``running_var``); the running ones are taken before this batch
    updates them: the estimates evaluation would have used. Histograms per layer:
    ``bn/<block>/running_mean``, ``running_var``, ``gamma``, ``beta``. Layers without running
    statistics (``track_running_stats=False``) get the gamma and beta histograms only.

    Args:
        every_n_steps: log the scalars on one training step in this many.
        histogram_every_n_steps: log the histograms on one step in this many; None for none.
        all_channels_up_to: layers this wide or narrower get every channel logged.
        channels_sampled: wider layers get this many evenly spaced channels.
    """

    layer_types = BATCH_NORMS
    role = "norm"

    def __init__(
        self,
        every_n_steps: int = 100,
        histogram_every_n_steps: int | None = 200,
        all_channels_up_to: int = 16,
        channels_sampled: int = 8,
    ) -> None:
        super().__init__(every_n_steps, histogram_every_n_steps)
        self.all_channels_up_to = positive(self, "all_channels_up_to", all_channels_up_to)
        self.channels_sampled = positive(self, "channels_sampled", channels_sampled)
        self._channels: dict[str, tuple[list[int], list[str]]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._channels = {}
        for name, layer in self.layers.items():
            channels = channel_subset(layer.num_features, self.all_channels_up_to, self.channels_sampled)
            digits = len(str(layer.num_features - 1))
            self._channels[name] = channels, [f"ch{c:0{digits}d}" for c in channels]

    def _tracked(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.running_mean is not None]

    def _observer(self, name: str):
        def observe(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if layer.running_mean is None or not self._scalars_now:
                return
            x = inputs[0]
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
                gap = (mean - layer.running_mean).abs()
                self._observed[name] = (
                    gap.mean(),
                    (gap * (layer.running_var + layer.eps).rsqrt()).mean(),
                    (var / layer.running_var).mean(),
                )

        return observe

    def _log(self, trainer: Trainer, step: int) -> None:
        if self._scalars_now:
            metrics = {}
            for name in self._tracked():
                layer, (channels, labels) = self.layers[name], self._channels[name]
                for stat in ("running_mean", "running_var"):
                    values = getattr(layer, stat)[channels].tolist()
                    metrics.update({f"bn/{name}/{stat}/{label}": v for label, v in zip(labels, values)})
                if name in self._observed:  # a layer the forward did not call has no batch statistics
                    for stat, value in zip(("mean_gap", "mean_gap_std", "var_ratio"), self._observed[name]):
                        metrics[f"bn/{name}/{stat}"] = value.item()
            log_scalars(trainer, metrics, step)
        if not self._histograms_now:
            return
        for name, layer in self.layers.items():
            for label, values in (
                ("running_mean", layer.running_mean),
                ("running_var", layer.running_var),
                ("gamma", layer.weight),
                ("beta", layer.bias),
            ):
                if values is not None:
                    write_histogram(trainer, f"bn/{name}/{label}", histogram_summary(values), step)

    def custom_scalars(self) -> Layout:
        """One chart per layer with its channels' trajectories, and the batch-vs-running gaps of all layers."""
        tracked = self._tracked()
        if not tracked:
            return {}
        return {
            f"BN {stat.replace('_', ' ')} per channel": {
                name: ["Multiline", [rf"{re.escape(f'bn/{name}/{stat}/')}ch\d+$"]] for name in tracked
            }
            for stat in ("running_mean", "running_var")
        } | {
            "BN batch vs running statistics": {
                "mean |batch mean - running mean|": ["Multiline", [exact(f"bn/{n}/mean_gap") for n in tracked]],
                "mean |batch mean - running mean| / running std": [
                    "Multiline", [exact(f"bn/{n}/mean_gap_std") for n in tracked]],
                "mean batch var / running var": ["Multiline", [exact(f"bn/{n}/var_ratio") for n in tracked]],
            }
        }


class ActivationMonitor(LayerMonitor):
    """Percentiles of the input of every activation (``ACTIVATIONS``: ``nn.Sigmoid``, ``nn.ReLU``...), with BN or without.

    Scalars per layer: ``act/<block>/unit/p15``, ``p50``, ``p85`` over one fixed unit's values
    across the batch (a channel and, for feature maps, a spatial position); ``act/<block>/layer/p15``,
    ``p50``, ``p85`` over all the layer's input values; ``act/<block>/mean`` and ``act/<block>/std``
    over them too. Histogram ``act/<block>`` of all the input values.

    The unit of each layer is drawn, the first time the layer is seen, from a ``torch.Generator``
    seeded with ``unit_seed`` and the block's name, never from the global RNG: every run with the
    same seed and network watches the same unit, and training draws the same random numbers as
    without the monitor. ``units`` holds them: block name -> (channel, *position).

    Args:
        every_n_steps: log the scalars on one training step in this many.
        histogram_every_n_steps: log the histograms on one step in this many; None for none.
        unit_seed: seed of the rule that picks each layer's unit.
    """

    layer_types = ACTIVATIONS
    role = "act"

    def __init__(self, every_n_steps: int = 100, histogram_every_n_steps: int | None = 200, unit_seed: int = 0) -> None:
        super().__init__(every_n_steps, histogram_every_n_steps)
        self.unit_seed = unit_seed
        self.units: dict[str, tuple[int, ...]] = {}

    def unit(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The (channel, *position) watched in block ``name`` whose input has ``shape`` (batch first)."""
        if name not in self.units:
            generator = torch.Generator().manual_seed(self.unit_seed + zlib.crc32(name.encode()))
            self.units[name] = tuple(int(torch.randint(size, (1,), generator=generator)) for size in shape[1:])
        return self.units[name]

    def _observer(self, name: str):
        scalars, histogram = self._scalars_now, self._histograms_now

        def observe(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach()
            observed = {}
            with torch.no_grad():
                if scalars:
                    values = x.flatten()
                    observed["unit"] = _percentiles(x[(slice(None), *self.unit(name, x.shape))])
                    observed["layer"] = _percentiles(values)
                    observed["std"], observed["mean"] = torch.std_mean(values)
                if histogram:
                    observed["histogram"] = histogram_summary(x)
            self._observed[name] = observed

        return observe

    def _log(self, trainer: Trainer, step: int) -> None:
        metrics = {}
        for name, observed in self._observed.items():
            for scope in ("unit", "layer"):
                if scope in observed:
                    metrics.update({f"act/{name}/{scope}/p{p}": v for p, v in zip(PERCENTILES, observed[scope])})
            for stat in ("mean", "std"):
                if stat in observed:
                    metrics[f"act/{name}/{stat}"] = observed[stat].item()
            if "histogram" in observed:
                write_histogram(trainer, f"act/{name}", observed["histogram"], step)
        if metrics:
            log_scalars(trainer, metrics, step)

    def custom_scalars(self) -> Layout:
        """Per layer, the unit's and the whole layer's percentile bands (p50 between p15 and p85), and mean and std."""
        if not self.layers:
            return {}

        def band(name: str, scope: str) -> list:
            return ["Margin", [f"act/{name}/{scope}/p{p}" for p in (PERCENTILES[1], PERCENTILES[0], PERCENTILES[2])]]

        return {
            "Activation input, one unit: p15 / p50 / p85": {name: band(name, "unit") for name in self.layers},
            "Activation input, whole layer: p15 / p50 / p85": {name: band(name, "layer") for name in self.layers},
            "Activation input, whole layer: mean and std": {
                name: ["Multiline", [exact(f"act/{name}/mean"), exact(f"act/{name}/std")]] for name in self.layers
            },
        }


class ExamplesPerSecond(EveryNSteps):
    """``perf/examples_per_sec``: training examples over the time since the last log.

    Time runs between consecutive training batches' ends (data loading, the step and any
    logging included); the gap before an epoch's first batch and after a validation run is left
    out. A resumed fit times its first batch from that batch's start, so that a step due to log
    right after the resume logs as it did in the stopped run. It never synchronizes the device:
    over ``every_n_steps`` steps the queue evens out.

    Args:
        every_n_steps: log on one training step in this many.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__(every_n_steps)
        self._step: int | None = None
        self._last_batch_end: float | None = None
        self._examples, self._seconds = 0, 0.0
        self._time_first_batch = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._examples, self._seconds = 0, 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._time_first_batch = trainer.global_step > 0  # resumed from a checkpoint

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_batch_end = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_batch_end = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._step = self.take_step(trainer)
        if self._time_first_batch:
            self._time_first_batch = False
            self._last_batch_end = perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = perf_counter()
        if self._last_batch_end is not None:
            self._examples += extract_batch_size(batch)
            self._seconds += now - self._last_batch_end
        self._last_batch_end = now
        if self._step is not None and self._seconds > 0:
            log_scalars(trainer, {"perf/examples_per_sec": self._examples / self._seconds}, self._step)
            self._examples, self._seconds = 0, 0.0

    def custom_scalars(self) -> Layout:
        return {"Training": {"examples per second": ["Multiline", [exact("perf/examples_per_sec")]]}}
