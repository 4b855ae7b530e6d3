"""Running the runs of a comparison: each one ``python -m bn_lightning fit`` process, on this machine
(``run_locally``) or as one Slurm job array (``run_on_slurm``, through submitit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import submitit
from tqdm import tqdm

from bn_lightning.compare.collect import RESULT_FILE, diverged_at, events_of, read_run
from bn_lightning.compare.spec import GENERIC, Comparison, Run

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
    # None (YAML's null, e.g. a momentum), which it would read as the string "None".
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
    if process.returncode != 0 and diverged_at(events_of(folder)) is None:  # a diverged run is a result, not a failure
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
