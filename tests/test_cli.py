"""The command line end to end: every config parses, a real fit leaves checkpoints and TensorBoard events."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_lightning.cli import main
from conftest import REPO, SHARED_DATA, needs_real_data

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bn_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def scalars(version_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_names_its_run(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())
    assert printed["trainer"]["logger"]["init_args"]["name"] == written["trainer"]["logger"]["init_args"]["name"]
    assert printed["model"]["net"]["init_args"]["norm"] == written["model"]["net"]["init_args"]["norm"]


def test_every_config_names_its_own_run():
    names = [yaml.safe_load(c.read_text())["trainer"]["logger"]["init_args"]["name"] for c in CONFIGS]
    assert len(set(names)) == len(CONFIGS) >= 5, names


def test_d2l_configs_follow_the_book():
    for stem, norm, lr in (("lenet_no_bn", "none", 0.9), ("lenet_bn_scratch", "scratch", 1.0), ("lenet_bn_torch", "torch", 1.0)):
        config = yaml.safe_load((REPO / "configs" / f"{stem}.yaml").read_text())
        assert config["trainer"]["logger"]["init_args"]["name"] == stem
        assert config["model"]["net"]["init_args"] == {"norm": norm, "activation": "sigmoid", "pool": "avg"}
        assert config["model"]["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": lr}}
        assert (config["data"]["batch_size"], config["trainer"]["max_epochs"]) == (256, 10)


@pytest.mark.parametrize("option, value, choices", [
    ("--model.net.init_args.norm", "batch", ["'none'", "'scratch'", "'torch'"]),
    ("--model.net.init_args.activation", "tanhh", ["'sigmoid'", "'relu'"]),
    ("--model.optimizer", "torch.optim.Sgd", ["model.optimizer takes one of:", "torch.optim.SGD,", "torch.optim.Adam,"]),
    ("--model.optimizer", "NoSuchOptimizer", ["model.optimizer takes one of:", "torch.optim.SGD,", "torch.optim.Adam,"]),
])
def test_unknown_choice_lists_the_choices(option, value, choices, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", option, value, "--print_config"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "python -m bn_lightning fit --help" in err  # the tip names the real command, not __main__.py
    error = err[err.index("error: "):]
    assert value in error and all(choice in error for choice in choices)


def test_fit_writes_checkpoints_and_tensorboard_events_then_tests_and_predicts(tiny_data, tmp_path):
    common = ["--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
              "--data.batch_size=32", "--data.val_size=40", "--trainer.enable_progress_bar=false"]
    fit = run_cli("fit", *common, "--trainer.max_epochs=3", "--trainer.log_every_n_steps=2", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]

    run_dir = tmp_path / "lightning_logs" / "lenet_bn_scratch" / "version_0"
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-epoch") for name in checkpoints)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2
    # 160 training images in batches of 32: 5 steps an epoch, tracked by every BN layer.
    assert state["state_dict"]["net.conv1.norm.num_batches_tracked"].item() == 15
    assert state["state_dict"]["net.fc2.norm.running_var"].shape == (84,)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["net"]["init_args"]["norm"] == "scratch"

    logged = scalars(run_dir)
    assert len(logged["train/loss_step"]) == 7 and len(logged["val/acc"]) == 3  # steps 2, 4, ..., 14
    assert len(logged["train/acc_epoch"]) == 3 and len(logged["test/acc"]) == 1  # tested after fit
    assert all(0 <= acc <= 1 for acc in logged["val/acc"])

    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    for subcommand in ("validate", "test", "predict"):
        result = run_cli(subcommand, *common, f"--ckpt_path={best}", cwd=tmp_path)
        assert result.returncode == 0, (subcommand, result.stderr[-3000:])


def test_last_checkpoint_is_the_last_epoch_even_when_the_best_is_older(tiny_data, tmp_path):
    """Lightning 2.6's save_last rewrites last.ckpt only with a new best; ours is rewritten every epoch.
    Monitoring the epoch number with mode min makes epoch 0 the best for good."""
    fit = run_cli("fit", "--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
                  "--data.batch_size=32", "--data.val_size=40", "--trainer.max_epochs=3", "--test_after_fit=false",
                  "--checkpoint.monitor=epoch", "--checkpoint.mode=min", "--checkpoint.filename=best-{epoch}",
                  "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoints = tmp_path / "lightning_logs" / "lenet_bn_scratch" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-0.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 15)


@needs_real_data
def test_fit_on_a_slice_of_the_real_data_learns(tmp_path):
    fit = run_cli("fit", "--config", str(REPO / "configs" / "lenet_bn_torch.yaml"), f"--data.data_dir={SHARED_DATA}",
                  "--trainer.max_epochs=1", "--trainer.limit_train_batches=60", "--trainer.limit_val_batches=5",
                  "--trainer.limit_test_batches=5", "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    logged = scalars(tmp_path / "lightning_logs" / "lenet_bn_torch" / "version_0")
    # Chance is 0.10; 60 steps of BN LeNet at lr 1.0 get well past it.
    assert logged["val/acc"][-1] > 0.5 and logged["test/acc"][-1] > 0.5
