"""Fashion-MNIST as a LightningDataModule: torchvision's files and parser, batches cut from memory."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CLASSES = FashionMNIST.classes


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are not on disk and could not be downloaded."""


class InMemoryImages(Dataset):
    """uint8 images held as one tensor; whole batches are sliced and scaled at once.

    ``__getitems__`` lets the DataLoader fetch a batch with one indexing op instead of a
    Python call per sample; ``__getitem__`` still serves single samples.
    """

    def __init__(self, images: Tensor, targets: Tensor, mean: float, std: float) -> None:
        self.images, self.targets, self.mean, self.std = images, targets, mean, std
        # x = (pixels / 255 - mean) / std, folded into one multiply-add.
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std

    def __len__(self) -> int:
        return len(self.targets)

    def _convert(self, images: Tensor) -> Tensor:
        return (images.unsqueeze(-3).float() * self.scale).add_(self.shift)

    def subset(self, indices: list[int]) -> InMemoryImages:
        return InMemoryImages(self.images[indices], self.targets[indices], self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self._convert(self.images[index]), self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self._convert(self.images[index]), self.targets[index]


def _already_batched(batch):
    """The collate_fn for datasets whose ``__getitems__`` returns a finished batch."""
    return batch


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST with a seeded train/validation split of the official training set.

    Args:
        data_dir: torchvision root, the folder that holds ``FashionMNIST/raw``.
        batch_size: images per batch, for every stage.
        val_size: images of the 60,000 training images held out for validation.
        split_seed: seed of the train/validation split, independent of the run's seed.
        mean, std: inputs are ``(pixels / 255 - mean) / std``; the defaults keep pixels in
            [0, 1] as Dive into Deep Learning does; the data's own are 0.2860 and 0.3530.
        num_workers: DataLoader worker processes; 0 is fastest here, since a batch is one slice.
        download: fetch the files when they are missing.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 256,
        val_size: int = 5_000,
        split_seed: int = 42,
        mean: float = 0.0,
        std: float = 1.0,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
        if val_size <= 0:
            raise ValueError(f"val_size must be a positive number of images, got {val_size}")
        if std <= 0:
            raise ValueError(f"std must be positive (inputs are divided by it), got {std}")
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
                extract_archive(str(path.with_suffix(".gz")), str(self.raw_dir))
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
        source = FashionMNIST(str(self.data_dir), train=train, download=False)
        return InMemoryImages(source.data, source.targets, self.hparams.mean, self.hparams.std)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            full = self._images(train=True)
            val_size = self.hparams.val_size
            if val_size >= len(full):
                raise ValueError(f"val_size {val_size} leaves no training images: {self.raw_dir} holds {len(full)}")
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            train_idx, val_idx = random_split(range(len(full)), [len(full) - val_size, val_size], generator)
            self.train_set, self.val_set = full.subset(list(train_idx)), full.subset(list(val_idx))
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._images(train=False)

    def _loader(self, dataset: InMemoryImages, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=_already_batched,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
