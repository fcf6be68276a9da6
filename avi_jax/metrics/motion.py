"""Motion metrics of speech-driven 3D face animation, in numpy (float64; the per-frame lip error in float32 from
:mod:`avi_jax.metrics.lip_vertex_error`), each named after its exact variant.

Vertex-space metrics take vertex sequences (T, V, 3) in one unit; :mod:`avi_jax.metrics.evaluate_motion`
passes FLAME vertices in millimetres (metres x 1000), so squared errors are mm^2 and distances mm.

- ``lve_max_sq`` (FaceFormer, Fan et al. CVPR 2022, and CodeTalker, Xing et al. CVPR 2023, ``cal_metric.py``):
  per frame the largest *squared* L2 error over the lip vertices, averaged over all frames (mm^2).
- ``lve_max_l2`` (MeshTalk, Richard et al. ICCV 2021; FaceFormer's paper text): per frame the largest L2
  error over the lip vertices, averaged over all frames (mm).
- ``fdd`` (CodeTalker): upper-face dynamics deviation. For one sequence and each upper-face vertex, the
  standard deviation over time (ddof 0) of the squared norm of its displacement from the template; the
  mean over the vertices is the sequence's dynamics; FDD = dynamics(GT) - dynamics(prediction), averaged
  over the sequences (mm^2; signed, so a prediction more dynamic than GT gives a negative value).
- ``mve``: mean vertex error, the L2 error averaged over frames and vertices (mm).
- coefficient space (no FLAME model needed): expression MSE and jaw-pose MSE (mean over frames and
  components, radians^2 for the jaw), and the Pearson correlation of the jaw opening ``jaw_pose[:, 0]``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from avi_jax.errors import InputError
from avi_jax.metrics import lip_vertex_error
from avi_jax.metrics.correlation import pearson

JAW_OPEN = 0        # jaw_pose[..., 0]: rotation about x, the opening of the mouth (radians)


def _pair(pred, gt, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise InputError(f"{name} expects two (T, V, 3) vertex arrays of one shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def lip_max_sq_error(pred: np.ndarray, gt: np.ndarray, lip_indices: Sequence[int]) -> np.ndarray:
    """Per frame, the largest squared L2 error over the lip vertices: (T, V, 3) x 2 -> (T,) float64 in the
    squared unit (mm^2 for mm), from :func:`avi_jax.metrics.lip_vertex_error.lip_max_sq_error` (the one
    definition, shared with training evaluation)."""
    pred, gt = _pair(pred, gt, "lip_max_sq_error")
    return np.asarray(lip_vertex_error.lip_max_sq_error(pred, gt, np.asarray(lip_indices, np.int64)), np.float64)


def lve_max_sq(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], lip_indices: Sequence[int]) -> float:
    """LVE as FaceFormer/CodeTalker compute it: the per-frame maximum squared lip error, averaged over all
    frames of all sequences (frame-weighted). ``preds``/``gts``: lists of (T_i, V, 3); result in mm^2 for mm."""
    return float(np.mean(np.concatenate([lip_max_sq_error(p, g, lip_indices) for p, g in zip(preds, gts)])))


def lve_max_l2(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], lip_indices: Sequence[int]) -> float:
    """LVE as MeshTalk/FaceFormer's text state it: the per-frame maximum L2 lip error (the square root of
    :func:`lip_max_sq_error`), averaged over all frames of all sequences; mm for mm."""
    return float(np.mean(np.sqrt(np.concatenate([lip_max_sq_error(p, g, lip_indices)
                                                 for p, g in zip(preds, gts)]))))


def upper_face_dynamics(vertices: np.ndarray, template: np.ndarray, upper_indices: Sequence[int]) -> float:
    """CodeTalker's upper-face dynamics of one sequence: mean over the upper-face vertices of the standard
    deviation over time (ddof 0) of ||v_t - template||^2.

    Args:
      vertices: (T, V, 3); template: (V, 3) (same unit); upper_indices: (U,) int (FLAME ``forehead`` +
        ``eye_region``).

    Returns:
      float, squared unit (mm^2).
    """
    vertices = np.asarray(vertices, np.float64)
    template = np.asarray(template, np.float64)
    if vertices.ndim != 3 or template.shape != vertices.shape[1:]:
        raise InputError(f"upper_face_dynamics expects (T, V, 3) vertices and a (V, 3) template, got "
                         f"{vertices.shape} and {template.shape}")
    idx = np.asarray(upper_indices, np.int64)
    sq = np.sum(np.square(vertices[:, idx] - template[idx]), -1)          # (T, U)
    return float(np.mean(np.std(sq, axis=0)))


def fdd(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], templates: Sequence[np.ndarray],
        upper_indices: Sequence[int]) -> float:
    """FDD as CodeTalker defines it: per sequence dynamics(GT) - dynamics(prediction)
    (:func:`upper_face_dynamics`, each against its sequence's template (V, 3)), averaged over the sequences
    (sequence-weighted); mm^2 for mm."""
    if not len(preds) == len(gts) == len(templates) or not preds:
        raise InputError(f"fdd expects equally many (>= 1) predictions, references and templates, got "
                         f"{len(preds)}, {len(gts)}, {len(templates)}")
    return float(np.mean([upper_face_dynamics(g, t, upper_indices) - upper_face_dynamics(p, t, upper_indices)
                          for p, g, t in zip(preds, gts, templates)]))


def mean_vertex_error(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                      indices: Sequence[int] | None = None) -> float:
    """Mean vertex error: the L2 distance averaged over all vertices (or ``indices``) and all frames of all
    sequences (frame-weighted); mm for mm."""
    errs = []
    for p, g in zip(preds, gts):
        p, g = _pair(p, g, "mean_vertex_error")
        if indices is not None:
            idx = np.asarray(indices, np.int64)
            p, g = p[:, idx], g[:, idx]
        errs.append(np.sqrt(np.sum(np.square(p - g), -1)).ravel())
    return float(np.mean(np.concatenate(errs)))


def coefficient_errors(pred_expression: Sequence[np.ndarray], gt_expression: Sequence[np.ndarray],
                       pred_jaw: Sequence[np.ndarray], gt_jaw: Sequence[np.ndarray]) -> dict[str, float]:
    """Coefficient-space errors over all frames of all sequences (frame-weighted).

    Args:
      pred_expression, gt_expression: lists of (T_i, 50) FLAME expression coefficients.
      pred_jaw, gt_jaw: lists of (T_i, 3) jaw axis-angle poses (radians).

    Returns:
      {"expression_mse": mean squared error over frames and the 50 components,
       "jaw_mse": the same over the 3 jaw components (rad^2),
       "jaw_open_pearson": Pearson r of jaw_pose[:, 0] (0.0 when either side is constant)}.
    """
    def cat(xs, n, name):
        arrs = [np.asarray(x, np.float64) for x in xs]
        for a in arrs:
            if a.ndim != 2 or a.shape[1] != n:
                raise InputError(f"coefficient_errors: {name} must be (T, {n}), got {a.shape}")
        return np.concatenate(arrs)

    pe, ge = cat(pred_expression, 50, "expression"), cat(gt_expression, 50, "expression")
    pj, gj = cat(pred_jaw, 3, "jaw_pose"), cat(gt_jaw, 3, "jaw_pose")
    if pe.shape != ge.shape or pj.shape != gj.shape or len(pe) != len(pj):
        raise InputError(f"coefficient_errors: mismatched frames {pe.shape} {ge.shape} {pj.shape} {gj.shape}")
    return {"expression_mse": float(np.mean(np.square(pe - ge))),
            "jaw_mse": float(np.mean(np.square(pj - gj))),
            "jaw_open_pearson": pearson(pj[:, JAW_OPEN], gj[:, JAW_OPEN])}


__all__ = ["lip_max_sq_error", "lve_max_sq", "lve_max_l2", "upper_face_dynamics", "fdd", "mean_vertex_error",
           "coefficient_errors", "JAW_OPEN"]
