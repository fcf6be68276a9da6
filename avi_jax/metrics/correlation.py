"""Pearson's correlation coefficient (K. Pearson, 1895), e.g. of the predicted and true jaw opening over the
frames of a test split (the motion stage's ``jaw_correlation``):

    r = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))
"""
from __future__ import annotations

import numpy as np

from avi_jax.errors import InputError


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays of the same length, computed in float64.

    Returns a float in [-1, 1]; 0.0 when either array is constant (the coefficient is undefined there).

    Raises:
      InputError: the arrays are not 1-D of one length.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise InputError(f"pearson expects two 1-D arrays of one length, got {a.shape} and {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


__all__ = ["pearson"]
