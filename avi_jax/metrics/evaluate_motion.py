"""Motion evaluation of an export against a prepared reference split (the library behind
``python -m avi_jax.evaluate``).

An export (``python -m avi_jax.export``) holds ``DIR/<clip_id>/coefficients.npz`` (or
``DIR/<clip_id>/sample_0/coefficients.npz`` with several samples per clip; sample 0 is scored) with
``expression`` (T, 50) and ``jaw_pose`` (T, 3). Each is matched by clip id to a record of the reference split
that has coefficients; prediction and reference are cut to the shorter length (the frames cut are counted).
Coefficient-space metrics are always computed; with a FLAME model (and its ``FLAME_masks.pkl``) the vertex
metrics of :mod:`avi_jax.metrics.motion` on vertices in millimetres, with the mean identity and the head at
rest (the template is the model's ``v_template``).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from avi_jax.errors import InputError
from avi_jax.metrics import motion

VARIANTS = {
    "expression_mse": "mean over frames and the 50 FLAME expression coefficients of the squared error",
    "jaw_mse": "mean over frames and the 3 jaw axis-angle components of the squared error (rad^2)",
    "jaw_open_pearson": "Pearson r of jaw_pose[:, 0] over all frames of all clips",
    "lve_max_sq_mm2": "FaceFormer/CodeTalker LVE: per frame the max squared L2 lip-vertex error, mean over "
                      "all frames (mm^2; FLAME_masks 'lips')",
    "lve_max_l2_mm": "MeshTalk/FaceFormer LVE: per frame the max L2 lip-vertex error, mean over all frames (mm)",
    "fdd_mm2": "CodeTalker FDD: per clip mean over upper-face vertices ('forehead' + 'eye_region') of the "
               "std over time of ||v - template||^2, GT minus prediction, mean over clips (mm^2)",
    "mve_mm": "mean vertex error: L2 over all vertices and frames (mm)",
}
MM = 1000.0      # FLAME vertices are in metres


def find_prediction(export_dir: str, clip_id: str) -> str | None:
    """Path of a clip's ``coefficients.npz`` in an export (``<clip_id>/`` or ``<clip_id>/sample_0/``), or None."""
    for sub in ((clip_id,), (clip_id, "sample_0")):
        path = os.path.join(export_dir, *sub, "coefficients.npz")
        if os.path.isfile(path):
            return path
    return None


def load_coefficients(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(expression (T, 50), jaw_pose (T, 3))`` float64 from a ``coefficients.npz``.

    Raises:
      InputError: unreadable, a field missing, or a wrong shape (the message names the file).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: np.asarray(f[k], np.float64) for k in ("expression", "jaw_pose") if k in f.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from e
    for key, n in (("expression", 50), ("jaw_pose", 3)):
        if key not in data:
            raise InputError(f"{path}: no field {key!r}")
        if data[key].ndim != 2 or data[key].shape[1] != n:
            raise InputError(f"{path}: {key} has shape {data[key].shape}, expected (T, {n})")
    if len(data["expression"]) != len(data["jaw_pose"]):
        raise InputError(f"{path}: expression has {len(data['expression'])} frames, jaw_pose "
                         f"{len(data['jaw_pose'])}")
    return data["expression"], data["jaw_pose"]


def match_clips(export_dir: str, dataset: str, split: str) -> dict[str, Any]:
    """Pair the export's clips with the reference split's records that have coefficients.

    Returns a dict: ``pairs`` [(clip_id, pred_expr, pred_jaw, gt_expr, gt_jaw)] cut to the shorter length,
    ``missing`` (reference clips with no prediction), ``no_reference`` (records without coefficients),
    ``frames_trimmed`` (frames cut, summed over clips), ``reference_clips``.

    Raises:
      InputError: ``export_dir`` is not a folder, or no clip matches.
    """
    from avi_jax.data import builder

    if not os.path.isdir(export_dir):
        raise InputError(f"{export_dir}: no such export folder")
    source = builder.open_split(dataset, split)
    pairs, missing, no_reference, trimmed = [], [], [], 0
    for i in range(len(source)):
        rec = source[i]
        clip_id = builder.text(rec["clip_id"])
        if not bool(rec["has_coefficients"]):
            no_reference.append(clip_id)
            continue
        path = find_prediction(export_dir, clip_id)
        if path is None:
            missing.append(clip_id)
            continue
        pe, pj = load_coefficients(path)
        ge = np.asarray(rec["expression"], np.float64)
        gj = np.asarray(rec["jaw_pose"], np.float64)
        t = min(len(pe), len(ge))
        trimmed += abs(len(pe) - len(ge))
        if t == 0:
            raise InputError(f"{path}: no frames to compare (prediction {len(pe)}, reference {len(ge)})")
        pairs.append((clip_id, pe[:t], pj[:t], ge[:t], gj[:t]))
    if not pairs:
        raise InputError(f"{export_dir}: none of the {len(source)} clips of split {split!r} of {dataset} has "
                         f"a prediction (expected <clip_id>/coefficients.npz); e.g. missing: {missing[:5]}")
    return {"pairs": pairs, "missing": missing, "no_reference": no_reference, "frames_trimmed": trimmed,
            "reference_clips": len(source)}


def _region(masks: dict, *names: str) -> np.ndarray:
    absent = [n for n in names if n not in masks]
    if absent:
        raise InputError(f"the FLAME masks have no region {absent} (available: {sorted(masks)}); "
                         "give FLAME_masks.pkl beside the model")
    return np.unique(np.concatenate([np.asarray(masks[n], np.int64) for n in names]))


def vertex_metrics(flame: Any, pairs: list) -> dict[str, float]:
    """LVE (both variants), FDD and MVE, in mm/mm^2, of ``pairs`` from :func:`match_clips`, with ``flame``
    from ``avi_jax.checkpoints.flame.load_flame_model(path, masks_path)``."""
    import jax
    from avi_jax.models.flame import motion_to_vertices

    lips = _region(flame.masks, "lips")
    upper = _region(flame.masks, "forehead", "eye_region")
    to_vertices = jax.jit(motion_to_vertices)
    template = np.asarray(flame.v_template, np.float64) * MM

    def vertices(expr, jaw):                      # padded to a multiple of 64 frames: few compilations
        motion = np.concatenate([expr, jaw], -1).astype(np.float32)
        t = len(motion)
        padded = np.zeros((-(-t // 64) * 64, motion.shape[1]), np.float32)
        padded[:t] = motion
        return np.asarray(to_vertices(flame, padded), np.float64)[:t] * MM

    preds, gts = [], []
    for _, pe, pj, ge, gj in pairs:
        preds.append(vertices(pe, pj))
        gts.append(vertices(ge, gj))
    return {"lve_max_sq_mm2": motion.lve_max_sq(preds, gts, lips),
            "lve_max_l2_mm": motion.lve_max_l2(preds, gts, lips),
            "fdd_mm2": motion.fdd(preds, gts, [template] * len(preds), upper),
            "mve_mm": motion.mean_vertex_error(preds, gts)}


def evaluate_motion(export_dir: str, dataset: str, split: str, flame: Any = None) -> dict[str, Any]:
    """Every motion figure of an export as a JSON-ready dict: ``metrics`` (coefficient-space always, vertex
    metrics when ``flame`` is given), ``variants`` (the definition of each metric reported), ``counts``
    (clips, frames, frames_trimmed, reference_clips), ``missing`` and ``no_reference`` clip ids, and
    ``vertex_metrics`` (None, or the reason they were skipped)."""
    m = match_clips(export_dir, dataset, split)
    pairs = m["pairs"]
    metrics = motion.coefficient_errors([p[1] for p in pairs], [p[3] for p in pairs],
                                        [p[2] for p in pairs], [p[4] for p in pairs])
    skipped = "no --flame-model given"
    if flame is not None:
        metrics.update(vertex_metrics(flame, pairs))
        skipped = None
    return {"metrics": metrics, "variants": {k: VARIANTS[k] for k in metrics},
            "counts": {"clips": len(pairs), "frames": int(sum(len(p[1]) for p in pairs)),
                       "frames_trimmed": int(m["frames_trimmed"]), "reference_clips": m["reference_clips"],
                       "missing": len(m["missing"]), "no_reference": len(m["no_reference"])},
            "missing": m["missing"], "no_reference": m["no_reference"], "vertex_metrics_skipped": skipped}


__all__ = ["VARIANTS", "find_prediction", "load_coefficients", "match_clips", "vertex_metrics", "evaluate_motion"]
