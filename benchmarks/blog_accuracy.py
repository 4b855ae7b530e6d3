"""What evaluating in training mode did to the blog's reported accuracy: the same weights, evaluated three ways.

    python benchmarks/blog_accuracy.py [--seeds 0 1 2] [--epochs 5] [--train-steps N] [--precise-images 10000]
                                       [--norms blog_detach torch] [--device cpu] [--data-dir DIR]
                                       [--out results/blog_oom]

The blog's setting (bn_lightning.blog: Adam lr 0.01, batch 16, the 60,000 training images, 5 epochs) for
two networks built after the same seed: the blog's layer with its .detach() fix (numerically the blog's
layer, tests/test_blog.py checks it, with memory flat) and torch's BN with momentum 0.9. After every
epoch, on the 10,000 test images:

* blog test: the blog's test(), in training mode: each test batch of 16 normalized by its own statistics
  (and the running statistics overwritten as it goes). It runs last, so the other two see the running
  statistics as training left them; training itself never reads them;
* eval: eval mode and no_grad, with those running statistics (the new batch weighted 0.9);
* precise: eval after bn_lightning.nn.precise_bn.update_bn_stats over --precise-images training images
  (a fixed random subset, batches of 16), on a copy of the network. update_bn_stats finds BN layers by
  class, ours and torch's, and cannot see the blog's layer: this column is torch's BN's alone.

Mean ± sample std over the seeds. Writes accuracy.csv (every seed and epoch), accuracy.json and
accuracy.md to --out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from bn_lightning.blog import BATCH_SIZE as BATCH, EPOCHS, LR, batches, blog_lenet, load_fashion_mnist, test, train_epoch
from bn_lightning.nn.precise_bn import update_bn_stats
from common import add_blog_arguments, markdown_table, write_run_results

OUT = Path(__file__).resolve().parents[1] / "results" / "blog_oom"
COLUMNS = ("blog_test", "eval", "precise")


def run(norm: str, seed: int, train: tuple, test_set: tuple, precise: tuple | None, epochs: int,
        device: torch.device) -> list[dict]:
    torch.manual_seed(seed)
    net = blog_lenet(norm).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        losses = train_epoch(net, optimizer, *train, BATCH, generator)
        row = {"norm": norm, "seed": seed, "epoch": epoch, "train_loss": statistics.fmean(losses),
               "eval": test(net, *test_set, BATCH, proper=True), "precise": None}
        if precise is not None:
            copied = copy.deepcopy(net)
            update_bn_stats(copied, batches(*precise, BATCH))
            row["precise"] = test(copied, *test_set, BATCH, proper=True)
        row["blog_test"] = test(net, *test_set, BATCH)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        extra = "" if precise is None else f", precise {row['precise']:.4f}"
        print(f"  {norm:<12} seed {seed} epoch {epoch}: loss {row['train_loss']:.4f}, blog test "
              f"{row['blog_test']:.4f}, eval {row['eval']:.4f}{extra} ({row['seconds']:.0f} s)", flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--precise-images", type=int, default=10_000)
    parser.add_argument("--norms", nargs="+", default=["blog_detach", "torch"], choices=["blog_detach", "torch"])
    add_blog_arguments(parser, OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)  # batches of 16: one thread is as fast, and keeps its pace on a busy machine
    device = torch.device(args.device)
    train_images, train_labels = load_fashion_mnist(True, args.data_dir)
    test_images, test_labels = load_fashion_mnist(False, args.data_dir)
    subset = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))[:args.precise_images]
    precise = train_images[subset].to(device), train_labels[subset].to(device)
    n_train = len(train_labels) if args.train_steps is None else args.train_steps * BATCH
    train = train_images[:n_train].to(device), train_labels[:n_train].to(device)
    test_set = test_images.to(device), test_labels.to(device)

    rows = []
    for norm in args.norms:
        for seed in args.seeds:
            rows += run(norm, seed, train, test_set, precise if norm == "torch" else None, args.epochs, device)

    names = {"blog_test": "blog test (train mode)", "eval": "eval (running stats)", "precise": "eval (precise BN)"}
    header, table, summary = ["epoch"], [], []
    for norm in args.norms:
        header += [f"{norm}: {names[c]}" for c in COLUMNS if norm == "torch" or c != "precise"]
    for epoch in range(1, args.epochs + 1):
        cells = [epoch]
        for norm in args.norms:
            for column in COLUMNS:
                values = [r[column] for r in rows
                          if r["norm"] == norm and r["epoch"] == epoch and r[column] is not None]
                if values:
                    cells.append(mean_std(values))
                    summary.append({"norm": norm, "epoch": epoch, "column": column, "mean": statistics.fmean(values),
                                    "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)})
        table.append(cells)
    setting = (f"Test accuracy (%) on the 10,000 test images, mean ± std over seeds {args.seeds}; Adam lr {LR}, "
               f"batch {BATCH}, {len(train[1]):,} training images, {device}. blog_detach: the blog's layer with "
               f"the .detach() fix; torch: torch's BN, momentum 0.9. Precise BN: {args.precise_images:,} training "
               f"images, torch's BN only (update_bn_stats does not see the blog's layer).")
    text = markdown_table(header, table)
    print(setting)
    print(text)

    write_run_results(args.out, "accuracy", rows, args, {"summary": summary}, setting + "\n\n" + text)


if __name__ == "__main__":
    main()
