"""The CLI's progress bar: a fit resumed in the middle of an epoch shows that epoch, its total and where it is."""

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from bn_lightning.nn import LeNet
from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.training.module import Classifier
from bn_lightning.training.progress import ProgressBar


class Watch(ProgressBar):
    """The bar as the first training batch of the fit starts, and the version it shows."""

    seen = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        bar = self.train_progress_bar
        self.seen = self.seen or (bar.desc.rstrip(": "), bar.total, bar.n, batch_idx)
        self.version = self.get_metrics(trainer, pl_module).get("v_num")


def test_an_epoch_lightning_did_not_start_gets_its_number_total_and_position(tiny_data, tmp_path):
    """The state a fit resumed from a checkpoint taken inside a batch left the bar in: "Training: 138/?"."""
    bar = Watch()
    trainer = Trainer(logger=False, max_steps=3, callbacks=[bar], limit_val_batches=0, enable_model_summary=False,
                      enable_checkpointing=False)
    datamodule = FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40)

    class Unstarted(ProgressBar.__mro__[1]):  # after Lightning's epoch start, undo it: as if it never ran
        def on_train_epoch_start(self, trainer, pl_module):
            bar.train_progress_bar.reset()
            bar.train_progress_bar.total = None
            bar.train_progress_bar.set_description("Training")

    trainer.callbacks.append(Unstarted())
    trainer.fit(Classifier(LeNet("scratch")), datamodule)
    assert bar.seen == ("Epoch 0", 3, 0, 0)  # max_steps=3 of the epoch's 5 batches, as Lightning counts them


def test_a_fit_resumed_mid_epoch_shows_its_epoch_and_a_total_and_the_full_version(tiny_data, tmp_path):
    def fit(max_steps, bar, ckpt_path=None):
        seed_everything(0)
        trainer = Trainer(logger=TensorBoardLogger(tmp_path, name="run", version="version_12"), max_steps=max_steps,
                          callbacks=[bar, ModelCheckpoint(tmp_path, "at{step}", every_n_train_steps=2, auto_insert_metric_name=False)],
                          limit_val_batches=0, enable_model_summary=False)
        trainer.fit(Classifier(LeNet("scratch")), FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40),
                    ckpt_path=ckpt_path)

    fit(2, Watch())
    resumed = Watch()
    fit(4, resumed, ckpt_path=tmp_path / "at2.ckpt")
    assert resumed.seen[0] == "Epoch 0" and resumed.seen[1] is not None
    assert resumed.version == "version_12"  # Lightning's own bar shows "_12"
