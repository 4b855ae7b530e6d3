"""The statistics every table and notebook uses: mean ± std over seeds, and the difference between two arms
with its interval and a verdict.

A difference is tested with a t-test over seeds: paired where the two arms ran the same seeds (a seed fixes the
data order, and the initialization where the networks match), Welch's otherwise. The tests of one experiment
are adjusted together by Holm's step-down method, so that claiming every ``differs`` of an experiment is
wrong at most 5% of the time. No bootstrap: with 3 seeds it has 10 distinct resamples.

The verdict is one of three words:

- ``differs``: the Holm-adjusted 95% interval of the difference excludes 0;
- ``equivalent``: the (unadjusted) 90% interval lies inside ±``margin``, two one-sided tests at 5%
  (Schuirmann 1987); the default margin is half an accuracy point;
- ``unresolved``: neither. Seeds too few to tell are an answer, not a failure.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

Series = dict[int, list[tuple[int, float]]]  # seed -> [(step, value), ...]
Values = Mapping[int, float] | Sequence[float]  # per seed ({seed: value}: pairs by seed) or plain values

MARGIN = 0.005  # equivalence margin for accuracies (fractions): half an accuracy point
LEVEL = 0.95  # confidence of the intervals that decide "differs"
VERDICTS = ("differs", "equivalent", "unresolved")


def _numbers(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample std of the values that are numbers (nan std for one value, nan both for none)."""
    values = _numbers(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pm_text(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std``; ``mean`` alone when there is no std (one seed); ``-`` when there is no mean."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def pm(values: Sequence[float | None], digits: int = 3) -> str:
    """:func:`pm_text` of the values' :func:`mean_std`."""
    return pm_text(*mean_std(values), digits)


def mean_curve(per_seed: Series) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed logged, and at each the mean over seeds, their min and their max."""
    steps = sorted(set.intersection(*(set(s for s, _ in points) for points in per_seed.values())))
    values = [[dict(points)[s] for points in per_seed.values()] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


@dataclass(frozen=True)
class TTest:
    """A t-test of ``a - b``: the mean difference, its standard error and degrees of freedom."""

    test: str  # "paired t" or "Welch t"
    mean: float
    se: float
    df: float
    n: tuple[int, int]  # values used from a and b (for a paired test, the pairs, twice)
    pooled_std: float  # sqrt of the mean of the two arms' variances: the spread over seeds a difference is set against

    @property
    def p(self) -> float:
        """Two-sided p-value of "no difference"."""
        if not self.df > 0:
            return math.nan
        if self.se == 0:
            return 1.0 if self.mean == 0 else 0.0
        return float(2 * scipy_stats.t.sf(abs(self.mean) / self.se, self.df))

    def interval(self, level: float) -> tuple[float, float]:
        """The two-sided ``level`` confidence interval of the difference."""
        if not self.df > 0:
            return math.nan, math.nan
        half = float(scipy_stats.t.ppf(0.5 + level / 2, self.df)) * self.se
        return self.mean - half, self.mean + half


def t_test(a: Values, b: Values, paired: bool | None = None) -> TTest:
    """The t-test of ``a - b``. ``paired`` (by default: both given per seed, with the same seeds) pairs the
    values by seed and drops a seed where either is not a number (a diverged run); otherwise Welch's t."""
    by_seed = isinstance(a, Mapping) and isinstance(b, Mapping)
    if paired is None:
        paired = by_seed and set(a) == set(b)
    if paired:
        if not by_seed:
            raise ValueError("a paired test needs the values per seed: give {seed: value} mappings")
        seeds = [s for s in a if s in b and _numbers([a[s], b[s]]) == [a[s], b[s]]]
        diffs = [a[s] - b[s] for s in seeds]
        n = len(diffs)
        pooled = math.sqrt((_var([a[s] for s in seeds]) + _var([b[s] for s in seeds])) / 2)
        se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
        return TTest("paired t", statistics.fmean(diffs) if diffs else math.nan, se, n - 1, (n, n), pooled)
    xs = _numbers(list(a.values()) if isinstance(a, Mapping) else a)
    ys = _numbers(list(b.values()) if isinstance(b, Mapping) else b)
    mean = statistics.fmean(xs) - statistics.fmean(ys) if xs and ys else math.nan
    va, vb = _var(xs), _var(ys)
    pooled = math.sqrt((va + vb) / 2)
    if len(xs) < 2 or len(ys) < 2:
        return TTest("Welch t", mean, math.nan, math.nan, (len(xs), len(ys)), pooled)
    sa, sb = va / len(xs), vb / len(ys)
    se = math.sqrt(sa + sb)
    # Welch-Satterthwaite; both arms without spread leave no degrees of freedom to estimate
    df = (sa + sb) ** 2 / (sa**2 / (len(xs) - 1) + sb**2 / (len(ys) - 1)) if sa + sb > 0 else len(xs) + len(ys) - 2
    return TTest("Welch t", mean, se, df, (len(xs), len(ys)), pooled)


def _var(values: Sequence[float]) -> float:
    return statistics.variance(values) if len(values) > 1 else math.nan


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and does not count as a test)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Difference:
    """One comparison of an experiment: ``name`` is what was compared (e.g. "BN - no BN")."""

    name: str
    test: TTest
    low: float  # the Holm-adjusted 95% interval of the difference
    high: float
    low90: float  # the unadjusted 90% interval, which decides "equivalent"
    high90: float
    p_holm: float
    margin: float
    verdict: str

    @property
    def mean(self) -> float:
        return self.test.mean

    def text(self, scale: float = 100, unit: str = "points", digits: int = 2) -> str:
        """``+1.37 points (95% CI -0.45 to +3.19, Welch t over 3 and 3 seeds, Holm-adjusted): unresolved``;
        accuracies (fractions) read in points with the default scale."""
        if math.isnan(self.mean):
            return f"no difference to compute (seeds with numbers: {self.test.n[0]} and {self.test.n[1]}): unresolved"
        seeds = f"{self.test.n[0]} seeds" if self.test.test == "paired t" else f"{self.test.n[0]} and {self.test.n[1]} seeds"
        interval = ("no interval" if math.isnan(self.low) else
                    f"95% CI {self.low * scale:+.{digits}f} to {self.high * scale:+.{digits}f}")
        return (f"{self.mean * scale:+.{digits}f} {unit} ({interval}, {self.test.test} over {seeds}, Holm-adjusted): "
                f"{self.verdict}")


def differences(pairs: Mapping[str, tuple[Values, Values]], margin: float | Mapping[str, float] = MARGIN,
                level: float = LEVEL, paired: bool | None = None) -> dict[str, Difference]:
    """Every comparison of one experiment, ``{name: (a, b)}`` for the difference ``a - b``, tested together;
    ``margin`` is the equivalence margin of every comparison, or of each by name (measures in different units).

    The adjusted intervals follow Holm's steps: the k-th smallest p-value's interval is at level
    1 - alpha / (m - k) (k from 0), and from the first comparison Holm does not reject on, every later one keeps
    that level. An interval then excludes 0 exactly when the Holm-adjusted p-value is below alpha.
    """
    tests = {name: t_test(a, b, paired) for name, (a, b) in pairs.items()}
    margins = dict(margin) if isinstance(margin, Mapping) else dict.fromkeys(pairs, margin)
    names = list(tests)
    adjusted = dict(zip(names, holm([tests[name].p for name in names])))
    alpha = 1 - level
    order = sorted((name for name in names if not math.isnan(tests[name].p)), key=lambda name: tests[name].p)
    m, levels, stopped = len(order), {}, None
    for rank, name in enumerate(order):
        if stopped is None and not adjusted[name] < alpha:
            stopped = rank
        levels[name] = 1 - alpha / (m - (rank if stopped is None else stopped))
    found = {}
    for name in names:
        test = tests[name]
        low, high = test.interval(levels[name]) if name in levels else (math.nan, math.nan)
        low90, high90 = test.interval(0.90)
        if name in levels and adjusted[name] < alpha:
            verdict = "differs"
        elif -margins[name] < low90 and high90 < margins[name]:
            verdict = "equivalent"
        else:
            verdict = "unresolved"
        found[name] = Difference(name, test, low, high, low90, high90, adjusted[name], margins[name], verdict)
    return found


def differences_table(found: Mapping[str, Difference], scale: float = 100, unit: str = "points", digits: int = 2) -> str:
    """A markdown table of an experiment's comparisons: difference, intervals, test, verdict."""
    lines = [f"| comparison | difference ({unit}) | 95% CI, Holm-adjusted | 90% CI | in pooled stds | test | verdict |",
             "|---|---|---|---|---|---|---|"]
    for d in found.values():
        def span(low, high):
            return "-" if math.isnan(low) else f"{low * scale:+.{digits}f} to {high * scale:+.{digits}f}"
        stds = d.mean / d.test.pooled_std if d.test.pooled_std > 0 else math.nan
        seeds = f"{d.test.n[0]}" if d.test.test == "paired t" else f"{d.test.n[0]}+{d.test.n[1]}"
        lines.append(f"| {d.name} | {'-' if math.isnan(d.mean) else f'{d.mean * scale:+.{digits}f}'} "
                     f"| {span(d.low, d.high)} | {span(d.low90, d.high90)} | {'-' if math.isnan(stds) else f'{stds:+.1f}'} "
                     f"| {d.test.test}, {seeds} seeds | {d.verdict} |")
    return "\n".join(lines) + "\n"
