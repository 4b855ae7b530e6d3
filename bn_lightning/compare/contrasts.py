"""The differences a comparison was run to measure (its file's ``contrasts``), each with its interval and
verdict from :mod:`bn_lightning.compare.stats`, written to ``differences.md`` beside its tables.

Without ``tune`` each arm is a group and the difference is in the primary metric. With ``tune`` (a grid
axis, the learning rate for instance) an arm is tried at every value of that axis; it is taken at its best
value by the mean primary metric over seeds (a value at which a seed diverged is not eligible), and arms are
compared on their test accuracy there, since the validation set chose the value.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bn_lightning.compare.collect import PRIMARY
from bn_lightning.compare.spec import Comparison, Run
from bn_lightning.compare.stats import Difference, differences, differences_table, mean_std, pm_text

TUNED = "test_acc"  # what arms taken at their best value of the tuned axis are compared on


@dataclass
class Arm:
    name: str
    value: object  # the chosen value of the tuned axis (None without tune)
    edge: bool  # the chosen value is the first or last of the axis's values that ran: the best may lie beyond
    primary: dict[int, float]  # per seed, at the chosen value
    compared: dict[int, float]  # per seed: what the contrasts compare
    trained: bool = True  # some value trained every seed without diverging; if not, ``value`` is only the first tried

    @property
    def comparable(self) -> dict[int, float]:
        """What the contrasts compare: nothing for an arm that trained at no value."""
        return self.compared if self.trained else {}


def arms(comparison: Comparison, results: dict[Run, dict]) -> dict[str, Arm]:
    """Every arm of the comparison that has finished runs, at its chosen value of the tuned axis."""
    tried: dict[str, dict[object, dict[int, dict]]] = {}
    for run in comparison.runs():
        if run in results:
            value = dict(run.grid).get(comparison.tune)
            tried.setdefault(run.arm(comparison.tune), {}).setdefault(value, {})[run.seed] = results[run]
    axis = comparison.grid.get(comparison.tune, [None]) if comparison.tune else [None]
    found = {}
    for name, by_value in tried.items():
        def score(value):
            runs = by_value[value].values()
            if any(run["diverged_at_step"] is not None for run in runs):
                return -math.inf
            return statistics.fmean(run[PRIMARY] for run in runs)
        value = max(by_value, key=score)
        seeds = by_value[value]
        figure = TUNED if comparison.tune else PRIMARY
        ran = [v for v in axis if v in by_value]  # the edge of what ran: a grid being extended has no results beyond
        found[name] = Arm(name, value, comparison.tune is not None and value in (ran[0], ran[-1]),
                          {seed: run[PRIMARY] for seed, run in seeds.items()},
                          {seed: run[figure] for seed, run in seeds.items()}, score(value) > -math.inf)
    return found


def arm_differences(chosen: dict[str, Arm], pairs: list[tuple[str, str]]) -> dict[str, Difference]:
    """``pairs`` of arms (names of ``chosen``), each at its chosen value, as one family (Holm within it)."""
    return differences({f"{a} - {b}": (chosen[a].comparable, chosen[b].comparable) for a, b in pairs})


def markdown(comparison: Comparison, results: dict[Run, dict]) -> str | None:
    """``differences.md``: the chosen values (with ``tune``) and the contrasts' table; None without contrasts."""
    if not comparison.contrasts:
        return None
    found = arms(comparison, results)
    measured = arm_differences(found, [(a, b) for a, b in comparison.contrasts if a in found and b in found])
    tested = sum(not math.isnan(d.p_holm) for d in measured.values())  # Holm counts the differences it could test
    figure = "test accuracy at each arm's best " + comparison.tune.rsplit(".", 1)[-1] if comparison.tune else \
        "the primary metric (validation accuracy, mean of the last 3 epochs)"
    lines = [f"Differences in {figure}, in accuracy points; paired t by seed where both arms ran the same seeds, "
             f"Welch's t otherwise; Holm-adjusted over the {tested} comparison(s) of this file with numbers on both "
             "sides. "
             "`differs`: the adjusted 95% interval excludes 0; `equivalent`: the 90% interval lies within ±0.5 "
             "points; otherwise `unresolved`.", ""]
    if comparison.tune:
        axis = comparison.tune.rsplit(".", 1)[-1]
        lines += [f"| arm | best {axis} | val acc, last 3 epochs, at it | test acc at it |", "|---|---|---|---|"]
        for arm in found.values():
            if not arm.trained:
                lines.append(f"| {arm.name} | none: a seed diverged at every value | - | - |")
                continue
            lines.append(f"| {arm.name} | {arm.value}{' (edge of the grid)' if arm.edge else ''} "
                         f"| {pm_text(*mean_std(list(arm.primary.values())), 4)} "
                         f"| {pm_text(*mean_std(list(arm.compared.values())), 4)} |")
        lines.append("")
    lines.append(differences_table(measured).rstrip())
    return "\n".join(lines) + "\n"
