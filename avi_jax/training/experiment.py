"""``train_and_evaluate(config, workdir)``: run a config's stages in order and collect their metrics.

Imported by ``python -m avi_jax.train``, notebooks and tests alike. A config is one stage family
(``configs/instruct.py``, ``motion_prior.py``, ``style_prior.py``) or the whole system
(``configs/avi_talking.py``: every family's stages into the same workdir, stage 1 then stage 2).
Writes ``<workdir>/config.json`` (the resolved config, so inference can rebuild the model from a workdir
alone) and ``<workdir>/final_metrics.json`` (every stage's final metrics merged, plus
``stages: {name: metrics}``). A stage that already finished is skipped; an interrupted one resumes from
its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from avi_jax.assembly.common import family_config
from avi_jax.errors import ConfigError
from avi_jax.training.loop import run_stage

FAMILIES = ("instruct", "motion", "style")


def _stage_classes(family: str) -> tuple[Any, dict]:
    if family == "instruct":
        from avi_jax.assembly.instruct import InstructSetup
        from avi_jax.training.instruct import STAGES
        return InstructSetup, STAGES
    if family == "motion":
        from avi_jax.assembly.motion import MotionSetup
        from avi_jax.training.motion import STAGES
        return MotionSetup, STAGES
    if family == "style":
        from avi_jax.assembly.style import StyleSetup
        from avi_jax.training.style import STAGES
        return StyleSetup, STAGES
    raise ConfigError(f"unknown config.family {family!r}; expected one of {', '.join(FAMILIES)} or 'system'")


def stage_plan(config: Any, workdir: str) -> list[tuple[str, Any, Any, str]]:
    """(stage name, stage class, setup class, family config) for each stage of ``config.stages``, in
    order. Raises ``ConfigError`` for an unknown family or stage."""
    families = [f for f in FAMILIES if f in config] if config.family == "system" else [config.family]
    known = {}
    for family in families:
        setup_cls, stages = _stage_classes(family)
        known.update({name: (family, cls, setup_cls) for name, cls in stages.items()})
    unknown = [s for s in config.stages if s not in known]
    if unknown:
        raise ConfigError(f"config.stages: unknown stage(s) {unknown}; known: {sorted(known)}")
    return [(name, known[name][1], known[name][2], family_config(config, known[name][0], workdir))
            for name in config.stages]


def save_config(config: Any, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, os.path.join(workdir, "config.json"))


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
    """Train and evaluate every stage in ``config.stages``; returns the merged final metrics."""
    plan = stage_plan(config, workdir)
    save_config(config, workdir)
    merged: dict[str, Any] = {"stages": {}}
    setups: dict[Any, Any] = {}
    for name, stage_cls, setup_cls, family in plan:
        logging.info("=== stage %s ===", name)
        if setup_cls not in setups:      # built when its family's first stage starts (it may need the last)
            setups[setup_cls] = setup_cls(family, workdir)
        metrics = run_stage(stage_cls(setups[setup_cls]), family)
        merged["stages"][name] = metrics
        # a name another stage already reported (e.g. align's and style's retrieval_top1) gets a prefix
        merged.update({k if k not in merged else f"{name}_{k}": v for k, v in metrics.items() if k != "steps"})
    if jax.process_index() == 0:
        path = os.path.join(workdir, "final_metrics.json")
        with open(path + ".tmp", "w") as f:
            json.dump(merged, f, indent=2)
        os.replace(path + ".tmp", path)
        logging.info("final metrics: %s", json.dumps({k: v for k, v in merged.items() if k != "stages"}))
    return merged
