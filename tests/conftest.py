"""Shared fixtures, and the marks of the tests that live outside tests/ (the notebooks)."""

from pathlib import Path

import pytest

import torch

from helpers import HAS_REAL_DATA, SHARED_DATA, needs_real_data, write_fashion_mnist

# Notebooks that train on the real data (nbmake runs them as tests): skipped like the tests that need it.
NOTEBOOKS_NEEDING_REAL_DATA = {"03_comparing_runs.ipynb"}


def pytest_collection_modifyitems(config, items):
    """Every notebook is slow (a kernel process); those that train on the real data are marked real_data.
    Tests marked gpu skip without a CUDA device (``pytest -m gpu`` runs them: benchmarks/gpu.sh), those
    marked real_data without the real Fashion-MNIST under $BN_LIGHTNING_DATA."""
    no_gpu = pytest.mark.skip(reason="needs a GPU")
    no_data = pytest.mark.skip(reason=f"real Fashion-MNIST not found under {SHARED_DATA}")
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
        if item.path.name in NOTEBOOKS_NEEDING_REAL_DATA:
            item.add_marker(needs_real_data)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "real_data" in item.keywords and not HAS_REAL_DATA:
            item.add_marker(no_data)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A torchvision root with 200 train and 60 test images in real IDX files."""
    return write_fashion_mnist(tmp_path_factory.mktemp("tiny"))
