"""The statistics of every evaluation, against values computed by hand."""

import math

import pytest

from selfplay.data.evaluations import Evaluation
from selfplay.stats import paired_change, ratio_interval, sign_test, wilson_interval


def test_wilson_interval_by_hand():
    """35 of 200 (17.5%): p̂ = 0.175, z = 1.96, z²/n = 0.019208;
    centre = (0.175 + 0.0096037) / 1.0192073 = 0.181125;
    half = 1.96 √(0.000721875 + 0.0000240091) / 1.0192073 = 0.052520;
    → [0.1286, 0.2336]."""
    lo, hi = wilson_interval(35, 200)
    assert lo == pytest.approx(0.12860, abs=2e-5) and hi == pytest.approx(0.23365, abs=2e-5)


def test_wilson_interval_at_the_edges():
    """0 of 10: [0, z²/(n + z²)] = [0, 3.8415/13.8415] = [0, 0.2775]; n = 0: no information."""
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert wilson_interval(10, 10)[1] == 1.0             # exactly: a plot's error bar is ≥ 0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ratio_interval_by_hand():
    # logs ±0.1 around log 3: mean log 3, sd 0.1155 (n − 1 = 3), t 3.182, half 0.1837
    gm, lo, hi = ratio_interval([3 * math.exp(d) for d in (-0.1, 0.1, -0.1, 0.1)])
    assert gm == pytest.approx(3.0)
    half = 3.182 * math.sqrt(4 * 0.01 / 3) / 2
    assert (lo, hi) == pytest.approx((3 * math.exp(-half), 3 * math.exp(half)))
    assert ratio_interval([2.0, 2.0])[1:] == (2.0, 2.0)       # no spread, no width
    assert all(math.isnan(x) for x in ratio_interval([2.0])[1:])
    with pytest.raises(ValueError):
        ratio_interval([1.0, 0.0])


def test_sign_test_by_hand():
    """27 gained, 16 lost (the SPPO default run): 2 · Σ_{i≤16} C(43, i) / 2⁴³ = 0.1263."""
    assert sign_test(27, 16) == pytest.approx(2 * sum(math.comb(43, i) for i in range(17))
                                              / 2 ** 43)
    assert sign_test(27, 16) == pytest.approx(0.1263, abs=1e-4)
    assert sign_test(16, 27) == sign_test(27, 16)
    """6 gained, 0 lost: 2 / 2⁶ = 0.03125; equal counts: 1; nothing changed: 1."""
    assert sign_test(6, 0) == pytest.approx(0.03125)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_change_counts_only_rows_checked_on_both_sides():
    ours = [True, True, False, None, True]
    theirs = [False, True, True, True, False]
    c = paired_change(ours, theirs)
    assert (c.n, c.gained, c.lost) == (4, 2, 1)
    assert c.delta == pytest.approx(0.25) and c.p_value == pytest.approx(1.0)


def test_report_plots_a_perfect_and_a_null_score(tmp_path):
    """Accuracies of 0% and 100% (intervals touching 0 and 1) draw without error."""
    from selfplay.stages.report import ModelRow, plots

    def ev(k, n):
        return Evaluation(n, k / n, list(wilson_interval(k, n)), {}, None, 1.0, 0.0, {}, [])
    models = [ModelRow("start", ev(0, 7)), ModelRow("iteration 0", ev(7, 7)),
              ModelRow("iteration 1", ev(3, 7))]
    assert [p.name for p in plots(models, tmp_path)] == ["iterations.png"]
