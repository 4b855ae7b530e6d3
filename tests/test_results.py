"""bn_lightning.compare.results: the notebooks' reader of a comparison's results folder, against the files it reads."""

import csv
import math
import statistics

import pytest

from bn_lightning.compare import results


@pytest.fixture
def folder(tmp_path):
    """results/demo as compare writes it: runs.csv (a run that diverged has empty figures) and series.csv."""
    (tmp_path / "demo").mkdir()
    with open(tmp_path / "demo" / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["group", "seed", "final_val_acc"], ["bn", 0, 0.8], ["bn", 1, 0.9], ["no_bn", 0, ""]])
    with open(tmp_path / "demo" / "series.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "seed", "tag", "step", "value"])
        writer.writerows([["bn", 0, "x", 0, 1.0], ["bn", 0, "x", 10, 2.0], ["bn", 1, "x", 0, 3.0],
                          ["bn", 1, "x", 10, 6.0], ["bn", 1, "x", 20, 7.0]])
    return tmp_path


def test_the_figures_of_each_group_read_per_seed_with_an_empty_cell_as_nan(folder):
    assert results.have(folder / "demo")
    found = results.figure_of(folder / "demo", "final_val_acc")
    assert found["bn"] == [0.8, 0.9] and math.isnan(found["no_bn"][0])
    assert results.pm(found["bn"], 2) == f"0.85 ± {statistics.stdev([0.8, 0.9]):.2f}"
    assert results.pm(found["no_bn"]) == "-"
    assert results.pm([0.5]) == "0.500"  # one seed has a mean and no spread, not "± nan"


def test_a_series_is_per_seed_and_its_mean_curve_keeps_the_steps_every_seed_logged(folder):
    per_seed = results.series(folder / "demo")["bn", "x"]
    assert per_seed == {0: [(0, 1.0), (10, 2.0)], 1: [(0, 3.0), (10, 6.0), (20, 7.0)]}
    assert results.mean_curve(per_seed) == ([0, 10], [2.0, 4.0], [1.0, 2.0], [3.0, 6.0])


def test_a_missing_comparison_says_which_command_makes_it(tmp_path, capsys):
    assert not results.have(tmp_path / "ics")
    assert "python -m bn_lightning.compare configs/compare/ics.yaml" in capsys.readouterr().out


def test_best_arms_read_back_the_choice_the_runner_wrote_in_differences_md():
    from pathlib import Path

    from bn_lightning.compare.spec import Comparison

    repo = Path(__file__).resolve().parents[1]
    comparison = Comparison.load(repo / "configs" / "compare" / "collapse.yaml", {})
    chosen = results.best_arms(repo / "results" / "collapse", comparison)
    table = (repo / "results" / "collapse" / "differences.md").read_text()
    for name, arm in chosen.items():
        mean, std = results.mean_std(list(arm.compared.values()))
        assert f"| {name} | {arm.value} " in table and f"| {mean:.4f} ± {std:.4f} |" in table


def test_precise_bn_evaluations_score_the_last_3_epochs_and_pair_the_same_runs_evaluations(tmp_path):
    kinds = {"ema": 0.0, "55000": 0.02, "batch": 0.01}  # offsets of each evaluation from a seed's curve
    groups = [f"cfg-momentum={m}" for m in ("0.1", "None")]
    with open(tmp_path / "runs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["group", "seed"], *[[g, s] for g in groups for s in range(3)]])
    with open(tmp_path / "series.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "seed", "tag", "step", "value"])
        for g, group in enumerate(groups):
            for seed in range(3):
                for epoch in range(5):
                    for kind, offset in kinds.items():
                        value = 0.5 + 0.1 * epoch + 0.01 * seed * (1 + epoch % 2) + offset - 0.2 * g * (kind == "ema")
                        writer.writerow([group, seed, f"precise_bn/val_acc_{kind}", 100 * epoch, value])
    scored = results.evaluations(tmp_path, "cfg-momentum=0.1")
    assert scored["ema"][1] == pytest.approx(statistics.fmean(0.5 + 0.1 * e + 0.01 * (1 + e % 2) for e in (2, 3, 4)))
    found = results.precise_bn_differences(tmp_path, "cfg")
    assert list(found) == ["momentum 0.1: precise - running", "cumulative: precise - running",
                           "running: cumulative - momentum 0.1", "each val batch's own - precise"]
    assert found["momentum 0.1: precise - running"].mean == pytest.approx(0.02)
    assert found["cumulative: precise - running"].mean == pytest.approx(0.22)
    assert found["running: cumulative - momentum 0.1"].mean == pytest.approx(-0.2)
    assert found["each val batch's own - precise"].mean == pytest.approx(-0.01)
    assert found["momentum 0.1: precise - running"].test.test == "paired t"


def test_an_arm_that_trained_at_no_rate_of_its_grid_is_taken_at_its_best_below_it():
    from pathlib import Path

    from bn_lightning.compare.spec import Comparison

    repo = Path(__file__).resolve().parents[1]
    conv, probe = (Comparison.load(repo / "configs" / "compare" / f"{name}.yaml", {})
                   for name in ("depth_conv", "depth_conv_residual_small_lr"))
    folder, probe_folder = repo / "results" / "depth_conv", repo / "results" / "depth_conv_residual_small_lr"
    grid = results.best_arms(folder, conv)
    chosen, found = results.trainability_differences(folder, conv, probe_folder, probe)
    assert not grid["deep_conv_residual"].trained and chosen["deep_conv_residual"].trained
    # Below the grid: the best of the rates by the mean primary metric, among those no seed diverged at.
    primary, test = results.per_seed(probe_folder, "val_acc_last3"), results.per_seed(probe_folder, "test_acc")
    rates = [g for g in primary
             if g.startswith("deep_conv_residual-") and not any(map(math.isnan, primary[g].values()))]
    best = max(rates, key=lambda g: statistics.fmean(primary[g].values()))
    assert f"deep_conv_residual-lr={chosen['deep_conv_residual'].value}" == best
    assert chosen["deep_conv_residual"].compared == test[best]
    assert chosen["deep_conv_bn"] == grid["deep_conv_bn"]  # an arm that trained on the grid stays as chosen there
    assert list(found) == [f"{a} - {b}" for a, b in conv.contrasts]
    assert not any(math.isnan(d.mean) for d in found.values())
    # A family of one is not adjusted: its interval is the unadjusted paired t interval, narrower than in the four.
    pair = [("deep_conv_bn", "deep_conv_residual_bn")]
    alone = results.trainability_differences(folder, conv, probe_folder, probe, pair)[1]
    one, of_four = alone["deep_conv_bn - deep_conv_residual_bn"], found["deep_conv_bn - deep_conv_residual_bn"]
    assert list(alone) == [one.name] and one.mean == of_four.mean and of_four.low < one.low < one.mean
    from scipy import stats

    d = [chosen["deep_conv_bn"].compared[s] - chosen["deep_conv_residual_bn"].compared[s] for s in range(3)]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    assert (one.low, one.high) == pytest.approx((statistics.fmean(d) - half, statistics.fmean(d) + half))
    # With the chance line above every run, no rate below the grid trains it: it has nothing to compare.
    chosen, found = results.trainability_differences(folder, conv, probe_folder, probe, chance=1.0)
    assert not chosen["deep_conv_residual"].trained
    assert math.isnan(found["deep_conv_residual_bn - deep_conv_residual"].mean)
