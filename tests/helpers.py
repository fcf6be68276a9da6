"""Small helpers shared by the test modules (``from helpers import tiny_config``)."""
from __future__ import annotations

from typing import Any

import ml_collections


def tiny_config(config_module: Any, **overrides: Any) -> ml_collections.ConfigDict:
    """``config_module``'s ``tiny`` variant with flattened overrides, e.g.
    ``tiny_config(instruct, **{"data.dir": d, "align.total_steps": 3})``."""
    config = config_module.get_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a ``jax.distributed`` coordinator)."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def random_syncnet_variables(seed: int = 0) -> Any:
    """Random SyncNet variables (non-trivial BatchNorm statistics) drawn straight from the abstract shapes
    (no slow eager init)."""
    import jax
    import numpy as np
    from avi_jax.checkpoints.syncnet import abstract_variables
    from avi_jax.models.syncnet import SyncNet
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 100
        return rng.normal(0.0, fan_in ** -0.5, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(SyncNet()))
