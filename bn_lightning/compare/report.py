"""What a comparison reports: mean ± std over seeds (one format everywhere), the tables and the plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure

from bn_lightning.compare import contrasts
from bn_lightning.compare.collect import FIGURES, PERCENTILES, by_group, summarize
from bn_lightning.compare.spec import Comparison, Run
from bn_lightning.compare.stats import Series, mean_curve, pm_text

# The tables' columns: figure, heading, digits. Accuracies are fractions, shown with 4 digits.
COLUMNS = (
    ("val_acc_last3", "val acc, mean of last 3 epochs (primary)", 4),
    ("final_val_acc", "final val acc", 4),
    ("precise_val_acc", "final val acc, precise BN", 4),
    ("test_acc", "test acc (best val epoch)", 4),
    ("best_val_acc", "best val acc", 4),
)


def markdown(comparison: Comparison, rows: list[dict]) -> str:
    threshold = f"step to val acc ≥ {comparison.threshold:g}"
    headings = [heading for _, heading, _ in COLUMNS]
    lines = [
        f"| run | seeds | {' | '.join(headings)} | {threshold} | s/epoch | BN \\|batch - running mean\\| | diverged |",
        "|---|---|" + "---|" * (len(COLUMNS) + 4),
    ]
    for row in rows:
        reached = pm_text(row["step_to_threshold_mean"], row["step_to_threshold_std"], 0)
        if row["reached_threshold"] < row["seeds"]:
            reached += f" ({row['reached_threshold']}/{row['seeds']} seeds)"
        accuracies = " | ".join(pm_text(row[f"{figure}_mean"], row[f"{figure}_std"], digits) for figure, _, digits in COLUMNS)
        lines.append(
            f"| {row['group']} | {row['seeds']} | {accuracies} | {reached} "
            f"| {pm_text(row['seconds_per_epoch_mean'], row['seconds_per_epoch_std'], 2)} "
            f"| {pm_text(row['bn_mean_gap_mean'], row['bn_mean_gap_std'], 3)} | {row['diverged']}/{row['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(comparison: Comparison, results: dict[Run, dict], out: Path) -> list[dict]:
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "seed", *FIGURES])
        for run in comparison.runs():
            if run in results:
                writer.writerow([run.group, run.seed, *(results[run][figure] for figure in FIGURES)])
    rows = summarize(comparison, results)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown(comparison, rows))
    if (measured := contrasts.markdown(comparison, results)) is not None:
        (out / "differences.md").write_text(measured)
    if comparison.series:
        with open(out / "series.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group", "seed", "tag", "step", "value"])
            for run in comparison.runs():
                for tag, points in results.get(run, {}).get("series", {}).items():
                    writer.writerows([run.group, run.seed, tag, step, value] for step, value in points)
    return rows


# Line styles in turn, so that two groups whose curves coincide (our BN and torch's) both show.
STYLES = [{"linestyle": "-", "marker": "o"}, {"linestyle": "--", "marker": "s"}, {"linestyle": ":", "marker": "^"},
          {"linestyle": "-.", "marker": "D"}]


def plot_band(axes, per_seed: Series, label: str, **style) -> None:
    """The mean over seeds as a line, the seeds' min-max as a band around it."""
    steps, mean, low, high = mean_curve(per_seed)
    line, = axes.plot(steps, mean, label=label, **style)
    axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def val_acc_figure(comparison: Comparison, groups: dict[str, list[dict]]) -> Figure:
    """Validation accuracy over training per group: the mean over seeds and their min-max band."""
    figure = Figure(figsize=(10, 5), layout="tight")
    axes = figure.subplots()
    for index, (group, runs) in enumerate(groups.items()):
        longest = max(len(run["val_acc"]) for run in runs)
        # The seeds that validated every epoch (a diverged run stops early).
        complete = {seed: run["val_acc"] for seed, run in enumerate(runs) if len(run["val_acc"]) == longest}
        if longest:
            plot_band(axes, complete, f"{group} ({len(complete)} seeds)", markersize=4, **STYLES[index % len(STYLES)])
    axes.set(xlabel="training step", ylabel="validation accuracy",
             title=f"{comparison.name}: validation accuracy, mean and min-max over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # off the data
    return figure


def percentiles_figure(comparison: Comparison, groups: dict[str, list[dict]]) -> Figure | None:
    """Per group, the first seed's 15th/50th/85th percentiles of one sigmoid input over training
    (Ioffe & Szegedy's Figure 1); None when no run logged them."""
    with_bands = {group: runs[0]["percentiles"] for group, runs in groups.items() if runs[0]["percentiles"]["p50"]}
    if not with_bands:
        return None
    columns = min(3, len(with_bands))
    rows = math.ceil(len(with_bands) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="tight")
    grid = figure.subplots(rows, columns, sharey=True, squeeze=False)
    for axes, (group, bands) in zip(grid.flat, with_bands.items()):
        steps = [step for step, _ in bands["p50"]]
        low, mid, high = ([value for _, value in bands[f"p{p}"]] for p in PERCENTILES)
        axes.fill_between(steps, low, high, alpha=0.3, linewidth=0, label="15th-85th percentile")
        axes.plot(steps, mid, label="median")
        axes.set(title=group, xlabel="training step")
        axes.grid(alpha=0.3)
    for axes in grid.flat[len(with_bands):]:
        axes.set_visible(False)
    grid[0, 0].set_ylabel(f"input of one {comparison.percentile_layer} sigmoid")
    grid[0, 0].legend(fontsize="small")
    figure.suptitle(f"{comparison.name}: one sigmoid input over training (first seed), as in Ioffe & Szegedy's Figure 1")
    return figure


def write_plots(comparison: Comparison, results: dict[Run, dict], out: Path) -> None:
    groups = by_group(comparison, results)
    val_acc_figure(comparison, groups).savefig(out / "val_acc.png", dpi=120)
    if (bands := percentiles_figure(comparison, groups)) is not None:
        bands.savefig(out / "percentiles.png", dpi=120)
