"""The command line end to end: every config parses, a real fit leaves checkpoints and TensorBoard events."""

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bn_lightning.training.cli import main
from helpers import CONFIGS, DEFAULTS, REPO, SHARED_DATA, needs_real_data, run_cli, scalars

RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def resolved(capsys, *args) -> dict:
    """The whole config ``--print_config`` prints for ``args``."""
    with pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def import_object(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_config_is_a_short_delta_that_resolves_over_the_defaults(config, capsys):
    written = yaml.safe_load(config.read_text())
    added = written["trainer"].pop("callbacks+", [])  # callbacks a run adds to the defaults' list
    lines = [line for line in config.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 16, f"{config.name} has {len(lines)} lines: a run config says only what differs"
    whole = resolved(capsys, "--config", str(config))
    callbacks = whole["trainer"].pop("callbacks")
    default_callbacks = resolved(capsys)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in default_callbacks + added]
    assert callbacks[: len(default_callbacks)] == default_callbacks
    printed = flatten(whole)
    defaults = flatten(resolved(capsys))
    defaults = {key: value for key, value in defaults.items() if not key.startswith("trainer.callbacks")}
    # Everything the run sets is in force, and everything else is the shared default (but for the
    # arguments of a class the run swaps, as Adam for SGD).
    assert {key: printed[key] for key in flatten(written)} == flatten(written)
    swapped = tuple(key.removesuffix("class_path") for key in flatten(written) if key.endswith(".class_path"))
    untouched = [key for key in printed if key not in flatten(written) and not key.startswith(swapped)]
    assert {key: printed[key] for key in untouched} == {key: defaults[key] for key in untouched}
    assert printed["trainer.logger.class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    # A swapped class starts from its own defaults: nothing the defaults' class was given leaks into it (as
    # LeNet's sigmoid once did into DeepMLP, through the argument name both share).
    for prefix in swapped:
        signature = inspect.signature(import_object(printed[f"{prefix}class_path"]))
        for key in (k for k in printed if k.startswith(f"{prefix}init_args.") and k not in flatten(written)):
            name = key.removeprefix(f"{prefix}init_args.")
            if "." not in name and name in signature.parameters:
                default = signature.parameters[name].default
                assert printed[key] == (list(default) if isinstance(default, tuple) else default), (config.name, key)


def test_every_config_names_its_own_run():
    names = [yaml.safe_load(c.read_text())["trainer"]["logger"]["init_args"]["name"] for c in RUN_CONFIGS]
    assert len(set(names)) == len(RUN_CONFIGS) >= 5, names


def test_d2l_configs_follow_the_book(capsys):
    for stem, norm, lr in (("lenet_no_bn", "none", 0.9), ("lenet_bn_scratch", "scratch", 1.0), ("lenet_bn_torch", "torch", 1.0)):
        config = resolved(capsys, "--config", str(CONFIGS / f"{stem}.yaml"))
        assert config["trainer"]["logger"]["init_args"]["name"] == stem
        assert config["model"]["net"]["init_args"] == {
            "norm": norm, "norm_kwargs": None, "activation": "sigmoid", "pool": "avg", "norm_position": "before",
            "init_gain": 1.0}
        assert config["model"]["optimizer"]["class_path"] == "torch.optim.SGD"
        assert config["model"]["optimizer"]["init_args"]["lr"] == lr
        assert config["model"]["optimizer"]["init_args"]["momentum"] == 0
        assert (config["data"]["batch_size"], config["trainer"]["max_epochs"]) == (256, 10)


def test_the_defaults_turn_observability_on_and_leave_hparams_to_the_comparison():
    trainer = yaml.safe_load(DEFAULTS.read_text())["trainer"]
    assert trainer["logger"]["init_args"]["default_hp_metric"] is False
    assert [c["class_path"] for c in trainer["callbacks"]] == [
        "lightning.pytorch.callbacks.LearningRateMonitor", "bn_lightning.callbacks.ExamplesPerSecond",
        "bn_lightning.callbacks.BatchNormMonitor", "bn_lightning.callbacks.ActivationMonitor",
        "bn_lightning.callbacks.TensorBoardComparison",
    ]


@pytest.mark.parametrize("option, value, choices", [
    ("--model.net.init_args.norm", "batch", ["unknown norm 'batch'; choose one of: none, scratch, torch, noisy_bn"]),
    ("--model.net.init_args.activation", "tanhh", ["'sigmoid'", "'relu'"]),
    ("--model.optimizer", "torch.optim.Sgd", ["--model.optimizer: ", "takes one of:", "torch.optim.SGD,", "torch.optim.Adam,"]),
    ("--model.optimizer", "NoSuchOptimizer", ["--model.optimizer: ", "takes one of:", "torch.optim.SGD,", "torch.optim.Adam,"]),
])
def test_unknown_choice_lists_the_choices(option, value, choices, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", option, value])  # refused when parsed or when the network is built, before any data is read
    assert done.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # one line, the usage dump left to --help
    assert error.startswith("error: ") and value in error and all(choice in error for choice in choices)


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_saved_config_reruns_the_run_from_its_folder_alone(tiny_data, tmp_path):
    """config.yaml holds everything, the training order's seed included: a fit from it alone, elsewhere,
    logs the same losses step by step."""
    args = ["--data.batch_size=32", "--data.val_size=40", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--test_after_fit=false", "--seed_everything=7"]
    first = run_cli("fit", "--config", str(CONFIGS / "blog_adam_scratch.yaml"), f"--data.data_dir={tiny_data}", *args,
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "blog_adam_bn_scratch" / "version_0"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["seed_everything"], saved["data"]["shuffle_seed"], saved["weights_only"]) == (7, 7, True)
    (tmp_path / "again").mkdir()
    again = run_cli("fit", "--config", str(run_dir / "config.yaml"), cwd=tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = scalars(tmp_path / "again" / "lightning_logs" / "blog_adam_bn_scratch" / "version_0")
    assert len(rerun["train/loss_step"]) == 10
    assert rerun["train/loss_step"] == scalars(run_dir)["train/loss_step"]


@pytest.mark.slow
def test_an_installed_package_brings_its_defaults(tmp_path):
    """From a wheel installed outside the checkout (not editable), a run config still resolves over defaults.yaml."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("bn_lightning-*.whl"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                                str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    printed = subprocess.run([sys.executable, "-m", "bn_lightning", "fit", "--config", str(CONFIGS / "lenet_bn_torch.yaml"),
                              "--print_config"], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "bn_lightning.callbacks.BatchNormMonitor" in printed.stdout and "name: lenet_bn_torch" in printed.stdout
    assert str(tmp_path / "site") in subprocess.run(
        [sys.executable, "-c", "import bn_lightning; print(bn_lightning.__file__)"], cwd=tmp_path, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout


@pytest.mark.slow
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


@pytest.mark.slow
@needs_real_data
def test_fit_on_a_slice_of_the_real_data_learns(tmp_path):
    fit = run_cli("fit", "--config", str(REPO / "configs" / "lenet_bn_torch.yaml"), f"--data.data_dir={SHARED_DATA}",
                  "--trainer.max_epochs=1", "--trainer.limit_train_batches=60", "--trainer.limit_val_batches=5",
                  "--trainer.limit_test_batches=5", "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    logged = scalars(tmp_path / "lightning_logs" / "lenet_bn_torch" / "version_0")
    # Chance is 0.10; 60 steps of BN LeNet at lr 1.0 get well past it.
    assert logged["val/acc"][-1] > 0.5 and logged["test/acc"][-1] > 0.5


def test_a_learning_rate_schedule_from_the_config_steps_per_epoch_and_resumes(tiny_data, tmp_path):
    schedule = '{"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}'
    common = ["--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
              "--data.batch_size=32", "--data.val_size=40", "--trainer.enable_progress_bar=false",
              "--test_after_fit=false", f"--model.lr_scheduler={schedule}", "--trainer.log_every_n_steps=1"]
    for epochs in (2, 3):  # then resumed for a third epoch
        fit = run_cli("fit", *common, f"--trainer.max_epochs={epochs}", "--ckpt_path=last", cwd=tmp_path)
        assert fit.returncode == 0, fit.stderr[-3000:]
    # lr 1.0 (lenet_bn_scratch.yaml), halved after every epoch of 5 steps; LearningRateMonitor logs it per step.
    lr = scalars(tmp_path / "lightning_logs" / "lenet_bn_scratch" / "version_0")["lr-SGD"]
    assert lr == [1.0] * 5 + [0.5] * 5 + [0.25] * 5
