"""``python -m bn_lightning fit|validate|test|predict --config configs/<run>.yaml``."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import signal
import sys
import warnings
from importlib import import_module
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bn_lightning.nn import legacy
from bn_lightning.training._private import known_subclasses, option_groups, option_strings
from bn_lightning.training.data import FashionMNISTDataModule, resolve_data_dir
from bn_lightning.training.errors import CLEAR_ERRORS
from bn_lightning.training.module import Classifier
from bn_lightning.training.progress import ProgressBar
from bn_lightning.training.resume import EXIT_CODES, StopAndResume, find_last_checkpoint, run_folders
from bn_lightning.training.sync import BatchNormSync

# What every run shares; a run config says only what differs (configs/*.yaml).
DEFAULTS = Path(__file__).with_name("defaults.yaml")
LIGHTNING_CKPT_NAMES = {"best", "last", "hpc", "registry"}  # --ckpt_path values Lightning resolves itself
# Run configs renamed since release 0.1: a clear message instead of "file does not exist".
RENAMED_CONFIGS = {"seed_adam.yaml": "blog_adam.yaml", "seed_adam_scratch.yaml": "blog_adam_scratch.yaml"}


class _ArgumentParser(LightningArgumentParser):
    """A bad command line ends in one ``error:`` line that says what was wrong and how to fix it, without the
    usage dump (``--help`` shows that): an unknown option gets the closest valid one, a class-valued key whose
    class was not found (``--model.optimizer Sgd``) the classes it knows, when they are few."""

    def format_help(self) -> str:
        """A subcommand's options one line each (``fit --help`` was 1,665 lines, most of them every
        ``torch.nn.Module`` subclass): ``--<key>.help CLASS`` shows one class's options in full."""
        subcommand = self.prog.rsplit(" ", 1)[-1] in LightningCLI.subcommands()
        return compact_help(self) if subcommand else super().format_help()

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse parsing a part (a subcommand, a nested class): it handles this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {one_line(message, parser)}\n")
        sys.exit(2)


def compact_help(parser, width: int = 118) -> str:
    """Every option of ``parser`` on one line, its default and the first sentence of its help, by group."""
    lines = [f"usage: {parser.prog} [--config FILE] [--KEY VALUE ...]", "",
             "Each option with its default and the first sentence of its help. A class-valued option takes a class",
             "name or path; --KEY.help CLASS lists that class's own options (--model.net.help LeNet).", ""]
    for title, actions in option_groups(parser):
        shown = [action for action in actions if action.help != argparse.SUPPRESS and action.option_strings]
        if not shown:
            continue
        lines.append(title.split(":")[0].split(". ")[0].rstrip(".") + ":")
        for action in shown:
            name = max((o for o in action.option_strings if not o.endswith("+")), key=len, default=action.option_strings[0])
            default = _default(parser, action)
            summary = re.split(r"(?<=[.!?])\s|\s\(type:", " ".join(str(action.help or "").split()))[0].rstrip(".")
            text = f"  {name:<44} {f'[{default}] ' if default else ''}{summary}"
            lines.append(text if len(text) <= width else text[:width - 3] + "...")
        lines.append("")
    return "\n".join(lines)


def _default(parser, action) -> str:
    """An option's default as one short word: a class's name, a value; "" when there is none to show."""
    try:
        value = parser.get_default(action.dest)
    except (KeyError, TypeError, ValueError):
        return ""
    if isinstance(value, dict) or hasattr(value, "class_path"):
        value = value.get("class_path") if isinstance(value, dict) else value.class_path
        value = str(value).rsplit(".", 1)[-1]
    if value is None or value == argparse.SUPPRESS or isinstance(value, (list, tuple)) and not value:
        return ""
    if isinstance(value, (list, tuple)) and all(isinstance(item, dict) or hasattr(item, "class_path") for item in value):
        return f"{len(value)} classes"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def one_line(message: str, parser) -> str:
    """jsonargparse's message, nested over several lines, as one: the option's full name, what it expected and
    what it got, with the closest valid option for an unknown one and the classes a class-valued key takes."""
    unknown = re.match(r"unrecognized arguments: (--[\w.]+)", message)
    if unknown:
        close = difflib.get_close_matches(unknown[1], option_strings(parser), n=1, cutoff=0.6)
        return message + (f"; did you mean {close[0]}?" if close else "; --help lists the options")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    option = keys[0] + "".join(f".init_args.{key}" for key in keys[1:])
    expected = re.findall(r"Expected a (?:typing\.)?(Literal\[.*?\]|<class '(\w+)'>|[^:\n.]+)", message)
    given = re.search(r"(?:Given|Got) value: (.*)|but (\S+) either not accessible", message)
    found = re.search(r"File does not exist: (.*)", message)
    if found:
        return f"--{option} {found[1]}: no such file"
    known = known_subclasses(parser, keys[0])
    if known and known.count(",") < 30 and "Problem with given class_path" not in message:
        return f"--{option}: {given[1] or given[2] if given else 'that'} is not a class it knows; it takes one of: {known} " \
               "(a class name alone, as in SGD, will do)"
    if expected and given:
        kinds = [name or ("one of " + kind.removeprefix("Literal[").removesuffix("]") if kind.startswith("Literal")
                          else kind) for kind, name in expected]
        kinds = ["null" if kind == "NoneType" else kind for kind in dict.fromkeys(kinds)]
        return f"--{option}: expected {' or '.join(kinds)}, got {given[1] or given[2]}"
    return f"--{option}: " + " ".join(line.strip() for line in message.splitlines()[1:] if line.strip())


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


LENET_PATHS = {"bn_lightning.LeNet", "bn_lightning.nn.LeNet", "bn_lightning.nn.lenet.LeNet", "bn_lightning.model.LeNet"}
FLAT_FLAG = "--model.net.init_args."


def translate_legacy(args: list[str]) -> list[str]:
    """Release 0.1's LeNet spelling, in a config file (a run folder's config.yaml) or a flag
    (``--model.net.init_args.bn_momentum=0.01``), as today's, with a FutureWarning that shows it."""
    args, found = list(args), []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args) or arg.startswith("--config="):
            at = i + 1 if arg == "--config" else i
            path = Path(args[at].removeprefix("--config="))
            if path.suffix in (".yaml", ".yml") and not path.is_file():
                renamed = RENAMED_CONFIGS.get(path.name)
                raise ValueError(f"--config {path}: no such file" + (
                    f"; it is {path.with_name(renamed)} since release 0.2" if renamed else
                    "; the run configs are in configs/ (python -m bn_lightning fit --config configs/lenet_bn_scratch.yaml)"))
            config = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") and path.is_file() else None
            net = (config.get("model") or {}).get("net") if isinstance(config, dict) else None
            if not (isinstance(net, dict) and net.get("class_path") in LENET_PATHS):
                continue
            init_args = net.get("init_args") or {}
            if net["class_path"] == "bn_lightning.model.LeNet" or legacy.uses_flat_arguments(init_args):
                net["class_path"], net["init_args"] = "bn_lightning.nn.LeNet", legacy.translate(init_args)
                text = yaml.safe_dump(config, sort_keys=False)
                args[at] = text if arg == "--config" else f"--config={text}"
                found.append(f"{path}: model.net is {net}")
        elif arg.startswith(FLAT_FLAG) and arg[len(FLAT_FLAG):].partition("=")[0] in legacy.FLAT:
            key, _, value = arg[len(FLAT_FLAG):].partition("=")
            new = legacy.FLAT[key][1]
            args[i] = (f'{FLAT_FLAG}norm_kwargs={{"{new}": null}}' if value in ("null", "None")
                       else f"{FLAT_FLAG}norm_kwargs.{new}={value}")
            found.append(f"{arg} is {args[i]}")
    for change in found:
        warnings.warn(f"release 0.1's LeNet arguments, read as today's: {change}", FutureWarning, stacklevel=2)
    return args


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

