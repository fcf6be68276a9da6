"""The shared train/eval loop of every stage (align, tune, motion, style, and the demo's lm stage).

A :class:`~avi_jax.training.stage.Stage` says what is stage-specific; :func:`run_stage` does the rest, the
same way for all of them, in the pieces MaxText's ``train.py`` splits its trainer into:

* :func:`create_train_state` — abstract init (``jax.eval_shape``), shardings from the logical axes of the
  parameters *and* of the abstract optimizer state, seeded init jitted straight onto its shardings or
  parameters loaded onto them;
* :func:`make_train_step` — one optimizer step (``jax.jit`` with explicit shardings, state donated);
* :func:`train_loop_iteration` — one step of the loop: the batch, the step under a profiler step
  annotation, logging, the NaN/inf guard, Orbax checkpoints of the state *and* the data iterator,
  preemption, periodic evaluation;
* :func:`train_loop` — the iterations from the restored step to ``total_steps``, with the profiler window;
* :func:`export_and_evaluate` — ``<stage_dir>/params.safetensors`` and ``<stage_dir>/final_metrics.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions

from avi_jax import sharding as mesh_lib
from avi_jax.assembly.common import INIT
from avi_jax.checkpoints.exported import export_params
from avi_jax.errors import ConfigError, TrainingDivergedError
from avi_jax.training import checkpointing
from avi_jax.training.stage import Stage, device_batch
from avi_jax.training.state import (TrainState, make_optimizer, make_schedule, optimizer_shardings,
                                   stop_frozen_gradients)


class Preempted(Exception):
    """Raised after a preemption checkpoint was written (and waited for); rerunning the same command resumes.

    ``exit_code`` (42) is the status ``python -m avi_jax.train`` exits with on preemption; the launchers
    (``launch/slurm_gpu.sh``, ``launch/tpu_pod.sh``) requeue or rerun the job on it.
    """
    exit_code = 42


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What every piece of one stage's run shares: the stage, the config, the mesh and the axis rules."""
    stage: Stage
    config: Any
    mesh: jax.sharding.Mesh
    rules: tuple[tuple[str, Any], ...]

    @property
    def stage_config(self) -> Any:
        """``config[stage.name]``: total_steps, optimizer, log_every, eval_every, batch_size, ..."""
        return self.config[self.stage.name]

    @contextlib.contextmanager
    def scope(self):
        """The mesh and the logical axis rules, active together."""
        with self.mesh, nn.logical_axis_rules(self.rules):
            yield


@dataclasses.dataclass
class StageState:
    """The trained state (``TrainState``, donated to each step), the frozen components and their
    shardings, and the optimizer."""
    state: TrainState
    frozen: dict
    state_shardings: TrainState
    frozen_shardings: dict
    tx: optax.GradientTransformation

    def params(self) -> dict:
        """Every component, frozen and trained: ``{component: tree}``."""
        return {**self.frozen, **self.state.params}


# ---------------------------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------------------------

def example_batch(data_iter: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shape/dtype of one training batch, read from ``data_iter`` without consuming it.

    ``data_iter`` is a grain ``DatasetIterator``; its state is saved before the batch is read and set back
    after, so the first step sees that same batch (one iterator, one set of prefetch threads per stage).
    """
    before = data_iter.get_state()
    batch = device_batch(next(data_iter))
    data_iter.set_state(before)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype), batch)


def init_params(run: StageRun, example: dict[str, jax.ShapeDtypeStruct]) -> tuple[dict, dict, dict]:
    """Every component's parameters on its sharding: ``(boxed abstract, shardings, params)``.

    Components whose source is ``INIT`` are initialised with the key ``split(key(config.seed))[0]`` by
    one jitted function with ``out_shardings`` (never materialised unsharded); the others are loaded by
    ``stage.load_component``. Raises ``ConfigError`` when ``stage.trainable`` names a component the model
    does not have.
    """
    stage, seed = run.stage, int(run.config.seed)
    init_rng = lambda: jax.random.split(jax.random.key(seed))[0]     # noqa: E731 (traced inside jit)
    with run.scope():
        boxed = jax.eval_shape(lambda b: stage.model_init(init_rng(), b), example)
        shardings = mesh_lib.logical_shardings(boxed, run.mesh, run.rules)
        abstract = nn.meta.unbox(boxed)
        unknown = set(stage.trainable) - set(abstract)
        if unknown:
            raise ConfigError(f"stage {stage.name}: trainable components {sorted(unknown)} not in model")
        init_names = [c for c in abstract if stage.source(c) == INIT]
        params = {}
        if init_names:
            def init_fn():
                dummy = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), example)
                return {c: nn.meta.unbox(stage.model_init(init_rng(), dummy))[c] for c in init_names}

            params.update(jax.jit(init_fn, out_shardings={c: shardings[c] for c in init_names})())
        for c in abstract:
            if c not in params:
                params[c] = stage.load_component(c, abstract[c], shardings[c])
    return boxed, shardings, params


def create_train_state(run: StageRun, example: dict[str, jax.ShapeDtypeStruct]) -> StageState:
    """Parameters (:func:`init_params`) split into the trained ``TrainState`` (step 0, AdamW state from
    ``make_optimizer``) and the frozen components, with the shardings of both. The optimizer state's
    shardings come from its abstract boxed state (``state.optimizer_shardings``)."""
    stage, sc = run.stage, run.stage_config
    boxed, shardings, params = init_params(run, example)
    trainable = {c: params.pop(c) for c in stage.trainable}
    frozen = params
    tx = make_optimizer(sc.optimizer, int(sc.total_steps))
    repl = mesh_lib.replicated(run.mesh)
    with run.scope():
        opt_shardings = optimizer_shardings(tx, {c: boxed[c] for c in stage.trainable}, run.mesh, run.rules)
        state_shardings = TrainState(step=repl, params={c: shardings[c] for c in stage.trainable},
                                     opt_state=opt_shardings)
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                        out_shardings=state_shardings)(trainable)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params, msg=f"{stage.name}: trainable")
        if frozen:
            parameter_overview.log_parameter_overview(frozen, msg=f"{stage.name}: frozen")
    return StageState(state=state, frozen=frozen, state_shardings=state_shardings,
                      frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen), tx=tx)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def make_train_step(run: StageRun, st: StageState):
    """The jitted step ``(state, frozen, batch, base_rng) -> (state, metrics)``.

    The loss of ``stage.loss`` on the merged parameters (``frozen_patterns`` under ``stop_gradient``)
    with the key ``fold_in(base_rng, state.step)``; gradients w.r.t. the trained components only; the
    optimizer update. ``metrics`` = the loss's metrics + ``loss``, ``grad_norm`` (global norm before
    clipping) and ``learning_rate``, scalars replicated. ``state`` is donated; the batch is split over
    ('data', 'fsdp') along its leading dimension.
    """
    stage, sc = run.stage, run.stage_config
    schedule = make_schedule(sc.optimizer, int(sc.total_steps))

    def train_step(state: TrainState, frozen: dict, batch: dict, base_rng: jax.Array):
        step_rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(trainable):
            trainable = stop_frozen_gradients(sc.optimizer, trainable)
            return stage.loss({**frozen, **trainable}, batch, step_rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = st.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    repl = mesh_lib.replicated(run.mesh)
    with run.scope():
        return jax.jit(train_step, in_shardings=(st.state_shardings, st.frozen_shardings,
                                                 mesh_lib.batch_sharding(run.mesh), repl),
                       out_shardings=(st.state_shardings, repl), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class _Preemption:
    """SIGTERM -> save a checkpoint at the next step boundary, then stop.

    One process: a Python SIGTERM handler. Several processes: no Python handler (it would replace the
    notifier of JAX's preemption service, which ``jax.distributed.initialize`` installs); every process
    stops at the step all of them agreed on (``multihost_utils.reached_preemption_sync_point``).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:   # not the main thread
                self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing at the next step, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        if self.requested:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return False


class _Profiler:
    """``config.profile``: a ``jax.profiler`` trace of steps ``[start_step, start_step + num_steps)``
    (0-based indices of the steps run) written to ``<stage_dir>/profile``; ``start_step < 0``: off."""

    def __init__(self, profile: Any, stage_dir: str):
        self.start = int(profile.start_step) if profile is not None else -1
        self.stop = self.start + (int(profile.num_steps) if profile is not None else 0)
        self.directory = os.path.join(stage_dir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        if step == self.start and self.stop > self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step + 1 >= self.stop:
            self.close(outputs)

    def close(self, outputs: Any = None) -> None:
        if self.active:
            jax.block_until_ready(outputs)      # the trace holds the device work of its last step
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile trace written to %s", self.directory)


class _TrainMetrics:
    """Per-step training metrics since the last log line; fetched to the host only at sync points,
    where any non-finite value stops the run (:class:`TrainingDivergedError`)."""

    def __init__(self, stage_name: str):
        self.stage_name = stage_name
        self.rows: list[tuple[int, dict]] = []     # (step, metrics) with step = steps done
        self.fetched = 0

    def add(self, step: int, metrics: dict) -> None:
        self.rows.append((step, metrics))

    def check(self) -> None:
        """Fetch the new rows; raise ``TrainingDivergedError`` at the first step with a NaN/inf metric."""
        for i in range(self.fetched, len(self.rows)):
            step, metrics = self.rows[i]
            metrics = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
            self.rows[i] = (step, metrics)
            bad = {k: float(v) for k, v in metrics.items() if not np.all(np.isfinite(v))}
            if bad:
                named = ", ".join(f"{k} = {v}" for k, v in sorted(bad.items()))
                raise TrainingDivergedError(
                    f"stage {self.stage_name}: training diverged at step {step}: {named}; no checkpoint of "
                    f"this state was written (rerunning resumes from the last checkpoint; consider a lower "
                    f"optimizer.lr, a longer warmup or a smaller clip_norm)")
        self.fetched = len(self.rows)

    def summary(self) -> dict[str, float]:
        """Checked means over the buffered steps, then an empty buffer."""
        self.check()
        rows = [m for _, m in self.rows]
        self.rows, self.fetched = [], 0
        return {k: float(np.mean([m[k] for m in rows])) for k in rows[0]}


@dataclasses.dataclass
class TrainLoop:
    """What the iterations share: the run, the state, the compiled step and the loop's services."""
    run: StageRun
    st: StageState
    step_fn: Any
    base_rng: jax.Array
    data_iter: Any
    manager: Any
    writer: Any
    metrics: _TrainMetrics
    report: Any = None
    preemption: _Preemption | None = None
    profiler: _Profiler | None = None


def _log(loop: TrainLoop, done: int) -> None:
    summary = loop.metrics.summary()
    loop.writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
    if jax.process_index() == 0:
        with open(os.path.join(loop.run.stage.stage_dir, "train_metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": done, **summary}) + "\n")


def train_loop_iteration(loop: TrainLoop, step: int) -> None:
    """Step ``step`` (0-based): read, complete (``stage.host_batch``) and shard the next batch, run the
    jitted step under ``StepTraceAnnotation('train', step_num=step)`` with host transfers disallowed,
    then, with ``done = step + 1``: log every ``log_every`` steps, checkpoint (Orbax's interval, and the
    last step), stop on preemption (``Preempted`` after a checkpoint) and evaluate every ``eval_every``
    steps. Metrics are checked for NaN/inf before anything is logged, saved or evaluated
    (``TrainingDivergedError``)."""
    run, sc = loop.run, loop.run.stage_config
    total = int(sc.total_steps)
    host_batch = run.stage.host_batch(device_batch(next(loop.data_iter)))
    if "index" in host_batch and logging.getLogger().isEnabledFor(logging.DEBUG):   # --verbosity=1
        logging.debug("stage %s: step %d: process %d read examples %s", run.stage.name, step + 1,
                      jax.process_index(), host_batch["index"].tolist())
    batch = mesh_lib.shard_batch(host_batch, run.mesh)
    loop.profiler.before(step)
    annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
    with run.scope(), jax.transfer_guard("disallow"), annotation:
        loop.st.state, metrics = loop.step_fn(loop.st.state, loop.st.frozen, batch, loop.base_rng)
    loop.profiler.after(step, metrics)
    done = step + 1
    loop.metrics.add(done, metrics)
    loop.report(done)
    if done % int(sc.log_every) == 0 or done == total:
        _log(loop, done)
    saved = False
    if done == total or loop.manager.should_save(done):
        loop.metrics.check()
        saved = checkpointing.save(loop.manager, done, loop.st.state, loop.data_iter, force=done == total)
    if loop.preemption.reached(done):
        loop.metrics.check()
        if not saved and loop.manager.latest_step() != done:     # once: not again after the interval save
            checkpointing.save(loop.manager, done, loop.st.state, loop.data_iter, force=True)
        checkpointing.wait_until_committed(loop.manager)
        loop.writer.flush()
        if jax.process_count() > 1:     # no process exits before every process's save is committed
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("avi_jax:preempted")
        raise Preempted(f"stage {run.stage.name}: stopped at step {done} by a preemption notice (SIGTERM); "
                        f"checkpoint saved in {loop.manager.directory}; rerun the same command to resume "
                        f"(exit status {Preempted.exit_code})")
    eval_every = int(sc.eval_every)
    if eval_every and done % eval_every == 0 and done != total:
        loop.metrics.check()
        with run.scope():
            evaluated = run.stage.evaluate(loop.st.params(), run.mesh)
        loop.writer.write_scalars(done, {f"eval/{k}": v for k, v in evaluated.items()})


def train_loop(loop: TrainLoop, start: int) -> None:
    """Iterations ``start .. total_steps - 1``, under SIGTERM handling and the ``config.profile`` window;
    then (also on an error) waits for the last checkpoint to be written and closes the data iterator (its
    prefetch threads)."""
    run = loop.run
    total = int(run.stage_config.total_steps)
    loop.report = periodic_actions.ReportProgress(num_train_steps=total, writer=loop.writer)
    loop.profiler = _Profiler(run.config.get("profile"), run.stage.stage_dir)
    t0 = time.time()
    try:
        with _Preemption() as loop.preemption:
            for step in range(start, total):
                train_loop_iteration(loop, step)
    finally:
        loop.profiler.close()
        checkpointing.wait_until_committed(loop.manager)
        loop.data_iter.close()
    logging.info("stage %s: %d steps in %.1fs", run.stage.name, total - start, time.time() - t0)


# ---------------------------------------------------------------------------------------------
# Export and final evaluation
# ---------------------------------------------------------------------------------------------

def export_and_evaluate(run: StageRun, st: StageState, writer: Any) -> dict[str, float]:
    """Write ``<stage_dir>/params.safetensors`` (the trained components, plus the seeded-init ones: a
    later stage that initialises a different subset of the model cannot re-derive them; later stages and
    inference read this file), evaluate, and write ``<stage_dir>/final_metrics.json`` atomically (the
    marker of a finished stage). Returns the final metrics (floats, plus ``steps``)."""
    stage, total = run.stage, int(run.stage_config.total_steps)
    exported = {**{c: v for c, v in st.frozen.items() if stage.source(c) == INIT}, **st.state.params}
    export_params(exported, os.path.join(stage.stage_dir, "params.safetensors"))
    with run.scope():
        final = {k: float(v) for k, v in stage.evaluate(st.params(), run.mesh).items()}
    final["steps"] = total
    writer.write_scalars(total, {f"eval/{k}": v for k, v in final.items()})
    writer.flush()
    if jax.process_index() == 0:
        path = os.path.join(stage.stage_dir, "final_metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(final, f, indent=2)
        os.replace(path + ".tmp", path)
    return final


def _finished(stage: Stage) -> dict[str, float] | None:
    path = os.path.join(stage.stage_dir, "final_metrics.json")
    if not os.path.exists(path):
        return None
    logging.info("stage %s already finished; reusing %s", stage.name, path)
    with open(path) as f:
        return json.load(f)


def _drop_metrics_after(stage: Stage, step: int) -> None:
    """Rewrite ``<stage_dir>/train_metrics.jsonl`` without the rows past ``step`` (the restored step; 0 for
    a fresh start) and any torn last line, so that a resumed run does not log those steps twice."""
    path = os.path.join(stage.stage_dir, "train_metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:     # a line torn by a kill mid-write
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(json.dumps(row) + "\n")
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    logging.info("stage %s: dropped %d train_metrics.jsonl rows past step %d (they are trained again)",
                 stage.name, len(lines) - len(kept), step)


def run_stage(stage: Stage, config: Any) -> dict[str, float]:
    """Train ``stage`` for ``config[stage.name].total_steps`` steps (resuming if possible) and evaluate it.

    ``config`` fields used: seed, mesh, logical_axis_rules, checkpoint.{every, keep, async_save},
    profile.{start_step, num_steps} (optional), and from ``config[stage.name]``: total_steps, optimizer,
    log_every, eval_every. Per-log-interval training metrics are appended to
    ``<stage_dir>/train_metrics.jsonl`` (on resume, the rows past the restored step are dropped first). A
    finished stage (``final_metrics.json`` exists) is not rerun. Resuming falls back from a damaged latest
    checkpoint to the newest intact one (``checkpointing.restore_intact``).

    Returns the final metrics (also written to ``<stage_dir>/final_metrics.json``).

    Raises:
      ConfigError: an inconsistent config (mesh, components, missing files).
      TrainingDivergedError: a training metric became NaN/inf (the state is not checkpointed).
      CheckpointError: checkpoints exist but none of them restores.
      Preempted: SIGTERM (or a multi-host preemption sync point); a checkpoint was written (exit with
        ``Preempted.exit_code``).
    """
    final = _finished(stage)
    if final is not None:
        return final
    os.makedirs(stage.stage_dir, exist_ok=True)
    run = StageRun(stage, config, mesh_lib.make_mesh(config.mesh),
                   tuple(tuple(r) for r in config.logical_axis_rules))
    writer = metric_writers.create_default_writer(
        os.path.join(stage.stage_dir, "tensorboard"), just_logging=jax.process_index() > 0)
    data_iter = iter(stage.train_dataset())
    st = create_train_state(run, example_batch(data_iter))
    manager = checkpointing.make_manager(
        os.path.join(stage.stage_dir, "checkpoints"), max_to_keep=int(config.checkpoint.keep),
        save_every=int(config.checkpoint.every), async_save=bool(config.checkpoint.async_save))
    try:
        start = 0
        if manager.all_steps():
            st.state, start = checkpointing.restore_intact(
                manager, checkpointing.abstract_with_shardings(st.state, st.state_shardings), data_iter,
                name=f"stage {stage.name}")
            logging.info("stage %s: resumed from step %d", stage.name, start)
        _drop_metrics_after(stage, start)
        with run.scope():
            stage.prepare(st.frozen, run.mesh)
        base_rng = jax.jit(lambda: jax.random.split(jax.random.key(int(config.seed)))[1],
                           out_shardings=mesh_lib.replicated(run.mesh))()
        loop = TrainLoop(run=run, st=st, step_fn=make_train_step(run, st), base_rng=base_rng,
                         data_iter=data_iter, manager=manager, writer=writer,
                         metrics=_TrainMetrics(stage.name))
        train_loop(loop, start)
        return export_and_evaluate(run, st, writer)
    finally:
        manager.close()
