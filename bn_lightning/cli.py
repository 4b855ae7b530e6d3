"""``python -m bn_lightning fit|validate|test|predict --config configs/<run>.yaml``."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from bn_lightning.data import FashionMNISTDataModule
from bn_lightning.module import Classifier
from bn_lightning.sync import BatchNormSync


class BNLightningCLI(LightningCLI):
    """LightningCLI with LeNet as the default network, a checkpoint callback always on, and
    ``fit`` followed by ``test`` on the best checkpoint, logged into the same run (so a run's
    TensorBoard folder holds its final test accuracy beside its curves)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit only: test the best checkpoint when fit ends"
        )
        parser.set_defaults({"model.net": {"class_path": "bn_lightning.model.LeNet"}})
        # Always keep the best epoch by validation accuracy and the last one (for --ckpt_path last).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def instantiate_trainer(self, **kwargs):
        """``trainer.sync_batchnorm: true`` synchronizes our BN as well as torch's (BatchNormSync)."""
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("sync_batchnorm") and "plugins" not in kwargs:
            plugins = trainer.get("plugins") or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), BatchNormSync()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)


def main(args=None) -> BNLightningCLI:
    return BNLightningCLI(
        Classifier,
        FashionMNISTDataModule,
        seed_everything_default=42,
        trainer_defaults={
            "max_epochs": 10,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "lightning_logs", "name": "default"},
            },
        },
        args=args,
    )

