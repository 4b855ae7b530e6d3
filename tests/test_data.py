"""The DataModule on IDX files read by torchvision's own parser, and on the real data set."""

import gzip
import shutil
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.mnist
import yaml
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from bn_lightning.training.data import DATA_ENV, RAW_FILES, FashionMNISTDataModule
from bn_lightning.training.errors import CorruptDataError, DataNotFoundError, DataSizeError
from helpers import CONFIGS, SHARED_DATA, needs_real_data, write_fashion_mnist, write_idx


def ready(dm: FashionMNISTDataModule, stage: str = "fit") -> FashionMNISTDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


def test_samples_equal_torchvisions_totensor_and_normalize(tiny_data):
    dm = ready(FashionMNISTDataModule(tiny_data, mean=0.2860, std=0.3530), "test")
    reference = FashionMNIST(tiny_data, train=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))]))
    x, y = next(iter(dm.test_dataloader()))
    expected = torch.stack([reference[i][0] for i in range(len(y))])
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [reference[i][1] for i in range(len(y))]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.test_set[3][0].shape == (1, 28, 28)  # single-sample access still works


def test_default_inputs_are_pixels_in_unit_range(tiny_data):
    x, _ = next(iter(ready(FashionMNISTDataModule(tiny_data, val_size=20)).train_dataloader()))
    assert x.min() >= 0 and x.max() == 1


def test_split_is_seeded_disjoint_and_complete(tiny_data):
    def split(seed):
        dm = ready(FashionMNISTDataModule(tiny_data, val_size=30, split_seed=seed))
        return dm.train_set.images, dm.val_set.images

    (train_a, val_a), (train_b, val_b), (_, val_c) = split(0), split(0), split(1)
    assert len(train_a) == 170 and len(val_a) == 30
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    # Every training image lands in exactly one of the two parts.
    everything = FashionMNIST(tiny_data, train=True).data
    parts = torch.cat([train_a, val_a]).flatten(1)
    assert sorted(map(bytes, parts.numpy())) == sorted(map(bytes, everything.flatten(1).numpy()))


def test_batches_cover_every_sample_once_with_a_partial_last_batch(tiny_data):
    dm = ready(FashionMNISTDataModule(tiny_data, batch_size=64, val_size=20))
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sizes == [64, 64, 52]
    assert [len(y) for _, y in dm.val_dataloader()] == [20]


def test_gzipped_files_alone_are_unpacked(tmp_path, tiny_data):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        with open(tiny_data / "FashionMNIST" / "raw" / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    dm = ready(FashionMNISTDataModule(tmp_path, download=False, val_size=20))
    assert len(dm.train_set) == 180


def test_missing_files_without_download_name_folder_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        FashionMNISTDataModule(tmp_path / "nowhere", download=False).prepare_data()
    message = str(err.value)
    assert str((tmp_path / "nowhere" / "FashionMNIST" / "raw").resolve()) in message
    assert all(name in message for name in RAW_FILES)
    assert "download: false" in message and "--data.data_dir" in message


def test_failed_download_says_why_and_how_to_fix(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match="downloading them failed: .*Name or service not known"):
        FashionMNISTDataModule(tmp_path).prepare_data()


def test_some_files_missing_are_named(tmp_path):
    root = write_fashion_mnist(tmp_path)
    (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="missing t10k-labels-idx1-ubyte;"):
        FashionMNISTDataModule(root, download=False).prepare_data()


def _cut(path, size):
    path.write_bytes(path.read_bytes()[:size])


# Each damage torchvision's parser meets with a bare AssertionError, a reshape RuntimeError, or silence.
DAMAGED = {
    "truncated images": ("train-images-idx3-ubyte", lambda p: _cut(p, 5000),
                         "its header announces 200 items, 156816 bytes, but it holds 5000 bytes"),
    "truncated labels": ("t10k-labels-idx1-ubyte", lambda p: _cut(p, 30),
                         "its header announces 60 items, 68 bytes, but it holds 30 bytes"),
    "empty file": ("train-labels-idx1-ubyte", lambda p: _cut(p, 0), "it holds 0 bytes, less than its 8-byte header"),
    "a web page saved as the file": ("train-images-idx3-ubyte", lambda p: p.write_text("<html>Not Found</html>"),
                                     "its magic number is 1013478509, not 2051 (IDX images of unsigned bytes)"),
    "the labels copied over the images": ("train-images-idx3-ubyte",
                                          lambda p: shutil.copy(p.with_name("train-labels-idx1-ubyte"), p),
                                          "its magic number is 2049, not 2051 (IDX images of unsigned bytes)"),
    "images of another size": ("t10k-images-idx3-ubyte",
                               lambda p: write_idx(p, torch.zeros(60, 32, 32, dtype=torch.uint8)),
                               "its items are 32x32, not 28x28"),
    "labels outside 0..9": ("train-labels-idx1-ubyte",
                            lambda p: write_idx(p, torch.tensor([3] * 150 + [12] * 50, dtype=torch.uint8)),
                            "label 12 at index 150 is not a class 0..9"),
    "fewer labels than images": ("train-labels-idx1-ubyte", lambda p: write_idx(p, torch.zeros(150, dtype=torch.uint8)),
                                 "it holds 150 labels for the 200 images of train-images-idx3-ubyte beside it "
                                 "(the two come from different copies)"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_file_is_named_with_what_is_wrong_and_how_to_fix_it(tmp_path, damage):
    name, damage_file, problem = DAMAGED[damage]
    path = write_fashion_mnist(tmp_path) / "FashionMNIST" / "raw" / name
    damage_file(path)
    dm = FashionMNISTDataModule(tmp_path, download=False)
    dm.prepare_data()
    with pytest.raises(CorruptDataError) as err:
        dm.setup("test" if name.startswith("t10k") else "fit")
    assert str(err.value) == (f"{path.resolve()} is not a valid Fashion-MNIST file: {problem}.\n"
                              "It was probably cut short or damaged while downloading or copying. Fix it by "
                              "deleting it and running again with download: true, or by copying a good copy over it.")


def test_a_truncated_archive_is_named_and_leaves_no_partial_file(tmp_path, tiny_data):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        shutil.copy(tiny_data / "FashionMNIST" / "raw" / name, raw / name)
    archive = raw / "train-images-idx3-ubyte.gz"
    archive.write_bytes(gzip.compress((raw / "train-images-idx3-ubyte").read_bytes())[:300])
    (raw / "train-images-idx3-ubyte").unlink()
    with pytest.raises(CorruptDataError, match=rf"{archive.name} is not a valid Fashion-MNIST file: unpacking it failed"):
        FashionMNISTDataModule(tmp_path, download=False).prepare_data()
    assert sorted(p.name for p in raw.iterdir()) == sorted({*RAW_FILES, archive.name} - {"train-images-idx3-ubyte"})


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive"),
    ({"val_size": 0}, "val_size must be a positive"),
    ({"std": 0.0}, "std must be positive"),
    ({"on_device": True, "num_workers": 2}, "on_device: true cuts batches on the device, in the main process: set num_workers"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)


@pytest.mark.gpu
def test_on_device_batches_are_cut_on_the_gpu_and_equal_the_host_ones(tiny_data, tmp_path):
    from lightning.pytorch import Trainer

    host, device = FashionMNISTDataModule(tiny_data, batch_size=32, shuffle_seed=3), \
        FashionMNISTDataModule(tiny_data, batch_size=32, shuffle_seed=3, on_device=True)
    for datamodule in (host, device):
        datamodule.trainer = Trainer(accelerator="gpu", devices=1, default_root_dir=tmp_path, logger=False)
        datamodule.prepare_data()
        datamodule.setup("fit")
    assert device.train_set.images.is_cuda and not host.train_set.images.is_cuda
    for (x_host, y_host), (x_device, y_device) in zip(host.train_dataloader(), device.train_dataloader(), strict=True):
        assert x_device.is_cuda and y_device.is_cuda
        torch.testing.assert_close(x_device.cpu(), x_host, rtol=0, atol=0)
        assert torch.equal(y_device.cpu(), y_host)


def test_on_device_with_a_cpu_trainer_trains_on_the_same_batches(tiny_data, tmp_path):
    from lightning.pytorch import Trainer

    from bn_lightning.nn.lenet import LeNet
    from bn_lightning.training.module import Classifier

    states = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model = Classifier(LeNet("scratch"))
        trainer = Trainer(accelerator="cpu", max_epochs=1, default_root_dir=tmp_path, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=FashionMNISTDataModule(tiny_data, batch_size=32, val_size=40, shuffle_seed=3,
                                                             on_device=on_device))
        states.append(model.state_dict())
    torch.testing.assert_close(states[1], states[0], rtol=0, atol=0)


def test_val_size_larger_than_the_data_is_rejected(tiny_data):
    with pytest.raises(DataSizeError, match="val_size 500 leaves no training images"):
        ready(FashionMNISTDataModule(tiny_data, val_size=500))


@needs_real_data
def test_real_fashion_mnist_split_and_statistics():
    dm = ready(FashionMNISTDataModule(SHARED_DATA, download=False))
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    assert torch.bincount(dm.test_set.targets).tolist() == [1000] * 10
    pixels = torch.cat([dm.train_set.images, dm.val_set.images]).float() / 255
    assert pixels.mean().item() == pytest.approx(0.2861, abs=1e-4)  # the data's README: 0.286105
    assert pixels.std(correction=0).item() == pytest.approx(0.3528, abs=1e-4)


def test_the_data_folder_is_the_explicit_one_then_the_environments_then_data(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert FashionMNISTDataModule().hparams.data_dir == "data"  # where a download would go
    monkeypatch.setenv(DATA_ENV, str(tiny_data))
    assert FashionMNISTDataModule().hparams.data_dir == str(tiny_data)
    (tmp_path / "data" / "FashionMNIST" / "raw").mkdir(parents=True)
    assert FashionMNISTDataModule().hparams.data_dir == str(tiny_data)  # the environment over a data/ folder
    assert FashionMNISTDataModule(data_dir="elsewhere").hparams.data_dir == "elsewhere"  # the explicit one first


def test_the_cli_records_the_data_folder_it_used(tmp_path, monkeypatch, tiny_data):
    from bn_lightning.training.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tiny_data))
    cli = main(["fit", "--config", str(CONFIGS / "lenet_no_bn.yaml"), "--data.batch_size=32", "--data.val_size=40",
                "--trainer.max_steps=2", "--test_after_fit=false", "--trainer.enable_progress_bar=false"])
    assert cli.datamodule.hparams.data_dir == str(tiny_data)
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["data"]["data_dir"] == str(tiny_data)


def test_resolve_data_dir_is_the_one_rule_relative_to_its_root(tmp_path, monkeypatch):
    from bn_lightning.training.data import DATA_ENV, resolve_data_dir

    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir(root=tmp_path) == str(tmp_path / "data")  # nothing says where: downloads go there
    (tmp_path / "data" / "FashionMNIST" / "raw").mkdir(parents=True)
    monkeypatch.setenv(DATA_ENV, "elsewhere")
    assert resolve_data_dir(root=tmp_path) == str(tmp_path / "elsewhere")  # relative to the root
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "abs"))
    assert resolve_data_dir(root=tmp_path) == str(tmp_path / "abs")
    assert resolve_data_dir("given", root=tmp_path) == str(tmp_path / "given")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_ENV)
    assert resolve_data_dir() == "data"
