"""Checkpoints: one Orbax ``CheckpointManager`` per stage holding the train state and the grain
iterator state (``<stage_dir>/checkpoints/<step>/{state,data}``, async, keep-last-N). The export of a
finished stage's parameters (``params.safetensors``) is ``avi_jax.checkpoints.exported``.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp



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
