"""Stop a run at any moment and continue it exactly where it stopped.

Wired into every run by ``bn_lightning.training.cli``, with the training order of ``bn_lightning.training.sampling``:

- ``StopAndResume``: on SIGTERM or a first Ctrl-C, training stops after the training batch (and the
  validation, when one is due) in progress, the way Lightning stops on SIGTERM, and the state at that
  moment is saved to ``checkpoints/interrupted.ckpt`` beside the run's ``last.ckpt``; any other
  exception during training (or a second Ctrl-C) saves it too, marked as taken mid-batch. Every
  checkpoint also holds the global RNG states, restored when training resumes.
- ``find_last_checkpoint`` and ``run_folders``: ``--ckpt_path last`` finds the newest of the run's
  ``last*.ckpt`` and ``interrupted.ckpt``; the CLI then builds the logger into that run's folder.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bn_lightning.training._private import rewind_to_last_completed_batch, set_stop_requested
from bn_lightning.training.errors import NonFiniteLossError

INTERRUPTED = "interrupted"  # checkpoints/interrupted.ckpt: the state when a run stopped early
EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}  # as a shell reports them


def rng_states() -> dict:
    """The global RNG states (torch, CUDA, numpy, random) as tensors, ints and lists: weights-only loadable."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": [version, list(python_state), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_dir(trainer: Trainer) -> Path:
    """Where the run's ModelCheckpoint writes (``<log_dir>/checkpoints`` by default)."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    if trainer.loggers and trainer.log_dir is not None:
        return Path(trainer.log_dir) / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


class StopAndResume(Callback):
    """Stops training cleanly on SIGTERM or Ctrl-C and leaves a checkpoint of that moment; keeps the RNG in checkpoints.

    While training runs, SIGTERM and SIGINT (Ctrl-C) only ask for a stop. It happens once the
    training batch in progress is finished, together with the validation that follows it, if one
    is due: the callback then sets the flag Lightning sets on SIGTERM, and Lightning's loops raise
    ``SIGTERMException`` at their next batch or epoch boundary (a stop is held back while validation
    runs, so validation never stops half-way). A second Ctrl-C stops at once (``KeyboardInterrupt``).

    When fit ends on an exception after training has started, the state is saved to
    ``<checkpoint dir>/interrupted.ckpt`` (where ``last.ckpt`` goes). A stop on a signal saves it
    at a batch boundary, from which a resumed fit continues exactly; any other exception, or a
    second Ctrl-C, saves the state mid-batch, marked so, and resuming from it warns that it is not
    exact; a diverged run (``NonFiniteLossError``, or weights no longer finite) is not saved. A fit
    that finishes removes the file. Every checkpoint the trainer writes also holds the global RNG
    states, which a resumed fit restores before its first batch.

    Lightning specifics relied on (2.6): the flag its loops check on SIGTERM (``set_stop_requested``);
    Lightning installs its SIGTERM handler just before the sanity check, so this
    callback installs its own from ``on_sanity_check_start``/``on_train_start`` on and restores the
    previous ones when training ends. Single-process training only: with several processes
    (``trainer.world_size > 1``) it does nothing, leaving SIGTERM to Lightning, whose checkpoint
    saving would wait for every process at a barrier.
    """

    def __init__(self, filename: str = INTERRUPTED) -> None:
        if not filename:
            raise ValueError("StopAndResume: filename must name the checkpoint file (without .ckpt)")
        self.filename = filename
        self.requested: signal.Signals | None = None  # the signal that asked for the stop
        self.saved: Path | None = None  # the checkpoint written when fit stopped early
        self._previous_handlers: dict[signal.Signals, object] = {}
        self._training = False
        self._active = True  # single process
        self._rng_to_restore: dict | None = None
        self._saving: dict | None = None  # how the checkpoint being written came about

    # -- what every checkpoint carries ------------------------------------------------------------
    def state_dict(self) -> dict:
        saving = self._saving or {"stopped_by": None, "at_batch_boundary": True}
        return {"rng": rng_states(), **saving}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if not self._saving or self._saving["at_batch_boundary"]:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.processed < progress.ready:  # stopped inside a batch's step: resume runs it again
            rewind_to_last_completed_batch(checkpoint, progress.completed)

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng_to_restore = state_dict.get("rng")
        if state_dict.get("at_batch_boundary") is False:
            rank_zero_warn(
                f"This checkpoint was saved when training stopped on {state_dict.get('stopped_by')} in the middle"
                " of a training batch: training continues from that state, but not exactly as the run would have."
                " last.ckpt holds the last state saved between batches."
            )

    # -- signals ------------------------------------------------------------------------------------
    def _install(self) -> None:
        if not self._active or self._previous_handlers or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping
        self.requested = signal.Signals(signum)
        how = "press Ctrl-C again to stop at once" if signum == signal.SIGINT else "saving a checkpoint"
        # os.write: a print from a signal handler could land inside another write to the stream.
        os.write(2, f"\n{self.requested.name} received: stopping after the current training batch ({how}).\n".encode())

    def _forward_stop(self, trainer: Trainer) -> None:
        if self.requested is not None:
            set_stop_requested(trainer, True)

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._active = trainer.world_size == 1
        if stage == "fit":
            self.requested, self.saved = None, None

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()
        self._training = self._active
        if self._rng_to_restore is not None and self._active:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._forward_stop(trainer)  # a signal during the sanity check

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._forward_stop(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._training and trainer.received_sigterm and self.requested is not None:
            set_stop_requested(trainer, False)  # held back until validation ends

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._training:
            self._forward_stop(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training = False
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()
        if not self._training or trainer.state.fn != TrainerFn.FITTING:
            return
        self._training = False
        at_boundary = isinstance(exception, SIGTERMException)
        if at_boundary:
            stopped_by = self.requested.name if self.requested is not None else "SIGTERM"
        else:  # a second Ctrl-C is a KeyboardInterrupt
            stopped_by = type(exception).__name__
        path = checkpoint_dir(trainer) / f"{self.filename}.ckpt"
        tensors = (*pl_module.parameters(), *pl_module.buffers())
        if isinstance(exception, NonFiniteLossError) or not all(t.isfinite().all() for t in tensors if t.is_floating_point()):
            # A diverged state is not worth resuming: last.ckpt and the others keep the last good one.
            rank_zero_info(f"Training stopped on {stopped_by} after diverging: not saved to {path}.")
            return
        self._saving = {"stopped_by": stopped_by, "at_batch_boundary": at_boundary}
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the whole state, optimizer and loops included
        except Exception as error:  # never hide the exception that stopped training
            rank_zero_warn(f"Could not save {path} after training stopped on {stopped_by}: {error!r}")
            return
        finally:
            self._saving = None
        self.saved = path
        where = "between two batches" if at_boundary else "in the middle of a batch (resuming from it is not exact)"
        message = (f"Training stopped on {stopped_by} at epoch {trainer.current_epoch}, step {trainer.global_step}. "
                   f"Saved the state, {where}, to {path}. Continue with the same command plus --ckpt_path last "
                   f"(or --ckpt_path {path}).")
        if trainer.progress_bar_callback is not None:  # on a line of its own, not glued to the bar's
            trainer.progress_bar_callback.print(message)
        else:
            rank_zero_info(message)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()
        if stage == "fit" and trainer.is_global_zero:  # fit finished: an earlier stop's checkpoint is stale
            (checkpoint_dir(trainer) / f"{self.filename}.ckpt").unlink(missing_ok=True)


def _is_last(path: Path, interrupted: str) -> bool:
    # Lightning's own names for the last checkpoint: last.ckpt, last-v1.ckpt, ...
    return path.suffix == ".ckpt" and (path.stem in ("last", interrupted) or path.stem.startswith("last-"))


def find_last_checkpoint(folders: list[Path], interrupted: str = INTERRUPTED) -> Path | None:
    """The most recently written ``last*.ckpt`` or ``interrupted.ckpt`` in ``folders`` (Lightning's rule for "last")."""
    candidates = [p for folder in folders if folder.is_dir() for p in folder.iterdir() if _is_last(p, interrupted)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def run_folders(root: Path, version: int | str | None) -> list[Path]:
    """The checkpoint folders of a TensorBoardLogger's runs under ``root`` (``save_dir/name``): its
    version's, or every ``version_*``'s when the version is not set."""
    if version is not None:
        return [root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    return sorted(root.glob("version_*/checkpoints"))
