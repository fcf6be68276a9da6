"""What a training stage says about itself, and the one evaluation data path every stage uses.

A ``Stage`` names the model's parameter components, where each comes from (seeded init, a Hugging Face
folder, an earlier stage of the same run), which are trained, the loss, the data and the evaluation; the
shared loop (``avi_jax.training.loop.run_stage``) does the rest. A stage is built from its family's
*setup* (``avi_jax.assembly.{instruct,motion,style}``), which builds the modules and loads parameters;
the stage forwards ``source``/``load_component`` to it.
"""
from __future__ import annotations

import abc
import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from avi_jax import sharding as mesh_lib


def device_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The numeric arrays of a pipeline batch (bool, int, uint, float), dropping strings and objects."""
    return {k: v for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def eval_batches(dataset: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh
                 ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
    """``(host_batch, sharded_batch)`` for each per-host batch of an evaluation ``dataset``.

    ``sharded_batch``: the numeric arrays as one global batch on ``mesh`` (leading dimension split over
    ('data', 'fsdp'); ``sharding.shard_batch``). ``host_batch``: the same arrays as numpy, gathered over
    processes in process order, so its rows line up with device outputs gathered by ``sharding.to_host``.
    Each batch's size must divide over the mesh's batch axes (the pipeline pads evaluation splits to
    whole batches with ``valid = False`` rows).
    """
    for batch in dataset:
        local = device_batch(batch)
        yield mesh_lib.to_host(local), mesh_lib.shard_batch(local, mesh)


class Stage(abc.ABC):
    """One training stage. Subclasses set ``name``, ``trainable`` and implement the abstract methods.

    Parameters form a dict ``{component: tree}`` (e.g. ``audio_encoder``, ``qformer``, ``llm``); the loss
    sees the merged dict of trainable and frozen components. ``setup`` is the stage family's assembly
    object (``config``, ``workdir``, ``source_of(component, stage)``, ``load(component, source, abstract,
    shardings)``).
    """
    name: str
    trainable: tuple[str, ...]

    def __init__(self, setup: Any):
        self.setup = setup
        self.config = setup.config
        self.workdir = setup.workdir

    @property
    def stage_dir(self) -> str:
        return os.path.join(self.workdir, self.name)

    def source(self, component: str) -> str:
        """Where ``component`` comes from: ``assembly.common.INIT`` or anything ``load_component``
        understands (the setup's ``source_of``)."""
        return self.setup.source_of(component, self.name)

    def load_component(self, component: str, abstract: Any, shardings: Any) -> Any:
        """A non-``INIT`` component's parameters (the tree of ``abstract``) placed on ``shardings``, loaded
        by the setup from ``self.source(component)``. Raises ``ConfigError``/``CheckpointError``."""
        return self.setup.load(component, self.source(component), abstract, shardings)

    @abc.abstractmethod
    def train_dataset(self) -> Iterable:
        """A grain dataset whose ``iter()`` yields per-host numpy batches and supports get/set_state."""

    @abc.abstractmethod
    def eval_dataset(self) -> Iterable:
        """One pass over the evaluation split, per-host numpy batches padded with ``valid = False`` rows."""

    def eval_batches(self, mesh: jax.sharding.Mesh
                     ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
        """:func:`eval_batches` over :meth:`eval_dataset`."""
        return eval_batches(self.eval_dataset(), mesh)

    @abc.abstractmethod
    def model_init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict:
        """Boxed (logically partitioned) parameters ``{component: tree}``; traced under eval_shape/jit."""

    @abc.abstractmethod
    def loss(self, params: dict, batch: dict[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar () float32 training loss and scalar metrics for one global batch."""

    @abc.abstractmethod
    def evaluate(self, params: dict, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Held-out metrics (host floats)."""

    def prepare(self, frozen: dict, mesh: jax.sharding.Mesh) -> None:
        """Called once before the first step with the frozen components, e.g. to precompute their
        outputs for :meth:`host_batch`. Default: nothing."""

    def host_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host-side additions to each (host-local) training batch before it is sharded. Default: none."""
        return batch
