"""Helpers the tests share: where things are, tiny IDX data, running the CLI, reading TensorBoard events."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_lightning.training.data import resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEFAULTS = REPO / "bn_lightning" / "training" / "defaults.yaml"
# The real data set, by the project's one rule: $BN_LIGHTNING_DATA (CI sets it), else data/.
SHARED_DATA = Path(resolve_data_dir(root=REPO))
HAS_REAL_DATA = (SHARED_DATA / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
needs_real_data = pytest.mark.real_data  # skipped where HAS_REAL_DATA is false (conftest.py)


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


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m bn_lightning *args`` in its own process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bn_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def scalars(version_dir: Path) -> dict[str, list[float]]:
    """Every scalar series of a run folder's TensorBoard events, read with TensorBoard's own reader."""
    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def frequent_logging_callbacks() -> list[dict]:
    """The callbacks every run has (defaults.yaml), logging every 2 steps (histograms every 4) instead of every 50-200."""
    callbacks = yaml.safe_load(DEFAULTS.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        for key, every in (("every_n_steps", 2), ("histogram_every_n_steps", 4)):
            if key in callback.get("init_args", {}):
                callback["init_args"][key] = every
    return callbacks
