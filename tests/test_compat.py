"""Release 0.1's files still work for this release: its module paths, its LeNet arguments, a run folder's
config.yaml and a checkpoint, made by 0.1 and committed under tests/data/legacy/."""

import importlib
import sys
import warnings

import pytest
import torch

from bn_lightning import _compat
from bn_lightning.nn import LeNet
from bn_lightning.training.cli import main
from bn_lightning.training.module import Classifier
from helpers import REPO

LEGACY = REPO / "tests" / "data" / "legacy"
# The network 0.1's run built: LeNet(norm="batch_renorm", renorm_r_max=2.5, renorm_warmup_steps=1, bn_momentum=0.2).
NORM_KWARGS = {"r_max": 2.5, "warmup_steps": 1, "momentum": 0.2}


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning_that_names_it(old):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"{old} is now {_compat.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(_compat.LOADED_FROM.get(old, _compat.MOVED[old]))


def test_lenet_of_0_1_takes_its_flat_arguments_and_builds_todays_network():
    sys.modules.pop("bn_lightning.model", None)
    with pytest.warns(FutureWarning):
        from bn_lightning.model import LeNet as OldLeNet
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match=r"norm_kwargs=\{'r_max': 2.5, 'warmup_steps': 1, 'momentum': 0.2\}"):
        old = OldLeNet("batch_renorm", renorm_r_max=2.5, renorm_warmup_steps=1, bn_momentum=0.2, norm_groups=2)
    torch.manual_seed(0)
    new = LeNet("batch_renorm", NORM_KWARGS)
    assert type(old) is LeNet and old.norm_kwargs == NORM_KWARGS
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    with pytest.raises(ValueError, match="bn_momentum sets an option of another norm than 'none'"):
        OldLeNet("none", bn_momentum=0.3)


def test_a_checkpoint_of_0_1_loads_with_its_weights_and_statistics():
    checkpoint = torch.load(LEGACY / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["net"]["class_path"] == "bn_lightning.model.LeNet"  # 0.1's spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = Classifier.load_from_checkpoint(LEGACY / "last.ckpt", weights_only=True)
    assert type(model.net) is LeNet and (model.net.norm, model.net.norm_kwargs) == ("batch_renorm", NORM_KWARGS)
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in checkpoint["state_dict"].items())
    assert model.net.conv1.norm.num_batches_tracked.item() == 3  # 80 training images, batches of 32
    assert model.eval()(torch.randn(2, 1, 28, 28)).isfinite().all()


@pytest.mark.slow
def test_a_run_folders_config_of_0_1_reruns_and_its_checkpoint_resumes(tmp_path):
    """config.yaml of 0.1 names bn_lightning.LeNet with flat arguments, bn_lightning.probes.WeightNormMonitor and
    bn_lightning.precise_bn.PreciseBN: it reruns, and records today's spelling; 0.1's last.ckpt resumes."""
    from helpers import write_fashion_mnist

    data = write_fashion_mnist(tmp_path / "tiny", n_train=120, n_test=40)
    args = ["fit", "--config", str(LEGACY / "config.yaml"), f"--data.data_dir={data}"]
    for old in _compat.MOVED:  # imported already by other tests: import them afresh, as a new process does
        sys.modules.pop(old, None)
    with pytest.warns(FutureWarning) as warned:
        cli = main([*args, f"--trainer.logger.init_args.save_dir={tmp_path / 'rerun'}"])
    messages = " ".join(str(w.message) for w in warned)
    assert "release 0.1's LeNet arguments" in messages and "bn_lightning.probes is now bn_lightning.callbacks.probes" in messages
    assert (cli.model.net.norm, cli.model.net.norm_kwargs) == ("batch_renorm", NORM_KWARGS)
    assert {type(c).__name__ for c in cli.trainer.callbacks} >= {"WeightNormMonitor", "PreciseBN", "BatchNormMonitor"}
    saved = (tmp_path / "rerun" / "lenet_batch_renorm" / "run" / "config.yaml").read_text()
    assert "class_path: bn_lightning.nn.LeNet" in saved and "norm_kwargs:" in saved and "bn_momentum" not in saved

    with pytest.warns(FutureWarning):  # the checkpoint's hyperparameters name bn_lightning.model.LeNet
        cli = main([*args, f"--trainer.logger.init_args.save_dir={tmp_path / 'resumed'}", "--trainer.max_epochs=2",
                    "--ckpt_path", str(LEGACY / "last.ckpt")])
    assert (cli.model.net.norm, cli.model.net.norm_kwargs) == ("batch_renorm", NORM_KWARGS)
    assert cli.trainer.current_epoch == 2 and cli.model.net.conv1.norm.num_batches_tracked.item() == 6
