"""Training LeNet as a user does: our BN, torch's BN and no norm, eager and compiled (``model.compile``).

    python benchmarks/end_to_end.py [--data-dir ../shared/data] [--repeats 4] [--steps 300] [--epochs 10]

At batch 16 (the blog's, Adam lr 0.01) and 256 (the book's, SGD lr 1.0), every configuration trains ``--steps``
steps through Lightning's Trainer and the project's Classifier per repeat, the configurations interleaved.
The first repeat of each is its warm-up (a compiled one compiles there); the per-step time is the median
of every step of the others. "compile + warm-up" is the first repeat's time beyond that many steady steps;
"graphs" counts what ``torch.compile`` compiled in the first repeat and in all later ones (0: no
recompilation). A whole run of ``--epochs`` epochs is its steps times the step time, plus the compile;
"pays after" is how many epochs a compiled run needs to catch up with the eager one. The inductor's
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

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_IMAGES = 55_000
SETTINGS = {16: ("Adam", 0.01), 256: ("SGD", 1.0)}  # batch: optimizer, lr
NORMS = ("none", "scratch", "torch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--repeats", type=int, default=4, help="repeats per configuration, the first a warm-up")
    parser.add_argument("--steps", type=int, default=300, help="training steps per repeat")
    parser.add_argument("--epochs", type=int, default=10, help="the length of the whole run estimated")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--accelerator", default="cpu", help="Lightning's accelerator: cpu, or gpu on a GPU machine")
    parser.add_argument("--warm-cache", action="store_true", help="let torch.compile reuse its on-disk cache")
    return parser.parse_args()


ARGS = parse_args()
if not ARGS.warm_cache:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # read when torch is imported

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from bn_lightning._private import compiled_graphs  # noqa: E402
from bn_lightning.data import FashionMNISTDataModule  # noqa: E402
from bn_lightning.model import LeNet  # noqa: E402
from bn_lightning.module import Classifier  # noqa: E402
from common import markdown_table, write_results  # noqa: E402


class StepEnds(Callback):
    """When training started and when each step ended."""

    def __init__(self) -> None:
        self.start, self.ends = 0.0, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def train(norm: str, compiled: bool, batch: int, datamodule: FashionMNISTDataModule) -> tuple[float, list[float], int]:
    """``ARGS.steps`` steps of a fresh model: seconds from the start to the last step's end, the steps'
    durations (from the previous one's end) and the graphs compiled meanwhile."""
    name, lr = SETTINGS[batch]
    torch.manual_seed(0)
    model = Classifier(LeNet(norm), optimizer=partial(getattr(torch.optim, name), lr=lr), compile=compiled)
    record, graphs = StepEnds(), compiled_graphs()
    trainer = Trainer(max_steps=ARGS.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                      accelerator=ARGS.accelerator, devices=1)
    trainer.fit(model, datamodule=datamodule)
    ends = [record.start, *record.ends]
    return ends[-1] - ends[0], [b - a for a, b in zip(ends, ends[1:])], compiled_graphs() - graphs


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    configurations = [(norm, compiled) for norm in NORMS for compiled in (False, True)]
    rows, table = [], []
    for batch in ARGS.batch_sizes:
        torch.compiler.reset()  # each batch size compiles as a run of its own would, static at first
        datamodule = FashionMNISTDataModule(ARGS.data_dir, batch_size=batch, download=False, shuffle_seed=0)
        first, steps, graphs = {}, {c: [] for c in configurations}, {c: [0, 0] for c in configurations}
        for repeat in range(ARGS.repeats):
            for configuration in configurations:
                seconds, durations, compiled_now = train(*configuration, batch, datamodule)
                graphs[configuration][repeat > 0] += compiled_now
                if repeat == 0:
                    first[configuration] = seconds
                else:
                    steps[configuration] += durations
        step = {c: statistics.median(d) for c, d in steps.items()}
        reference = step["torch", False]
        steps_per_run = ARGS.epochs * math.ceil(TRAIN_IMAGES / batch)
        for norm in NORMS:
            eager, compiled = step[norm, False], step[norm, True]
            warmup = first[norm, True] - ARGS.steps * compiled
            run_eager, run_compiled = steps_per_run * eager, warmup + steps_per_run * compiled
            saved_per_epoch = (eager - compiled) * math.ceil(TRAIN_IMAGES / batch)
            pays_after = warmup / saved_per_epoch if saved_per_epoch > 0 else math.inf
            rows.append({"batch": batch, "norm": norm, "eager_step_s": eager, "compiled_step_s": compiled,
                         "eager_vs_torch_eager": eager / reference, "compiled_vs_torch_eager": compiled / reference,
                         "compile_s": warmup, "graphs_first_repeat": graphs[norm, True][0],
                         "graphs_later": graphs[norm, True][1], "run_eager_s": run_eager, "run_compiled_s": run_compiled,
                         "pays_after_epochs": pays_after})
            table.append([batch, norm, f"{eager * 1e3:.2f}", f"{eager / reference:.2f}x", f"{compiled * 1e3:.2f}",
                          f"{compiled / reference:.2f}x", f"{warmup:.1f}", f"{graphs[norm, True][0]} / {graphs[norm, True][1]}",
                          f"{run_eager / 60:.1f}", f"{run_compiled / 60:.1f}",
                          "never" if math.isinf(pays_after) else f"{pays_after:.1f}"])
    text = markdown_table(["batch", "norm", "eager ms/step", "eager / torch eager", "compiled ms/step",
                           "compiled / torch eager", "compile + warm-up s", "graphs (first / later repeats)",
                           f"{ARGS.epochs}-epoch run, eager min", "compiled min", "compiling pays after (epochs)"], table)
    print(f"LeNet through Lightning, {ARGS.steps} steps x {ARGS.repeats} interleaved repeats (the first a warm-up), "
          f"{ARGS.accelerator}, {torch.get_num_threads()} threads, inductor cache {'on' if ARGS.warm_cache else 'off'}")
    print(text)
    print("written", write_results("end_to_end", rows, text))


if __name__ == "__main__":
    main()
