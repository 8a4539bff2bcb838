"""KID against closed forms: the cubic-kernel MMD² of two point masses, an exact expansion for a mean shift, the
unbiased estimator's zero mean when both sets come from one distribution, and a standard error that matches the
spread of the estimate over independent data sets."""

import numpy as np
import pytest

from pipelines.evaluate.kid import MAX_FULL_ROWS, kid_from_features, polynomial_mmd2, polynomial_mmd2_stderr, unit_rms


def test_mmd2_of_two_point_masses_is_the_kernel_distance():
    a, b = np.full((5, 3), 0.5), np.full((7, 3), -1.0)
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    expected = k(a[0], a[0]) + k(b[0], b[0]) - 2 * k(a[0], b[0])
    assert polynomial_mmd2(a, b) == pytest.approx(expected, rel=1e-12)


def test_mmd2_matches_a_direct_double_sum():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 4)), rng.normal(0.3, 1.2, size=(11, 4))
    k = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    yy = sum(k(y[i], y[j]) for i in range(11) for j in range(11) if i != j) / (11 * 10)
    xy = sum(k(x[i], y[j]) for i in range(9) for j in range(11)) / (9 * 11)
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_unbiased_at_small_sample_sizes():
    """Same distribution: the mean of many small-sample estimates is 0 (FID's would be clearly positive); a mean
    shift δ in one of F = 1 dims has E[MMD²] = E k(x,x') + E k(y,y') − 2 E k(x,y), here computed exactly."""
    rng = np.random.default_rng(1)
    same = [polynomial_mmd2(rng.normal(size=(10, 1)), rng.normal(size=(10, 1))) for _ in range(4000)]
    assert abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(len(same))
    # k(u, v) = (uv + 1)³ with u, v independent N(μ_u, 1), N(μ_v, 1): E (uv + 1)³ expanded with E u² = μ² + 1,
    # E u³ = μ³ + 3μ.
    def ek(mu_u, mu_v):
        m1 = lambda m: m  # noqa: E731
        m2 = lambda m: m * m + 1  # noqa: E731
        m3 = lambda m: m**3 + 3 * m  # noqa: E731
        return m3(mu_u) * m3(mu_v) + 3 * m2(mu_u) * m2(mu_v) + 3 * m1(mu_u) * m1(mu_v) + 1

    delta = 0.5
    exact = ek(0, 0) + ek(delta, delta) - 2 * ek(0, delta)
    shifted = [polynomial_mmd2(rng.normal(size=(8, 1)), rng.normal(delta, size=(8, 1))) for _ in range(6000)]
    assert np.mean(shifted) == pytest.approx(exact, abs=4 * np.std(shifted) / np.sqrt(len(shifted)))


def test_stderr_matches_the_spread_over_independent_data_sets():
    """Draw 500 independent pairs of sets (a mean shift δ in one of 4 dims, so the first-order term leads); the
    reported standard error, averaged, matches the standard deviation of the 500 estimates within 15% (that
    standard deviation is itself known to ≈ 3% at 500 draws)."""
    rng = np.random.default_rng(3)
    for delta, m, n in [(0.5, 60, 40), (1.0, 30, 30)]:
        estimates, stderrs = [], []
        for _ in range(500):
            x, y = rng.normal(size=(m, 4)), rng.normal(size=(n, 4))
            y[:, 0] += delta
            value, stderr = polynomial_mmd2_stderr(x, y)
            estimates.append(value)
            stderrs.append(stderr)
        assert np.mean(stderrs) / np.std(estimates) == pytest.approx(1.0, abs=0.15), (delta, m, n)
        assert value == pytest.approx(polynomial_mmd2(x, y), rel=1e-12)


def test_kid_uses_every_row_up_to_the_cap_and_subsets_above_it():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 4)), rng.normal(0.2, size=(40, 4))
    kid = kid_from_features(x, y)
    assert (kid.subsets, kid.sizes) == (1, (60, 40))
    assert (kid.mean, kid.stderr) == pytest.approx(polynomial_mmd2_stderr(x, y), rel=1e-12)
    scale = unit_rms(y)
    assert np.mean(np.square(y / scale)) == pytest.approx(1.0)
    rescaled = kid_from_features(3 * x, 3 * y, scale=3.0)  # scaling both sets back: the same KID
    assert (rescaled.mean, rescaled.stderr) == pytest.approx((kid.mean, kid.stderr), rel=1e-12)
    # Subsets: the mean of `subsets` seeded estimates, standard error = their spread / √subsets.
    sub = kid_from_features(x, y, subsets=10, subset_size=20, seed=5)
    assert kid_from_features(x, y, subsets=10, subset_size=20, seed=5) == sub and (sub.subsets, sub.sizes) == (10, (20, 20))
    rng5 = np.random.default_rng(5)
    values = [polynomial_mmd2(x[rng5.choice(60, 20, replace=False)], y[rng5.choice(40, 20, replace=False)])
              for _ in range(10)]
    assert (sub.mean, sub.stderr) == pytest.approx((np.mean(values), np.std(values, ddof=1) / np.sqrt(10)), rel=1e-12)
    big = kid_from_features(rng.normal(size=(MAX_FULL_ROWS + 1, 2)), rng.normal(size=(30, 2)), subsets=3)
    assert (big.subsets, big.sizes) == (3, (30, 30))
    with pytest.raises(ValueError, match="subset_size must be in \\[2, 40\\]"):
        kid_from_features(x, y, subset_size=50)
    with pytest.raises(ValueError, match="at least 3 rows"):
        kid_from_features(x[:2], y)
