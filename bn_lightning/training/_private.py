"""Every private detail of a dependency that bn_lightning relies on, each where no public API does the job.

An upgrade of Lightning, jsonargparse or torch may change any of them: ``tests/test_private.py`` checks
each one against the installed versions and names the function here that needs mending.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from torch import nn
from torch.utils.tensorboard import SummaryWriter


def is_logging_step(trainer: Trainer) -> bool:
    """Whether the logger writes what the training step about to run logs: Lightning's own rule
    (``log_every_n_steps``, counted in optimizer steps, and the last step before a stop), which no
    public API exposes. The training step logs its step values on these steps only, since each
    ``self.log`` costs a fixed fraction of a LeNet step."""
    return trainer._logger_connector.should_update_logs


def set_stop_requested(trainer: Trainer, requested: bool) -> None:
    """Set the flag Lightning sets on SIGTERM (``trainer.received_sigterm`` reads it), which makes its
    loops raise ``SIGTERMException`` at the next batch boundary: no public call stops fit that way."""
    trainer._signal_connector.received_sigterm = requested


def rewind_to_last_completed_batch(checkpoint: dict, completed: int) -> None:
    """Make ``checkpoint``, taken inside a training batch, resume at that batch's start, as Lightning's
    counters do: the train loader's saved position (``bn_lightning.training.sampling.ResumableLoader``) goes back
    to the ``completed`` batches, and the logging step, which Lightning's restart advances by one as if
    the batch had finished, is stored one less. Lightning's checkpoint layout of the fit loop."""
    loops = checkpoint["loops"]["fit_loop"]
    for state in loops["state_dict"].get("combined_loader", []):
        if state.keys() == {"seed", "epoch", "batches"}:
            state["batches"] = min(state["batches"], completed)
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def write_summary(writer: SummaryWriter, summary) -> None:
    """Write a ready-made summary protobuf, at step 0, into the writer's own event file. ``SummaryWriter``'s public
    ``add_hparams`` would write it into a new subfolder, a separate run in TensorBoard."""
    writer._get_file_writer().add_summary(summary, global_step=0)


def known_subclasses(parser, key: str) -> str:
    """The classes jsonargparse lists in ``--help`` for a class-valued ``key`` (comma-separated, "" if
    none): argparse's table of options and the help text jsonargparse adds to a subclass action."""
    action = parser._option_string_actions.get(f"--{key}")
    return getattr(action, "extra_help", lambda: "")().partition("known subclasses: ")[2]


def option_strings(parser) -> list[str]:
    """Every option string a parser takes (``--trainer.max_epochs``...): argparse's table of options, which no
    public API lists; the CLI suggests the closest one for an unknown option."""
    return list(parser._option_string_actions)


def option_groups(parser) -> list[tuple[str, list]]:
    """Each group of a parser's options, as ``--help`` lists them: its title and its argparse actions
    (argparse's ``_action_groups``, which no public API exposes); the CLI's one-line-per-option help."""
    return [(group.title or "", list(group._group_actions)) for group in parser._action_groups]


def has_hooks(net: nn.Module) -> bool:
    """Whether any module of ``net`` has a forward or backward hook of its own. A compiled graph runs the
    hooks its modules had when it was traced and, by torch's default (``skip_nnmodule_hook_guards``),
    does not notice one added later; no public API lists a module's hooks."""
    return any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
               for m in net.modules())


def forward_hook_count(module: nn.Module) -> int:
    """How many forward and forward pre-hooks the modules of ``module`` hold (the layer monitors leave none
    between the steps they log); no public API lists a module's hooks."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def compiled_graphs() -> int:
    """How many graphs ``torch.compile`` has compiled in this process (a recompilation adds one): Dynamo's
    own counter, which ``torch._dynamo.explain`` and ``TORCH_LOGS=recompiles`` read; no public API counts them."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
