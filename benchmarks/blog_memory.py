"""Which line of the blog's program ran it out of memory: the saved tensors still held, test batch by test batch.

    python benchmarks/blog_memory.py [--train-steps N] [--test-images 10000] [--epochs 5] [--device cpu]
                                     [--data-dir DIR] [--out results/blog_oom]

The blog's loop (bn_lightning.blog: Adam lr 0.01, batches of 16, test() after every epoch) runs in six
variants: as written; test() with net.eval() and torch.no_grad(), with torch.no_grad() alone, with
net.eval() alone; the blog's layer with .detach() on its new running statistics; torch's BN. The whole
loop runs under bn_lightning.blog.memory.SavedTensors, which records the bytes of the tensors autograd
saved that some graph still holds, after every test batch and every epoch, with the RSS (and
torch.cuda.memory_allocated on cuda) beside them, each as growth since the variant began.

Growth per test batch is the slope of a linear fit over each epoch's test pass, per epoch the growth from
one epoch's end to the next, per training step the growth over an epoch's training; medians over
epochs. The bytes per test batch are checked against the tensors one forward saves, counted directly
with strong references, and everything is extrapolated to the blog's epoch (3,750 training steps, 625
test batches) and its 5 epochs. --train-steps and --test-images shorten a run; the slopes do not depend
on them. Writes memory.csv (every sample), memory.json and memory.md to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import math
import statistics
import time
from pathlib import Path

import torch

from bn_lightning.blog import BATCH_SIZE as BATCH
from bn_lightning.blog import EPOCHS as BLOG_EPOCHS
from bn_lightning.blog import LR, BlogBatchNorm, blog_lenet, load_fashion_mnist, test, train_epoch
from bn_lightning.blog.memory import SavedTensors, rss_bytes
from common import add_blog_arguments, markdown_table, write_run_results

OUT = Path(__file__).resolve().parents[1] / "results" / "blog_oom"
BLOG_TRAIN_STEPS, BLOG_TEST_BATCHES = 60_000 // BATCH, 10_000 // BATCH
MIB = 2**20


def eval_and_no_grad(net, *args, **kwargs):
    return test(net, *args, proper=True, **kwargs)


def no_grad_only(net, *args, **kwargs):
    with torch.no_grad():
        return test(net, *args, **kwargs)


def eval_only(net, *args, **kwargs):
    net.eval()
    try:
        return test(net, *args, **kwargs)
    finally:
        net.train()


# name: (norm, how test() is called)
VARIANTS = {
    "blog as written": ("blog", test),
    "test: eval + no_grad": ("blog", eval_and_no_grad),
    "test: no_grad only": ("blog", no_grad_only),
    "test: eval only": ("blog", eval_only),
    "layer: .detach()": ("blog_detach", test),
    "torch's BN": ("torch", test),
}


def release_free_memory() -> None:
    """Free what is unreachable and hand glibc's free heap pages back, so RSS starts each variant low."""
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def run(name: str, train: tuple, test_set: tuple, epochs: int, device: torch.device) -> list[dict]:
    """The blog's loop in one variant, every sample of what it holds."""
    norm, run_test = VARIANTS[name]
    release_free_memory()
    torch.manual_seed(0)
    net = blog_lenet(norm).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)
    saved, rows = SavedTensors(), []
    rss0, cuda0 = rss_bytes(), cuda_bytes(device)

    def record(epoch: int, point: str, test_batch: int | None = None) -> None:
        if test_batch is None:  # RSS at the ends of training and test: what stays, not what glibc keeps free
            release_free_memory()
        cuda = cuda_bytes(device)
        rows.append({"variant": name, "epoch": epoch, "point": point, "test_batch": test_batch,
                     "saved_bytes": saved.nbytes(), "rss_bytes": rss_bytes() - rss0,
                     "cuda_bytes": None if cuda is None else cuda - cuda0})

    start = time.perf_counter()
    with saved:
        for epoch in range(1, epochs + 1):
            train_epoch(net, optimizer, *train, BATCH, generator)
            record(epoch, "after training")
            counter = itertools.count(1)
            run_test(net, *test_set, BATCH, after_batch=lambda: record(epoch, "test batch", next(counter)))
            record(epoch, "after epoch")
    print(f"  {name:<22} {time.perf_counter() - start:6.1f} s", flush=True)
    del net, optimizer  # the blog's held graphs go with its running statistics
    return rows


def saved_by_one_forward(X: torch.Tensor, upto_last_statistics: bool) -> int:
    """Bytes of the tensors one training-mode forward of the blog's network saves for backward, kept by
    strong references and counted directly: each storage once, the parameters' left out (they exist
    anyway, and a held graph keeps them once however many batches it spans). With
    ``upto_last_statistics`` the forward stops once the last BN layer has its batch statistics: the part
    of the graph its running statistics depend on."""
    torch.manual_seed(0)
    net = blog_lenet("blog").to(X.device)
    kept = []

    def keep(tensor):
        kept.append(tensor.detach())
        return kept[-1]

    class Stop(Exception):
        pass

    def stop(layer, inputs):
        layer.batch_statistics(inputs[0])
        raise Stop

    last = [m for m in net.modules() if isinstance(m, BlogBatchNorm)][-1]
    handle = last.register_forward_pre_hook(stop) if upto_last_statistics else None
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        try:
            net(X)
        except Stop:
            pass
    if handle is not None:
        handle.remove()
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(size for ptr, size in storages.items() if ptr not in weights)


def median_slope(rows: list[dict], column: str) -> float:
    """Growth per test batch: a linear fit over each epoch's test pass, the median over epochs."""
    slopes = []
    for epoch in sorted({r["epoch"] for r in rows}):
        points = [(r["test_batch"], r[column]) for r in rows if r["epoch"] == epoch and r["point"] == "test batch"]
        if len(points) >= 2:
            slopes.append(statistics.linear_regression(*zip(*points)).slope)
    return statistics.median(slopes) if slopes else math.nan


def growth(rows: list[dict], column: str, train_steps: int) -> tuple[float, float]:
    """Median growth per training step (over an epoch's training) and per epoch (end to end), from the
    second epoch on: the first also holds the allocator's warm-up."""
    ends = [r[column] for r in rows if r["point"] == "after epoch"]
    trained = [r[column] for r in rows if r["point"] == "after training"][1:]
    per_step = statistics.median((t - e) / train_steps for t, e in zip(trained, ends))
    per_epoch = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    return per_step, per_epoch


def summarize(name: str, rows: list[dict], train_steps: int) -> dict:
    """Growth of each measure; saved tensors and CUDA memory, which add up epoch after epoch, also
    extrapolated to the blog's run: what stays once (the weights) plus 5 of its epochs."""
    summary, epochs = {"variant": name, "norm": VARIANTS[name][0]}, rows[-1]["epoch"]
    for column in ("saved_bytes", "rss_bytes", "cuda_bytes"):
        if rows[0][column] is None:
            continue
        per_batch = median_slope(rows, column)
        per_step, per_epoch = growth(rows, column, train_steps)
        m = summary[column] = {"at_end": rows[-1][column], "per_test_batch": per_batch, "per_train_step": per_step,
                               "per_epoch": per_epoch}
        if column != "rss_bytes":
            m["blog_per_epoch"] = BLOG_TRAIN_STEPS * per_step + BLOG_TEST_BATCHES * per_batch
            m["blog_after_5_epochs"] = m["at_end"] - epochs * per_epoch + BLOG_EPOCHS * m["blog_per_epoch"]
    return summary


def table(summaries: dict, column: str, extrapolate: bool) -> str:
    """One row per variant; with the blog's epoch and 5 epochs where growth adds up epoch after epoch."""
    header = ["variant", "at the end (MiB)", "per test batch (KiB)", "per training step (KiB)", "per epoch (MiB)"]
    rows = []
    for name, s in summaries.items():
        m = s[column]
        row = [name, f"{m['at_end'] / MIB:.1f}", f"{m['per_test_batch'] / 1024:.1f}",
               f"{m['per_train_step'] / 1024:.2f}", f"{m['per_epoch'] / MIB:.1f}"]
        if extrapolate:
            row += [f"{m['blog_per_epoch'] / MIB:.1f}", f"{m['blog_after_5_epochs'] / 2**30:.2f}"]
        rows.append(row)
    if extrapolate:
        header += ["blog's epoch (MiB)", "after the blog's 5 epochs (GiB)"]
    return markdown_table(header, rows)


def verdict(summaries: dict, one_forward: int, whole_forward: int) -> list[str]:
    """What the measurement shows, stated from its numbers."""
    saved = {name: s["saved_bytes"] for name, s in summaries.items()}
    blog = saved["blog as written"]
    flat = [name for name, b in saved.items() if b["at_end"] <= 0.001 * blog["at_end"]]
    same = round(blog["per_test_batch"]) == one_forward
    lines = [f"The blog as written holds {blog['per_test_batch']:,.0f} more bytes of saved tensors after every test "
             f"batch and {blog['per_train_step']:,.0f} per training step. One forward of a batch of {BATCH} saves "
             f"{one_forward:,} bytes beyond the weights up to the last BN layer's batch statistics (counted "
             f"directly): " + ("the same to the byte." if same else "they DIFFER.")
             + f" The rest of the forward, {whole_forward - one_forward:,} bytes (the last BN's normalization, its "
             f"sigmoid, the head's input), hangs only from the output, which test() drops."]
    if blog["per_test_batch"] > 0 and same and len(flat) == len(saved) - 1:
        lines.append(
            "Every other variant holds no saved tensor at the end, so each fix alone is enough. What grows is "
            "test()'s net(X), in training mode with autograd on, together with BlogBatchNorm's running-statistics "
            "update from a mean and var that carry history: no backward frees the test forwards' saved tensors, "
            "and the running statistics chain each test batch's graph to the next, so the whole test pass stays "
            "alive, epoch after epoch. torch.no_grad() alone suffices (the update then records nothing), and so "
            "does net.eval() alone (the layer then reads its running statistics and updates none).")
    else:
        lines.append(f"Variants holding no saved tensor at the end: {', '.join(flat) or 'none'}.")
    rss = {name: s["rss_bytes"] for name, s in summaries.items()}
    fixed = rss["test: eval + no_grad"]["per_train_step"]
    lines.append(
        "RSS per training step, after gc and malloc_trim: " + ", ".join(
            f"{name} {r['per_train_step'] / 1024:+.1f} KiB" for name, r in rss.items())
        + ". With the blog's layer the training steps' autograd nodes stay chained to the running statistics "
        "although no saved tensor does (notebook 02): host memory, which only .detach() or torch's BN stops "
        f"(the no_grad test pass cuts the chain once an epoch). With test: eval + no_grad that is "
        f"{fixed * BLOG_TRAIN_STEPS * BLOG_EPOCHS / 2**30:.2f} GiB over the blog's 5 epochs.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=BLOG_EPOCHS)
    add_blog_arguments(parser, OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)  # batches of 16: one thread is as fast, and keeps its pace on a busy machine
    if args.epochs < 2 or args.test_images < 2 * BATCH:
        parser.error("slopes need at least 2 epochs and 2 test batches")
    device = torch.device(args.device)
    train_images, train_labels = load_fashion_mnist(True, args.data_dir)
    test_images, test_labels = load_fashion_mnist(False, args.data_dir)
    n_train = len(train_labels) if args.train_steps is None else args.train_steps * BATCH
    train = train_images[:n_train].to(device), train_labels[:n_train].to(device)
    test_set = test_images[:args.test_images].to(device), test_labels[:args.test_images].to(device)
    train_steps = math.ceil(n_train / BATCH)
    print(f"{args.epochs} epochs of {train_steps} training steps and {math.ceil(args.test_images / BATCH)} "
          f"test batches of {BATCH}, on {device}", flush=True)

    X = test_set[0][:BATCH].clone()  # a batch of its own, as test() gets it: a view would count the whole set
    one_forward = saved_by_one_forward(X, upto_last_statistics=True)
    whole_forward = saved_by_one_forward(X, upto_last_statistics=False)
    rows, summaries = [], {}
    for name in VARIANTS:
        variant_rows = run(name, train, test_set, args.epochs, device)
        rows += variant_rows
        summaries[name] = summarize(name, variant_rows, train_steps)

    setting = (f"{args.epochs} epochs of {train_steps} training steps and {math.ceil(args.test_images / BATCH)} "
               f"test batches, batch {BATCH}, {device}. Growth per test batch: a linear fit over each test pass; per "
               f"training step and per epoch: from the second epoch on; medians over epochs. The blog's epoch: "
               f"{BLOG_TRAIN_STEPS} training steps and {BLOG_TEST_BATCHES} test batches.")
    labels = {"saved_bytes": "Saved tensors still held", "cuda_bytes": "torch.cuda.memory_allocated, growth",
              "rss_bytes": "RSS, growth (after gc and malloc_trim, except per test batch)"}
    text = "\n\n".join(f"{labels[c]}:\n\n{table(summaries, c, extrapolate=c != 'rss_bytes')}"
                        for c in labels if c in summaries["blog as written"])
    notes = verdict(summaries, one_forward, whole_forward)
    print(setting)
    print(text)
    print("\n".join(notes))

    summary = {"one_forward_saved_bytes_upto_last_statistics": one_forward, "one_forward_saved_bytes": whole_forward,
               "summaries": list(summaries.values())}
    write_run_results(args.out, "memory", rows, args, summary, setting + "\n\n" + text + "\n\n" + "\n\n".join(notes))


if __name__ == "__main__":
    main()
