"""Cross-modal retrieval accuracy at k (recall@k): the paper's audio->instruction retrieval (stage 1a,
Sec. IV-B) and instruction->style retrieval (stage 2b).

For each query the candidates are ranked by similarity; the query is correct at k when one of its
positives is among the k best. This is the R@k of image-text retrieval (e.g. CLIP, Radford et al. 2021,
Sec. 3.1; BLIP-2, Li et al. 2023, Table 4), with several positives per query allowed (MEAD clips share
instructions) and ties counted against the query.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from avi_jax.errors import InputError


def retrieval_metrics(sim: jax.Array, positives: jax.Array, ks: Sequence[int] = (1, 5)
                      ) -> dict[str, jax.Array]:
    """Retrieval accuracy at k (query -> candidate) from a similarity matrix.

    A query (row) is correct at k if any of its positives ranks in the top k. The rank of a query
    is the number of *negatives* whose score is >= its best positive's score (ties count against
    the query, so a constant ``sim`` scores 0 unless k >= M); correct at k iff rank < k.

    Args:
      sim: (N, M) float (numpy or jax), similarity of query i to candidate j (higher is closer).
      positives: (N, M) bool, True where candidate j is a correct answer for query i (several
        positives per row are allowed: duplicate instructions).
      ks: the k values.

    Returns:
      ``{"top{k}": float32 accuracy, ..., "retrieval_chance": 1 / M, "positive_rate": mean over
      queries of (#positives / M), "num_queries": N_eval}``. ``retrieval_chance`` is the top-1
      accuracy of a random ranking with one positive per query (the usual reference line);
      ``positive_rate`` is its multi-positive counterpart. Queries without any positive are
      excluded from the means (``num_queries`` counts the rest).

    Raises:
      InputError: shapes differ or are not 2-D.
    """
    if sim.ndim != 2 or positives.shape != sim.shape:
        raise InputError(f"retrieval_metrics expects sim and positives of the same (N, M) shape, got "
                         f"{sim.shape} and {positives.shape}")
    m = sim.shape[1]
    sim = jnp.asarray(sim, jnp.float32)
    positives = jnp.asarray(positives, bool)
    has_pos = positives.any(axis=-1)
    best_pos = jnp.max(jnp.where(positives, sim, -jnp.inf), axis=-1)
    rank = jnp.sum(~positives & (sim >= best_pos[:, None]), axis=-1)
    n = jnp.maximum(has_pos.sum(), 1)
    out = {f"top{k}": jnp.sum(has_pos & (rank < k)) / n for k in ks}
    out["retrieval_chance"] = jnp.asarray(1.0 / m, jnp.float32)
    out["positive_rate"] = jnp.sum(jnp.where(has_pos, positives.sum(-1) / m, 0.0)) / n
    out["num_queries"] = has_pos.sum()
    return {key: jnp.asarray(v, jnp.float32) for key, v in out.items()}


__all__ = ["retrieval_metrics"]
