"""Notebook 03 trains on the real Fashion-MNIST: like the tests that need it, it is skipped where no
copy is beside the clone (``../shared/data``, or ``$BN_LIGHTNING_DATA``), since tests never download."""

import os
from pathlib import Path

import pytest

REAL_DATA = Path(os.environ.get("BN_LIGHTNING_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
NEEDS_REAL_DATA = {"03_comparing_runs.ipynb"}


def pytest_collection_modifyitems(config, items):
    if (REAL_DATA / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists():
        return
    for item in items:
        if item.path.name in NEEDS_REAL_DATA:
            item.add_marker(pytest.mark.skip(reason=f"real Fashion-MNIST not found under {REAL_DATA}"))
