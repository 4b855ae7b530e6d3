"""The interventions of the why-BN-helps experiments, each against a direct computation or torch's layers:
noisy BN, BN after the activation, Xavier's gain, LSUV, and training only some weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_lightning import Classifier, LeNet
from bn_lightning.callbacks.lsuv import LSUV, lsuv_
from bn_lightning.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d
from bn_lightning.nn.batchnorm import BATCH_NORMS, BatchNorm2d
from bn_lightning.training.trainable import scale_invariant_weights


def images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# Noisy BN

def test_noisy_bn_is_torchs_bn_times_its_scale_plus_its_shift_in_training_and_forward_and_backward():
    noisy = NoisyBatchNorm2d(6, noise_shift=0.5, noise_scale=3.0, noise_seed=11)
    reference = nn.BatchNorm2d(6)
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    noisy, reference = noisy.double(), reference.double()
    for step in range(3):
        scale, shift = noisy.noise()
        assert (scale >= 1 / 3.0).all() and (scale <= 3.0).all() and (shift.abs() <= 0.5).all()
        out = noisy(x)
        expected = reference(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(out, expected)
        weights = torch.randn_like(out)
        got = torch.autograd.grad((out * weights).sum(), [x, noisy.weight, noisy.bias])
        want = torch.autograd.grad((expected * weights).sum(), [x, reference.weight, reference.bias])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        # The noise sits after the statistics: the running estimates are plain BN's.
        torch.testing.assert_close(noisy.running_mean, reference.running_mean)
        torch.testing.assert_close(noisy.running_var, reference.running_var)
    assert int(noisy.noise_step) == 3


def test_noisy_bn_draws_new_noise_every_step_the_same_for_the_same_seed_and_step_and_none_in_eval():
    layer = NoisyBatchNorm1d(4, noise_seed=3)
    draws = []
    for _ in range(5):
        draws.append(layer.noise())
        layer(torch.randn(16, 4))
    assert all(not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1]) for a, b in zip(draws, draws[1:]))
    again = NoisyBatchNorm1d(4, noise_seed=3)
    again.load_state_dict(layer.state_dict())  # a resumed run continues the same sequence
    assert torch.equal(again.noise()[0], layer.noise()[0])
    other = NoisyBatchNorm1d(4, noise_seed=4)
    other.noise_step.fill_(int(layer.noise_step))
    assert not torch.equal(other.noise()[0], layer.noise()[0])

    plain = torch.nn.BatchNorm1d(4)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("noise_")})
    layer.eval(), plain.eval()
    x = torch.randn(16, 4)
    torch.testing.assert_close(layer(x), plain(x))
    assert int(layer.noise_step) == 5


def test_noisy_bn_moves_the_mean_and_std_the_next_layer_sees_while_plain_bn_keeps_them():
    noisy, plain = NoisyBatchNorm2d(3, noise_seed=0), BatchNorm2d(3)
    means, stds = [], []
    for _ in range(200):
        x = torch.randn(32, 3, 4, 4) * 5 + 2
        out, ref = noisy(x), plain(x)
        means.append(out.mean((0, 2, 3)))
        stds.append(out.std((0, 2, 3)))
        assert ref.mean((0, 2, 3)).abs().max() < 1e-5
    means, stds = torch.stack(means), torch.stack(stds)
    # Uniform shifts on [-1, 1] have std 1/sqrt(3); log-uniform scales on [1/2, 2] have log-std log(2)/sqrt(3).
    assert means.std(0).min() > 0.4 and stds.log().std(0).min() > 0.25
    assert means.abs().max() <= 1.0 + 1e-5 and stds.max() < 2.05 and stds.min() > 0.45


@pytest.mark.parametrize("kwargs, message", [({"noise_shift": -1.0}, "noise_shift must be >= 0"),
                                             ({"noise_scale": 0.5}, "noise_scale must be >= 1")])
def test_noisy_bn_refuses_noise_it_cannot_draw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoisyBatchNorm1d(3, **kwargs)


def test_a_noisy_lenet_starts_with_the_weights_of_the_plain_one_and_its_layers_draw_different_noise():
    torch.manual_seed(5)
    plain = LeNet("scratch")
    torch.manual_seed(5)
    noisy = LeNet("noisy_bn", {"noise_shift": 0.3, "noise_scale": 1.5})
    state = noisy.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in plain.state_dict().items())
    layers = [m for m in noisy.modules() if isinstance(m, (NoisyBatchNorm1d, NoisyBatchNorm2d))]
    assert len(layers) == 4 and len({int(m.noise_seed) for m in layers}) == 4
    assert {(m.noise_shift, m.noise_scale) for m in layers} == {(0.3, 1.5)}
    with pytest.raises(ValueError, match="norm_kwargs noise_shift: norm .scratch. takes eps, momentum"):
        LeNet("scratch", {"noise_shift": 0.3})


# BN's position and the initialization

def test_bn_after_the_activation_normalizes_what_the_activation_gives():
    torch.manual_seed(0)
    net = LeNet("scratch", activation="relu", norm_position="after")
    assert list(net.conv1._modules) == ["affine", "act", "norm", "pool"]
    assert list(net.fc1._modules) == ["affine", "act", "norm"]
    x, _ = images()
    b = net.conv1
    torch.testing.assert_close(b(x), b.pool(b.norm(F.relu(b.affine(x)))))
    before = LeNet("scratch", activation="relu")
    assert list(before.conv1._modules) == ["affine", "norm", "act", "pool"]
    with pytest.raises(ValueError, match="unknown norm_position 'middle'"):
        LeNet("scratch", norm_position="middle")


def test_init_gain_scales_xaviers_uniform_weights_and_leaves_the_biases():
    torch.manual_seed(1)
    one = LeNet("none")
    torch.manual_seed(1)
    four = LeNet("none", init_gain=4.0)
    for (name, a), (_, b) in zip(one.named_parameters(), four.named_parameters()):
        torch.testing.assert_close(b, a * 4 if name.endswith("weight") else a)
    with pytest.raises(ValueError, match="init_gain must be positive"):
        LeNet("none", init_gain=0)


def layer_output_variances(net, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, name=name: seen.__setitem__(name, float(out.detach().var())))
             for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("norm", ["none", "scratch"])
def test_lsuv_gives_every_layer_unit_output_variance_and_leaves_bn_buffers_alone(norm):
    torch.manual_seed(0)
    net = LeNet(norm)
    x, _ = images(256)
    assert max(abs(v - 1) for v in layer_output_variances(net, x).values()) > 0.3  # Xavier's are not unit
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    reported = lsuv_(net, x, tolerance=0.02)
    for key, value in net.named_buffers():
        assert torch.equal(value, buffers[key])
    net.train()
    measured = layer_output_variances(net, x)
    assert set(reported) == set(measured) == {"conv1.affine", "conv2.affine", "fc1.affine", "fc2.affine", "head"}
    for name, variance in measured.items():
        assert variance == pytest.approx(reported[name], rel=1e-5) and abs(variance - 1) < 0.02


def test_the_lsuv_callback_initializes_from_the_first_training_images_and_draws_no_global_random_numbers(tiny_data):
    from bn_lightning import FashionMNISTDataModule

    datamodule = FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40)
    datamodule.setup("fit")
    torch.manual_seed(0)
    module = Classifier(LeNet("none"))
    trainer = type("Trainer", (), {"datamodule": datamodule})()
    expected = copy.deepcopy(module.net)
    lsuv_(expected, datamodule.train_set.__getitems__(list(range(100)))[0],
          generator=torch.Generator().manual_seed(torch.initial_seed()))
    rng = torch.get_rng_state()
    LSUV(num_images=100).setup(trainer, module, "fit")
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(module.net.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    before = copy.deepcopy(module.net.state_dict())
    LSUV().setup(trainer, module, "test")  # only before fitting
    assert all(torch.equal(v, before[k]) for k, v in module.net.state_dict().items())
    with pytest.raises(ValueError, match="at least 2 images"):
        LSUV(num_images=1)


# Which weights train

def step_changes(module, lr=0.5, steps=2):
    """Which parameters change (element by element) over a few SGD steps of ``module``."""
    before = {k: p.detach().clone() for k, p in module.net.named_parameters()}
    optimizer = module.configure_optimizers()
    x, y = images(64)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    return {k: p.detach() != before[k] for k, p in module.net.named_parameters()}


def bn_params(net):
    return {f"{name}.{p}" for name, m in net.named_modules() if isinstance(m, BATCH_NORMS) for p, _ in m.named_parameters()}


@pytest.mark.parametrize("train_head", [False, True])
def test_training_only_bn_moves_gamma_and_beta_and_nothing_else_but_the_head_when_asked(train_head):
    torch.manual_seed(0)
    module = Classifier(LeNet("scratch"), optimizer=torch.optim.SGD, trainable="norm", train_head=train_head)
    changed = step_changes(module)
    moving = {name for name, mask in changed.items() if mask.any()}
    head = {"head.weight", "head.bias"} if train_head else set()
    assert moving == bn_params(module.net) | head
    assert module.trained_weights == 2 * (6 + 16 + 120 + 84) + (850 if train_head else 0)


@pytest.mark.parametrize("train_head", [False, True])
def test_the_random_control_trains_two_ordinary_weights_per_channel_as_many_as_bn_has(train_head):
    torch.manual_seed(0)
    module = Classifier(LeNet("scratch"), trainable="random", train_head=train_head, trainable_seed=7)
    changed = step_changes(module)
    for block, width in (("conv1", 6), ("conv2", 16), ("fc1", 120), ("fc2", 84)):
        weight, bias = changed[f"{block}.affine.weight"], changed[f"{block}.affine.bias"]
        assert weight.reshape(width, -1).sum(1).tolist() == [2] * width
        assert not bias.any()  # the BN after it cancels the bias: it gets no gradient, so none is chosen
        assert not changed[f"{block}.norm.weight"].any() and not changed[f"{block}.norm.bias"].any()
    moved = float(changed["head.weight"].float().mean())
    assert moved > 0.9 if train_head else moved == 0
    assert module.trained_weights == 2 * (6 + 16 + 120 + 84) + (850 if train_head else 0)

    torch.manual_seed(0)
    same = Classifier(LeNet("scratch"), trainable="random", train_head=train_head, trainable_seed=7)
    assert {k: v.tolist() for k, v in step_changes(same).items()} == {k: v.tolist() for k, v in changed.items()}
    torch.manual_seed(0)
    other = Classifier(LeNet("scratch"), trainable="random", train_head=train_head, trainable_seed=8)
    assert not torch.equal(step_changes(other)["fc1.affine.weight"], changed["fc1.affine.weight"])


def test_all_but_the_head_freezes_only_the_output_layer():
    torch.manual_seed(0)
    module = Classifier(LeNet("scratch"), train_head=False)
    changed = step_changes(module)
    assert not changed["head.weight"].any() and not changed["head.bias"].any()
    assert all(mask.any() for name, mask in changed.items() if not name.startswith("head") and "affine.bias" not in name)
    assert module.trained_weights == sum(p.numel() for p in module.net.parameters()) - 850


def test_training_only_some_weights_says_what_is_wrong():
    with pytest.raises(ValueError, match="needs batch-norm layers"):
        Classifier(LeNet("none"), trainable="norm")
    with pytest.raises(ValueError, match="unknown trainable 'some'"):
        Classifier(LeNet("scratch"), trainable="some")
    module = Classifier(LeNet("scratch"), optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4),
                        trainable="random")
    with pytest.raises(ValueError, match="set the optimizer's weight_decay to 0"):
        module.configure_optimizers()


def test_the_trainable_choice_and_its_seed_are_in_the_hyperparameters():
    torch.manual_seed(123)
    module = Classifier(LeNet("scratch"), trainable="random")
    assert (module.hparams.trainable, module.hparams.train_head, module.hparams.trainable_seed) == ("random", True, 123)
    # 2 of the weights of each output channel feeding a BN, as many as its gamma and beta, and the head's 850.
    assert module.trained_weights == 2 * (6 + 16 + 120 + 84) + 850


# Two learning rates: the scale-invariant weights (those that feed a BN) and the rest

def test_the_weights_that_feed_a_bn_are_the_scale_invariant_ones():
    torch.manual_seed(0)
    net = LeNet("scratch", norm_kwargs={"eps": 1e-12}).double().train()  # eps is what BN adds that scales not
    x = images()[0].double()
    invariant = {id(w) for w in scale_invariant_weights(net)}
    names = {name for name, p in net.named_parameters() if id(p) in invariant}
    assert names == {f"{block}.affine.weight" for block in ("conv1", "conv2", "fc1", "fc2")}
    before = net(x)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.mul_(3.0 if id(p) in invariant else 1.0)
    torch.testing.assert_close(net(x), before, rtol=1e-9, atol=1e-9)  # BN undoes their scale
    assert scale_invariant_weights(LeNet("scratch", norm_position="after")) == []  # the activation sits between


def one_sgd_step(optimizer, rest_options):
    """LeNet with BN after one step of ``optimizer`` with ``rest_options``: the module, its optimizer, the weights
    before the step and the ids of the scale-invariant ones."""
    torch.manual_seed(0)
    module = Classifier(LeNet("scratch"), optimizer=optimizer, rest_options=rest_options)
    step = module.configure_optimizers()
    x, y = images()
    before = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    F.cross_entropy(module(x), y).backward()
    step.step()
    return module, step, before, {id(w) for w in scale_invariant_weights(module.net)}


def test_rest_options_give_every_other_parameter_its_own_learning_rate():
    module, optimizer, before, invariant = one_sgd_step(lambda p: torch.optim.SGD(p, lr=10.0), {"lr": 0.1})
    assert [group["lr"] for group in optimizer.param_groups] == [10.0, 0.1]
    for name, p in module.net.named_parameters():
        lr = 10.0 if id(p) in invariant else 0.1
        torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=0, atol=1e-6)


def test_weight_decay_on_the_bn_fed_weights_alone_as_configs_compare_weight_decay_sets_it():
    module, _, before, invariant = one_sgd_step(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-3),
                                                {"lr": 1.0, "weight_decay": 0.0})
    for name, p in module.net.named_parameters():
        if id(p) in invariant:  # SGD's decay: the gradient of (wd / 2) ||W||^2 added to the loss's
            expected = before[name] - 0.1 * (p.grad + 5e-3 * before[name])
        else:
            expected = before[name] - 1.0 * p.grad
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_rest_options_on_a_network_without_scale_invariant_weights_say_what_is_wrong():
    for net in (LeNet("none"), LeNet("scratch", norm_position="after"), LeNet("group_norm")):
        with pytest.raises(ValueError, match="no weight of this network feeds one"):
            Classifier(net, rest_options={"lr": 0.1})
