"""Shared fixtures, and the marks of the tests that live outside tests/ (the notebooks)."""

from pathlib import Path

import pytest

from helpers import needs_real_data, write_fashion_mnist

# Notebooks that train on the real data (nbmake runs them as tests): skipped like the tests that need it.
NOTEBOOKS_NEEDING_REAL_DATA = {"03_comparing_runs.ipynb"}


def pytest_collection_modifyitems(config, items):
    """Every notebook is slow (a kernel process); those that train on the real data are also marked as
    needs_real_data marks tests."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
        if item.path.name in NOTEBOOKS_NEEDING_REAL_DATA:
            item.add_marker(needs_real_data)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A torchvision root with 200 train and 60 test images in real IDX files."""
    return write_fashion_mnist(tmp_path_factory.mktemp("tiny"))
