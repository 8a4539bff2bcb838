"""KID against closed forms: the cubic-kernel MMD² of two point masses, an exact expansion for a mean shift, and
the unbiased estimator's zero mean when both sets come from one distribution."""

import numpy as np
import pytest

from pipelines.evaluate.kid import kid_from_features, polynomial_mmd2, unit_rms


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


def test_kid_over_subsets():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(40, 4))
    kid = kid_from_features(x, y, subsets=10)
    assert kid.subset_size == 40 and kid.subsets == 10 and kid.std > 0
    assert kid_from_features(x, y, subsets=10) == kid  # seeded
    scale = unit_rms(y)
    assert np.mean(np.square(y / scale)) == pytest.approx(1.0)
    rescaled = kid_from_features(3 * x, 3 * y, subsets=10, scale=3.0)  # scaling both sets back: the same KID
    assert (rescaled.mean, rescaled.std) == pytest.approx((kid.mean, kid.std), rel=1e-12)
    with pytest.raises(ValueError, match="subset_size must be in \\[2, 40\\]"):
        kid_from_features(x, y, subset_size=50)
