"""Checkpoints: one Orbax ``CheckpointManager`` per stage holding the train state and the grain
iterator state, and a safetensors export of a stage's trained parameters for later stages/inference.

Layout under a stage directory: ``checkpoints/<step>/{state,data}`` (async, keep-last-N) and
``params.safetensors`` (written atomically once the stage has finished training).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from avi_jax.errors import CheckpointError
from avi_jax.training.mesh import place


def make_manager(directory: str, *, max_to_keep: int, save_every: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """CheckpointManager with items ``state`` (sharded pytree) and ``data`` (grain iterator)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, *,
         force: bool = False) -> bool:
    """Save ``state`` and the data iterator at ``step`` (subject to the save interval unless force)."""
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
        force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
            step: int | None = None) -> tuple[Any, int]:
    """Restore the latest (or given) step into ``abstract_state`` (ShapeDtypeStructs with shardings);
    the data iterator is restored in place. Returns (state, step)."""
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"], step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings, the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
    with safe_open(path, framework="numpy") as f:
        keys = set(f.keys())
        for key, want in flat_abstract.items():
            name = prefix + key
            if name not in keys:
                raise CheckpointError(f"{path}: no tensor '{name}'")
            value = f.get_tensor(name)
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{path}: '{name}' has shape {value.shape}, expected {want.shape}")
            value = value.astype(want.dtype)
            out[key] = place(value, flat_shardings[key]) if key in flat_shardings else value
    return traverse_util.unflatten_dict(out, sep="/")
