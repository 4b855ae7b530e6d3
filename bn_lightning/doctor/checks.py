"""``check`` a model (and, given an input, a short probe of it) and ``watch`` a plain-PyTorch training loop for
the classic batch-norm mistakes. Plain PyTorch: nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bn_lightning.doctor.findings import CODES, SEVERITIES, Finding, finding
from bn_lightning.doctor.observe import (BIASED, DROPOUTS, Observer, bias_cancelled, dropout_before, plain_attributes,
                                         preserved)
from bn_lightning.nn.registry import batch_norm_layers

__all__ = ["check", "loader_findings", "select", "static_findings", "unsynchronized", "watch"]

VECTOR_NORMS = (nn.BatchNorm1d,)  # and any class whose name ends in BatchNorm1d or Renorm1d (ours)
MIN_PER_PROCESS = 16  # images per process below which unsynchronized BN statistics are noisy (BN009)


def check(model: nn.Module, example_input=None, *, optimizer: torch.optim.Optimizer | None = None,
          ignore: Iterable = (), loader=None) -> list[Finding]:
    """The batch-norm mistakes in ``model``: static checks of its modules (and of ``optimizer``'s groups and
    ``loader``'s last batch when given) and, with ``example_input`` (a tensor, a tuple of positional inputs
    or a dict of keyword inputs; a list is one input, as detection models take), a probe: one training-mode forward and backward and one eval-mode forward on
    the model itself, after which every parameter, buffer, tensor attribute, gradient, mode and random
    state is as it was. ``ignore`` takes codes (``"BN005"``) or ``(code, layer)`` pairs."""
    trainable = _optimized(optimizer)
    found = static_findings(model, optimizer, probed=example_input is not None)
    if loader is not None:
        found += loader_findings(loader, model)
    if example_input is not None:
        if optimizer is None and not any(p.requires_grad for p in model.parameters()):
            trainable = set()  # nothing trains: a frozen layer is no mistake (BN006 needs something trained)
        observer = Observer(model, trainable=trainable, frozen_model=trainable == set() and optimizer is None)
        with preserved(model), observer.attached():
            batch_size = _probe(model, example_input, observer)
        found += observer.findings()
        if batch_size is not None:
            found += unsynchronized(model, batch_size, _world_size())
    return select(found, model, ignore)


@contextlib.contextmanager
def watch(model: nn.Module, *, ignore: Iterable = ()) -> Iterator[list[Finding]]:
    """Watch a plain-PyTorch loop: ``with watch(model) as findings: ...``, and ``findings`` holds at exit what
    was found. It sees what :func:`check` cannot: a training-mode BN forward under ``torch.no_grad()``, or
    one whose output got no gradient before the next optimizer step (an evaluation in training mode), and
    running statistics that change while their layer's parameters are frozen."""
    findings: list[Finding] = []
    observer = Observer(model, track_gradients=True)
    optimizers: list[torch.optim.Optimizer] = []
    ours = {id(p) for p in model.parameters()}

    def stepped(optimizer, args, kwargs) -> None:
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not updated & ours:
            return  # another model's optimizer
        if optimizer not in optimizers:
            optimizers.append(optimizer)
            observer.trainable = set().union(*(_optimized(o) for o in optimizers))
        observer.optimizer_stepped()

    handle = register_optimizer_step_pre_hook(stepped)
    try:
        with observer.attached():
            yield findings
    finally:
        handle.remove()
        observer.close()
        static = static_findings(model, probed=True)
        for optimizer in optimizers:
            static += _weight_decay(model, optimizer)
        findings[:] = select(static + observer.findings(), model, ignore)


def select(found: Iterable[Finding], model: nn.Module, ignore: Iterable = ()) -> list[Finding]:
    """One finding per code and layer, less the ignored: most severe first, then by code, then in the model's order."""
    codes = {i for i in ignore if isinstance(i, str)}
    pairs = {tuple(i) for i in ignore if not isinstance(i, str)}
    unknown = sorted(c for c in codes | {c for c, _ in pairs} if c not in CODES)
    if unknown:
        raise ValueError(f"ignore: unknown code(s) {', '.join(unknown)}; the codes are BN001 to BN{len(CODES):03d}")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    kept: dict[tuple[str, str], Finding] = {}
    for f in found:
        if f.code not in codes and (f.code, f.layer) not in pairs:
            kept.setdefault((f.code, f.layer), f)
    return sorted(kept.values(), key=lambda f: (SEVERITIES.index(f.severity), f.code, order.get(f.layer, -1)))


def static_findings(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, probed: bool = False
                    ) -> list[Finding]:
    """What the module tree and the optimizer's groups show without running anything. With ``probed``, leave
    to the probe what it measures better (the momentum, the bias a BN cancels)."""
    found = []
    for name, layer in batch_norm_layers(model).items():
        plain = plain_attributes(layer)
        if plain:
            found.append(finding("BN003", name, f"its statistics ({', '.join(plain)}) are plain tensor attributes: "
                                 "state_dict() and checkpoints leave them out, and .to() does not move them.",
                                 "self.register_buffer(name, tensor) instead of self.name = tensor."))
        tracks = getattr(layer, "track_running_stats", True)
        if not tracks and getattr(layer, "running_mean", None) is not None:
            found.append(finding("BN011", name, "track_running_stats is False but it still holds running buffers: "
                                 "in training it normalizes by batch statistics and leaves the buffers alone, in "
                                 "evaluation it normalizes by those stale buffers.", "to freeze the statistics, keep "
                                 "track_running_stats=True and put the layer in eval mode (BaseFinetuning.freeze's "
                                 "default, train_bn=True, trains BN instead)."))
        momentum = getattr(layer, "momentum", 0.1)
        if tracks and momentum is None and layer.training:
            found.append(finding("BN012", name, "momentum=None: its running statistics are the cumulative average of "
                                 "every batch since the start, which weighs the untrained network's statistics as "
                                 "much as the last ones.", "momentum=0.1 (a moving average), or precise statistics "
                                 "recomputed after training (bn_lightning.nn.precise_bn.update_bn_stats)."))
        if not probed and tracks and momentum is not None and momentum > 0.5:
            found.append(finding("BN007", name, f"momentum={momentum}: torch's momentum is the new batch's weight, so "
                                 f"this is most likely Keras/TensorFlow's {1 - momentum:.2g} (the old value's weight) "
                                 f"written in torch's convention.", f"momentum={1 - momentum:.2g}."))
    if not probed:
        found += _adjacent_biases(model)
    if optimizer is not None:
        found += _weight_decay(model, optimizer)
    return found


def loader_findings(loader, model: nn.Module) -> list[Finding]:
    """BN004 for a training loader whose last batch (``drop_last=False``) would hold 1 image, or 2 where the
    model has BN on vectors. Counts what this process's sampler yields, so it holds under DDP too."""
    batch_size = getattr(loader, "batch_size", None)
    if not batch_size or getattr(loader, "drop_last", True) or not batch_norm_layers(model):
        return []
    try:
        n = len(loader.sampler)
    except TypeError:
        return []  # an iterable dataset: no length to count
    last = n % batch_size
    vectors = any(_on_vectors(layer) for layer in batch_norm_layers(model).values())
    if last == 1 or (last == 2 and vectors):
        what = ("one image: its statistics are its own" if last == 1 else
                "2 vectors: every BatchNorm1d output is about +1 or -1")
        return [finding("BN004", "", f"the training loader's last batch holds {last} of {n} images (batch_size "
                        f"{batch_size}, drop_last=False): {what}.", "DataLoader(..., drop_last=True).")]
    return []


def _on_vectors(layer: nn.Module) -> bool:
    return isinstance(layer, VECTOR_NORMS) or type(layer).__name__.endswith(("BatchNorm1d", "Renorm1d"))


def _adjacent_biases(model: nn.Module) -> list[Finding]:
    """BN005 and BN014 without an input: a biased layer, or a dropout, directly before a BN in one ``nn.Sequential``."""
    found, names = [], {m: n for n, m in model.named_modules()}
    known = set(batch_norm_layers(model).values())
    for sequential in (m for m in model.modules() if isinstance(m, nn.Sequential)):
        members = list(sequential)
        for before, after in zip(members, members[1:]):
            if after not in known:
                continue
            if isinstance(before, BIASED) and before.bias is not None:
                found.append(bias_cancelled(names[after], names[before]))
            elif isinstance(before, DROPOUTS):
                found.append(dropout_before(names[after], names[before]))
    return found


def _weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    decayed = {id(p): group["weight_decay"] for group in optimizer.param_groups
               if group.get("weight_decay", 0) for p in group["params"]}
    found = []
    for name, layer in batch_norm_layers(model).items():
        decays = [decayed[id(p)] for p in layer.parameters(recurse=False) if id(p) in decayed]
        if decays:
            found.append(finding("BN010", name, f"weight decay {max(decays):g} applies to its gamma and beta: it "
                                 "pulls the scale and shift BN learns toward 0, which no later BN undoes when this is "
                                 "the last one before a residual sum or the classifier.",
                                 "put BN's weight and bias in a parameter group with weight_decay=0."))
    return found


def unsynchronized(model: nn.Module, batch_size: int, world_size: int) -> list[Finding]:
    """BN009: ``world_size`` processes of ``batch_size`` images each, and BN layers that do not synchronize
    their statistics (neither torch's ``SyncBatchNorm`` nor ours with ``sync=True``)."""
    if world_size <= 1 or batch_size >= MIN_PER_PROCESS:
        return []
    return [finding("BN009", name, f"{world_size} processes with {batch_size} images each and no synchronized "
                    f"statistics: each process normalizes by the statistics of its own {batch_size} images.",
                    "Trainer(sync_batchnorm=True), or torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).")
            for name, layer in batch_norm_layers(model).items()
            if not isinstance(layer, nn.SyncBatchNorm) and not getattr(layer, "sync", False)]


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _optimized(optimizer: torch.optim.Optimizer | None) -> set[int] | None:
    if optimizer is None:
        return None
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _probe(model: nn.Module, example_input, observer: Observer) -> int | None:
    """Run the probe; return the batch size (the first input's first dimension) when there is one."""
    example_input = _detached(example_input)  # the probe's backward leaves no gradient on the caller's input
    args, kwargs = (example_input, {}) if isinstance(example_input, tuple) else \
        ((), example_input) if isinstance(example_input, dict) else ((example_input,), {})
    model.train()
    try:
        output = model(*args, **kwargs)
    except Exception as error:
        if any(f.code == "BN004" and f.severity == "error" for f in observer.findings()):
            return None  # torch's error on one value per channel, which the finding explains
        raise RuntimeError(f"the probe's training-mode forward on example_input failed ({type(error).__name__}: "
                           f"{error}); give an input the model takes in training") from error
    loss = _total(output)
    if loss is not None and loss.requires_grad:
        loss.backward()
    del output, loss
    model.eval()
    with torch.no_grad():
        model(*args, **kwargs)
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)
    return None if first is None else first.shape[0]


def _detached(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _total(output) -> Tensor | None:
    """A scalar that depends on every floating-point tensor of a model's output (a tensor, or containers of them)."""
    if isinstance(output, Tensor):
        return output.float().mean() if output.is_floating_point() else None
    parts = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else ()
    totals = [t for t in (_total(part) for part in parts) if t is not None]
    return torch.stack(totals).sum() if totals else None
