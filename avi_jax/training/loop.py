"""The shared train/eval loop of every stage (align, tune, motion, style, and the demo's lm stage).

A ``Stage`` says what is stage-specific: the model's parameter components, where each comes from
(seeded init, a Hugging Face folder, or an earlier stage of the same run), which are trained, the loss,
the data and the evaluation. ``run_stage`` does the rest, the same way for all of them: abstract init,
shardings from logical axes, sharded materialisation, a jitted step with donation, Orbax checkpoints of
the state *and* the data iterator (resume exactly; save on SIGTERM), clu logging, periodic evaluation,
and finally ``<stage_dir>/params.safetensors`` and ``<stage_dir>/final_metrics.json``.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import signal
import time
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions

from avi_jax import sharding as mesh_lib
from avi_jax.assembly.common import INIT
from avi_jax.checkpoints.exported import export_params
from avi_jax.errors import ConfigError
from avi_jax.training import checkpointing
from avi_jax.training.state import (TrainState, make_optimizer, make_schedule, optimizer_shardings,
                                   stop_frozen_gradients)

class Stage(abc.ABC):
    """One training stage. Subclasses set ``name``, ``trainable`` and implement the methods below.

    Parameters form a dict ``{component: tree}`` (e.g. ``audio_encoder``, ``qformer``, ``llm``); the
    loss sees the merged dict of trainable and frozen components.
    """
    name: str
    trainable: tuple[str, ...]

    def __init__(self, config: Any, workdir: str):
        self.config = config
        self.workdir = workdir

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.workdir, self.name)

    @abc.abstractmethod
    def train_dataset(self) -> Iterable:
        """A grain dataset whose ``iter()`` yields numpy batches and supports get/set_state."""

    @abc.abstractmethod
    def model_init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict:
        """Boxed (logically partitioned) parameters ``{component: tree}``; traced under eval_shape/jit."""

    def source(self, component: str) -> str:
        """Where ``component`` comes from: ``INIT`` or anything ``load_component`` understands."""
        return INIT

    def load_component(self, component: str, abstract: Any, shardings: Any) -> Any:
        """Load a non-``INIT`` component onto ``shardings`` (HF folder, earlier stage...)."""
        raise ConfigError(f"stage {self.name}: no loader for component {component!r}")

    @abc.abstractmethod
    def loss(self, params: dict, batch: dict[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar training loss and scalar metrics for one global batch."""

    @abc.abstractmethod
    def evaluate(self, params: dict, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Held-out metrics (host floats)."""

    def prepare(self, frozen: dict, mesh: jax.sharding.Mesh) -> None:
        """Called once before the first step with the frozen components, e.g. to precompute their
        outputs for :meth:`host_batch`. Default: nothing."""

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host-side additions to each (host-local) training batch before it is sharded. Default: none."""
        return batch


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the numeric arrays of a pipeline batch (drops strings/objects)."""
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


class _Preemption:
    """SIGTERM -> save a checkpoint at the next step boundary, then stop (and multi-host sync points)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
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


class Preempted(Exception):
    """Raised after a preemption checkpoint was written; rerunning the same command resumes."""


def run_stage(stage: Stage, config: Any) -> dict[str, float]:
    """Train ``stage`` for ``config.total_steps`` steps (resuming if possible) and evaluate it.

    ``config`` fields used: seed, mesh, logical_axis_rules, checkpoint.{every, keep, async_save}, and
    from ``config[stage.name]``: total_steps, optimizer, log_every, eval_every.
    Per-log-interval training metrics are appended to ``<stage_dir>/train_metrics.jsonl``.
    Returns the final metrics (also written to ``<stage_dir>/final_metrics.json``).
    """
    stage_dir = stage.stage_dir
    done_path = os.path.join(stage_dir, "final_metrics.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            logging.info("stage %s already finished; reusing %s", stage.name, done_path)
            return json.load(f)
    os.makedirs(stage_dir, exist_ok=True)

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    sc = config[stage.name]
    total_steps = int(sc.total_steps)
    writer = metric_writers.create_default_writer(
        os.path.join(stage_dir, "tensorboard"), just_logging=jax.process_index() > 0)

    dataset = stage.train_dataset()
    data_iter = iter(dataset)
    example = device_batch(next(iter(dataset)))
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype), example)

    seed = int(config.seed)
    init_rng = lambda: jax.random.split(jax.random.key(seed))[0]     # noqa: E731 (traced inside jit)
    with mesh, nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda b: stage.model_init(init_rng(), b), example)
        shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
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

            init_fn = jax.jit(init_fn, out_shardings={c: shardings[c] for c in init_names})
            params.update(init_fn())
        for c in abstract:
            if c not in params:
                params[c] = stage.load_component(c, abstract[c], shardings[c])
        trainable = {c: params[c] for c in stage.trainable}
        frozen = {c: v for c, v in params.items() if c not in stage.trainable}
        del params
        tx = make_optimizer(sc.optimizer, total_steps)
        repl = mesh_lib.replicated(mesh)
        trainable_shardings = {c: shardings[c] for c in stage.trainable}
        opt_shardings = optimizer_shardings(
            jax.eval_shape(tx.init, {c: abstract[c] for c in stage.trainable}), trainable_shardings, repl)
        state_shardings = TrainState(step=repl, params=trainable_shardings, opt_state=opt_shardings)
        state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                        out_shardings=state_shardings)(trainable)
        frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params, msg=f"{stage.name}: trainable")
        if frozen:
            parameter_overview.log_parameter_overview(frozen, msg=f"{stage.name}: frozen")

    manager = checkpointing.make_manager(
        os.path.join(stage_dir, "checkpoints"), max_to_keep=int(config.checkpoint.keep),
        save_every=int(config.checkpoint.every), async_save=bool(config.checkpoint.async_save))
    start = 0
    if manager.latest_step() is not None:
        state, start = checkpointing.restore(
            manager, checkpointing.abstract_with_shardings(state, state_shardings), data_iter)
        logging.info("stage %s: resumed from step %d", stage.name, start)

    schedule = make_schedule(sc.optimizer, total_steps)
    with mesh, nn.logical_axis_rules(rules):
        stage.prepare(frozen, mesh)

    def train_step(state: TrainState, frozen: dict, batch: dict, base_rng: jax.Array):
        step_rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(trainable):
            trainable = stop_frozen_gradients(sc.optimizer, trainable)
            return stage.loss({**frozen, **trainable}, batch, step_rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_sh = mesh_lib.batch_sharding(mesh)
    with mesh, nn.logical_axis_rules(rules):
        step_fn = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sh, repl),
                          out_shardings=(state_shardings, repl), donate_argnums=(0,))
    step_rng = jax.jit(lambda: jax.random.split(jax.random.key(seed))[1], out_shardings=repl)()

    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    eval_every = int(sc.eval_every)
    log_path = os.path.join(stage_dir, "train_metrics.jsonl")
    history: list[dict] = []
    t0 = time.time()
    with _Preemption() as preemption:
        for step in range(start, total_steps):
            batch = mesh_lib.shard_batch(stage.host_batch(device_batch(next(data_iter))), mesh)
            with mesh, nn.logical_axis_rules(rules), jax.transfer_guard("disallow"):
                state, metrics = step_fn(state, frozen, batch, step_rng)
            history.append(metrics)
            done = step + 1
            report(done)
            if done % int(sc.log_every) == 0 or done == total_steps:
                summary = {k: float(np.mean([jax.device_get(m[k]) for m in history])) for k in history[0]}
                writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
                if jax.process_index() == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": done, **summary}) + "\n")
                history = []
            checkpointing.save(manager, done, state, data_iter, force=done == total_steps)
            if preemption.reached(done):
                checkpointing.save(manager, done, state, data_iter, force=True)
                manager.wait_until_finished()
                writer.flush()
                raise Preempted(f"stage {stage.name} preempted at step {done}; rerun to resume")
            if eval_every and done % eval_every == 0 and done != total_steps:
                with mesh, nn.logical_axis_rules(rules):
                    writer.write_scalars(done, {f"eval/{k}": v for k, v in
                                                stage.evaluate({**frozen, **state.params}, mesh).items()})
    manager.wait_until_finished()
    logging.info("stage %s: %d steps in %.1fs", stage.name, total_steps - start, time.time() - t0)

    # Trained components, plus seeded-init ones (they cannot be re-derived by a later stage that
    # initialises a different subset of the model): later stages and inference read this file.
    exported = {**{c: v for c, v in frozen.items() if stage.source(c) == INIT}, **state.params}
    export_params(exported, os.path.join(stage_dir, "params.safetensors"))
    with mesh, nn.logical_axis_rules(rules):
        final = {k: float(v) for k, v in stage.evaluate({**frozen, **state.params}, mesh).items()}
    final["steps"] = total_steps
    writer.write_scalars(total_steps, {f"eval/{k}": v for k, v in final.items()})
    writer.flush()
    if jax.process_index() == 0:
        tmp = done_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(final, f, indent=2)
        os.replace(tmp, done_path)
    manager.close()
    return final
