"""The observability callbacks: what they find, what they log (checked against torch.quantile and the
layers' own statistics, read back from real event files), and that training runs as it would without them."""

import gc
import math
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bn_lightning import callbacks as cb
from bn_lightning.callbacks import tensorboard
from bn_lightning.training._private import forward_hook_count
from bn_lightning.nn.batchnorm import BATCH_NORMS
from bn_lightning.nn import batchnorm as scratch
from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import Classifier
from helpers import REPO

BLOCKS = ("conv1", "conv2", "fc1", "fc2")
PERCENTILE_TAGS = [f"{scope}/p{p}" for scope in ("unit", "layer") for p in (15, 50, 85)]


def fit(data, tmp_path, net, callbacks, max_steps=3):
    """Seeded training on the tiny data, 32 images a batch (5 batches an epoch), no validation."""
    seed_everything(0)
    trainer = Trainer(
        logger=TensorBoardLogger(tmp_path, name="run", default_hp_metric=False), callbacks=callbacks,
        max_steps=max_steps, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier(net)
    trainer.fit(model, datamodule=FashionMNISTDataModule(data, batch_size=32, val_size=40))
    return trainer, model


def logged(trainer) -> EventAccumulator:
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def values(events, tag) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}




class RecordInputs(Callback):
    """Test reference: clones of every BN and activation input, and the BN running stats before the batch."""

    def __init__(self):
        self.inputs, self.running, self.handles = {}, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        for kind, types in (("bn", BATCH_NORMS), ("act", cb.ACTIVATIONS)):
            for name, layer in cb.find_layers(pl_module, types, "norm" if kind == "bn" else "act").items():
                def record(layer, inputs, key=(step, kind, name)):
                    self.inputs[key] = inputs[0].detach().clone()
                    if key[1] == "bn":
                        self.running[key] = layer.running_mean.clone(), layer.running_var.clone()
                self.handles.append(layer.register_forward_pre_hook(record))

    def on_train_batch_end(self, *args):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def test_block_names_strip_the_network_and_the_role():
    assert cb.block_name("net.conv1.norm", "norm") == "conv1"
    assert cb.block_name("conv1.norm", "norm") == "conv1"
    assert cb.block_name("net.features.0.act", "act") == "features.0"
    assert cb.block_name("norm", "norm") == "norm"


def test_every_batch_norm_is_found_by_type_ours_and_torchs():
    net = nn.Sequential(OrderedDict(
        stem=nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3), norm=scratch.BatchNorm2d(4, momentum=None))),
        mixer=nn.BatchNorm2d(4),
        head=nn.Sequential(OrderedDict(flat=nn.Flatten(), norm=nn.LayerNorm(4), fc=nn.Linear(4, 3), bn=nn.BatchNorm1d(3))),
        deep=scratch.BatchNorm3d(2),
    ))
    found = cb.find_layers(net, BATCH_NORMS, "norm")
    assert {name: type(layer) for name, layer in found.items()} == {
        "stem": scratch.BatchNorm2d, "mixer": nn.BatchNorm2d, "head.bn": nn.BatchNorm1d, "deep": scratch.BatchNorm3d,
    }
    for norm in ("scratch", "torch"):
        assert list(cb.find_layers(Classifier(LeNet(norm)), BATCH_NORMS, "norm")) == list(BLOCKS)
    assert cb.find_layers(LeNet("none"), BATCH_NORMS, "norm") == {}
    assert list(cb.find_layers(Classifier(LeNet("none", activation="relu")), cb.ACTIVATIONS, "act")) == list(BLOCKS)


def test_narrow_layers_log_every_channel_and_wide_ones_an_even_subset():
    assert cb.channel_subset(16, all_up_to=16, sampled=8) == list(range(16))
    assert cb.channel_subset(120, all_up_to=16, sampled=8) == [0, 17, 34, 51, 68, 85, 102, 119]
    assert cb.channel_subset(84, all_up_to=16, sampled=4) == [0, 28, 55, 83]
    assert cb.channel_subset(84, all_up_to=16, sampled=1) == [0]


def test_histograms_bin_as_numpy_does_and_leave_out_non_finite_values():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    histogram = tensorboard.histogram_summary(x)
    counts, edges = np.histogram(x.numpy(), bins=tensorboard.HISTOGRAM_BINS)
    assert histogram["bucket_limits"] == pytest.approx(edges[1:].tolist(), abs=1e-6)
    assert np.abs(np.array(histogram["bucket_counts"]) - counts).sum() <= 2  # float32 edges may tip a value over
    assert (histogram["num"], histogram["min"], histogram["max"]) == (10_000, x.min().item(), x.max().item())
    assert histogram["sum"] == pytest.approx(x.sum().item(), rel=1e-5)
    assert histogram["sum_squares"] == pytest.approx(x.square().sum().item(), rel=1e-5)
    assert tensorboard.histogram_summary(torch.cat([x, torch.tensor([math.nan, math.inf, -math.inf])])) == histogram
    assert tensorboard.histogram_summary(torch.tensor([math.nan, math.inf])) is None

    constant = tensorboard.histogram_summary(torch.full((4,), 2.0))  # gamma at initialization: one value
    counts, edges = np.histogram(np.full(4, 2.0), bins=tensorboard.HISTOGRAM_BINS)
    assert constant["bucket_limits"] == pytest.approx(edges[1:].tolist())
    assert constant["bucket_counts"] == counts.tolist() and constant["min"] == constant["max"] == 2.0


@pytest.mark.parametrize("make, message", [
    (lambda: cb.BatchNormMonitor(every_n_steps=0), "BatchNormMonitor: every_n_steps must be a positive number, got 0"),
    (lambda: cb.BatchNormMonitor(all_channels_up_to=-1), "all_channels_up_to must be a positive number, got -1"),
    (lambda: cb.BatchNormMonitor(channels_sampled=0), "channels_sampled must be a positive number"),
    (lambda: cb.BatchNormMonitor(histogram_every_n_steps=-1), "histogram_every_n_steps must be a positive number"),
    (lambda: cb.ActivationMonitor(every_n_steps=-5), "ActivationMonitor: every_n_steps must be a positive number"),
    (lambda: cb.ActivationMonitor(histogram_every_n_steps=0), "histogram_every_n_steps must be a positive number"),
    (lambda: cb.ExamplesPerSecond(every_n_steps=0), "ExamplesPerSecond: every_n_steps must be a positive number"),
    (lambda: cb.TensorBoardComparison(metrics=[]), "metrics must name at least one scalar tag"),
])
def test_settings_are_checked_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("norm", ["none", "scratch", "torch", "batch_renorm", "group_norm", "layer_norm"])
def test_tags_for_runs_with_and_without_batch_norm(tiny_data, tmp_path, norm):
    monitors = [cb.BatchNormMonitor(every_n_steps=2, histogram_every_n_steps=3),
                cb.ActivationMonitor(every_n_steps=2, histogram_every_n_steps=3)]
    trainer, _ = fit(tiny_data, tmp_path, LeNet(norm), monitors, max_steps=5)
    events = logged(trainer)
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])

    act_scalars = {f"act/{b}/{t}" for b in BLOCKS for t in [*PERCENTILE_TAGS, "mean", "std"]}
    assert act_scalars <= scalars and {f"act/{b}" for b in BLOCKS} <= histograms
    assert all(values(events, tag).keys() == {0, 2, 4} for tag in act_scalars)
    assert all([e.step for e in events.Histograms(tag)] == [0, 3] for tag in histograms)  # step 3: histograms only
    bn_scalars = {tag for tag in scalars if tag.startswith("bn/")}
    bn_histograms = {tag for tag in histograms if tag.startswith("bn/")}
    if norm in ("none", "group_norm", "layer_norm"):  # no batch norm to monitor
        assert not bn_scalars and not bn_histograms
        return
    channels = {"conv1": [f"ch{c}" for c in range(6)], "conv2": [f"ch{c:02d}" for c in range(16)],
                "fc1": [f"ch{c:03d}" for c in (0, 17, 34, 51, 68, 85, 102, 119)],
                "fc2": [f"ch{c:02d}" for c in (0, 12, 24, 36, 47, 59, 71, 83)]}
    assert bn_scalars == (
        {f"bn/{b}/{stat}/{ch}" for b in BLOCKS for stat in ("running_mean", "running_var") for ch in channels[b]}
        | {f"bn/{b}/{gap}" for b in BLOCKS for gap in ("mean_gap", "mean_gap_std", "var_ratio")}
    )
    assert bn_histograms == {f"bn/{b}/{h}" for b in BLOCKS for h in ("running_mean", "running_var", "gamma", "beta")}
    assert all(values(events, tag).keys() == {0, 2, 4} for tag in bn_scalars)


@pytest.mark.parametrize("norm, momentum", [("scratch", 0.1), ("scratch", None), ("torch", None)])
def test_logged_numbers_equal_the_references(tiny_data, tmp_path, norm, momentum):
    net = LeNet(norm, activation="relu")
    for block in BLOCKS:
        getattr(net, block).norm.momentum = momentum
    bn_monitor, act_monitor, record = cb.BatchNormMonitor(every_n_steps=2), cb.ActivationMonitor(every_n_steps=2), RecordInputs()
    trainer, model = fit(tiny_data, tmp_path, net, [bn_monitor, act_monitor, record])
    events = logged(trainer)

    quantiles = torch.tensor([0.15, 0.5, 0.85])
    for step in (0, 2):
        for block in BLOCKS:
            x = record.inputs[step, "act", block]
            unit = x[(slice(None), *act_monitor.units[block])]
            expected = {**{f"unit/p{p}": v for p, v in zip((15, 50, 85), torch.quantile(unit, quantiles).tolist())},
                        **{f"layer/p{p}": v for p, v in zip((15, 50, 85), torch.quantile(x.flatten(), quantiles).tolist())},
                        "std": x.std().item(), "mean": x.mean().item()}
            for tag, value in expected.items():
                assert values(events, f"act/{block}/{tag}")[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, block, tag)

            x = record.inputs[step, "bn", block]
            running_mean, running_var = record.running[step, "bn", block]
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
            gap, ratio = (mean - running_mean).abs().mean().item(), (var / running_var).mean().item()
            gap_std = ((mean - running_mean).abs() / (running_var + 1e-5).sqrt()).mean().item()
            assert values(events, f"bn/{block}/mean_gap")[step] == pytest.approx(gap, rel=1e-5)
            assert values(events, f"bn/{block}/mean_gap_std")[step] == pytest.approx(gap_std, rel=1e-5)
            assert values(events, f"bn/{block}/var_ratio")[step] == pytest.approx(ratio, rel=1e-5)
    # The last step (2) was a logging one: what it logged is the layers' final state.
    conv2 = model.net.conv2.norm
    assert [values(events, f"bn/conv2/running_mean/ch{c:02d}")[2] for c in range(16)] == pytest.approx(conv2.running_mean.tolist())
    assert values(events, "bn/fc1/running_var/ch119")[2] == pytest.approx(model.net.fc1.norm.running_var[119].item())
    assert len(act_monitor.units["conv1"]) == 3 and len(act_monitor.units["fc1"]) == 1  # (channel, y, x) / (feature,)


def test_units_come_from_their_own_seeded_generator():
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    unit = cb.ActivationMonitor(unit_seed=3).unit("conv1", (256, 6, 24, 24))
    assert torch.equal(torch.get_rng_state(), rng)
    assert unit == cb.ActivationMonitor(unit_seed=3).unit("conv1", (32, 6, 24, 24))
    assert all(0 <= i < size for i, size in zip(unit, (6, 24, 24)))
    assert len({cb.ActivationMonitor(unit_seed=s).unit("conv1", (8, 6, 24, 24)) for s in range(10)}) > 1
    assert cb.ActivationMonitor(unit_seed=3).unit("fc1", (8, 120)) != cb.ActivationMonitor(unit_seed=3).unit("fc2", (8, 120))


def test_monitoring_every_step_leaves_training_unchanged(tiny_data, tmp_path):
    def train(callbacks):
        seed_everything(0)  # the same initial weights
        return fit(tiny_data, tmp_path, LeNet("scratch"), callbacks, max_steps=7)[1].state_dict()

    plain = train([])
    watched = train([cb.BatchNormMonitor(every_n_steps=1), cb.ExamplesPerSecond(every_n_steps=1),
                     cb.ActivationMonitor(every_n_steps=1, histogram_every_n_steps=1)])
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[key], watched[key]) for key in plain), [k for k in plain if not torch.equal(plain[k], watched[k])]


class CountHooks(Callback):
    def __init__(self):
        self.at_start = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append(forward_hook_count(pl_module))


def test_hooks_are_there_only_for_logging_steps_and_gone_after_fit(tiny_data, tmp_path):
    count = CountHooks()
    monitors = [cb.BatchNormMonitor(every_n_steps=2), cb.ActivationMonitor(every_n_steps=2, histogram_every_n_steps=None)]
    _, model = fit(tiny_data, tmp_path, LeNet("torch"), [*monitors, count], max_steps=5)
    assert count.at_start == [8, 0, 8, 0, 8]  # 4 BN layers and 4 activations, hooked on steps 0, 2, 4
    assert forward_hook_count(model) == 0


class FailAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            raise RuntimeError("step failed")


def test_hooks_are_removed_when_a_logging_step_fails(tiny_data, tmp_path):
    net = LeNet("scratch")
    with pytest.raises(RuntimeError, match="step failed"):
        fit(tiny_data, tmp_path, net, [cb.BatchNormMonitor(every_n_steps=2), cb.ActivationMonitor(every_n_steps=2), FailAtStep(2)])
    assert forward_hook_count(net) == 0


class WatchInputsDie(Callback):
    """Weak references to the memory of every monitored layer's input on step 1, checked on step 2: nothing
    may keep it, not even through a detached alias or a view."""

    def __init__(self):
        self.refs, self.handles, self.alive = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            for layer in pl_module.modules():
                if isinstance(layer, BATCH_NORMS + cb.ACTIVATIONS):
                    self.handles.append(layer.register_forward_pre_hook(lambda m, inputs: self.refs.append(weakref.ref(inputs[0].untyped_storage()))))
        if trainer.global_step == 2:
            gc.collect()
            self.alive = sum(ref() is not None for ref in self.refs)

    def on_train_batch_end(self, *args):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def test_monitors_keep_no_tensor_they_observed(tiny_data, tmp_path):
    watch = WatchInputsDie()
    monitors = [cb.BatchNormMonitor(every_n_steps=1), cb.ActivationMonitor(every_n_steps=1, histogram_every_n_steps=1)]
    fit(tiny_data, tmp_path, LeNet("scratch"), [*monitors, watch])
    assert len(watch.refs) == 8  # 4 BN layers and 4 activations
    assert watch.alive == 0


class PauseBetweenEpochs(Callback):
    def __init__(self, clock):
        self.clock = clock

    def on_train_epoch_start(self, trainer, pl_module):
        self.clock.now += 100.0  # a long pause that must not count


def test_examples_per_second_counts_only_time_between_training_batches(tiny_data, tmp_path, monkeypatch):
    class Clock:
        now = 0.0

        def __call__(self):
            self.now += 0.25
            return self.now

    clock = Clock()
    monkeypatch.setattr(cb.monitors, "perf_counter", clock)
    speed = cb.ExamplesPerSecond(every_n_steps=2)
    trainer, _ = fit(tiny_data, tmp_path, LeNet("none"), [PauseBetweenEpochs(clock), speed], max_steps=7)
    # 32 images each 0.25 s; step 0 starts the clock, step 5 (an epoch's first batch) restarts it.
    assert values(logged(trainer), "perf/examples_per_sec") == {2: 128.0, 4: 128.0, 6: 128.0}


class UsersResNet(LightningModule):
    """A user's own LightningModule around torchvision's ResNet-18 (no weights downloaded): nothing of ours."""

    def __init__(self):
        super().__init__()
        self.model = torchvision.models.resnet18(weights=None, num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_monitors_and_the_layout_work_in_a_users_module_around_torchvisions_resnet18(tmp_path):
    seed_everything(0)
    images = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,)))
    monitors = [cb.BatchNormMonitor(every_n_steps=1, histogram_every_n_steps=2),
                cb.ActivationMonitor(every_n_steps=1, histogram_every_n_steps=None), cb.TensorBoardComparison()]
    trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="resnet", default_hp_metric=False), callbacks=monitors,
                      max_steps=3, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = UsersResNet()
    trainer.fit(module, DataLoader(images, batch_size=8))
    norms = [name.removeprefix("model.") for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    relus = [name.removeprefix("model.") for name, m in module.named_modules() if isinstance(m, nn.ReLU)]
    assert len(norms) == 20 and list(monitors[0].layers) == [f"model.{n}" for n in norms]
    assert list(monitors[1].layers) == [f"model.{n}" for n in relus]
    events = logged(trainer)
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    for norm in ("model.bn1", "model.layer4.1.bn2", "model.layer2.0.downsample.1"):
        assert {f"bn/{norm}/{stat}" for stat in ("mean_gap", "mean_gap_std", "var_ratio")} <= scalars
        assert set(values(events, f"bn/{norm}/mean_gap")) == {0, 1, 2}
        assert any(tag.startswith(f"bn/{norm}/running_mean/ch") for tag in scalars) and f"bn/{norm}/gamma" in histograms
    # The first layer's logged running mean is the one torch's own layer holds after the step.
    assert values(events, "bn/model.bn1/running_mean/ch00")[2] == pytest.approx(module.model.bn1.running_mean[0].item())
    assert {f"act/model.{relu}/layer/p50" for relu in relus} <= scalars
    layout = monitors[2].layout(trainer)
    assert "model.layer3.0.bn1" in layout["BN running mean per channel"] and "model.relu" in layout[
        "Activation input, whole layer: mean and std"]
    assert forward_hook_count(module) == 0
