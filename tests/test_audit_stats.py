"""The timing test's statistics (dhp.audit.stats): Welch's t against known answers, streaming against batch,
equal and shifted synthetic distributions, and dudect's cropping. CPU only; scipy is optional."""

import math

import numpy as np
import pytest
from dhp.audit import stats


def direct_welch_t(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a.mean() - b.mean()) / math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)


def test_known_answer():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    # means 2.5 and 6, variances 5/3 and 10: t = -3.5 / sqrt(5/12 + 2)
    assert stats.t_statistic(a, b) == pytest.approx(-3.5 / math.sqrt(5 / 12 + 2), rel=1e-14)
    assert stats.t_statistic(a, b) == pytest.approx(direct_welch_t(a, b), rel=1e-14)


def test_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.normal(100.0, 3.0, 1000), rng.normal(100.5, 5.0, 700)
    expected = scipy_stats.ttest_ind(a, b, equal_var=False).statistic
    assert stats.t_statistic(a, b) == pytest.approx(expected, rel=1e-12)


def test_streaming_equals_batch_and_is_stable():
    rng = np.random.default_rng(2)
    # 1 ms in ns with a spread of a few ns: E[x^2] - E[x]^2 would keep about 4 digits of the variance
    a, b = 1e6 + rng.normal(0.0, 3.0, 5000), 1e6 + 0.5 + rng.normal(0.0, 3.0, 4000)
    ma, mb = stats.Moments(), stats.Moments()
    for chunk in np.array_split(a, [1, 7, 300, 2999]):
        ma.add(chunk)
    for chunk in np.array_split(b, 13):
        mb.add(chunk)
    assert ma.n == a.size and mb.n == b.size
    assert ma.variance == pytest.approx(np.var(a - 1e6, ddof=1), rel=1e-9)
    assert stats.welch_t(ma, mb) == pytest.approx(direct_welch_t(a - 1e6, b - 1e6), rel=1e-9)


def test_degenerate_samples():
    assert math.isnan(stats.t_statistic([1.0], [1.0, 2.0]))
    assert stats.t_statistic([3.0, 3.0], [3.0, 3.0, 3.0]) == 0.0
    assert stats.t_statistic([3.0, 3.0], [2.0, 2.0]) == math.inf


def test_equal_distributions_give_small_t():
    rng = np.random.default_rng(3)
    for _ in range(5):
        result = stats.fixed_vs_random(rng.gamma(4.0, 1.0, 10_000), rng.gamma(4.0, 1.0, 10_000))
        assert not result.leak, result.to_json()
        assert np.nanmax(np.abs(result.t_crops)) < stats.T_THRESHOLD


def test_shift_gives_large_t():
    rng = np.random.default_rng(4)
    result = stats.fixed_vs_random(rng.normal(0.0, 1.0, 10_000), rng.normal(0.1, 1.0, 10_000))
    assert result.leak and result.t < -stats.T_THRESHOLD  # t ~ -0.1 * sqrt(5000) ~ -7
    assert abs(result.t_whole) > stats.T_THRESHOLD


def test_cropping_finds_a_shift_under_a_heavy_tail():
    rng = np.random.default_rng(5)
    n = 20_000
    a, b = rng.normal(0.0, 1.0, n), rng.normal(0.2, 1.0, n)
    for x in (a, b):  # 5% of launches hit by huge delays (preemption): the whole-sample variance explodes
        hit = rng.random(n) < 0.05
        x[hit] += rng.exponential(1e4, hit.sum())
    result = stats.compare(a, b)
    assert abs(result.t_whole) < stats.T_THRESHOLD
    assert result.leak and result.crop is not None and result.percentile < 0.95


def test_dudect_percentiles_and_crop_counts():
    p = stats.dudect_percentiles(100)
    assert p[0] == pytest.approx(1 - 0.5**0.1) and p[-1] == pytest.approx(1 - 2.0**-10)
    assert np.all(np.diff(p) > 0)
    x = np.arange(1000, dtype=np.float64)
    test = stats.CroppedWelch([100.0, 500.0])
    test.add(0, x)
    test.add(1, x[::-1])
    assert [m.n for m in test.moments[0]] == [1000, 100, 500]
    assert np.all(test.t_values() == 0.0)


def test_min_samples_excludes_small_crops():
    # A difference only among the smallest samples: visible in a crop of 50 per class, ignored at 100.
    a = np.concatenate([np.full(50, 1.0), np.linspace(10.0, 20.0, 950)])
    b = np.concatenate([np.full(50, 2.0), np.linspace(10.0, 20.0, 950)])
    test = stats.CroppedWelch([5.0], [0.05])
    test.add(0, a)
    test.add(1, b)
    assert test.result(min_samples=50).crop == 0 and test.result(min_samples=50).t == -math.inf
    assert test.result(min_samples=100).crop is None


def test_fixed_vs_classes():
    rng = np.random.default_rng(6)
    fixed = rng.normal(50.0, 1.0, 10_000)
    results = stats.fixed_vs_classes(fixed, {"zeros": rng.normal(49.9, 1.0, 10_000),
                                             "random": rng.normal(50.0, 1.0, 10_000)})
    assert results["zeros"].leak and not results["random"].leak
    assert results["zeros"].to_json()["n"] == [10_000, 10_000]
