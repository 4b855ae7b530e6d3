"""Experiment tooling: a matrix of runs over seeds, run here or on Slurm, read back from TensorBoard events,
tabulated and plotted (``python -m bn_lightning.compare``), and the reader of the results it leaves.

spec (the comparison file) -> launch (the runs' processes) -> collect (each run's figures) -> report
(tables, plots) -> results (reading a results folder back); stats (mean ± std, differences and their verdicts). A run is a ``python -m bn_lightning fit``
process: of the rest of bn_lightning only ``training.tags`` (the tags it reads) is imported.
"""

from bn_lightning.compare.cli import main, run_comparison
from bn_lightning.compare.collect import FIGURES, RESULT_FILE, by_group, read_run, summarize
from bn_lightning.compare.launch import execute, fit_command, run_locally, run_on_slurm, slurm_executor
from bn_lightning.compare.report import markdown, percentiles_figure, plot_band, val_acc_figure
from bn_lightning.compare.spec import Comparison, Run
from bn_lightning.compare.stats import Difference, differences, differences_table, mean_std, pm, pm_text, t_test

__all__ = [
    "FIGURES", "RESULT_FILE", "Comparison", "Difference", "Run", "by_group", "differences", "differences_table", "execute", "fit_command", "main", "markdown",
    "mean_std", "percentiles_figure", "plot_band", "pm", "pm_text", "read_run", "run_comparison", "run_locally",
    "run_on_slurm", "slurm_executor", "summarize", "t_test", "val_acc_figure",
]
