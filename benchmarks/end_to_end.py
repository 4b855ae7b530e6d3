"""Training LeNet as a user does: our BN, torch's BN and no norm, eager and compiled (``model.compile``).

    python benchmarks/end_to_end.py [--data-dir DIR] [--repeats 4] [--steps 300] [--epochs 10]
    python benchmarks/end_to_end.py --accelerator gpu --modes default reduce-overhead --data host device

At batch 16 (the blog's, Adam lr 0.01) and 256 (the book's, SGD lr 1.0), every configuration trains ``--steps``
steps through Lightning's Trainer and the project's Classifier per repeat, the configurations interleaved.
The first repeat of each is its warm-up (a compiled one compiles there); the per-step time is the median
of every step of the others. "compile + warm-up" is the first repeat's time beyond that many steady steps;
"graphs" counts what ``torch.compile`` compiled in the first repeat and in all later ones (0: no
recompilation). A whole run of ``--epochs`` epochs is its steps times the step time, plus the compile;
"pays after" is how many epochs a compiled run needs to catch up with the eager one. ``--modes`` adds
``torch.compile`` modes (``reduce-overhead``: CUDA graphs on a GPU), ``--data device`` the DataModule's
``on_device`` (batches cut on the GPU) beside host batches copied over. The inductor's
on-disk cache is off unless ``--warm-cache``, so the compile time is a first run's. Writes
benchmarks/results/end_to_end.json and end_to_end.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from functools import partial
from pathlib import Path

TRAIN_IMAGES = 55_000
SETTINGS = {16: ("Adam", 0.01), 256: ("SGD", 1.0)}  # batch: optimizer, lr
NORMS = ("none", "scratch", "torch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="torchvision root (default: --data.data_dir's rule, resolve_data_dir)")
    parser.add_argument("--repeats", type=int, default=4, help="repeats per configuration, the first a warm-up")
    parser.add_argument("--steps", type=int, default=300, help="training steps per repeat")
    parser.add_argument("--epochs", type=int, default=10, help="the length of the whole run estimated")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator: cpu, or gpu on a GPU machine")
    parser.add_argument("--modes", nargs="+", default=["default"], help="torch.compile modes to compare with eager")
    parser.add_argument("--data", nargs="+", default=["host"], choices=["host", "device"],
                        help="where batches are cut: host memory (copied over each step) or on the device")
    parser.add_argument("--warm-cache", action="store_true", help="let torch.compile reuse its on-disk cache")
    return parser.parse_args()


ARGS = parse_args()
if not ARGS.warm_cache:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # read when torch is imported

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from bn_lightning.training._private import compiled_graphs  # noqa: E402
from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir  # noqa: E402
from bn_lightning.nn.lenet import LeNet  # noqa: E402
from bn_lightning.training.module import Classifier  # noqa: E402
from common import report  # noqa: E402


class StepEnds(Callback):
    """When training started and when each step ended."""

    def __init__(self) -> None:
        self.start, self.ends = 0.0, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def train(norm: str, compile: bool | str, batch: int, data: str) -> tuple[float, list[float], int]:
    """``ARGS.steps`` steps of a fresh model: seconds from the start to the last step's end, the steps'
    durations (from the previous one's end) and the graphs compiled meanwhile."""
    name, lr = SETTINGS[batch]
    torch.manual_seed(0)
    model = Classifier(LeNet(norm), optimizer=partial(getattr(torch.optim, name), lr=lr), compile=compile)
    datamodule = FashionMNISTDataModule(resolve_data_dir(ARGS.data_dir), batch_size=batch, download=False, shuffle_seed=0,
                                        on_device=data == "device")
    record, graphs = StepEnds(), compiled_graphs()
    trainer = Trainer(max_steps=ARGS.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                      accelerator=ARGS.accelerator, devices=1)
    trainer.fit(model, datamodule=datamodule)
    ends = [record.start, *record.ends]
    return ends[-1] - ends[0], [b - a for a, b in zip(ends, ends[1:])], compiled_graphs() - graphs


def label(compile: bool | str) -> str:
    return "eager" if compile is False else "compiled" if compile is True else f"compiled, {compile}"


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    compiles = [False, True, *(mode for mode in ARGS.modes if mode != "default")]
    configurations = [(norm, compile, data) for data in ARGS.data for norm in NORMS for compile in compiles]
    rows, table = [], []
    for batch in ARGS.batch_sizes:
        torch.compiler.reset()  # each batch size compiles as a run of its own would, static at first
        first, steps, graphs = {}, {c: [] for c in configurations}, {c: [0, 0] for c in configurations}
        for repeat in range(ARGS.repeats):
            for configuration in configurations:
                seconds, durations, compiled_now = train(*configuration[:2], batch, configuration[2])
                graphs[configuration][repeat > 0] += compiled_now
                if repeat == 0:
                    first[configuration] = seconds
                else:
                    steps[configuration] += durations
        step = {c: statistics.median(d) for c, d in steps.items()}
        reference = step["torch", False, ARGS.data[0]]
        steps_per_epoch = math.ceil(TRAIN_IMAGES / batch)
        for configuration in configurations:
            norm, compile, data = configuration
            seconds, eager = step[configuration], step[norm, False, data]
            warmup = max(first[configuration] - ARGS.steps * seconds, 0.0) if compile is not False else 0.0
            run = warmup + ARGS.epochs * steps_per_epoch * seconds
            saved_per_epoch = (eager - seconds) * steps_per_epoch
            pays_after = warmup / saved_per_epoch if saved_per_epoch > 0 else math.inf
            rows.append({"batch": batch, "norm": norm, "compile": compile, "data": data, "step_s": seconds,
                         "vs_torch_eager": seconds / reference, "compile_s": warmup,
                         "graphs_first_repeat": graphs[configuration][0], "graphs_later": graphs[configuration][1],
                         "run_s": run, "pays_after_epochs": pays_after if compile is not False else None})
            table.append([batch, norm, label(compile), data, f"{seconds * 1e3:.2f}", f"{seconds / reference:.2f}x",
                          f"{warmup:.1f}", f"{graphs[configuration][0]} / {graphs[configuration][1]}",
                          f"{run / 60:.1f}", "" if compile is False else "never" if math.isinf(pays_after)
                          else f"{pays_after:.1f}"])
    report("end_to_end", f"LeNet through Lightning, {ARGS.steps} steps x {ARGS.repeats} interleaved repeats (the first "
           f"a warm-up), {ARGS.accelerator}, {torch.get_num_threads()} threads, inductor cache "
           f"{'on' if ARGS.warm_cache else 'off'}",
           ["batch", "norm", "run", "batches cut on", "ms/step", f"/ torch eager ({ARGS.data[0]})", "compile + warm-up s",
            "graphs (first / later repeats)", f"{ARGS.epochs}-epoch run, min", "compiling pays after (epochs)"],
           table, rows)


if __name__ == "__main__":
    main()
