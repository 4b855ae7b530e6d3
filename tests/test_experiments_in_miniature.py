"""Every provided comparison, in miniature: each of its configs at the last value of every grid axis (where the
files put what they add: the largest depth, the 2-class batches, the largest weight decay), one seed,
two steps on the tiny data, through the comparison runner with the file's own callbacks and options. A
comparison whose runs would fail after hours here fails in CI in seconds instead."""

import csv

import pytest
import yaml

from bn_lightning import compare
from helpers import CONFIGS, write_fashion_mnist

COMPARISONS = sorted((CONFIGS / "compare").glob("*.yaml"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Enough validation images for the representation probe's 256."""
    return write_fashion_mnist(tmp_path_factory.mktemp("small"), n_train=600)


def miniature(path, folder, data):
    spec = yaml.safe_load(path.read_text())
    spec["configs"] = [str((path.parent / config).resolve()) for config in spec["configs"]]
    spec["seeds"] = spec["seeds"][:1]
    spec["grid"] = {key: values[-1:] for key, values in (spec.get("grid") or {}).items()}
    spec.pop("contrasts", None)  # they name arms of the full grid
    spec.pop("tune", None)
    tiny = {"data.data_dir": str(data), "data.batch_size": 16, "data.val_size": 300, "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2}
    keep = {key: value for key, value in (spec.get("args") or {}).items() if key.startswith("trainer.callbacks")}
    spec["args"] = {**(spec.get("args") or {}), **tiny, **keep}
    out = folder / f"{path.stem}.yaml"
    out.write_text(yaml.safe_dump(spec))
    return out


@pytest.mark.slow  # a few seconds per config of the comparison
@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.stem)
def test_each_comparison_runs_in_miniature(path, small_data, tmp_path):
    small = miniature(path, tmp_path, small_data)
    out = tmp_path / "out"
    assert compare.main([str(small), "--out", str(out), "--workers", "2"]) == 0
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(compare.Comparison.load(small, {}).runs()) == len(yaml.safe_load(path.read_text())["configs"])
    assert (out / "results.md").read_text().count("\n") >= 2 + len(runs)  # a header and a row per group
