"""Lightning's progress bar, mended for resumed runs."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class ProgressBar(TQDMProgressBar):
    """``TQDMProgressBar``, with a fit resumed in the middle of an epoch showing that epoch and its total
    (Lightning sets them when an epoch starts, which a resumed one does not), and the run's version in full
    (Lightning shows its last four characters: ``on_1`` for ``version_1``)."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar.total is None and not str(bar.desc).startswith("Epoch"):  # an epoch Lightning did not start
            bar.reset(total=convert_inf(self.total_train_batches))
            bar.n = batch_idx
            bar.set_description(f"Epoch {trainer.current_epoch}")

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items and trainer.logger is not None:
            items["v_num"] = str(trainer.logger.version)
        return items
