"""Writing to TensorBoard: scalars to every logger, histograms reduced before they are kept, and the
custom-scalars layout and HParams session that put runs side by side (:class:`TensorBoardComparison`)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from bn_lightning.nn.registry import NORMS
from bn_lightning.training._private import write_summary

HISTOGRAM_BINS = 64
Layout = dict[str, dict[str, list]]  # SummaryWriter.add_custom_scalars': {category: {chart: [kind, tags]}}


def exact(tag: str) -> str:
    """A custom-scalars regex (matched from the tag's start) that takes ``tag`` alone."""
    return re.escape(tag) + "$"


def log_scalars(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def tensorboards(trainer: Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def resumed_in(trainer: Trainer, log_dir: str) -> bool:
    """Whether this fit resumes from a checkpoint inside ``log_dir`` (the CLI resumes a run in its own folder)."""
    return trainer.ckpt_path is not None and os.path.abspath(trainer.ckpt_path).startswith(
        os.path.join(os.path.abspath(log_dir), "")
    )


def histogram_summary(values: Tensor) -> dict | None:
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


def write_histogram(trainer: Trainer, tag: str, histogram: dict | None, step: int) -> None:
    if histogram is not None:
        for writer in tensorboards(trainer):
            writer.add_histogram_raw(tag, global_step=step, **histogram)


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
        writers = tensorboards(trainer)
        if not writers:
            rank_zero_warn("TensorBoardComparison writes nothing: the trainer has no TensorBoardLogger.")
            return
        layout = self.layout(trainer)
        hparams, domains = self.hparams(trainer, pl_module)
        summaries = hparams_summaries(hparams, dict.fromkeys(self.metrics, 0.0), domains)
        for writer in writers:
            if resumed_in(trainer, writer.log_dir):  # the stopped run wrote both at step 0 already
                continue
            writer.add_custom_scalars(layout)
            # What TensorBoardLogger.log_hyperparams writes, without its placeholder metric values.
            for summary in summaries:
                write_summary(writer, summary)

    def layout(self, trainer: Trainer) -> Layout:
        training = {
            "accuracy": ["Multiline", [exact(tag) for tag in ("train/acc_epoch", "val/acc", "test/acc")]],
            "loss": ["Multiline", [exact(tag) for tag in ("train/loss_epoch", "val/loss", "test/loss")]],
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
        for choice in ("norm", "activation", "pool"):  # TensorBoard gathers each one's values over the runs
            if choice in net:
                hparams[choice] = net[choice]
        if "norm" in net:
            domains["norm"] = list(NORMS)  # every choice, so a filter can show the norms no run has yet
        data = getattr(trainer.datamodule, "hparams", {})
        hparams |= {key: data[key] for key in ("batch_size", "shuffle_seed") if key in data}
        return hparams, domains
