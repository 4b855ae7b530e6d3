"""The figures of a finished run, read from its TensorBoard events with TensorBoard's own reader, and their
summary per group over seeds."""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bn_lightning.compare.stats import mean_std
from bn_lightning.compare.spec import Comparison, Run
from bn_lightning.training.tags import DIVERGED_TAG, PERCENTILES

RESULT_FILE = "result.json"
# The primary metric comes first: fixed before any run, it is what the tables rank by and the statistics compare.
PRIMARY = "val_acc_last3"
FIGURES = (PRIMARY, "final_val_acc", "precise_val_acc", "test_acc", "best_val_acc", "step_to_threshold",
           "seconds_per_epoch", "bn_mean_gap", "layers_mostly_off", "diverged_at_step")
LAST_EPOCHS = 3  # the primary metric averages the validation accuracy of a run's last this many epochs
GAP_LOGS = 5  # bn_mean_gap averages a run's last this many logs
PRECISE_TAG = re.compile(r"precise_bn/val_acc_(\d+)")


def events_of(folder: Path) -> EventAccumulator:
    """Every scalar event of a run folder, loaded."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalars_of(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``tag``, none when it was never logged."""
    return [(e.step, e.value) for e in series_events(events, tag)]


def diverged_at(events: EventAccumulator) -> int | None:
    """The step at which the run's training diverged (its loss or weights not finite), or None."""
    logged = scalars_of(events, DIVERGED_TAG)
    return int(logged[-1][1]) if logged else None


def read_run(folder: Path, comparison: Comparison) -> dict:
    """The figures of one finished run, from its TensorBoard event file. A run that diverged has no final
    or test accuracy (its weights are not finite), only the epochs it validated before."""
    events = events_of(folder)

    def series(tag: str) -> list[tuple[int, float]]:
        return scalars_of(events, tag)

    diverged = diverged_at(events)
    val = series("val/acc")
    if not val and diverged is None:
        raise RuntimeError(f"{folder}: no val/acc in the events; did validation run?")
    test = series("test/acc")
    epoch_ends = [e.wall_time for e in series_events(events, "train/acc_epoch")]
    starts = [events.FirstEventTimestamp(), *epoch_ends[:-1]]
    reached = [step for step, value in val if value >= comparison.threshold]
    gaps = [series(tag)[-GAP_LOGS:] for tag in events.Tags()["scalars"] if tag.startswith("bn/") and tag.endswith("/mean_gap")]
    # Dying units: an activation whose input is <= 0 at its 85th percentile passes (a ReLU) almost nothing.
    p85 = [series(tag)[-1][1] for tag in events.Tags()["scalars"] if tag.startswith("act/") and tag.endswith("/layer/p85")]
    layer = comparison.percentile_layer
    return {
        # One epoch's accuracy swings by points at a large lr: the mean of the last few is the steadier summary.
        PRIMARY: statistics.fmean(value for _, value in val[-LAST_EPOCHS:]) if val and diverged is None else math.nan,
        "final_val_acc": val[-1][1] if diverged is None else math.nan,
        "precise_val_acc": precise_final(events, val) if diverged is None else math.nan,
        "test_acc": test[-1][1] if test and diverged is None else math.nan,
        "best_val_acc": max((value for _, value in val), default=math.nan),
        "step_to_threshold": reached[0] if reached else None,
        "seconds_per_epoch": statistics.median(end - start for start, end in zip(starts, epoch_ends)) if epoch_ends else math.nan,
        # How far batch means sit from the running means evaluation uses: noise that grows as batches shrink.
        "bn_mean_gap": statistics.fmean(value for gap in gaps for _, value in gap) if gaps else math.nan,
        # How many activation layers had 85% or more of their inputs <= 0 at their last log.
        "layers_mostly_off": sum(value <= 0 for value in p85) if p85 else math.nan,
        "val_acc": val,
        "percentiles": {f"p{p}": series(f"act/{layer}/unit/p{p}") for p in PERCENTILES},
        # Every comparison keeps its validation accuracy per epoch, whatever else its file asks for.
        "series": {tag: series(tag) for tag in sorted(events.Tags()["scalars"])
                   if any(fnmatch.fnmatchcase(tag, pattern) for pattern in ["val/acc", *comparison.series])},
        "diverged_at_step": diverged,
    }


def precise_final(events: EventAccumulator, val: list[tuple[int, float]]) -> float:
    """The validation accuracy of the final weights with precise statistics from the most training images
    (PreciseBN's largest ``precise_bn/val_acc_<n>``, logged after the last epoch); nan when it was not logged
    then (no PreciseBN, or a network without BN)."""
    sizes = [int(m.group(1)) for tag in events.Tags()["scalars"] if (m := PRECISE_TAG.fullmatch(tag))]
    logged = scalars_of(events, f"precise_bn/val_acc_{max(sizes)}") if sizes else []
    return logged[-1][1] if logged and val and logged[-1][0] == val[-1][0] else math.nan


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
