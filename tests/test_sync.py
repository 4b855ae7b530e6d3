"""Synchronized from-scratch BN: 2 processes on gloo equal 1 process on the joint batch.

torch.nn.SyncBatchNorm refuses CPU tensors, so on this CPU the reference is what SyncBatchNorm
is defined to compute: torch's BatchNorm on the batch of all processes together. Each process
feeds its slice of a global batch (equal, unequal and empty slices); the outputs and input
gradients it gets back must be its slice of the reference's, its gamma/beta gradients must sum
to the reference's (DDP does that sum), and its running statistics must be the reference's.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bn_lightning import norm

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


def _check_case(rank, sizes, shape):
    """Run our synced layer on this process's slice and compare it with the reference."""
    torch.manual_seed(0)
    inputs = [torch.randn(sum(sizes), *shape[1:]) * 3 + 1 for _ in range(STEPS)]
    grads = [torch.randn_like(x) for x in inputs]
    ours_cls, torch_cls = (norm.BatchNorm2d, nn.BatchNorm2d) if len(shape) == 4 else (norm.BatchNorm1d, nn.BatchNorm1d)

    def make(cls, **kwargs):
        torch.manual_seed(1)
        layer = cls(shape[1], **kwargs)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        return layer

    ours = make(ours_cls, sync=True)
    begin, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    got = []
    for x, g in zip(inputs, grads):
        mine = x[begin:end].clone().requires_grad_()
        y = ours(mine)
        y.backward(g[begin:end])
        weight_grad, bias_grad = ours.weight.grad.clone(), ours.bias.grad.clone()
        dist.all_reduce(weight_grad), dist.all_reduce(bias_grad)  # what DDP does to parameter grads
        got.append((y.detach(), mine.grad, weight_grad, bias_grad))
        ours.weight.grad = ours.bias.grad = None
    ours.eval()
    eval_out = ours(inputs[0][begin:end]).detach()

    expected, state, expected_eval = _reference(lambda: make(torch_cls), inputs, grads)
    for (y, dx, dw, db), (ry, rdx, rdw, rdb) in zip(got, expected):
        torch.testing.assert_close(y, ry[begin:end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, rdx[begin:end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-5)
    for key, value in state.items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_out, expected_eval[begin:end], rtol=1e-5, atol=1e-5)


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, (sizes, shape) in CASES.items():
            try:
                _check_case(rank, sizes, shape)
                results[(name, rank)] = "ok"
            except AssertionError as err:
                results[(name, rank)] = str(err)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Every case run once by 2 gloo processes (one spawn: starting processes is the slow part)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, tmp_path_factory.mktemp("sync") / "init", results), nprocs=2)
    return dict(results)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_on_the_joint_batch(two_process_results, case):
    assert (two_process_results[(case, 0)], two_process_results[(case, 1)]) == ("ok", "ok")


def test_without_a_process_group_sync_is_a_no_op():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3)
    synced, plain = norm.BatchNorm2d(4, sync=True), nn.BatchNorm2d(4)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)
    assert "sync=True" in repr(synced)
