"""Mean ± std over seeds, one way everywhere: the tables the runner writes and the notebooks' prose."""

from __future__ import annotations

import math
import statistics

Series = dict[int, list[tuple[int, float]]]  # seed -> [(step, value), ...]


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the values that are numbers (nan std for one value, nan both for none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pm_text(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std``; ``mean`` alone when there is no std (one seed); ``-`` when there is no mean."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def pm(values: list[float | None], digits: int = 3) -> str:
    """:func:`pm_text` of the values' :func:`mean_std`."""
    return pm_text(*mean_std(values), digits)


def mean_curve(per_seed: Series) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed logged, and at each the mean over seeds, their min and their max."""
    steps = sorted(set.intersection(*(set(s for s, _ in points) for points in per_seed.values())))
    values = [[dict(points)[s] for points in per_seed.values()] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]
