"""What the observability callbacks cost: seconds per training epoch with all of them on versus all off.

    python benchmarks/logging_overhead.py [--data-dir DIR] [--epochs 1] [--batches N] [--repeats 5] [--probes]

LeNet with our BN on the real Fashion-MNIST with Dive into Deep Learning's settings (SGD lr 1.0,
batch 256), in one process. "on" runs get the callbacks exactly as bn_lightning/training/defaults.yaml
sets them; "off" runs get none; both log to TensorBoard as a run does. The two alternate
(on, off, off, on, ...) so that drifts in machine load hit both alike, after one short warm-up fit.
Validation is off, so an epoch is training only. Prints the median seconds per epoch of each and
their ratio (the target is at most 1.05). ``--probes`` also times each measurement callback of
bn_lightning/callbacks/probes.py on top of them, at the interval the comparisons that use it set (its ratio is to
"on"). Writes benchmarks/results/logging_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from bn_lightning.callbacks import probes
from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import Classifier
from common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bn_lightning" / "training" / "defaults.yaml"  # the callbacks every run has


class EpochTimer(Callback):
    """Wall-clock and CPU seconds (this process's threads) of each training epoch: on a machine that
    other work shares, the CPU seconds measure the work done, the wall clock also the waiting."""

    def __init__(self) -> None:
        self.seconds: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def configured_callbacks() -> list[Callback]:
    """The callbacks every run has, built from their class_path and init_args."""
    callbacks = []
    for spec in yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]:
        module, name = spec["class_path"].rsplit(".", 1)
        callbacks.append(getattr(importlib.import_module(module), name)(**spec.get("init_args", {})))
    return callbacks


# Each probe at the interval its comparisons (configs/compare/*.yaml) use.
PROBES = {
    "GradientICS every 100": lambda: probes.GradientICS(100),
    "LandscapeProbe every 100": lambda: probes.LandscapeProbe(100),
    "RepresentationProbe every 200": lambda: probes.RepresentationProbe(200),
    "WeightNormMonitor every 100": lambda: probes.WeightNormMonitor(100),
}


def epoch_seconds(data: FashionMNISTDataModule, logs: str, callbacks: list[Callback], epochs: int,
                  batches) -> list[tuple[float, float]]:
    seed_everything(0, verbose=False)
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, callbacks=[timer, *callbacks],
        logger=TensorBoardLogger(logs, name="bench", default_hp_metric=False), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Classifier(LeNet("scratch"), optimizer=partial(torch.optim.SGD, lr=1.0)), datamodule=data)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="torchvision root holding FashionMNIST/raw (default: resolve_data_dir)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch (default: the whole epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="runs with the callbacks on, and as many off")
    parser.add_argument("--probes", action="store_true", help="also time each probe on top of the callbacks")
    args = parser.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*|.*LeafSpec.*|.*smaller than the logging interval.*")
    data = FashionMNISTDataModule(resolve_data_dir(args.data_dir), batch_size=256, download=False)
    batches = 1.0 if args.batches is None else args.batches
    modes = ["on", "off", *(PROBES if args.probes else [])]
    seconds = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as logs:
        epoch_seconds(data, logs, configured_callbacks(), epochs=1, batches=20)  # warm-up, not counted
        for repeat in range(args.repeats):
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                callbacks = [] if mode == "off" else configured_callbacks()
                if mode in PROBES:
                    callbacks.append(PROBES[mode]())
                seconds[mode] += epoch_seconds(data, logs, callbacks, args.epochs, batches)
                print(f"repeat {repeat + 1}/{args.repeats}  {mode}: "
                      + ", ".join(f"{wall:.2f} s ({cpu:.2f} s CPU)" for wall, cpu in seconds[mode][-args.epochs:])
                      + " per epoch", flush=True)

    wall = {mode: statistics.median(w for w, _ in seconds[mode]) for mode in modes}
    cpu = {mode: statistics.median(c for _, c in seconds[mode]) for mode in modes}
    rows = [{"callbacks": mode, "median_seconds_per_epoch": wall[mode], "median_cpu_seconds_per_epoch": cpu[mode],
             "epochs": len(seconds[mode]), "batches_per_epoch": args.batches or "all"} for mode in modes]

    def ratio_row(label: str, mode: str, base: str, bold: bool = False) -> list[str]:
        cells = [f"{wall[mode] / wall[base]:.3f}", f"{cpu[mode] / cpu[base]:.3f}"]
        return [f"**{label}**", *(f"**{c}**" for c in cells), ""] if bold else [label, *cells, ""]

    table = markdown_table(
        ["LeNet (BN scratch), SGD lr 1.0, batch 256", "median s/epoch", "median CPU s/epoch", "epochs"],
        [[f"callbacks {row['callbacks']}", f"{wall[row['callbacks']]:.3f}", f"{cpu[row['callbacks']]:.3f}", row["epochs"]]
         for row in rows]
        + [ratio_row("on / off (target <= 1.05)", "on", "off", bold=True),
           *(ratio_row(f"on + {mode} / on", mode, "on") for mode in modes[2:])],
    )
    ratios = {f"ratio_{mode}_on": wall[mode] / wall["on"] for mode in modes[2:]}
    ratios |= {f"cpu_ratio_{mode}_on": cpu[mode] / cpu["on"] for mode in modes[2:]}
    on, off = wall["on"], wall["off"]
    ratios["cpu_ratio_on_off"] = cpu["on"] / cpu["off"]
    path = write_results("logging_overhead", [*rows, {"ratio_on_off": on / off, **ratios}], table)
    print(f"\n{table}\n\nwritten to {path}")

if __name__ == "__main__":
    main()
