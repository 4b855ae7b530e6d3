"""``python -m bn_lightning fit|validate|test|predict --config configs/<run>.yaml``."""

from __future__ import annotations

import re
import signal
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bn_lightning.data import CorruptDataError, DataNotFoundError, DataSizeError, FashionMNISTDataModule
from bn_lightning.module import Classifier, NonFiniteLossError
from bn_lightning.resume import (
    EXIT_CODES,
    StopAndResume,
    checkpoint_dir,
    continue_run,
    find_last_checkpoint,
    run_folders,
)
from bn_lightning.sync import BatchNormSync


# Errors whose message says what went wrong and how to fix it: the CLI prints it without a traceback.
CLEAR_ERRORS = (DataNotFoundError, CorruptDataError, DataSizeError, NonFiniteLossError)


class _ArgumentParser(LightningArgumentParser):
    """Ends an error about a class-valued key whose class was not found (``--model.optimizer Sgd``)
    with the classes that key knows, which jsonargparse otherwise lists only in ``--help``; not when
    they are hundreds (``model.net`` knows every ``torch.nn.Module``)."""

    def error(self, message: str, ex: Exception | None = None):
        key = re.match(r'Parser key "([^"]+)"', message)
        action = key and self._option_string_actions.get(f"--{key[1]}")
        known = getattr(action, "extra_help", lambda: "")().partition("known subclasses: ")[2]
        if known and known.count(",") < 30 and "Problem with given class_path" not in message:
            message += f"\n  {key[1]} takes one of: {known} (a class name alone, as in SGD, will do)"
        super().error(message, ex)


class BNLightningCLI(LightningCLI):
    """LightningCLI with LeNet as the default network, a checkpoint callback always on, and
    ``fit`` followed by ``test`` on the best checkpoint, logged into the same run (so a run's
    TensorBoard folder holds its final test accuracy beside its curves)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit only: test the best checkpoint when fit ends"
        )
        parser.set_defaults({"model.net": {"class_path": "bn_lightning.model.LeNet"}})
        # Always keep the best epoch by validation accuracy ...
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # ... and last.ckpt, rewritten at the end of every epoch (for --ckpt_path last). Not through the
        # callback above's save_last: Lightning 2.6 rewrites that one only when a new best is saved.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False})

    def instantiate_trainer(self, **kwargs):
        """``trainer.sync_batchnorm: true`` synchronizes our BN as well as torch's (BatchNormSync)."""
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("sync_batchnorm") and "plugins" not in kwargs:
            plugins = trainer.get("plugins") or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), BatchNormSync()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._load_weights_only()
        self._resume()

    def before_validate(self) -> None:
        self._load_weights_only()

    def before_test(self) -> None:
        self._load_weights_only()

    def before_predict(self) -> None:
        self._load_weights_only()

    def _load_weights_only(self) -> None:
        """Checkpoints load with ``torch.load(weights_only=True)`` unless ``--weights_only false`` says otherwise:
        ours hold tensors, numbers, strings and containers only, nothing to unpickle."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True

    def _checkpoint_folders(self) -> list[Path]:
        """Where ``--ckpt_path last`` looks: every run of the logger's name, unless checkpoints go to one set folder."""
        callback = self.trainer.checkpoint_callback
        if isinstance(self.trainer.logger, TensorBoardLogger) and not (callback is not None and callback.dirpath):
            return run_folders(self.trainer.logger)
        return [checkpoint_dir(self.trainer)]

    def _resume(self) -> None:
        """``--ckpt_path last``: the newest ``last*.ckpt`` or ``interrupted.ckpt`` of the run (of every
        ``version_*`` of the logger's name when its version is not set); no checkpoint yet starts a new run,
        so a job can always pass it. A checkpoint inside one of the logger's run folders is resumed into
        that folder: TensorBoard events from its step on are replaced, the checkpoint callback keeps its
        best-so-far, and the resumed command's config is saved beside the first as ``config.resumed-step<N>.yaml``."""
        config = self.config_init[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            folders = self._checkpoint_folders()
            found = find_last_checkpoint(folders)
            if found is None:
                rank_zero_info(f"--ckpt_path last: no checkpoint in {', '.join(map(str, folders)) or 'no run folder'}"
                               "; starting a new run.")
                config["ckpt_path"] = None
                return
            config["ckpt_path"] = ckpt_path = str(found)
        if not ckpt_path or not Path(ckpt_path).is_file() or not isinstance(self.trainer.logger, TensorBoardLogger):
            return  # "best", "hpc", a missing file...: Lightning's own handling and messages
        step = torch.load(ckpt_path, map_location="cpu", weights_only=config["weights_only"])["global_step"]
        if not continue_run(self.trainer.logger, Path(ckpt_path), step):
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):
                callback.config_filename, callback.overwrite = f"config.resumed-step{step}.yaml", True
        # The checkpoint folder is the run's own, of course not empty.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        rank_zero_info(f"Resuming {ckpt_path} at step {step} in {self.trainer.logger.log_dir}: "
                       f"its TensorBoard events from step {step} on are replaced.")

    def instantiate_classes(self) -> None:
        """A constructor's ValueError is a bad setting: reported as a parse error, without a traceback."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            self.parser.error(str(err), err)

    def after_instantiate_classes(self) -> None:
        """Before a fit reads any data: a learning rate that is not positive is rejected, and building
        the optimizer once lets torch.optim check its other settings (momentum, weight_decay...)."""
        if self.subcommand != "fit":
            return
        lr = self.config.fit.get("model.optimizer.init_args.lr")
        if lr is not None and not lr > 0:
            self.parser.error(f"model.optimizer.init_args.lr must be a positive learning rate, got {lr}; "
                              "set it in the config or with --model.optimizer.init_args.lr")
        try:
            self.model.configure_optimizers()
        except ValueError as err:
            self.parser.error(f"model.optimizer.init_args: {err}", err)

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)


def main(args=None) -> BNLightningCLI:
    """Run the CLI. A fit stopped by SIGTERM or Ctrl-C (``StopAndResume``, on in every run) exits with
    status 143 or 130, as a shell reports those signals, after saving ``checkpoints/interrupted.ckpt``."""
    stopper = StopAndResume()
    try:
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
                "callbacks": [stopper],
            },
            args=args,
            parser_class=_ArgumentParser,
            parser_kwargs={"prog": "python -m bn_lightning"},
        )
    except CLEAR_ERRORS as err:
        sys.exit(f"error: {err}")
    except SIGTERMException as stop:  # a SystemExit without a code, which would exit with 0
        raise SystemExit(EXIT_CODES[stopper.requested or signal.SIGTERM]) from stop

