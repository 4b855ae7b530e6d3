"""``--model.compile true``: the network under ``torch.compile`` trains, logs, checkpoints and resumes as eager does."""

from unittest import mock

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

from bn_lightning.training import _private
from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import COMPILE_MODES, Classifier
from helpers import REPO, frequent_logging_callbacks, run_cli, scalars

# 160 training images in batches of 24: 6 full batches and a short one of 16 an epoch; 40 to validate, 60 to test.
DATA_ARGS = ["--data.batch_size=24", "--data.val_size=40"]


def test_the_modes_are_torchs():
    assert set(COMPILE_MODES) == set(torch._inductor.list_mode_options())


def test_an_unknown_mode_is_refused_with_the_modes_to_pick_from():
    with pytest.raises(ValueError, match="compile='fast'.*reduce-overhead"):
        Classifier(LeNet("scratch"), compile="fast")


def test_a_step_with_a_hooked_layer_runs_eagerly_so_the_hook_runs():
    model = Classifier(LeNet("scratch"), compile=True)
    model.configure_model()
    model._compiled_call = mock.Mock(side_effect=lambda net, x: net(x))
    x = torch.randn(4, 1, 28, 28)
    model(x)
    assert model._compiled_call.call_count == 1
    seen = []
    handle = model.net.fc1.norm.register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0].shape))
    model(x)
    assert seen == [torch.Size([4, 120])] and model._compiled_call.call_count == 1
    handle.remove()
    model(x)
    assert model._compiled_call.call_count == 2


@pytest.fixture
def fit(tiny_data, tmp_path):
    """fit(name, norm, *args): a CLI fit of lenet_bn_<norm> on the tiny data in tmp_path/<name>, every
    monitor logging every 2 steps; its run folder."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": frequent_logging_callbacks()}}))

    def run(name, norm, *args):
        (tmp_path / name).mkdir(exist_ok=True)
        done = run_cli("fit", "--config", str(REPO / "configs" / f"lenet_bn_{norm}.yaml"), "--config", str(callbacks),
                       f"--data.data_dir={tiny_data}", *DATA_ARGS, "--trainer.log_every_n_steps=1",
                       "--trainer.enable_progress_bar=false", *args, cwd=tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / name / "lightning_logs" / f"lenet_bn_{norm}" / "version_0"

    return run


def last_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["scratch", "torch"])
def test_a_compiled_fit_logs_what_an_eager_one_does(fit, norm):
    """Same seed: every scalar the run logs (losses, accuracies, every monitor's numbers, the test after
    fit) agrees to float tolerance over 28 steps, and the checkpoints have the same keys."""
    eager = fit("eager", norm, "--trainer.max_epochs=4")
    compiled = fit("compiled", norm, "--trainer.max_epochs=4", "--model.compile=true")

    eager_scalars, compiled_scalars = scalars(eager), scalars(compiled)
    assert eager_scalars.keys() == compiled_scalars.keys()
    assert len(eager_scalars["train/loss_step"]) == 28 and "bn/conv1/mean_gap_std" in eager_scalars
    for tag in (tag for tag in eager_scalars if not tag.startswith("perf/")):  # perf/: timings
        torch.testing.assert_close(torch.tensor(compiled_scalars[tag]), torch.tensor(eager_scalars[tag]),
                                   rtol=1e-3, atol=1e-4, msg=lambda m, tag=tag: f"{tag}: {m}")
    eager_state, compiled_state = last_state(eager), last_state(compiled)
    assert list(compiled_state) == list(eager_state)
    torch.testing.assert_close(compiled_state, eager_state, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_a_compiled_run_resumes_eagerly_and_an_eager_one_compiled(fit):
    reference = last_state(fit("reference", "scratch", "--trainer.max_epochs=4", "--test_after_fit=false"))
    for name, first, then in (("compiled-then-eager", "true", "false"), ("eager-then-compiled", "false", "true")):
        fit(name, "scratch", "--trainer.max_epochs=2", f"--model.compile={first}", "--test_after_fit=false")
        resumed = last_state(fit(name, "scratch", "--trainer.max_epochs=4", f"--model.compile={then}",
                                 "--ckpt_path=last", "--test_after_fit=false"))
        torch.testing.assert_close(resumed, reference, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_bf16_mixed_compiled_follows_bf16_mixed_eager(fit):
    bf16 = ["--trainer.max_epochs=2", "--trainer.precision=bf16-mixed", "--test_after_fit=false"]
    eager = scalars(fit("eager", "scratch", *bf16))["train/loss_step"]
    compiled = scalars(fit("compiled", "scratch", *bf16, "--model.compile=true"))["train/loss_step"]
    # bf16 activations round what the compiler's fused kernels compute in another order.
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=2e-2)


class GraphsPerEpoch(Callback):
    """How many graphs torch.compile has compiled at the end of each validation, and after testing."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.counts.append(_private.compiled_graphs())

    def on_test_end(self, trainer, pl_module) -> None:
        self.counts.append(_private.compiled_graphs())


@pytest.mark.slow
def test_no_graph_is_compiled_after_the_first_epoch(tiny_data, tmp_path):
    """The short last batch and the validation batches compile in epoch one, not again; testing compiles
    what it needs the first time only."""
    torch.manual_seed(0)
    counter = GraphsPerEpoch()
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=3, num_sanity_val_steps=0, callbacks=[counter],
                      enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)
    model = Classifier(LeNet("scratch"), compile=True)
    datamodule = FashionMNISTDataModule(tiny_data, batch_size=24, val_size=40, shuffle_seed=0)
    before = _private.compiled_graphs()
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule)
    first_epoch, *later_epochs, first_test, second_test = counter.counts
    assert first_epoch > before  # it did compile
    assert later_epochs == [first_epoch] * 2 and second_test == first_test
