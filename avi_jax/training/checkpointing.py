"""Checkpoints: one Orbax ``CheckpointManager`` per stage holding the train state and the grain
iterator state (``<stage_dir>/checkpoints/<step>/{state,data}``, async, keep-last-N). The export of a
finished stage's parameters (``params.safetensors``) is ``avi_jax.checkpoints.exported``.

Integrity: tensorstore checksums only its b-tree index, so bytes flipped inside an array-data file restore
silently as wrong parameters. Once a step is committed (Orbax has finished writing it), process 0 records the
SHA-256 of every file of the step in ``<step>/avi_jax_checksums.json`` (:func:`record_checksums`), and
:func:`restore_intact` verifies them before restoring. A step without that record (a run killed between the commit and the
record, or older runs) is restored unverified.

Resuming (:func:`restore_intact`) falls back from a damaged latest step to the newest one that restores;
the damaged steps are moved to ``<stage_dir>/damaged_checkpoints/`` so that the run can save those steps
again.
"""
from __future__ import annotations

import hashlib
import json
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

CHECKSUMS = "avi_jax_checksums.json"

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
    """Save ``state`` and the data iterator at ``step`` (subject to the save interval unless force).

    Orbax first waits for the previous (async) save to be committed; its checksums are then recorded
    here, while this step is written in the background."""
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
        force=force)
    if saved:
        record_checksums(manager)
    return saved


def wait_until_committed(manager: ocp.CheckpointManager) -> None:
    """Wait for the running async save to be committed, then record its checksums."""
    manager.wait_until_finished()
    record_checksums(manager)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file of a step folder, relative to it, except the checksum record."""
    return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                  for root, _, names in os.walk(step_dir) for name in names if name != CHECKSUMS)


def record_checksums(manager: ocp.CheckpointManager) -> None:
    """Process 0 writes ``<step>/avi_jax_checksums.json`` ({relative path: SHA-256 hex}) for every committed
    step that has none yet (atomically: a temporary file renamed). Call only when no save of those steps
    is running: Orbax writes a step under a temporary name and renames it when committed, so the
    numbered folders listed here are complete. A step deleted meanwhile (keep-last-N) is skipped."""
    if jax.process_index() != 0:
        return
    directory = os.fspath(manager.directory)
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        step_dir = os.path.join(directory, name)
        target = os.path.join(step_dir, CHECKSUMS)
        if not name.isdigit() or os.path.exists(target):
            continue
        try:
            sums = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
            with open(target + ".tmp", "w") as f:
                json.dump(sums, f, indent=0)
            os.replace(target + ".tmp", target)
        except FileNotFoundError:
            continue


def verify_checksums(step_dir: str) -> None:
    """Check every file recorded in ``<step_dir>/avi_jax_checksums.json`` (no record: nothing to check).

    Raises:
      CheckpointError: a recorded file is missing or its SHA-256 differs (named), or the record is
        unreadable.
    """
    record = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(record):
        return
    try:
        with open(record) as f:
            sums = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{record}: unreadable checksum record ({e})") from None
    for rel, digest in sums.items():
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {CHECKSUMS})")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 differs from the one recorded when it was saved (the "
                                  "file was damaged or changed)")


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
            step: int | None = None) -> tuple[Any, int]:
    """Restore the latest (or given) step into ``abstract_state`` (ShapeDtypeStructs with shardings);
    the data iterator is restored in place. Returns (state, step). :func:`restore_intact` checks the
    step's files first."""
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


def _check_here(step_dir: str) -> None:
    """What this process can check on its own before Orbax's restore, which synchronises the processes
    (one that failed inside it while the others went on would leave them meeting the next collective out
    of step): the checksum record and this process's data-iterator file. Raises ``CheckpointError``."""
    verify_checksums(step_dir)
    data = os.path.join(step_dir, "data")
    n = jax.process_count()
    mine = os.path.join(data, f"process_{jax.process_index()}-of-{n}.json")
    if not os.path.isfile(mine):
        names = os.listdir(data) if os.path.isdir(data) else []
        written = sorted({f.rsplit("-of-", 1)[-1].split(".")[0] for f in names if f.startswith("process_")})
        if written and str(n) not in written:
            raise CheckpointError(f"{data}: the data-iterator state was written by {'/'.join(written)} "
                                  f"processes and this run has {n}; resume with as many processes as the run "
                                  "that saved it")
        raise CheckpointError(f"{mine}: missing")
    try:
        with open(mine) as f:
            json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{mine}: unreadable ({e})") from None


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
    last = ""
    for step in steps:
        state, reason = None, ""
        try:   # every process decides before any of them enters Orbax's restore and its barriers
            _check_here(os.path.join(directory, str(step)))
            ready = True
        except Exception as e:  # noqa: BLE001
            ready, reason = False, _reason(e)
        ok = False
        if _all_agree(ready):
            try:
                state, _ = restore(manager, abstract_state, data_iter, step)
                ok = True
            except Exception as e:  # noqa: BLE001 - tensorstore/grain raise ValueError, OSError, Exception...
                reason = _reason(e)
                _quiet_closed_loop_callbacks()
        if _all_agree(ok):
            if skipped:
                _move_aside(manager, skipped)
                logging.warning("%s: resumed from checkpoint step %d instead of the damaged step(s) %s "
                                "(moved to %s)", name or directory, step, skipped,
                                os.path.join(os.path.dirname(directory), "damaged_checkpoints"))
            return state, step
        reason = reason or "it failed to restore on another process"
        last = reason
        logging.warning("%s: checkpoint step %d is damaged, trying an older one: %s",
                        name or directory, step, reason)
        skipped.append(step)
    raise CheckpointError(
        f"{directory}: no intact checkpoint (steps {steps} all failed to restore; the last: {last}); "
        f"delete that folder to restart this stage from step 0")
