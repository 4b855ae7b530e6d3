"""``python -m bn_lightning.compare``: run a matrix of CLI configs over seeds (and optional extra axes),
then tabulate and plot the runs.

    python -m bn_lightning.compare configs/compare/d2l.yaml [--workers 2] [--set data.data_dir=DIR]
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
import shutil
import sys
from functools import partial
from pathlib import Path

import yaml
from tqdm import tqdm

from bn_lightning.compare.collect import RESULT_FILE, read_run
from bn_lightning.compare.launch import Launcher, run_locally, run_on_slurm, slurm_executor, slurm_parameters
from bn_lightning.compare.report import markdown, write_plots, write_tables
from bn_lightning.compare.spec import SLURM, Comparison, Run, parse_overrides


def run_comparison(comparison: Comparison, out: Path, launch: Launcher) -> tuple[list[dict], list[str]]:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bn_lightning.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison", type=Path, help="a comparison file, e.g. configs/compare/d2l.yaml")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: runs on this machine (default); slurm: one job array on a Slurm cluster")
    parser.add_argument("--workers", type=int, default=1, help="runs at the same time, each in its own process (local)")
    parser.add_argument("--out", type=Path, help="where the runs and results go (default lightning_logs/compare/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a CLI option for every run, e.g. data.data_dir=DIR (repeatable)")
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
    rows, failures = run_comparison(comparison, out, launch)
    if rows:
        print(markdown(comparison, rows))
        print(f"written to {out}: runs.csv, results.csv, results.md, val_acc.png, percentiles.png")
    if failures:
        print(f"{len(failures)} run(s) failed; run the same command again to retry them.", file=sys.stderr)
        return 1
    return 0
