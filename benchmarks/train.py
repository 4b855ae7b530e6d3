"""One epoch of LeNet on Fashion-MNIST: Lightning's Trainer against a plain PyTorch loop.

    python benchmarks/train.py [--data-dir DIR] [--repeats 5] [--batches N]

For each norm, both run the same model init, batches and optimizer: their losses must agree
to 5 decimals (the parity check Lightning keeps for itself); the script prints the epoch-time
ratio per step (median of every step of every repeat: robust to a slow spell of a shared machine,
which moves whole-epoch times by 10%) and per epoch, runs interleaved, and the share of the plain
loop's time spent waiting for data. "loss-only" is Lightning's own floor: a module whose training step
computes the loss and nothing else (no metrics, no checks), against the same plain loop. Writes benchmarks/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import Classifier
from common import report

LR = {"none": 0.9, "scratch": 1.0, "torch": 1.0}  # Dive into Deep Learning's


def loader(dm: FashionMNISTDataModule, batches: int | None) -> DataLoader:
    """The DataModule's training loader with a freshly seeded shuffle: every call yields the same batches."""
    base = dm.train_dataloader()
    dataset = base.dataset if batches is None else base.dataset.subset(list(range(batches * base.batch_size)))
    return DataLoader(dataset, batch_size=base.batch_size, shuffle=True, collate_fn=base.collate_fn,
                      generator=torch.Generator().manual_seed(0))


class LossOnly(Classifier):
    """Lightning's own floor: a training step that computes the loss and nothing else."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_epoch_end(self) -> None:
        """No metric was updated, so none is computed (torchmetrics would warn)."""


def fresh_model(norm: str, cls: type[Classifier] = Classifier) -> Classifier:
    torch.manual_seed(0)
    return cls(LeNet(norm), optimizer=partial(torch.optim.SGD, lr=LR[norm]))


def gaps(ends: list[float]) -> list[float]:
    """Seconds from each step's end to the next one's: a whole step, data and hooks included."""
    return [b - a for a, b in zip(ends, ends[1:])]


def plain_epoch(norm: str, data: DataLoader) -> tuple[float, list[float], float, list[float]]:
    model = fresh_model(norm)
    optimizer = model.configure_optimizers()
    model.train()
    losses, ends, waiting = [], [], 0.0
    start = time.perf_counter()
    batches = iter(data)
    while True:
        fetch = time.perf_counter()
        batch = next(batches, None)
        waiting += time.perf_counter() - fetch
        if batch is None:
            break
        x, y = batch
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        # The metric sums Classifier.training_step keeps, without Lightning's logging.
        model.metrics["train_acc"].update(logits, y)
        model.metrics["train_loss"].update(loss.detach(), weight=y.numel())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        ends.append(time.perf_counter())
    return time.perf_counter() - start, gaps(ends), waiting, losses


class RecordEpoch(Callback):
    """Each step's loss and end, and the epoch's time from its first hook to its last (Trainer setup excluded)."""

    def __init__(self) -> None:
        self.losses, self.ends, self.start, self.seconds = [], [], 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.ends.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def lightning_epoch(
    norm: str, data: DataLoader, cls: type[Classifier] = Classifier
) -> tuple[float, list[float], list[float]]:
    model, record = fresh_model(norm, cls), RecordEpoch()
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[record], accelerator="cpu")
    trainer.fit(model, train_dataloaders=data)
    return record.seconds, gaps(record.ends), record.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="torchvision root (default: --data.data_dir's rule, resolve_data_dir)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch (default: the whole epoch)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the Trainer's banners, every repeat
    dm = FashionMNISTDataModule(resolve_data_dir(args.data_dir), batch_size=256, download=False)
    dm.prepare_data()
    dm.setup("fit")
    data = partial(loader, dm, args.batches)

    rows, table = [], []
    for norm in ("none", "scratch", "torch"):
        epochs = {"plain": [], "Lightning": [], "loss-only": []}
        steps = {"plain": [], "Lightning": [], "loss-only": []}
        data_shares = []
        for _ in range(args.repeats):
            seconds, step_gaps, waiting, plain_losses = plain_epoch(norm, data())
            epochs["plain"].append(seconds)
            steps["plain"] += step_gaps
            data_shares.append(waiting / seconds)
            seconds, step_gaps, lightning_losses = lightning_epoch(norm, data())
            epochs["Lightning"].append(seconds)
            steps["Lightning"] += step_gaps
            seconds, step_gaps, _ = lightning_epoch(norm, data(), LossOnly)
            epochs["loss-only"].append(seconds)
            steps["loss-only"] += step_gaps
        worst = max(abs(a - b) for a, b in zip(plain_losses, lightning_losses))
        assert len(plain_losses) == len(lightning_losses) and worst < 5e-6, f"losses differ by {worst}"
        epoch = {name: statistics.median(v) for name, v in epochs.items()}
        step = {name: statistics.median(v) for name, v in steps.items()}
        share = statistics.median(data_shares)
        rows.append({"norm": norm, "steps": len(plain_losses), "epoch_s": epoch, "step_s": step,
                     "data_share": share, "max_loss_difference": worst})
        table.append([norm, len(plain_losses), f"{step['plain'] * 1e3:.2f}", f"{step['Lightning'] * 1e3:.2f}",
                      f"{step['Lightning'] / step['plain']:.3f}x", f"{step['loss-only'] / step['plain']:.3f}x",
                      f"{epoch['Lightning'] / epoch['plain']:.3f}x", f"{100 * share:.2f}%", f"{worst:.1e}"])
    report("train", f"LeNet, batch 256, SGD, one epoch, median of {args.repeats} interleaved repeats, "
           f"{torch.get_num_threads()} threads",
           ["norm", "steps", "plain ms/step", "Lightning ms/step", "Lightning/plain", "loss-only Lightning/plain",
            "epoch time Lightning/plain", "data share of step", "max loss diff"], table, rows)


if __name__ == "__main__":
    main()
