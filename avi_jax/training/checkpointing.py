"""Checkpoints: one Orbax ``CheckpointManager`` per stage holding the train state and the grain
iterator state (``<stage_dir>/checkpoints/<step>/{state,data}``, async, keep-last-N). The export of a
finished stage's parameters (``params.safetensors``) is ``avi_jax.checkpoints.exported``.

Resuming (:func:`restore_intact`) falls back from a damaged latest step to the newest one that restores;
the damaged steps are moved to ``<stage_dir>/damaged_checkpoints/`` so that the run can save those steps
again.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from avi_jax.errors import CheckpointError



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


def _reason(error: BaseException) -> str:
    """One short line for a restore failure: the innermost cause (Orbax wraps tensorstore's precise error
    in a generic one), without the kilobytes of tensorstore spec."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
    text = " ".join(str(error).split())
    for cut in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(cut)[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _quiet_closed_loop_callbacks() -> None:
    """After a failed restore, tensorstore finishes that restore's other reads on its own threads, and
    their callbacks find Orbax's event loop closed: Python would print one ``RuntimeError: Event loop is
    closed`` traceback per read. Only those are silenced (``sys.unraisablehook``), for the process."""
    previous = sys.unraisablehook
    if getattr(previous, "avi_jax_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.avi_jax_quiet = True
    sys.unraisablehook = hook


def _all_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (one process: ``ok``)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move the damaged ``steps`` out of the manager's folder (to ``../damaged_checkpoints/<step>-<time>``)
    so that the resumed run can save them again; process 0 moves, every process reloads."""
    directory = os.fspath(manager.directory)
    if jax.process_index() == 0 and steps:
        aside = os.path.join(os.path.dirname(directory), "damaged_checkpoints")
        os.makedirs(aside, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src = os.path.join(directory, str(step))
            if os.path.exists(src):
                shutil.move(src, os.path.join(aside, f"{step}-{stamp}"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("avi_jax:damaged_checkpoints_moved")
    manager.reload()


def restore_intact(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any, *,
                   name: str = "") -> tuple[Any, int]:
    """Restore the newest step that can be read, newest first; ``(state, step)``.

    A step that fails to restore (a truncated or corrupted file, a missing manifest or data-iterator file:
    any error from Orbax/tensorstore/grain) is skipped with one warning naming the step and the reason, and
    moved to ``<stage_dir>/damaged_checkpoints/`` once an older step has restored. On several processes a
    step counts as restored only if it restored everywhere. Raises ``CheckpointError`` (naming the folder,
    the steps tried and the last reason) when no step restores; nothing is moved then.
    """
    directory = os.fspath(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    skipped: list[int] = []
    reason = ""
    for step in steps:
        try:
            state, _ = restore(manager, abstract_state, data_iter, step)
            ok = True
        except Exception as e:  # noqa: BLE001 - tensorstore/grain raise ValueError, OSError, Exception...
            ok, state, reason = False, None, _reason(e)
            _quiet_closed_loop_callbacks()
        if _all_agree(ok):
            if skipped:
                _move_aside(manager, skipped)
                logging.warning("%s: resumed from checkpoint step %d instead of the damaged step(s) %s "
                                "(moved to %s)", name or directory, step, skipped,
                                os.path.join(os.path.dirname(directory), "damaged_checkpoints"))
            return state, step
        reason = reason or "it failed to restore on another process"
        logging.warning("%s: checkpoint step %d is damaged, trying an older one: %s",
                        name or directory, step, reason)
        skipped.append(step)
    raise CheckpointError(
        f"{directory}: no intact checkpoint (steps {steps} all failed to restore; the last: {reason}); "
        f"delete that folder to restart this stage from step 0")
