"""Motion and diversity evaluation of an export against a prepared reference split (the library behind
``python -m avi_jax.evaluate``).

An export holds one prediction per reference clip (or K samples), in any layout of
:mod:`avi_jax.metrics.predictions` (ours, or another method's ``<clip_id>.npz`` / ``.npy`` with FLAME
coefficients or vertices). Each is matched by clip id to a record of the reference split that has
coefficients; prediction and reference are cut to the shorter length (the frames cut are counted).

* motion (sample 0): coefficient-space errors whenever the prediction has coefficients; with a FLAME model (and
  its ``FLAME_masks.pkl``) the vertex metrics of :mod:`avi_jax.metrics.motion` on vertices in millimetres,
  with the mean identity and the head at rest (the template is the model's ``v_template``). Vertex-only
  predictions get the vertex metrics only (they need the FLAME model for the reference's vertices).
* diversity (clips with K >= 2 samples): the paper's, :func:`avi_jax.metrics.diversity.diversity` on the style
  embeddings the samples store (``style``), and the vertex-space one, the mean pairwise per-vertex L2 distance
  between the samples' vertex sequences (mm; coefficient space when there is no FLAME model).

Vertices are computed in batches of clips padded to a multiple of 64 frames (one jit compilation per batch
shape) and reduced clip by clip, so a split's vertices never all exist at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from avi_jax.errors import InputError
from avi_jax.metrics import motion
from avi_jax.metrics.diversity import diversity, pairwise_mean_distance
from avi_jax.metrics.predictions import Prediction, find_samples, load_prediction

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
    "diversity_style": "AVI-Talking Diversity (paper Sec. IV-A, Table 4): mean pairwise L2 distance between the "
                       "style embeddings sampled for the same audio (and window), mean over clips x windows",
    "diversity_vertex_mm": "mean pairwise L2 distance between the samples' vertex sequences, per vertex, mean "
                           "over frames, vertices, pairs and clips (mm)",
    "diversity_coefficient": "mean pairwise L2 distance between the samples' 53-d coefficient vectors "
                             "(expression ++ jaw pose), mean over frames, pairs and clips",
}
MM = 1000.0      # FLAME vertices are in metres
BATCH_FRAMES = 2048


@dataclasses.dataclass
class Clip:
    """A reference clip with its predictions: ``gt`` (T, 53) float64 reference coefficients; ``samples``;
    ``audio`` the reference speech (N,) at 16 kHz as the record stores it (float in [-1, 1] or int16)."""
    clip_id: str
    gt: np.ndarray
    samples: list[Prediction]
    audio: np.ndarray | None = None


def match_clips(export_dir: str, dataset: str, split: str, num_vertices: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Pair the export's predictions with the reference split's records that have coefficients.

    Returns a dict: ``clips`` [:class:`Clip`], ``missing`` (reference clips with no prediction),
    ``no_reference`` (records without coefficients), ``reference_clips``.

    Raises:
      InputError: ``export_dir`` is not a folder, a prediction file is bad (naming it), or no clip matches.
    """
    import os
    from tqdm import tqdm
    from avi_jax.data import builder

    if not os.path.isdir(export_dir):
        raise InputError(f"{export_dir}: no such export folder")
    source = builder.open_split(dataset, split)
    clips, missing, no_reference = [], [], []
    for i in tqdm(range(len(source)), desc="read", unit="clip", disable=not progress, leave=False):
        rec = source[i]
        clip_id = builder.text(rec["clip_id"])
        if not bool(rec["has_coefficients"]):
            no_reference.append(clip_id)
            continue
        paths = find_samples(export_dir, clip_id)
        if not paths:
            missing.append(clip_id)
            continue
        gt = np.concatenate([np.asarray(rec["expression"], np.float64), np.asarray(rec["jaw_pose"], np.float64)], -1)
        clips.append(Clip(clip_id, gt, [load_prediction(p, num_vertices) for p in paths], np.asarray(rec["audio"])))
    if not clips:
        raise InputError(f"{export_dir}: none of the {len(source)} clips of split {split!r} of {dataset} has "
                         f"a prediction (expected <clip_id>/coefficients.npz, <clip_id>.npz or <clip_id>.npy); "
                         f"e.g. missing: {missing[:5]}")
    return {"clips": clips, "missing": missing, "no_reference": no_reference, "reference_clips": len(source)}


def flame_vertices_mm(flame: Any, motions: Sequence[np.ndarray | None]) -> Iterator[np.ndarray | None]:
    """FLAME vertices (T_i, V, 3) float32 in mm of each motion (T_i, 53) (None stays None), in order.

    FLAME acts frame by frame, so consecutive clips' frames are concatenated and evaluated in chunks of
    ``BATCH_FRAMES`` frames (the last one zero-padded) by one jitted call each: one compilation, no padding
    per clip, at most about ``BATCH_FRAMES`` frames plus one clip's vertices held at once."""
    import jax
    from avi_jax.models.flame import motion_to_vertices

    to_vertices = jax.jit(lambda model, m: motion_to_vertices(model, m) * MM)
    ready: dict[int, np.ndarray] = {}
    nxt = 0
    for i, m in enumerate(motions):
        if m is None:
            yield None
            continue
        if i not in ready:                          # evaluate the next group of clips (from i on)
            group, frames = [], 0
            for j in range(max(i, nxt), len(motions)):
                if motions[j] is None:
                    continue
                group.append(j)
                frames += len(motions[j])
                if frames >= BATCH_FRAMES:
                    break
            flat = np.concatenate([np.asarray(motions[j], np.float32) for j in group])
            chunks = -(-len(flat) // BATCH_FRAMES)
            padded = np.zeros((chunks * BATCH_FRAMES, flat.shape[1]), np.float32)
            padded[:len(flat)] = flat
            out = np.concatenate([np.asarray(to_vertices(flame, padded[c * BATCH_FRAMES:(c + 1) * BATCH_FRAMES]))
                                  for c in range(chunks)])
            offset = 0
            for j in group:
                ready[j] = out[offset:offset + len(motions[j])]
                offset += len(motions[j])
            nxt = group[-1] + 1
        yield ready.pop(i)


def _region(masks: dict, *names: str) -> np.ndarray:
    absent = [n for n in names if n not in masks]
    if absent:
        raise InputError(f"the FLAME masks have no region {absent} (available: {sorted(masks)}); "
                         "give FLAME_masks.pkl beside the model")
    return np.unique(np.concatenate([np.asarray(masks[n], np.int64) for n in names]))


def _cut(clip: Clip) -> tuple[Prediction, np.ndarray, int]:
    """Sample 0 and the reference cut to the shorter length; and the frames cut."""
    p = clip.samples[0]
    t = min(p.num_frames, len(clip.gt))
    return p, clip.gt[:t], abs(p.num_frames - len(clip.gt))


def vertex_metrics(flame: Any, clips: Sequence[Clip], progress: bool = True) -> dict[str, float]:
    """LVE (both variants), FDD and MVE in mm / mm^2 of sample 0 of each clip against its reference, with
    ``flame`` from ``avi_jax.checkpoints.flame.load_flame_model(path, masks_path)``; each per-clip reduction is
    :mod:`avi_jax.metrics.motion`'s, aggregated as its list functions do (frame-weighted LVE and MVE,
    clip-weighted FDD)."""
    from tqdm import tqdm

    lips = _region(flame.masks, "lips")
    upper = _region(flame.masks, "forehead", "eye_region")
    template = np.asarray(flame.v_template, np.float64) * MM
    cut = [_cut(c) for c in clips]
    pred_motion = [p.motion[:len(g)] if p.motion is not None and p.vertices is None else None for p, g, _ in cut]
    gts = flame_vertices_mm(flame, [g.astype(np.float32) for _, g, _ in cut])
    preds = flame_vertices_mm(flame, pred_motion)
    lip_sq, dyn, err_sum, frames = [], [], 0.0, 0
    for (p, g, _), gv, pv in tqdm(zip(cut, gts, preds), total=len(cut), desc="vertex metrics", unit="clip",
                                  disable=not progress, leave=False):
        if pv is None:
            pv = p.vertices[:len(g)] * np.float32(MM)
        lip_sq.append(motion.lip_max_sq_error(pv, gv, lips))
        dyn.append(motion.upper_face_dynamics(gv, template, upper) - motion.upper_face_dynamics(pv, template, upper))
        err_sum += motion.mean_vertex_error([pv], [gv]) * len(g)
        frames += len(g)
    lip_sq = np.concatenate(lip_sq)
    return {"lve_max_sq_mm2": float(np.mean(lip_sq)), "lve_max_l2_mm": float(np.mean(np.sqrt(lip_sq))),
            "fdd_mm2": float(np.mean(dyn)), "mve_mm": err_sum / frames}


def evaluate_motion(matched: dict[str, Any], flame: Any = None, progress: bool = True) -> dict[str, Any]:
    """The motion section: ``metrics`` (coefficient-space when the predictions have coefficients, vertex metrics
    when ``flame`` is given), ``variants``, ``unavailable`` {name: reason}, ``counts`` (clips, frames,
    frames_trimmed, reference_clips, missing, no_reference, vertex_only), ``missing`` and ``no_reference``
    clip ids. ``matched`` from :func:`match_clips`."""
    clips = matched["clips"]
    cut = [_cut(c) for c in clips]
    coef = [(p, g) for p, g, _ in cut if p.expression is not None]
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if len(coef) == len(cut):
        metrics.update(motion.coefficient_errors([p.expression[:len(g)] for p, g in coef], [g[:, :50] for _, g in coef],
                                                 [p.jaw_pose[:len(g)] for p, g in coef], [g[:, 50:] for _, g in coef]))
    else:
        for k in ("expression_mse", "jaw_mse", "jaw_open_pearson"):
            unavailable[k] = f"{len(cut) - len(coef)} of {len(cut)} predictions hold vertices only"
    if flame is not None:
        metrics.update(vertex_metrics(flame, clips, progress))
    else:
        for k in ("lve_max_sq_mm2", "lve_max_l2_mm", "fdd_mm2", "mve_mm"):
            unavailable[k] = "no --flame-model given (FLAME generic_model.pkl with FLAME_masks.pkl beside it)"
    return {"metrics": metrics, "variants": {k: VARIANTS[k] for k in metrics}, "unavailable": unavailable,
            "counts": {"clips": len(cut), "frames": int(sum(len(g) for _, g, _ in cut)),
                       "frames_trimmed": int(sum(t for _, _, t in cut)),
                       "reference_clips": matched["reference_clips"], "missing": len(matched["missing"]),
                       "no_reference": len(matched["no_reference"]), "vertex_only": len(cut) - len(coef)},
            "missing": matched["missing"], "no_reference": matched["no_reference"]}


def evaluate_diversity(matched: dict[str, Any], flame: Any = None, progress: bool = True) -> dict[str, Any]:
    """The diversity section (Table 4) over the clips with K >= 2 samples: ``metrics`` ``diversity_style``
    (when every sample stores ``style``) and ``diversity_vertex_mm`` (with ``flame``, or vertex predictions)
    or else ``diversity_coefficient``; ``variants``; ``unavailable``; ``counts`` (clips, samples_per_clip)."""
    from tqdm import tqdm

    multi = [c for c in matched["clips"] if len(c.samples) >= 2]
    counts = {"clips": len(multi), "samples_per_clip": sorted({len(c.samples) for c in multi})}
    if not multi:
        reason = "one sample per clip; export with --num-samples K >= 2 (the paper uses K = 10)"
        return {"metrics": {}, "variants": {}, "counts": counts,
                "unavailable": {"diversity_style": reason, "diversity_vertex_mm": reason}}
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if all(s.style is not None for c in multi for s in c.samples):
        rows = [np.stack([s.style[w] for s in c.samples]) for c in multi for w in range(c.samples[0].style.shape[0])]
        metrics["diversity_style"] = diversity(np.stack(rows))
    else:
        unavailable["diversity_style"] = "the samples store no 'style' embedding (another method's export)"
    if flame is not None or all(s.vertices is not None for c in multi for s in c.samples):
        flat = [s for c in multi for s in c.samples]
        verts = flame_vertices_mm(flame, [s.motion if s.vertices is None else None for s in flat]) \
            if flame is not None else iter([None] * len(flat))
        per_clip, it = [], iter(zip(flat, verts))
        for c in tqdm(multi, desc="diversity", unit="clip", disable=not progress, leave=False):
            vs = [v if v is not None else s.vertices * np.float32(MM) for s, v in (next(it) for _ in c.samples)]
            t = min(len(v) for v in vs)
            per_clip.append(pairwise_mean_distance(np.stack([v[:t] for v in vs])))
        metrics["diversity_vertex_mm"] = float(np.mean(per_clip))
    elif all(s.motion is not None for c in multi for s in c.samples):
        per_clip = []
        for c in multi:
            t = min(s.num_frames for s in c.samples)
            per_clip.append(pairwise_mean_distance(np.stack([s.motion[:t] for s in c.samples])))
        metrics["diversity_coefficient"] = float(np.mean(per_clip))
        unavailable["diversity_vertex_mm"] = "no --flame-model given: reported in coefficient space instead"
    else:
        unavailable["diversity_vertex_mm"] = "vertex-only samples mixed with coefficient samples and no FLAME model"
    return {"metrics": metrics, "variants": {k: VARIANTS[k] for k in metrics}, "unavailable": unavailable,
            "counts": counts}


__all__ = ["VARIANTS", "Clip", "match_clips", "flame_vertices_mm", "vertex_metrics", "evaluate_motion",
           "evaluate_diversity"]
