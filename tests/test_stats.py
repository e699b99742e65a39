from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.evaluation import stats


def brute_mcnemar(b: int, c: int) -> float:
    """Sum of Bin(n, ½) pmf over outcomes at least as far from n/2 as b (the two-sided exact test)."""
    n = b + c
    return sum(math.comb(n, i) for i in range(n + 1) if abs(i - n / 2) >= abs(b - n / 2)) / 2**n


@pytest.mark.parametrize("b,c,p", [(0, 5, 0.0625), (1, 9, 0.021484375), (9, 1, 0.021484375), (4, 4, 1.0),
                                   (0, 0, 1.0), (0, 1, 1.0), (3, 12, 0.03515625)])
def test_mcnemar_known_values(b, c, p):
    assert stats.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_matches_brute_force_and_handles_large_counts():
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            assert stats.mcnemar_exact(b, c) == pytest.approx(min(1.0, brute_mcnemar(b, c)), rel=1e-12)
    assert 0 < stats.mcnemar_exact(480, 520) < 1
    assert stats.mcnemar_exact(2000, 2400) < 1e-8
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 3)


def test_wilson_interval():
    lo, hi = stats.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = stats.wilson_interval(50, 100, 0.8), stats.wilson_interval(50, 100, 0.99)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_paired_bootstrap_covers_known_effect_and_is_reproducible():
    rng = np.random.default_rng(7)
    n = 4000
    a = rng.random(n) < 0.75
    b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.35)  # correlated with a, mean 0.8·0.75 + 0.2·0.35
    true = 0.75 - (0.8 * 0.75 + 0.2 * 0.35)
    diff, lo, hi = stats.paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo < true < hi and lo < diff < hi and hi - lo < 0.04
    assert stats.paired_bootstrap(a, b, n_boot=4000, seed=1) == (diff, lo, hi)
    assert stats.paired_bootstrap(a, b, n_boot=4000, seed=2) != (diff, lo, hi)


def test_paired_bootstrap_resamples_pairs():
    a = np.ones(1000)
    b = a.copy()
    b[:20] = 0  # B loses 20 pairs and wins none: 2% apart, significant only when pairs stay together
    diff, lo, hi = stats.paired_bootstrap(a, b, n_boot=5000, seed=0)
    assert diff == pytest.approx(0.02) and 0 < lo < diff < hi
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(3)
    a, b = rng.random(300) < 0.6, rng.random(300) < 0.5
    idx = rng.integers(0, 300, size=(20000, 300))
    ref = np.quantile(a[idx].mean(1) - b[idx].mean(1), [0.025, 0.975])
    _, lo, hi = stats.paired_bootstrap(a, b, n_boot=20000, seed=0)
    assert (lo, hi) == pytest.approx(tuple(ref), abs=0.006)
    _, lo, hi = stats.paired_bootstrap(rng.normal(size=50), rng.normal(size=50), n_boot=500)  # all distinct
    assert lo < hi
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1])


def test_pairs_needed():
    za, zb = 1.959963984540054, 0.8416212335729143
    expected = (za * math.sqrt(0.3) + zb * math.sqrt(0.3 - 0.01)) ** 2 / 0.01
    assert stats.pairs_needed(0.7, 0.6, 0.3) == math.ceil(expected) == 234
    sizes = [stats.pairs_needed(0.6 + d, 0.6, 0.3) for d in (0.02, 0.05, 0.1, 0.2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert stats.pairs_needed(0.6, 0.7, 0.3) == 234  # symmetric
    assert stats.pairs_needed(0.7, 0.7, 0.3) is None and stats.pairs_needed(0.7, 0.6, 0.0) is None
    assert stats.pairs_needed(0.7, 0.6, 0.3, power=0.9) > 234


def test_mean_ci():
    mean, lo, hi = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t(0.975, 3) · s/√n
    assert mean == 2.5 and (lo + hi) / 2 == 2.5 and (hi - lo) / 2 == pytest.approx(half, rel=2e-3)
    assert stats.mean_ci([1.0, 3.0])[2] == pytest.approx(2 + 12.7062047 * 1.0)  # df 1 is exact
    x = np.random.default_rng(0).normal(size=5000)
    _, lo, hi = stats.mean_ci(x)
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(x.size), rel=1e-3)
    single = stats.mean_ci([0.7])
    assert single[0] == 0.7 and math.isnan(single[1]) and math.isnan(single[2])


def test_slope_and_pearson():
    xs = [1, 2, 3, 4]
    assert stats.slope(xs, [3, 5, 7, 9]) == pytest.approx(2.0)
    assert stats.pearson(xs, [3, 5, 7, 9]) == pytest.approx(1.0)
    assert stats.pearson(xs, [9, 7, 5, 3]) == pytest.approx(-1.0)
    assert stats.slope([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert stats.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    for deg in ([], []), ([1], [2]), ([2, 2, 2], [1, 2, 3]):
        assert stats.slope(*deg) == 0.0 and stats.pearson(*deg) == 0.0
    assert stats.pearson([1, 2, 3], [4, 4, 4]) == 0.0
