"""Norms by name: the registry builds each norm by rank and position, refuses options a norm does not take,
takes a new norm in one registration, and is the one way to find every BN layer."""

import inspect

import pytest
import torch
import yaml
from torch import nn

from bn_lightning.nn import BatchNorm1d, BatchNorm2d, BatchRenorm1d, BatchRenorm2d, LeNet, NoisyBatchNorm1d
from bn_lightning.nn.registry import NORMS, batch_norm_layers, create_norm, norm_options, register_norm
from bn_lightning.training.cli import main
from helpers import CONFIGS


@pytest.mark.parametrize("name, vector, feature_map", [
    ("none", nn.Identity, nn.Identity), ("scratch", BatchNorm1d, BatchNorm2d), ("torch", nn.BatchNorm1d, nn.BatchNorm2d),
    ("batch_renorm", BatchRenorm1d, BatchRenorm2d),
    ("group_norm", nn.LayerNorm, nn.GroupNorm), ("layer_norm", nn.LayerNorm, nn.GroupNorm),
])
def test_each_norm_is_built_by_the_rank_of_its_input(name, vector, feature_map):
    assert type(create_norm(name, 6, 2)) is vector and type(create_norm(name, 6, 4)) is feature_map


def test_options_go_to_the_layer_and_an_option_a_norm_does_not_take_names_those_it_does():
    layer = create_norm("batch_renorm", 6, 4, r_max=2.0, momentum=None)
    assert (layer.r_max, layer.momentum) == (2.0, None)
    assert create_norm("group_norm", 6, 4, groups=3).num_groups == 3
    with pytest.raises(ValueError, match=r"norm_kwargs r_max: norm 'scratch' takes eps, momentum, affine, "
                                         r"track_running_stats, bias, sync, process_group"):
        create_norm("scratch", 6, 4, r_max=2.0)
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; choose one of: none, scratch, torch"):
        create_norm("batchnorm", 6, 4)


def test_noisy_bn_is_seeded_by_its_position_from_torchs_seed():
    torch.manual_seed(3)
    first, second = create_norm("noisy_bn", 6, 2, 0), create_norm("noisy_bn", 6, 2, 1)
    assert type(first) is NoisyBatchNorm1d
    assert (int(first.noise_seed), int(second.noise_seed)) == (3 * 16, 3 * 16 + 1)
    assert "noise_seed" not in norm_options("noisy_bn")  # the position decides it


def test_a_new_norm_is_one_registration():
    register_norm("instance_norm", lambda num_features, ndim, index, affine=True:
                  nn.InstanceNorm2d(num_features, affine=affine) if ndim == 4 else nn.LayerNorm(num_features))
    try:
        net = LeNet("instance_norm", {"affine": False})
        assert type(net.conv1.norm) is nn.InstanceNorm2d and not net.conv1.norm.affine
        assert type(net.fc1.norm) is nn.LayerNorm and net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    finally:
        del NORMS["instance_norm"]


def test_lenet_takes_no_option_of_one_norm():
    assert list(inspect.signature(LeNet).parameters) == ["norm", "norm_kwargs", "activation", "pool",
                                                         "norm_position", "init_gain"]


def test_every_batch_norm_is_found_by_one_function():
    net = nn.Sequential(BatchNorm2d(3), nn.BatchNorm1d(3, track_running_stats=False), BatchRenorm2d(3),
                        NoisyBatchNorm1d(3), nn.GroupNorm(1, 3), nn.SyncBatchNorm(3))
    assert list(batch_norm_layers(net)) == ["0", "1", "2", "3", "5"]
    assert list(batch_norm_layers(net, tracked=True)) == ["0", "2", "3", "5"]
    assert batch_norm_layers(LeNet("group_norm")) == {}


def test_norm_kwargs_from_a_config_and_the_command_line(tmp_path, capsys):
    config = tmp_path / "renorm.yaml"
    config.write_text(yaml.safe_dump({"model": {"net": {"init_args": {"norm": "batch_renorm",
                                                                       "norm_kwargs": {"d_max": 1.0}}}}}))
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--model.net.init_args.norm_kwargs.r_max=2", "--print_config"])
    assert done.value.code == 0
    net = yaml.safe_load(capsys.readouterr().out)["model"]["net"]["init_args"]
    assert (net["norm"], net["norm_kwargs"]) == ("batch_renorm", {"d_max": 1.0, "r_max": 2})
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / "lenet_bn_scratch.yaml"), "--model.net.init_args.norm_kwargs.groups=2"])
    assert done.value.code == 2
    assert "norm_kwargs groups: norm 'scratch' takes eps, momentum" in capsys.readouterr().err
