"""A finished stage's parameters as one flat safetensors file (``<workdir>/<stage>/params.safetensors``).

Written by the training loop once a stage has finished; read by later stages and by inference. Keys are
'/'-joined parameter paths, prefixed by the component (``qformer/layers_0/...``).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from avi_jax.errors import CheckpointError
from avi_jax.sharding import place


def export_params(params: Any, path: str) -> None:
    """Write a params tree as a flat safetensors file ('/'-joined keys), atomically, from process 0.

    Sharded arrays are gathered to the host first (every process must call this).
    """
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat.items()}
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        save_file(host, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_exported(path: str, abstract: Any, shardings: Any | None = None, *, prefix: str = "") -> Any:
    """Load the leaves of ``abstract`` (a params tree of ShapeDtypeStructs) from an ``export_params``
    file, taking keys ``prefix + path``; extra keys in the file are ignored. Raises ``CheckpointError``
    naming the file for a missing key or a shape mismatch."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: exported parameters not found (has that stage finished?)")
    flat_abstract = traverse_util.flatten_dict(abstract, sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    out = {}
    try:
        f = safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: unreadable exported parameters ({_one_line(e)}); the file is damaged "
                              f"or truncated: delete it and its stage's final_metrics.json to redo the "
                              f"export") from e
    with f:
        keys = set(f.keys())
        for key, want in flat_abstract.items():
            name = prefix + key
            if name not in keys:
                raise CheckpointError(f"{path}: no tensor '{name}'")
            try:
                value = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path}: tensor '{name}' is unreadable ({_one_line(e)}); the file is "
                                      f"damaged or truncated") from e
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: '{name}' has shape {value.shape}, expected {want.shape}")
            value = value.astype(want.dtype)
            out[key] = place(value, flat_shardings[key]) if key in flat_shardings else value
    return traverse_util.unflatten_dict(out, sep="/")
