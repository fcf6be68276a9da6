"""Table-driven Hugging Face -> Flax parameter conversion.

Each model's converter is an explicit key-map table: rows ``(flax_path, hf_key, transform)`` where
``flax_path`` is a '/'-joined path in the Flax params tree and ``transform`` turns the PyTorch tensor
into the Flax layout (``linear``: (out, in) -> (in, out); ``conv1d``: (out, in, k) -> (k, in, out)).
``build_params`` applies a table leaf by leaf, casting and (optionally) placing each tensor directly on
its sharding, and checks the result against the model's abstract parameters.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

from avi_jax.errors import CheckpointError
from avi_jax.sharding import place

Transform = Callable[[np.ndarray], np.ndarray]
Row = tuple[str, str, Transform]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear.weight`` (out, in) -> Flax ``Dense.kernel`` (in, out)."""
    return w.T


def conv1d(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Conv1d.weight`` (out, in/groups, k) -> Flax ``nn.Conv.kernel`` (k, in/groups, out)."""
    return np.transpose(w, (2, 1, 0))


def build_params(ckpt: Mapping[str, np.ndarray], table: Iterable[Row], *,
                 abstract: Any | None = None, shardings: Any | None = None,
                 dtype: Any = np.float32, source: str = "checkpoint") -> dict:
    """Build a Flax params dict from ``ckpt`` following ``table``.

    Args:
      ckpt: mapping HF key -> array (e.g. ``HFCheckpoint``).
      table: rows ``(flax_path, hf_key, transform)``.
      abstract: optional params tree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``); when given,
        every leaf must be produced with the right shape and no extra leaf may appear.
      shardings: optional tree (same structure as the result) of ``jax.sharding.Sharding``; each tensor
        is put on its sharding as soon as it is converted.
      dtype: numpy dtype of the converted leaves.
      source: a name for error messages (the folder).

    Returns:
      A nested dict of arrays (numpy, or ``jax.Array`` when ``shardings`` is given).

    Raises:
      CheckpointError: a key is missing, or shapes/structure disagree with ``abstract``.
    """
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    flat_abstract = traverse_util.flatten_dict(abstract, sep="/") if abstract is not None else None
    out: dict[str, Any] = {}
    if hasattr(ckpt, "in_file_order"):     # read each shard of a sharded checkpoint once (hf_folder)
        table = ckpt.in_file_order(list(table))
    for path, key, transform in table:
        if key not in ckpt:
            raise CheckpointError(f"{source}: missing tensor '{key}' (needed for {path})")
        value = np.asarray(transform(np.asarray(ckpt[key])), dtype=dtype)
        if flat_abstract is not None:
            if path not in flat_abstract:
                raise CheckpointError(f"{source}: '{key}' maps to unknown parameter {path}")
            want = tuple(flat_abstract[path].shape)
            if value.shape != want:
                raise CheckpointError(
                    f"{source}: '{key}' has shape {value.shape} after conversion, model expects {want} "
                    f"at {path}; does config.json match the weights?")
        if path in flat_shardings:
            value = place(value, flat_shardings[path])
        out[path] = value
    if flat_abstract is not None:
        missing = sorted(set(flat_abstract) - set(out))
        if missing:
            raise CheckpointError(f"{source}: no checkpoint tensor for parameters {missing[:8]}")
    return traverse_util.unflatten_dict(out, sep="/")
