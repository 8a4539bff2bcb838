"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of MMD² between two feature sets with
the cubic polynomial kernel k(x, y) = (x·y / F + 1)³. Unlike FID it has no bias at small sample sizes, so it is
comparable across sample counts; its spread comes from averaging over random subsets. The kernel's 1/F assumes
unit-scale features (as Inception's pool features roughly are); features of another network are divided by the
reference set's root-mean-square first (`unit_rms`), one fixed scale for every set compared with it.

MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² between features x [m, F] and y [n, F] (m, n ≥ 2) with k(a, b) = (a·b / F + 1)³."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"features must be [m >= 2, F] and [n >= 2, F], got {x.shape} and {y.shape}")
    features = x.shape[1]
    k_xx = (x @ x.T / features + 1.0) ** 3
    k_yy = (y @ y.T / features + 1.0) ** 3
    k_xy = (x @ y.T / features + 1.0) ** 3
    m, n = len(x), len(y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def unit_rms(reference: np.ndarray) -> float:
    """The scale that gives the reference features [n, F] unit root-mean-square: √(mean of their squares)."""
    return float(np.sqrt(np.mean(np.square(np.asarray(reference, np.float64)))))


@dataclass(frozen=True)
class KID:
    mean: float  # MMD² averaged over the subsets
    std: float  # its standard deviation across subsets
    subsets: int
    subset_size: int


def kid_from_features(x: np.ndarray, y: np.ndarray, subsets: int = 20, subset_size: int | None = None,
                      seed: int = 0, scale: float = 1.0) -> KID:
    """KID between x [m, F] and y [n, F], both divided by `scale`: `subsets` unbiased MMD² estimates, each on
    `subset_size` rows drawn without replacement from each set (default: the smaller set's size, capped at 1000),
    averaged."""
    x, y = np.asarray(x, np.float64) / scale, np.asarray(y, np.float64) / scale
    size = min(len(x), len(y), 1000) if subset_size is None else subset_size
    if not 2 <= size <= min(len(x), len(y)):
        raise ValueError(f"subset_size must be in [2, {min(len(x), len(y))}], got {size}")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return KID(float(np.mean(values)), float(np.std(values)), subsets, size)
