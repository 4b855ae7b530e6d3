"""Synchronized from-scratch BN: 2 processes on gloo equal 1 process on the joint batch, and a
DDP fit through the CLI with ``sync_batchnorm`` synchronizes it.

torch.nn.SyncBatchNorm refuses CPU tensors, so the reference is what SyncBatchNorm is defined to
compute: torch's BatchNorm on the batch of all processes together; where a GPU is there, a second
test runs the cases with CUDA tensors against that and against SyncBatchNorm itself. Each process
feeds its slice of a global batch (equal, unequal and empty slices); the outputs and input
gradients it gets back must be its slice of the reference's, its gamma/beta gradients must sum
to the reference's (DDP does that sum), and its running statistics must be the reference's.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bn_lightning.nn import batchnorm as norm
from helpers import REPO

STEPS = 3


def _reference(make_torch_layer, inputs, grads):
    """torch's layer on the whole batch, STEPS training steps then eval: what every process must see."""
    layer = make_torch_layer()
    outputs = []
    for x, g in zip(inputs, grads):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
        outputs.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer.weight.grad = layer.bias.grad = None
    layer.eval()
    return outputs, layer.state_dict(), layer(inputs[0]).detach()


CASES = {
    f"{'+'.join(map(str, sizes))}-{'2d' if len(shape) == 4 else '1d'}": (sizes, shape)
    for sizes in [(4, 4), (3, 5), (0, 8)]
    for shape in [(8, 6, 5, 5), (8, 12)]
}


def _run_on_slice(layer, inputs, grads, begin, end):
    """STEPS training steps then eval of ``layer`` on this process's rows ``begin:end`` of each batch,
    its gamma/beta gradients summed over the processes as DDP sums them."""
    got = []
    for x, g in zip(inputs, grads):
        mine = x[begin:end].clone().requires_grad_()
        y = layer(mine)
        y.backward(g[begin:end])
        # torch's SyncBatchNorm leaves no gradients (None) on a process whose slice is empty: zeros.
        input_grad, weight_grad, bias_grad = (
            torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in (mine, layer.weight, layer.bias)
        )
        dist.all_reduce(weight_grad), dist.all_reduce(bias_grad)
        got.append((y.detach(), input_grad, weight_grad, bias_grad))
        layer.weight.grad = layer.bias.grad = None
    layer.eval()
    return got, layer.state_dict(), layer(inputs[0][begin:end]).detach()


def _check_case(rank, sizes, shape, device):
    """Our synced layer on this process's slice against torch's BN on the joint batch, sliced, and on a
    GPU also against torch's SyncBatchNorm on the same slice."""
    torch.manual_seed(0)
    inputs = [(torch.randn(sum(sizes), *shape[1:]) * 3 + 1).to(device) for _ in range(STEPS)]
    grads = [torch.randn_like(x) for x in inputs]
    ours_cls, torch_cls = (norm.BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (norm.BatchNorm1d, nn.BatchNorm1d)

    def make(cls, **kwargs):
        torch.manual_seed(1)
        layer = cls(shape[1], **kwargs).to(device)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        return layer

    begin, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    got, got_state, got_eval = _run_on_slice(make(ours_cls, sync=True), inputs, grads, begin, end)
    joint, joint_state, joint_eval = _reference(lambda: make(torch_cls), inputs, grads)
    references = [([(y[begin:end], dx[begin:end], dw, db) for y, dx, dw, db in joint], joint_state, joint_eval[begin:end])]
    if device != "cpu":  # torch's own SyncBatchNorm runs on GPUs only
        references.append(_run_on_slice(make(nn.SyncBatchNorm), inputs, grads, begin, end))
    for expected, state, expected_eval in references:
        for (y, dx, dw, db), (ry, rdx, rdw, rdb) in zip(got, expected):
            torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-5)
        for key, value in state.items():
            torch.testing.assert_close(got_state[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_eval, expected_eval, rtol=1e-5, atol=1e-5)


def _worker(rank, world_size, init_file, device, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, (sizes, shape) in CASES.items():
            try:
                _check_case(rank, sizes, shape, device)
                results[(name, rank)] = "ok"
            except Exception as err:  # the parent sees no child traceback otherwise
                results[(name, rank)] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def _two_processes(init_file, device):
    """Every case run once by 2 gloo processes (one spawn: starting processes is the slow part)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, init_file, device, results), nprocs=2)
    return dict(results)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    return _two_processes(tmp_path_factory.mktemp("sync") / "init", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_on_the_joint_batch(two_process_results, case):
    assert (two_process_results[(case, 0)], two_process_results[(case, 1)]) == ("ok", "ok")


@pytest.mark.slow
@pytest.mark.gpu  # torch.nn.SyncBatchNorm runs on GPUs only
def test_two_processes_on_a_gpu_match_the_joint_batch_and_torchs_sync_batchnorm(tmp_path):
    """The same cases with CUDA tensors, both processes sharing one GPU over gloo."""
    results = _two_processes(tmp_path / "init", "cuda")
    assert results == {(case, rank): "ok" for case in CASES for rank in (0, 1)}


def test_without_a_process_group_sync_is_a_no_op():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    synced, plain = norm.BatchNorm2d(4, sync=True), nn.BatchNorm2d(4)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)
    assert "sync=True" in repr(synced)


class SaveRunningStats(Callback):
    """Test-only: every rank saves its BN running statistics when fit ends, to compare the ranks."""

    def on_fit_end(self, trainer, pl_module):
        stats = {k: v for k, v in pl_module.state_dict().items() if ".running_" in k}
        torch.save(stats, Path(os.environ["RUNNING_STATS_DIR"]) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_fit_through_the_cli_syncs_our_bn_and_logs_and_checkpoints_once(tiny_data, tmp_path, compiled):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "RUNNING_STATS_DIR": str(tmp_path)}
    args = ["fit", "--config", str(REPO / "configs" / "lenet_bn_scratch.yaml"), f"--data.data_dir={tiny_data}",
            "--data.batch_size=32", "--data.val_size=40", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
            "--trainer.devices=2", "--trainer.sync_batchnorm=true", "--trainer.callbacks+=test_sync.SaveRunningStats",
            f"--model.compile={str(compiled).lower()}"]
    fit = subprocess.run([sys.executable, "-m", "bn_lightning", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]

    # Each rank saw its own half of every batch, so only synchronized statistics can agree exactly.
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(rank0) == 8 and rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)

    runs = list((tmp_path / "lightning_logs" / "lenet_bn_scratch").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one run, written by rank zero only
    checkpoints = sorted(p.name for p in (runs[0] / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and sum(name.startswith("best-epoch") for name in checkpoints) == 1
    events = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss_step")]
    # 160 training images, 80 a rank in batches of 32: 3 steps an epoch, each logged once.
    assert steps == sorted(set(steps)) and len(steps) == 6
    assert len(events.Scalars("test/acc")) == 1
