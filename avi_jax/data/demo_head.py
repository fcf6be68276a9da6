"""A procedural stand-in FLAME head for the demo: a talking head when no FLAME model is available.

**This is not FLAME and not a real face.** FLAME (Li et al., SIGGRAPH Asia 2017) needs a registration
at https://flame.is.tue.mpg.de; a fresh machine does not have it, yet the demo must still turn the
coefficients of the DEMO CORPUS (:mod:`avi_jax.data.demo`) into a moving 3D head. This module writes a
deterministic, hand-built head in FLAME 2020's own file layout, so that everything downstream
(``avi_jax.checkpoints.flame.load_flame_model``, ``avi_jax.models.flame.flame_forward``, the vertex losses,
the renderer) runs unchanged. With the real model, pass its ``generic_model.pkl`` (and ``FLAME_masks.pkl``)
with ``--flame-model`` / ``config.flame.model_path`` (``--flame-masks`` / ``config.flame.masks_path``)
instead; nothing here is used then.

Files (``write_demo_head(folder, seed)`` -> ``folder/demo_head_v{VERSION}_seed{seed}/generic_model.pkl``):

- ``generic_model.pkl``: a plain pickled dict (protocol 2, numpy arrays, float32) with FLAME 2020's entries
  and semantics: ``v_template`` (V, 3) metres, ``f`` (F, 3) uint32, ``shapedirs`` (V, 3, 400) = 300 identity
  + 100 expression components, ``posedirs`` (V, 3, 36), ``J_regressor`` (5, V) scipy.sparse CSC,
  ``J`` (5, 3), ``kintree_table`` (2, 5) uint32 with the root's parent 2**32 - 1, ``weights`` (V, 5),
  ``bs_style`` 'lbs', ``bs_type`` 'lrotmin'. V = 5499 and F = 10986 here (FLAME: 5023 / 9976; the
  loader takes the counts from the file, but ``load_flame_masks`` needs ``num_vertices=V``).
- ``FLAME_masks.pkl``: ``{region name: int64 vertex indices}`` like FLAME's masks file (:data:`REGIONS`),
  plus 'lip_corners' ([left, right]) and 'lip_centres' ([upper, lower]) for :func:`lip_corner_height`.
- ``demo_head.json``: version, seed, counts and the SHA-256 of both files, written last; a call that finds
  it matching returns at once (idempotent). Every file is written to a temporary name and renamed.

How the head is built (all in metres; +y up, +z = the face's front, +x = the subject's left, as FLAME):

1. *Skin*: a latitude/longitude grid (64 rings x 80 columns, denser over the face) whose horizontal
   sections follow a head profile (an ellipsoidal cranium ~0.15 m wide, a narrower jaw, a neck down to
   y = -0.15; 0.2 m from chin to crown), plus smooth bumps: nose (2 cm), brow ridge, eye sockets,
   cheekbones, lids around an almond-shaped eye opening, lips, chin and ears. Mirror-symmetric in x.
2. *Mouth*: the ring at the mouth's height is cut between the two lip-corner vertices: the upper lip keeps
   the ring's vertices, the lower lip gets copies (coincident at rest: a closed mouth), and a pocket (the
   mouth interior) closes the opening, so the surface stays watertight and rotating the jaw opens the lips
   (over the middle 60 % of the mouth; towards the corners both lips follow the jaw halfway, so the
   opening is lens-shaped).
3. *Eyes*: two eyeballs (icospheres, radius 12.5 mm, with a corneal bulge) in the sockets, 7 mm proud
   of the skin.
4. *Joints and skinning* (FLAME's 5 joints and kinematic tree): root (neck base), neck, jaw (a hinge
   near the ears, 2.8 cm above and 9 cm behind the mouth, so ``jaw_pose[0] > 0`` opens the mouth as in
   FLAME), left and right eye. ``J_regressor`` averages symmetric vertex sets (neck rings, points beside
   the ears, eyeball equators), so joints follow identity changes. Lower lip, chin, jaw and mouth floor
   are skinned to the jaw, with weights falling off smoothly towards the cheeks and the neck; the rest of
   the head to the neck joint, the lower neck to the root, eyeballs to their eye joints.
5. *Expression* (``shapedirs[..., 300:350]``): for each FACS action of
   :data:`avi_jax.data.instructions.ACTIONS` a displacement field D_a (V, 3) over Gaussian-falloff
   regions (:func:`action_displacements`: lip corners up and out for AU12, down for AU15, brows up for
   AU1/AU2, ...), and for the demo corpus' speech direction a lip-parting field. The 50 expression
   blendshapes E (3V, 50) are the minimum-norm solution of ``E B^T = D`` with B the (18, 50) stacked
   :func:`demo.action_basis` (``seed``) and :func:`demo.mouth_direction` (``seed``):
   ``E = D (B B^T)^-1 B``. So the demo corpus' coefficient vectors move this head the way their
   instructions say, exactly for each single action and linearly for mixtures; the 20 expression
   dimensions the demo corpus never uses (30..49) and components 50..99 are zero. Other vectors in
   dimensions 0..29 (the corpus' per-speaker offsets and noise) map to mixtures of the same fields,
   amplified along poorly conditioned directions of B (a few mm at most for seeds 0..11).
6. *Identity* (``shapedirs[..., :300]``): components 0..9 are named variations (head width, height,
   jaw width, nose length, face length, cheeks, brow ridge, lips, skull depth, forehead), 10..29 smooth
   random fields (fixed, independent of ``seed``), the rest zero.
7. *Pose correctives* (``posedirs``) are zero: plain linear blend skinning.

Only the expression blendshapes depend on ``seed`` (the demo corpus' seed, ``config.data.demo.seed``);
the geometry, masks, joints and identity space are the same for every seed.

Code: steps 1-4 in :mod:`avi_jax.data.demo_head_geometry`, steps 5-6 in
:mod:`avi_jax.data.demo_head_blendshapes`; this module assembles and writes the files and measures the
result (:func:`lip_corner_height`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import tempfile
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.sparse

from avi_jax.data.demo_head_blendshapes import (action_displacements, expression_blendshapes,
                                                identity_blendshapes)
from avi_jax.data.demo_head_geometry import (JOINT_NAMES, REGIONS, build_head, jaw_weights,
                                             joint_regressor, region_masks, skinning_weights)
from avi_jax.data.schema import N_EXPRESSION
from avi_jax.errors import ConfigError, InputError

__all__ = [
    "VERSION", "MODEL_FILE", "MASKS_FILE", "INFO_FILE", "REGIONS", "JOINT_NAMES", "DemoHeadPaths",
    "write_demo_head", "demo_head_paths", "demo_head_dir", "build_demo_head", "action_displacements",
    "lip_corner_height",
]

VERSION = 1
MODEL_FILE = "generic_model.pkl"
MASKS_FILE = "FLAME_masks.pkl"
INFO_FILE = "demo_head.json"
_ROOT_PARENT = np.uint32(2**32 - 1)


# ---------------------------------------------------------------------------------------------
# The files.
# ---------------------------------------------------------------------------------------------

def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ConfigError(f"demo head: seed must be a non-negative integer (the demo corpus' seed, "
                          f"config.data.demo.seed), got {seed!r}")
    return int(seed)


def build_demo_head(seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The demo head's two FLAME-layout dicts, in memory (what :func:`write_demo_head` pickles).

    Args:
      seed: the demo corpus' seed (``config.data.demo.seed``); the expression blendshapes follow its
        ``demo.action_basis(seed)`` / ``demo.mouth_direction(seed)``.

    Returns:
      (model, masks): ``model`` with FLAME 2020's ``generic_model.pkl`` entries (float32 arrays, see the
      module docstring), ``masks`` = ``{region: (n,) int64 vertex indices}`` for :data:`REGIONS`.

    Raises:
      ConfigError: ``seed`` is not a non-negative integer.
    """
    seed = _check_seed(seed)
    h = build_head()
    n_v = len(h.verts)
    weights = skinning_weights(h)
    reg = joint_regressor(h)
    shapedirs = np.zeros((n_v, 3, 400))
    shapedirs[:, :, :300] = identity_blendshapes(h)
    shapedirs[:, :, 300:300 + N_EXPRESSION] = expression_blendshapes(h, seed)
    v_template = h.verts.astype(np.float32)
    j_reg = scipy.sparse.csc_matrix(reg.astype(np.float32))
    model = {
        "v_template": v_template,
        "f": h.faces.astype(np.uint32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": np.zeros((n_v, 3, 36), np.float32),
        "J_regressor": j_reg,
        "J": (j_reg @ v_template.astype(np.float64)).astype(np.float32),
        "kintree_table": np.array([[_ROOT_PARENT, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.uint32),
        "weights": weights.astype(np.float32),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    return model, region_masks(h, jaw_weights(h))


class DemoHeadPaths(NamedTuple):
    """Where the demo head lives: ``model`` (generic_model.pkl) and ``masks`` (FLAME_masks.pkl)."""

    model: pathlib.Path
    masks: pathlib.Path


def demo_head_dir(folder: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """``folder/demo_head_v{VERSION}_seed{seed}``: the versioned folder the files are written to."""
    return pathlib.Path(folder).expanduser() / f"demo_head_v{VERSION}_seed{_check_seed(seed)}"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(d: pathlib.Path, seed: int) -> bool:
    try:
        info = json.loads((d / INFO_FILE).read_text())
        return (info.get("version") == VERSION and info.get("seed") == seed
                and all(_sha256(d / name) == info.get("sha256", {}).get(name)
                        for name in (MODEL_FILE, MASKS_FILE)))
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_demo_head(folder: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """Write (or reuse) the stand-in head; returns the path of its ``generic_model.pkl``.

    The files go to :func:`demo_head_dir` (``folder/demo_head_v{VERSION}_seed{seed}/``):
    ``generic_model.pkl`` (load with ``avi_jax.checkpoints.flame.load_flame_model``; or pass the path, or
    its folder, as ``--flame-model`` / ``config.flame.model_path``), ``FLAME_masks.pkl`` beside it
    (``load_flame_masks`` / ``config.flame.masks_path``) and ``demo_head.json``. Each is written to a
    temporary name and renamed; ``demo_head.json`` (with the files' SHA-256) last, and a call that
    finds it matching this version and seed reuses the files. The bytes are a pure function of
    ``seed`` (and the numpy/scipy versions' pickle layout).

    Args:
      folder: where to create the versioned folder (created if missing).
      seed: the demo corpus' seed (``config.data.demo.seed``), which fixes the expression basis.

    Returns:
      ``pathlib.Path`` of ``generic_model.pkl``.

    Raises:
      ConfigError: ``seed`` is not a non-negative integer.
      InputError: the folder cannot be created or written (names it).
    """
    seed = _check_seed(seed)
    d = demo_head_dir(folder, seed)
    if _is_complete(d, seed):
        return d / MODEL_FILE
    model, masks = build_demo_head(seed)
    blobs = {MASKS_FILE: pickle.dumps(masks, protocol=2), MODEL_FILE: pickle.dumps(model, protocol=2)}
    info = {"version": VERSION, "seed": seed, "num_vertices": int(model["v_template"].shape[0]),
            "num_faces": int(model["f"].shape[0]), "joints": list(JOINT_NAMES),
            "regions": list(REGIONS),
            "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()},
            "note": "procedural stand-in for FLAME (not FLAME, not a real face); see "
                    "avi_jax/data/demo_head.py. The real model: https://flame.is.tue.mpg.de"}
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name, blob in blobs.items():
            _write_atomic(d / name, blob)
        _write_atomic(d / INFO_FILE, (json.dumps(info, indent=1) + "\n").encode())
    except OSError as e:
        raise InputError(f"cannot write the demo head to {d}: {e}") from e
    return d / MODEL_FILE


def demo_head_paths(folder: str | os.PathLike[str], seed: int = 0) -> DemoHeadPaths:
    """:func:`write_demo_head` (writing only if needed), returning both file paths."""
    model = write_demo_head(folder, seed)
    return DemoHeadPaths(model=model, masks=model.with_name(MASKS_FILE))


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------

def lip_corner_height(vertices: Any, masks_or_indices: Mapping[str, Any] | Sequence[int] | np.ndarray,
                      centre_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Height of the lip corners, in metres (positive = a smile), per frame.

    With the demo head's masks (a mapping with 'lip_corners' and 'lip_centres', e.g.
    ``FlameModel.masks`` or :func:`build_demo_head`'s masks): the mean y of the two lip corners minus the
    mean y of the upper- and lower-lip centre vertices. That is invariant to translation and, to first
    order, to opening the mouth (both the corners and the centres' midpoint sit halfway between the jaw
    and the head), so it measures AU12 (up) vs AU15 (down). With explicit ``masks_or_indices`` (corner
    vertex indices) and ``centre_indices``, the same; without ``centre_indices``, the corners' mean y.

    Args:
      vertices: (..., V, 3) vertices (numpy or jax), metres, +y up (e.g. ``flame_forward(...).vertices``
        for T frames: (T, V, 3)).
      masks_or_indices: a mapping with 'lip_corners' (and optionally 'lip_centres'), or (n,) corner
        vertex indices.
      centre_indices: optional (m,) reference vertex indices when ``masks_or_indices`` is indices.

    Returns:
      (...,) float32 metres, e.g. (T,).

    Raises:
      InputError: ``vertices`` is not (..., V, 3), the mapping lacks 'lip_corners', or an index is out
        of range.
    """
    v = np.asarray(vertices, np.float64)
    if v.ndim < 2 or v.shape[-1] != 3:
        raise InputError(f"lip_corner_height: vertices have shape {v.shape}, expected (..., V, 3)")
    if isinstance(masks_or_indices, Mapping):
        if "lip_corners" not in masks_or_indices:
            raise InputError(f"lip_corner_height: the masks have no 'lip_corners' region (have "
                             f"{sorted(masks_or_indices)}); the demo head's FLAME_masks.pkl has it, for "
                             f"another model pass the corner vertex indices")
        corners = np.asarray(masks_or_indices["lip_corners"])
        if centre_indices is None and "lip_centres" in masks_or_indices:
            centre_indices = masks_or_indices["lip_centres"]
    else:
        corners = np.asarray(masks_or_indices)
    idx = [np.asarray(corners, np.int64).ravel()]
    if centre_indices is not None:
        idx.append(np.asarray(centre_indices, np.int64).ravel())
    for i in idx:
        if i.size == 0 or i.min() < 0 or i.max() >= v.shape[-2]:
            raise InputError(f"lip_corner_height: vertex indices {i.tolist()} outside [0, {v.shape[-2]})")
    height = v[..., idx[0], 1].mean(axis=-1)
    if len(idx) > 1:
        height = height - v[..., idx[1], 1].mean(axis=-1)
    return height.astype(np.float32)
