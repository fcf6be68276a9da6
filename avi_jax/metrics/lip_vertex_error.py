"""Lip vertex error (LVE) of speech-driven 3D face animation: the one per-frame definition used by training
evaluation (``avi_jax.training.motion``) and by ``python -m avi_jax.evaluate`` (``avi_jax.metrics.motion``).

Per frame, the largest error over the lip vertices (FLAME's ``lips`` region of ``FLAME_masks.pkl``); the LVE
is its mean over all frames. The field reports it in two forms, from the same per-frame maximum:

* squared (FaceFormer, Fan et al. CVPR 2022, and CodeTalker, Xing et al. CVPR 2023, as their evaluation code
  computes it): the largest *squared* L2 error per frame (:func:`lip_max_sq_error`, e.g. mm^2);
* L2 (MeshTalk, Richard et al. ICCV 2021; FaceFormer's paper text): its square root, the largest L2
  distance per frame (:func:`lip_vertex_error`, e.g. mm).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from avi_jax.errors import InputError


def lip_max_sq_error(pred_vertices: jax.Array, target_vertices: jax.Array, lip_indices: jax.Array) -> jax.Array:
    """Per-frame maximum over the lip vertices of the squared L2 distance.

    Args:
      pred_vertices, target_vertices: (..., V, 3) float vertex positions (e.g. (B, F, 5023, 3) FLAME
        vertices in metres; scale them to report millimetres).
      lip_indices: (L,) int indices of the lip vertices in [0, V).

    Returns:
      (...) float32, in the squared unit of the vertices (mm^2 for mm).

    Raises:
      InputError: the vertex arrays differ in shape or are not (..., V, 3).
    """
    if pred_vertices.shape != target_vertices.shape or pred_vertices.ndim < 2 or pred_vertices.shape[-1] != 3:
        raise InputError(f"lip vertex error expects two (..., V, 3) vertex arrays of one shape, got "
                         f"{pred_vertices.shape} and {target_vertices.shape}")
    diff = (jnp.asarray(pred_vertices, jnp.float32) - jnp.asarray(target_vertices, jnp.float32))
    diff = jnp.take(diff, jnp.asarray(lip_indices), axis=-2)
    return jnp.max(jnp.sum(jnp.square(diff), -1), -1)


def lip_vertex_error(pred_vertices: jax.Array, target_vertices: jax.Array, lip_indices: jax.Array
                     ) -> jax.Array:
    """Per-frame lip vertex error: the maximum over the lip vertices of the L2 distance, i.e. the square root
    of :func:`lip_max_sq_error` (same arguments and errors); (...) float32 in the unit of the vertices.
    Average it over the valid frames for the LVE."""
    return jnp.sqrt(lip_max_sq_error(pred_vertices, target_vertices, lip_indices))


__all__ = ["lip_max_sq_error", "lip_vertex_error"]
