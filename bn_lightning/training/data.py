"""Fashion-MNIST as a LightningDataModule: torchvision's files and parser, batches cut from memory."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

from bn_lightning.training.errors import CorruptDataError, DataNotFoundError, DataSizeError
from bn_lightning.training.sampling import ResumableLoader

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASSES = FashionMNIST.classes
DATA_ENV = "BN_LIGHTNING_DATA"  # a torchvision root holding Fashion-MNIST elsewhere than data/


def resolve_data_dir(explicit: str | Path | None = None, root: str | Path = ".") -> str:
    """Where Fashion-MNIST is, by the one rule of the CLI, notebooks, benchmarks and tests: ``explicit``
    (``--data.data_dir``) when given, else ``$BN_LIGHTNING_DATA``, else ``data/``, where a download goes.
    Relative paths are taken from ``root`` (the working directory)."""
    chosen = explicit if explicit is not None else os.environ.get(DATA_ENV) or "data"
    return str(Path(root) / chosen)


def load_fashion_mnist(train: bool, root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """torchvision's Fashion-MNIST, never downloaded: images (N, 1, 28, 28) in [0, 1] (d2l's ToTensor),
    labels. ``root`` defaults to :func:`resolve_data_dir`."""
    data = FashionMNIST(resolve_data_dir(root), train=train, download=False)
    return data.data.unsqueeze(1).float() / 255, data.targets


def _corrupt(path: Path, problem: str) -> CorruptDataError:
    return CorruptDataError(
        f"{path.resolve()} is not a valid Fashion-MNIST file: {problem}.\n"
        f"It was probably cut short or damaged while downloading or copying. Fix it by deleting it and "
        f"running again with download: true, or by copying a good copy over it."
    )


def _idx_length(path: Path, magic: int, item_shape: tuple[int, ...]) -> int:
    """How many items an unsigned-byte IDX file holds, once its header agrees with its name and its size.

    torchvision's parser fails on such files with a bare assert or reshape error, or reads a short
    label file without complaint; its 8- or 16-byte header is checked first instead.
    """
    header_size = 4 * (2 + len(item_shape))
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        raise _corrupt(path, f"it holds {len(header)} bytes, less than its {header_size}-byte header")
    found, length, *shape = struct.unpack(f">{2 + len(item_shape)}i", header)
    if found != magic:
        kind = "images" if item_shape else "labels"
        raise _corrupt(path, f"its magic number is {found}, not {magic} (IDX {kind} of unsigned bytes)")
    if tuple(shape) != item_shape:
        raise _corrupt(path, f"its items are {'x'.join(map(str, shape))}, not {'x'.join(map(str, item_shape))}")
    expected, size = header_size + length * math.prod(item_shape), path.stat().st_size
    if size != expected:
        raise _corrupt(path, f"its header announces {length} items, {expected} bytes, but it holds {size} bytes")
    return length


class InMemoryImages(Dataset):
    """uint8 images held as one tensor; whole batches are sliced and scaled at once.

    ``__getitems__`` lets the DataLoader fetch a batch with one indexing op instead of a
    Python call per sample; ``__getitem__`` still serves single samples.
    """

    def __init__(self, images: Tensor, targets: Tensor, mean: float, std: float) -> None:
        self.images, self.targets, self.mean, self.std = images, targets, mean, std
        # x = (pixels / 255 - mean) / std, folded into one multiply-add; the shift as a float32
        # scalar tensor makes that one op turn the bytes into floats as well.
        self.scale, self.shift = 1.0 / (255.0 * std), torch.tensor(-mean / std, device=images.device)

    def __len__(self) -> int:
        return len(self.targets)

    def _convert(self, images: Tensor) -> Tensor:
        return torch.add(self.shift, images.unsqueeze(-3), alpha=self.scale)

    def subset(self, indices: list[int]) -> InMemoryImages:
        return InMemoryImages(self.images[indices], self.targets[indices], self.mean, self.std)

    def to(self, device: torch.device) -> InMemoryImages:
        """The same images on ``device``, or this dataset when they are there already."""
        if self.images.device == torch.device(device):
            return self
        return InMemoryImages(self.images.to(device), self.targets.to(device), self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._convert(self.images[index]), self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # index_select: a tenth of the time of images[index], which takes the general indexing path.
        index = torch.as_tensor(indices, device=self.images.device)
        return self._convert(self.images.index_select(0, index)), self.targets.index_select(0, index)


def _already_batched(batch):
    """The collate_fn for datasets whose ``__getitems__`` returns a finished batch."""
    return batch


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST with a seeded train/validation split of the official training set.

    Args:
        data_dir: torchvision root, the folder that holds ``FashionMNIST/raw``; None: ``resolve_data_dir()``,
            which the CLI writes into the run's config.yaml.
        batch_size: images per batch, for every stage.
        val_size: images of the 60,000 training images held out for validation.
        split_seed: seed of the train/validation split, independent of the run's seed.
        mean, std: inputs are ``(pixels / 255 - mean) / std``; the defaults keep pixels in
            [0, 1] as Dive into Deep Learning does; the data's own are 0.2860 and 0.3530.
        num_workers: DataLoader worker processes; 0 is fastest here, since a batch is one slice.
        download: fetch the files when they are missing.
        shuffle_seed: the training order of epoch ``e`` is a permutation drawn from ``(shuffle_seed, e)``
            alone (``ResumableLoader``), so a run resumed mid-epoch serves the rest of the same order.
            None takes the seed torch's global RNG was seeded with (``seed_everything``'s, when called),
            recorded in the hyperparameters; the CLI writes that value into the run's config.yaml.
        classes_per_batch: batches that are not i.i.d.: each training batch holds this many classes in equal
            parts (``ClassMixShuffle``; every image still once per epoch, resumable alike); None (the default)
            shuffles. The validation and test batches mix the classes either way.
        on_device: keep the images (47 MB of bytes for all 70,000) on the Trainer's device and cut the
            batches there, instead of cutting them in host memory and copying each one over.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        val_size: int = 5_000,
        split_seed: int = 42,
        mean: float = 0.0,
        std: float = 1.0,
        num_workers: int = 0,
        download: bool = True,
        shuffle_seed: int | None = None,
        on_device: bool = False,
        classes_per_batch: int | None = None,
    ) -> None:
        super().__init__()
        if on_device and num_workers > 0:
            raise ValueError(f"on_device: true cuts batches on the device, in the main process: set num_workers "
                             f"to 0 (got {num_workers}), or on_device to false to keep worker processes")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
        if val_size <= 0:
            raise ValueError(f"val_size must be a positive number of images, got {val_size}")
        if classes_per_batch is not None and not (1 <= classes_per_batch <= 10 and batch_size % classes_per_batch == 0):
            raise ValueError(f"classes_per_batch must be one of Fashion-MNIST's 1 to 10 classes and divide batch_size "
                             f"{batch_size} into equal parts, got {classes_per_batch}")
        if std <= 0:
            raise ValueError(f"std must be positive (inputs are divided by it), got {std}")
        # Saved as text: a Path in the checkpoint would not load weights-only.
        data_dir = str(data_dir) if data_dir is not None else resolve_data_dir()
        if shuffle_seed is None:
            shuffle_seed = torch.initial_seed()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_set = self.val_set = self.test_set = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "FashionMNIST" / "raw"

    def _missing_files(self) -> list[str]:
        """Unpack any ``.gz`` copies that lack their unpacked twin, then say what is still missing."""
        missing = []
        for name in RAW_FILES:
            path = self.raw_dir / name
            if not path.exists() and path.with_suffix(".gz").exists():
                try:
                    extract_archive(str(path.with_suffix(".gz")), str(self.raw_dir))
                except (OSError, EOFError) as err:  # a cut-short archive leaves a partial file behind
                    path.unlink(missing_ok=True)
                    raise _corrupt(path.with_suffix(".gz"), f"unpacking it failed ({err})") from err
            if not path.exists():
                missing.append(name)
        return missing

    def prepare_data(self) -> None:
        missing = self._missing_files()
        if not missing:
            return
        reason = "downloading is switched off (download: false)"
        if self.hparams.download:
            try:
                for train in (True, False):
                    FashionMNIST(str(self.data_dir), train=train, download=True)
                return
            except (OSError, RuntimeError) as err:  # URLError is an OSError
                reason = f"downloading them failed: {str(err).strip().splitlines()[-1]}"
        raise DataNotFoundError(
            f"Fashion-MNIST is not in {self.raw_dir.resolve()}: missing {', '.join(missing)}; {reason}.\n"
            f"Fix it by one of: run once with network access (download: true); copy the four files "
            f"{', '.join(RAW_FILES)} (or their .gz archives) into {self.raw_dir}; or point "
            f"--data.data_dir at the folder that holds FashionMNIST/raw."
        )

    def _images(self, train: bool) -> InMemoryImages:
        prefix = "train" if train else "t10k"
        images_path = self.raw_dir / f"{prefix}-images-idx3-ubyte"
        labels_path = self.raw_dir / f"{prefix}-labels-idx1-ubyte"
        n_images, n_labels = _idx_length(images_path, 2051, (28, 28)), _idx_length(labels_path, 2049, ())
        if n_images != n_labels:
            raise _corrupt(labels_path, f"it holds {n_labels} labels for the {n_images} images of {images_path.name} "
                           "beside it (the two come from different copies)")
        source = FashionMNIST(str(self.data_dir), train=train, download=False)
        if source.targets.numel() and source.targets.max() >= len(CLASSES):
            index = int(source.targets.argmax())
            raise _corrupt(labels_path, f"label {int(source.targets[index])} at index {index} is not a class 0..9")
        return InMemoryImages(source.data, source.targets, self.hparams.mean, self.hparams.std)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            full = self._images(train=True)
            val_size = self.hparams.val_size
            if val_size >= len(full):
                raise DataSizeError(f"val_size {val_size} leaves no training images: {self.raw_dir} holds {len(full)} "
                                    f"training images; set --data.val_size below {len(full)}")
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            train_idx, val_idx = random_split(range(len(full)), [len(full) - val_size, val_size], generator)
            self.train_set, self.val_set = full.subset(list(train_idx)), full.subset(list(val_idx))
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._images(train=False)
        if self.hparams.on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.train_set, self.val_set, self.test_set = (
                None if images is None else images.to(device) for images in (self.train_set, self.val_set, self.test_set))

    def _loader(self, dataset: InMemoryImages, loader: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        """Whole batches in the dataset's order; ``loader`` and ``kwargs`` make the training one."""
        workers = self.hparams.num_workers
        return loader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=_already_batched,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # A last batch of one image has no batch statistics (BN refuses it); leave that image out.
        drop_last = len(self.train_set) % self.hparams.batch_size == 1
        return self._loader(self.train_set, ResumableLoader, seed=self.hparams.shuffle_seed, drop_last=drop_last,
                            classes_per_batch=self.hparams.classes_per_batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
