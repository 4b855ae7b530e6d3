"""The depth measurements at initialization: the growth rate as defined, and a quick run that writes every
point with finite measures."""

import csv
import math

import pytest

from bn_lightning.compare.stats import pm
from bn_lightning.depth import report
from bn_lightning.depth.at_init import growth_rate, main, points


def test_the_growth_rate_is_the_geometric_mean_ratio_over_the_middle_half_toward_the_input():
    assert growth_rate([1.5 ** (10 - i) for i in range(11)]) == pytest.approx(1.5)  # grows toward the input
    ratios = [9.0, 2.0, 2.0, 8.0, 8.0, 2.0, 2.0, 9.0]  # the ends left out: 2, 8, 8, 2 in the middle
    norms = [1.0]
    for r in reversed(ratios):
        norms.insert(0, norms[0] * r)
    assert growth_rate(norms) == pytest.approx(4.0)
    assert math.isnan(growth_rate([1.0]))
    assert math.isnan(growth_rate([4.0, 2.0, 0.0, 1.0])) and math.isnan(growth_rate([math.inf, 2.0, 1.0]))


@pytest.mark.slow  # about 12 s: 116 small networks
def test_a_quick_run_writes_every_point_with_finite_measures(tiny_data, tmp_path):
    main(["--out", str(tmp_path), "--quick", "--data-dir", str(tiny_data)])
    with open(tmp_path / "rates.csv") as f:
        rates = list(csv.DictReader(f))
    assert len(rates) == len(points(quick=True))
    at_init = [r for r in rates if r["steps"] == "0"]
    assert all(math.isfinite(float(r["rate"])) for r in at_init)  # trained ones may diverge (nan)
    with open(tmp_path / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(int(r["depth"]) + 1 for r in rates)  # the stem and every block
    assert all(float(r["centered_erank"]) >= 1 - 1e-9 and float(r["grad_sq"]) > 0 for r in rows if r["steps"] == "0")

    # The tables are the CSV files' numbers: a cell of rates.md, and the rank criterion's difference.
    typed_rates, typed_points = report.load(tmp_path)
    bn = [r["rate"] for r in typed_rates if (r["study"], r["depth"], r["norm"], r["activation"], r["residual"],
                                              r["inputs"], r["steps"]) == ("depth", 8, "bn", "relu", False, "images", 0)]
    assert len(bn) == 1 and f"| plain, BN | {pm(bn)} |" in (tmp_path / "rates.md").read_text()
    last = {r["depth"]: r["centered_erank"] for r in typed_points if r["block"] == r["depth"] and r["study"] == "depth"
            and (r["norm"], r["init"], r["activation"], r["residual"], r["inputs"]) == ("bn", "scaled", "relu", False,
                                                                                      "images")}
    criterion, described = report.rank_differences(typed_points)
    assert criterion["BN: rank at depth 8 - half of depth 2"].mean == pytest.approx(last[8] - last[2] / 2)
    assert described["BN, images: depth 8 - half of depth 2"].mean == pytest.approx(last[8] - last[2] / 2)
    assert len(criterion) == 4 and len(described) == 8
    assert (tmp_path / "rates.png").stat().st_size > 10_000
