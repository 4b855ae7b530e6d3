"""The tables and figures of ``results/depth_init/``, from the ``rates.csv`` and ``points.csv`` that
:mod:`bn_lightning.depth.at_init` writes; notebook 05 shows the same ones.

Differences are the statistics helper's (:func:`~bn_lightning.compare.stats.differences`), paired by seed, with
the equivalence margins recorded in docs/predictions.md before the runs were read: 0.05 for a per-layer rate,
1 for an effective rank, 0.05 for a ratio of ranks. The comparisons a prediction's criterion names are tested as
a family of their own; the others, descriptive, as another.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from bn_lightning.compare.stats import Difference, differences, differences_table, pm

__all__ = ["RANK_MARGIN", "RATE_MARGIN", "RATIO_MARGIN", "load", "rank_differences", "step_differences", "write"]

RATE_MARGIN = 0.05  # per-layer growth of the squared gradient norm
RANK_MARGIN = 1.0  # effective rank (directions)
RATIO_MARGIN = 0.05  # a ratio of effective ranks
YANG_RELU = 3.141592653589793 / (3.141592653589793 - 1)  # Yang et al. 2019's pi / (pi - 1)
ACTIVATIONS = ["relu", "tanh", "sigmoid"]
NETWORKS = [("none", "scaled"), ("none", "torch"), ("bn", "scaled"), ("ln", "scaled")]
NAMES = {("none", "scaled"): "no norm, He / Xavier init", ("none", "torch"): "no norm, torch's default init",
         ("bn", "scaled"): "BN", ("ln", "scaled"): "LayerNorm"}
INTS = ("depth", "width", "batch", "seed", "steps", "block")
FLOATS = ("rate", "grad_sq", "cosine", "erank", "centered_erank", "std_over_mean", "rms")


def _typed(row: dict[str, str]) -> dict:
    row = dict(row)
    for key in INTS:
        if key in row:
            row[key] = int(row[key])
    for key in FLOATS:
        if key in row:
            row[key] = float(row[key])
    row["residual"] = row["residual"] == "True"
    return row


def load(folder: Path) -> tuple[list[dict], list[dict]]:
    """``(rates, points)``: the rows of rates.csv and points.csv, typed."""
    found = []
    for name in ("rates.csv", "points.csv"):
        with open(Path(folder) / name, newline="") as f:
            found.append([_typed(row) for row in csv.DictReader(f)])
    return found[0], found[1]


def select(rows: list[dict], **where) -> list[dict]:
    return [row for row in rows if all(row[key] == value for key, value in where.items())]


def per_seed(rows: list[dict], column: str) -> dict[int, float]:
    return {row["seed"]: row[column] for row in rows}


def kind(residual: bool) -> str:
    return "residual" if residual else "plain"


def named_depth(rates: list[dict]) -> int:
    """The depth the predictions name (32; smaller in a ``--quick`` run): the size and steps studies' depth."""
    return select(rates, study="size")[0]["depth"]


def rates_table(rates: list[dict], inputs: str) -> str:
    """The rate at initialization at the named depth, per network (rows) and activation (columns), mean ± std."""
    depth, base = named_depth(rates), select(rates, study="depth")[0]
    lines = [f"Per-layer growth of the squared weight-gradient norm toward the input at initialization, depth {depth}, "
             f"width {base['width']} and batch {base['batch']}, {inputs} inputs, mean ± std over seeds (Yang et al. 2019 predict "
             f"{YANG_RELU:.3f} for plain BN with ReLU):", "",
             "| network | " + " | ".join(ACTIVATIONS) + " |", "|---|" + "---|" * len(ACTIVATIONS)]
    for residual in (False, True):
        for norm, init in NETWORKS:
            cells = [pm([r["rate"] for r in select(rates, study="depth", depth=depth, inputs=inputs, norm=norm,
                                                   init=init, residual=residual, activation=a, steps=0)])
                     for a in ACTIVATIONS]
            lines.append(f"| {kind(residual)}, {NAMES[norm, init]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def size_table(rates: list[dict]) -> str:
    """The rate of plain BN with ReLU at depth 32 over the batch size (width 512) and the width (batch 512)."""
    depth = named_depth(rates)
    both = select(rates, norm="bn", activation="relu", residual=False, inputs="gaussian", depth=depth, steps=0)
    lines = [f"The rate of plain BN with ReLU at depth {depth}, Gaussian inputs, over the batch size and the width "
             "(mean ± std over seeds):", "", "| batch | width | rate |", "|---|---|---|"]
    base = select(rates, study="depth")[0]  # the width and batch the other axis is held at
    batches = sorted({r["batch"] for r in both if r["width"] == base["width"]})
    widths = sorted({r["width"] for r in both if r["batch"] == base["batch"] and r["width"] != base["width"]})
    for batch, width in [(b, base["width"]) for b in batches] + [(base["batch"], w) for w in widths]:
        lines.append(f"| {batch} | {width} | {pm([r['rate'] for r in select(both, batch=batch, width=width)])} |")
    return "\n".join(lines) + "\n"


def steps_networks() -> list[tuple[str, bool]]:
    return [(norm, residual) for residual in (False, True) for norm in ("none", "bn")]


def step_differences(rates: list[dict]) -> tuple[dict[str, Difference], dict[str, Difference]]:
    """Rate after 1, 10 and 100 SGD steps - rate at initialization, paired by seed: plain BN's three, the
    prediction's family, and the other networks' nine, a descriptive family of their own."""
    families: tuple[dict, dict] = ({}, {})
    for norm, residual in steps_networks():
        rows = select(rates, study="steps", norm=norm, residual=residual)
        start = per_seed(select(rows, steps=0), "rate")
        for k in (1, 10, 100):
            families[(norm, residual) != ("bn", False)][f"{kind(residual)}, {NAMES[norm, 'scaled']}: after {k} - at init"] = (
                per_seed(select(rows, steps=k), "rate"), start)
    return differences(families[0], margin=RATE_MARGIN), differences(families[1], margin=RATE_MARGIN)


def steps_table(rates: list[dict]) -> str:
    steps = select(rates, study="steps")[0]
    lines = [f"The rate at depth {steps['depth']} (ReLU, Fashion-MNIST batches of {steps['batch']}) at initialization and after SGD steps "
             "(mean ± std over seeds):", "", "| network | at init | 1 step | 10 steps | 100 steps |",
             "|---|---|---|---|---|"]
    for norm, residual in steps_networks():
        rows = select(rates, study="steps", norm=norm, residual=residual)
        cells = [pm([r["rate"] for r in select(rows, steps=k)]) for k in (0, 1, 10, 100)]
        lines.append(f"| {kind(residual)}, {NAMES[norm, 'scaled']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def last_block(points: list[dict], **where) -> list[dict]:
    """The last block's row of each network and seed matching ``where``."""
    return [row for row in select(points, **where) if row["block"] == row["depth"]]


def rank_table(points: list[dict], inputs: str) -> str:
    depths = sorted({r["depth"] for r in points if r["study"] == "depth"})
    lines = [f"Centered effective rank of the last block's output over 256 {inputs} inputs at initialization, ReLU, "
             f"plain, width {points[0]['width']} (mean ± std over seeds):", "", "| network | " + " | ".join(map(str, depths)) + " |",
             "|---|" + "---|" * len(depths)]
    for norm, init in NETWORKS:
        rows = last_block(points, study="depth", norm=norm, init=init, activation="relu", residual=False,
                          inputs=inputs, steps=0)
        cells = [pm([r["centered_erank"] for r in select(rows, depth=d)], digits=1) for d in depths]
        lines.append(f"| {NAMES[norm, init]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranks_at(points: list[dict], norm: str, init: str, inputs: str, depth: int) -> dict[int, float]:
    """Per seed: the centered effective rank of the last block of a plain ReLU network at initialization."""
    return per_seed(select(last_block(points, study="depth", norm=norm, init=init, activation="relu", residual=False,
                                      inputs=inputs, steps=0), depth=depth), "centered_erank")


def rank_differences(points: list[dict]) -> tuple[dict[str, Difference], dict[str, Difference]]:
    """Daneshmand et al.'s criterion, on Fashion-MNIST images, paired by seed, one family: for no norm (He) and
    for BN, the rank at the deepest depth - half the rank at depth 2 (negative and ``differs``: it fell below
    half); no norm's ratio (deepest / depth 2) - BN's (negative: it fell more); no norm's rank at the deepest
    depth - at depth 2 (whether it fell at all). And a descriptive family: the first difference for every
    network and input."""
    depths = sorted({r["depth"] for r in points if r["study"] == "depth"})
    shallow, deep = depths[0], depths[-1]

    def below_half(norm, init, inputs):
        half = {seed: value / 2 for seed, value in ranks_at(points, norm, init, inputs, shallow).items()}
        return ranks_at(points, norm, init, inputs, deep), half

    def ratio(norm):
        low, high = ranks_at(points, norm, "scaled", "images", shallow), ranks_at(points, norm, "scaled", "images", deep)
        return {seed: high[seed] / low[seed] for seed in low if seed in high}

    criterion = {
        f"no norm (He): rank at depth {deep} - half of depth {shallow}": below_half("none", "scaled", "images"),
        f"BN: rank at depth {deep} - half of depth {shallow}": below_half("bn", "scaled", "images"),
        f"rank at depth {deep} / depth {shallow}: no norm (He) - BN": (ratio("none"), ratio("bn")),
        f"no norm (He): rank at depth {deep} - at depth {shallow}": (ranks_at(points, "none", "scaled", "images", deep),
                                                                    ranks_at(points, "none", "scaled", "images", shallow)),
    }
    margins = {name: RATIO_MARGIN if "/" in name else RANK_MARGIN for name in criterion}
    described = {f"{NAMES[norm, init]}, {inputs}: depth {deep} - half of depth {shallow}": below_half(norm, init, inputs)
                 for inputs in ("images", "gaussian") for norm, init in NETWORKS}
    return differences(criterion, margin=margins), differences(described, margin=RANK_MARGIN)


def rates_over_depth(rates: list[dict], inputs: str = "gaussian", activation: str = "relu"):
    """A figure: the rate over depth per network, plain and residual side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, residual in zip(axes, (False, True)):
        for norm, init in NETWORKS:
            by_depth = defaultdict(list)
            for r in select(rates, study="depth", norm=norm, init=init, residual=residual, inputs=inputs,
                            activation=activation, steps=0):
                by_depth[r["depth"]].append(r["rate"])
            depths = sorted(d for d in by_depth if d >= 4)  # depth 2 has one ratio: no middle half
            means = [sum(by_depth[d]) / len(by_depth[d]) for d in depths]
            ax.plot(depths, means, marker="o", label=NAMES[norm, init])
        ax.axhline(YANG_RELU, color="gray", linestyle="--", linewidth=1, label="pi / (pi - 1)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(xscale="log", yscale="log", xlabel="depth (blocks)", title=f"{kind(residual)}, {activation}, {inputs}")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.set_yticks([0.1, 0.2, 0.5, 1, 1.5], ["0.1", "0.2", "0.5", "1", "1.5"])
    axes[0].set_ylabel("squared gradient norm ratio per layer")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(folder: Path) -> None:
    """results/depth_init/*.md and rates.png from its CSV files."""
    folder = Path(folder)
    rates, points = load(folder)
    note = (" Paired by seed, Holm-adjusted within the table; `differs`: the adjusted 95% interval excludes 0; "
            "`equivalent`: the 90% interval lies within the margin ({margin}); otherwise `unresolved`.")
    steps, other_steps = step_differences(rates)
    ranks, other_ranks = rank_differences(points)
    (folder / "rates.md").write_text(rates_table(rates, "gaussian") + "\n" + rates_table(rates, "images"))
    (folder / "size.md").write_text(size_table(rates))
    (folder / "steps.md").write_text(
        steps_table(rates) + "\nThe prediction's comparisons, plain BN after training steps - at initialization."
        + note.format(margin=RATE_MARGIN) + "\n\n" + differences_table(steps, scale=1, unit="per layer", digits=3)
        + "\nThe other networks, a descriptive family of its own.\n\n"
        + differences_table(other_steps, scale=1, unit="per layer", digits=3))
    (folder / "rank.md").write_text(
        rank_table(points, "images") + "\n" + rank_table(points, "gaussian")
        + "\nDaneshmand et al.'s criterion (docs/predictions.md), Fashion-MNIST images."
        + note.format(margin=f"{RANK_MARGIN:g} direction, {RATIO_MARGIN:g} for the ratio") + "\n\n"
        + differences_table(ranks, scale=1, unit="effective rank", digits=2)
        + "\nEvery network and input: rank at the deepest depth - half the rank at depth 2, a descriptive family.\n\n"
        + differences_table(other_ranks, scale=1, unit="directions", digits=1))
    rates_over_depth(rates).savefig(folder / "rates.png", dpi=80)
