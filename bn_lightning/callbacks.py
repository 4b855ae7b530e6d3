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

import os
import re
import zlib
from collections.abc import Sequence
from time import perf_counter

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor, nn
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from bn_lightning.nn import lenet as model
from bn_lightning.training._private import write_summary
from bn_lightning.nn.batchnorm import BATCH_NORMS

ACTIVATIONS = tuple(model.ACTIVATIONS.values())
PERCENTILES = (15, 50, 85)
HISTOGRAM_BINS = 64
Layout = dict[str, dict[str, list]]  # SummaryWriter.add_custom_scalars': {category: {chart: [kind, tags]}}


def block_name(qualified_name: str, role: str) -> str:
    """``net.conv1.norm`` -> ``conv1``: the block a layer sits in, as its tags and charts call it."""
    parts = qualified_name.split(".")
    if len(parts) > 1 and parts[0] == "net":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == role:
        parts = parts[:-1]
    return ".".join(parts)


def find_layers(root: nn.Module, types: tuple[type[nn.Module], ...], role: str) -> dict[str, nn.Module]:
    """Every submodule of one of ``types``, found by type (not by name), keyed by its block name."""
    return {block_name(name, role): module for name, module in root.named_modules() if isinstance(module, types)}


def channel_subset(width: int, all_up_to: int, sampled: int) -> list[int]:
    """Every channel of a layer up to ``all_up_to`` wide, else ``sampled`` evenly spaced ones, first and last included."""
    if width <= all_up_to:
        return list(range(width))
    return sorted({round(i * (width - 1) / max(sampled - 1, 1)) for i in range(sampled)})


def _positive(owner: object, name: str, value: int) -> int:
    if value <= 0:
        raise ValueError(f"{type(owner).__name__}: {name} must be a positive number, got {value}")
    return value


def _exact(tag: str) -> str:
    """A custom-scalars regex (matched from the tag's start) that takes ``tag`` alone."""
    return re.escape(tag) + "$"


def _log_scalars(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _tensorboards(trainer: Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def _resumed_in(trainer: Trainer, log_dir: str) -> bool:
    """Whether this fit resumes from a checkpoint inside ``log_dir`` (the CLI resumes a run in its own folder)."""
    return trainer.ckpt_path is not None and os.path.abspath(trainer.ckpt_path).startswith(
        os.path.join(os.path.abspath(log_dir), "")
    )


def _percentiles(values: Tensor) -> list[float]:
    """``PERCENTILES`` of ``values``, interpolated as ``torch.quantile`` does. On the CPU through numpy's
    selection, which takes half of ``torch.quantile``'s time there (30 ms on conv1's 885k inputs)."""
    values = values.float()
    if values.device.type == "cpu":
        return np.percentile(values.numpy(), PERCENTILES).tolist()
    return torch.quantile(values, torch.tensor(PERCENTILES, device=values.device) / 100).tolist()


def _histogram(values: Tensor) -> dict | None:
    """``values`` reduced to what ``SummaryWriter.add_histogram_raw`` takes, so the tensor need not be
    kept; non-finite values are left out (None if nothing is left), since a diverging run is worth watching.
    ``torch.histc`` over the values' range: a third of ``torch.histogram``'s time on the CPU."""
    values = values.detach().flatten().float()
    finite = values.isfinite()
    if not finite.all():
        values = values[finite]
    if values.numel() == 0:
        return None
    smallest, largest = (bound.item() for bound in torch.aminmax(values))
    # A single value gets a unit-wide range around it, as numpy.histogram gives it.
    low, high = (smallest, largest) if smallest < largest else (smallest - 0.5, largest + 0.5)
    counts = torch.histc(values, bins=HISTOGRAM_BINS, min=low, max=high)
    return {
        "min": smallest,
        "max": largest,
        "num": values.numel(),
        "sum": values.sum().item(),
        "sum_squares": values.square().sum().item(),
        "bucket_limits": torch.linspace(low, high, HISTOGRAM_BINS + 1)[1:].tolist(),
        "bucket_counts": counts.tolist(),
    }


def _write_histogram(trainer: Trainer, tag: str, histogram: dict | None, step: int) -> None:
    if histogram is not None:
        for writer in _tensorboards(trainer):
            writer.add_histogram_raw(tag, global_step=step, **histogram)


class _EveryNSteps(Callback):
    """Picks the training batches to log: the first batch of every ``every_n_steps``-th optimizer step
    (step 0, the untrained network, included), on global rank 0, when there is a logger to write to.

    Steps are ``trainer.global_step`` as it stands when the batch starts, the step at which
    Lightning logs that batch's ``train/loss_step``, so the charts line up.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = _positive(self, "every_n_steps", every_n_steps)
        self._last_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._last_step = None

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _take_step(self, trainer: Trainer) -> int | None:
        """The step this batch logs at, or None when it logs nothing (called at batch start)."""
        step = trainer.global_step
        if step == self._last_step or not (trainer.is_global_zero and trainer.loggers and self._due(step)):
            return None
        self._last_step = step
        return step


class _LayerMonitor(_EveryNSteps):
    """Finds its layers by type, hooks their input for the batches it logs and unhooks them when the batch
    ends (or when fit stops on an exception), so the batches in between run untouched."""

    layer_types: tuple[type[nn.Module], ...]
    role: str  # what the layer is called inside its block: ``conv1.norm`` -> ``conv1``

    def __init__(self, every_n_steps: int, histogram_every_n_steps: int | None) -> None:
        super().__init__(every_n_steps)
        if histogram_every_n_steps is not None:
            _positive(self, "histogram_every_n_steps", histogram_every_n_steps)
        self.histogram_every_n_steps = histogram_every_n_steps
        self.layers: dict[str, nn.Module] = {}
        self._step: int | None = None
        self._scalars_now = self._histograms_now = False
        self._handles: list = []
        self._observed: dict[str, object] = {}

    def _due(self, step: int) -> bool:
        return super()._due(step) or self._histogram_due(step)

    def _histogram_due(self, step: int) -> bool:
        return self.histogram_every_n_steps is not None and step % self.histogram_every_n_steps == 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.layers = find_layers(pl_module, self.layer_types, self.role)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._step = self._take_step(trainer)
        if self._step is not None:
            self._scalars_now, self._histograms_now = super()._due(self._step), self._histogram_due(self._step)
            self._handles = [
                layer.register_forward_pre_hook(self._observer(name)) for name, layer in self.layers.items()
            ]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._step is None:
            return
        self._log(trainer, self._step)
        self._stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        """Unhook the layers and drop what they observed."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._step, self._observed = [], None, {}

    def _observer(self, name: str):
        """A forward pre-hook that computes, from ``name``'s input, the numbers ``_log`` writes."""
        raise NotImplementedError

    def _log(self, trainer: Trainer, step: int) -> None:
        raise NotImplementedError


class BatchNormMonitor(_LayerMonitor):
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
        self.all_channels_up_to = _positive(self, "all_channels_up_to", all_channels_up_to)
        self.channels_sampled = _positive(self, "channels_sampled", channels_sampled)
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
            _log_scalars(trainer, metrics, step)
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
                    _write_histogram(trainer, f"bn/{name}/{label}", _histogram(values), step)

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
                "mean |batch mean - running mean|": ["Multiline", [_exact(f"bn/{n}/mean_gap") for n in tracked]],
                "mean |batch mean - running mean| / running std": [
                    "Multiline", [_exact(f"bn/{n}/mean_gap_std") for n in tracked]],
                "mean batch var / running var": ["Multiline", [_exact(f"bn/{n}/var_ratio") for n in tracked]],
            }
        }


class ActivationMonitor(_LayerMonitor):
    """Percentiles of the input of every activation (``nn.Sigmoid``, ``nn.ReLU``), with BN or without.

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
                    observed["histogram"] = _histogram(x)
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
                _write_histogram(trainer, f"act/{name}", observed["histogram"], step)
        if metrics:
            _log_scalars(trainer, metrics, step)

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
                name: ["Multiline", [_exact(f"act/{name}/mean"), _exact(f"act/{name}/std")]] for name in self.layers
            },
        }


class ExamplesPerSecond(_EveryNSteps):
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
        self._step = self._take_step(trainer)
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
            _log_scalars(trainer, {"perf/examples_per_sec": self._examples / self._seconds}, self._step)
            self._examples, self._seconds = 0, 0.0

    def custom_scalars(self) -> Layout:
        return {"Training": {"examples per second": ["Multiline", [_exact("perf/examples_per_sec")]]}}


class TensorBoardComparison(Callback):
    """Writes, once when fit starts, what TensorBoard needs to compare runs side by side.

    - A custom-scalars layout: accuracy, loss and learning rate of all runs in one chart each,
      then the charts of every other callback that has a ``custom_scalars()`` layout (the
      monitors here). It is written with ``SummaryWriter.add_custom_scalars`` at step 0 into
      the run's own event file, once: TensorBoard reads one layout per run.
    - An HParams session: norm, activation, pool, optimizer, lr, batch_size and shuffle_seed, with
      ``metrics`` (the last value logged under each tag) as the columns to compare.
      Set ``default_hp_metric: false`` on the TensorBoardLogger, so that Lightning does not
      write a session of its own with a placeholder ``hp_metric``.

    Args:
        metrics: scalar tags the HParams dashboard shows for each run.
    """

    def __init__(self, metrics: Sequence[str] = ("val/acc", "test/acc")) -> None:
        if not metrics:
            raise ValueError("TensorBoardComparison: metrics must name at least one scalar tag for the HParams dashboard")
        self.metrics = list(metrics)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        writers = _tensorboards(trainer)
        if not writers:
            rank_zero_warn("TensorBoardComparison writes nothing: the trainer has no TensorBoardLogger.")
            return
        layout = self.layout(trainer)
        hparams, domains = self.hparams(trainer, pl_module)
        summaries = hparams_summaries(hparams, dict.fromkeys(self.metrics, 0.0), domains)
        for writer in writers:
            if _resumed_in(trainer, writer.log_dir):  # the stopped run wrote both at step 0 already
                continue
            writer.add_custom_scalars(layout)
            # What TensorBoardLogger.log_hyperparams writes, without its placeholder metric values.
            for summary in summaries:
                write_summary(writer, summary)

    def layout(self, trainer: Trainer) -> Layout:
        training = {
            "accuracy": ["Multiline", [_exact(tag) for tag in ("train/acc_epoch", "val/acc", "test/acc")]],
            "loss": ["Multiline", [_exact(tag) for tag in ("train/loss_epoch", "val/loss", "test/loss")]],
        }
        if any(isinstance(callback, LearningRateMonitor) for callback in trainer.callbacks):
            training["learning rate"] = ["Multiline", ["lr-"]]
        layout = {"Training": training}
        for callback in trainer.callbacks:
            if hasattr(callback, "custom_scalars"):
                for category, charts in callback.custom_scalars().items():
                    layout.setdefault(category, {}).update(charts)
        return layout

    @staticmethod
    def hparams(trainer: Trainer, pl_module: LightningModule) -> tuple[dict, dict]:
        """The run's hyperparameters, and the choices of each discrete one (filters in the dashboard): the
        network's choices from the module's hyperparameters, batch size and training-order seed from the
        datamodule's (the CLI sets that seed to the run's ``seed_everything``), the optimizer as it runs."""
        optimizer = trainer.optimizers[0]
        hparams = {"optimizer": type(optimizer).__name__, "lr": optimizer.param_groups[0]["lr"]}
        domains = {}
        net = pl_module.hparams.get("net", {}).get("init_args", {})
        for choice, table in (("norm", model.NORMS), ("activation", model.ACTIVATIONS), ("pool", model.POOLS)):
            if choice in net:
                hparams[choice], domains[choice] = net[choice], list(table)
        data = getattr(trainer.datamodule, "hparams", {})
        hparams |= {key: data[key] for key in ("batch_size", "shuffle_seed") if key in data}
        return hparams, domains
