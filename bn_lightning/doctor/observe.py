"""Forward hooks that watch a model's BN-like layers and turn what each forward does into findings, and the
guard that puts a model back bit for bit after a probe.

A layer is *BN-like* when the registry knows it (:func:`bn_lightning.nn.registry.is_batch_norm`), or when a
training-mode forward rebinds or mutates one of its buffers or tensor attributes that has one value per
channel of its input: that is how the blog's layer, which no registry knows, is found.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.parametrize import ParametrizationList

from bn_lightning.doctor.findings import Finding, finding
from bn_lightning.nn.registry import is_batch_norm

__all__ = ["Observer", "bias_cancelled", "dropout_before", "preserved", "tensor_state"]

RUNNING = ("running_mean", "running_var")
# Layers whose bias a BN right after them cancels (one bias per output channel).
BIASED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Norms with running statistics that are not batch norms: their statistics are per image by design.
NOT_BATCH_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Layers whose output's variance differs between training and evaluation (Li et al. 2019's variance shift).
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def tensor_state(module: nn.Module) -> dict[str, Tensor]:
    """A module's own buffers and plain tensor attributes, by name (its parameters excluded)."""
    state = {name: t for name, t in module.named_buffers(recurse=False) if t is not None}
    state.update({name: v for name, v in vars(module).items() if isinstance(v, Tensor)})
    return state


def plain_attributes(module: nn.Module) -> list[str]:
    """The tensors a module holds as plain attributes: invisible to ``state_dict`` and ``.to()``."""
    return [name for name, value in vars(module).items() if isinstance(value, Tensor)]


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a known BN layer normalizes by its batch's statistics in its present mode (torch's rule)."""
    return module.training or getattr(module, "running_mean", None) is None


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or torch.equal(a.isnan(), b.isnan())
                                                              and torch.equal(a.nan_to_num(), b.nan_to_num()))


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run a probe on ``model`` itself and leave its tensor state as it was: the same parameter, buffer and
    tensor-attribute objects with the same values and version counters (so a graph the caller built before
    the probe still backpropagates), the same gradients, every module's mode, and torch's random number
    generators. Buffers and tensor attributes are swapped for clones during the probe and the originals put
    back; parameters are not changed by a forward and backward. A model whose layer keeps autograd history in
    a plain attribute (the blog's) cannot be deep-copied after a forward; this needs no copy."""
    modules = list(model.modules())
    lazy = [name for name, p in model.named_parameters() if is_lazy(p)] + \
           [name for name, b in model.named_buffers() if is_lazy(b)]
    if lazy:
        raise ValueError(f"{lazy[0]} is not initialized yet (a lazy module): run one forward of the model before "
                         "probing it, or check it without an example input")
    modes = [(m, m.training) for m in modules]
    parameters = [(p, p.grad) for p in model.parameters()]
    originals = [(m, name, t) for m in modules for name, t in tensor_state(m).items()]
    names_before = {m: set(tensor_state(m)) for m in modules}
    clones: dict[int, Tensor] = {}  # one clone per tensor, so that state shared between modules stays shared
    for m, name, t in originals:
        if id(t) not in clones:
            clone = t.detach().clone()
            clones[id(t)] = clone.requires_grad_() if t.requires_grad and t.is_leaf else clone
        setattr(m, name, clones[id(t)])
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    for p, _ in parameters:
        p.grad = None  # the probe's backward writes fresh gradients; the user's are put back untouched
    try:
        yield
    finally:
        for m, names in names_before.items():
            for name in set(tensor_state(m)) - names:
                delattr(m, name)
        for m, name, t in originals:
            setattr(m, name, t)
        for p, grad in parameters:
            p.grad = grad
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def bias_cancelled(layer: str, producer: str) -> Finding:
    return finding("BN005", layer, f"its input is the output of {producer}, whose bias the mean subtraction cancels: a "
                   f"parameter that never changes the output.", f"build {producer} with bias=False; BN's beta is the bias.")


def dropout_before(layer: str, producer: str) -> Finding:
    return finding("BN014", layer, f"its input is the output of {producer}: dropout changes its input's variance between "
                   f"training and evaluation, so the running variance BN evaluates with (estimated with dropout on) "
                   f"does not match what it sees in evaluation (Li et al. 2019's variance shift).",
                   "move the dropout after the last BN layer (before the classifier), or drop it.")


class Observer:
    """Forward hooks on every module that holds buffers or tensor attributes, and on the biased layers that
    may feed a BN, turning each forward into findings (kept once per code and layer in :attr:`found`).

    The owner says what is going on: ``evaluating`` while a validation, test or predict runs (a BN layer in
    training mode then is ``BN001``); ``track_gradients`` to record, for :meth:`optimizer_stepped`, which
    training-mode forwards got a gradient; ``trainable``, the ids of the parameters an optimizer updates.
    """

    def __init__(self, model: nn.Module, *, track_gradients: bool = False, trainable: set[int] | None = None,
                 frozen_model: bool = False) -> None:
        self.model = model
        self.frozen_model = frozen_model  # nothing in the model trains: frozen layers are no mistake
        self.names = {m: name for name, m in model.named_modules()}
        self.track_gradients = track_gradients
        self.trainable = trainable
        self.evaluating: str | None = None
        self.found: dict[tuple[str, str], Finding] = {}
        self.momenta: dict[str, float] = {}  # layer: the momentum measured on its first training forward
        self._statistics: dict[nn.Module, list[str]] = {}  # BN-like layer: the names of its statistics
        self._before: dict[nn.Module, dict[str, tuple[Tensor, Tensor]]] = {}
        self._producers: dict[int, tuple[weakref.ref, str, str]] = {}  # id: (output, layer, "biased" or "dropout")
        self._pending: list[tuple[str, list[bool]]] = []  # training forwards awaiting a gradient
        self._handles: list = []

    # -- attaching ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self) -> Iterator[Observer]:
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._producers.clear()))
        # parametrizations (spectral norm's power iteration, say) keep per-step state too, but take weights as input
        parametrizations = {id(m) for p in self.model.modules() if isinstance(p, ParametrizationList) for m in p.modules()}
        for module in self.model.modules():
            if id(module) in parametrizations or isinstance(module, NOT_BATCH_NORMS):
                continue
            if is_batch_norm(module) or tensor_state(module):
                self._handles.append(module.register_forward_pre_hook(self._before_forward))
                self._handles.append(module.register_forward_hook(self._after_forward))
            if isinstance(module, BIASED) and module.bias is not None or isinstance(module, DROPOUTS):
                self._handles.append(module.register_forward_hook(self._produced))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._before.clear()
        self._producers.clear()

    def findings(self) -> list[Finding]:
        return list(self.found.values())

    def add(self, f: Finding) -> None:
        self.found.setdefault((f.code, f.layer), f)

    # -- the hooks ------------------------------------------------------------------------------------------
    def _produced(self, module: nn.Module, args, output) -> None:
        # a Linear adds its bias along the last dimension: a BN cancels it only where that is the channel dimension
        if isinstance(output, Tensor) and not (isinstance(module, nn.Linear) and output.dim() != 2):
            kind = "dropout" if isinstance(module, DROPOUTS) else "biased"
            self._producers[id(output)] = (weakref.ref(output), self.names.get(module, type(module).__name__), kind)

    def _before_forward(self, module: nn.Module, args) -> None:
        self._before[module] = {name: (t, t.detach().clone()) for name, t in tensor_state(module).items()}
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is not None and is_batch_norm(module):
            # before the forward: torch raises on one value per channel, and the finding says why
            self._input_checks(module, x, uses_batch_statistics(module))

    def _after_forward(self, module: nn.Module, args, output) -> None:
        before = self._before.pop(module, {})
        now = tensor_state(module)
        changed = [name for name, t in now.items()
                   if name not in before or t is not before[name][0] or not _same(t.detach(), before[name][1])]
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if module not in self._statistics:
            if is_batch_norm(module):
                self._statistics[module] = [n for n in RUNNING if now.get(n) is not None]
            elif module.training and x is not None and x.dim() >= 2 and changed:
                per_channel = [n for n in changed if now[n].numel() == x.shape[1]]
                if not per_channel:
                    return
                self._statistics[module] = per_channel  # found BN-like by what its forward did
                self._input_checks(module, x, True)
            else:
                return
        name = self.names.get(module, type(module).__name__)
        statistics = [n for n in self._statistics[module] if n in now]
        self._history(module, name, statistics, now)
        moved = [n for n in statistics if n in changed]
        if not module.training and moved:
            self.add(finding("BN013", name, f"its running statistics ({', '.join(moved)}) changed in an evaluation-mode "
                             f"forward: evaluation data leaks into the statistics the model is evaluated with.",
                             "update the running statistics only when self.training is True."))
        if module.training and moved:
            if x is not None and name not in self.momenta:
                self._momentum(module, name, x, statistics, before, now)
            if torch.is_grad_enabled():
                self._frozen_but_updating(module, name)
        if module.training and statistics:
            self._evaluation_in_training_mode(module, name, output)

    # -- the analyses ---------------------------------------------------------------------------------------
    def _input_checks(self, module: nn.Module, x: Tensor, batch_statistics: bool) -> None:
        name = self.names.get(module, type(module).__name__)
        producer = self._producers.get(id(x))
        if producer is not None and producer[0]() is x:
            self.add(bias_cancelled(name, producer[1]) if producer[2] == "biased" else dropout_before(name, producer[1]))
        if not batch_statistics or x.dim() < 2:
            return
        shape, per_channel = tuple(x.shape), x.numel() // max(x.shape[1], 1)
        if per_channel == 1:
            self.add(finding("BN004", name, f"a training batch gives each channel one value (input {shape}): its batch "
                             f"variance is 0 and torch raises.", "train on batches of at least 2 (drop_last=True "
                             "drops a last batch of 1), or use a norm without batch statistics (GroupNorm, LayerNorm).",
                             severity="error"))
        elif x.shape[0] == 1:
            self.add(finding("BN004", name, f"a training batch of one image (input {shape}): in training the layer "
                             f"normalizes each image by its own statistics (instance normalization), in evaluation by "
                             f"running statistics of the whole data.", "train on larger batches, or use a norm "
                             "that does not depend on the batch (GroupNorm, LayerNorm)."))
        elif x.dim() == 2 and x.shape[0] == 2:
            self.add(finding("BN004", name, f"a training batch of 2 vectors (input {shape}): every output is about +1 or -1 "
                             f"(times gamma, plus beta), whatever the input.", "train on larger batches, or use "
                             "LayerNorm on vectors."))

    def _history(self, module: nn.Module, name: str, statistics: list[str], now: dict[str, Tensor]) -> None:
        with_history = [n for n in statistics if now[n].grad_fn is not None or now[n].requires_grad]
        if with_history:
            self.add(finding("BN002", name, f"its running statistics ({', '.join(with_history)}) carry autograd history "
                             f"after a forward: each forward's graph stays alive through them, and memory grows with "
                             f"every forward that no backward frees.", "compute the new running statistics under "
                             "torch.no_grad() or from .detach()ed batch statistics."))
        plain = [n for n in statistics if n in vars(module)]
        if plain:
            self.add(finding("BN003", name, f"its statistics ({', '.join(plain)}) are plain tensor attributes: "
                             f"state_dict() and checkpoints leave them out, and .to() does not move them.",
                             "self.register_buffer(name, tensor) instead of self.name = tensor."))

    def _momentum(self, module, name, x, statistics, before, now) -> None:
        momentum = getattr(module, "momentum", 0.0)
        if momentum is None:
            return  # a cumulative average: BN012's
        channels = x.shape[1]
        mean = x.detach().double().transpose(0, 1).reshape(channels, -1).mean(1)
        candidates = ["running_mean"] if is_batch_norm(module) else statistics
        for stat in candidates:
            if stat not in before:
                continue
            r0, r1 = before[stat][1].double().reshape(-1), now[stat].detach().double().reshape(-1)
            if r0.numel() != channels:
                continue
            apart = (mean - r0).abs() > 1e-3 * (1 + r0.abs())
            if not apart.any():
                continue
            ratio = ((r1 - r0) / (mean - r0))[apart]
            measured = ratio.median().item()
            if (ratio - measured).abs().median().item() > 0.01 * (1 + abs(measured)):
                continue  # not a moving average of the batch mean (a variance, say)
            self.momenta[name] = measured
            if measured > 0.5 + 1e-3:  # above 0.5 beyond float32 rounding: 0.5 itself is torch's convention too
                self.add(finding("BN007", name, f"its running mean moves {measured:.2f} of the way to each batch's "
                                 f"mean: torch's momentum is the new batch's weight, so this is most likely Keras/"
                                 f"TensorFlow's momentum {1 - measured:.2f} (the old value's weight) written in "
                                 f"torch's convention.", f"momentum={1 - measured:.2g} in torch's convention "
                                 f"(1 minus the Keras/TensorFlow value)."))
            return

    def _frozen_but_updating(self, module: nn.Module, name: str) -> None:
        parameters = list(module.parameters(recurse=False))
        if self.frozen_model or not parameters or getattr(module, "track_running_stats", True) is False:
            return
        if any(p.requires_grad and (self.trainable is None or id(p) in self.trainable) for p in parameters):
            return
        self.add(finding("BN006", name, "none of its affine parameters is trained, yet it is in training mode and "
                         "its running statistics changed in a training step: the frozen layer keeps re-estimating "
                         "them from the new data's batches.", "keep frozen BN layers in eval mode: call .eval() on "
                         "them after every model.train() (in Lightning, in on_train_epoch_start), or train their "
                         "affine parameters too."))

    def _evaluation_in_training_mode(self, module: nn.Module, name: str, output) -> None:
        what = None
        if self.evaluating:
            what = f"during {self.evaluating}"
        elif self.track_gradients and not torch.is_grad_enabled():
            what = "in a forward under torch.no_grad()"
        elif self.track_gradients and isinstance(output, Tensor) and output.requires_grad:
            got = [False]
            output.register_hook(lambda grad, got=got: got.__setitem__(0, True))
            self._pending.append((name, got))
        if what is not None:
            self.add(self._bn001(name, what))

    @staticmethod
    def _bn001(name: str, what: str) -> Finding:
        return finding("BN001", name, f"in training mode {what}: it normalizes with each batch's statistics instead "
                       f"of its running ones, and updates its running statistics with evaluation data.",
                       "model.eval() before evaluating, with torch.no_grad() around it; model.train() after.")

    def optimizer_stepped(self) -> None:
        """A training-mode forward whose output got no gradient before this step was an evaluation (watch's)."""
        for name, got in self._pending:
            if not got[0]:
                self.add(self._bn001(name, "in a forward whose output got no gradient before the next optimizer step"))
        self._pending.clear()

    close = optimizer_stepped  # at the end, the same rule for the forwards since the last step

