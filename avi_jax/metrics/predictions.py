"""Reading a method's predictions for evaluation: ours (``python -m avi_jax.export``) and other methods' files.

Layouts of an export folder ``DIR``, tried in this order for each reference clip id:

1. ``DIR/<clip_id>/coefficients.npz`` (ours, one sample);
2. ``DIR/<clip_id>/sample_K/coefficients.npz``, K = 0, 1, ... (ours with ``--num-samples``; sample 0 is the
   one scored for motion, all of them count for diversity);
3. ``DIR/<clip_id>.npz``  (any method: FLAME coefficients or vertices, keys below);
4. ``DIR/<clip_id>.npy``  (one array: (T, 53) = expression (50) ++ jaw pose (3); or vertices (T, V, 3) or
   (T, V * 3), as FaceFormer and CodeTalker save them);
5. ``DIR/<clip_id>.pkl``  (a pickled dict of arrays with the keys below, as EMOTE's ``save_flame`` writes
   ``flame_*.pkl`` with ``expression``, ``jaw_pose``, ``global_pose``, ``shape``; read by the project's
   restricted unpickler, which admits numpy arrays only).

Keys of an ``.npz`` / ``.pkl`` (first match wins):

* expression (T, 50): ``expression`` (ours, EMOTE), ``exp`` (DiffPoseTalk's ``save_coef_file``, EMOCA);
* jaw pose (T, 3) axis-angle radians: ``jaw_pose`` (ours, EMOTE), ``jaw``; or ``pose`` (T, 6) = global
  rotation (3) ++ jaw (3), the EMOCA/DiffPoseTalk layout (the jaw is ``pose[:, 3:6]``);
* vertices (T, V, 3) or (T, V * 3): ``vertices``, ``verts``, ``vertice``;
* ``style`` (W, D) or (D,): the style embedding that drove the sample (ours; the paper's Diversity).

Vertices are taken as FLAME vertices in metres of the neutral identity with the head at rest (the frame in
which the reference's vertices are computed from its coefficients); V must be the FLAME model's vertex count.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from avi_jax.errors import InputError, UnsafePickleError

N_EXPRESSION, N_JAW = 50, 3
_EXPRESSION_KEYS = ("expression", "exp")
_JAW_KEYS = ("jaw_pose", "jaw")
_VERTEX_KEYS = ("vertices", "verts", "vertice")


@dataclasses.dataclass
class Prediction:
    """One sample of one clip: ``expression`` (T, 50) and ``jaw_pose`` (T, 3) float64 (or both None for a
    vertex-only file), ``vertices`` (T, V, 3) float32 metres or None, ``style`` (W, D) float64 or None."""
    path: str
    expression: np.ndarray | None = None
    jaw_pose: np.ndarray | None = None
    vertices: np.ndarray | None = None
    style: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self.expression) if self.expression is not None else len(self.vertices)

    @property
    def motion(self) -> np.ndarray | None:
        """(T, 53) float32 expression ++ jaw pose, or None."""
        if self.expression is None:
            return None
        return np.concatenate([self.expression, self.jaw_pose], -1).astype(np.float32)


def find_samples(export_dir: str, clip_id: str) -> list[str]:
    """The prediction files of a clip in ``export_dir`` (layouts 1-4 of the module docstring), sample 0
    first; [] when the clip has none."""
    nested = os.path.join(export_dir, clip_id, "coefficients.npz")
    if os.path.isfile(nested):
        return [nested]
    folder = os.path.join(export_dir, clip_id)
    if os.path.isdir(folder):
        ks = sorted(int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"sample_(\d+)", d)))
        found = [os.path.join(folder, f"sample_{k}", "coefficients.npz") for k in ks]
        found = [p for p in found if os.path.isfile(p)]
        if found:
            return found
    for ext in (".npz", ".npy", ".pkl"):
        path = os.path.join(export_dir, clip_id + ext)
        if os.path.isfile(path):
            return [path]
    return []


def _vertices(path: str, key: str, a: np.ndarray, num_vertices: int | None) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] % 3 == 0 and a.shape[1] > N_EXPRESSION + N_JAW:
        a = a.reshape(a.shape[0], -1, 3)
    if a.ndim != 3 or a.shape[2] != 3 or (num_vertices is not None and a.shape[1] != num_vertices):
        v = num_vertices or "V"
        raise InputError(f"{path}: {key} has shape {a.shape}, expected vertices (T, {v}, 3) or (T, {v}*3)")
    return a.astype(np.float32)


def _first(data: dict, keys: tuple[str, ...]):
    return next(((k, data[k]) for k in keys if k in data), (None, None))


def _load_pickled_dict(path: str) -> dict[str, np.ndarray]:
    """A pickled ``{name: array}`` through the restricted unpickler (numpy arrays only; anything else in the
    pickle raises ``UnsafePickleError`` before it runs)."""
    from avi_jax.checkpoints.flame import flame_allowed_globals
    from avi_jax.checkpoints.safe_pickle import restricted_load
    with open(path, "rb") as f:
        data = restricted_load(f, flame_allowed_globals(), source=path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a pickled dict of arrays, got {type(data).__name__}")
    return {str(k): np.asarray(v) for k, v in data.items()}


def load_prediction(path: str, num_vertices: int | None = None) -> Prediction:
    """One prediction file (``.npz`` or ``.npy``, see the module docstring) as a :class:`Prediction`.

    Args:
      path: the file (``.npz``, ``.npy`` or ``.pkl``).
      num_vertices: the FLAME model's vertex count, to check vertex arrays (None: not checked).

    Raises:
      InputError (naming the file): unreadable; neither coefficients nor vertices; a wrong shape; frame counts
        that disagree; NaN or infinite values. UnsafePickleError: a ``.pkl`` that holds more than arrays.
    """
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            data = {"array": arr}
        elif path.endswith(".pkl"):
            data = _load_pickled_dict(path)
        else:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
    except UnsafePickleError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz/.npy/.pkl ({e})") from e
    pred = Prediction(path)
    if "array" in data:                            # a bare .npy: coefficients (T, 53) or vertices
        a = np.asarray(data["array"])
        if a.ndim == 2 and a.shape[1] == N_EXPRESSION + N_JAW:
            pred.expression, pred.jaw_pose = a[:, :N_EXPRESSION], a[:, N_EXPRESSION:]
        else:
            pred.vertices = _vertices(path, "the array", a, num_vertices)
    else:
        ek, e = _first(data, _EXPRESSION_KEYS)
        jk, j = _first(data, _JAW_KEYS)
        if e is not None and j is None and "pose" in data:
            jk, j = "pose", np.asarray(data["pose"])
            if j.ndim != 2 or j.shape[1] != 6:
                raise InputError(f"{path}: pose has shape {j.shape}, expected (T, 6) = global (3) ++ jaw (3)")
            j = j[:, 3:6]
        if e is not None:
            if j is None:
                raise InputError(f"{path}: has {ek!r} but no jaw pose ('jaw_pose', 'jaw' or 'pose' (T, 6))")
            e, j = np.asarray(e), np.asarray(j)
            if e.ndim != 2 or e.shape[1] != N_EXPRESSION:
                raise InputError(f"{path}: {ek} has shape {e.shape}, expected (T, {N_EXPRESSION})")
            if j.ndim != 2 or j.shape[1] != N_JAW:
                raise InputError(f"{path}: {jk} has shape {j.shape}, expected (T, {N_JAW})")
            if len(e) != len(j):
                raise InputError(f"{path}: {ek} has {len(e)} frames, {jk} {len(j)}")
            pred.expression, pred.jaw_pose = e, j
        vk, v = _first(data, _VERTEX_KEYS)
        if v is not None:
            pred.vertices = _vertices(path, vk, np.asarray(v), num_vertices)
        if pred.expression is None and pred.vertices is None:
            raise InputError(f"{path}: no FLAME coefficients ({'/'.join(_EXPRESSION_KEYS)} + "
                             f"{'/'.join(_JAW_KEYS)}/pose) or vertices ({'/'.join(_VERTEX_KEYS)}); "
                             f"keys: {sorted(data)}")
        if "style" in data:
            pred.style = np.atleast_2d(np.asarray(data["style"], np.float64))
    if pred.expression is not None:
        pred.expression = np.asarray(pred.expression, np.float64)
        pred.jaw_pose = np.asarray(pred.jaw_pose, np.float64)
        if pred.vertices is not None and len(pred.vertices) != len(pred.expression):
            raise InputError(f"{path}: {len(pred.vertices)} frames of vertices, {len(pred.expression)} of "
                             "coefficients")
    if pred.num_frames == 0:
        raise InputError(f"{path}: no frames")
    for name in ("expression", "jaw_pose", "vertices", "style"):
        a = getattr(pred, name)
        if a is not None and not np.all(np.isfinite(a)):
            raise InputError(f"{path}: {name} holds NaN or infinite values")
    return pred


__all__ = ["Prediction", "find_samples", "load_prediction"]
