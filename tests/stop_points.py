"""Test-only callbacks that stop training at a chosen step (imported by tests/test_resume.py, and by the
CLI runs it starts, through a config entry ``class_path: stop_points.PauseAtStep``)."""

import os
import time
from pathlib import Path

from lightning.pytorch import Callback

from bn_lightning.training.resume import StopAndResume


class PauseAtStep(Callback):
    """Once ``step`` optimizer steps are done, writes ``marker`` and waits (up to ``timeout`` s) for a stop signal.

    The test that started the process waits for the marker, then sends SIGTERM: the signal always
    arrives while this batch is paused, so the stop lands after exactly ``step`` steps, mid-epoch,
    however fast or slow the machine is. Listed before the CLI's ``StopAndResume`` among the
    callbacks, it runs first; that one then sees the request in the same ``on_train_batch_end``.
    """

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, Path(marker), timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        stoppers = [cb for cb in trainer.callbacks if isinstance(cb, StopAndResume)]
        self.marker.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + self.timeout
        while not any(cb.requested for cb in stoppers) and time.monotonic() < deadline:
            time.sleep(0.01)


class SignalAtStep(Callback):
    """Sends ``signum`` to its own process once ``step`` optimizer steps are done (in-process tests)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RaiseAtStep(Callback):
    """Raises ``RuntimeError`` inside the training step that would make ``step`` steps (before the optimizer runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"failing on purpose at step {self.step}")
