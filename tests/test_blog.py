"""The blog's program (bn_lightning.blog): what its test loop keeps alive, counted to the byte against sizes
worked out by hand; that each fix keeps nothing; that the one-line fix changes no number; and its layer's
statistics against their formula."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_lightning.blog import BlogBatchNorm, blog_lenet, load_fashion_mnist, train_epoch
from bn_lightning.blog import test as blog_test  # imported as test, pytest would collect it
from bn_lightning.blog.memory import SavedTensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from blog_memory import saved_by_one_forward  # noqa: E402

BATCH = 16


def held_per_test_batch(batch: int) -> int:
    """Bytes one train-mode forward of the blog's LeNet saves for backward, beyond the weights, up to the last
    BN layer's batch statistics: the part of its graph that layer's running statistics reach. Worked out op by
    op from torch's backward formulas; a storage saved by two ops counts once. float32, max-pool indices int64."""
    floats = (
        batch * 1 * 28 * 28  # conv1's input
        # BN1: X - mean (saved by pow), X - mean again and sqrt(var + eps) (by div), X_hat (by gamma *)
        + 3 * batch * 6 * 24 * 24 + 6
        + batch * 6 * 24 * 24  # sigmoid's output, which max pooling saves too
        + batch * 6 * 12 * 12  # conv2's input, the pooled maps
        + 3 * batch * 16 * 8 * 8 + 16  # BN2, as BN1
        + batch * 16 * 8 * 8  # sigmoid's output
        + batch * 256  # fc1's input, the pooled maps flattened
        + 3 * batch * 120 + 120  # BN3
        + batch * 120  # sigmoid's output, which is fc2's input
        + batch * 84  # BN4's statistics: only pow's X - mean; its normalization hangs from the output alone
    )
    indices = batch * 6 * 12 * 12 + batch * 16 * 4 * 4  # the two max poolings' argmax
    return 4 * floats + 8 * indices


def weights_held(net: nn.Module) -> int:
    """The parameters that graph saves: the weights of conv1, conv2, fc1, fc2 and the first three BN gammas."""
    saved = [net.conv1.affine.weight, net.conv2.affine.weight, net.fc1.affine.weight, net.fc2.affine.weight,
             net.conv1.norm.gamma, net.conv2.norm.gamma, net.fc1.norm.gamma]
    return sum(p.numel() * p.element_size() for p in saved)


def fake_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(autouse=True)
def one_thread():
    """Batches of 16 gain nothing from threads, and two threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blog_loop(norm: str, run_test, epochs: int = 2,
              test_batches: int = 4) -> tuple[list[list[int]], list[int], nn.Module]:
    """The blog's loop on fake data (2 training steps an epoch), all under the saved-tensor count: the
    bytes held after every test batch, one list per epoch, and after each epoch's training."""
    torch.manual_seed(0)
    net = blog_lenet(norm)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    train, test_set = fake_data(2 * BATCH, 0), fake_data(test_batches * BATCH, 1)
    saved, per_epoch, after_training = SavedTensors(), [], []
    with saved:
        for _ in range(epochs):
            train_epoch(net, optimizer, *train, BATCH, generator)
            after_training.append(saved.nbytes())
            held = []
            run_test(net, *test_set, BATCH, after_batch=lambda: held.append(saved.nbytes()))
            per_epoch.append(held)
    return per_epoch, after_training, net


def test_the_blogs_test_loop_holds_one_forward_per_test_batch_epoch_after_epoch():
    per_epoch, after_training, net = blog_loop("blog", blog_test)
    held = [b for epoch in per_epoch for b in epoch]
    expected = held_per_test_batch(BATCH)
    assert expected == 1_448_760
    assert after_training == [0, held[3]]  # training adds nothing: its backward frees what it saved
    assert held[0] == weights_held(net) + expected
    assert [b - a for a, b in zip(held, held[1:])] == [expected] * 7  # across the epoch boundary too


@pytest.mark.parametrize("batch", [4, BATCH])
def test_the_benchmarks_direct_count_agrees_with_the_sizes_worked_out_by_hand(batch):
    X = torch.rand(batch, 1, 28, 28)
    assert saved_by_one_forward(X, upto_last_statistics=True) == held_per_test_batch(batch)
    # The last BN's normalization (X - mean, sqrt, X_hat) and its sigmoid's output: what dies with the output.
    assert saved_by_one_forward(X, upto_last_statistics=False) == held_per_test_batch(batch) + 4 * (3 * batch * 84 + 84)


def eval_only(net, *args, **kwargs):
    net.eval()
    accuracy = blog_test(net, *args, **kwargs)
    net.train()
    return accuracy


def no_grad_only(net, *args, **kwargs):
    with torch.no_grad():
        return blog_test(net, *args, **kwargs)


@pytest.mark.parametrize("norm, run_test", [
    ("blog", lambda *args, **kwargs: blog_test(*args, proper=True, **kwargs)),  # eval + no_grad
    ("blog_detach", blog_test),
    ("torch", blog_test),
    ("blog", no_grad_only),
    ("blog", eval_only),
], ids=["eval+no_grad", "detach", "torch BN", "no_grad only", "eval only"])
def test_each_fix_holds_nothing(norm, run_test):
    per_epoch, after_training, _ = blog_loop(norm, run_test)
    assert after_training == [0, 0] and per_epoch == [[0] * 4] * 2


def test_the_count_frees_a_forward_whose_output_is_dropped():
    """A box holding the saved tensor itself would make a cycle with its node that gc cannot see: the
    graph of a forward without a backward would then look held by the count itself."""
    net, saved = blog_lenet("torch"), SavedTensors()
    with saved:
        out = net(torch.rand(BATCH, 1, 28, 28))
        assert saved.nbytes() > 0 and saved.count() > 0
        del out
    assert saved.nbytes() == 0 and saved.count() == 0


def test_the_detach_fix_changes_no_number():
    """The running statistics never enter a training-mode forward (batch statistics do) nor the loss:
    cutting their history leaves every gradient, loss and weight as it was, bit for bit."""
    results = []
    for norm in ("blog", "blog_detach"):
        torch.manual_seed(0)
        net = blog_lenet(norm)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(0)
        train, test_set = fake_data(4 * BATCH, 0), fake_data(2 * BATCH, 1)
        losses, accuracies = [], []
        for _ in range(2):
            losses += train_epoch(net, optimizer, *train, BATCH, generator)
            accuracies += [blog_test(net, *test_set, BATCH), blog_test(net, *test_set, BATCH, proper=True)]
        stats = [t.detach() for m in net.modules() if isinstance(m, BlogBatchNorm)
                 for t in (m.running_mean, m.running_var)]
        results.append((losses, accuracies, net.state_dict(), stats))
    (losses, accuracies, weights, stats), (losses_d, accuracies_d, weights_d, stats_d) = results
    assert losses == losses_d and accuracies == accuracies_d
    assert weights.keys() == weights_d.keys() and all(torch.equal(weights[k], weights_d[k]) for k in weights)
    assert all(torch.equal(a, b) for a, b in zip(stats, stats_d))


@pytest.mark.parametrize("shape", [(BATCH, 6, 5, 5), (BATCH, 84)])
def test_the_blog_layers_statistics_follow_its_formula(shape):
    """running = 0.9 * batch + 0.1 * running, the batch variance biased, in the running estimate too;
    training mode normalizes by the batch, eval mode by the running statistics."""
    torch.manual_seed(0)
    channels = shape[1]
    layer = BlogBatchNorm(channels, num_dims=len(shape))
    mean, var = torch.zeros(channels), torch.ones(channels)
    for step in range(3):
        x = 3 + 2 * torch.randn(shape)
        flat = x.transpose(0, 1).reshape(channels, -1)  # every value of a channel in one row
        y = layer(x)
        mean = 0.9 * flat.mean(1) + 0.1 * mean
        var = 0.9 * flat.var(1, correction=0) + 0.1 * var
        torch.testing.assert_close(layer.running_mean.flatten(), mean)
        torch.testing.assert_close(layer.running_var.flatten(), var)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True, eps=1e-5))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.batch_norm(x, mean, var, eps=1e-5))


def test_blog_lenet_weights_the_new_batch_by_0_9_and_starts_alike_whatever_the_norm():
    nets = {}
    for norm in ("blog", "blog_detach", "torch"):
        torch.manual_seed(0)
        nets[norm] = blog_lenet(norm)
    assert all(m.momentum == 0.9 for m in nets["torch"].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(m.alpha == 0.9 and m.detach == (norm == "blog_detach")
               for norm in ("blog", "blog_detach") for m in nets[norm].modules() if isinstance(m, BlogBatchNorm))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        weights = [getattr(net, name).affine.weight for net in nets.values()]
        assert all(torch.equal(weights[0], w) for w in weights[1:])
    assert isinstance(nets["blog"].conv1.pool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="unknown norm"):
        blog_lenet("scratch")


def test_load_fashion_mnist_scales_to_the_unit_interval(tiny_data):
    images, labels = load_fashion_mnist(False, tiny_data)
    assert images.shape == (60, 1, 28, 28) and images.dtype == torch.float32 and labels.shape == (60,)
    assert images.min() >= 0 and images.max() == 1
