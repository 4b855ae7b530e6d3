"""Shared fixtures: tiny Fashion-MNIST IDX files written here, and the real copy when it is there."""

import os
import struct
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI and developers keep the real data set beside the clone; BN_LIGHTNING_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("BN_LIGHTNING_DATA", REPO.parent / "shared" / "data"))
needs_real_data = pytest.mark.skipif(
    not (SHARED_DATA / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists(),
    reason=f"real Fashion-MNIST not found under {SHARED_DATA}",
)

# Notebooks that train on the real data (nbmake runs them as tests): skipped like the tests above.
NOTEBOOKS_NEEDING_REAL_DATA = {"03_comparing_runs.ipynb"}


def pytest_collection_modifyitems(config, items):
    """Mark the notebooks that need the real data, which live outside tests/, as needs_real_data does."""
    for item in items:
        if item.path.name in NOTEBOOKS_NEEDING_REAL_DATA:
            item.add_marker(needs_real_data)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor in the IDX format (the one torchvision's parser reads)."""
    magic = 2051 if data.dim() == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">" + "i" * (1 + data.dim()), magic, *data.shape))
        f.write(data.contiguous().numpy().tobytes())


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake fashion: each class is a bright bar at its own rows, over noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label : 5 + 2 * label, 4:24] = 255
    return images, labels.to(torch.uint8)


def write_fashion_mnist(root: Path, n_train: int = 200, n_test: int = 60) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A torchvision root with 200 train and 60 test images in real IDX files."""
    return write_fashion_mnist(tmp_path_factory.mktemp("tiny"))
