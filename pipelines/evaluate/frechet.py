"""Fréchet distance between Gaussians fit to features (Heusel et al. 2017), following pytorch-fid's numerics.

FID = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class GaussianStats:
    mu: np.ndarray  # [F] float64
    sigma: np.ndarray  # [F, F] float64, unbiased sample covariance

    @classmethod
    def fit(cls, features: np.ndarray) -> "GaussianStats":
        """features: [N, F] with N ≥ 2 → mean and unbiased covariance (np.cov, rowvar=False)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"features must be [N, F] with N >= 2, got shape {features.shape}")
        return cls(mu=features.mean(axis=0), sigma=np.atleast_2d(np.cov(features, rowvar=False)))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^{1/2}; mu: [F], sigma: [F, F].

    As in pytorch-fid: if sqrtm of the product is not finite (singular product), eps·I is added to both
    covariances; an imaginary part from numerical noise is dropped when the diagonal's is below 1e-3, else raised.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular" is expected for rank-deficient covariances; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ₁Σ₂) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N1, F] and [N2, F]."""
    a, b = GaussianStats.fit(features1), GaussianStats.fit(features2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
