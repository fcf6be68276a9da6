"""FLAME: the head model that turns coefficients into a 3D mesh (linear blend skinning).

FLAME (Li, Bolkart, Black, Li, Romero; "Learning a model of facial shape and expression from 4D
scans", SIGGRAPH Asia 2017, Sec. 3) maps identity shape ``beta``, expression ``psi`` and the
axis-angle rotations of its 5 joints (global/root, neck, jaw, left eye, right eye) to the 5023
vertices of a head mesh (9976 triangles), in metres:

1. ``v_shaped = v_template + S beta + E psi``                 (shape and expression blendshapes)
2. ``J = J_regressor v_shaped``                                 (joint locations, 5 x 3)
3. ``R_k = rodrigues(theta_k)``                                 (axis-angle -> rotation matrix)
4. ``v_posed = v_shaped + P vec(R_1..4 - I)``                   (pose correctives, 36 features)
5. ``v = sum_k w_k G_k(theta, J) [v_posed; 1]``                 (kinematic chain + linear blend skinning)

The same computation as the ``smplx`` package's ``FLAME`` layer (``smplx.lbs.lbs``), written in JAX:
batched over frames, ``jax.jit``-able and differentiable everywhere (also at zero rotation). The API
is functions over a ``FlameModel`` pytree rather than a Flax module, because FLAME has no trainable
parameters: ``load_flame_model`` reads the official files once, ``flame_forward`` is a pure
function of (model, coefficients) that can be closed over or passed through ``jax.jit``.

The official model files (``generic_model.pkl`` of FLAME 2020, ``flame2023.pkl`` of FLAME 2023,
``FLAME_masks.pkl``) are Python-2 pickles, some arrays stored as ``chumpy`` objects. They are
untrusted input and are read with a restricted unpickler (``avi_jax.checkpoints.safe_pickle``) that
admits only numpy array reconstruction, scipy sparse matrices (rebuilt from their raw arrays) and
chumpy arrays (mapped to small stand-ins that turn into numpy; chumpy itself is not needed).
Anything else in the pickle raises ``UnsafePickleError`` before it is created.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from avi_jax.checkpoints.safe_pickle import restricted_load
from avi_jax.errors import CheckpointError, ConfigError, InputError, UnsafePickleError

__all__ = [
    "FLAME_URL", "NUM_VERTICES", "NUM_FACES", "NUM_JOINTS", "SHAPE_SPACE_DIM", "EXPRESSION_SPACE_DIM",
    "POSE_KEYS", "FlameModel", "FlameOutput", "load_flame_model", "load_flame_masks",
    "flame_forward", "motion_to_vertices", "batch_rodrigues", "flame_allowed_globals",
]

FLAME_URL = "https://flame.is.tue.mpg.de"
NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_JOINTS = 5  # root (global), neck, jaw, left eye, right eye
SHAPE_SPACE_DIM = 300  # shapedirs[..., :300] = identity; shapedirs[..., 300:] = expression
EXPRESSION_SPACE_DIM = 100
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)  # 36 columns of posedirs
# pose dict keys and their widths, in the order of the 15-d full pose vector (smplx FLAME order).
POSE_KEYS: tuple[tuple[str, int], ...] = (
    ("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6))
# File names tried, in order, when ``load_flame_model`` is given a folder.
_MODEL_FILE_NAMES = ("generic_model.pkl", "flame2023.pkl", "FLAME2020.pkl", "FLAME_NEUTRAL.pkl")
_HIGHEST = jax.lax.Precision.HIGHEST


def _missing_model_message(what: str, path: str, field: str, flag: str,
                           problem: str = "does not exist") -> str:
    return (f"{what} {path!r} {problem}. FLAME is obtained from {FLAME_URL} (registration "
            f"required): download it and set `{field}` (command-line flag `{flag}`) to the path "
            f"of the file. Nothing is downloaded at run time.")


# ---------------------------------------------------------------------------------------------
# Restricted unpickling of FLAME files.
# ---------------------------------------------------------------------------------------------

class _FrozenClass(type):
    """Metaclass that forbids setting attributes on the class (a pickle's BUILD cannot patch it)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise TypeError(f"cannot set attribute {name!r} on {cls.__name__}")


class _StandIn(metaclass=_FrozenClass):
    """Inert placeholder for a pickled object: remembers its pickled state, runs nothing.

    Used for chumpy (``chumpy.ch.Ch`` and a few reordering classes) and scipy sparse matrices; the
    loader turns the placeholders into numpy arrays / fresh scipy matrices after unpickling.
    """

    kind: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        obj = object.__new__(cls)
        object.__setattr__(obj, "state", {})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE/NEWOBJ arguments are ignored
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict[Any, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if not isinstance(state, dict):
            raise TypeError(f"pickled {self.kind} has a state of type {type(state).__name__}, "
                            f"expected a dict")
        object.__setattr__(self, "state", {_as_str(k): v for k, v in state.items()})

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD with slot state
        self.state[name] = value


def _stand_in(kind: str) -> type:
    return _FrozenClass(f"_{kind}StandIn", (_StandIn,), {"kind": kind})


# chumpy classes admitted (module, name); all evaluate to numpy in ``_to_numpy``.
_CHUMPY_CLASSES: dict[tuple[str, str], type] = {
    ("chumpy.ch", "Ch"): _stand_in("Ch"),
    ("chumpy.reordering", "Reshape"): _stand_in("Reshape"),
    ("chumpy.reordering", "Select"): _stand_in("Select"),
    ("chumpy.reordering", "transpose"): _stand_in("transpose"),
    ("chumpy.reordering", "Concatenate"): _stand_in("Concatenate"),
}
_SPARSE_FORMATS = {"csc_matrix": "csc", "csr_matrix": "csr", "coo_matrix": "coo",
                   "csc_array": "csc", "csr_array": "csr", "coo_array": "coo"}
_SPARSE_CLASSES: dict[str, type] = {name: _stand_in(f"sparse_{fmt}_{name.split('_')[1]}")
                                    for name, fmt in _SPARSE_FORMATS.items()}


def _as_str(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` (how Python 3 protocol-2 pickles store bytes): latin1 only."""
    norm = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else ""
    if not isinstance(obj, str) or norm not in ("latin1", "iso88591", "utf8"):
        raise TypeError(f"_codecs.encode is only admitted for str with latin1/utf-8, got "
                        f"{type(obj).__name__} and {encoding!r}")
    return obj.encode(encoding, errors)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Stand-in for ``copy_reg._reconstructor`` (protocol 0/1 pickles) admitting only stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, _StandIn)) or base is not object \
            or state is not None:
        raise TypeError("copy_reg._reconstructor is only admitted for chumpy/scipy stand-ins")
    return cls.__new__(cls)


def flame_allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list for FLAME pickles: ``{(module, name): object}`` for ``restricted_load``.

    Admits numpy array/dtype/scalar reconstruction (numpy 1 ``numpy.core`` and numpy 2
    ``numpy._core`` paths), scipy sparse csc/csr/coo matrices (old and new module paths, mapped to
    inert stand-ins rebuilt later from their arrays), chumpy ``Ch`` and the reordering classes
    ``Reshape``/``Select``/``transpose``/``Concatenate`` (stand-ins), builtin ``set``/``frozenset``
    (chumpy pickles its dirty-variable sets) and latin1 ``_codecs.encode`` (bytes in Python-3
    protocol-2 pickles). Nothing that can import modules or run code.
    """
    from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    from numpy._core.numeric import _frombuffer

    allowed: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for name, cls in _SPARSE_CLASSES.items():
        fmt = _SPARSE_FORMATS[name]
        for module in ("scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}",
                       "scipy.sparse._arrays"):
            allowed[(module, name)] = cls
    allowed.update(_CHUMPY_CLASSES)
    for builtins_module in ("__builtin__", "builtins"):
        allowed[(builtins_module, "set")] = set
        allowed[(builtins_module, "frozenset")] = frozenset
        allowed[(builtins_module, "object")] = object
    allowed[("_codecs", "encode")] = _codecs_encode
    for copyreg_module in ("copy_reg", "copyreg"):
        allowed[(copyreg_module, "_reconstructor")] = _copyreg_reconstructor
    return allowed


_MAX_DEPTH = 64


def _to_numpy(value: Any, source: str, key: str, depth: int = 0) -> Any:
    """Turn stand-ins (chumpy, scipy sparse) into numpy arrays / scipy matrices, recursively."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{source}: entry {key!r} nests chumpy objects deeper than "
                              f"{_MAX_DEPTH} levels (or refers to itself)")
    if isinstance(value, _StandIn):
        state, kind = value.state, value.kind

        def sub(name: str) -> Any:
            if name not in state:
                raise CheckpointError(f"{source}: entry {key!r}: pickled chumpy {kind} lacks {name!r}")
            return _to_numpy(state[name], source, key, depth + 1)

        try:
            if kind == "Ch":
                return np.asarray(sub("x"))
            if kind == "Reshape":
                return np.asarray(sub("a")).reshape(tuple(np.atleast_1d(sub("newshape"))))
            if kind == "Select":
                out = np.asarray(sub("a")).ravel()[np.asarray(sub("idxs"))].copy()
                if "preferred_shape" in state:
                    out = out.reshape(tuple(np.atleast_1d(sub("preferred_shape"))))
                return out
            if kind == "transpose":
                axes = state.get("axes")
                return np.transpose(np.asarray(sub("a")),
                                    axes=None if axes is None else tuple(axes))
            if kind == "Concatenate":
                names = [_as_str(n) for n in sub("dterms")]
                return np.concatenate([np.asarray(sub(n)) for n in names], axis=int(sub("axis")))
            if kind.startswith("sparse_"):
                return _rebuild_sparse(kind.split("_")[1], state, sub)
        except CheckpointError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            raise CheckpointError(f"{source}: entry {key!r}: cannot rebuild pickled {kind}: {e}") from e
        raise CheckpointError(f"{source}: entry {key!r}: unsupported pickled object {kind}")
    if isinstance(value, dict):
        return {_as_str(k): _to_numpy(v, source, key, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v, source, key, depth + 1) for v in value)
    return value


def _rebuild_sparse(fmt: str, state: Mapping[str, Any], sub: Any) -> scipy.sparse.spmatrix:
    shape_key = "_shape" if "_shape" in state else "shape"
    shape = tuple(int(s) for s in sub(shape_key))
    if fmt == "coo":
        return scipy.sparse.coo_matrix((np.asarray(sub("data")),
                                        (np.asarray(sub("row")), np.asarray(sub("col")))),
                                       shape=shape)
    cls = scipy.sparse.csc_matrix if fmt == "csc" else scipy.sparse.csr_matrix
    return cls((np.asarray(sub("data")), np.asarray(sub("indices")), np.asarray(sub("indptr"))),
               shape=shape)


def _load_pickle(path: pathlib.Path) -> Any:
    """Unpickle ``path`` through the FLAME allow-list (latin1 for Python-2 pickles)."""
    try:
        with open(path, "rb") as f:
            return restricted_load(f, flame_allowed_globals(), source=str(path), encoding="latin1")
    except (UnsafePickleError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure of a hostile/garbled file
        raise UnsafePickleError(f"{path}: not a readable FLAME pickle: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

@flax.struct.dataclass
class FlameModel:
    """The FLAME model as a pytree of float32/int32 ``jnp`` arrays (pass it through ``jax.jit``).

    Attributes:
      v_template: (V, 3) float32, template vertices in metres (V = 5023).
      shapedirs: (V, 3, n_shape) float32, identity blendshapes (the first ``n_shape`` of 300).
      exprdirs: (V, 3, n_exp) float32, expression blendshapes (the first ``n_exp`` of 100).
      posedirs: (V, 3, 36) float32, pose-corrective blendshapes over vec(R_1..4 - I).
      j_regressor: (J, V) float32 (dense), joints = j_regressor @ vertices (J = 5).
      lbs_weights: (V, J) float32, skinning weights (rows sum to 1).
      faces: (F, 3) int32 vertex indices of the triangles (F = 9976).
      masks: {region name: (n,) int32 vertex indices} from ``FLAME_masks.pkl`` ('lips', 'face',
        'forehead', 'eye_region', 'nose', ...); empty when no masks file was given.
      parents: static tuple of J ints, the kinematic tree (FLAME: (-1, 0, 1, 1, 1)).
    """

    v_template: jax.Array
    shapedirs: jax.Array
    exprdirs: jax.Array
    posedirs: jax.Array
    j_regressor: jax.Array
    lbs_weights: jax.Array
    faces: jax.Array
    masks: dict[str, jax.Array]
    parents: tuple[int, ...] = flax.struct.field(pytree_node=False)

    @property
    def n_shape(self) -> int:
        return int(self.shapedirs.shape[-1])

    @property
    def n_exp(self) -> int:
        return int(self.exprdirs.shape[-1])

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def mask(self, name: str) -> jax.Array:
        """(n,) int32 vertex indices of region ``name``; ``ConfigError`` if masks lack it."""
        if name not in self.masks:
            have = sorted(self.masks) or "none (no FLAME_masks.pkl was loaded: set config.flame.masks_path)"
            raise ConfigError(f"FLAME vertex mask {name!r} is not loaded; available: {have}")
        return self.masks[name]


class FlameOutput(NamedTuple):
    """Result of ``flame_forward``: ``vertices`` (..., V, 3) and posed ``joints`` (..., J, 3),
    float32, metres."""

    vertices: jax.Array
    joints: jax.Array


def _resolve_model_path(path: str | os.PathLike[str]) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        for name in _MODEL_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        raise ConfigError(_missing_model_message(
            "The folder", str(p), "config.flame.model_path", "--flame-model",
            problem=f"holds no FLAME model file ({', '.join(_MODEL_FILE_NAMES)})"))
    if not p.is_file():
        raise ConfigError(_missing_model_message("The FLAME model file", str(p),
                                                 "config.flame.model_path", "--flame-model"))
    return p


def _array(data: Mapping[str, Any], key: str, source: str, shape: Sequence[int | None],
           dtype: Any = np.float32) -> np.ndarray:
    if key not in data:
        raise CheckpointError(f"{source}: FLAME model file lacks the entry {key!r} "
                              f"(has {sorted(map(str, data))})")
    value = data[key]
    if scipy.sparse.issparse(value):
        value = value.toarray()
    try:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError("object array")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: FLAME entry {key!r} is not a numeric array "
                              f"({type(value).__name__})") from e
    if arr.ndim != len(shape) or any(
            s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise CheckpointError(f"{source}: FLAME entry {key!r} has shape {arr.shape}, expected ({want})")
    if not np.issubdtype(arr.dtype, np.number):
        raise CheckpointError(f"{source}: FLAME entry {key!r} has dtype {arr.dtype}, expected numbers")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise CheckpointError(f"{source}: FLAME entry {key!r} contains NaN or inf")
    return arr.astype(dtype) if dtype is not None else arr


def load_flame_masks(path: str | os.PathLike[str], num_vertices: int = NUM_VERTICES
                     ) -> dict[str, jax.Array]:
    """Read ``FLAME_masks.pkl``: ``{region name: (n,) int32 vertex indices}``.

    The file (from the FLAME website) is a pickled dict of region name -> index array ('lips',
    'forehead', 'eye_region', 'face', 'nose', 'neck', 'scalp', 'boundary', 'left_ear', ...),
    read through the restricted unpickler.

    Raises:
      ConfigError: the file does not exist (says where FLAME comes from and which config field
        takes the path).
      UnsafePickleError: the pickle names anything but numpy/chumpy arrays.
      CheckpointError: not a dict of integer arrays within [0, num_vertices).
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(_missing_model_message("The FLAME masks file (FLAME_masks.pkl)", str(p),
                                                 "config.flame.masks_path", "--flame-masks"))
    raw = _to_numpy(_load_pickle(p), str(p), "<masks>")
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{p}: expected a non-empty dict of region name -> vertex indices, "
                              f"got {type(raw).__name__}")
    masks: dict[str, jax.Array] = {}
    for name, idx in raw.items():
        arr = np.asarray(idx)
        if not isinstance(name, str) or arr.ndim != 1 or not (
                np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise CheckpointError(f"{p}: mask {name!r} is not a 1-D integer index array "
                                  f"(shape {arr.shape}, dtype {arr.dtype})")
        if arr.dtype == bool:  # a boolean per-vertex mask
            if arr.shape[0] != num_vertices:
                raise CheckpointError(f"{p}: boolean mask {name!r} has {arr.shape[0]} entries, "
                                      f"expected {num_vertices}")
            arr = np.nonzero(arr)[0]
        if arr.size and (arr.min() < 0 or arr.max() >= num_vertices):
            raise CheckpointError(f"{p}: mask {name!r} has vertex indices outside [0, {num_vertices})")
        masks[name] = jnp.asarray(arr.astype(np.int32))
    return masks


def load_flame_model(path: str | os.PathLike[str], masks_path: str | os.PathLike[str] | None = None,
                     *, n_shape: int = 100, n_exp: int = 50) -> FlameModel:
    """Read the official FLAME model (FLAME 2020 ``generic_model.pkl`` or FLAME 2023 ``flame2023.pkl``).

    Args:
      path: the ``.pkl`` file, or a folder holding one of generic_model.pkl / flame2023.pkl /
        FLAME2020.pkl / FLAME_NEUTRAL.pkl.
      masks_path: optional ``FLAME_masks.pkl`` (vertex regions for metrics such as lip vertex error).
      n_shape: identity components kept (first ``n_shape`` of 300; EMOCA uses 100).
      n_exp: expression components kept (first ``n_exp`` of 100; AVI-Talking uses 50).

    Entries read: v_template (5023, 3), shapedirs (5023, 3, 400) = 300 identity + 100 expression,
    posedirs (5023, 3, 36), J_regressor (5, 5023) scipy sparse or dense, kintree_table (2, 5) with the
    root parent stored as 2**32 - 1, weights (5023, 4 + 1), f (9976, 3). Other entries (J, bs_style,
    bs_type, extra FLAME 2023 entries) are ignored, except that bs_style/bs_type, when present, must be
    'lbs'/'lrotmin' (the only blending this layer implements). Arrays may be chumpy objects.

    Returns:
      FlameModel with float32/int32 ``jnp`` arrays.

    Raises:
      ConfigError: the file does not exist (the message says FLAME is obtained from
        https://flame.is.tue.mpg.de with registration and that ``config.flame.model_path`` /
        ``--flame-model`` takes the path), or n_shape/n_exp exceed the model.
      UnsafePickleError: the pickle names a global outside the allow-list (nothing was executed),
        or is not a readable pickle.
      CheckpointError: entries missing, of the wrong shape, non-finite, or an inconsistent
        kinematic tree.
    """
    p = _resolve_model_path(path)
    src = str(p)
    raw = _load_pickle(p)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{src}: expected a pickled dict of FLAME entries, got {type(raw).__name__}")
    data = {_as_str(k): _to_numpy(v, src, str(_as_str(k))) for k, v in raw.items()}

    for key, expected in (("bs_style", "lbs"), ("bs_type", "lrotmin")):
        if key in data and _as_str(data[key]) != expected:
            raise CheckpointError(f"{src}: FLAME entry {key!r} is {data[key]!r}; only {expected!r} "
                                  f"is supported")

    v_template = _array(data, "v_template", src, (None, 3))
    num_vertices = v_template.shape[0]
    shapedirs_all = _array(data, "shapedirs", src, (num_vertices, 3, None))
    n_total = shapedirs_all.shape[-1]
    n_shape_avail = min(SHAPE_SPACE_DIM, n_total)
    n_exp_avail = n_total - SHAPE_SPACE_DIM if n_total > SHAPE_SPACE_DIM else 0
    if not 0 <= n_shape <= n_shape_avail or not 0 <= n_exp <= n_exp_avail:
        raise ConfigError(f"{src}: asked for n_shape={n_shape}, n_exp={n_exp}; this model has "
                          f"{n_shape_avail} identity and {n_exp_avail} expression components")
    kintree = _array(data, "kintree_table", src, (2, None), dtype=None)
    num_joints = kintree.shape[1]
    weights = _array(data, "weights", src, (num_vertices, num_joints))
    j_regressor = _array(data, "J_regressor", src, (num_joints, num_vertices))
    posedirs = _array(data, "posedirs", src, (num_vertices, 3, 9 * (num_joints - 1)))
    faces = _array(data, "f", src, (None, 3), dtype=None)
    if not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= num_vertices:
        raise CheckpointError(f"{src}: FLAME faces 'f' must be integer vertex indices in "
                              f"[0, {num_vertices})")

    # kinematic tree: row 0 = parent of each joint (root stored as uint32 -1 = 4294967295).
    parents = [int(x) for x in kintree[0].astype(np.int64)]
    parents[0] = -1
    if not np.array_equal(kintree[1].astype(np.int64), np.arange(num_joints)) or any(
            not 0 <= parents[i] < i for i in range(1, num_joints)):
        raise CheckpointError(f"{src}: FLAME kintree_table {kintree.tolist()} is not a tree in "
                              f"topological order")

    masks = load_flame_masks(masks_path, num_vertices) if masks_path is not None else {}
    return FlameModel(
        v_template=jnp.asarray(v_template),
        shapedirs=jnp.asarray(shapedirs_all[:, :, :n_shape]),
        exprdirs=jnp.asarray(shapedirs_all[:, :, SHAPE_SPACE_DIM:SHAPE_SPACE_DIM + n_exp]),
        posedirs=jnp.asarray(posedirs),
        j_regressor=jnp.asarray(j_regressor),
        lbs_weights=jnp.asarray(weights),
        faces=jnp.asarray(faces.astype(np.int32)),
        masks=masks,
        parents=tuple(parents),
    )


# ---------------------------------------------------------------------------------------------
# Forward pass.
# ---------------------------------------------------------------------------------------------

def batch_rodrigues(rotvec: jax.Array) -> jax.Array:
    """Axis-angle (..., 3) in radians -> rotation matrices (..., 3, 3) (Rodrigues' formula).

    ``R = I + sin(t)/t K + (1 - cos(t))/t^2 K^2`` with K the cross-product matrix of the rotation
    vector and t its norm; a Taylor expansion near t = 0 keeps the value and the gradient finite
    at zero rotation (smplx's ``batch_rodrigues`` instead adds 1e-8 before the norm).
    """
    rotvec = jnp.asarray(rotvec)
    theta2 = jnp.sum(rotvec * rotvec, axis=-1)[..., None, None]
    small = theta2 < 1e-10
    theta2_safe = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(theta2_safe)
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    half_sin = jnp.sin(0.5 * theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, 2.0 * half_sin * half_sin / theta2_safe)
    x, y, z = rotvec[..., 0], rotvec[..., 1], rotvec[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(rotvec.shape[:-1] + (3, 3))
    eye = jnp.eye(3, dtype=rotvec.dtype)
    return eye + a * k + b * jnp.matmul(k, k, precision=_HIGHEST)


def _full_pose(pose: jax.Array | Mapping[str, jax.Array], dtype: Any) -> jax.Array:
    """pose array (..., 15) / (..., 6) or dict -> (..., 15) in FLAME joint order."""
    if isinstance(pose, Mapping):
        unknown = set(pose) - {k for k, _ in POSE_KEYS}
        if unknown:
            raise InputError(f"flame_forward: unknown pose keys {sorted(unknown)}; expected a subset "
                             f"of {[k for k, _ in POSE_KEYS]}")
        if not pose:
            raise InputError("flame_forward: the pose dict is empty")
        parts = {k: jnp.asarray(v, dtype) for k, v in pose.items()}
        for k, width in POSE_KEYS:
            if k in parts and parts[k].shape[-1:] != (width,):
                raise InputError(f"flame_forward: pose[{k!r}] has shape {parts[k].shape}, expected "
                                 f"(..., {width}) axis-angle in radians")
        lead = jnp.broadcast_shapes(*(v.shape[:-1] for v in parts.values()))
        return jnp.concatenate([jnp.broadcast_to(parts[k], lead + (w,)) if k in parts
                                else jnp.zeros(lead + (w,), dtype) for k, w in POSE_KEYS], axis=-1)
    pose = jnp.asarray(pose, dtype)
    if pose.ndim >= 1 and pose.shape[-1] == 15:
        return pose
    if pose.ndim >= 1 and pose.shape[-1] == 6:  # EMOCA / DECA: global (3) + jaw (3)
        zeros = jnp.zeros(pose.shape[:-1] + (3,), dtype)
        return jnp.concatenate([pose[..., :3], zeros, pose[..., 3:], zeros, zeros], axis=-1)
    raise InputError(f"flame_forward: pose has shape {pose.shape}; expected (..., 15) = global, "
                     f"neck, jaw, left eye, right eye axis-angles, (..., 6) = global + jaw (EMOCA), "
                     f"or a dict with keys {[k for k, _ in POSE_KEYS]}")


def flame_forward(model: FlameModel, shape: jax.Array | None, expression: jax.Array | None,
                  pose: jax.Array | Mapping[str, jax.Array] | None = None, *,
                  translation: jax.Array | None = None) -> FlameOutput:
    """FLAME vertices and joints from coefficients (linear blend skinning; FLAME paper Sec. 3).

    Matches ``smplx.FLAME`` / ``smplx.lbs.lbs`` (vertices to ~1e-6 m in float32). Batched over any
    leading dimensions ``...`` (frames, or batch x frames), which broadcast between the inputs
    (e.g. one identity ``shape`` (1, n) for many frames). ``jax.jit``-able and differentiable.

    Args:
      model: from ``load_flame_model``.
      shape: (..., k) float identity coefficients, k <= model.n_shape (the first k components;
        missing ones are zero); None = mean identity.
      expression: (..., k) float expression coefficients, k <= model.n_exp; None = neutral.
      pose: axis-angle rotations in radians, either (..., 15) = [global, neck, jaw, left eye,
        right eye] x 3 (smplx order), (..., 6) = [global, jaw] (EMOCA/DECA ``pose``), or a dict with
        any of 'global_pose' (..., 3), 'neck_pose' (..., 3), 'jaw_pose' (..., 3), 'eye_pose'
        (..., 6) (left then right), missing parts zero; None = rest pose.
      translation: optional (..., 3) metres added to vertices and joints.

    Returns:
      FlameOutput(vertices (..., V, 3), joints (..., J, 3)), float32, metres.

    Raises:
      InputError: wrong trailing dimensions or unknown pose keys.
    """
    dtype = jnp.float32
    leads: list[tuple[int, ...]] = []

    def coeffs(x: jax.Array | None, width: int, name: str) -> jax.Array:
        if x is None:
            return jnp.zeros((width,), dtype)
        x = jnp.asarray(x, dtype)
        if x.ndim == 0 or x.shape[-1] > width:
            raise InputError(f"flame_forward: {name} has shape {x.shape}; expected (..., k) with "
                             f"k <= {width} (the model was loaded with {width} {name} components)")
        leads.append(x.shape[:-1])
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    betas = coeffs(shape, model.n_shape, "shape")
    psi = coeffs(expression, model.n_exp, "expression")
    full_pose = jnp.zeros((15,), dtype) if pose is None else _full_pose(pose, dtype)
    if pose is not None:
        leads.append(full_pose.shape[:-1])
    if translation is not None:
        translation = jnp.asarray(translation, dtype)
        if translation.shape[-1:] != (3,):
            raise InputError(f"flame_forward: translation has shape {translation.shape}, "
                             f"expected (..., 3) metres")
        leads.append(translation.shape[:-1])
    try:
        lead = jnp.broadcast_shapes(*leads) if leads else ()
    except ValueError as e:
        raise InputError(f"flame_forward: leading (batch) dimensions do not broadcast: {leads}") from e
    num_joints = len(model.parents)
    if full_pose.shape[-1] != 3 * num_joints:
        raise InputError(f"flame_forward: pose has {full_pose.shape[-1]} values, the model has "
                         f"{num_joints} joints")

    batch = int(np.prod(lead)) if lead else 1
    betas = jnp.broadcast_to(betas, lead + betas.shape[-1:]).reshape(batch, -1)
    psi = jnp.broadcast_to(psi, lead + psi.shape[-1:]).reshape(batch, -1)
    full_pose = jnp.broadcast_to(full_pose, lead + (3 * num_joints,)).reshape(batch, num_joints, 3)

    # 1. identity + expression blendshapes.
    v_shaped = (model.v_template
                + jnp.einsum("bl,vcl->bvc", betas, model.shapedirs, precision=_HIGHEST)
                + jnp.einsum("bl,vcl->bvc", psi, model.exprdirs, precision=_HIGHEST))
    # 2. joints regressed from the shaped (unposed) mesh.
    joints_rest = jnp.einsum("jv,bvc->bjc", model.j_regressor, v_shaped, precision=_HIGHEST)
    # 3-4. rotations and pose correctives over the non-root joints.
    rot = batch_rodrigues(full_pose)  # (B, J, 3, 3)
    pose_feature = (rot[:, 1:] - jnp.eye(3, dtype=dtype)).reshape(batch, -1)  # (B, 9 (J-1))
    v_posed = v_shaped + jnp.einsum("bp,vcp->bvc", pose_feature, model.posedirs, precision=_HIGHEST)

    # 5. kinematic chain: global rotation/translation of each joint.
    g_rot: list[jax.Array] = []
    g_trans: list[jax.Array] = []
    for j, parent in enumerate(model.parents):
        if parent < 0:
            g_rot.append(rot[:, j])
            g_trans.append(joints_rest[:, j])
        else:
            local_t = joints_rest[:, j] - joints_rest[:, parent]
            g_rot.append(jnp.matmul(g_rot[parent], rot[:, j], precision=_HIGHEST))
            g_trans.append(jnp.einsum("bij,bj->bi", g_rot[parent], local_t, precision=_HIGHEST)
                           + g_trans[parent])
    g_rot_all = jnp.stack(g_rot, axis=1)  # (B, J, 3, 3)
    joints_posed = jnp.stack(g_trans, axis=1)  # (B, J, 3)
    # transforms relative to the rest pose: x -> G_R (x - J_rest) + J_posed.
    rel_trans = joints_posed - jnp.einsum("bjik,bjk->bji", g_rot_all, joints_rest, precision=_HIGHEST)

    # linear blend skinning.
    t_rot = jnp.einsum("vj,bjik->bvik", model.lbs_weights, g_rot_all, precision=_HIGHEST)
    t_trans = jnp.einsum("vj,bji->bvi", model.lbs_weights, rel_trans, precision=_HIGHEST)
    vertices = jnp.einsum("bvik,bvk->bvi", t_rot, v_posed, precision=_HIGHEST) + t_trans

    if translation is not None:
        trans = jnp.broadcast_to(translation, lead + (3,)).reshape(batch, 1, 3)
        vertices = vertices + trans
        joints_posed = joints_posed + trans
    return FlameOutput(vertices=vertices.reshape(lead + vertices.shape[1:]),
                       joints=joints_posed.reshape(lead + joints_posed.shape[1:]))


def motion_to_vertices(model: FlameModel, motion: jax.Array, shape: jax.Array | None = None,
                       *, n_exp: int = 50) -> jax.Array:
    """Vertices of the AVI-Talking motion target: (..., n_exp + 3) = expression psi + jaw pose.

    Head pose and neck/eyes are at rest and identity is ``shape`` (or the mean), as in the paper's
    53-d target (50 FLAME expression + 3 jaw axis-angle in radians, 25 fps).

    Args:
      model: from ``load_flame_model`` with ``model.n_exp >= n_exp``.
      motion: (..., n_exp + 3) float.
      shape: optional (..., k) identity coefficients, broadcast against ``motion``'s leading dims.

    Returns:
      (..., V, 3) float32 vertices in metres.

    Raises:
      InputError: ``motion``'s last dimension is not n_exp + 3, or n_exp > model.n_exp.
    """
    motion = jnp.asarray(motion, jnp.float32)
    if motion.ndim == 0 or motion.shape[-1] != n_exp + 3:
        raise InputError(f"motion_to_vertices: motion has shape {motion.shape}, expected "
                         f"(..., {n_exp + 3}) = {n_exp} expression + 3 jaw pose")
    return flame_forward(model, shape, motion[..., :n_exp],
                         {"jaw_pose": motion[..., n_exp:]}).vertices
