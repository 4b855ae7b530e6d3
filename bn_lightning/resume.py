"""Stop a run at any moment and continue it exactly where it stopped.

Three pieces, wired into every run by ``bn_lightning.cli``:

- ``EpochShuffle`` and ``ResumableLoader``: the training order is a permutation drawn from
  ``(seed, epoch)`` alone, never from the global RNG, and the loader's position in the epoch is part
  of every checkpoint (Lightning saves the ``state_dict`` of a train loader that has one, and loads it
  back before the resumed epoch's first batch), so a resumed epoch serves the batches the stopped
  one had not served yet, in the same order.
- ``StopAndResume``: on SIGTERM or a first Ctrl-C, training stops after the training batch (and the
  validation, when one is due) in progress, the way Lightning stops on SIGTERM, and the state at that
  moment is saved to ``checkpoints/interrupted.ckpt`` beside the run's ``last.ckpt``; any other
  exception during training (or a second Ctrl-C) saves it too, marked as taken mid-batch. Every
  checkpoint also holds the global RNG states, restored when training resumes.
- ``find_last_checkpoint`` and ``continue_run``: ``--ckpt_path last`` finds the newest of the run's
  ``last*.ckpt`` and ``interrupted.ckpt``, and the resumed fit writes into the same TensorBoard folder,
  purging from the checkpoint's step what the stopped process logged after it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler

from bn_lightning.module import NonFiniteLossError

INTERRUPTED = "interrupted"  # checkpoints/interrupted.ckpt: the state when a run stopped early
EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}  # as a shell reports them


def run_seed() -> int | None:
    """The seed ``seed_everything`` gave this process (LightningCLI calls it), if any."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


class EpochShuffle(Sampler[int]):
    """Indices ``0 .. size - 1``, shuffled by a permutation that depends on ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` before every training epoch. ``skip(n)`` makes the next iteration
    start at the ``n``-th index of the epoch's order (the loader uses it to resume mid-epoch);
    ``len`` stays the whole epoch's, so Lightning's count of batches per epoch does not change.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        self._skip = count

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        # Seed and epoch mixed by numpy's SeedSequence: seed 1 epoch 0 and seed 0 epoch 1 differ.
        words = np.random.SeedSequence(self.seed % 2**63, spawn_key=(epoch,)).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[skip:].tolist())

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A DataLoader over ``EpochShuffle`` whose position in the epoch is saved in checkpoints.

    ``state_dict()`` is ``{"seed", "epoch", "batches"}``: the batches of this epoch the loader has
    handed out. Lightning 2.x saves it in every checkpoint (``FitLoop.on_save_checkpoint`` stores the
    ``state_dict`` of each train loader that has ``state_dict``/``load_state_dict``) and, when a fit
    resumes mid-epoch, calls ``load_state_dict`` before creating the epoch's iterator; the next
    iteration then skips those batches, by starting the sampler past their indices (nothing is
    loaded twice). Lightning fetches no batch ahead from a loader whose length it knows, so the count
    equals the batches training has taken. Its own ``torch.Generator`` seeds worker processes, so
    iterating draws nothing from the global RNG either.

    Given a ``sampler`` (Lightning rebuilds the loader with a ``DistributedSampler`` around ours for
    multi-process training), it is a plain DataLoader: a resumed epoch starts over.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, sampler: Sampler | None = None, **kwargs
    ) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        self.resumable = sampler is None
        if sampler is None:
            sampler = EpochShuffle(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._skip = 0
        self._epoch, self._served = 0, 0  # the epoch being served and how many batches of it went out

    def __iter__(self) -> Iterator:
        # The skip is taken now, not when the first batch is asked for: Lightning may create an
        # iterator it never draws from (resuming at an epoch's end), and the next epoch's must not skip.
        skip, self._skip = self._skip, 0
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator:
        if not self.resumable:
            yield from super().__iter__()
            return
        # Runs from the first next(), after Lightning's set_epoch for this epoch.
        self._epoch, self._served = self.sampler.epoch, skip
        self.sampler.skip(skip * self.batch_size)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        if self.sampler.epoch != self._epoch:  # a new epoch is set but none of its batches went out yet
            return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "batches": 0}
        return {"seed": self.sampler.seed, "epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable or not state:
            return
        self.sampler.seed = state["seed"]
        self.sampler.set_epoch(state["epoch"])
        self._epoch, self._served = state["epoch"], state["batches"]
        self._skip = state["batches"]


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

    Lightning specifics relied on (2.6): ``trainer._signal_connector.received_sigterm`` is the flag
    the loops check; Lightning installs its SIGTERM handler just before the sanity check, so this
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
        if progress.processed < progress.ready:
            # Stopped inside a batch's step: a resumed fit runs that batch again (Lightning's counters go
            # back to the last completed batch), so the loader must serve it again too; and Lightning's
            # restart adds one to the logging step, as if the batch had finished: one less is stored.
            loops = checkpoint["loops"]["fit_loop"]
            for state in loops["state_dict"].get("combined_loader", []):
                if state.keys() == {"seed", "epoch", "batches"}:
                    state["batches"] = min(state["batches"], progress.completed)
            loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1

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
            trainer._signal_connector.received_sigterm = True

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
            trainer._signal_connector.received_sigterm = False  # held back until validation ends

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
        rank_zero_info(
            f"Training stopped on {stopped_by} at epoch {trainer.current_epoch}, step {trainer.global_step}. "
            f"Saved the state, {where}, to {path}. Continue with the same command plus --ckpt_path last "
            f"(or --ckpt_path {path})."
        )

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


def run_folders(logger: TensorBoardLogger) -> list[Path]:
    """The checkpoint folders of the logger's runs: its own version's, or every ``version_*``'s when unset."""
    root = Path(logger.root_dir)
    if logger._version is not None:
        version = logger._version if isinstance(logger._version, str) else f"version_{logger._version}"
        return [root / version / "checkpoints"]
    return sorted(root.glob("version_*/checkpoints"))


def continue_run(logger: TensorBoardLogger, checkpoint: Path, step: int) -> bool:
    """Point ``logger`` at the run folder that holds ``checkpoint`` and purge that run's events from ``step`` on.

    The resumed process logs every step from ``step`` again, so what the stopped one logged at those
    steps goes: ``SummaryWriter(purge_step=step)`` writes a SessionLog START at ``step``, and
    TensorBoard's readers drop every older event at ``step`` or later. Returns False, changing
    nothing, when the checkpoint is not in one of this logger's run folders (or the logger's version
    is set to another one), or when its writer already exists. Uses ``TensorBoardLogger``'s
    ``_version``, ``_kwargs`` (what its ``SummaryWriter`` gets) and ``_default_hp_metric`` (a resumed
    run must not log the placeholder ``hp_metric`` at step 0 again), Lightning 2.x attributes.
    """
    checkpoint = checkpoint.resolve()
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or run.parent != Path(logger.root_dir).resolve():
        return False
    if logger._experiment is not None or step <= 0:
        return False
    if logger._version is not None and Path(logger.log_dir).resolve() != run:
        return False
    logger._version = run.name
    logger._kwargs["purge_step"] = step
    logger._default_hp_metric = False
    return True
