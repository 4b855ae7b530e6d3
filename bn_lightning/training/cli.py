"""``python -m bn_lightning fit|validate|test|predict --config configs/<run>.yaml``."""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from importlib import import_module
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bn_lightning.training.arguments import _ArgumentParser, translate_legacy
from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir
from bn_lightning.training.errors import CLEAR_ERRORS
from bn_lightning.training.module import Classifier
from bn_lightning.training.progress import ProgressBar
from bn_lightning.training.resume import EXIT_CODES, StopAndResume, find_last_checkpoint, run_folders
from bn_lightning.training.sync import BatchNormSync

# What every run shares; a run config says only what differs (configs/*.yaml).
DEFAULTS = Path(__file__).with_name("defaults.yaml")
LIGHTNING_CKPT_NAMES = {"best", "last", "hpc", "registry"}  # --ckpt_path values Lightning resolves itself


class BNLightningCLI(LightningCLI):
    """LightningCLI with the shared settings of ``defaults.yaml`` as defaults, a checkpoint callback
    always on, and ``fit`` followed by ``test`` on the best checkpoint, logged into the same run (so a
    run's TensorBoard folder holds its final test accuracy beside its curves)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="fit only: test the best checkpoint when fit ends"
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(yaml.safe_load(DEFAULTS.read_text()))

    def before_instantiate_classes(self) -> None:
        """Settings decided before anything is built, written into the config so that config.yaml records
        them: the data folder, the training order's seed, weights-only checkpoint loading, and where
        ``--ckpt_path last`` resumes."""
        config = self.config[self.subcommand]
        # The DataModule's own rules for these two, applied here because under LightningCLI its
        # hyperparameters are the config's: config.yaml and hparams.yaml then record what was chosen.
        if config.data.data_dir is None:
            config.data.data_dir = resolve_data_dir()
        if config.data.shuffle_seed is None:  # seed_everything's seed, set by now
            config.data.shuffle_seed = torch.initial_seed()
        if config.get("weights_only") is None:
            # Our checkpoints hold tensors, numbers, strings and containers only, nothing to unpickle.
            config.weights_only = True
        if self.subcommand == "fit":
            lr = config.get("model.optimizer.init_args.lr")
            if lr is not None and not lr > 0:
                self.parser.error(f"model.optimizer.init_args.lr must be a positive learning rate, got {lr}; "
                                  "set it in the config or with --model.optimizer.init_args.lr")
            self._resume(config)

    def _resume(self, config) -> None:
        """``--ckpt_path last``: the newest ``last*.ckpt`` or ``interrupted.ckpt`` of the run (of every
        ``version_*`` of the logger's name when its version is not set); no checkpoint yet starts a new
        run, so a job can always pass it. A checkpoint inside one of the TensorBoard logger's run folders
        is resumed into that folder: the logger is built with that version and ``purge_step``, so
        TensorBoard drops the events the stopped process logged from the checkpoint's step on; the
        checkpoint callback keeps its best-so-far, and the resumed command's config is saved beside the
        first as ``config.resumed-step<N>.yaml``."""
        logger = _tensorboard_logger_args(config.trainer.logger)
        root = Path(logger.save_dir) / (logger.name or "") if logger is not None else None
        if config.ckpt_path == "last":
            folders = self._checkpoint_folders(config, root, logger)
            found = find_last_checkpoint(folders)
            if found is None:
                rank_zero_info(f"--ckpt_path last: no checkpoint in {', '.join(map(str, folders)) or 'no run folder'}"
                               "; starting a new run.")
                config.ckpt_path = None
                return
            config.ckpt_path = str(found)
        checkpoint = Path(config.ckpt_path) if config.ckpt_path else None
        if checkpoint is not None and not checkpoint.is_file() and str(checkpoint) not in LIGHTNING_CKPT_NAMES:
            self.parser.error(f"--ckpt_path {checkpoint}: no such checkpoint file; give the path of a .ckpt file, "
                              "or --ckpt_path last to resume the run's newest checkpoint")
        if checkpoint is None or not checkpoint.is_file() or root is None:
            return  # "best", "hpc", a missing file...: Lightning's own handling and messages
        run = checkpoint.resolve().parent.parent
        if checkpoint.resolve().parent.name != "checkpoints" or run.parent != root.resolve():
            return  # not one of this logger's runs: a new run starts from its weights
        if logger.version is not None and run_folders(root, logger.version)[0].parent.resolve() != run:
            return
        step = torch.load(checkpoint, map_location="cpu", weights_only=config.weights_only)["global_step"]
        if step <= 0:
            return
        # The SummaryWriter's purge_step writes a SessionLog START at step: TensorBoard's readers drop
        # every older event at that step or later, which the resumed process logs again.
        logger.version, logger.purge_step, logger.default_hp_metric = run.name, step, False
        self.save_config_kwargs |= {"config_filename": f"config.resumed-step{step}.yaml", "overwrite": True}
        # The checkpoint folder is the run's own, of course not empty.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        rank_zero_info(f"Resuming {checkpoint} at step {step} in {run}: "
                       f"its TensorBoard events from step {step} on are replaced.")

    def _checkpoint_folders(self, config, root: Path | None, logger) -> list[Path]:
        """Where ``--ckpt_path last`` looks: checkpoint.dirpath when set, else the TensorBoard logger's
        runs, else (no logger) the trainer's ``default_root_dir``, as Lightning places checkpoints."""
        if config.checkpoint.dirpath:
            return [Path(config.checkpoint.dirpath)]
        if root is not None:
            return run_folders(root, logger.version)
        if not config.trainer.logger:
            return [Path(config.trainer.default_root_dir or ".") / "checkpoints"]
        self.parser.error("--ckpt_path last looks for the run's checkpoints in the TensorBoard logger's run "
                          "folders or in checkpoint.dirpath: set --checkpoint.dirpath, or give --ckpt_path the "
                          "checkpoint's path")

    def instantiate_trainer(self, **kwargs):
        """``trainer.sync_batchnorm: true`` synchronizes our BN as well as torch's (BatchNormSync); the progress
        bar, when on, is ours (``progress.ProgressBar``: a resumed epoch shows its number and total)."""
        trainer = self.config_init[self.subcommand].trainer
        if trainer.enable_progress_bar is not False and not any(
                isinstance(callback, ProgressBarBase) for callback in trainer.callbacks or []):
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults.get("callbacks", []), ProgressBar()]
        if trainer.sync_batchnorm and "plugins" not in kwargs:
            plugins = trainer.plugins or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), BatchNormSync()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """A constructor's ValueError is a bad setting: reported as a parse error, without a traceback."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            self.parser.error(str(err), err)

    def after_instantiate_classes(self) -> None:
        """Before a fit reads any data, building the optimizer once lets torch.optim check its settings
        (momentum, weight_decay...)."""
        if self.subcommand != "fit":
            return
        try:
            self.model.configure_optimizers()
        except ValueError as err:
            self.parser.error(f"model.optimizer.init_args: {err}", err)

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        best = self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)


def _tensorboard_logger_args(logger):
    """The init_args of a configured TensorBoardLogger (a subclass too), or None for any other logger or none."""
    if not (hasattr(logger, "class_path") and logger.init_args is not None):
        return None
    module, _, name = logger.class_path.rpartition(".")
    cls = getattr(import_module(module), name) if module else None
    return logger.init_args if isinstance(cls, type) and issubclass(cls, TensorBoardLogger) else None


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's tip to install litlogger, printed at every fit: an advertisement, not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """What a fit would print that its user did not cause: Lightning's litlogger advertisement, and the
    FutureWarning torch raises on Lightning 2.6's own use of its deprecated pytree API (``LeafSpec``)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisement())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(args=None) -> BNLightningCLI:
    """Run the CLI. A fit stopped by SIGTERM or Ctrl-C (``StopAndResume``, on in every run) exits with
    status 143 or 130, as a shell reports those signals, after saving ``checkpoints/interrupted.ckpt``."""
    stopper = StopAndResume()
    quiet_lightning()
    try:
        if args is None:  # the command line, read by LightningCLI itself (given args, it warns of a mix-up)
            sys.argv[1:] = translate_legacy(sys.argv[1:])
        else:
            args = translate_legacy(args)
    except ValueError as err:  # a bad command line, as the parser reports one
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    try:
        return BNLightningCLI(
            Classifier,
            FashionMNISTDataModule,
            trainer_defaults={"callbacks": [stopper]},  # the rest of the defaults: defaults.yaml
            args=args,
            parser_class=_ArgumentParser,
            # No abbreviations: --trainer.max_epoch is an error with a suggestion, not max_epochs silently.
            parser_kwargs={"prog": "python -m bn_lightning", "allow_abbrev": False},
        )
    except CLEAR_ERRORS as err:
        sys.exit("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()))
    except SIGTERMException as stop:  # a SystemExit without a code, which would exit with 0
        raise SystemExit(EXIT_CODES[stopper.requested or signal.SIGTERM]) from stop

