"""The from-scratch BatchNorm against torch's own layers, number for number."""

import inspect
import itertools
import sys

import pytest
import torch
from torch import nn

from bn_lightning.blog import BlogBatchNorm, rss_bytes
from bn_lightning.nn import batchnorm as norm

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}
PAIRS = [(norm.BatchNorm1d, nn.BatchNorm1d), (norm.BatchNorm2d, nn.BatchNorm2d), (norm.BatchNorm3d, nn.BatchNorm3d)]
SHAPES = {  # every accepted rank of each class, with spatial sizes that make the sums non-trivial
    norm.BatchNorm1d: [(8, 5), (6, 5, 7)],
    norm.BatchNorm2d: [(6, 5, 4, 3)],
    norm.BatchNorm3d: [(4, 5, 3, 2, 3)],
}
OPTIONS = [
    dict(zip(("affine", "bias", "track_running_stats", "momentum"), combo))
    for combo in itertools.product([True, False], [True, False], [True, False], [0.1, None, 0.7])
    if combo[0] or combo[1]  # bias=False is only meaningful with affine=True
]


def twins(ours_cls, theirs_cls, dtype, **kwargs):
    torch.manual_seed(0)
    ours, theirs = ours_cls(5, dtype=dtype, **kwargs), theirs_cls(5, dtype=dtype, **kwargs)
    if ours.affine:  # start from non-trivial gamma/beta so their gradients matter
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5)
        ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def step_and_compare(ours, theirs, x, dtype, tol=None):
    """One forward+backward of both on the same input and upstream gradient; compare all."""
    grad_out = torch.randn_like(x)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    (yo * grad_out).sum().backward()
    (yt * grad_out).sum().backward()
    tol = tol or TOL[dtype]
    torch.testing.assert_close(yo, yt, **tol)
    torch.testing.assert_close(xo.grad, xt.grad, **tol)
    for name in ("weight", "bias"):
        po, pt = getattr(ours, name), getattr(theirs, name)
        assert (po is None) == (pt is None)
        if po is not None:
            torch.testing.assert_close(po.grad, pt.grad, **tol)
            po.grad, pt.grad = None, None
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    for key in so:
        assert so[key].dtype == st[key].dtype, key
        torch.testing.assert_close(so[key], st[key], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_training_then_eval_matches_torch(pair, opts, dtype):
    ours, theirs = twins(*pair, dtype, **opts)
    for shape in SHAPES[pair[0]]:
        for step in range(4):  # several steps, so the running statistics compound
            x = torch.randn(shape, dtype=dtype) * (1 + step) + step
            step_and_compare(ours, theirs, x, dtype)
        ours.eval(), theirs.eval()
        step_and_compare(ours, theirs, torch.randn(shape, dtype=dtype) * 2 - 1, dtype)
        ours.train(), theirs.train()


def test_constructor_is_torchs_plus_keyword_only_sync():
    for ours, theirs in PAIRS:
        params = dict(inspect.signature(ours.__init__, eval_str=True).parameters)
        sync, group = params.pop("sync"), params.pop("process_group")
        assert list(params.values()) == list(inspect.signature(theirs.__init__).parameters.values())
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        assert (sync.kind, sync.default, group.kind, group.default) == (keyword_only, False, keyword_only, None)
        assert repr(ours(7, momentum=None, bias=False)) == repr(theirs(7, momentum=None, bias=False))


def test_initial_state_is_a_pure_standardization():
    layer = norm.BatchNorm2d(4)
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    assert layer.num_batches_tracked.dtype == torch.long and layer.num_batches_tracked.item() == 0


def test_running_var_is_unbiased_and_momentum_weights_the_new_batch():
    layer = norm.BatchNorm1d(3, momentum=0.25)
    x = torch.randn(10, 3) * 3 + 2
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.75 * torch.zeros(3) + 0.25 * x.mean(0))
    torch.testing.assert_close(layer.running_var, 0.75 * torch.ones(3) + 0.25 * x.var(0, correction=1))


def test_momentum_none_is_the_cumulative_average():
    layer = norm.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(5)]
    for x in batches:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    assert layer.num_batches_tracked.item() == 5


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, affine):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = (torch.randn(3, dtype=torch.float64, requires_grad=True) if affine else None for _ in range(2))
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    inputs = tuple(t for t in (x, weight, bias) if t is not None)

    def f(*args):
        w, b = (args[1], args[2]) if affine else (None, None)
        # Clones: training updates the buffers in place, which must not change gradcheck's reference.
        return norm.batch_norm(args[0], running_mean.clone(), running_var.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)


def test_running_stats_carry_no_autograd_history():
    layer = norm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    for _ in range(3):
        layer(x * 2).sum().backward()
    for buf in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
        assert buf.grad_fn is None and not buf.requires_grad


def _rss_growth_over_training(layer, steps=150):
    conv = nn.Conv2d(1, 6, 5)
    params = list(conv.parameters()) + list(layer.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    x = torch.randn(64, 1, 28, 28)
    growth = []
    for step in range(steps):
        opt.zero_grad()
        layer(conv(x)).square().mean().backward()
        opt.step()
        if step in (steps // 3, steps - 1):
            growth.append(rss_bytes())
    return growth[1] - growth[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_memory_stays_flat_over_many_training_steps():
    # 100 steps each keeping a 64x6x24x24 float32 graph alive would add ~90 MB: the blog's layer does.
    leaked = _rss_growth_over_training(BlogBatchNorm(6, 4, alpha=0.1))  # running stats with history
    ours = _rss_growth_over_training(norm.BatchNorm2d(6))
    assert leaked > 50e6, f"the contrast case should leak, grew {leaked / 1e6:.1f} MB"
    assert ours < 10e6, f"memory grew {ours / 1e6:.1f} MB over 100 steps"


@pytest.mark.parametrize(
    "cls, bad_ranks",
    [(norm.BatchNorm1d, [1, 4]), (norm.BatchNorm2d, [2, 3, 5]), (norm.BatchNorm3d, [3, 4, 6])],
)
def test_wrong_rank_is_rejected_like_torch(cls, bad_ranks):
    theirs_cls = dict(PAIRS)[cls]
    for rank in bad_ranks:
        x = torch.randn((2, 3) + (2,) * (rank - 2) if rank >= 2 else (3,))
        with pytest.raises(ValueError) as ours_err:
            cls(3)(x)
        with pytest.raises(ValueError) as theirs_err:
            theirs_cls(3)(x)
        assert str(ours_err.value) == str(theirs_err.value)


@pytest.mark.parametrize(
    "make_input, kwargs, training",
    [
        (lambda: torch.randn(1, 3), {}, True),  # one value per channel
        (lambda: torch.randn(1, 3, 1), {}, True),
    ],
)
def test_bad_input_raises_the_same_error_as_torch(make_input, kwargs, training):
    x = make_input()
    errors = []
    for cls in (norm.BatchNorm1d, nn.BatchNorm1d):
        layer = cls(3, **kwargs).train(training)
        with pytest.raises(Exception) as err:
            layer(x)
        errors.append((type(err.value), str(err.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("kwargs", [{}, {"track_running_stats": False}, {"affine": False, "track_running_stats": False}])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_is_torchs_error_type_with_a_message_that_says_what_was_expected(kwargs, training):
    layer = norm.BatchNorm1d(3, **kwargs).train(training)
    with pytest.raises(RuntimeError) as err:  # the type torch raises, so code that catches torch's catches ours
        layer(torch.randn(4, 5))
    assert str(err.value).startswith("BatchNorm1d(3) got an input of shape (4, 5), whose 5 channels (dim 1) should be 3")


@pytest.mark.parametrize("eps, training", [(0.0, True), (-1.0, False)])
def test_bad_eps_to_the_functional_raises_the_same_error_as_torch(eps, training):
    errors = []
    for batch_norm in (norm.batch_norm, nn.functional.batch_norm):
        with pytest.raises(ValueError) as err:
            batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=training, eps=eps)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, r"eps must be a positive number, .* got 0.0 \(torch uses 1e-5\)"),
    ({"eps": -1e-5}, r"eps must be a positive number, .* got -1e-05"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\], .* or None for their cumulative average: got 1.5"),
    ({"momentum": -0.1}, r"momentum must be in \[0, 1\], .* got -0.1"),
])
def test_bad_eps_or_momentum_is_rejected_by_the_constructor(kwargs, message):
    """torch's layers take these and fail only at the first batch (eps) or drift silently (momentum)."""
    for cls in (norm.BatchNorm1d, norm.BatchNorm2d, norm.BatchNorm3d):
        with pytest.raises(ValueError, match=message):
            cls(3, **kwargs)
    for momentum in (0.0, 1.0, None):
        norm.BatchNorm2d(3, momentum=momentum)  # the bounds and the cumulative average are fine


def test_one_value_per_channel_is_fine_in_eval():
    x = torch.randn(1, 3)
    torch.testing.assert_close(norm.BatchNorm1d(3).eval()(x), nn.BatchNorm1d(3).eval()(x))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_matches_torch(shape):
    ours, theirs = twins(norm.BatchNorm2d, nn.BatchNorm2d, torch.float32)
    x = torch.randn(shape[0], 5, *shape[2:])
    step_and_compare(ours, theirs, x, torch.float32)


LAYOUTS = {  # every path through the layer: contiguous rows, strided views, and torch's other memory format
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
    "sliced": lambda x: torch.cat([x, x], dim=3)[..., ::2],
}


@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded", "transposed"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_layouts_and_gradient_layouts_match_torch(layout, grad_layout):
    """Strided inputs and upstream gradients (``y.sum().backward()`` sends an expanded one)
    take the layer's general path; they must give torch's numbers all the same."""
    ours, theirs = twins(norm.BatchNorm2d, nn.BatchNorm2d, torch.float32)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x = LAYOUTS[layout](torch.randn(6, 5, 4, 3) * 2 + 1)
        grad_out = {
            "contiguous": torch.randn(6, 5, 4, 3),
            "expanded": torch.tensor(0.5).expand(6, 5, 4, 3),
            "transposed": torch.randn(6, 5, 3, 4).transpose(2, 3),
        }[grad_layout]
        xo, xt = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(grad_out), yt.backward(grad_out)
        torch.testing.assert_close(yo, yt, **TOL[torch.float32])
        torch.testing.assert_close(xo.grad, xt.grad, **TOL[torch.float32])
        for po, pt in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
            torch.testing.assert_close(po.grad, pt.grad, **TOL[torch.float32])
            po.grad = pt.grad = None
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL[torch.float32])


@pytest.mark.parametrize("shape", [(64, 6, 12, 12), (256, 12)])
def test_a_large_mean_loses_no_more_precision_than_torch(shape):
    """Data 1000 times further from zero than it is spread (raw features, say): against a
    float64 reference, our float32 output and gradients are as close as torch's float32 ones."""
    torch.manual_seed(0)
    x, grad_out = torch.randn(shape) + 1000, torch.randn(shape)
    pair = PAIRS[1] if len(shape) == 4 else PAIRS[0]

    def run(layer, dtype):
        xi = x.to(dtype).requires_grad_()
        y = layer.to(dtype)(xi)
        y.backward(grad_out.to(dtype))
        return [t.double() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var)]

    reference = run(pair[1](shape[1]), torch.float64)
    ours, theirs = run(pair[0](shape[1]), torch.float32), run(pair[1](shape[1]), torch.float32)
    for name, r, o, t in zip(("output", "input grad", "weight grad", "bias grad", "running_var"), reference, ours, theirs):
        ours_error, torch_error = (o - r).abs().max().item(), (t - r).abs().max().item()
        assert ours_error <= 4 * torch_error + 1e-6 * r.abs().max().item(), (name, ours_error, torch_error)


def test_without_a_graph_to_record_the_output_is_the_same_and_carries_none():
    """Under no_grad (and for inputs that need no gradient) the layer skips its autograd.Function."""
    ours, theirs = twins(norm.BatchNorm2d, nn.BatchNorm2d, torch.float32)
    x = torch.randn(6, 5, 4, 3)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        with torch.no_grad():
            yo, yt = ours(x), theirs(x)
        assert yo.grad_fn is None and not yo.requires_grad
        torch.testing.assert_close(yo, yt, **TOL[torch.float32])
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float32])
    ours.train()
    assert ours(x).grad_fn is not None  # weight and bias need gradients: the graph is recorded


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) + 3)
    ours = norm.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert ours._version == theirs._version


def test_old_state_dict_without_num_batches_tracked_loads():
    state = nn.BatchNorm1d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    layer = norm.BatchNorm1d(3)
    layer.num_batches_tracked.fill_(7)
    layer.load_state_dict(state)
    assert layer.num_batches_tracked.item() == 0


def test_buffers_follow_the_module_across_dtypes():
    layer = norm.BatchNorm1d(3).double()
    assert layer.running_mean.dtype == torch.float64 and layer.num_batches_tracked.dtype == torch.long
    assert {name for name, _ in layer.named_buffers()} == {"running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pair", PAIRS[:2], ids=lambda p: p[0].__name__)
def test_half_precision_autocast_matches_torch(pair, autocast_dtype):
    """Under CPU autocast a conv or linear hands BN a half-precision batch: both layers keep
    float32 parameters and statistics, answer in the input's precision, and agree."""
    ours, theirs = twins(*pair, torch.float32)
    affine = nn.Conv2d(3, 5, 3) if pair[1] is nn.BatchNorm2d else nn.Linear(3, 5)
    inputs = torch.randn(16, 3, 9, 9) if pair[1] is nn.BatchNorm2d else torch.randn(16, 3)
    for step in range(3):
        grad_out = torch.randn_like(affine(inputs))
        outputs = []
        for layer in (ours, theirs):
            with torch.autocast("cpu", dtype=autocast_dtype):
                h = affine(inputs * (1 + step) + step).detach().requires_grad_()
                y = layer(h)
            y.float().backward(grad_out)
            outputs.append((y, h.grad, layer.weight.grad, layer.bias.grad))
        (yo, dxo, dwo, dbo), (yt, dxt, dwt, dbt) = outputs
        assert h.dtype == yo.dtype == yt.dtype == dxo.dtype == autocast_dtype
        # Both compute in float32 and round once; summation order may move a value by an ulp or two.
        half = dict(rtol=2 * torch.finfo(autocast_dtype).eps, atol=torch.finfo(autocast_dtype).eps)
        torch.testing.assert_close(yo, yt, **half)
        torch.testing.assert_close(dxo, dxt, **half)
        torch.testing.assert_close(dwo, dwt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dbo, dbt, rtol=1e-4, atol=1e-4)
        for layer in (ours, theirs):
            layer.weight.grad = layer.bias.grad = None
        for key, value in theirs.state_dict().items():
            assert ours.state_dict()[key].dtype == value.dtype
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_of_our_layer_matches_torch():
    """The compiled path of benchmarks/bn.py: Dynamo traces our autograd.Function, forward and backward."""
    ours, theirs = twins(norm.BatchNorm2d, nn.BatchNorm2d, torch.float32)
    ours.compile(fullgraph=True)  # in place, keys unchanged; fullgraph: no silent fallback to eager
    for step in range(2):
        step_and_compare(ours, theirs, torch.randn(6, 5, 4, 3) * (1 + step) + step, torch.float32)
    ours.eval(), theirs.eval()
    step_and_compare(ours, theirs, torch.randn(6, 5, 4, 3), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(256, 5, 24, 24), (256, 5, 8, 8), (256, 5)])
def test_on_a_gpu_matches_torch(shape, layout):
    """Batches of LeNet's sizes as CUDA tensors: train steps, then eval, number for number (gamma's
    and beta's gradients sum up to 147,456 float32 values, whose last digits follow the order of summation)."""
    tol = dict(rtol=1e-4, atol=1e-4)
    pair = PAIRS[1] if len(shape) == 4 else PAIRS[0]
    ours, theirs = twins(*pair, torch.float32)
    ours, theirs = ours.cuda(), theirs.cuda()
    make = LAYOUTS[layout] if len(shape) == 4 else (lambda x: x)
    for step in range(3):
        step_and_compare(ours, theirs, make(torch.randn(shape, device="cuda") * (1 + step) + step), torch.float32, tol)
    ours.eval(), theirs.eval()
    step_and_compare(ours, theirs, make(torch.randn(shape, device="cuda")), torch.float32, tol)
