"""The Diversity score of AVI-Talking (paper Sec. IV, Table 4): how different the style embeddings sampled
for the *same* instruction with different noise are.

For each instruction i, K style embeddings s_i1 .. s_iK (paper: K = 10) are sampled from the diffusion
prior with independent noise; the score is the mean pairwise Euclidean distance

    D_i = 2 / (K (K - 1)) * sum_{j < k} || s_ij - s_ik ||_2,

averaged over the instructions. A deterministic mapping (the ``no_diffusion`` ablation) scores exactly 0.
"""
from __future__ import annotations

import numpy as np

from avi_jax.errors import InputError


def pairwise_mean_distance(samples: np.ndarray) -> float:
    """Mean L2 distance over the K (K - 1) / 2 unordered pairs of rows of ``samples`` (K, D), K >= 2.

    Computed in float64 from explicit differences (exactly 0 for identical rows).

    Raises:
      InputError: not 2-d or fewer than 2 samples.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"pairwise_mean_distance expects (K >= 2, D) samples, got shape {x.shape}")
    k = x.shape[0]
    iu, ju = np.triu_indices(k, 1)
    return float(np.mean(np.linalg.norm(x[iu] - x[ju], axis=-1)))


def diversity(samples: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The Diversity score: :func:`pairwise_mean_distance` per instruction, averaged over instructions.

    Args:
      samples: (N, K, D) float, K >= 2 style embeddings sampled for each of N instructions.
      valid: optional (N,) bool; only True instructions count (e.g. to skip batch padding).

    Returns:
      float >= 0 (in the units of the style embeddings).

    Raises:
      InputError: wrong shapes, K < 2, or no valid instruction.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim != 3 or x.shape[1] < 2:
        raise InputError(f"diversity expects (N, K >= 2, D) samples, got shape {x.shape}")
    keep = np.ones(x.shape[0], bool) if valid is None else np.asarray(valid, bool)
    if keep.shape != (x.shape[0],):
        raise InputError(f"diversity: valid must be ({x.shape[0]},), got {keep.shape}")
    if not keep.any():
        raise InputError("diversity: no valid instruction")
    return float(np.mean([pairwise_mean_distance(s) for s in x[keep]]))


__all__ = ["pairwise_mean_distance", "diversity"]
