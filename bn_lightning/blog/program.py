"""The blog post's program, short and faithful: the one this project started from, which ran out of memory.

The post took Dive into Deep Learning's batch-norm chapter: LeNet with a BN layer after every convolution
and linear layer, sigmoid, max pooling, Adam at lr 0.01, batches of 16, 5 epochs over the 60,000
training images, and after every epoch ``test()`` over the 10,000 test images, batches of 16 again. Two
things in it differ from the book, and together they hold memory that is never given back:

* its layer (:class:`BlogBatchNorm`) updates ``running_mean = alpha * mean + (1 - alpha) * running_mean``
  (and ``running_var`` alike) from the batch's ``mean`` and ``var``, which carry autograd history, and
  keeps the result as a plain attribute. Every layer's running statistics are the head of a graph that
  reaches back through the forward pass up to that layer, and through the previous running statistics
  to every forward before it (the book hands back ``moving_mean.data``, which has none);
* ``test()`` calls ``net(X)`` in training mode with autograd on: neither ``net.eval()`` nor
  ``torch.no_grad()``. No backward ever follows, so nothing frees what those forwards saved for one.

In training, the backward of each step frees the saved tensors of every node the running statistics
reach (the loss depends on ``mean`` and ``var`` too), and only the small nodes stay. A test forward's
saved tensors stay: the running statistics hold its graph, and the next batch's statistics hold this
one's, epoch after epoch: one forward's saved tensors up to the last BN's statistics for every test batch
(``benchmarks/blog_memory.py`` measures them, ``results/blog_oom/memory.md``).

Each of these fixes alone leaves no saved tensor held (measured there): ``.detach()`` on the new running statistics
(``BlogBatchNorm(detach=True)``); ``torch.no_grad()`` in ``test()``, with ``net.eval()`` (``test(proper=True)``)
or without; ``net.eval()`` alone (the layer then reads its running statistics and updates none); torch's
BN (``blog_lenet("torch")``), which updates its buffers in place, without history. Only the first and the
last also stop the chain of the training steps' autograd nodes, host memory that grows without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.data import load_fashion_mnist  # noqa: F401  (the blog's loader, named here too)

__all__ = ["BlogBatchNorm", "blog_lenet", "load_fashion_mnist", "batches", "train_epoch", "test"]

NORMS = ("blog", "blog_detach", "torch")
# The blog's setting: Adam lr 0.01, batches of 16 for training and test alike, 5 epochs.
BATCH_SIZE, LR, EPOCHS = 16, 0.01, 5


class BlogBatchNorm(nn.Module):
    """The blog's BN layer: batch statistics in training mode, running ones otherwise (``self.training``).

    ``alpha`` is the weight of the new batch in the running statistics (0.9, as the blog had it: torch's
    ``momentum``, not the book's). The variance is the biased one, in the running estimate too. The
    statistics are plain attributes, as in the book, so ``state_dict`` and ``.to()`` do not see them.
    ``detach=True`` is the one-line fix; it changes no number, only what the statistics keep alive.
    ``unbiased=True`` takes the running variance unbiased, by a separate ``X.var(correction=1)``: the fix of
    another mistake that, without ``detach``, keeps every step's input alive (notebook 02 measures it).
    """

    def __init__(self, num_features: int, num_dims: int, alpha: float = 0.9, eps: float = 1e-5,
                 detach: bool = False, unbiased: bool = False) -> None:
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma, self.beta = nn.Parameter(torch.ones(shape)), nn.Parameter(torch.zeros(shape))
        self.running_mean, self.running_var = torch.zeros(shape), torch.ones(shape)
        self.alpha, self.eps, self.detach, self.unbiased = alpha, eps, detach, unbiased

    @staticmethod
    def batch_statistics(X: Tensor) -> tuple[Tensor, Tensor]:
        dims = (0,) if X.dim() == 2 else (0, 2, 3)
        mean = X.mean(dim=dims, keepdim=True)
        var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
        return mean, var

    def forward(self, X: Tensor) -> Tensor:
        if self.running_mean.device != X.device:  # plain attributes: .to() leaves them behind (the book's fix)
            self.running_mean, self.running_var = self.running_mean.to(X.device), self.running_var.to(X.device)
        if self.training:
            mean, var = self.batch_statistics(X)
            dims = (0,) if X.dim() == 2 else (0, 2, 3)
            var_for_running = X.var(dim=dims, keepdim=True, correction=1) if self.unbiased else var
            self.running_mean = self.alpha * mean + (1 - self.alpha) * self.running_mean
            self.running_var = self.alpha * var_for_running + (1 - self.alpha) * self.running_var
            if self.detach:  # the fix
                self.running_mean, self.running_var = self.running_mean.detach(), self.running_var.detach()
        else:
            mean, var = self.running_mean, self.running_var
        X_hat = (X - mean) / torch.sqrt(var + self.eps)
        return self.gamma * X_hat + self.beta


def blog_lenet(norm: str = "blog") -> LeNet:
    """The blog's network: ``LeNet(norm="torch", pool="max")`` (the book's LeNet with BN before each
    sigmoid, max pooling, Xavier-uniform weights) with its BN layers made the blog's (``"blog"``), the
    blog's with the fix (``"blog_detach"``), or left torch's with ``momentum=0.9`` (``"torch"``), so that
    all three weight the new batch by 0.9. Built after the same seed, all three have the same weights."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    net = LeNet(norm="torch", pool="max")
    for block in (net.conv1, net.conv2, net.fc1, net.fc2):
        if norm == "torch":
            block.norm.momentum = 0.9
        else:
            num_dims = 4 if isinstance(block.norm, nn.BatchNorm2d) else 2
            block.norm = BlogBatchNorm(block.norm.num_features, num_dims, detach=norm == "blog_detach")
    return net


def batches(images: Tensor, labels: Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches as a DataLoader gives them: fresh tensors, shuffled when a (CPU) generator is given."""
    n = len(labels)
    order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    for index in order.to(images.device).split(batch_size):
        yield images[index], labels[index]


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                batch_size: int, generator: torch.Generator) -> list[float]:
    """One epoch of the blog's training loop; returns the loss of every step."""
    net.train()
    losses = []
    for X, y in batches(images, labels, batch_size, generator):
        loss = F.cross_entropy(net(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int, proper: bool = False,
         after_batch: Callable[[], None] | None = None) -> float:
    """Accuracy over the images. As the blog had it, ``net(X)`` in whatever mode ``net`` is in (training,
    after ``train_epoch``) with autograd on. ``proper=True`` evaluates in eval mode under
    ``torch.no_grad()`` and restores the mode. ``after_batch`` is called after every batch (to measure)."""
    was_training = net.training
    if proper:
        net.eval()
    correct = 0
    with torch.no_grad() if proper else contextlib.nullcontext():
        for X, y in batches(images, labels, batch_size):
            correct += int((net(X).argmax(1) == y).sum())
            if after_batch is not None:
                after_batch()
    net.train(was_training)
    return correct / len(labels)
