"""Lip vertex error (LVE) of speech-driven 3D face animation.

MeshTalk (Richard et al., ICCV 2021) and FaceFormer (Fan et al., CVPR 2022, quantitative evaluation): for each
frame, the largest L2 distance between a predicted and a ground-truth lip vertex; the score is the mean
of that per-frame maximum over all frames of the test set. The lip region is FLAME's ``lips`` vertex mask
(``FLAME_masks.pkl``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from avi_jax.errors import InputError


def lip_vertex_error(pred_vertices: jax.Array, target_vertices: jax.Array, lip_indices: jax.Array
                     ) -> jax.Array:
    """Per-frame lip vertex error: the maximum over the lip vertices of the L2 distance.

    Args:
      pred_vertices, target_vertices: (..., V, 3) float vertex positions (e.g. (B, F, 5023, 3) FLAME
        vertices in metres; scale them to report millimetres).
      lip_indices: (L,) int indices of the lip vertices in [0, V).

    Returns:
      (...) float32, in the unit of the vertices; average it over the valid frames for the LVE.

    Raises:
      InputError: the vertex arrays differ in shape or are not (..., V, 3).
    """
    if pred_vertices.shape != target_vertices.shape or pred_vertices.ndim < 2 or pred_vertices.shape[-1] != 3:
        raise InputError(f"lip_vertex_error expects two (..., V, 3) vertex arrays of one shape, got "
                         f"{pred_vertices.shape} and {target_vertices.shape}")
    diff = (jnp.asarray(pred_vertices, jnp.float32) - jnp.asarray(target_vertices, jnp.float32))
    diff = jnp.take(diff, jnp.asarray(lip_indices), axis=-2)
    return jnp.max(jnp.sqrt(jnp.sum(jnp.square(diff), -1)), -1)


__all__ = ["lip_vertex_error"]
