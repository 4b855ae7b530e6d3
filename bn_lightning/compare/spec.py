"""A comparison file (``configs/compare/*.yaml``), checked as it is read: the configs, seeds, grid and
settings of a matrix of runs, and each run's group and folder."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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

class GridMapping(dict):
    """A grid value that is a mapping (``norm_kwargs: {momentum: 0.1}``), hashable so that a Run stays a dict key."""

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items(), key=str)))


@dataclass(frozen=True)
class Run:
    """One process of the matrix: a config, its grid values and a seed."""

    config: Path
    grid: tuple[tuple[str, object], ...]
    seed: int

    @property
    def group(self) -> str:
        """``lenet_bn_torch`` or ``lenet_bn_torch-lr=0.1``: the config and its grid values, as folder names read;
        a mapping's items each (``norm_kwargs: {momentum: 0.1}`` gives ``momentum=0.1``)."""
        labels = [",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                  else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.grid]
        return "-".join([self.config.stem, *labels])

    def folder(self, out: Path) -> Path:
        return out / self.group / f"seed_{self.seed}"

    def arm(self, tune: str | None) -> str:
        """The group without the value of the ``tune`` axis: the runs an arm tries that setting over."""
        return Run(self.config, tuple((key, value) for key, value in self.grid if key != tune), self.seed).group


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
    # The differences the comparison is run to measure, [a, b] for a - b, written down before it runs; with
    # ``tune`` (a grid axis, e.g. the lr), each arm is taken at its best value of that axis.
    contrasts: list[tuple[str, str]] = field(default_factory=list)
    tune: str | None = None

    @classmethod
    def load(cls, path: Path, overrides: dict[str, object]) -> Comparison:
        spec = yaml.safe_load(path.read_text()) or {}
        known = {"configs", "seeds", "grid", "args", "threshold", "percentile_layer", "series", "slurm", "contrasts",
                 "tune"}
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
        tune = spec.get("tune")
        if tune is not None and tune not in grid:
            raise ValueError(f"{path}: tune must be one of the grid's axes {sorted(grid)}, got {tune!r}")
        contrasts = spec.get("contrasts") or []
        if any(not isinstance(pair, list) or len(pair) != 2 for pair in contrasts):
            raise ValueError(f"{path}: contrasts must list pairs [a, b] of arms (a - b is measured), got {contrasts}")
        comparison = cls(
            name=path.stem,
            configs=configs,
            seeds=[int(seed) for seed in spec["seeds"]],
            grid=grid,
            args={**(spec.get("args") or {}), **overrides},
            threshold=float(spec.get("threshold", cls.threshold)),
            percentile_layer=spec.get("percentile_layer", cls.percentile_layer),
            series=[str(pattern) for pattern in spec.get("series") or []],
            slurm=slurm_block(path, spec.get("slurm") or {}),
            contrasts=[(str(a), str(b)) for a, b in contrasts],
            tune=tune,
        )
        arms = {run.arm(tune) for run in comparison.runs()}
        if unknown := sorted({arm for pair in comparison.contrasts for arm in pair} - arms):
            raise ValueError(f"{path}: contrasts name arms that are not in the comparison: {unknown}; its arms are "
                             f"{sorted(arms)}")
        return comparison

    def runs(self) -> list[Run]:
        """Every config x grid point x seed, seeds innermost so a group's seeds finish together."""
        axes = [[tuple(zip(key.split(","), value if "," in key else [value])) for value in values]
                for key, values in self.grid.items()]
        points = [tuple(pair for part in combination for pair in part) for combination in itertools.product(*axes)]
        points = [tuple((key, GridMapping(v) if isinstance(v, dict) else v) for key, v in point) for point in points]
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


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (a CLI option without its dashes), got {pair!r}")
        overrides[key.lstrip("-")] = value
    return overrides
