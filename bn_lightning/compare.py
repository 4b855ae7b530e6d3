"""Run a matrix of CLI configs over seeds (and optional extra axes), then tabulate and plot the runs.

    python -m bn_lightning.compare configs/compare/d2l.yaml [--workers 2] [--set data.data_dir=../shared/data]
    python -m bn_lightning.compare configs/compare/d2l.yaml --launcher slurm [--partition gpu --gpus-per-node 1]

A comparison file names the configs, the seeds, optional ``grid`` axes (a CLI option and its
values; or options joined by commas and a list of values for each, which change together, e.g.
``data.batch_size,model.optimizer.init_args.lr: [[16, 0.0625], [256, 1.0]]``), ``args`` for every run, the val-accuracy ``threshold`` to report, optional ``series`` (tag
patterns, e.g. ``ics/*``, whose every logged value goes into ``series.csv``) and optional ``slurm``
settings. Each run is one ``python -m bn_lightning fit`` process logging to ``<out>/<group>/seed_<s>/``,
where ``out`` is ``lightning_logs/compare/<name>`` and a group is a config with its grid values.
``--launcher local`` (the default) runs them on this machine, ``--workers`` at a time; ``--launcher
slurm`` submits them as one submitit job array (the file's ``slurm:`` settings, then the flags), its
logs under ``<out>/submitit/``, and waits for it. A run that finished leaves ``result.json``; running
the same comparison again skips those runs and starts the others afresh, so a half-finished matrix
resumes. The figures of every run are read from its TensorBoard events (with TensorBoard's own reader)
into ``<out>/runs.csv`` (one row per run), ``results.csv`` and ``results.md`` (mean and std over seeds
per group), ``val_acc.png`` (validation accuracy, mean and band over seeds, per group) and
``percentiles.png`` (15th/50th/85th percentiles of one sigmoid input over training, per group: Ioffe &
Szegedy's Figure 1).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import submitit
import yaml
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

from bn_lightning.results import mean_std

PERCENTILES = (15, 50, 85)
RESULT_FILE = "result.json"
FIGURES = ("final_val_acc", "test_acc", "best_val_acc", "step_to_threshold", "seconds_per_epoch", "bn_mean_gap",
           "diverged_at_step")
DIVERGED = re.compile(r"training diverged at step (\d+)")  # Classifier's NonFiniteLossError
GAP_LOGS = 5  # bn_mean_gap averages a run's last this many logs
# The settings of a Slurm job (a comparison file's ``slurm:`` keys, and flags): submitit's names, each with its
# type, default and help. ``extra`` (file only) adds any other of submitit's slurm_* parameters, e.g. account.
SLURM = {
    "partition": (str, None, "Slurm partition (default: the cluster's)"),
    "timeout_min": (int, 60, "time limit of each run, in minutes"),
    "cpus_per_task": (int, 2, "CPU cores of each run (its torch threads)"),
    "gpus_per_node": (int, 0, "GPUs of each run"),
    "mem_gb": (float, None, "memory of each run, in GB (default: the cluster's)"),
    "array_parallelism": (int, None, "most runs at once (default: submitit's 256)"),
}
GENERIC = {"timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb"}  # submitit's names on every cluster


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
    series: list[str] = field(default_factory=list)
    slurm: dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, overrides: dict[str, object]) -> Comparison:
        spec = yaml.safe_load(path.read_text()) or {}
        known = {"configs", "seeds", "grid", "args", "threshold", "percentile_layer", "series", "slurm"}
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
        for key, values in grid.items():
            width = len(key.split(","))
            if width > 1 and any(not isinstance(v, list) or len(v) != width for v in values):
                raise ValueError(f"{path}: grid axis {key!r} sets {width} options together: each of its values must "
                                 f"list {width} values, one per option, got {values}")
        return cls(
            name=path.stem,
            configs=configs,
            seeds=[int(seed) for seed in spec["seeds"]],
            grid=grid,
            args={**(spec.get("args") or {}), **overrides},
            threshold=float(spec.get("threshold", cls.threshold)),
            percentile_layer=spec.get("percentile_layer", cls.percentile_layer),
            series=[str(pattern) for pattern in spec.get("series") or []],
            slurm=slurm_block(path, spec.get("slurm") or {}),
        )

    def runs(self) -> list[Run]:
        """Every config x grid point x seed, seeds innermost so a group's seeds finish together."""
        axes = [[tuple(zip(key.split(","), value if "," in key else [value])) for value in values]
                for key, values in self.grid.items()]
        points = [tuple(pair for part in combination for pair in part) for combination in itertools.product(*axes)]
        return [Run(config, point, seed) for config in self.configs for point in points for seed in self.seeds]


def slurm_block(path: Path, block: object) -> dict[str, object]:
    """A comparison file's ``slurm:`` settings, checked and typed now rather than when the jobs are submitted."""
    known = {*SLURM, "extra"}
    if not isinstance(block, dict):
        raise ValueError(f"{path}: slurm must map some of {sorted(known)} to values")
    if unknown := set(block) - known:
        raise ValueError(f"{path}: unknown slurm key(s) {sorted(unknown)}; slurm takes {sorted(known)}")
    settings = {}
    for key, value in block.items():
        kind = dict if key == "extra" else SLURM[key][0]
        try:
            if value is not None:  # left unset: the flag or the default decides
                settings[key] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: slurm.{key} must be {kind.__name__}, got {value!r}") from None
    return settings


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
    # A list or mapping (callbacks to add: "trainer.callbacks+") goes as JSON, which jsonargparse reads; so does
    # None (YAML's null, e.g. bn_momentum), which it would read as the string "None".
    return [sys.executable, "-m", "bn_lightning", "fit", "--config", str(run.config),
            *(f"--{key}={json.dumps(value) if value is None or isinstance(value, (list, dict)) else value}"
              for key, value in options.items())]


def execute(run: Run, comparison: Comparison, out: Path, threads: int) -> dict:
    """Fit one run from scratch in its own process; on success read its result and leave it in result.json.
    A run that finished already (a Slurm job requeued after its end) is read, not redone."""
    folder = run.folder(out)
    if (folder / RESULT_FILE).exists():
        return read_run(folder, comparison)
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left: events would overlap
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(folder / "fit.log", "w") as log:
        process = subprocess.run(fit_command(run, comparison, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    if process.returncode != 0 and diverged_at(folder) is None:  # a diverged run is a result, not a failure
        raise RuntimeError(failure(run, out, f"exit {process.returncode}"))
    result = read_run(folder, comparison)
    (folder / RESULT_FILE).write_text(json.dumps(result) + "\n")
    return result


def failure(run: Run, out: Path, why: str) -> str:
    """How a failed run is reported, whichever launcher ran it: why, and the end of its fit.log."""
    log = run.folder(out) / "fit.log"
    if not log.exists():
        return f"{run.group} seed {run.seed} failed ({why}) before writing {log}"
    tail = log.read_text().splitlines()[-15:]
    return f"{run.group} seed {run.seed} failed ({why}); {log} ends with:\n" + "\n".join(tail)


def diverged_at(folder: Path) -> int | None:
    """The step at which the run's training diverged (its loss or weights not finite), or None."""
    log = folder / "fit.log"
    found = DIVERGED.search(log.read_text(errors="replace")) if log.exists() else None
    return int(found.group(1)) if found else None


def read_run(folder: Path, comparison: Comparison) -> dict:
    """The figures of one finished run, from its TensorBoard event file. A run that diverged has no final
    or test accuracy (its weights are not finite), only the epochs it validated before."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []

    diverged = diverged_at(folder)
    val = series("val/acc")
    if not val and diverged is None:
        raise RuntimeError(f"{folder}: no val/acc in the events; did validation run?")
    test = series("test/acc")
    epoch_ends = [e.wall_time for e in series_events(events, "train/acc_epoch")]
    starts = [events.FirstEventTimestamp(), *epoch_ends[:-1]]
    reached = [step for step, value in val if value >= comparison.threshold]
    gaps = [series(tag)[-GAP_LOGS:] for tag in events.Tags()["scalars"] if tag.startswith("bn/") and tag.endswith("/mean_gap")]
    layer = comparison.percentile_layer
    return {
        "final_val_acc": val[-1][1] if diverged is None else math.nan,
        "test_acc": test[-1][1] if test and diverged is None else math.nan,
        "best_val_acc": max((value for _, value in val), default=math.nan),
        "step_to_threshold": reached[0] if reached else None,
        "seconds_per_epoch": statistics.median(end - start for start, end in zip(starts, epoch_ends)) if epoch_ends else math.nan,
        # How far batch means sit from the running means evaluation uses: noise that grows as batches shrink.
        "bn_mean_gap": statistics.fmean(value for gap in gaps for _, value in gap) if gaps else math.nan,
        "val_acc": val,
        "percentiles": {f"p{p}": series(f"act/{layer}/unit/p{p}") for p in PERCENTILES},
        "series": {tag: series(tag) for tag in sorted(events.Tags()["scalars"])
                   if any(fnmatch.fnmatchcase(tag, pattern) for pattern in comparison.series)},
        "diverged_at_step": diverged,
    }


def series_events(events: EventAccumulator, tag: str) -> list:
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


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
        row["diverged"] = sum(r["diverged_at_step"] is not None for r in runs)
        rows.append(row)
    return rows


def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def markdown(comparison: Comparison, rows: list[dict]) -> str:
    threshold = f"step to val acc ≥ {comparison.threshold:g}"
    lines = [
        f"| run | seeds | final val acc | test acc | best val acc | {threshold} | s/epoch | BN \\|batch - running mean\\| "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reached = _pm(row["step_to_threshold_mean"], row["step_to_threshold_std"], 0)
        if row["reached_threshold"] < row["seeds"]:
            reached += f" ({row['reached_threshold']}/{row['seeds']} seeds)"
        lines.append(
            f"| {row['group']} | {row['seeds']} | {_pm(row['final_val_acc_mean'], row['final_val_acc_std'], 4)} "
            f"| {_pm(row['test_acc_mean'], row['test_acc_std'], 4)} | {_pm(row['best_val_acc_mean'], row['best_val_acc_std'], 4)} "
            f"| {reached} | {_pm(row['seconds_per_epoch_mean'], row['seconds_per_epoch_std'], 2)} "
            f"| {_pm(row['bn_mean_gap_mean'], row['bn_mean_gap_std'], 3)} | {row['diverged']}/{row['seeds']} |"
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
    if comparison.series:
        with open(out / "series.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["group", "seed", "tag", "step", "value"])
            for run in comparison.runs():
                for tag, points in results.get(run, {}).get("series", {}).items():
                    writer.writerows([run.group, run.seed, tag, step, value] for step, value in points)
    return rows


def val_acc_figure(comparison: Comparison, groups: dict[str, list[dict]]) -> Figure:
    """Validation accuracy over training per group: the mean over seeds and their min-max band."""
    figure = Figure(figsize=(8, 5), layout="tight")
    axes = figure.subplots()
    for group, runs in groups.items():
        steps = [step for step, _ in max((run["val_acc"] for run in runs), key=len)]
        # The seeds that validated every epoch (a diverged run stops early).
        curves = [[value for _, value in run["val_acc"]] for run in runs if len(run["val_acc"]) == len(steps)]
        if not steps:
            continue
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


# Runs the runs it is given and yields each with its result, or with why it failed, as they end.
Launcher = Callable[[list[Run], Comparison, Path], Iterator[tuple[Run, dict | str]]]


def run_locally(todo: list[Run], comparison: Comparison, out: Path, workers: int) -> Iterator[tuple[Run, dict | str]]:
    """``--launcher local``: each run a process of its own, ``workers`` at a time, sharing this machine's cores."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(execute, run, comparison, out, threads): run for run in todo}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except RuntimeError as error:
                outcome = str(error)
            yield futures[future], outcome


def slurm_parameters(settings: dict[str, object], name: str) -> dict[str, object]:
    """What ``update_parameters`` takes: submitit's generic names, ``slurm_`` before the Slurm-only ones."""
    slurm_only = {key: value for key, value in settings.items() if key not in GENERIC and key != "extra"}
    return {"name": name, **{key: settings[key] for key in GENERIC},
            **{f"slurm_{key}": value for key, value in {**slurm_only, **settings["extra"]}.items()}}


def slurm_executor(out: Path, parameters: dict[str, object], cluster: str = "slurm") -> submitit.AutoExecutor:
    """submitit's executor for the job array, its logs in ``<out>/submitit/<job id>/``.

    ``cluster`` is "slurm" for ``--launcher slurm``. The tests pass submitit's "local" (every job a process
    here, all at once, ``slurm_*`` parameters ignored) to run this path without a cluster; it is no launcher of
    its own, since ``--launcher local`` runs the same processes here with a cap on how many at once."""
    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(**parameters)
    return executor


def run_on_slurm(todo: list[Run], comparison: Comparison, out: Path, executor: submitit.AutoExecutor,
                 threads: int) -> Iterator[tuple[Run, dict | str]]:
    """``--launcher slurm``: every run one job of a job array, running ``execute`` as a local worker does."""
    if not todo:
        return
    jobs = executor.map_array(execute, todo, [comparison] * len(todo), [out] * len(todo), [threads] * len(todo))
    tqdm.write(f"submitted {len(jobs)} job(s), {jobs[0].job_id} to {jobs[-1].job_id}; their logs in {out / 'submitit'}",
               file=sys.stderr)
    runs = {job.job_id: run for job, run in zip(jobs, todo)}
    for job in submitit.helpers.as_completed(jobs):
        run = runs[job.job_id]
        try:
            outcome = job.result()
        except RuntimeError:  # submitit's FailedJobError, or UncompletedJobError for a job killed (time, memory)
            logs = f"its logs: {job.paths.stdout}, {job.paths.stderr}"
            outcome = failure(run, out, f"job {job.job_id}, {job.state}; {logs}")
        yield run, outcome


def compare(comparison: Comparison, out: Path, launch: Launcher) -> tuple[list[dict], list[str]]:
    """Run what is not finished yet with ``launch``, then write the tables and plots of what finished;
    returns the summary rows and the failures."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict[Run, dict] = {}
    todo = []
    for run in comparison.runs():
        if (run.folder(out) / RESULT_FILE).exists():  # finished: its figures are read afresh from its events
            results[run] = read_run(run.folder(out), comparison)
        else:
            todo.append(run)
    failures = []
    with tqdm(total=len(comparison.runs()), initial=len(results), desc=comparison.name, unit="run") as progress:
        for run, outcome in launch(todo, comparison, out):
            if isinstance(outcome, str):
                failures.append(outcome)
                progress.write(outcome, file=sys.stderr)
            else:
                results[run] = outcome
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bn_lightning.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison", type=Path, help="a comparison file, e.g. configs/compare/d2l.yaml")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: runs on this machine (default); slurm: one job array on a Slurm cluster")
    parser.add_argument("--workers", type=int, default=1, help="runs at the same time, each in its own process (local)")
    parser.add_argument("--out", type=Path, help="where the runs and results go (default lightning_logs/compare/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a CLI option for every run, e.g. data.data_dir=../shared/data (repeatable)")
    slurm = parser.add_argument_group("--launcher slurm", "each overrides the comparison file's slurm: key of its name")
    for key, (kind, default, what) in SLURM.items():
        slurm.add_argument(f"--{key.replace('_', '-')}", type=kind,
                           help=what if default is None else f"{what} (default {default})")
    return parser


def slurm_settings(comparison: Comparison, args: argparse.Namespace) -> dict[str, object]:
    """Each Slurm setting from its flag, else from the comparison file's ``slurm:`` block, else its default."""
    defaults = {key: default for key, (_, default, _) in SLURM.items()}
    flags = {key: getattr(args, key) for key in SLURM if getattr(args, key) is not None}
    return {**defaults, "extra": {}, **comparison.slurm, **flags}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        parser.error("Slurm was not found (no sbatch or srun on PATH): "
                     "run on a Slurm login node, or use --launcher local")
    try:
        comparison = Comparison.load(args.comparison, parse_overrides(args.overrides))
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.error(str(error))
    out = args.out or Path("lightning_logs") / "compare" / comparison.name
    if args.launcher == "slurm":
        settings = slurm_settings(comparison, args)
        try:  # submitit checks the parameters' names and values here, before anything is submitted
            executor = slurm_executor(out, slurm_parameters(settings, comparison.name))
        except (NameError, ValueError) as error:
            parser.error(f"{args.comparison}: slurm settings: {error}")
        launch = partial(run_on_slurm, executor=executor, threads=settings["cpus_per_task"])
    else:
        launch = partial(run_locally, workers=args.workers)
    rows, failures = compare(comparison, out, launch)
    if rows:
        print(markdown(comparison, rows))
        print(f"written to {out}: runs.csv, results.csv, results.md, val_acc.png, percentiles.png")
    if failures:
        print(f"{len(failures)} run(s) failed; run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Through the importable module, so that the jobs unpickle bn_lightning.compare's execute and Run,
    # not those of a __main__ their processes do not have.
    from bn_lightning.compare import main as importable_main

    sys.exit(importable_main())
