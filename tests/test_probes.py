"""The measurement callbacks against direct computations on copies of the network, and a real fit: what
they log reaches TensorBoard, and training with them is exactly training without them."""

from __future__ import annotations

import copy
import itertools

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from bn_lightning import Classifier, FashionMNISTDataModule, LeNet
from bn_lightning.callbacks import probes
from tests.helpers import scalars

LAYERS = ["conv1", "conv2", "fc1", "fc2", "head"]


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd_step(net, data, lr=0.5):
    """One training step of ``net``; returns the parameters and buffers as it started."""
    params, buffers = probes.snapshot(net)
    net.zero_grad()
    F.cross_entropy(net(data[0]), data[1]).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad
    return params, buffers


def grads_of(net, data, names):
    net.zero_grad()
    F.cross_entropy(net(data[0]), data[1]).backward()
    named = dict(net.named_parameters())
    return torch.cat([named[n].grad.reshape(-1) for n in names]).double()


class Stub:
    def __init__(self, lr):
        self.optimizers = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)]


@pytest.mark.parametrize("norm", ["none", "scratch", "noisy_bn"])
def test_gradient_ics_is_the_change_of_a_layers_gradient_when_the_layers_before_it_update(norm):
    torch.manual_seed(0)
    net = LeNet(norm)
    data = batch()
    start = copy.deepcopy(net)  # the network as the step began, buffers and noise step included
    params, buffers = sgd_step(net, data)
    measured = probes.GradientICS(1)._measure(Stub(0.5), net, params, buffers, data)

    by_layer = probes.layers(net)
    assert list(by_layer) == LAYERS
    for index, layer in enumerate(LAYERS[1:], start=1):
        names = by_layer[layer]
        g = grads_of(copy.deepcopy(start), data, names)
        shifted = copy.deepcopy(start)
        updated = dict(net.named_parameters())
        with torch.no_grad():
            for name, p in shifted.named_parameters():
                if name.split(".")[0] in LAYERS[:index]:
                    p.copy_(updated[name])
        g2 = grads_of(shifted, data, names)
        assert measured[f"ics/{layer}/l2"] == pytest.approx(float((g - g2).norm()), rel=1e-4, abs=1e-9)
        assert measured[f"ics/{layer}/cosine"] == pytest.approx(float(F.cosine_similarity(g, g2, dim=0)), abs=1e-6)
        assert measured[f"ics/{layer}/relative"] == pytest.approx(float((g - g2).norm() / g.norm()), rel=1e-4, abs=1e-9)
        before, after = dict(start.named_parameters()), dict(net.named_parameters())
        moved = torch.cat([(after[n] - before[n]).detach().reshape(-1).double() for n in after
                           if n.split(".")[0] in LAYERS[:index]]).norm()
        assert measured[f"ics/{layer}/upstream_update"] == pytest.approx(float(moved), rel=1e-6)
        assert measured[f"ics/{layer}/per_update"] == pytest.approx(float((g - g2).norm() / moved), rel=1e-4, abs=1e-9)
    assert "ics/conv1/l2" not in measured  # nothing comes before the first layer


def test_landscape_probe_measures_loss_and_gradient_along_the_gradient():
    torch.manual_seed(1)
    net = LeNet("scratch", activation="relu")
    data = batch()
    params, buffers = probes.snapshot(net)
    lr = 0.1
    measured = probes.LandscapeProbe(1, step_sizes=(0.5, 1.0, 2.0))._measure(Stub(lr), net, params, buffers, data)

    reference = copy.deepcopy(net)
    loss = F.cross_entropy(reference(data[0]), data[1])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    g = torch.cat([x.reshape(-1) for x in grads]).double()
    losses, changes, betas = [loss.item()], [], []
    for multiple in (0.5, 1.0, 2.0):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for p, grad in zip(moved.parameters(), grads):
                p -= multiple * lr * grad
        moved_loss = F.cross_entropy(moved(data[0]), data[1])
        moved_g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(moved_loss, list(moved.parameters()))]).double()
        losses.append(moved_loss.item())
        changes.append(float((moved_g - g).norm()))
        betas.append(changes[-1] / (multiple * lr * float(g.norm())))
    assert measured["landscape/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert measured["landscape/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert measured["landscape/loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert measured["landscape/grad_change"] == pytest.approx(max(changes), rel=1e-4)
    assert measured["landscape/beta"] == pytest.approx(max(betas), rel=1e-4)
    with pytest.raises(ValueError, match="step_sizes must be positive"):
        probes.LandscapeProbe(step_sizes=(0.0, 1.0))


def test_similarity_and_rank_measures_against_their_definitions():
    rows = torch.randn(7, 5)
    unit = F.normalize(rows, dim=1)
    pairs = [float(unit[i] @ unit[j]) for i, j in itertools.permutations(range(7), 2)]
    assert probes.mean_pairwise_cosine(rows) == pytest.approx(sum(pairs) / len(pairs), rel=1e-6)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    same = [float(unit[i] @ unit[j]) for i, j in itertools.permutations(range(7), 2) if labels[i] == labels[j]]
    assert probes.same_label_cosine(rows, labels) == pytest.approx(sum(same) / len(same), rel=1e-6)
    assert probes.same_label_cosine(rows[:2], labels[:2]) != probes.same_label_cosine(rows[:2], labels[:2])  # nan
    assert probes.mean_pairwise_cosine(torch.ones(4, 3) * torch.arange(1.0, 5.0)[:, None]) == pytest.approx(1.0)
    assert probes.effective_rank(torch.outer(torch.randn(6), torch.randn(4))) == pytest.approx(1.0, abs=1e-6)
    assert probes.effective_rank(torch.eye(4) * 3) == pytest.approx(4.0)
    s = torch.tensor([3.0, 1.0])
    p = s / s.sum()
    assert probes.effective_rank(torch.diag(s)) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    # A common offset plus small differences: uncentered they look like one direction, centered they do not.
    offset = 0.5 + 0.001 * torch.randn(200, 30, dtype=torch.float64)
    assert probes.effective_rank(offset) < 1.5 and probes.effective_rank(offset - offset.mean(0)) > 20
    by_hand = (offset.std(0).square().sum() / offset.mean(0).square().sum()).sqrt()
    assert probes.std_over_mean(offset) == pytest.approx(float(by_hand), rel=1e-9)
    assert probes.std_over_mean(offset) == pytest.approx(0.002, rel=0.1)


def test_representation_probe_measures_each_layers_outputs_and_the_per_image_gradients():
    torch.manual_seed(2)
    net = LeNet("scratch")
    x, y = batch(48)
    probe = probes.RepresentationProbe(1, num_images=48, gradient_images=20)
    probe._batch = (x, y)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    measured = probe.measure(net)
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())  # running statistics untouched

    reference = copy.deepcopy(net)
    outputs = {}
    for name in LAYERS:
        getattr(reference, name).register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out))
    losses = F.cross_entropy(reference(x), y, reduction="none")
    for name in LAYERS:
        rows = outputs[name].detach().reshape(48, -1)
        assert measured[f"collapse/{name}/cosine"] == pytest.approx(probes.mean_pairwise_cosine(rows), rel=1e-6)
        assert measured[f"collapse/{name}/erank"] == pytest.approx(probes.effective_rank(rows), rel=1e-5)
        centered = probes.effective_rank(rows - rows.mean(0, keepdim=True))
        assert measured[f"collapse/{name}/centered_erank"] == pytest.approx(centered, rel=1e-5)
        assert measured[f"collapse/{name}/std_over_mean"] == pytest.approx(probes.std_over_mean(rows), rel=1e-6)
    per_image = []
    for i in range(20):
        grads = torch.autograd.grad(losses[i], list(reference.parameters()), retain_graph=True)
        per_image.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = probes.same_label_cosine(torch.stack(per_image), y[:20])
    assert measured["collapse/grad_cosine"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="2 <= gradient_images <= num_images"):
        probes.RepresentationProbe(num_images=10, gradient_images=20)


ALL_PROBES = lambda: [probes.GradientICS(2), probes.LandscapeProbe(3), probes.RepresentationProbe(2, num_images=40,
                      gradient_images=8), probes.WeightNormMonitor(2)]


def fit(tiny_data, tmp_path, callbacks, norm="noisy_bn"):
    seed_everything(0)
    datamodule = FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40)
    module = Classifier(LeNet(norm), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = Trainer(max_steps=6, logger=TensorBoardLogger(tmp_path, name="run"), callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule)
    return module, trainer


def test_the_probes_log_to_tensorboard_and_leave_training_exactly_as_it_is_without_them(tiny_data, tmp_path):
    plain, _ = fit(tiny_data, tmp_path / "plain", [])
    probed, trainer = fit(tiny_data, tmp_path / "probed", ALL_PROBES())
    for (key, a), (_, b) in zip(plain.net.state_dict().items(), probed.net.state_dict().items()):
        assert torch.equal(a, b), key  # weights, running statistics and noise steps alike

    logged = scalars(trainer.logger.log_dir)
    steps = {tag: len(values) for tag, values in logged.items()}
    assert steps["ics/fc1/l2"] == steps["collapse/fc2/erank"] == steps["weights/head/norm"] == 3  # steps 0, 2, 4
    assert steps["landscape/beta"] == 2  # steps 0, 3
    # The effective step size is lr / ||W||^2 of the weight as the step started.
    norms, effective = logged["weights/conv2/norm"], logged["weights/conv2/effective_lr"]
    assert all(e == pytest.approx(0.5 / n**2, rel=1e-5) for n, e in zip(norms, effective))
    torch.manual_seed(0)
    assert norms[0] == pytest.approx(float(LeNet("noisy_bn").conv2.affine.weight.detach().norm()), rel=1e-6)
    assert all(0 < u < 1 for u in logged["weights/fc1/relative_update"])
    # The angle a step turns W by: at most what the whole step would turn it by if it were all sideways.
    for turned, moved in zip(logged["weights/fc1/angular_update"], logged["weights/fc1/relative_update"]):
        assert 0 < math.sin(turned) <= moved * (1 + 1e-6)


def test_a_representation_probe_larger_than_the_validation_set_says_what_to_change(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="measures 64 validation images, but the validation set has 40"):
        fit(tiny_data, tmp_path, [probes.RepresentationProbe(2, num_images=64, gradient_images=8)])


def test_a_frozen_weight_has_no_effective_step(tiny_data, tmp_path):
    seed_everything(0)
    module = Classifier(LeNet("scratch"), optimizer=lambda p: torch.optim.SGD(p, lr=0.5), trainable="norm")
    trainer = Trainer(max_steps=2, logger=TensorBoardLogger(tmp_path), callbacks=[probes.WeightNormMonitor(1)],
                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, FashionMNISTDataModule(str(tiny_data), batch_size=32, val_size=40))
    logged = scalars(trainer.logger.log_dir)
    assert logged["weights/fc1/effective_lr"] == [0.0, 0.0] and logged["weights/fc1/relative_update"] == [0.0, 0.0]
    assert logged["weights/fc1/angular_update"] == [0.0, 0.0]
    assert logged["weights/head/effective_lr"][0] > 0
