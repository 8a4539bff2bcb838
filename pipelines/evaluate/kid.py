"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of MMD² between two feature sets with
the cubic polynomial kernel k(x, y) = (x·y / F + 1)³. Unlike FID it has no bias at small sample sizes, so it is
comparable across sample counts. The kernel's 1/F assumes unit-scale features (as Inception's pool features roughly
are); features of another network are divided by the reference set's root-mean-square first (`unit_rms`), one
fixed scale for every set compared with it.

MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n−1)) Σ_{i≠j} k(y_i, y_j) − 2/(mn) Σ_{i,j} k(x_i, y_j)

Its standard error comes from the first-order (Hoeffding) term of this two-sample U-statistic:

Var MMD²_u ≈ 4/m · Var_x[a(x)] + 4/n · Var_y[b(y)],   a(x) = E k(x, X') − E k(x, Y),   b(y) = E k(y, Y') − E k(X, y)

with a and b estimated by the rows' means of the kernel matrices (leave-one-out within a set). It is the leading
term: when both sets come from one distribution a and b are constant and the true error is of order 1/n, which this
estimate also gives (from the noise in the row means) but without an exact constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_FULL_ROWS = 1000  # larger sets are compared on random subsets of this many rows (kernel matrices stay small)


def _kernels(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"features must be [m >= 2, F] and [n >= 2, F], got {x.shape} and {y.shape}")
    features = x.shape[1]
    return ((x @ x.T / features + 1.0) ** 3, (y @ y.T / features + 1.0) ** 3, (x @ y.T / features + 1.0) ** 3)


def _mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    m, n = k_xy.shape
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² between features x [m, F] and y [n, F] (m, n ≥ 2) with k(a, b) = (a·b / F + 1)³."""
    return _mmd2(*_kernels(x, y))


def polynomial_mmd2_stderr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(MMD²_u, its standard error from the first-order term, see the module docstring) for x [m, F], y [n, F]
    (m, n ≥ 3)."""
    k_xx, k_yy, k_xy = _kernels(x, y)
    m, n = k_xy.shape
    if min(m, n) < 3:
        raise ValueError(f"a standard error needs at least 3 rows in each set, got {m} and {n}")
    a = (k_xx.sum(axis=1) - np.diag(k_xx)) / (m - 1) - k_xy.mean(axis=1)  # [m]
    b = (k_yy.sum(axis=1) - np.diag(k_yy)) / (n - 1) - k_xy.mean(axis=0)  # [n]
    variance = 4.0 * a.var(ddof=1) / m + 4.0 * b.var(ddof=1) / n
    return _mmd2(k_xx, k_yy, k_xy), float(np.sqrt(variance))


def unit_rms(reference: np.ndarray) -> float:
    """The scale that gives the reference features [n, F] unit root-mean-square: √(mean of their squares)."""
    return float(np.sqrt(np.mean(np.square(np.asarray(reference, np.float64)))))


@dataclass(frozen=True)
class KID:
    mean: float  # the unbiased MMD² (averaged over subsets when the sets were subsampled)
    stderr: float  # its standard error
    subsets: int  # 1: one estimate on every row of both sets
    sizes: tuple[int, int]  # rows of x and of y in each estimate


def kid_from_features(x: np.ndarray, y: np.ndarray, subsets: int = 20, subset_size: int | None = None,
                      seed: int = 0, scale: float = 1.0) -> KID:
    """KID between x [m, F] and y [n, F] (m, n ≥ 3), both divided by `scale`.

    With subset_size None and neither set over MAX_FULL_ROWS rows: one estimate on all rows (the U-statistic of
    least variance), standard error from its first-order term. Otherwise `subsets` estimates on `subset_size` rows
    (default MAX_FULL_ROWS, capped by the smaller set) drawn without replacement from each set, averaged; the standard
    error is then their spread / √subsets (fair when the subsets are small against the sets, as for 50k samples).
    """
    x, y = np.asarray(x, np.float64) / scale, np.asarray(y, np.float64) / scale
    if subset_size is None and max(len(x), len(y)) <= MAX_FULL_ROWS:
        mean, stderr = polynomial_mmd2_stderr(x, y)
        return KID(mean, stderr, 1, (len(x), len(y)))
    size = min(len(x), len(y), MAX_FULL_ROWS) if subset_size is None else subset_size
    if not 2 <= size <= min(len(x), len(y)):
        raise ValueError(f"subset_size must be in [2, {min(len(x), len(y))}], got {size}")
    if subsets < 2:
        raise ValueError(f"subsets must be >= 2 to estimate a standard error, got {subsets}")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return KID(float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(subsets)), subsets, (size, size))
