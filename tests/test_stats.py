"""The statistics helper against scipy's t-tests and a Holm adjustment done by hand on known numbers."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from bn_lightning.compare.stats import differences, differences_table, holm, t_test

A = {0: 0.8776, 1: 0.8801, 2: 0.8752}
B = {0: 0.7906, 1: 0.7990, 2: 0.7830}


def test_a_paired_test_is_scipys_ttest_rel_with_its_interval():
    ours = t_test(A, B)
    theirs = stats.ttest_rel(list(A.values()), list(B.values()))
    assert ours.test == "paired t" and ours.df == 2
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-10)
    for level in (0.90, 0.95, 0.983):
        ci = theirs.confidence_interval(level)
        assert ours.interval(level) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_arms_without_the_same_seeds_get_welchs_test():
    a, b = [0.86, 0.87, 0.85, 0.88, 0.86], {3: 0.84, 4: 0.83, 5: 0.86}
    ours = t_test(a, b)
    theirs = stats.ttest_ind(a, list(b.values()), equal_var=False)
    assert ours.test == "Welch t" and ours.n == (5, 3)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-10)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)
    ci = theirs.confidence_interval(0.95)
    assert ours.interval(0.95) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert t_test(A, B, paired=False).p == pytest.approx(stats.ttest_ind(list(A.values()), list(B.values()),
                                                                         equal_var=False).pvalue, rel=1e-10)


def test_a_seed_that_diverged_drops_out_of_its_pair():
    a = {0: 0.9, 1: float("nan"), 2: 0.88, 3: 0.91}
    b = {0: 0.8, 1: 0.85, 2: 0.79, 3: 0.83}
    ours = t_test(a, b)
    theirs = stats.ttest_rel([0.9, 0.88, 0.91], [0.8, 0.79, 0.83])
    assert ours.n == (3, 3) and ours.p == pytest.approx(theirs.pvalue, rel=1e-10)


def test_holm_adjusts_by_hand():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04, raised to the 0.06 before it
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.2, math.nan, 0.01])  # nan is no test: m = 2
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_the_verdicts_and_the_adjusted_intervals_agree_with_holm():
    far = ({0: 0.88, 1: 0.885, 2: 0.879}, {0: 0.79, 1: 0.80, 2: 0.785})  # 9 points apart, tight
    close = ({0: 0.881, 1: 0.882, 2: 0.880}, {0: 0.880, 1: 0.8815, 2: 0.8792})  # within a tenth of a point
    noisy = ({0: 0.86, 1: 0.84, 2: 0.88}, {0: 0.85, 1: 0.87, 2: 0.83})
    found = differences({"far": far, "close": close, "noisy": noisy})
    assert [found[name].verdict for name in ("far", "close", "noisy")] == ["differs", "equivalent", "unresolved"]
    p = {name: t_test(*pair).p for name, pair in {"far": far, "close": close, "noisy": noisy}.items()}
    assert [found[name].p_holm for name in p] == pytest.approx(holm(list(p.values())))
    # far has the smallest p: its interval is at level 1 - 0.05 / 3, as scipy computes it
    ci = stats.ttest_rel(list(far[0].values()), list(far[1].values())).confidence_interval(1 - 0.05 / 3)
    assert (found["far"].low, found["far"].high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    for d in found.values():
        assert (d.low > 0 or d.high < 0) == (d.p_holm < 0.05)
        ci90 = stats.ttest_rel(*(list(v.values()) for v in {"far": far, "close": close, "noisy": noisy}[d.name])).confidence_interval(0.90)
        assert (d.low90, d.high90) == pytest.approx((ci90.low, ci90.high), rel=1e-10)
    assert "differs" in found["far"].text() and found["far"].text().startswith("+")
    # A margin per comparison (measures in other units): "close" is not within a margin of a thousandth.
    per_name = differences({"far": far, "close": close, "noisy": noisy}, margin={"far": 0.005, "close": 0.0001,
                                                                                  "noisy": 0.005})
    assert per_name["close"].verdict == "unresolved" and per_name["close"].margin == 0.0001
    assert per_name["close"].p_holm == found["close"].p_holm
    table = differences_table(found)
    assert table.count("\n") == 5 and "| far |" in table and "unresolved" in table


def test_holm_keeps_the_level_of_the_first_comparison_it_does_not_reject():
    # p sorted: small (rejected at 0.05/3), mid (not rejected at 0.05/2), last: its interval stays at 0.05/2
    pairs = {"small": ({0: 0.9, 1: 0.91, 2: 0.905}, {0: 0.8, 1: 0.805, 2: 0.81}),
             "mid": ({0: 0.9, 1: 0.92, 2: 0.91}, {0: 0.88, 1: 0.895, 2: 0.9}),
             "last": ({0: 0.9, 1: 0.95, 2: 0.85}, {0: 0.88, 1: 0.9, 2: 0.87})}
    found = differences(pairs)
    p = {name: t_test(*pair).p for name, pair in pairs.items()}
    assert p["small"] < p["mid"] < p["last"] and found["small"].verdict == "differs" and found["mid"].p_holm >= 0.05
    for name in ("mid", "last"):
        ci = stats.ttest_rel(*(list(v.values()) for v in pairs[name])).confidence_interval(1 - 0.05 / 2)
        assert (found[name].low, found[name].high) == pytest.approx((ci.low, ci.high), rel=1e-10)
        assert found[name].low < 0 < found[name].high


def test_too_few_seeds_leave_it_unresolved():
    found = differences({"one seed": ({0: 0.9}, {0: 0.8})})
    assert found["one seed"].verdict == "unresolved" and math.isnan(found["one seed"].low)
    with pytest.raises(ValueError, match="per seed"):
        t_test([0.1, 0.2], [0.3, 0.4], paired=True)
