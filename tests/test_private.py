"""The private details of dependencies that ``bn_lightning/training/_private.py`` relies on, checked against the
installed versions: each test fails with the name of the function there that an upgrade broke."""

import importlib.metadata

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from bn_lightning.training import _private
from bn_lightning.training.arguments import _ArgumentParser
from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import Classifier
from bn_lightning.training.resume import StopAndResume

VERSIONS = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("lightning", "jsonargparse", "torch"))


def broken(function: str, what: str) -> str:
    return f"bn_lightning/training/_private.py:{function} no longer works with {VERSIONS}: {what}"


def tiny_fit(data, root, callbacks, **trainer_args) -> Trainer:
    trainer = Trainer(default_root_dir=root, max_epochs=1, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, **trainer_args)
    trainer.fit(Classifier(LeNet("scratch")), datamodule=FashionMNISTDataModule(data, batch_size=16, val_size=40, shuffle_seed=5))
    return trainer


class StepsWritten(Logger):
    """A logger that keeps the steps Lightning writes metrics at: the reference for the logging-step rule."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    name, version = "steps", 0

    def log_metrics(self, metrics, step=None) -> None:
        if "train/loss_step" in metrics:
            self.steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class AskBeforeEachStep(Callback):
    def __init__(self) -> None:
        self.answers: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.answers[trainer.global_step] = _private.is_logging_step(trainer)


def test_is_logging_step_is_true_on_exactly_the_steps_the_logger_writes(tiny_data, tmp_path):
    asked, logger = AskBeforeEachStep(), StepsWritten()
    tiny_fit(tiny_data, tmp_path, [asked], logger=logger, log_every_n_steps=3)
    assert len(asked.answers) == 10, broken("is_logging_step", "the test's fit ran another number of steps")
    assert [step for step, yes in asked.answers.items() if yes] == logger.steps == [2, 5, 8], broken(
        "is_logging_step", f"Lightning's rule {asked.answers} and the steps written {logger.steps} disagree")


class RequestStopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.flag_read_back = step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            _private.set_stop_requested(trainer, True)
            self.flag_read_back = trainer.received_sigterm


def test_set_stop_requested_stops_fit_at_the_next_batch_as_sigterm_does(tiny_data, tmp_path):
    request = RequestStopAt(3)
    with pytest.raises(SIGTERMException):
        tiny_fit(tiny_data, tmp_path, [request])
    assert request.flag_read_back is True, broken("set_stop_requested", "trainer.received_sigterm does not read it back")


class SaveMidEpoch(Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            trainer.save_checkpoint(self.path)


def test_the_fit_loops_checkpoint_layout_is_the_one_rewind_edits(tiny_data, tmp_path):
    path = tmp_path / "mid.ckpt"
    tiny_fit(tiny_data, tmp_path, [SaveMidEpoch(path), StopAndResume()])
    checkpoint = torch.load(path, weights_only=True)
    loops = checkpoint["loops"]["fit_loop"]
    assert loops["state_dict"]["combined_loader"] == [{"seed": 5, "epoch": 0, "batches": 4}], broken(
        "rewind_to_last_completed_batch", f"the train loader's state is not where it was: {loops['state_dict']}")
    # Lightning counts this batch after its batch-end hooks, where the checkpoint was taken.
    assert loops["epoch_loop.state_dict"]["_batches_that_stepped"] == 3, broken(
        "rewind_to_last_completed_batch", "the logging step is not stored as _batches_that_stepped")
    _private.rewind_to_last_completed_batch(checkpoint, completed=3)
    assert loops["state_dict"]["combined_loader"][0]["batches"] == 3
    assert loops["epoch_loop.state_dict"]["_batches_that_stepped"] == 2


def test_write_summary_puts_the_hparams_session_into_the_runs_own_event_file(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    for summary in hparams_summaries({"norm": "scratch"}, {"val/acc": 0.0}):
        _private.write_summary(logger.experiment, summary)
    logger.experiment.flush()
    (event_file,) = (tmp_path / "run" / "version_0").glob("events.out.tfevents.*")
    tags = {value.tag for event in EventFileLoader(str(event_file)).Load() for value in event.summary.value}
    assert "_hparams_/session_start_info" in tags, broken(
        "write_summary", "SummaryWriter._get_file_writer().add_summary did not write the session")


def test_known_subclasses_are_the_classes_jsonargparse_lists_in_help():
    parser = _ArgumentParser()
    parser.add_argument("--optimizer", type=type[torch.optim.Optimizer])
    known = _private.known_subclasses(parser, "optimizer")
    assert "torch.optim.SGD" in known and "torch.optim.Adam" in known, broken(
        "known_subclasses", f"argparse's _option_string_actions or jsonargparse's extra_help changed: {known!r}")
    assert _private.known_subclasses(parser, "no_such_key") == ""


def test_option_strings_and_groups_list_every_option_of_a_parser():
    parser = _ArgumentParser(prog="demo")
    parser.add_argument("--alpha", type=int, help="the first")
    group = parser.add_argument_group("Settings of beta")
    group.add_argument("--beta.gamma", type=float, default=0.5)
    assert {"--alpha", "--beta.gamma", "--help"} <= set(_private.option_strings(parser)), broken(
        "option_strings", "argparse's _option_string_actions changed")
    groups = dict(_private.option_groups(parser))
    assert [a.dest for a in groups["Settings of beta"]] == ["beta.gamma"], broken(
        "option_groups", "argparse's _action_groups or _group_actions changed")
    assert "alpha" in [a.dest for actions in groups.values() for a in actions]


def test_has_hooks_sees_a_hook_of_any_kind_on_any_submodule():
    net = LeNet("scratch")
    assert not _private.has_hooks(net), broken("has_hooks", "a fresh LeNet has hooks")
    for register in ("register_forward_pre_hook", "register_forward_hook", "register_full_backward_hook",
                     "register_full_backward_pre_hook"):
        handle = getattr(net.fc1.norm, register)(lambda *args: None)
        assert _private.has_hooks(net), broken("has_hooks", f"misses a hook of {register}")
        handle.remove()
        assert not _private.has_hooks(net), broken("has_hooks", f"still sees a removed hook of {register}")


def test_forward_hook_count_counts_forward_and_pre_hooks_on_every_submodule():
    net = LeNet("scratch")
    assert _private.forward_hook_count(net) == 0, broken("forward_hook_count", "a fresh LeNet has hooks")
    handles = [net.fc1.norm.register_forward_pre_hook(lambda *args: None),
               net.conv1.register_forward_hook(lambda *args: None),
               net.register_full_backward_hook(lambda *args: None)]  # not a forward hook
    assert _private.forward_hook_count(net) == 2, broken("forward_hook_count", "miscounts forward hooks")
    for handle in handles:
        handle.remove()
    assert _private.forward_hook_count(net) == 0, broken("forward_hook_count", "still sees removed hooks")


def test_compiled_graphs_counts_each_compilation_and_recompilation():
    compiled = torch.compile(lambda x: x.sin() + 1, dynamic=False)
    before = _private.compiled_graphs()
    compiled(torch.ones(3))
    compiled(torch.ones(3))
    assert _private.compiled_graphs() == before + 1, broken("compiled_graphs", "does not count a compilation once")
    compiled(torch.ones(5))  # another static shape: a recompilation
    assert _private.compiled_graphs() == before + 2, broken("compiled_graphs", "does not count a recompilation")
