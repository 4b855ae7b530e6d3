"""The blog post this project started from, as a program (:mod:`.program`: its layer, its LeNet, its
training loop and its ``test()``), and what measures the memory it held (:mod:`.memory`).

``benchmarks/blog_memory.py`` and ``benchmarks/blog_accuracy.py`` run it and write ``results/blog_oom/``;
notebook 02 reads them. The blog's layer, :class:`BlogBatchNorm`, is the one copy the benchmarks and tests use.
"""

from bn_lightning.blog.memory import SavedTensors, rss_bytes
from bn_lightning.blog.program import (
    BATCH_SIZE, EPOCHS, LR, NORMS, BlogBatchNorm, batches, blog_lenet, load_fashion_mnist, test, train_epoch,
)

__all__ = [
    "BATCH_SIZE", "EPOCHS", "LR", "NORMS", "BlogBatchNorm", "SavedTensors", "batches", "blog_lenet",
    "load_fashion_mnist", "rss_bytes", "test", "train_epoch",
]
