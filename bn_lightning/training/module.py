"""The LightningModule: a classifier around an injected network, with metrics per stage."""

from __future__ import annotations

import inspect
import sys
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from bn_lightning.training._private import has_hooks, is_logging_step
from bn_lightning.training.errors import NonFiniteLossError
from bn_lightning.training.tags import DIVERGED_TAG
from bn_lightning.training.trainable import Trainable, parameter_groups, restrict_training

STAGES = ("train", "val", "test")

# A Classifier built in Python (not by the CLI, which saves the optimizer as a class_path dict) keeps its
# optimizer class in the checkpoint's hyperparameters: torch's own optimizer classes are allowlisted, so
# that checkpoint still loads with torch.load(weights_only=True), torch's default since 2.6.
torch.serialization.add_safe_globals(
    [cls for cls in vars(torch.optim).values() if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)]
)


# torch.compile's modes (torch._inductor.list_mode_options() lists what each sets).
CompileMode = Literal["default", "lite", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = get_args(CompileMode)


def _call(net: nn.Module, x: Tensor) -> Tensor:
    """What the compiled path compiles: a function of the network rather than the network, so that
    nothing wraps it (no ``_orig_mod.`` in the keys) and a copy of the module does not call the original."""
    return net(x)


def network_hparams(net: nn.Module) -> dict:
    """The network as LightningCLI's config writes it: its class path, and the constructor arguments it
    keeps as attributes of the same name with a plain value, None, or a dict of those (LeNet's norm,
    norm_kwargs, activation and pool)."""
    cls = type(net)
    missing = object()
    values = {name: getattr(net, name, missing) for name in inspect.signature(cls).parameters}
    init_args = {name: value for name, value in values.items() if _plain(value)}
    return {"class_path": _class_path(cls), "init_args": init_args}


def _class_path(cls: type) -> str:
    """The shortest import path of ``cls``, as LightningCLI's config.yaml writes it (``bn_lightning.LeNet``)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts)):
        package = ".".join(parts[:end])
        if getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
            return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


class Classifier(LightningModule):
    """Cross-entropy training of ``net`` with accuracy and loss tracked by torchmetrics.

    Loss and accuracy are accumulated over exactly the samples seen: the epoch loss is the
    mean per sample (a partial last batch weighs what it holds, not a full batch), the
    epoch accuracy is correct / seen. Training logs per step, on the steps the logger writes
    (``train/acc_step``), and per epoch (``train/acc_epoch``); validation and test per epoch
    (``val/acc``). A non-finite loss, or non-finite weights about to be checkpointed, stop
    training with :class:`NonFiniteLossError`.

    ``trainable`` picks the weights that train (:mod:`bn_lightning.training.trainable`): ``all``, only the BN
    layers' (``norm``), or as many ordinary ones chosen at random (``random``, picked with
    ``trainable_seed``, by default torch's seed); ``train_head`` adds the output layer to the last two.
    ``lr_scheduler``, when given, is stepped once per epoch (``model.lr_scheduler`` in a config).
    ``rest_options`` (e.g. ``{lr: 0.1}``) gives every parameter except the scale-invariant weights that feed
    a BN layer its own optimizer settings, in a second parameter group
    (:func:`~bn_lightning.training.trainable.parameter_groups`).

    ``compile`` runs the network through ``torch.compile`` (``true``, or one of its mode names such as
    ``reduce-overhead``), set up in ``configure_model``. The network itself is not wrapped, so
    ``state_dict`` keys and checkpoints are those of an eager run, and a step in which any of its
    layers has a hook (the monitors hook theirs on the steps they log) runs eagerly: a compiled
    graph would silently skip a hook added after it was traced.
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerCallable = torch.optim.SGD, num_classes: int = 10,
                 trainable: Trainable = "all", train_head: bool = True, trainable_seed: int | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None, compile: bool | CompileMode = False,
                 rest_options: dict | None = None) -> None:
        super().__init__()
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: give true, false or one of torch.compile's modes "
                             f"({', '.join(COMPILE_MODES)})")
        if trainable_seed is None:
            trainable_seed = torch.initial_seed()
        # The network is described in the hyperparameters, not kept there: a module in hparams would be
        # pickled into every checkpoint.
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = network_hparams(net)
        self.net = net
        if getattr(net, "input_shape", None):
            # What Lightning's model summary runs through the network: FLOPs and sizes per layer, not 0 FLOPs.
            self.example_input_array = torch.zeros(2, *net.input_shape)
        self.trained_weights = restrict_training(net, trainable, train_head, trainable_seed)
        parameter_groups(net, [], rest_options)  # a network without scale-invariant weights fails here, not at fit
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._compiled_call = None
        # Keyed "<stage>_acc" / "<stage>_loss": a bare "train" key would clash with Module.train.
        self.metrics = nn.ModuleDict()
        for stage in STAGES:
            self.metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, average="micro")
            self.metrics[f"{stage}_loss"] = MeanMetric()
        # The training epoch's running sums go into checkpoints (torchmetrics leaves them out by default),
        # so an epoch resumed half-way still reports the loss and accuracy of the whole epoch.
        for name in ("train_acc", "train_loss"):
            self.metrics[name].persistent(True)

    def configure_model(self) -> None:
        """Compile the network's call, once: Lightning calls this hook at the start of every fit, validate and test."""
        if self.hparams.compile and self._compiled_call is None:
            mode = None if self.hparams.compile is True else self.hparams.compile
            # torch's automatic dynamic shapes: a graph for the training batch size, one with a dynamic batch
            # dimension from the first other size on (the short last batch), one for evaluation; none later.
            self._compiled_call = torch.compile(_call, mode=mode)

    def forward(self, x: Tensor) -> Tensor:
        if self._compiled_call is None or has_hooks(self.net):
            return self.net(x)
        return self._compiled_call(self.net, x)

    def _start_epoch(self, stage: str) -> None:
        """Every epoch starts from empty sums: at its start rather than the previous one's end, so that
        the sums of a training epoch go into the checkpoint written at its end (Lightning saves before
        its epoch-end hooks), and the reset tensors belong to the grad mode of the epoch that uses them
        (the inference tensors of a standalone validate() cannot be updated during fit)."""
        self.metrics[f"{stage}_acc"].reset()
        self.metrics[f"{stage}_loss"].reset()

    def on_train_epoch_start(self) -> None:
        self._start_epoch("train")

    def on_validation_epoch_start(self) -> None:
        self._start_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._start_epoch("test")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written before the training metrics were saved loads with their current (empty) state."""
        state = checkpoint.get("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith("metrics.") and key not in state:
                state[key] = value

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy, mean_loss = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_loss"]
        if stage == "train" and is_logging_step(self.trainer):
            # Step values only on the steps the logger writes. Calling a metric adds the batch to its
            # sums and returns the batch's own value.
            step_values = {"train/loss_step": mean_loss(loss, weight=y.numel()), "train/acc_step": accuracy(logits, y)}
            self.log_dict(step_values, prog_bar=True)
        else:
            accuracy.update(logits, y)
            mean_loss.update(loss, weight=y.numel())
        return loss

    def _log_epoch(self, stage: str, suffix: str = "") -> None:
        """The epoch's loss and accuracy over every sample seen (summed over processes under DDP)."""
        accuracy, mean_loss = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_loss"]
        self.log_dict({f"{stage}/loss{suffix}": mean_loss.compute(), f"{stage}/acc{suffix}": accuracy.compute()},
                      prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", "_epoch")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "train")
        self._last_step = (self.global_step, self.current_epoch, batch_idx, loss.detach())
        if not loss.isfinite():  # one device sync a step
            self._diverged()
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """No checkpoint holds weights that are not finite: a step with a finite loss can still leave them so."""
        bad = [name for name, t in checkpoint["state_dict"].items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            self._diverged(bad)

    def _diverged(self, bad_weights: list[str] = ()) -> None:
        step, epoch, batch_idx, loss = self._last_step
        weights = ""
        if bad_weights:
            more = " and more" if bad_weights[4:] else ""
            weights = f"; not finite after the update: {', '.join(bad_weights[:4])}{more}"
        no_norm = self.hparams.net["init_args"].get("norm") == "none"
        normalize = " or by normalizing (model.net.init_args.norm: scratch or torch)" if no_norm else ""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        for logger in self.loggers:  # Lightning finalizes (flushes) them when fit ends on the error
            logger.log_metrics({DIVERGED_TAG: step}, step=step)
        raise NonFiniteLossError(
            f"training diverged at step {step} (epoch {epoch}, batch {batch_idx}): the loss is {loss.item()}{weights}.\n"
            "The run stops here; the checkpoints written before this step hold the last good weights.\n"
            f"Fix it by lowering the learning rate (model.optimizer.init_args.lr, now {lr}){normalize}."
        )

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        """Predicted class per image (the batch's labels, if any, are ignored)."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self):
        trained = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = self.optimizer(parameter_groups(self.net, trained, self.hparams.rest_options))
        if self.hparams.trainable == "random" and any(group.get("weight_decay") for group in optimizer.param_groups):
            raise ValueError("trainable: random masks the gradients of the weights it leaves frozen, and weight decay "
                             "would still move them: set the optimizer's weight_decay to 0")
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"}}
