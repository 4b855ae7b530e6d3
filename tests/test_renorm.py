"""Batch Renorm from scratch: gradcheck, plain BN at r_max = 1 and d_max = 0, a direct computation beyond,
the schedule of its limits, and everything it shares with our BN (eval, state_dict, checkpoints)."""

import inspect
import io

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from bn_lightning import Classifier, FashionMNISTDataModule
from bn_lightning.callbacks import BatchRenormSchedule
from bn_lightning.nn import batchnorm as norm
from bn_lightning.nn.lenet import LeNet
from bn_lightning.nn.renorm import BatchRenorm1d, BatchRenorm2d, _BatchRenormFunction
from bn_lightning.training.sync import BatchNormSync

F64 = torch.float64
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-9, atol=1e-9)}
SHAPES = {BatchRenorm1d: [(8, 3), (6, 3, 5)], BatchRenorm2d: [(6, 3, 4, 3)]}
CASES = [(cls, shape) for cls, shapes in SHAPES.items() for shape in shapes]
# Full limits from the first step: no warm-up, no relaxation.
AT_ONCE = dict(warmup_steps=0, r_relax_steps=0, d_relax_steps=0)


def view(t, ndim):
    return t.view((1, -1) + (1,) * (ndim - 2))


def reference(x, weight, bias, running_mean, running_var, r_max, d_max, eps=1e-5):
    """Algorithm 1 of Ioffe 2017 in plain torch ops, r and d detached: output, r, d."""
    dims, ndim = [0, *range(2, x.dim())], x.dim()
    mean, var = x.mean(dims), x.var(dims, correction=0)
    sigma_batch, sigma = (var + eps).sqrt(), (running_var + eps).sqrt()
    r = (sigma_batch / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - view(mean, ndim)) / view(sigma_batch, ndim) * view(r, ndim) + view(d, ndim)
    return view(weight, ndim) * x_hat + view(bias, ndim), r, d


def running_stats(kind, channels):
    """Running statistics a unit-variance, zero-mean batch is near (r and d unclipped for r_max 3 and d_max 5),
    or far from (each channel's r and d clipped at r_max 2 and d_max 0.2, one way or the other)."""
    if kind == "near":
        return torch.linspace(-0.3, 0.3, channels, dtype=F64), torch.linspace(0.6, 1.5, channels, dtype=F64)
    far = torch.tensor([1.0, -1.0, 1.0], dtype=F64)[:channels]
    return 5 * far, torch.where(far > 0, 0.01, 100.0).to(F64)


def function_inputs(shape, kind):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    weight = (torch.rand(shape[1], dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(shape[1], dtype=F64, requires_grad=True)
    return x, weight, bias, *running_stats(kind, shape[1])


@pytest.mark.parametrize("limits", [(1.0, 0.0), (2.0, 0.2)], ids=["plain-bn", "clipped"])
@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 5), (6, 3, 4, 3)])
def test_gradcheck_float64_where_r_and_d_are_constant(shape, limits):
    """With r and d clipped (or at plain BN's 1 and 0) they are constant near x, so the backward that
    holds them constant is the true gradient, for x, gamma and beta."""
    x, weight, bias, running_mean, running_var = function_inputs(shape, "far")
    r_max, d_max = (torch.tensor(v, dtype=F64) for v in limits)

    def f(x, weight, bias):
        # Clones: each call updates the running statistics in place.
        return _BatchRenormFunction.apply(x, weight, bias, running_mean.clone(), running_var.clone(), r_max, d_max,
                                          0.1, 1e-5)

    if limits == (2.0, 0.2):
        _, r, d = reference(x, weight, bias, running_mean, running_var, 2.0, 0.2)
        assert set(r.tolist()) == {0.5, 2.0} and set(d.tolist()) == {-0.2, 0.2}
    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("shape", [(8, 3), (6, 3, 4, 3)])
def test_gradcheck_float64_of_gamma_and_beta_and_the_x_gradient_holds_unclipped_r_and_d_constant(shape):
    x, weight, bias, running_mean, running_var = function_inputs(shape, "near")
    r_max, d_max = torch.tensor(3.0, dtype=F64), torch.tensor(5.0, dtype=F64)

    def f(x, weight, bias):
        return _BatchRenormFunction.apply(x, weight, bias, running_mean.clone(), running_var.clone(), r_max, d_max,
                                          0.1, 1e-5)

    assert torch.autograd.gradcheck(lambda w, b: f(x.detach(), w, b), (weight, bias))
    # Unclipped, r and d move with x: the paper's backward, which holds them still, is not the forward's gradient.
    assert not torch.autograd.gradcheck(f, (x, weight, bias), raise_exception=False)


def train_step(layer, x, grad_out):
    """Output, gradients of x, gamma and beta and the state_dict's values after one step (or one eval), and its keys."""
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad_out)
    grads = [p.grad.clone() for p in (layer.weight, layer.bias) if p is not None]
    layer.zero_grad()
    state = layer.state_dict()
    return [out, x.grad, *grads, *(v.clone() for v in state.values())], list(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [{}, {"momentum": None}, {"affine": False}, {"bias": False}], ids=str)
@pytest.mark.parametrize("cls, shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_at_r_max_1_and_d_max_0_it_is_our_bn_exactly_and_torchs(cls, shape, opts, dtype):
    """Outputs, gradients of x, gamma and beta and the running statistics, step after step, then eval:
    our BN's arithmetic to the bit, torch's to float tolerance."""
    pair = (norm.BatchNorm1d, nn.BatchNorm1d) if cls is BatchRenorm1d else (norm.BatchNorm2d, nn.BatchNorm2d)
    ours, theirs = (layer_cls(shape[1], dtype=dtype, **opts) for layer_cls in pair)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5)
    renorm = cls(shape[1], dtype=dtype, r_max=1.0, d_max=0.0, **AT_ONCE, **opts)
    renorm.load_state_dict(theirs.state_dict()), ours.load_state_dict(theirs.state_dict())
    torch.manual_seed(0)
    for step in range(5):
        if step == 4:
            renorm.eval(), ours.eval(), theirs.eval()
        x, grad_out = torch.randn(shape, dtype=dtype) * (1 + step) + step, torch.randn(shape, dtype=dtype)
        (got, keys), (exact, ours_keys), (close, theirs_keys) = (
            train_step(layer, x, grad_out) for layer in (renorm, ours, theirs))
        assert keys == ours_keys == theirs_keys
        assert all(torch.equal(a, b) for a, b in zip(got, exact))
        for a, b in zip(got, close):
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("kind", ["near", "far"], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("cls, shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_beyond_plain_bn_it_is_the_direct_computation(cls, shape, kind):
    """Output and gradients against :func:`reference` through autograd, r and d from the running statistics
    as they stand before the step; those then update as BN's do. Each step starts from running statistics
    near the batch's, or far from them."""
    r_max, d_max = (3.0, 5.0) if kind == "near" else (2.0, 0.2)
    layer = cls(shape[1], dtype=F64, momentum=0.2, r_max=r_max, d_max=d_max, **AT_ONCE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    weight, bias = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    torch.manual_seed(1)
    for step in range(3):
        running_mean, running_var = (t * (1 + 0.1 * step) for t in running_stats(kind, shape[1]))
        with torch.no_grad():
            layer.running_mean.copy_(running_mean), layer.running_var.copy_(running_var)
        x = torch.randn(shape, dtype=F64)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, r, d = reference(xr, weight, bias, running_mean, running_var, r_max, d_max)
        if kind == "near":
            assert ((r > 1 / r_max) & (r < r_max) & (r != 1)).all() and ((d.abs() < d_max) & (d != 0)).all()
        else:
            assert ((r == 1 / r_max) | (r == r_max)).all() and (d.abs() == d_max).all()
        out = layer(xo)
        grad_out = torch.randn_like(out)
        torch.testing.assert_close(out, expected, **TOL[F64])
        got = torch.autograd.grad(out, [xo, layer.weight, layer.bias], grad_out)
        want = torch.autograd.grad(expected, [xr, weight, bias], grad_out)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[F64])
        dims = [0, *range(2, x.dim())]
        torch.testing.assert_close(layer.running_mean, 0.8 * running_mean + 0.2 * x.mean(dims), **TOL[F64])
        torch.testing.assert_close(layer.running_var, 0.8 * running_var + 0.2 * x.var(dims, correction=1), **TOL[F64])


def schedule(layer):
    return layer.r_max, layer.d_max, layer.warmup_steps, layer.r_relax_steps, layer.d_relax_steps


def limits_at(layer, step):
    layer.num_batches_tracked.fill_(step)
    return tuple(float(v) for v in layer.limits())


def test_the_limits_are_plain_bns_through_the_warm_up_then_relax_linearly_to_their_final_values():
    layer = BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup_steps=200, r_relax_steps=800, d_relax_steps=500)
    expected = {0: (1, 0), 199: (1, 0), 200: (1, 0), 300: (1.25, 1), 600: (2, 4), 700: (2.25, 5), 1000: (3, 5),
                5000: (3, 5)}
    assert {step: limits_at(layer, step) for step in expected} == expected
    at_once = BatchRenorm1d(3, r_max=2.0, d_max=1.0, warmup_steps=10, r_relax_steps=0, d_relax_steps=0)
    assert (limits_at(at_once, 9), limits_at(at_once, 10)) == ((1, 0), (2, 1))
    assert schedule(BatchRenorm1d(3)) == (3.0, 5.0, 200, 800, 500)


def test_each_training_step_takes_the_limits_of_the_steps_before_it_and_eval_takes_no_step():
    """Running statistics far from the batch's: the first two steps (the warm-up) are plain BN, the third
    renormalizes."""
    layer = BatchRenorm2d(3, dtype=F64, r_max=2.0, d_max=0.2, warmup_steps=2, r_relax_steps=0, d_relax_steps=0)
    plain = norm.BatchNorm2d(3, dtype=F64)
    far_mean, far_var = running_stats("far", 3)
    torch.manual_seed(0)
    for step in range(3):
        x = torch.randn(6, 3, 4, 4, dtype=F64)
        with torch.no_grad():
            layer.running_mean.copy_(far_mean), layer.running_var.copy_(far_var)
        plain.load_state_dict(layer.state_dict())
        out, bn = layer(x), plain(x)
        if step < 2:
            torch.testing.assert_close(out, bn, **TOL[F64])
        else:
            expected = reference(x, layer.weight, layer.bias, far_mean, far_var, 2.0, 0.2)[0]
            torch.testing.assert_close(out, expected, **TOL[F64])
            assert not torch.allclose(out, bn)
    layer.eval()
    layer(torch.randn(6, 3, 4, 4, dtype=F64))
    assert int(layer.num_batches_tracked) == 3


def test_eval_is_our_bns_eval_with_the_same_buffers():
    layer = BatchRenorm2d(4, **AT_ONCE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
    for step in range(5):
        layer(torch.randn(8, 4, 5, 5) * (step + 1) + step)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    bn, theirs = norm.BatchNorm2d(4), nn.BatchNorm2d(4)
    bn.load_state_dict(state), theirs.load_state_dict(state)
    layer.eval(), bn.eval(), theirs.eval()
    x = torch.randn(8, 4, 5, 5)
    assert torch.equal(layer(x), bn(x))
    torch.testing.assert_close(layer(x), theirs(x))
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())  # eval updates nothing


def test_state_dict_is_our_bns_and_torchs():
    for ours, theirs, renorm in ((norm.BatchNorm1d, nn.BatchNorm1d, BatchRenorm1d),
                                 (norm.BatchNorm2d, nn.BatchNorm2d, BatchRenorm2d)):
        state = renorm(6).state_dict()
        assert list(state) == list(ours(6).state_dict()) == list(theirs(6).state_dict())
        assert state._metadata[""]["version"] == 2
        theirs(6).load_state_dict(state)
        renorm(6).load_state_dict(theirs(6).state_dict())


def test_a_checkpoint_round_trip_continues_the_schedule():
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, warmup_steps=2, r_relax_steps=4, d_relax_steps=4)
    batches = [torch.randn(6, 3, 4, 4) * 2 + 1 for _ in range(6)]
    for x in batches[:3]:
        layer(x)
    saved = io.BytesIO()
    torch.save(layer.state_dict(), saved)
    saved.seek(0)
    resumed = BatchRenorm2d(3, warmup_steps=2, r_relax_steps=4, d_relax_steps=4)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert [float(v) for v in resumed.limits()] == [float(v) for v in layer.limits()] == [1.5, 1.25]
    for x in batches[3:]:
        assert torch.equal(resumed(x), layer(x))
    assert [float(v) for v in resumed.limits()] == [3.0, 5.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"r_max": 0.5}, r"r_max must be >= 1, .* got 0.5"),
    ({"d_max": -1.0}, r"d_max must be >= 0, .* got -1.0"),
    ({"warmup_steps": -1}, r"warmup_steps must be a number of steps, >= 0: got -1"),
    ({"r_relax_steps": -5}, r"r_relax_steps must be a number of steps, >= 0: got -5"),
    ({"track_running_stats": False}, r"corrects the batch statistics toward the running ones: it needs "
                                     r"track_running_stats=True"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(3, **kwargs)


def test_it_has_no_sync_option_to_refuse():
    """Batch Renorm shares BN's parameters and buffers (_NormBase), not BN's forward and its sync option."""
    assert "sync" not in inspect.signature(BatchRenorm2d).parameters
    with pytest.raises(TypeError, match="sync"):
        BatchRenorm2d(3, sync=True)


def test_sync_batchnorm_cannot_switch_it_on_unnoticed():
    with pytest.raises(ValueError, match="BatchRenorm2d takes each process's own batch statistics"):
        BatchNormSync().apply(LeNet("batch_renorm"))


def test_lenet_takes_it_as_norm_batch_renorm_with_its_schedule():
    net = LeNet("batch_renorm", {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 10, "r_relax_steps": 20,
                                 "d_relax_steps": 30})
    layers = [getattr(net, block).norm for block in ("conv1", "conv2", "fc1", "fc2")]
    assert [type(m) for m in layers] == [BatchRenorm2d, BatchRenorm2d, BatchRenorm1d, BatchRenorm1d]
    assert all(isinstance(m, norm.BATCH_NORMS) for m in layers)  # the BN monitors and callbacks find them
    assert {schedule(m) for m in layers} == {(2.0, 1.0, 10, 20, 30)}
    assert net.state_dict().keys() == LeNet("scratch").state_dict().keys()
    assert net(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert schedule(LeNet("batch_renorm").conv1.norm) == schedule(BatchRenorm2d(6))  # LeNet's defaults are the layer's
    with pytest.raises(ValueError, match="norm_kwargs warmup_steps: norm 'scratch' takes eps, momentum"):
        LeNet("scratch", {"warmup_steps": 0})


@pytest.mark.parametrize("batch_size", [8, 32])
def test_the_schedule_callback_counts_epochs_whatever_the_batch_size(tiny_data, batch_size):
    seed_everything(0)
    module = Classifier(LeNet("batch_renorm"), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    datamodule = FashionMNISTDataModule(str(tiny_data), batch_size=batch_size, val_size=40)
    trainer = Trainer(max_epochs=1, callbacks=[BatchRenormSchedule(warmup_epochs=0.5, r_relax_epochs=2, d_relax_epochs=1)],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule)
    per_epoch = -(-160 // batch_size)  # 200 train images, 40 held out for validation
    assert trainer.num_training_batches == per_epoch
    layers = [m for m in module.net.modules() if hasattr(m, "r_relax_steps")]
    assert len(layers) == 4
    for layer in layers:
        assert (layer.warmup_steps, layer.r_relax_steps, layer.d_relax_steps) == (round(per_epoch / 2), 2 * per_epoch, per_epoch)
        assert int(layer.num_batches_tracked) == per_epoch
        # Half-way through the schedule in epochs after one epoch: d is relaxed, r half-way.
        r_max, d_max = layer.limits()
        warm = per_epoch - round(per_epoch / 2)
        assert float(r_max) == pytest.approx(1 + (layer.r_max - 1) * warm / (2 * per_epoch))
        assert float(d_max) == pytest.approx(layer.d_max * warm / per_epoch)


def test_the_schedule_callback_says_what_is_wrong():
    with pytest.raises(ValueError, match="warmup_epochs must be a number of epochs"):
        BatchRenormSchedule(warmup_epochs=-1)
