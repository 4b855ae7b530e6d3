"""Run a matrix of CLI configs over seeds (and optional extra axes), then tabulate and plot the runs.

    python -m bn_lightning.compare configs/compare/d2l.yaml [--workers 2] [--set data.data_dir=../shared/data]

A comparison file names the configs, the seeds, optional ``grid`` axes (a CLI option and its
values), ``args`` for every run and the val-accuracy ``threshold`` to report. Each run is one
``python -m bn_lightning fit`` process logging to ``<out>/<group>/seed_<s>/``, where ``out`` is
``lightning_logs/compare/<name>`` and a group is a config with its grid values. A run that finished
leaves ``result.json``; running the same comparison again skips those runs and starts the others
afresh, so a half-finished matrix resumes. The figures of every run are read from its TensorBoard
events (with TensorBoard's own reader) into ``<out>/runs.csv`` (one row per run), ``results.csv`` and
``results.md`` (mean and std over seeds per group), ``val_acc.png`` (validation accuracy, mean and
band over seeds, per group) and ``percentiles.png`` (15th/50th/85th percentiles of one sigmoid
input over training, per group: Ioffe & Szegedy's Figure 1).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

PERCENTILES = (15, 50, 85)
RESULT_FILE = "result.json"
FIGURES = ("final_val_acc", "test_acc", "best_val_acc", "step_to_threshold", "seconds_per_epoch", "bn_mean_gap")
GAP_LOGS = 5  # bn_mean_gap averages a run's last this many logs


@dataclass(frozen=True)
class Run:
    """One process of the matrix: a config, its grid values and a seed."""

    config: Path
    grid: tuple[tuple[str, object], ...]
    seed: int

    @property
    def group(self) -> str:
        """``lenet_bn_torch`` or ``lenet_bn_torch-lr=0.1``: the config and its grid values, as folder names read."""
        return "-".join([self.config.stem, *(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.grid)])

    def folder(self, out: Path) -> Path:
        return out / self.group / f"seed_{self.seed}"


@dataclass
class Comparison:
    """A comparison file, checked: see ``configs/compare/*.yaml``."""

    name: str
    configs: list[Path]
    seeds: list[int]
    grid: dict[str, list] = field(default_factory=dict)
    args: dict[str, object] = field(default_factory=dict)
    threshold: float = 0.8
    percentile_layer: str = "fc2"

    @classmethod
    def load(cls, path: Path, overrides: dict[str, object]) -> Comparison:
        spec = yaml.safe_load(path.read_text()) or {}
        known = {"configs", "seeds", "grid", "args", "threshold", "percentile_layer"}
        if unknown := set(spec) - known:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; a comparison takes {sorted(known)}")
        for key in ("configs", "seeds"):
            if not spec.get(key):
                raise ValueError(f"{path}: '{key}' must list at least one entry")
        configs = [(path.parent / config).resolve() for config in spec["configs"]]
        if missing := [str(c) for c in configs if not c.is_file()]:
            raise ValueError(f"{path}: config(s) not found: {missing} (paths are relative to {path.parent})")
        grid = spec.get("grid") or {}
        if empty := [key for key, values in grid.items() if not isinstance(values, list) or not values]:
            raise ValueError(f"{path}: grid axis/axes {empty} must each list at least one value")
        return cls(
            name=path.stem,
            configs=configs,
            seeds=[int(seed) for seed in spec["seeds"]],
            grid=grid,
            args={**(spec.get("args") or {}), **overrides},
            threshold=float(spec.get("threshold", cls.threshold)),
            percentile_layer=spec.get("percentile_layer", cls.percentile_layer),
        )

    def runs(self) -> list[Run]:
        """Every config x grid point x seed, seeds innermost so a group's seeds finish together."""
        points = [tuple(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]
        return [Run(config, point, seed) for config in self.configs for point in points for seed in self.seeds]


def fit_command(run: Run, comparison: Comparison, out: Path) -> list[str]:
    options = {
        **comparison.args,
        **dict(run.grid),
        "seed_everything": run.seed,
        "trainer.logger.init_args.save_dir": str(out),
        "trainer.logger.init_args.name": run.group,
        "trainer.logger.init_args.version": f"seed_{run.seed}",
        "trainer.enable_progress_bar": False,
    }
    return [sys.executable, "-m", "bn_lightning", "fit", "--config", str(run.config),
            *(f"--{key}={value}" for key, value in options.items())]


def execute(run: Run, comparison: Comparison, out: Path, threads: int) -> dict:
    """Fit one run from scratch in its own process; on success read its result and leave it in result.json."""
    folder = run.folder(out)
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left: events would overlap
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(folder / "fit.log", "w") as log:
        process = subprocess.run(fit_command(run, comparison, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    if process.returncode != 0:
        tail = (folder / "fit.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{run.group} seed {run.seed} failed (exit {process.returncode}); "
                           f"{folder / 'fit.log'} ends with:\n" + "\n".join(tail))
    result = read_run(folder, comparison)
    (folder / RESULT_FILE).write_text(json.dumps(result) + "\n")
    return result


def read_run(folder: Path, comparison: Comparison) -> dict:
    """The figures of one finished run, from its TensorBoard event file."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []

    val = series("val/acc")
    if not val:
        raise RuntimeError(f"{folder}: no val/acc in the events; did validation run?")
    test = series("test/acc")
    epoch_ends = [e.wall_time for e in events.Scalars("train/acc_epoch")]
    starts = [events.FirstEventTimestamp(), *epoch_ends[:-1]]
    reached = [step for step, value in val if value >= comparison.threshold]
    gaps = [series(tag)[-GAP_LOGS:] for tag in events.Tags()["scalars"] if tag.startswith("bn/") and tag.endswith("/mean_gap")]
    layer = comparison.percentile_layer
    return {
        "final_val_acc": val[-1][1],
        "test_acc": test[-1][1] if test else math.nan,
        "best_val_acc": max(value for _, value in val),
        "step_to_threshold": reached[0] if reached else None,
        "seconds_per_epoch": statistics.median(end - start for start, end in zip(starts, epoch_ends)),
        # How far batch means sit from the running means evaluation uses: noise that grows as batches shrink.
        "bn_mean_gap": statistics.fmean(value for gap in gaps for _, value in gap) if gaps else math.nan,
        "val_acc": val,
        "percentiles": {f"p{p}": series(f"act/{layer}/unit/p{p}") for p in PERCENTILES},
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def by_group(comparison: Comparison, results: dict[Run, dict]) -> dict[str, list[dict]]:
    """The results of each group's finished seeds, groups and seeds in the matrix's order."""
    groups: dict[str, list[dict]] = {}
    for run in comparison.runs():
        if run in results:
            groups.setdefault(run.group, []).append(results[run])
    return groups


def summarize(comparison: Comparison, results: dict[Run, dict]) -> list[dict]:
    """Per group: mean and std over its seeds of every figure, and how many seeds reached the threshold."""
    rows = []
    for group, runs in by_group(comparison, results).items():
        row = {"group": group, "seeds": len(runs)}
        for figure in FIGURES:
            row[f"{figure}_mean"], row[f"{figure}_std"] = mean_std([r[figure] for r in runs])
        row["reached_threshold"] = sum(r["step_to_threshold"] is not None for r in runs)
        rows.append(row)
    return rows


def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def markdown(comparison: Comparison, rows: list[dict]) -> str:
    threshold = f"step to val acc ≥ {comparison.threshold:g}"
    lines = [
        f"| run | seeds | final val acc | test acc | best val acc | {threshold} | s/epoch | BN \\|batch - running mean\\| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reached = _pm(row["step_to_threshold_mean"], row["step_to_threshold_std"], 0)
        if row["reached_threshold"] < row["seeds"]:
            reached += f" ({row['reached_threshold']}/{row['seeds']} seeds)"
        lines.append(
            f"| {row['group']} | {row['seeds']} | {_pm(row['final_val_acc_mean'], row['final_val_acc_std'], 4)} "
            f"| {_pm(row['test_acc_mean'], row['test_acc_std'], 4)} | {_pm(row['best_val_acc_mean'], row['best_val_acc_std'], 4)} "
            f"| {reached} | {_pm(row['seconds_per_epoch_mean'], row['seconds_per_epoch_std'], 2)} "
            f"| {_pm(row['bn_mean_gap_mean'], row['bn_mean_gap_std'], 3)} |"
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
    return rows


def val_acc_figure(comparison: Comparison, groups: dict[str, list[dict]]) -> Figure:
    """Validation accuracy over training per group: the mean over seeds and their min-max band."""
    figure = Figure(figsize=(8, 5), layout="tight")
    axes = figure.subplots()
    for group, runs in groups.items():
        steps = [step for step, _ in runs[0]["val_acc"]]
        curves = [[value for _, value in run["val_acc"]] for run in runs if len(run["val_acc"]) == len(steps)]
        means = [statistics.fmean(column) for column in zip(*curves)]
        line, = axes.plot(steps, means, marker=".", label=f"{group} ({len(curves)} seeds)")
        if len(curves) > 1:
            axes.fill_between(steps, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                              color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set(xlabel="training step", ylabel="validation accuracy",
             title=f"{comparison.name}: validation accuracy, mean and min-max over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
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


def compare(comparison: Comparison, out: Path, workers: int = 1) -> tuple[list[dict], list[str]]:
    """Run what is not finished yet, then write the tables and plots; returns the summary rows and the failures."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[Run, dict] = {}
    todo = []
    for run in comparison.runs():
        if (run.folder(out) / RESULT_FILE).exists():  # finished: its figures are read afresh from its events
            results[run] = read_run(run.folder(out), comparison)
        else:
            todo.append(run)
    threads = max(1, (os.cpu_count() or 1) // workers)
    failures = []
    with tqdm(total=len(comparison.runs()), initial=len(results), desc=comparison.name, unit="run") as progress:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(execute, run, comparison, out, threads): run for run in todo}
            for future in as_completed(futures):
                run = futures[future]
                try:
                    results[run] = future.result()
                except RuntimeError as error:
                    failures.append(str(error))
                    progress.write(str(error), file=sys.stderr)
                progress.set_postfix_str(f"{run.group} seed {run.seed}")
                progress.update()
    if not results:
        return [], failures
    rows = write_tables(comparison, results, out)
    write_plots(comparison, results, out)
    return rows, failures


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (a CLI option without its dashes), got {pair!r}")
        overrides[key.lstrip("-")] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_lightning.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison", type=Path, help="a comparison file, e.g. configs/compare/d2l.yaml")
    parser.add_argument("--workers", type=int, default=1, help="runs at the same time, each in its own process")
    parser.add_argument("--out", type=Path, help="where the runs and results go (default lightning_logs/compare/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a CLI option for every run, e.g. data.data_dir=../shared/data (repeatable)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        comparison = Comparison.load(args.comparison, parse_overrides(args.overrides))
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(str(error))
    out = args.out or Path("lightning_logs") / "compare" / comparison.name
    rows, failures = compare(comparison, out, args.workers)
    if rows:
        print(markdown(comparison, rows))
        print(f"written to {out}: runs.csv, results.csv, results.md, val_acc.png, percentiles.png")
    if failures:
        print(f"{len(failures)} run(s) failed; run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
