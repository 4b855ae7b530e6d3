"""Measurements of why BN helps, as callbacks that log to TensorBoard (off unless a config adds them).

- :class:`GradientICS`: Santurkar et al. 2018's internal covariate shift (Def. 2.1, Fig. 3): how much a
  layer's gradient changes when the layers before it take their update.
- :class:`LandscapeProbe`: their loss and gradient predictiveness along the gradient (Fig. 4).
- :class:`RepresentationProbe`: collapse of the representations over a fixed batch (Daneshmand et al.
  2020; Bjorck et al. 2018 section 4): mean pairwise cosine similarity and effective rank per layer, and
  how alike the gradients of different images are.
- :class:`WeightNormMonitor`: each layer's weight norm and effective step size lr / ||W||^2, the scale
  invariance a BN after the layer gives (Arora et al. 2019).

The first three rerun the network on their own copies of its parameters and buffers
(``torch.func.functional_call``): BN's running statistics, the weights and the random streams of training
are left exactly as they were. "Layers" are the network's top-level children that hold parameters
(LeNet's conv1, conv2, fc1, fc2, head). Gradients are taken for the parameters that require one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.func import functional_call

from bn_lightning.callbacks.base import EveryNSteps
from bn_lightning.callbacks.tensorboard import log_scalars
from bn_lightning.nn.measures import angle, effective_rank, mean_pairwise_cosine, same_label_cosine, std_over_mean

State = dict[str, Tensor]


def layers(net: nn.Module) -> dict[str, list[str]]:
    """Each top-level child of ``net`` that holds parameters, with the names of its trainable ones."""
    found = {}
    for child, module in net.named_children():
        names = [f"{child}.{name}" for name, p in module.named_parameters() if p.requires_grad]
        if names:
            found[child] = names
    return found


def snapshot(net: nn.Module) -> tuple[State, State]:
    """Detached copies of ``net``'s parameters and buffers."""
    return ({name: p.detach().clone() for name, p in net.named_parameters()},
            {name: b.detach().clone() for name, b in net.named_buffers()})


def loss_and_gradient(net: nn.Module, params: State, buffers: State, batch, wrt: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """Cross-entropy of ``batch`` and its gradient for the parameters ``wrt``, the network at ``params``
    and copies of ``buffers`` (its training-mode forward updates the copies, not them)."""
    x, y = batch
    leaves = {name: params[name].detach().requires_grad_(name in wrt) for name in params}
    with torch.enable_grad():
        loss = F.cross_entropy(functional_call(net, {**leaves, **{k: b.clone() for k, b in buffers.items()}}, (x,)), y)
        grads = torch.autograd.grad(loss, [leaves[name] for name in wrt])
    return loss.detach(), [g.detach() for g in grads]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


class _OneStepProbe(EveryNSteps):
    """Keeps the network's state and the batch as a logged step starts, for ``_measure`` when it ends."""

    def __init__(self, every_n_steps: int) -> None:
        super().__init__(every_n_steps)
        self._before: tuple[int, State, State, object] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = self.take_step(trainer)
        self._before = None if step is None else (step, *snapshot(pl_module.net), batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._before is None:
            return
        step, params, buffers, batch = self._before
        self._before = None
        log_scalars(trainer, self._measure(trainer, pl_module.net, params, buffers, batch), step)

    def _measure(self, trainer: Trainer, net: nn.Module, params: State, buffers: State, batch) -> dict[str, float]:
        raise NotImplementedError


class GradientICS(_OneStepProbe):
    """Santurkar et al.'s ICS of each layer ``i`` at a step: ``G`` is the gradient of its parameters with
    every layer as the step started, ``G'`` the same with the layers before ``i`` already updated by the
    step, on the same batch. Logs ``ics/<layer>/l2`` = ||G - G'||, ``ics/<layer>/relative`` = that over
    ||G||, and ``ics/<layer>/cosine`` = cos(G, G'). The first layer, with nothing before it, has none.

    A gradient barely changes when the layers before it barely move (vanishing gradients through sigmoids),
    so the same numbers are logged against the size of that move: ``ics/<layer>/upstream_update`` =
    ||W'_{<i} - W_{<i}||, the step of every parameter before the layer, and ``ics/<layer>/per_update`` =
    ||G - G'|| / ||W'_{<i} - W_{<i}||, the gradient's change per unit of upstream movement.
    Costs one forward and backward per layer at every logged step; assumes one optimizer step per batch.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)

    def _measure(self, trainer, net, params, buffers, batch):
        updated = {name: p.detach() for name, p in net.named_parameters()}
        by_layer = layers(net)
        every = [name for names in by_layer.values() for name in names]
        _, grads = loss_and_gradient(net, params, buffers, batch, every)
        before = dict(zip(every, grads))
        metrics, earlier = {}, []
        for index, (layer, names) in enumerate(by_layer.items()):
            if index:
                mixed = {**params, **{name: updated[name] for name in earlier}}
                _, after = loss_and_gradient(net, mixed, buffers, batch, names)
                g, g2 = _flat([before[name] for name in names]), _flat(after)
                change = float((g - g2).norm())
                metrics[f"ics/{layer}/l2"] = change
                metrics[f"ics/{layer}/relative"] = change / max(float(g.norm()), 1e-30)
                metrics[f"ics/{layer}/cosine"] = float(F.cosine_similarity(g, g2, dim=0, eps=1e-30))
                moved = float((_flat([updated[name] for name in earlier]) - _flat([params[name] for name in earlier])).norm())
                metrics[f"ics/{layer}/upstream_update"] = moved
                metrics[f"ics/{layer}/per_update"] = change / max(moved, 1e-30)
            earlier += names
        return metrics


class LandscapeProbe(_OneStepProbe):
    """Santurkar et al.'s Fig. 4 at a step: with ``g`` the gradient of the step's batch, the network moved to
    ``W - eta g`` for ``eta`` in ``step_sizes`` times the learning rate. Logs ``landscape/loss_range``
    (max - min of the loss over those points, Fig. 4a), ``landscape/grad_change`` (the largest ||grad - g||,
    4b), ``landscape/beta`` (the largest ||grad - g|| / ||eta g||, "effective beta-smoothness", 4c), and
    ``landscape/loss`` and ``landscape/grad_norm`` at the start, to compare networks at matched loss.
    """

    def __init__(self, every_n_steps: int = 100, step_sizes: Sequence[float] = (0.25, 0.5, 1.0, 1.5, 2.0)) -> None:
        super().__init__(every_n_steps)
        if not step_sizes or min(step_sizes) <= 0:
            raise ValueError(f"LandscapeProbe: step_sizes must be positive multiples of the learning rate, got {step_sizes}")
        self.step_sizes = tuple(step_sizes)

    def _measure(self, trainer, net, params, buffers, batch):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        names = [name for names in layers(net).values() for name in names]
        loss, grads = loss_and_gradient(net, params, buffers, batch, names)
        g = _flat(grads)
        losses, changes, betas = [float(loss)], [], []
        for multiple in self.step_sizes:
            eta = multiple * lr
            moved = {**params, **{name: params[name] - eta * grad for name, grad in zip(names, grads)}}
            moved_loss, moved_grads = loss_and_gradient(net, moved, buffers, batch, names)
            change = float((_flat(moved_grads) - g).norm())
            losses.append(float(moved_loss))
            changes.append(change)
            betas.append(change / max(eta * float(g.norm()), 1e-30))
        return {"landscape/loss": float(loss), "landscape/grad_norm": float(g.norm()),
                "landscape/loss_range": max(losses) - min(losses), "landscape/grad_change": max(changes),
                "landscape/beta": max(betas)}


class RepresentationProbe(EveryNSteps):
    """The representations of a fixed batch, at step 0 and every ``every_n_steps``: the network, as it trains
    (training mode, batch statistics), runs the first ``num_images`` validation images. Logs per layer, over
    the images' outputs:

    - ``collapse/<layer>/cosine``, their mean pairwise cosine, and ``collapse/<layer>/erank``, their effective
      rank, both *uncentered*: a common offset (post-sigmoid outputs sit near 0.5) makes them look alike;
    - ``collapse/<layer>/centered_erank``, the effective rank once the mean over images is subtracted: whether
      the images' differences span few directions (Daneshmand et al. 2020's rank collapse, which they define on
      centered representations as we do here, is a small value of this);
    - ``collapse/<layer>/std_over_mean`` (:func:`std_over_mean`): how much the images differ relative to their
      common offset.

    and ``collapse/grad_cosine``: the mean cosine
    between the loss gradients (all parameters) of two of the first ``gradient_images`` images with the
    same label (1: the gradient does not depend on the image, only on its label; images of different
    labels are left out because the label alone makes their gradients differ)."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 256, gradient_images: int = 64) -> None:
        super().__init__(every_n_steps)
        if num_images < 2 or not 2 <= gradient_images <= num_images:
            raise ValueError(f"RepresentationProbe needs 2 <= gradient_images <= num_images, got "
                             f"num_images={num_images}, gradient_images={gradient_images}")
        self.num_images, self.gradient_images = num_images, gradient_images
        self._batch: tuple[Tensor, Tensor] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        images, labels, seen = [], [], 0
        for x, y in trainer.datamodule.val_dataloader():  # unshuffled: the same images every run
            images.append(x)
            labels.append(y)
            seen += len(y)
            if seen >= self.num_images:
                break
        if seen < self.num_images:
            raise ValueError(f"RepresentationProbe measures {self.num_images} validation images, but the validation "
                             f"set has {seen}: lower its num_images (and gradient_images) or enlarge data.val_size")
        device = next(pl_module.net.parameters()).device
        self._batch = (torch.cat(images)[: self.num_images].to(device), torch.cat(labels)[: self.num_images].to(device))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = self.take_step(trainer)
        if step is not None:
            log_scalars(trainer, self.measure(pl_module.net), step)

    def measure(self, net: nn.Module) -> dict[str, float]:
        params, buffers = snapshot(net)
        by_layer = layers(net)
        names = [name for names in by_layer.values() for name in names]
        leaves = {name: params[name].requires_grad_(name in names) for name in params}
        outputs: dict[str, Tensor] = {}
        handles = [module.register_forward_hook(lambda m, i, out, child=child: outputs.__setitem__(child, out))
                   for child, module in net.named_children() if child in by_layer]
        x, y = self._batch
        try:
            with torch.enable_grad():
                losses = F.cross_entropy(functional_call(net, {**leaves, **buffers}, (x,)), y, reduction="none")
        finally:
            for handle in handles:
                handle.remove()
        metrics = {}
        for child, out in outputs.items():
            rows = out.detach().reshape(len(x), -1)
            metrics[f"collapse/{child}/cosine"] = mean_pairwise_cosine(rows)
            metrics[f"collapse/{child}/erank"] = effective_rank(rows)
            metrics[f"collapse/{child}/centered_erank"] = effective_rank(rows - rows.mean(0))
            metrics[f"collapse/{child}/std_over_mean"] = std_over_mean(rows)
        wrt = [leaves[name] for name in names]
        per_image = [_flat(torch.autograd.grad(losses[i], wrt, retain_graph=i < self.gradient_images - 1))
                     for i in range(self.gradient_images)]
        metrics["collapse/grad_cosine"] = same_label_cosine(torch.stack(per_image), y[: self.gradient_images])
        return metrics


class WeightNormMonitor(_OneStepProbe):
    """Per layer: ``weights/<layer>/norm`` = ||W|| of its weight, ``weights/<layer>/effective_lr`` =
    lr / ||W||^2, ``weights/<layer>/relative_update`` = ||W' - W|| / ||W|| and
    ``weights/<layer>/angular_update`` = the angle between W and W' (radians) over the logged step.

    Behind a BN the layer's output does not depend on the scale of W, so a step of lr moves it as a step of
    lr / ||W||^2 would at ||W|| = 1 (Arora et al. 2019): growing weights anneal the learning rate. Without
    BN the same numbers describe the raw step. With weight decay the norm settles, and the angle a step turns
    W by approaches sqrt(2 lr wd) for SGD (Wan et al. 2021); the relative update also counts the decay's
    shrinking along W, the angle does not. Layers are the modules named ``affine`` (LeNet's blocks)
    and the top-level linear or conv layers.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__(every_n_steps)

    @staticmethod
    def weights(net: nn.Module) -> dict[str, str]:
        """Each layer's name, and the name of its weight among the net's parameters."""
        found = {}
        for child, module in net.named_children():
            layer = getattr(module, "affine", module)
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                found[child] = f"{child}.affine.weight" if layer is not module else f"{child}.weight"
        return found

    def _measure(self, trainer, net, params, buffers, batch):
        lrs = {id(p): group["lr"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
        current = dict(net.named_parameters())
        metrics = {}
        for layer, name in self.weights(net).items():
            before, weight = params[name], current[name]
            norm = float(before.norm())
            lr = lrs.get(id(weight), 0.0)  # a frozen weight is in no group: it does not move
            metrics[f"weights/{layer}/norm"] = norm
            metrics[f"weights/{layer}/effective_lr"] = lr / max(norm**2, 1e-30)
            metrics[f"weights/{layer}/relative_update"] = float((weight.detach() - before).norm()) / max(norm, 1e-30)
            metrics[f"weights/{layer}/angular_update"] = angle(before, weight.detach())
        return metrics
