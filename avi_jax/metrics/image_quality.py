"""FID and KID between two sets of image features (the FID Inception's 2048-d pool3 features).

* **FID** (Heusel et al. 2017; pytorch-fid ``calculate_frechet_distance``): the Frechet distance of the
  Gaussians fitted to each set (mean and covariance with ``ddof=1``, as ``np.cov``),
  ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``. pytorch-fid takes ``scipy.linalg.sqrtm(S1 S2)``
  and retries with ``1e-6 * I`` added when that is not finite (few samples: the covariances are singular).
  Only the trace of the square root is needed, and ``tr sqrt(S1 S2) = tr sqrt(R S2 R)`` with ``R = sqrt(S1)``
  (the two are similar matrices); ``R S2 R`` is symmetric positive semi-definite, so its square root comes
  from ``eigh`` with eigenvalues within rounding of 0 set to 0 -- real, and stable for singular covariances
  without an offset.
  Computed in float64.
* **KID** (Binkowski et al. 2018; the clean-fid / torchmetrics / StyleGAN2-ADA estimator): the unbiased MMD^2
  with the polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` (d = feature size) between random subsets of
  ``m = min(n1, n2, max_subset_size)`` features drawn without replacement from each set, averaged over
  ``num_subsets`` subsets (defaults 100 and 1000, as clean-fid and torchmetrics). Per subset,
  ``sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] / (m (m - 1)) - 2 sum_{i,j} k(x_i,y_j) / m^2``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from avi_jax.errors import InputError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def _features(x: Any, name: str, min_rows: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise InputError(f"{name}: features of shape {x.shape}, expected (N >= {min_rows}, D)")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name}: features contain NaN or infinite values")
    return x


def gaussian_stats(features: Any, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))`` float64 of features (N, D), N >= 2: mean and covariance (ddof 1).

    Raises:
      InputError: not (N >= 2, D), or non-finite values (``name`` is named).
    """
    x = _features(features, name, 2)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix; eigenvalues within rounding of 0 (below
    D x machine eps x the largest) set to 0, so the null space of a singular covariance adds nothing."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    tol = a.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0), v


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring); mu (D,), sigma (D, D).

    Raises:
      InputError: shapes disagree.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise InputError(f"frechet_distance: shapes {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape} "
                         "do not describe two Gaussians of one dimension")
    w1, v1 = _psd_eigh(sigma1)
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    tr_covmean = np.sqrt(_psd_eigh(root1 @ sigma2 @ root1)[0]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid(features1: Any, features2: Any) -> float:
    """FID between two feature sets (N1, D) and (N2, D), N >= 2 each (pytorch-fid's value for the same
    features). Raises ``InputError`` on bad shapes or non-finite features."""
    mu1, s1 = gaussian_stats(features1, "fid: first feature set")
    mu2, s2 = gaussian_stats(features2, "fid: second feature set")
    return frechet_distance(mu1, s1, mu2, s2)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(features1: Any, features2: Any, *, num_subsets: int = KID_SUBSETS,
        max_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict:
    """KID between two feature sets (N1, D) and (N2, D) (module docstring), in float64.

    Args:
      num_subsets, max_subset_size: the subset count and largest subset size (clean-fid's defaults).
      seed: seed of the subset draws (``np.random.default_rng``), so a figure can be reproduced.

    Returns:
      ``{"kid": mean over subsets, "kid_std": their standard deviation, "subset_size": m,
      "num_subsets": num_subsets}``.

    Raises:
      InputError: fewer than 2 features in a set, mismatched D, non-finite values, or num_subsets < 1.
    """
    x = _features(features1, "kid: first feature set", 2)
    y = _features(features2, "kid: second feature set", 2)
    if x.shape[1] != y.shape[1] or num_subsets < 1 or max_subset_size < 2:
        raise InputError(f"kid: feature sizes {x.shape[1]} and {y.shape[1]}, num_subsets {num_subsets}, "
                         f"max_subset_size {max_subset_size}: need equal sizes, >= 1 subset of >= 2")
    m = min(x.shape[0], y.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        a = x[rng.choice(x.shape[0], m, replace=False)]
        b = y[rng.choice(y.shape[0], m, replace=False)]
        kaa, kbb = _poly_kernel(a, a), _poly_kernel(b, b)
        within = kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)
        values[s] = within / (m * (m - 1)) - 2.0 * _poly_kernel(a, b).sum() / (m * m)
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "subset_size": m,
            "num_subsets": num_subsets}
