"""Stopping and resuming: a fit stopped by SIGTERM or Ctrl-C leaves a checkpoint and its logs, and
``--ckpt_path last`` continues it to the same weights, metrics and TensorBoard series as a run never stopped.

How the stop is made to land mid-epoch: the CLI test adds ``stop_points.PauseAtStep`` to the killed
run's callbacks; it pauses the run after step 7 (epoch 1, batch 2 of 5) until the test's SIGTERM has
arrived, so the stop always falls at that step. The in-process tests send the signal from inside,
with ``stop_points.SignalAtStep``. CPU runs are deterministic here without ``deterministic: true``:
the same ops on the same threads give the same bits, which the equality checks rely on.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_lightning.training.data import FashionMNISTDataModule
from bn_lightning.nn.lenet import LeNet
from bn_lightning.training.module import Classifier
from bn_lightning.training.resume import StopAndResume
from bn_lightning.training.sampling import ClassMixShuffle, EpochShuffle, ResumableLoader
from helpers import REPO, SHARED_DATA, frequent_logging_callbacks, needs_real_data, run_cli
from stop_points import RaiseAtStep, SignalAtStep

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 5  # 160 training images of the tiny data in batches of 32
EPOCHS = 3
STOP_STEP = 7  # epoch 1, after its 2nd batch


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def series(accumulator: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_same_state(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, different


def small_config(tmp_path: Path, extra_callbacks: list[dict] = ()) -> Path:
    """configs/lenet_bn_scratch.yaml with every monitor logging every 2 steps (histograms every 4)."""
    config = yaml.safe_load((REPO / "configs" / "lenet_bn_scratch.yaml").read_text())
    config["trainer"]["callbacks"] = [*extra_callbacks, *frequent_logging_callbacks()]
    path = tmp_path / f"config{len(extra_callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sigterm_mid_epoch_leaves_a_checkpoint_and_resuming_it_equals_an_uninterrupted_run(tiny_data, tmp_path):
    args = [f"--data.data_dir={tiny_data}", "--data.batch_size=32", "--data.val_size=40",
            f"--trainer.max_epochs={EPOCHS}", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false"]
    plain = small_config(tmp_path)
    marker = tmp_path / "paused"
    pausing = small_config(tmp_path, [{"class_path": "stop_points.PauseAtStep",
                                       "init_args": {"step": STOP_STEP, "marker": str(marker)}}])
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()

    # The stopped run: SIGTERM while it is paused after step 7.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    log = tmp_path / "stopped.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "bn_lightning", "fit", "--config", str(pausing), *args],
                                   cwd=tmp_path / "cut", env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            process.kill()
        assert marker.exists(), log.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received" in output and "--ckpt_path last" in output

    run_dir = tmp_path / "cut" / "lightning_logs" / "lenet_bn_scratch" / "version_0"
    stopped = torch.load(run_dir / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert (stopped["epoch"], stopped["global_step"]) == (1, STOP_STEP)
    assert stopped["callbacks"]["StopAndResume"]["stopped_by"] == "SIGTERM"
    assert stopped["callbacks"]["StopAndResume"]["at_batch_boundary"] is True
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"seed": 42, "epoch": 1, "batches": STOP_STEP - STEPS_PER_EPOCH}]
    assert stopped["state_dict"]["net.conv1.norm.num_batches_tracked"] == STOP_STEP
    # ... and its logs: every step before the stop is in the event file.
    logged = series(events(run_dir))
    assert [step for step, _ in logged["train/loss_step"]] == list(range(STOP_STEP))

    # The same run never stopped (--ckpt_path last with no checkpoint yet starts it), and the stopped one resumed.
    reference = run_cli("fit", "--config", str(plain), *args, "--ckpt_path=last", cwd=tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "--ckpt_path last: no checkpoint" in reference.stderr
    resumed = run_cli("fit", "--config", str(plain), *args, "--ckpt_path=last", cwd=tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "interrupted.ckpt at step 7" in resumed.stderr

    reference_dir = tmp_path / "ref" / "lightning_logs" / "lenet_bn_scratch" / "version_0"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]  # resumed in its own folder
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {p.name for p in (reference_dir / "checkpoints").iterdir()}
    assert (run_dir / "config.yaml").exists() and (run_dir / f"config.resumed-step{STOP_STEP}.yaml").exists()
    # Weights, BN running statistics and num_batches_tracked, optimizer state, training-metric sums.
    ours = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    theirs = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert_same_state(ours["state_dict"], theirs["state_dict"])
    assert ours["state_dict"]["net.fc2.norm.num_batches_tracked"] == EPOCHS * STEPS_PER_EPOCH
    assert ours["optimizer_states"] == theirs["optimizer_states"]

    # TensorBoard: every series equal to the reference's, each step once, none missing; throughput
    # (a timing) at the same steps. The stopped process's events at steps >= 7 were purged.
    ours, theirs = events(run_dir), events(reference_dir)
    ours_series, theirs_series = series(ours), series(theirs)
    assert ours_series.keys() == theirs_series.keys()
    for tag, points in theirs_series.items():
        if tag.startswith("perf/"):
            assert [s for s, _ in ours_series[tag]] == [s for s, _ in points], tag
        else:
            assert ours_series[tag] == points, tag
    assert [step for step, _ in ours_series["train/loss_step"]] == list(range(EPOCHS * STEPS_PER_EPOCH))
    for tag in ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss_epoch", "train/acc_epoch"):
        assert len(ours_series[tag]) == len({step for step, _ in ours_series[tag]}) > 0, tag
    for kind in ("Histograms", "Tensors"):  # BN and activation histograms; the custom-scalars layout, once
        for tag in theirs.Tags()[kind.lower()]:
            assert [e.step for e in getattr(ours, kind)(tag)] == [e.step for e in getattr(theirs, kind)(tag)], tag


def in_process_fit(data: Path, root: Path, norm: str, callbacks=(), ckpt_path=None) -> Classifier:
    seed_everything(0)
    model = Classifier(LeNet(norm))
    trainer = Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, max_epochs=2,
                      callbacks=[*callbacks, StopAndResume()], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=FashionMNISTDataModule(data, batch_size=32, val_size=40, shuffle_seed=3),
                ckpt_path=ckpt_path, weights_only=True)
    return model


@pytest.mark.parametrize(("norm", "signum"), [("none", signal.SIGTERM), ("scratch", signal.SIGINT), ("torch", signal.SIGTERM)])
def test_running_statistics_survive_the_round_trip_and_the_resumed_fit_is_exact(tiny_data, tmp_path, norm, signum):
    reference = in_process_fit(tiny_data, tmp_path / "ref", norm)
    stopper = SignalAtStep(STOP_STEP, signum)
    with pytest.raises(SIGTERMException):  # a first Ctrl-C stops the same way as SIGTERM
        in_process_fit(tiny_data, tmp_path / "cut", norm, [stopper])
    path = tmp_path / "cut" / "checkpoints" / "interrupted.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["callbacks"]["StopAndResume"]["stopped_by"] == signal.Signals(signum).name

    # The checkpoint loads back into a fresh model: BN buffers, num_batches_tracked included.
    fresh = Classifier(LeNet(norm))
    fresh.load_state_dict(saved["state_dict"])
    buffers = {name: b for name, b in fresh.named_buffers() if ".norm." in name}
    if norm == "none":
        assert not buffers
    else:
        assert {name.rsplit(".", 1)[1] for name in buffers} == {"running_mean", "running_var", "num_batches_tracked"}
        assert all(b.item() == STOP_STEP for name, b in buffers.items() if name.endswith("num_batches_tracked"))
        assert not torch.equal(buffers["net.conv1.norm.running_var"], torch.ones(6))  # trained, not the initial value
    assert_same_state(fresh.state_dict(), saved["state_dict"])

    resumed = in_process_fit(tiny_data, tmp_path / "cut", norm, ckpt_path=path)
    assert_same_state(resumed.state_dict(), reference.state_dict())
    assert not path.exists()  # a fit that finishes removes the stale stop checkpoint


def test_a_crash_mid_step_leaves_a_checkpoint_that_resumes_with_a_warning(tiny_data, tmp_path):
    with pytest.raises(RuntimeError, match="on purpose"):
        in_process_fit(tiny_data, tmp_path, "scratch", [RaiseAtStep(STOP_STEP)])
    path = tmp_path / "checkpoints" / "interrupted.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["callbacks"]["StopAndResume"]["stopped_by"] == "RuntimeError"
    assert saved["callbacks"]["StopAndResume"]["at_batch_boundary"] is False
    # The unfinished batch is served again by the resumed loader, as Lightning runs it again.
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == STOP_STEP - STEPS_PER_EPOCH
    with pytest.warns(UserWarning, match="in the middle of a training batch"):
        resumed = in_process_fit(tiny_data, tmp_path, "scratch", ckpt_path=path)
    assert resumed.net.conv1.norm.num_batches_tracked == 2 * STEPS_PER_EPOCH + 1  # every batch ran, the failed one twice


def batches(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def test_the_training_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch(tiny_data):
    dm = FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40)
    dm.prepare_data()
    dm.setup("fit")
    labels = dm.train_set.targets

    def loader(seed):
        return ResumableLoader(dm.train_set, batch_size=32, seed=seed, collate_fn=lambda batch: batch)

    first = loader(5)
    torch.manual_seed(0)
    epoch0 = batches(first)
    torch.manual_seed(1)  # the global RNG plays no part
    assert batches(loader(5)) == epoch0 and batches(loader(6)) != epoch0
    first.sampler.set_epoch(1)
    epoch1 = batches(first)
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == sorted(labels.tolist())
    assert [len(b) for b in epoch1] == [32] * 5

    # Stopped after 2 batches of epoch 1: a new loader given that state serves the other 3.
    iterator = iter(first)
    next(iterator), next(iterator)
    state = first.state_dict()
    assert state == {"seed": 5, "epoch": 1, "batches": 2}
    again = loader(99)
    again.load_state_dict(state)
    again.sampler.set_epoch(1)  # Lightning sets the epoch before the first batch
    assert len(again) == 5 and batches(again) == epoch1[2:]
    assert batches(again) == epoch1  # the skip is for one iteration only
    # A state saved at the end of an epoch: that iteration is empty, the next epoch is whole.
    again.load_state_dict({"seed": 5, "epoch": 1, "batches": 5})
    iter(again)  # Lightning creates the epoch's iterator and, the epoch being done, draws nothing
    again.sampler.set_epoch(2)
    assert again.state_dict() == {"seed": 5, "epoch": 2, "batches": 0}
    assert len(batches(again)) == 5


def test_batches_are_still_one_slice_of_the_images(tiny_data):
    dm = FashionMNISTDataModule(tiny_data, batch_size=64, val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    calls = []
    original = type(dm.train_set).__getitems__
    dm.train_set.__class__ = type("Counting", (type(dm.train_set),), {
        "__getitems__": lambda self, indices: calls.append(len(indices)) or original(self, indices)})
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and isinstance(loader.sampler, EpochShuffle)
    assert [len(y) for _, y in loader] == [64, 64, 52] and calls == [64, 64, 52]


def test_class_mixed_batches_cover_every_image_once_per_epoch_and_resume_mid_epoch(tiny_data):
    dm = FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40, classes_per_batch=2, shuffle_seed=5)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassMixShuffle)
    images = {bytes(image.numpy()) for image in dm.train_set.images}
    assert len(images) == len(dm.train_set)  # the tiny images are all distinct, so coverage is checked by content

    def served(loader) -> list[list[bytes]]:
        return [[bytes((x[i, 0] * 255).round().byte().numpy()) for i in range(len(x))] for x, _ in loader]

    epoch0 = served(loader)
    assert sorted(sum(epoch0, [])) == sorted(images) and [len(b) for b in epoch0] == [32] * 5
    torch.manual_seed(1)  # the global RNG plays no part
    assert served(dm.train_dataloader()) == epoch0
    loader.sampler.set_epoch(1)
    epoch1 = served(loader)
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == sorted(images)

    iterator = iter(loader)  # stopped after 2 batches of epoch 1: a new loader given that state serves the rest
    next(iterator), next(iterator)
    again = FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40, classes_per_batch=2, shuffle_seed=99)
    again.prepare_data()
    again.setup("fit")
    resumed = again.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    resumed.sampler.set_epoch(1)
    assert served(resumed) == epoch1[2:]


@needs_real_data
def test_class_mixed_batches_hold_two_classes_in_equal_parts_and_every_pair_meets():
    dm = FashionMNISTDataModule(str(SHARED_DATA), batch_size=256, download=False)
    dm.prepare_data()
    dm.setup("fit")
    labels = dm.train_set.targets
    order = ClassMixShuffle(labels, batch_size=256, classes_per_batch=2, seed=0)
    for epoch in range(2):
        batches = order.batches(epoch)
        assert sorted(torch.cat(batches).tolist()) == list(range(len(labels)))
        assert [len(b) for b in batches] == [256] * (len(labels) // 256) + [len(labels) % 256]
        counts = [sorted(torch.bincount(labels[b], minlength=10).tolist()) for b in batches[:-1]]
        two_halves = [c == [0] * 8 + [128, 128] for c in counts]
        mixed = order.mixed(epoch)
        assert two_halves.count(False) == mixed <= 8, mixed  # where the classes run out (under 4% of 214)
        pairs = {tuple(labels[b].unique().tolist()) for b, ok in zip(batches, two_halves) if ok}
        assert len(pairs) == 45  # every pair of the 10 classes, not a fixed pairing
    assert not torch.equal(order.order(0), order.order(1))


@pytest.mark.parametrize("kwargs, message", [
    ({"classes_per_batch": 3}, "divide batch_size 256 into equal parts, got 3"),
    ({"classes_per_batch": 11}, "one of Fashion-MNIST's 1 to 10 classes"),
    ({"classes_per_batch": 0}, "one of Fashion-MNIST's 1 to 10 classes"),
])
def test_a_class_mix_the_batches_cannot_hold_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)
