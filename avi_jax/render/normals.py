"""Triangle-mesh checks and smooth per-vertex normals, vectorised over frames (numpy + one sparse product).

A vertex normal is the normalised sum of the area-weighted normals ``(v1 - v0) x (v2 - v0)`` of the
triangles around it, so it points out of a mesh whose triangles wind counter-clockwise seen from outside
(FLAME's convention).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

from avi_jax.errors import InputError


def check_faces(faces, n_vertices: int | None = None, *, where: str = "faces") -> np.ndarray:
    """``faces`` as a C-contiguous (F, 3) int32 array of vertex indices.

    Args:
      faces: (F, 3) integer array-like, F > 0.
      n_vertices: when given, every index must be in [0, n_vertices).
      where: the name used in error messages.

    Raises:
      InputError: not (F, 3), not integer, empty, or an index out of range.
    """
    f = np.asarray(faces)
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise InputError(f"{where}: must be (F, 3) triangle vertex indices with F > 0, got shape {f.shape}")
    if f.dtype.kind not in "iu":
        raise InputError(f"{where}: must be an integer array, got dtype {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or (n_vertices is not None and hi >= n_vertices):
        raise InputError(f"{where}: vertex indices span [{lo}, {hi}], outside [0, {n_vertices}) "
                         f"(the mesh has {n_vertices} vertices)")
    return np.ascontiguousarray(f, dtype=np.int32)


def check_vertices(vertices, *, where: str = "vertices") -> np.ndarray:
    """``vertices`` as a C-contiguous (T, V, 3) float32 array (a single (V, 3) frame becomes T = 1).

    Raises:
      InputError: the shape is not (T, V, 3) / (V, 3) with T, V > 0, or a value is NaN/inf.
    """
    v = np.asarray(vertices, dtype=np.float32)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or v.shape[2] != 3 or v.shape[0] == 0 or v.shape[1] == 0:
        raise InputError(f"{where}: must be (T, V, 3) positions in metres with T, V > 0, "
                         f"got shape {np.shape(vertices)}")
    if not np.isfinite(v).all():
        bad = int(np.argmax(~np.isfinite(v).all(axis=(1, 2))))
        raise InputError(f"{where}: NaN or inf coordinates (first in frame {bad})")
    return np.ascontiguousarray(v)


def incidence_matrix(faces: np.ndarray, n_vertices: int) -> scipy.sparse.csr_matrix:
    """(V, F) float32 sparse matrix with a 1 where vertex v is a corner of triangle f.

    Args:
      faces: (F, 3) int32, checked (see :func:`check_faces`).
      n_vertices: V.
    """
    n_faces = faces.shape[0]
    rows = faces.reshape(-1)
    cols = np.repeat(np.arange(n_faces, dtype=np.int32), 3)
    data = np.ones(rows.shape[0], np.float32)
    return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(n_vertices, n_faces), dtype=np.float32)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray,
                   incidence: scipy.sparse.csr_matrix | None = None) -> np.ndarray:
    """Unit per-vertex normals of every frame.

    Args:
      vertices: (T, V, 3) float32, metres.
      faces: (F, 3) int32 with indices in [0, V).
      incidence: :func:`incidence_matrix` of ``faces`` (built here when None; pass it to reuse).

    Returns:
      (T, V, 3) float32 unit vectors. A vertex in no triangle, or only in degenerate ones, gets (0, 0, 0)
      rather than NaN.
    """
    t, v, _ = vertices.shape
    if incidence is None:
        incidence = incidence_matrix(faces, v)
    corners = vertices[:, faces]                                        # (T, F, 3 corners, 3)
    face_n = np.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    summed = incidence @ face_n.transpose(1, 0, 2).reshape(faces.shape[0], t * 3)   # (V, T*3)
    normals = np.ascontiguousarray(summed.reshape(v, t, 3).transpose(1, 0, 2), dtype=np.float32)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    np.divide(normals, length, out=normals, where=length > 0)
    return normals
