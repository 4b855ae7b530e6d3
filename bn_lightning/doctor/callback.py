"""``BatchNormDoctor``: the doctor as a Lightning callback, for any ``Trainer(callbacks=[...])``."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from bn_lightning.doctor.checks import loader_findings, select, static_findings, unsynchronized
from bn_lightning.doctor.findings import Finding, finding
from bn_lightning.doctor.observe import Observer, preserved
from bn_lightning.nn.precise_bn import update_bn_stats
from bn_lightning.nn.registry import batch_norm_layers

__all__ = ["BatchNormDoctor", "BatchNormMistake"]


class BatchNormMistake(RuntimeError):
    """A finding of severity ``error`` under ``BatchNormDoctor(strict=True)``."""


class BatchNormDoctor(Callback):
    """Checks the model for the classic batch-norm mistakes (:mod:`bn_lightning.doctor`) at setup, over the
    first ``steps`` training steps, at the first batch of validation, test and predict, and once when fit
    ends (``BN008``: the validation accuracy with precise statistics from ``precise_images`` training images
    against the running ones; 0 skips it), then stays out of the way: its hooks are removed after those
    steps. Each finding is reported once, as a warning on rank zero, and kept in :attr:`findings`;
    with ``strict=True`` a finding of severity ``error`` fails the fit with the same message.
    ``benchmarks/doctor_overhead.py`` measures what it costs."""

    def __init__(self, steps: int = 3, *, strict: bool = False, ignore: Iterable = (), precise_images: int = 4096
                 ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be a positive number of training steps to watch, got {steps}")
        self.steps, self.strict, self.ignore, self.precise_images = steps, strict, tuple(ignore), precise_images
        self.findings: list[Finding] = []
        self._observer: Observer | None = None
        self._watched_steps = 0
        self._evaluated: set[str] = set()

    # -- when it looks --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._observer = Observer(pl_module)
        self._watched_steps, self._evaluated = 0, set()  # a fit, validate or test of its own: look again
        self._report(static_findings(pl_module, probed=stage == "fit"), pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        found = static_findings(pl_module, probed=True)
        trainable = set()
        for optimizer in trainer.optimizers:
            found += static_findings(pl_module, optimizer, probed=True)
            trainable |= {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._observer.trainable = trainable or None
        self._report(found, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        found = [] if loader is None else loader_findings(loader, pl_module)
        batch_size = getattr(loader, "batch_size", None)
        if batch_size:
            found += unsynchronized(pl_module, batch_size, trainer.world_size)
        self._report(found, pl_module)
        self._observer.attach()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._watched_steps >= self.steps:
            self._observer.detach()
            return
        self._watched_steps += 1
        self._report(self._observer.findings(), pl_module)
        if self._watched_steps == self.steps:
            self._observer.detach()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_starts("validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_starts("test")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_starts("predict")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_ends("validation", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_ends("test", pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_ends("predict", pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.precise_images > 0:
            self._report(self._lag(trainer, pl_module), pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._observer is not None:
            self._observer.detach()

    # -- what it does ---------------------------------------------------------------------------------------
    def _evaluation_starts(self, stage: str) -> None:
        if stage in self._evaluated:
            return
        self._observer.evaluating = stage
        self._observer.attach()

    def _evaluation_ends(self, stage: str, pl_module: LightningModule) -> None:
        if stage in self._evaluated:
            return
        self._evaluated.add(stage)
        self._observer.evaluating = None
        self._report(self._observer.findings(), pl_module)
        if self._watched_steps >= self.steps or not pl_module.trainer.training:
            self._observer.detach()

    def _report(self, found: list[Finding], pl_module: LightningModule) -> None:
        seen = {(f.code, f.layer) for f in self.findings}
        for f in select(found, pl_module, self.ignore):
            if (f.code, f.layer) in seen:
                continue
            seen.add((f.code, f.layer))
            self.findings.append(f)
            if self.strict and f.severity == "error":
                raise BatchNormMistake(str(f))
            rank_zero_warn(str(f))

    def _lag(self, trainer: Trainer, pl_module: LightningModule) -> list[Finding]:
        """BN008: validation accuracy with precise statistics against the running ones, when the batches are
        ``(input, integer labels)`` and the module's output is class scores; otherwise nothing to compare."""
        val, train = trainer.val_dataloaders, trainer.train_dataloader
        val = val[0] if isinstance(val, list | tuple) else val
        if val is None or train is None or not batch_norm_layers(pl_module, tracked=True):
            return []
        running = _accuracy(pl_module, val)
        if running is None:
            return []
        with preserved(pl_module):
            images = update_bn_stats(pl_module, _first_images(train, self.precise_images, pl_module.device))
            precise = _accuracy(pl_module, val)
        n = running[1]
        se = math.sqrt(max(running[0] * (1 - running[0]), 1 / n) / n)
        if precise[0] - running[0] <= 2 * se:
            return []
        return [finding("BN008", "", f"with precise statistics from {images} training images the validation "
                        f"accuracy is {precise[0]:.4f}, with the running statistics {running[0]:.4f}: more than two "
                        f"binomial standard errors ({2 * se:.4f}) apart, so the moving average lags the weights.",
                        "evaluate with precise statistics (bn_lightning.callbacks.PreciseBN, or update_bn_stats "
                        "before the final evaluation), or anneal the learning rate at the end of training.")]


def _first_images(loader, count: int, device: torch.device):
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        yield x.to(device)
        seen += x.shape[0]
        if seen >= count:
            return


@torch.no_grad()
def _accuracy(module: LightningModule, loader) -> tuple[float, int] | None:
    """(accuracy, images) of ``module`` in eval mode, or None when the batches are not (input, labels) pairs
    with class-score outputs."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    correct = seen = 0
    try:
        for batch in loader:
            if not (isinstance(batch, list | tuple) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)
                    and not batch[1].is_floating_point()):
                return None
            scores = module(batch[0].to(module.device))
            if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
                return None
            correct += int((scores.argmax(1) == batch[1].to(module.device)).sum())
            seen += len(batch[1])
    finally:
        for m, training in modes.items():
            m.training = training
    return (correct / seen, seen) if seen else None
