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
