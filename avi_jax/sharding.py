"""Sharding: the device mesh ('data', 'fsdp', 'tensor'), logical-axis -> mesh shardings, and placing
arrays on (and gathering them from) the mesh.

The bottom layer (with ``errors``): training, inference and the checkpoint converters all use it.

Models only name logical axes (``avi_jax.models.layers``); the config's ``logical_axis_rules`` map them
onto mesh axes (``configs/common.py``). Shardings of a params tree come from the logical partition specs
that ``nn.with_logical_partitioning`` attached to its leaves.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avi_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``Mesh`` with axes ('data', 'fsdp', 'tensor') from ``{data, fsdp, tensor}`` sizes.

    One size may be -1: it absorbs the remaining devices. A fully specified mesh smaller than the
    number of devices uses the first devices (with a warning). Raises ``ConfigError`` when the mesh
    needs more devices than there are, or -1 cannot be resolved.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % known:
            raise ConfigError(f"config.mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) < len(devices) and jax.process_count() == 1:
        logging.warning("config.mesh %s uses %d of %d devices", dict(zip(MESH_AXES, sizes)),
                        int(np.prod(sizes)), len(devices))
        devices = devices[: int(np.prod(sizes))]
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are available")
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """``NamedSharding`` per leaf of a tree whose leaves are ``nn.LogicallyPartitioned`` (or plain).

    Plain (unannotated) leaves are replicated. The result has the structure of the *unboxed* tree.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Put a host array (the same full value on every process) onto ``sharding``.

    Each device receives only its own slice; works when the sharding spans several processes, where
    ``jax.device_put`` cannot be used.
    """
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (all-gathers arrays that span several processes).

    Numpy leaves are host-local pieces of a per-host batch and are concatenated over processes too,
    so host-side fields line up with gathered device outputs.
    """
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); other dimensions replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a host-local numpy batch onto the mesh as one global batch (multi-host aware).

    Each process passes its own slice (per-host sharding of the data pipeline); the global batch is the
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(v) for k, v in batch.items()}
