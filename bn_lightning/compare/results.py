"""Reading a comparison's results folder (``results/<name>/``, written by ``python -m bn_lightning.compare``)
for the notebooks and the generated docs pages.

``runs.csv`` has one row per run (group, seed and its figures); ``series.csv`` one row per logged point of
the series the comparison keeps (group, seed, tag, step, value). Every function takes the folder itself:
where results live is the caller's to say, not a path computed from this package's file.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from bn_lightning.compare.collect import LAST_EPOCHS, PRIMARY
from bn_lightning.compare.contrasts import TUNED, Arm, arm_differences, arms
from bn_lightning.compare.report import plot_band
from bn_lightning.compare.spec import Comparison
from bn_lightning.compare.stats import Difference, Series, differences, differences_table, mean_curve, mean_std, pm

__all__ = ["Series", "arm_differences", "best_arms", "differences", "differences_table", "figure_of", "have", "mean_curve", "mean_std", "per_seed", "plot_band",
           "below_the_grid", "evaluations", "pm", "precise_bn_differences", "runs", "series", "trainability_differences"]


def have(folder: Path) -> bool:
    """Whether ``folder`` holds a finished comparison; if not, prints the command that makes it."""
    folder = Path(folder)
    if (folder / "runs.csv").exists():
        return True
    print(f"{folder.name} has no results yet: python -m bn_lightning.compare configs/compare/{folder.name}.yaml "
          f"--workers 2 --out results/{folder.name}")
    return False


def runs(folder: Path) -> list[dict[str, str]]:
    with open(Path(folder) / "runs.csv") as f:
        return list(csv.DictReader(f))


def series(folder: Path) -> dict[tuple[str, str], Series]:
    """{(group, tag): {seed: [(step, value), ...]}}, steps in the order logged."""
    found: dict[tuple[str, str], Series] = defaultdict(lambda: defaultdict(list))
    with open(Path(folder) / "series.csv") as f:
        for row in csv.DictReader(f):
            found[row["group"], row["tag"]][int(row["seed"])].append((int(row["step"]), float(row["value"])))
    return found


def per_seed(folder: Path, figure: str) -> dict[str, dict[int, float]]:
    """{group: {seed: value}} of one column of runs.csv: what :func:`differences` pairs by seed."""
    found: dict[str, dict[int, float]] = defaultdict(dict)
    for row in runs(folder):
        found[row["group"]][int(row["seed"])] = float(row[figure]) if row[figure] not in ("", "None") else math.nan
    return dict(found)


def figure_of(folder: Path, figure: str) -> dict[str, list[float]]:
    """{group: [value per seed]} of one column of runs.csv; an empty cell (no value) reads as nan."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in runs(folder):
        found[row["group"]].append(float(row[figure]) if row[figure] not in ("", "None") else math.nan)
    return dict(found)


def best_arms(folder: Path, comparison: Comparison) -> dict[str, Arm]:
    """Each arm of ``comparison`` at the value of its tuned axis the runner chose for ``differences.md``,
    read back from the folder's runs.csv (the same rule, :func:`bn_lightning.compare.contrasts.arms`)."""
    def number(text: str) -> float:
        return float(text) if text not in ("", "None") else math.nan

    rows = {(row["group"], int(row["seed"])): row for row in runs(folder)}
    results = {}
    for run in comparison.runs():
        if (row := rows.get((run.group, run.seed))) is not None:
            diverged = row["diverged_at_step"]
            results[run] = {PRIMARY: number(row[PRIMARY]), TUNED: number(row[TUNED]),
                            "diverged_at_step": None if diverged in ("", "None") else int(float(diverged))}
    return arms(comparison, results)


def below_the_grid(probe: Path, comparison: Comparison, arm: str, chance: float = 0.2) -> Arm | None:
    """``arm`` at its best value of ``probe``, a comparison (``comparison``) run below the grid of the arm's own,
    or None unless some value there trained it: every seed without diverging, primary metric above ``chance``
    (docs/predictions.md's chance line)."""
    probe = Path(probe)
    if not (probe / "runs.csv").exists():
        return None
    rows = {(row["group"], int(row["seed"])): row for row in runs(probe)}
    trained: dict[object, list[bool]] = defaultdict(list)
    for run in comparison.runs():
        if run.arm(comparison.tune) == arm and (row := rows.get((run.group, run.seed))) is not None:
            trained[dict(run.grid).get(comparison.tune)].append(
                row["diverged_at_step"] in ("", "None") and float(row[PRIMARY]) > chance)
    if not any(all(seeds) for seeds in trained.values()):
        return None
    return best_arms(probe, comparison)[arm]


def trainability_differences(folder: Path, comparison: Comparison, probe: Path, probe_comparison: Comparison,
                             family: list[tuple[str, str]] | None = None,
                             chance: float = 0.2) -> tuple[dict[str, Arm], dict[str, Difference]]:
    """Each arm at its best value, and ``family`` (pairs of arms, Holm-adjusted together; by default the
    comparison's contrasts) between them: as ``differences.md``, except that an arm that trained at no value of
    the grid is taken at its best :func:`below_the_grid` (``probe``) when it trained there. An arm that trained
    nowhere has nothing to compare."""
    chosen = best_arms(folder, comparison)
    for name, arm in chosen.items():
        if not arm.trained and (below := below_the_grid(probe, probe_comparison, name, chance)) is not None:
            chosen[name] = below
    pairs = comparison.contrasts if family is None else family
    return chosen, arm_differences(chosen, pairs)


def evaluations(folder: Path, group: str) -> dict[str, dict[int, float]]:
    """Each evaluation a group's PreciseBN callback logged (``ema``: the running statistics, ``batch``, and each
    image count), scored per seed by the primary metric's rule: the mean of the last ``LAST_EPOCHS`` epochs."""
    found = {}
    for (name, tag), points in series(folder).items():
        if name == group and tag.startswith("precise_bn/val_acc_"):
            found[tag.removeprefix("precise_bn/val_acc_")] = {
                seed: sum(value for _, value in sorted(p)[-LAST_EPOCHS:]) / LAST_EPOCHS for seed, p in points.items()}
    return found


def precise_bn_differences(folder: Path, config: str, reference: str = "0.1") -> dict[str, Difference]:
    """results/precise_bn's family of comparisons for one schedule (``config``), paired by seed: at each momentum,
    precise statistics (all 55,000 images) - the running ones; the cumulative average - the ``reference`` momentum
    (both running); each validation batch's own statistics - precise ones (at the reference momentum)."""
    prefix = f"{config}-momentum="
    momenta = list(dict.fromkeys(row["group"].removeprefix(prefix) for row in runs(folder)
                                 if row["group"].startswith(prefix)))
    scored = {m: evaluations(folder, prefix + m) for m in momenta}
    pairs = {f"{'cumulative' if m == 'None' else f'momentum {m}'}: precise - running": (scored[m]["55000"], scored[m]["ema"])
             for m in momenta}
    pairs[f"running: cumulative - momentum {reference}"] = (scored["None"]["ema"], scored[reference]["ema"])
    pairs["each val batch's own - precise"] = (scored[reference]["batch"], scored[reference]["55000"])
    return differences(pairs)
