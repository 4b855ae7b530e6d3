"""Networks of configurable depth: shapes with every norm, plain and residual blocks as defined, SkipInit's
identity at initialization, the initializations, their checks, and the monitors and a CLI fit finding them."""

import math

import pytest
import torch
from torch import nn

from bn_lightning.callbacks.monitors import ACTIVATIONS
from bn_lightning.nn import DeepConvNet, DeepMLP
from bn_lightning.nn.deep import ResidualBlock
from bn_lightning.nn.registry import NORMS, batch_norm_layers

from helpers import REPO, run_cli

NETS = {"mlp": DeepMLP, "conv": DeepConvNet}


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("kind", list(NETS))
def test_every_norm_plain_and_residual_gives_class_scores(kind, norm):
    torch.manual_seed(0)
    for residual in (False, True):
        net = NETS[kind](depth=3, width=8, norm=norm, residual=residual)
        out = net(images())
        assert out.shape == (6, 10) and out.isfinite().all()
        blocks = [m for name, m in net.named_children() if name.startswith("block")]
        assert len(blocks) == 3 and all(isinstance(b, ResidualBlock) == residual for b in blocks)


def test_a_batch_norm_counts_one_per_affine_layer_and_takes_the_bias_it_cancels():
    net = DeepMLP(depth=5, width=16, norm="scratch")
    assert len(batch_norm_layers(net)) == 6  # the stem and 5 blocks; the head has none
    assert net.stem.affine.bias is None and net.block1.affine.bias is None and net.head.bias is not None
    assert DeepMLP(depth=5, width=16).block1.affine.bias is not None  # no norm: the bias stays
    conv = DeepConvNet(depth=2, width=8, norm="torch")
    assert len(batch_norm_layers(conv)) == 4 and conv.block1.affine.bias is None
    activations = [m for m in conv.modules() if isinstance(m, ACTIVATIONS)]
    assert len(activations) == 4  # what ActivationMonitor hooks


def test_a_residual_block_adds_its_pre_activation_branch_to_the_skip_path():
    torch.manual_seed(0)
    block = DeepMLP(depth=1, width=8, norm="torch", residual=True).block1
    x = torch.randn(5, 8)
    branch = block.affine(torch.relu(nn.functional.batch_norm(x, None, None, block.norm.weight, block.norm.bias,
                                                              training=True)))
    torch.testing.assert_close(block(x), x + branch)


def test_skip_init_starts_every_residual_block_as_the_identity():
    torch.manual_seed(0)
    net = DeepMLP(depth=4, width=16, residual=True, skip_init=True)
    x = images()
    h = net.stem(net.flatten(x))
    torch.testing.assert_close(net(x), net.head(h))  # every branch scaled by 0
    assert [net.get_submodule(f"block{i}").scale.item() for i in range(1, 5)] == [0.0] * 4
    net(x).sum().backward()
    assert net.block1.scale.grad is not None and net.block1.scale.grad != 0  # and it learns
    assert DeepMLP(depth=2, residual=True).block1.scale is None


@pytest.mark.parametrize("activation, gain", [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("sigmoid", 1.0)])
def test_scaled_initialization_is_he_for_relu_and_xavier_otherwise(activation, gain):
    torch.manual_seed(0)
    weight = DeepMLP(depth=1, width=512, activation=activation).block1.affine.weight
    fan_in = fan_out = 512
    expected = gain / math.sqrt(fan_in) if activation == "relu" else gain * math.sqrt(2 / (fan_in + fan_out))
    assert weight.std().item() == pytest.approx(expected, rel=0.01)
    default = DeepMLP(depth=1, width=512, activation=activation, init="torch").block1.affine.weight
    assert default.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.01)  # kaiming_uniform(a=sqrt 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 0}, "depth must be a positive"),
    ({"width": 0}, "width must be a positive"),
    ({"skip_init": True}, "set residual to true"),
    ({"skip_init": True, "residual": True, "norm": "scratch"}, "set norm to none"),
    ({"activation": "gelu"}, "unknown activation"),
    ({"init": "orthogonal"}, "unknown init"),
    ({"norm": "scratch", "norm_kwargs": {"groups": 2}}, "norm_kwargs groups"),
])
def test_bad_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeepMLP(**kwargs)


def test_the_input_shape_is_checked():
    with pytest.raises(ValueError, match=r"expects images of shape \(N, 1, 28, 28\)"):
        DeepConvNet(depth=1)(torch.randn(2, 3, 28, 28))


@pytest.mark.slow
def test_a_config_fits_checkpoints_and_tests_through_the_cli(tiny_data, tmp_path):
    fit = run_cli("fit", "--config", str(REPO / "configs" / "deep_mlp_bn.yaml"), f"--data.data_dir={tiny_data}",
                  "--data.val_size=40", "--trainer.max_epochs=1", "--model.net.init_args.depth=3",
                  "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "deep_mlp_bn" / "version_0"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert sum(key.endswith("running_mean") for key in checkpoint["state_dict"]) == 4  # stem and 3 blocks
    assert "DeepMLP" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("kind", list(NETS))
def test_every_monitor_and_probe_finds_the_blocks_of_a_residual_bn_network(kind, tiny_data, tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from bn_lightning import Classifier, FashionMNISTDataModule
    from bn_lightning.callbacks import ActivationMonitor, BatchNormMonitor, probes
    from helpers import scalars

    seed_everything(0)
    net = NETS[kind](depth=2, width=8, norm="scratch", residual=True)
    callbacks = [BatchNormMonitor(every_n_steps=2, histogram_every_n_steps=None), ActivationMonitor(every_n_steps=2),
                 probes.GradientICS(2), probes.LandscapeProbe(2), probes.WeightNormMonitor(2),
                 probes.RepresentationProbe(2, num_images=40, gradient_images=8)]
    trainer = Trainer(max_steps=3, logger=TensorBoardLogger(tmp_path, name="run"), callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(Classifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
                FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40))
    tags = set(scalars(trainer.logger.log_dir))
    for block in ("block1", "block2"):
        found = {tag.split("/")[0] for tag in tags if f"/{block}" in tag}
        assert {"bn", "act", "ics", "weights", "collapse"} <= found, (block, sorted(tags))
    assert "landscape/beta" in tags
