"""Issue 6: every bad input gives the command line a clear error, what is wrong and how to fix it,
without a traceback, and loses nothing. Unit-level checks live beside their modules' tests."""

import re

import pytest
import torch

from bn_lightning.training.cli import main
from helpers import REPO, run_cli, write_fashion_mnist

TINY_RUN = ["--config", str(REPO / "configs" / "lenet_no_bn.yaml"), "--data.val_size=40", "--data.batch_size=32",
            "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("setting, message", [
    ("--model.optimizer.init_args.lr=-1", "error: model.optimizer.init_args.lr must be a positive learning rate, got -1.0"),
    ("--model.optimizer.init_args.lr=0", "error: model.optimizer.init_args.lr must be a positive learning rate, got 0.0"),
    ("--model.optimizer.init_args.momentum=-0.5", "error: model.optimizer.init_args: Invalid momentum value: -0.5"),
    ("--data.batch_size=0", "error: batch_size must be a positive number of images, got 0"),
], ids=["negative lr", "zero lr", "negative momentum", "zero batch size"])
def test_a_bad_setting_stops_fit_before_any_data_is_read(setting, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", *TINY_RUN, f"--data.data_dir={tmp_path / 'no_data_needed'}", "--data.download=false", setting])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "no_data_needed").exists()


@pytest.mark.slow
def test_missing_data_offline_names_the_folder_and_the_fix(tmp_path):
    result = run_cli("fit", *TINY_RUN, f"--data.data_dir={tmp_path / 'nowhere'}", "--data.download=false", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr[result.stderr.index("error: "):]
    assert f"error: Fashion-MNIST is not in {tmp_path / 'nowhere' / 'FashionMNIST' / 'raw'}" in last
    assert "downloading is switched off (download: false)" in last and "--data.data_dir" in last


@pytest.mark.slow
def test_a_truncated_file_names_the_file_and_the_fix(tmp_path):
    root = write_fashion_mnist(tmp_path / "data")
    images = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])  # an interrupted copy
    result = run_cli("fit", *TINY_RUN, f"--data.data_dir={root}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"error: {images} is not a valid Fashion-MNIST file: its header announces 200 items, 156816 bytes, "
            "but it holds 5000 bytes.") in result.stderr
    assert "Fix it by deleting it and running again with download: true" in result.stderr
    assert images.stat().st_size == 5000  # left for the user to look at


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_keeps_its_last_good_checkpoint(tiny_data, tmp_path):
    """SGD with momentum 30 blows up in the second epoch; a checkpoint is written after every step."""
    result = run_cli("fit", *TINY_RUN, f"--data.data_dir={tiny_data}", "--trainer.max_epochs=3",
                     "--model.net.init_args.activation=relu", "--model.optimizer.init_args.lr=1",
                     "--model.optimizer.init_args.momentum=30", "--last_checkpoint.every_n_train_steps=1", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = re.search(r"error: training diverged at step (\d+) \(epoch (\d+), batch \d+\): the loss is (\S+?)[;.]",
                      result.stderr)
    assert found, result.stderr[-3000:]
    step, epoch, loss = int(found[1]), int(found[2]), float(found[3])
    assert epoch >= 1 and not torch.isfinite(torch.tensor(loss))
    assert "lowering the learning rate (model.optimizer.init_args.lr, now 1.0)" in result.stderr

    checkpoints = tmp_path / "lightning_logs" / "lenet_no_bn" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == step  # written after the step before, never after this one
    for path in checkpoints.iterdir():
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point()), path.name



@pytest.mark.slow
def test_an_infinite_loss_with_finite_weights_is_not_saved_for_resuming(tiny_data, tmp_path):
    """ReLU LeNet at lr 7000 overflows the loss at step 2 while its weights are still finite."""
    result = run_cli("fit", *TINY_RUN, f"--data.data_dir={tiny_data}", "--model.net.init_args.activation=relu",
                     "--model.optimizer.init_args.lr=7000", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"error: training diverged at step \d+ \(epoch 0, batch \d+\): the loss is inf\.", result.stderr)
    checkpoints = tmp_path / "lightning_logs" / "lenet_no_bn" / "version_0" / "checkpoints"
    assert not (checkpoints / "interrupted.ckpt").exists()  # resuming it would only diverge again

@pytest.mark.slow
def test_val_size_larger_than_the_data_is_one_clear_line(tiny_data, tmp_path):
    result = run_cli("fit", *TINY_RUN, f"--data.data_dir={tiny_data}", "--data.val_size=500", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: val_size 500 leaves no training images" in result.stderr
    assert "set --data.val_size below 200" in result.stderr


@pytest.mark.slow
def test_a_batch_size_that_would_leave_one_image_last_trains_without_it(tiny_data, tmp_path):
    """160 training images in batches of 53: the fourth batch would hold a single image, which has
    no batch statistics; it is left out rather than ending the epoch in an error."""
    result = run_cli("fit", "--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
                     "--data.val_size=40", "--data.batch_size=53", "--trainer.max_epochs=2",
                     "--trainer.enable_progress_bar=false", "--test_after_fit=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(tmp_path / "lightning_logs" / "lenet_bn_scratch" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    assert last["global_step"] == 6  # 3 batches an epoch


CONFIG = str(REPO / "configs" / "lenet_no_bn.yaml")


@pytest.mark.parametrize("args, line", [
    (["--ckpt_path", "nope.ckpt"], "error: --ckpt_path nope.ckpt: no such checkpoint file; give the path of a .ckpt "
                                   "file, or --ckpt_path last to resume the run's newest checkpoint"),
    (["--config", "configs/nope.yaml"], "error: --config configs/nope.yaml: no such file; the run configs are in "
                                        "configs/ (python -m bn_lightning fit --config configs/lenet_bn_scratch.yaml)"),
    (["--config", str(REPO / "configs" / "seed_adam.yaml")], f"error: --config {REPO / 'configs' / 'seed_adam.yaml'}: no such file; "
                                                                 f"it is {REPO / 'configs' / 'blog_adam.yaml'} since release 0.2"),
    (["--trainer.max_epoch=3"], "error: unrecognized arguments: --trainer.max_epoch=3; did you mean --trainer.max_epochs?"),
    (["--trainer.max_epochs=abc"], "error: --trainer.max_epochs: expected int or null, got abc"),
    (["--model.net.init_args.norm=batchnorm"], "error: unknown norm 'batchnorm'; choose one of: none, scratch, torch, "
                                               "noisy_bn, batch_renorm, group_norm, layer_norm"),
    (["--model.net.init_args.activation=tanh"], "error: --model.net.init_args.activation: expected one of 'sigmoid', "
                                                "'relu', got tanh"),
    (["--model.net.init_args.norm_kwargs.momentum=0.5"], "error: norm_kwargs momentum: norm 'none' takes none"),
    (["--model.optimizer=Sgd"], "error: --model.optimizer: Sgd is not a class it knows; it takes one of: "
                                "torch.optim.Optimizer, torch.optim.Adafactor"),
], ids=["missing checkpoint", "missing config", "renamed config", "typo prefix", "bad type", "unknown norm",
        "unknown activation", "option of another norm", "unknown optimizer"])
def test_a_bad_command_line_is_one_error_line_and_leaves_nothing_behind(args, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["fit", "--config", CONFIG, f"--data.data_dir={tmp_path / 'data'}", "--data.download=false", *args]
    with pytest.raises(SystemExit) as done:
        main(command)
    assert done.value.code == 2
    lines = [text for text in capsys.readouterr().err.splitlines() if text.strip()]
    assert lines[-1].startswith(line) and not any(text.startswith("usage:") for text in lines)
    assert "Traceback" not in "\n".join(lines)
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "data").exists()


def test_fit_help_is_one_line_per_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 150 and "known subclasses" not in text
    for option in ("--trainer.max_epochs", "--model.net", "--model.optimizer", "--data.batch_size", "--ckpt_path",
                   "--checkpoint.monitor", "--test_after_fit"):
        assert re.search(rf"^  {re.escape(option)}\s", text, re.M), option
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr()
    assert "{fit,validate,test,predict}" in top.out + top.err, top  # the top level keeps its listing of subcommands
