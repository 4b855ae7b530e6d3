"""What the BN doctor's callback costs: seconds per training step with BatchNormDoctor against the same fit without it.

    python benchmarks/doctor_overhead.py [--data-dir DIR] [--batches 100] [--repeats 5]

LeNet with our BN on the real Fashion-MNIST with Dive into Deep Learning's settings (SGD lr 1.0, batch 256),
in one process, no logger and no validation, so that the steps are all there is to time. Runs with and
without ``BatchNormDoctor()`` alternate (with, without, without, with, ...) after one short warm-up fit.
Reports, as medians over the runs' steps: the steps it watches (its first ``steps``, hooks on), the steps
after them (hooks removed: the target is a ratio within noise of 1), and the one-off check when fit ends
(``BN008``: precise statistics from 4,096 training images and two passes over the validation set),
against one epoch of training. Writes benchmarks/results/doctor_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from functools import partial

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from bn_lightning.doctor.callback import BatchNormDoctor
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir
from bn_lightning.training.module import Classifier
from common import markdown_table, write_results


class StepTimer(Callback):
    """Wall-clock seconds of each training step (batch start to batch end) and of the fit-end hooks."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.fit_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        self._end = time.perf_counter()  # on_fit_end hooks (the doctor's BN008) run after this

    def teardown(self, trainer, pl_module, stage) -> None:
        self.fit_end = time.perf_counter() - self._end


def fit(data: FashionMNISTDataModule, batches: int, doctor: BatchNormDoctor | None) -> StepTimer:
    seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer] if doctor is None else [doctor, timer]  # the doctor's fit-end check before the timer's
    trainer = Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=1.0,
                      num_sanity_val_steps=0, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(LeNet("scratch"), optimizer=partial(torch.optim.SGD, lr=1.0)), datamodule=data)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="torchvision root holding FashionMNIST/raw (default: resolve_data_dir)")
    parser.add_argument("--batches", type=int, default=100, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs with the doctor, and as many without")
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*|.*BN005.*")
    data = FashionMNISTDataModule(resolve_data_dir(args.data_dir), batch_size=256, download=False)
    watched = BatchNormDoctor().steps
    fit(data, 20, None)  # warm-up, not counted
    runs = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for mode in ("with", "without") if repeat % 2 == 0 else ("without", "with"):
            runs[mode].append(fit(data, args.batches, BatchNormDoctor() if mode == "with" else None))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: median step "
                  f"{statistics.median(runs[mode][-1].steps) * 1000:.1f} ms", flush=True)

    def median_step(mode: str, part: slice) -> float:
        return statistics.median(s for timer in runs[mode] for s in timer.steps[part])

    first, after = slice(0, watched), slice(watched + 5, None)  # 5 steps of margin after the hooks go
    epoch_steps = -(-55_000 // 256)
    fit_end = statistics.median(timer.fit_end for timer in runs["with"])
    rows = [{"part": "watched steps", "steps": watched, "with_s": median_step("with", first),
             "without_s": median_step("without", first)},
            {"part": "steps after", "steps": args.batches - watched - 5, "with_s": median_step("with", after),
             "without_s": median_step("without", after)}]
    for row in rows:
        row["ratio"] = row["with_s"] / row["without_s"]
    epoch = median_step("without", after) * epoch_steps
    rows.append({"part": "check at fit end (BN008)", "with_s": fit_end, "epoch_s": epoch, "ratio_to_epoch": fit_end / epoch})
    table = markdown_table(
        ["LeNet (BN scratch), SGD lr 1.0, batch 256", "median s", "without the doctor, median s", "ratio"],
        [[f"{rows[0]['part']} (its first {watched})", f"{rows[0]['with_s']:.4f}", f"{rows[0]['without_s']:.4f}",
          f"{rows[0]['ratio']:.3f}"],
         [f"**steps after them** ({rows[1]['steps']} per run)", f"{rows[1]['with_s']:.4f}", f"{rows[1]['without_s']:.4f}",
          f"**{rows[1]['ratio']:.3f}**"],
         ["check at fit end (BN008), once", f"{fit_end:.2f}", f"one epoch ({epoch_steps} steps): {epoch:.2f}",
          f"{fit_end / epoch:.3f} of an epoch"]])
    path = write_results("doctor_overhead", rows, table)
    print(f"\n{table}\n\nwritten to {path}")


if __name__ == "__main__":
    main()
