"""Fréchet distance against closed forms for known Gaussians, and pytorch-fid's handling of numerical noise."""

import numpy as np
import pytest
from scipy import linalg

from pipelines.evaluate.frechet import GaussianStats, fid_from_features, frechet_distance


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def w2_squared_symmetric(mu1, s1, mu2, s2) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}, via symmetric eigendecompositions only."""

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


def test_one_dimensional_closed_form():
    # W2² between N(m1, s1²) and N(m2, s2²) is (m1 − m2)² + (s1 − s2)².
    d = frechet_distance(np.array([1.5]), np.array([[0.3**2]]), np.array([-0.5]), np.array([[2.0**2]]))
    assert d == pytest.approx((1.5 + 0.5) ** 2 + (0.3 - 2.0) ** 2, rel=1e-12)


def test_diagonal_covariances_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    sd1, sd2 = np.array([1.0, 0.5, 3.0]), np.array([2.0, 0.5, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)
    assert frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected, rel=1e-12)


def test_non_commuting_covariances_match_symmetric_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = random_spd(rng, 6), random_spd(rng, 6)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    expected = w2_squared_symmetric(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=5), random_spd(rng, 5)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9


def test_sample_estimate_converges_to_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    s1, s2 = random_spd(rng, 3), random_spd(rng, 3)
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    stats = GaussianStats.fit(x1)
    np.testing.assert_allclose(stats.sigma, np.cov(x1, rowvar=False))  # unbiased, as pytorch-fid
    assert fid_from_features(x1, x2) == pytest.approx(w2_squared_symmetric(mu1, s1, mu2, s2), rel=0.02)


def test_rank_deficient_covariance_drops_imaginary_noise():
    # Fewer samples than dimensions: Σ is singular and sqrtm(Σ Σ) comes back complex with ~1e-8 imaginary noise.
    features = np.random.default_rng(3).normal(size=(10, 32))
    sigma = GaussianStats.fit(features).sigma
    assert np.iscomplexobj(linalg.sqrtm(sigma @ sigma))
    assert abs(fid_from_features(features, features)) < 1e-4


def test_large_imaginary_component_is_an_error():
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_mismatched_shapes_are_errors():
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\[N, F\] with N >= 2"):
        GaussianStats.fit(np.zeros((1, 4)))
