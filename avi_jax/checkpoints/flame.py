"""Reading the official FLAME model files into a ``FlameModel`` (restricted unpickling).

The official files (``generic_model.pkl`` of FLAME 2020, ``flame2023.pkl`` of FLAME 2023,
``FLAME_masks.pkl``; from https://flame.is.tue.mpg.de, registration required) are Python-2 pickles,
some arrays stored as ``chumpy`` objects. They are untrusted input and are read with a restricted
unpickler (``avi_jax.checkpoints.safe_pickle``) that admits only numpy array reconstruction, scipy
sparse matrices (rebuilt from their raw arrays) and chumpy arrays (mapped to small stand-ins that
turn into numpy; chumpy itself is not needed). Anything else in the pickle raises
``UnsafePickleError`` before it is created. ``avi_jax.data.demo_head`` writes a procedural stand-in
head in the same layout, read by the same functions.

The model itself (``FlameModel``, ``flame_forward``) lives in ``avi_jax.models.flame``, which reads
no files.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from avi_jax.checkpoints.safe_pickle import restricted_load
from avi_jax.errors import CheckpointError, ConfigError, UnsafePickleError
from avi_jax.models.flame import FLAME_URL, NUM_VERTICES, SHAPE_SPACE_DIM, FlameModel

__all__ = ["MODEL_FILE_NAMES", "load_flame_model", "load_flame_masks", "flame_allowed_globals"]

# File names tried, in order, when ``load_flame_model`` is given a folder.
MODEL_FILE_NAMES = ("generic_model.pkl", "flame2023.pkl", "FLAME2020.pkl", "FLAME_NEUTRAL.pkl")


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
# The model and mask files.
# ---------------------------------------------------------------------------------------------

def _resolve_model_path(path: str | os.PathLike[str]) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        for name in MODEL_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        raise ConfigError(_missing_model_message(
            "The folder", str(p), "config.flame.model_path", "--flame-model",
            problem=f"holds no FLAME model file ({', '.join(MODEL_FILE_NAMES)})"))
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
    read through the restricted unpickler. ``num_vertices`` is the model's vertex count (5023 for
    FLAME; ``load_flame_model`` passes its own), used to check the indices.

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
    'lbs'/'lrotmin' (the only blending this layer implements). Arrays may be chumpy objects. The vertex
    and face counts are taken from the file (5023/9976 for FLAME; the demo stand-in head of
    ``avi_jax.data.demo_head`` has its own), and every other entry is checked against them.

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


