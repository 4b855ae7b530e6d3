"""The BN doctor: each finding fires on a model with its mistake and stays silent on one without; the probe puts
the model back bit for bit; real models (torchvision's, ours, the blog's) get exactly the codes expected."""

import pytest
import torch
import torchvision
from torch import nn

from bn_lightning.blog.program import BlogBatchNorm, blog_lenet, test as blog_test, train_epoch
from bn_lightning.doctor import CODES, Finding, check, watch
from bn_lightning.doctor.checks import loader_findings, unsynchronized
from bn_lightning.doctor.cli import main as doctor_main
from bn_lightning.doctor.findings import anchor
from bn_lightning.nn import LeNet

from helpers import REPO


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


def conv_bn(bias: bool = False, **bn) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4, **bn), nn.ReLU())


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class EvalUpdating(nn.Module):
    """A hand-written BN that (wrongly) updates its running mean in evaluation mode too."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x):
        with torch.no_grad():
            self.running_mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)))
        return x - self.running_mean.view(1, -1, 1, 1)


# -- each finding: fires with the mistake, silent without --------------------------------------------------------
def test_bn001_watch_sees_a_training_mode_evaluation_under_no_grad_and_not_a_proper_one():
    model = conv_bn()
    with watch(model) as findings:
        with torch.no_grad():
            model(images())  # in training mode
    assert codes(findings) == {"BN001"} and "torch.no_grad()" in findings[0].message
    with watch(model.eval()) as findings:
        with torch.no_grad():
            model(images())
    assert findings == []


def test_bn001_watch_sees_a_forward_with_autograd_whose_output_gets_no_gradient_before_the_next_step():
    model = conv_bn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model) as findings:
        for _ in range(2):  # training: every forward's output gets its gradient
            model(images()).sum().backward()
            optimizer.step()
    assert findings == []
    with watch(model) as findings:
        model(images())  # the blog's test loop: training mode, autograd on, no backward
        model(images()).sum().backward()
        optimizer.step()
    assert codes(findings) == {"BN001"} and "no gradient" in findings[0].message


def test_bn002_and_bn003_the_blog_layer_and_its_fix():
    x = torch.randn(8, 3)  # through a weight: the batch statistics have autograd history

    def blog(**options):
        return nn.Sequential(nn.Linear(3, 4, bias=False), BlogBatchNorm(4, 2, **options))

    assert codes(check(blog(), x, ignore=["BN007"])) == {"BN002", "BN003"}
    assert codes(check(blog(detach=True), x, ignore=["BN007"])) == {"BN003"}  # no history, still attributes
    assert check(nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4)), x) == []


def test_bn003_is_seen_without_an_input_on_a_known_layer_holding_a_plain_tensor():
    layer = nn.BatchNorm1d(4)
    assert check(layer) == []
    layer.scale_history = torch.ones(4)
    assert [(f.code, f.message.split(":")[0]) for f in check(layer)] == [
        ("BN003", "its statistics (scale_history) are plain tensor attributes")]


def test_bn004_batches_too_small_for_batch_statistics():
    vectors = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
    (one,) = check(vectors, torch.randn(1, 3))  # torch raises on it; the probe reports why instead
    assert (one.code, one.severity) == ("BN004", "error")
    (two,) = check(vectors, torch.randn(2, 3))
    assert (two.code, two.severity) == ("BN004", "warning") and "+1 or -1" in two.message
    (single,) = check(conv_bn(), images(1))
    assert (single.code, single.severity) == ("BN004", "warning") and "instance normalization" in single.message
    assert check(vectors, torch.randn(4, 3)) == [] and check(conv_bn(), images(2)) == []


def test_bn004_a_loader_whose_last_batch_holds_one_image():
    data = torch.utils.data.TensorDataset(torch.randn(17, 3))
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
    (last,) = loader_findings(torch.utils.data.DataLoader(data, batch_size=16), model)
    assert last.code == "BN004" and "holds 1 of 17" in last.message
    assert loader_findings(torch.utils.data.DataLoader(data, batch_size=16, drop_last=True), model) == []
    assert loader_findings(torch.utils.data.DataLoader(data, batch_size=6), model) == []  # a last batch of 5
    assert loader_findings(torch.utils.data.DataLoader(data, batch_size=5), model) != []  # of 2 vectors


def test_bn005_a_bias_before_bn_by_the_probe_and_by_the_sequential_alone():
    for example in (images(), None):
        (found,) = check(conv_bn(bias=True), example)
        assert (found.code, found.layer) == ("BN005", "1") and "0, whose bias" in found.message
        assert check(conv_bn(bias=False), example) == []
    # an activation between them: the bias is not cancelled
    after = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert check(after, images()) == [] and check(after) == []


def test_bn006_frozen_parameters_with_statistics_that_still_move():
    model = conv_bn()
    model[1].requires_grad_(False)
    (found,) = check(model, images())
    assert (found.code, found.layer) == ("BN006", "1")
    model[1].eval()  # frozen properly: the probe's training step runs the model in training mode, as a loop would
    assert codes(check(model, images())) == {"BN006"}
    with watch(model) as findings:  # ...but watch sees the loop's modes: model.train() then the BN back to eval
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        model[1].eval()
        model(images()).sum().backward()
        optimizer.step()
    assert findings == []
    trainable = conv_bn()  # requires_grad, but not in the optimizer: not trained either
    optimizer = torch.optim.SGD(trainable[0].parameters(), lr=0.1)
    assert codes(check(trainable, images(), optimizer=optimizer)) == {"BN006"}
    assert check(trainable, images(), optimizer=torch.optim.SGD(trainable.parameters(), lr=0.1)) == []


def test_bn007_a_momentum_in_keras_convention_measured_and_read():
    assert codes(check(conv_bn(momentum=0.9), images())) == {"BN007"}
    assert codes(check(conv_bn(momentum=0.9))) == {"BN007"}  # without an input: the attribute
    assert check(conv_bn(momentum=0.1), images()) == [] and check(conv_bn(momentum=0.5), images()) == []
    (found,) = check(BlogBatchNorm(3, 4, detach=True), images(), ignore=["BN003"])  # no momentum attribute
    assert found.code == "BN007" and "0.90 of the way" in found.message


def test_bn009_small_per_process_batches_without_sync():
    model = conv_bn()
    assert codes(unsynchronized(model, 8, world_size=4)) == {"BN009"}
    assert unsynchronized(model, 16, world_size=4) == [] and unsynchronized(model, 8, world_size=1) == []
    assert unsynchronized(nn.SyncBatchNorm.convert_sync_batchnorm(model), 8, world_size=4) == []


def test_bn010_weight_decay_on_gamma_and_beta():
    model = conv_bn()
    decayed = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    assert [(f.code, f.layer) for f in check(model, optimizer=decayed)] == [("BN010", "1")]
    groups = torch.optim.SGD([{"params": model[0].parameters(), "weight_decay": 5e-4},
                              {"params": model[1].parameters(), "weight_decay": 0.0}], lr=0.1)
    assert check(model, optimizer=groups) == []


def test_bn011_lightnings_freeze_without_train_bn_leaves_stale_buffers():
    from lightning.pytorch.callbacks import BaseFinetuning

    model = conv_bn()
    BaseFinetuning.freeze(model, train_bn=False)
    assert codes(check(model, images())) == {"BN011"}
    assert check(conv_bn(track_running_stats=False), images()) == []  # no buffers: batch statistics throughout
    model = conv_bn()
    BaseFinetuning.freeze(model, train_bn=True)
    assert check(model, images()) == []


def test_bn012_a_cumulative_average_while_training():
    assert codes(check(conv_bn(momentum=None), images())) == {"BN012"}
    assert check(conv_bn(momentum=None).eval()) == []  # evaluated only: nothing accumulates


def test_bn013_statistics_updated_in_evaluation_mode():
    assert codes(check(EvalUpdating(3), images())) == {"BN013"}
    assert check(nn.BatchNorm2d(3), images()) == []


def test_bn014_dropout_right_before_bn_by_the_probe_and_by_the_sequential_alone():
    before = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Dropout(0.5), nn.BatchNorm2d(4))
    after = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Dropout(0.5))
    for example in (images(), None):
        assert [(f.code, f.layer) for f in check(before, example)] == [("BN014", "2")]
        assert check(after, example) == []


def test_ignore_takes_codes_and_code_layer_pairs_and_refuses_unknown_codes():
    model = conv_bn(bias=True, momentum=0.9)
    assert codes(check(model, images())) == {"BN005", "BN007"}
    assert codes(check(model, images(), ignore=["BN005"])) == {"BN007"}
    assert codes(check(model, images(), ignore=[("BN007", "1")])) == {"BN005"}
    assert codes(check(model, images(), ignore=[("BN007", "elsewhere")])) == {"BN005", "BN007"}
    with pytest.raises(ValueError, match="unknown code"):
        check(model, ignore=["BN099"])


def test_every_code_links_to_its_section_of_the_docs_page():
    page = (REPO / "docs" / "doctor.md").read_text()
    for code, (_, title) in CODES.items():
        assert f"## {code}: {title}\n" in page
        assert anchor(code).startswith(code.lower() + "-")


# -- the probe leaves the model as it was ---------------------------------------------------------------------
def test_the_probe_restores_state_dict_tensor_attributes_gradients_modes_and_rng_bit_for_bit():
    torch.manual_seed(0)
    net = blog_lenet()  # plain-attribute statistics with autograd history: cannot be deep-copied after a forward
    net(torch.randn(16, 1, 28, 28)).sum().backward()
    net.fc1.eval()  # mixed modes
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    attributes = {(name, key): value for name, m in net.named_modules() for key, value in vars(m).items()
                  if isinstance(value, torch.Tensor)}
    attribute_values = {k: v.detach().clone() for k, v in attributes.items()}
    grads = {name: p.grad for name, p in net.named_parameters()}
    grad_values = {name: g.clone() for name, g in grads.items()}
    modes = {name: m.training for name, m in net.named_modules()}
    example = torch.randn(16, 1, 28, 28)
    rng = torch.get_rng_state()

    assert codes(check(net, example)) == {"BN002", "BN003", "BN005", "BN007"}

    assert torch.equal(torch.get_rng_state(), rng)
    after_state = net.state_dict()
    assert after_state.keys() == before_state.keys()
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value), key
    for (name, key), value in attributes.items():
        now = getattr(net.get_submodule(name), key)
        assert now is value and torch.equal(now, attribute_values[name, key]), (name, key)
    for name, p in net.named_parameters():
        assert p.grad is grads[name] and torch.equal(p.grad, grad_values[name]), name
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_the_probe_restores_buffers_counters_and_rng_that_a_forward_with_dropout_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Dropout(0.5), nn.ReLU(), nn.BatchNorm2d(4))
    x = images()
    pending = model(x)  # a graph the caller built before the check, to backpropagate after it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    given = images().requires_grad_()
    assert check(model, given) == []
    assert torch.equal(torch.get_rng_state(), rng) and given.grad is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # num_batches_tracked too
    pending.sum().backward()  # no in-place change to what the graph saved


def test_the_probe_refuses_a_lazy_model_it_would_initialize():
    with pytest.raises(ValueError, match="lazy module"):
        check(nn.Sequential(nn.LazyConv2d(4, 3, bias=False), nn.LazyBatchNorm2d()), images())


def test_layers_with_state_that_are_not_batch_norms_are_not_taken_for_one():
    class Head(nn.Module):  # a Linear on (N, C, L): its bias is along L, which BatchNorm1d(C) does not cancel
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    assert check(Head(), torch.randn(8, 3, 5)) == []
    instance = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.InstanceNorm2d(4, track_running_stats=True))
    assert check(instance, images(1)) == []  # one image, normalized on its own: what instance norm is for
    spectral = nn.Sequential(nn.Linear(16, 16), nn.utils.parametrizations.spectral_norm(nn.Linear(16, 2)))
    assert check(spectral, torch.randn(8, 16)) == []  # its power iteration's state is not running statistics
    frozen = conv_bn().requires_grad_(False).eval()  # inference only: nothing trains, nothing to warn of
    assert check(frozen, images()) == []


# -- real models -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # about a second each to build, more to probe
@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small],
                         ids=["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_are_clean(factory):
    torch.manual_seed(0)
    model = factory()  # no weights: nothing downloaded
    assert check(model, torch.randn(2, 3, 64, 64)) == []
    assert check(nn.SyncBatchNorm.convert_sync_batchnorm(model), torch.randn(2, 3, 64, 64)) == []


@pytest.mark.parametrize("norm", ["scratch", "torch", "batch_renorm", "noisy_bn"])
def test_our_lenet_keeps_the_books_biases_so_bn005_only(norm):
    torch.manual_seed(0)
    found = check(LeNet(norm=norm), torch.randn(8, 1, 28, 28))
    assert [(f.code, f.layer) for f in found] == [("BN005", f"{b}.norm") for b in ("conv1", "conv2", "fc1", "fc2")]


def test_the_blogs_program_under_watch_gets_exactly_its_mistakes():
    torch.manual_seed(0)
    net = blog_lenet()
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    with watch(net) as findings:
        for _ in range(2):
            train_epoch(net, optimizer, x, y, 16, torch.Generator().manual_seed(0))
            blog_test(net, x, y, 16)  # training mode, autograd on: the blog's test loop
    assert codes(findings) == {"BN001", "BN002", "BN003", "BN005", "BN007"}
    fixed = blog_lenet("blog_detach")
    optimizer = torch.optim.Adam(fixed.parameters(), lr=0.01)
    with watch(fixed) as findings:
        train_epoch(fixed, optimizer, x, y, 16, torch.Generator().manual_seed(0))
        blog_test(fixed, x, y, 16, proper=True)
    assert codes(findings) == {"BN003", "BN005", "BN007"}


# -- the command ----------------------------------------------------------------------------------------------
def test_the_command_prints_a_table_and_exits_1_on_an_error_finding(capsys):
    assert doctor_main(["bn_lightning.blog.program:blog_lenet", "--input-shape", "16", "1", "28", "28"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["code", "severity", "layers", "what", "is", "wrong"]
    assert "BN002  error    conv1.norm, conv2.norm, fc1.norm, fc2.norm  its running statistics" in out
    assert "How to fix:" in out
    assert doctor_main(["bn_lightning.nn:LeNet", "--input-shape", "2", "1", "28", "28"]) == 0  # no norm: clean
    assert capsys.readouterr().out.startswith("No batch-norm mistake found.")


@pytest.mark.parametrize("args, message", [
    (["nowhere_module:f"], "cannot import 'nowhere_module'"),
    (["torchvision.models"], "is not MODULE:FACTORY"),
    (["torchvision.models:resnet99"], "has no attribute 'resnet99'"),
    (["bn_lightning.nn:LeNet", "--input-shape", "2", "3"], "the probe's training-mode forward"),
    (["bn_lightning.nn:LeNet", "--ignore", "BN100"], "--ignore BN100"),
    (["bn_lightning.nn:LeNet", "--input-shape", "0", "1", "28", "28"], "every dimension must be positive"),
])
def test_the_command_answers_bad_input_with_one_error_line(capsys, args, message):
    assert doctor_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# -- the Lightning callback -------------------------------------------------------------------------------------
def lightning():
    import lightning.pytorch as pl

    from bn_lightning.doctor import BatchNormDoctor

    return pl, BatchNormDoctor


def signal_data(n: int, seed: int, offset: float = 3.0) -> torch.utils.data.TensorDataset:
    """Two classes told apart by the sign of the first channel's mean, on top of an offset BN must remove."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + offset
    x[:, 0] += (2 * labels - 1).view(-1, 1, 1).float()
    return torch.utils.data.TensorDataset(x, labels)


class Tiny:
    """A LightningModule around a backbone (conv and BN) and a head, made on demand (Lightning loads lazily)."""

    @staticmethod
    def make(lr: float = 0.1, train_in_validation: bool = False, momentum: float = 0.1, trainable_only: bool = False):
        pl, _ = lightning()

        class TinyModule(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.backbone = conv_bn(momentum=momentum)
                self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

            def forward(self, x):
                return self.head(self.backbone(x))

            def training_step(self, batch, _):
                return nn.functional.cross_entropy(self(batch[0]), batch[1])

            def validation_step(self, batch, _):
                if train_in_validation:
                    self.train()  # the mistake
                self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

            def configure_optimizers(self):
                parameters = [p for p in self.parameters() if p.requires_grad] if trainable_only else self.parameters()
                return torch.optim.SGD(parameters, lr=lr)

        return TinyModule()


def fit(module, *callbacks, epochs: int = 1, n: int = 64, batch_size: int = 16):
    pl, _ = lightning()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu", devices=1)
    loader = torch.utils.data.DataLoader(signal_data(n, 0), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(signal_data(256, 1), batch_size=64)
    trainer.fit(module, loader, val)
    return trainer


def test_the_callback_sees_a_training_mode_validation_and_then_stays_out_of_the_way():
    torch.manual_seed(0)
    pl, BatchNormDoctor = lightning()
    doctor = BatchNormDoctor(steps=2, precise_images=0)
    hooked = []

    class Hooks(pl.Callback):  # after the doctor's steps, before validation: are its hooks still there?
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            hooked.append(len(doctor._observer._handles))

    with pytest.warns(UserWarning, match="BN001"):
        fit(Tiny.make(train_in_validation=True), doctor, Hooks())
    assert [(f.code, f.layer) for f in doctor.findings] == [("BN001", "backbone.1")]
    assert "during validation" in doctor.findings[0].message
    assert hooked[0] > 0 and hooked[2:] == [0, 0]  # hooked for its 2 steps, then out of the way
    clean = BatchNormDoctor(steps=2, precise_images=0)
    fit(Tiny.make(), clean)
    assert clean.findings == []
    hooked.clear()  # the same callback in a second fit looks again (reporting nothing twice), then leaves again
    fit(Tiny.make(train_in_validation=True), doctor, Hooks())
    assert hooked[0] > 0 and hooked[2:] == [0, 0] and len(doctor.findings) == 1


@pytest.mark.slow
def test_the_callback_in_strict_mode_fails_the_fit_on_an_error():
    pl, BatchNormDoctor = lightning()
    from bn_lightning.doctor.callback import BatchNormMistake

    module = Tiny.make()
    module.backbone[1] = BlogBatchNorm(4, 4, alpha=0.1)
    with pytest.raises(BatchNormMistake, match="BN002"):
        fit(module, BatchNormDoctor(strict=True, precise_images=0))


@pytest.mark.slow
def test_the_callback_on_fine_tuning_set_ups():
    from lightning.pytorch.callbacks import BackboneFinetuning

    _, BatchNormDoctor = lightning()
    torch.manual_seed(0)
    doctor = BatchNormDoctor(precise_images=0)  # Lightning's BackboneFinetuning at its defaults
    fit(Tiny.make(trainable_only=True), BackboneFinetuning(), doctor)
    assert doctor.findings == []
    module = Tiny.make(trainable_only=True)  # the backbone's BN frozen by hand, left in training mode
    module.backbone.requires_grad_(False)
    doctor = BatchNormDoctor(precise_images=0)
    fit(module, doctor)
    assert [(f.code, f.layer) for f in doctor.findings] == [("BN006", "backbone.1")]
    module = Tiny.make(trainable_only=True)  # frozen with BaseFinetuning.freeze(train_bn=False)
    BackboneFinetuning.freeze(module.backbone, train_bn=False)
    doctor = BatchNormDoctor(precise_images=0)
    fit(module, doctor)
    assert [(f.code, f.layer) for f in doctor.findings] == [("BN011", "backbone.1")]


@pytest.mark.slow
def test_the_callback_measures_lagging_running_statistics():
    _, BatchNormDoctor = lightning()
    torch.manual_seed(0)
    lagging = BatchNormDoctor(precise_images=4096)  # momentum 0.001: the running statistics stay near 0 and 1
    fit(Tiny.make(lr=0.5, momentum=0.001), lagging, epochs=3, n=512)
    assert [f.code for f in lagging.findings] == ["BN008"]
    torch.manual_seed(0)
    caught_up = BatchNormDoctor(precise_images=4096)  # lr 0: weights fixed, the moving average has converged
    fit(Tiny.make(lr=0.0), caught_up, epochs=3, n=512)
    assert caught_up.findings == []


@pytest.mark.slow
@pytest.mark.parametrize("sync", [False, True], ids=["per-process", "synchronized"])
def test_the_callback_under_ddp_wants_synchronized_statistics_for_small_per_process_batches(tiny_data, tmp_path, sync):
    import os
    import subprocess
    import sys

    args = ["fit", "--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
            "--data.batch_size=8", "--data.val_size=40", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
            "--trainer.devices=2", f"--trainer.sync_batchnorm={str(sync).lower()}", "--test_after_fit=false",
            "--trainer.callbacks+=bn_lightning.doctor.callback.BatchNormDoctor",
            "--trainer.callbacks.precise_images=0"]
    fit = subprocess.run([sys.executable, "-m", "bn_lightning", *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    reported = [line for line in fit.stderr.splitlines() if "BN009 (warning)" in line]
    if sync:
        assert reported == []
    else:  # 8 images a process, four BN layers, reported once each by rank zero
        assert len(reported) == 4 and all("2 processes with 8 images each" in line for line in reported)
