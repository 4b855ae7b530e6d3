"""The LightningModule: metrics over exactly the samples seen, optimizer from arguments, real training."""

import re
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.errors import NonFiniteLossError
from bn_lightning.training.module import Classifier
from helpers import CONFIGS


def trainer(tmp_path, **kwargs):
    return Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_validation_metrics_count_a_partial_last_batch_by_its_samples(tiny_data, tmp_path):
    # 50 validation images in batches of 16: 16, 16, 16 and a partial 2.
    dm = FashionMNISTDataModule(tiny_data, batch_size=16, val_size=50)
    model = Classifier(LeNet("scratch"))
    logged = trainer(tmp_path).validate(model, datamodule=dm, verbose=False)[0]

    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([dm.val_set[i][0] for i in range(50)]))
    targets = dm.val_set.targets
    assert logged["val/acc"] == pytest.approx((logits.argmax(1) == targets).float().mean().item(), abs=1e-6)
    assert logged["val/loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


@pytest.mark.parametrize("optimizer, lr", [(torch.optim.SGD, 0.9), (torch.optim.Adam, 0.01)])
def test_optimizer_and_learning_rate_come_from_the_arguments(optimizer, lr):
    model = Classifier(LeNet(), optimizer=partial(optimizer, lr=lr))
    opt = model.configure_optimizers()
    assert type(opt) is optimizer and opt.param_groups[0]["lr"] == lr
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_hyperparameters_describe_the_network_without_holding_it():
    model = Classifier(LeNet("scratch", pool="max"), num_classes=10)
    assert model.hparams.num_classes == 10
    assert model.hparams.net == {"class_path": "bn_lightning.LeNet",
                                 "init_args": {"norm": "scratch", "norm_kwargs": {}, "activation": "sigmoid",
                                               "pool": "max", "norm_position": "before", "init_gain": 1.0}}


def test_a_checkpoint_of_a_cli_run_loads_on_its_own(tiny_data, tmp_path):
    """The network's description in the hyperparameters is what LightningCLI's config says, so
    ``Classifier.load_from_checkpoint`` rebuilds the network from the checkpoint alone."""
    from bn_lightning.training.cli import main

    cli = main(["fit", "--config", str(CONFIGS / "blog_adam_scratch.yaml"), f"--data.data_dir={tiny_data}",
                "--data.batch_size=32", "--data.val_size=40", "--trainer.max_epochs=1", "--test_after_fit=false",
                f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"])
    loaded = Classifier.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert isinstance(loaded.net, LeNet) and (loaded.net.norm, loaded.net.pool) == ("scratch", "max")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), cli.model.state_dict().values()))


@pytest.mark.parametrize("norm", ["none", "scratch", "torch"])
def test_training_for_real_learns_the_tiny_data(tiny_data, tmp_path, norm):
    seed_everything(0)
    dm = FashionMNISTDataModule(tiny_data, batch_size=20, val_size=40)
    model = Classifier(LeNet(norm, activation="relu"), optimizer=partial(torch.optim.Adam, lr=0.01))
    fit_trainer = trainer(tmp_path, max_epochs=8)
    before = fit_trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"]
    fit_trainer.fit(model, datamodule=dm)
    metrics = fit_trainer.callback_metrics
    assert {"train/loss_step", "train/acc_step", "train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/acc"] > max(0.6, before + 0.3), f"val acc {before:.2f} -> {metrics['val/acc']:.2f}"
    if norm != "none":
        assert model.net.conv1.norm.num_batches_tracked.item() == 8 * 8  # 160 images / 20 per batch, 8 epochs
    test = fit_trainer.test(model, datamodule=dm, verbose=False)[0]
    assert set(test) == {"test/loss", "test/acc"}


class OverflowingSGD(torch.optim.SGD):
    """Its third update overflows: the loss before it is finite, a weight after it is not."""

    steps = 0

    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return loss


def test_a_step_that_leaves_infinite_weights_stops_training_before_a_checkpoint_holds_them(tiny_data, tmp_path):
    """Stopped in optimizer_step, before the callbacks' on_train_batch_end writes the step's checkpoint."""
    model = Classifier(LeNet("torch"), optimizer=partial(OverflowingSGD, lr=0.5))
    every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1, save_last=True)
    fit_trainer = Trainer(logger=False, callbacks=[every_step], enable_progress_bar=False,
                          enable_model_summary=False, max_epochs=1)
    with pytest.raises(NonFiniteLossError) as err:
        fit_trainer.fit(model, datamodule=FashionMNISTDataModule(tiny_data, batch_size=20, val_size=40))
    message = str(err.value)
    assert re.match(r"training diverged at step 2 \(epoch 0, batch 2\): the loss is \d\.\d+;", message), message
    assert "; not finite after the update: net.conv1.affine.weight." in message
    assert "(model.optimizer.init_args.lr, now 0.5)" in message
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)  # hparams hold the partial optimizer
    assert last["global_step"] == 2 and last["state_dict"]["net.conv1.affine.weight"].isfinite().all()


def test_predict_returns_one_class_per_image(tiny_data, tmp_path):
    dm = FashionMNISTDataModule(tiny_data, batch_size=25)
    batches = trainer(tmp_path).predict(Classifier(LeNet()), datamodule=dm)
    predictions = torch.cat(batches)
    assert predictions.shape == (60,) and predictions.dtype == torch.int64
    assert predictions.min() >= 0 and predictions.max() < 10
