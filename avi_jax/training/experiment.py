"""``train_and_evaluate(config, workdir)``: run a config's stages in order and collect their metrics.

Imported by ``python -m avi_jax.train``, notebooks and tests alike. Writes ``<workdir>/config.json``
(the resolved config, so inference can rebuild the model from a workdir alone) and
``<workdir>/final_metrics.json`` (every stage's final metrics merged, plus ``stages: {name: metrics}``).
A stage that already finished is skipped; an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from avi_jax.errors import ConfigError
from avi_jax.training.loop import run_stage


def _stage_classes(config: Any) -> tuple[Any, dict]:
    if config.family == "instruct":
        from avi_jax.assembly.instruct import InstructSetup
        from avi_jax.training.instruct import STAGES
        return InstructSetup, STAGES
    if config.family == "motion":
        from avi_jax.assembly.motion import MotionSetup
        from avi_jax.training.motion import STAGES
        return MotionSetup, STAGES
    if config.family == "style":
        from avi_jax.assembly.style import StyleSetup
        from avi_jax.training.style import STAGES
        return StyleSetup, STAGES
    raise ConfigError(f"unknown config.family {config.family!r}")


def save_config(config: Any, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, os.path.join(workdir, "config.json"))


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train and evaluate every stage in ``config.stages``; returns the merged final metrics."""
    setup_cls, stages = _stage_classes(config)
    unknown = [s for s in config.stages if s not in stages]
    if unknown:
        raise ConfigError(f"config.stages: unknown stage(s) {unknown}; known: {sorted(stages)}")
    save_config(config, workdir)
    setup = setup_cls(config, workdir)
    merged: dict[str, Any] = {"stages": {}}
    for name in config.stages:
        logging.info("=== stage %s ===", name)
        metrics = run_stage(stages[name](setup), config)
        merged["stages"][name] = metrics
        merged.update({k: v for k, v in metrics.items() if k != "steps"})
    if jax.process_index() == 0:
        path = os.path.join(workdir, "final_metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(merged, f, indent=2)
        os.replace(path + ".tmp", path)
        logging.info("final metrics: %s", json.dumps({k: v for k, v in merged.items() if k != "stages"}))
    return merged
