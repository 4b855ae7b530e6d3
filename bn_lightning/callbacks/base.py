"""The base of the callbacks that log on some training steps: which steps (:class:`EveryNSteps`), and
hooks on layers found by type that live for those steps only (:class:`LayerMonitor`)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn


def block_name(qualified_name: str, role: str) -> str:
    """``net.conv1.norm`` -> ``conv1``: the block a layer sits in, as its tags and charts call it."""
    parts = qualified_name.split(".")
    if len(parts) > 1 and parts[0] == "net":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == role:
        parts = parts[:-1]
    return ".".join(parts)


def find_layers(root: nn.Module, types: tuple[type[nn.Module], ...], role: str) -> dict[str, nn.Module]:
    """Every submodule of one of ``types``, found by type (not by name), keyed by its block name."""
    return {block_name(name, role): module for name, module in root.named_modules() if isinstance(module, types)}


def channel_subset(width: int, all_up_to: int, sampled: int) -> list[int]:
    """Every channel of a layer up to ``all_up_to`` wide, else ``sampled`` evenly spaced ones, first and last included."""
    if width <= all_up_to:
        return list(range(width))
    return sorted({round(i * (width - 1) / max(sampled - 1, 1)) for i in range(sampled)})


def positive(owner: object, name: str, value: int) -> int:
    if value <= 0:
        raise ValueError(f"{type(owner).__name__}: {name} must be a positive number, got {value}")
    return value


class EveryNSteps(Callback):
    """Picks the training batches to log: the first batch of every ``every_n_steps``-th optimizer step
    (step 0, the untrained network, included), on global rank 0, when there is a logger to write to.

    Steps are ``trainer.global_step`` as it stands when the batch starts, the step at which
    Lightning logs that batch's ``train/loss_step``, so the charts line up.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = positive(self, "every_n_steps", every_n_steps)
        self._last_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._last_step = None

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def take_step(self, trainer: Trainer) -> int | None:
        """The step this batch logs at, or None when it logs nothing (called at batch start)."""
        step = trainer.global_step
        if step == self._last_step or not (trainer.is_global_zero and trainer.loggers and self._due(step)):
            return None
        self._last_step = step
        return step


class LayerMonitor(EveryNSteps):
    """Finds its layers by type, hooks their input for the batches it logs and unhooks them when the batch
    ends (or when fit stops on an exception), so the batches in between run untouched."""

    layer_types: tuple[type[nn.Module], ...]
    role: str  # what the layer is called inside its block: ``conv1.norm`` -> ``conv1``

    def __init__(self, every_n_steps: int, histogram_every_n_steps: int | None) -> None:
        super().__init__(every_n_steps)
        if histogram_every_n_steps is not None:
            positive(self, "histogram_every_n_steps", histogram_every_n_steps)
        self.histogram_every_n_steps = histogram_every_n_steps
        self.layers: dict[str, nn.Module] = {}
        self._step: int | None = None
        self._scalars_now = self._histograms_now = False
        self._handles: list = []
        self._observed: dict[str, object] = {}

    def _due(self, step: int) -> bool:
        return super()._due(step) or self._histogram_due(step)

    def _histogram_due(self, step: int) -> bool:
        return self.histogram_every_n_steps is not None and step % self.histogram_every_n_steps == 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.layers = find_layers(pl_module, self.layer_types, self.role)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._step = self.take_step(trainer)
        if self._step is not None:
            self._scalars_now, self._histograms_now = super()._due(self._step), self._histogram_due(self._step)
            self._handles = [
                layer.register_forward_pre_hook(self._observer(name)) for name, layer in self.layers.items()
            ]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._step is None:
            return
        self._log(trainer, self._step)
        self._stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> None:
        """Unhook the layers and drop what they observed."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._step, self._observed = [], None, {}

    def _observer(self, name: str):
        """A forward pre-hook that computes, from ``name``'s input, the numbers ``_log`` writes."""
        raise NotImplementedError

    def _log(self, trainer: Trainer, step: int) -> None:
        raise NotImplementedError
