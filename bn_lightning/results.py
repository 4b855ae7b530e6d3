"""Reading a comparison's results folder (``results/<name>/``, written by ``bn_lightning.compare``) for the notebooks.

``runs.csv`` has one row per run (group, seed and its figures); ``series.csv`` one row per logged point of
the series the comparison keeps (group, seed, tag, step, value).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

Series = dict[int, list[tuple[int, float]]]  # seed -> [(step, value), ...]


def have(name: str, root: Path = RESULTS) -> bool:
    """Whether results/<name> holds a finished comparison; if not, prints the command that makes it."""
    if (root / name / "runs.csv").exists():
        return True
    print(f"results/{name} is not there yet: python -m bn_lightning.compare configs/compare/{name}.yaml "
          f"--workers 2 --out results/{name}")
    return False


def runs(name: str, root: Path = RESULTS) -> list[dict[str, str]]:
    with open(root / name / "runs.csv") as f:
        return list(csv.DictReader(f))


def series(name: str, root: Path = RESULTS) -> dict[tuple[str, str], Series]:
    """{(group, tag): {seed: [(step, value), ...]}}, steps in the order logged."""
    found: dict[tuple[str, str], Series] = defaultdict(lambda: defaultdict(list))
    with open(root / name / "series.csv") as f:
        for row in csv.DictReader(f):
            found[row["group"], row["tag"]][int(row["seed"])].append((int(row["step"]), float(row["value"])))
    return found


def figure_of(name: str, figure: str, root: Path = RESULTS) -> dict[str, list[float]]:
    """{group: [value per seed]} of one column of runs.csv; an empty cell (no value) reads as nan."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in runs(name, root):
        found[row["group"]].append(float(row[figure]) if row[figure] not in ("", "None") else math.nan)
    return dict(found)


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the values that are numbers (nan std for one value, nan both for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pm(values: list[float | None], digits: int = 3) -> str:
    """``mean ± std`` of the values, or ``-`` when none is a number."""
    mean, std = mean_std(values)
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_curve(per_seed: Series) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed logged, and at each the mean over seeds, their min and their max."""
    steps = sorted(set.intersection(*(set(s for s, _ in points) for points in per_seed.values())))
    values = [[dict(points)[s] for points in per_seed.values()] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_band(axes, per_seed: Series, label: str, **style) -> None:
    """The mean over seeds as a line, the seeds' min-max as a band around it."""
    steps, mean, low, high = mean_curve(per_seed)
    line, = axes.plot(steps, mean, label=label, **style)
    axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
