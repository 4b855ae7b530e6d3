"""Precise BN against a direct computation over the whole data, torch's update_bn where they must agree,
and a real fit whose callback logs the accuracy with the moving averages and with precise statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.optim.swa_utils import update_bn

from bn_lightning import Classifier, FashionMNISTDataModule, LeNet
from bn_lightning.callbacks import PreciseBN
from bn_lightning.nn.precise_bn import update_bn_stats
from tests.helpers import scalars


def trained_lenet(norm: str, steps: int = 5) -> nn.Module:
    """A LeNet a few SGD steps from its initialization, so the moving averages lag its weights."""
    torch.manual_seed(0)
    net = LeNet(norm)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(steps):
        x, y = images(64, seed=100 + step)
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g) * 2 + 0.5, torch.randint(0, 10, (n,), generator=g)


def batches_of(n_batches: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [images(size, seed=i) for i in range(n_batches)]


def direct_statistics(net: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BN layer's inputs over every batch (the network in training mode, on a copy), concatenated:
    their mean and unbiased variance per channel, in float64."""
    net = copy.deepcopy(net).train()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in net.named_modules():
        if hasattr(module, "running_var"):
            module.register_forward_pre_hook(lambda m, inputs, name=name: seen.setdefault(name, []).append(inputs[0]))
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    found = {}
    for name, inputs in seen.items():
        x = torch.cat(inputs).double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
        found[name] = (x.mean(1), x.var(1, unbiased=True))
    return found


@pytest.mark.parametrize("norm", ["scratch", "torch", "noisy_bn"])
def test_the_statistics_are_the_mean_and_unbiased_variance_over_every_image(norm):
    net = trained_lenet(norm)
    batches = batches_of(5)
    expected = direct_statistics(net, batches)
    assert update_bn_stats(net, batches) == 160
    layers = {name: m for name, m in net.named_modules() if hasattr(m, "running_var")}
    assert sorted(layers) == sorted(expected) == ["conv1.norm", "conv2.norm", "fc1.norm", "fc2.norm"]
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_it_is_not_the_average_of_the_per_batch_variances():
    # torch's update_bn (momentum None: a plain average of the batches' statistics) agrees on the mean,
    # and on the variance only for one batch: over several it misses how the batch means differ.
    net = trained_lenet("torch")
    batches = batches_of(4)
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    update_bn_stats(ours, batches)
    update_bn(batches, theirs)
    torch.testing.assert_close(ours.fc1.norm.running_mean, theirs.fc1.norm.running_mean, rtol=1e-4, atol=1e-6)
    assert (ours.fc1.norm.running_var - theirs.fc1.norm.running_var).abs().max() > 1e-3

    whole = [(torch.cat([x for x, _ in batches]), None)]
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    update_bn_stats(ours, whole)
    update_bn(whole, theirs)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        ours_norm, theirs_norm = getattr(ours, layer).norm, getattr(theirs, layer).norm
        torch.testing.assert_close(ours_norm.running_mean, theirs_norm.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours_norm.running_var, theirs_norm.running_var, rtol=1e-4, atol=1e-6)


def test_it_changes_nothing_but_the_running_statistics():
    net = trained_lenet("noisy_bn")
    net.zero_grad(set_to_none=True)
    net.eval()
    net.fc1.train()
    before = copy.deepcopy(net.state_dict())
    modes = {name: m.training for name, m in net.named_modules()}
    momenta = {name: m.momentum for name, m in net.named_modules() if hasattr(m, "momentum")}
    update_bn_stats(net, (x for x, _ in batches_of(3)), num_batches=2)  # plain inputs, and only 2 batches
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert {name: m.momentum for name, m in net.named_modules() if hasattr(m, "momentum")} == momenta
    after = net.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {f"{layer}.norm.{stat}" for layer in ("conv1", "conv2", "fc1", "fc2")
                       for stat in ("running_mean", "running_var")}
    assert all(p.grad is None for p in net.parameters())
    # num_batches=2: the statistics of the first two batches only.
    expected = direct_statistics(trained_lenet("noisy_bn"), batches_of(2))
    torch.testing.assert_close(net.fc2.norm.running_var.double(), expected["fc2.norm"][1], rtol=1e-5, atol=1e-6)


def test_precise_statistics_evaluate_the_weights_better_than_a_lagging_moving_average():
    # After a few large steps the moving averages still hold statistics of the initial weights.
    net = trained_lenet("scratch", steps=8)
    x, _ = images(256, seed=999)
    net.train()
    with torch.no_grad():
        batch_output = net(x)
    net.eval()
    with torch.no_grad():
        ema_output = net(x)
        update_bn_stats(net, [x])
        precise_output = net(x)
    # Precise statistics are the batch's own, but for the unbiased variance (256/255); the moving averages are far off.
    assert 10 * (precise_output - batch_output).abs().max() < (ema_output - batch_output).abs().max()


def test_bad_input_says_what_was_wrong():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        update_bn_stats(LeNet("none"), batches_of(1))
    with pytest.raises(ValueError, match="got no batch"):
        update_bn_stats(LeNet("scratch"), [])
    with pytest.raises(ValueError, match="num_batches must be a positive"):
        update_bn_stats(LeNet("scratch"), batches_of(1), num_batches=0)
    with pytest.raises(ValueError, match="num_images"):
        PreciseBN(num_images=[1])
    with pytest.raises(ValueError, match="null for the last epoch only"):
        PreciseBN(every_n_epochs=0)


def test_the_callback_logs_the_accuracy_with_the_moving_averages_and_with_precise_statistics(tiny_data, tmp_path):
    seed_everything(0)
    module = Classifier(LeNet("scratch"), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    datamodule = FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40)
    trainer = Trainer(max_epochs=2, logger=TensorBoardLogger(tmp_path), callbacks=[PreciseBN(num_images=[64, 10_000])],
                      enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(module, datamodule)
    logged = scalars(trainer.logger.log_dir)
    # The moving averages' accuracy is the module's own validation accuracy, epoch by epoch.
    assert logged["precise_bn/val_acc_ema"] == pytest.approx(logged["val/acc"], abs=1e-6)
    assert len(logged["precise_bn/val_acc_64"]) == len(logged["precise_bn/val_acc_10000"]) == 2

    # 10,000 images is all 160 of this train set, in the callback's fixed order: the logged accuracy is that of
    # the final weights with the statistics of the whole train set; the module's own moving averages are untouched.
    ema = copy.deepcopy(module.net.state_dict())
    precise = copy.deepcopy(module.net)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(0))
    update_bn_stats(precise, [datamodule.train_set[chunk] for chunk in order.split(32)])
    correct = sum(int((precise.eval()(x).argmax(1) == y).sum()) for x, y in datamodule.val_dataloader())
    assert logged["precise_bn/val_acc_10000"][-1] == pytest.approx(correct / 40, abs=1e-6)
    assert all(torch.equal(ema[k], v) for k, v in module.net.state_dict().items())
    # Evaluated with each validation batch's own statistics (training mode), the final weights score:
    with torch.no_grad():
        batch_mode = copy.deepcopy(module.net).train()
        correct = sum(int((batch_mode(x).argmax(1) == y).sum()) for x, y in datamodule.val_dataloader())
    assert logged["precise_bn/val_acc_batch"][-1] == pytest.approx(correct / 40, abs=1e-6)


def test_with_no_period_the_callback_evaluates_the_final_weights_only(tiny_data, tmp_path):
    seed_everything(0)
    module = Classifier(LeNet("scratch"), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = Trainer(max_epochs=3, logger=TensorBoardLogger(tmp_path), callbacks=[PreciseBN([64], every_n_epochs=None)],
                      enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(module, FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40))
    logged = scalars(trainer.logger.log_dir)
    assert len(logged["val/acc"]) == 3 and len(logged["precise_bn/val_acc_64"]) == 1
    assert logged["precise_bn/val_acc_ema"] == pytest.approx(logged["val/acc"][-1:], abs=1e-6)


def test_the_callback_logs_nothing_for_a_network_without_batch_norm(tiny_data, tmp_path):
    seed_everything(0)
    module = Classifier(LeNet("group_norm"), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = Trainer(max_epochs=1, logger=TensorBoardLogger(tmp_path), callbacks=[PreciseBN(num_images=[64])],
                      enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1)
    trainer.fit(module, FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40))
    logged = scalars(trainer.logger.log_dir)
    assert "val/acc" in logged and not any(tag.startswith("precise_bn/") for tag in logged)
