"""The LightningModule: a classifier around an injected network, with metrics per stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

STAGES = ("train", "val", "test")

# A Classifier built in Python (not by the CLI, which saves the optimizer as a class_path dict) keeps its
# optimizer class in the checkpoint's hyperparameters: torch's own optimizer classes are allowlisted, so
# that checkpoint still loads with torch.load(weights_only=True), torch's default since 2.6.
torch.serialization.add_safe_globals(
    [cls for cls in vars(torch.optim).values() if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)]
)


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a step's loss, or the weights it left, are NaN or infinite.

    Raised before any checkpoint can hold those weights; the in-memory model is not worth
    saving, and checkpoints written before this step are the last good ones.
    """


class Classifier(LightningModule):
    """Cross-entropy training of ``net`` with accuracy and loss tracked by torchmetrics.

    Loss and accuracy are accumulated over exactly the samples seen: the epoch loss is the
    mean per sample (a partial last batch weighs what it holds, not a full batch), the
    epoch accuracy is correct / seen. Training logs both per step and per epoch
    (``train/acc_step``, ``train/acc_epoch``); validation and test per epoch (``val/acc``).
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerCallable = torch.optim.SGD, num_classes: int = 10) -> None:
        super().__init__()
        # The network's own config is kept by LightningCLI in config.yaml beside the logs;
        # a module in hparams would be pickled into every checkpoint.
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.optimizer = optimizer
        # Keyed "<stage>_acc" / "<stage>_loss": a bare "train" key would clash with Module.train.
        self.metrics = nn.ModuleDict()
        for stage in STAGES:
            self.metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes, average="micro")
            self.metrics[f"{stage}_loss"] = MeanMetric()
        # The training epoch's running sums go into checkpoints (torchmetrics leaves them out by default),
        # so an epoch resumed half-way still reports the loss and accuracy of the whole epoch.
        for name in ("train_acc", "train_loss"):
            self.metrics[name].persistent(True)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # An epoch starts from empty sums, also after resuming from a checkpoint written at the previous
        # epoch's end, which holds that epoch's sums (saved before Lightning logs and resets them).
        self.metrics["train_acc"].reset()
        self.metrics["train_loss"].reset()

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
        accuracy(logits, y)
        mean_loss(loss, weight=y.numel())
        per_step = stage == "train"
        self.log(f"{stage}/loss", mean_loss, on_step=per_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=per_step, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._shared_step(batch, "train")
        self._step_loss = loss.detach()  # checked with the weights it leads to, in optimizer_step
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Take the step, then stop if its loss or the weights it left are not finite.

        Checked here rather than in on_train_batch_end, which runs after the callbacks' (where a
        step checkpoint may be written); a finite loss can still leave infinite weights. One
        device sync per step.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        named = [(n, t) for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_floating_point()]
        if torch.stack([self._step_loss.isfinite(), *(t.isfinite().all() for _, t in named)]).all():
            return
        bad = [name for name, t in named if not t.isfinite().all()]
        weights = f"; not finite after the update: {', '.join(bad[:4])}{' and more' if bad[4:] else ''}" if bad else ""
        no_norm = getattr(self.net, "norm", None) == "none"  # LeNet says which it has
        normalize = " or by normalizing (model.net.init_args.norm: scratch or torch)" if no_norm else ""
        raise NonFiniteLossError(
            f"training diverged at step {self.global_step} (epoch {epoch}, batch {batch_idx}): "
            f"the loss is {self._step_loss.item()}{weights}.\n"
            "The run stops here; the checkpoints written before this step hold the last good weights.\n"
            f"Fix it by lowering the learning rate (model.optimizer.init_args.lr, now "
            f"{optimizer.param_groups[0]['lr']}){normalize}."
        )

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        """Predicted class per image (the batch's labels, if any, are ignored)."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self):
        return self.optimizer(self.parameters())
