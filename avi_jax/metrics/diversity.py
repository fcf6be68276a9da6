"""The Diversity score of AVI-Talking (paper Sec. IV, Table 4): how different the style embeddings sampled
for the *same* instruction with different noise are.

For each instruction i, K style embeddings s_i1 .. s_iK (paper: K = 10) are sampled from the diffusion
prior with independent noise; the score is the mean pairwise Euclidean distance

    D_i = 2 / (K (K - 1)) * sum_{j < k} || s_ij - s_ik ||_2,

averaged over the instructions. A deterministic mapping (the ``no_diffusion`` ablation) scores exactly 0.
``python -m avi_jax.evaluate`` applies it to the style embeddings an export stores per sample (the same audio,
different noise) and, in vertex space, to the samples' vertex sequences (:func:`pairwise_mean_distance`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import InputError


@jax.jit
def _pair_means(x: jax.Array) -> jax.Array:
    """(K, ..., D) -> (K (K - 1) / 2,): per unordered pair, the L2 over the last axis averaged over the rest."""
    iu, ju = np.triu_indices(x.shape[0], 1)
    dist = jnp.sqrt(jnp.sum(jnp.square(x[iu] - x[ju]), -1))
    return jnp.mean(dist.reshape(len(iu), -1), -1)


def pairwise_mean_distance(samples: np.ndarray) -> float:
    """Mean L2 distance over the K (K - 1) / 2 unordered pairs of ``samples`` (K, ..., D), K >= 2: the L2 norm
    is over the last axis, averaged over the pairs and every middle position (e.g. (K, D) style embeddings;
    (K, T, V, 3) vertex sequences: the per-vertex distance averaged over frames and vertices; (K, T, 53)
    coefficient sequences: the per-frame distance averaged over frames).

    Computed in float32 by one jitted XLA reduction from explicit differences (exactly 0 for identical
    samples; one compilation per input shape).

    Raises:
      InputError: fewer than 2 dimensions or fewer than 2 samples.
    """
    x = np.asarray(samples, np.float32)
    if x.ndim < 2 or x.shape[0] < 2:
        raise InputError(f"pairwise_mean_distance expects (K >= 2, ..., D) samples, got shape {x.shape}")
    return float(jnp.mean(_pair_means(x)))


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
