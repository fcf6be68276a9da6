"""``train_and_evaluate(config, workdir)``: run a config's stages in order and collect their metrics.

Imported by ``python -m avi_jax.train``, notebooks and tests alike. A config is one stage family
(``configs/instruct.py``, ``motion_prior.py``, ``style_prior.py``) or the whole system
(``configs/avi_talking.py``: every family's stages into the same workdir, stage 1 then stage 2).
Writes ``<workdir>/config.json`` (the resolved config, so inference can rebuild the model from a workdir
alone) and ``<workdir>/final_metrics.json`` (every stage's final metrics merged, plus
``stages: {name: metrics}``). A stage that already finished is skipped; an interrupted one resumes from
its last checkpoint.

Before any work the config's values are checked (``training.validation.validate``) and so is the workdir:
each stage records the config it is trained with in ``<workdir>/<stage>/config.json`` when it starts, and a
rerun whose config differs from the record of a stage that trained something (a checkpoint, an export) in
a field that defines that stage (anything but the fields in :data:`NON_DEFINING`) stops with a
``WorkdirConfigError`` that lists the differing fields and the ways out: a new workdir, or ``retrain_from``
(``python -m avi_jax.train --retrain_from STAGE``), which deletes that stage's folder and those of the
stages trained from it.
``<workdir>/config.json`` is rewritten only once the workdir is known to be consistent.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterable, Sequence

import jax

from avi_jax.assembly.common import FAMILIES, family_config
from avi_jax.errors import ConfigError, WorkdirConfigError
from avi_jax.training.loop import run_stage
from avi_jax.training.validation import validate



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
    families = run_families(config)
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


# ---------------------------------------------------------------------------------------------
# The config each stage was trained with
# ---------------------------------------------------------------------------------------------

STAGE_CONFIG = "config.json"          # <workdir>/<stage>/config.json: the family config the stage started with
# Fields of a family config that do not change what a stage trains (relative dotted paths; a prefix covers
# the fields under it): which stages run, logging, evaluation-only settings, checkpointing, profiling,
# the device mesh and its axis rules. In a stage block (``<stage>.*``): log_every and eval_every.
NON_DEFINING = ("stages", "mesh", "logical_axis_rules", "checkpoint", "profile", "generation", "sampler",
                "eval", "data.max_eval_clips")
NON_DEFINING_IN_STAGE = ("log_every", "eval_every")
_PATH_KEYS = ("hf_path", "llm_path", "text_path", "model_path", "masks_path", "dir", "motion_workdir",
              "instruct_workdir", "teacher_path")


def family_stages(family: str) -> list[str]:
    """The stage names of a family, in training order (``lm``, ``align``, ``tune`` for instruct)."""
    return list(_stage_classes(family)[1])


def run_families(config: Any) -> list[str]:
    """The stage families a config trains: its own, or every one under the whole system."""
    return [f for f in FAMILIES if f in config] if config.family == "system" else [config.family]


def stage_record(config: Any, family: str) -> dict:
    """What ``<workdir>/<stage>/config.json`` holds for a stage of ``family``: that family's config as
    JSON (for the whole system ``config[family]`` with references resolved and ``motion_workdir`` as set,
    i.e. '' = this workdir), path fields made absolute."""
    if config.get("family") == "system":
        fc = config[family]
        fc = fc.copy_and_resolve_references() if hasattr(fc, "copy_and_resolve_references") else fc
    else:
        fc = config
    record = json.loads(fc.to_json_best_effort()) if hasattr(fc, "to_json_best_effort") else dict(fc)

    def absolute(node):
        if isinstance(node, dict):
            return {k: (os.path.abspath(v) if k in _PATH_KEYS and isinstance(v, str) and v else absolute(v))
                    for k, v in node.items()}
        return node

    return absolute(record)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def defining_fields(record: dict, stage: str, stages: Sequence[str]) -> dict[str, Any]:
    """The flattened fields of a stage record that define ``stage``: all but :data:`NON_DEFINING`,
    ``<stage block>.log_every/eval_every`` and the blocks of the family's later ``stages``."""
    later = set(stages[stages.index(stage) + 1:]) if stage in stages else set()
    out = {}
    for path, value in _flatten(record).items():
        parts = path.split(".")
        if any(path == p or path.startswith(p + ".") for p in NON_DEFINING) or parts[0] in later:
            continue
        if len(parts) == 2 and parts[0] in stages and parts[1] in NON_DEFINING_IN_STAGE:
            continue
        out[path] = value
    return out


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirConfigError(f"{path}: not a readable config ({e}); move the stage folder away or "
                                 f"use a new --workdir") from None


def _started(stage_dir: str) -> bool:
    """Whether a stage has trained anything: a checkpoint, an export or its final metrics (a stage that
    failed before its first checkpoint has nothing to be inconsistent with)."""
    ckpt = os.path.join(stage_dir, "checkpoints")
    return os.path.isfile(os.path.join(stage_dir, "final_metrics.json")) or \
        os.path.isfile(os.path.join(stage_dir, "params.safetensors")) or \
        (os.path.isdir(ckpt) and bool(os.listdir(ckpt)))


def _recorded(workdir: str, stage: str, family: str) -> dict | None:
    """The record of a started stage: its own ``config.json``, or for a workdir written before stages had
    one, its family's part of ``<workdir>/config.json``; None when the stage never started."""
    stage_dir = os.path.join(workdir, stage)
    if not _started(stage_dir):
        return None
    path = os.path.join(stage_dir, STAGE_CONFIG)
    if os.path.isfile(path):
        return _read_json(path)
    top = os.path.join(workdir, "config.json")
    if not os.path.isfile(top):
        return None
    import ml_collections
    old = ml_collections.ConfigDict(_read_json(top))
    if old.get("family") == family or (old.get("family") == "system" and family in old):
        return stage_record(old, family)
    return None


def _dependents(stage: str, families: Sequence[str]) -> list[str]:
    """``stage`` and every stage trained from it, in training order: the later stages of its family, and
    for the motion stage of the whole system the style stage (its frozen style encoder)."""
    for family in families:
        order = family_stages(family)
        if stage in order:
            out = order[order.index(stage):]
            if family == "motion" and "style" in families:
                out += family_stages("style")
            return out
    return []


def _fmt(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def _user_path(config: Any, family: str, field: str) -> str:
    """The command-line path of a family config's ``field``: ``config.align.total_steps``, or in the whole
    system ``config.instruct.align.total_steps``, ``config.seed`` (shared) and ``config.instruct.data.demo.*``
    (the dataset every family reads)."""
    if config.get("family") != "system":
        return f"config.{field}"
    if field == "seed" or field.startswith("mesh."):
        return f"config.{field}"
    if family != "instruct" and (field in ("data.source", "data.dir") or field.startswith("data.demo.")):
        return f"config.instruct.{field}"
    return f"config.{family}.{field}"


def check_workdir(config: Any, workdir: str, retrain_from: Sequence[str] = ()) -> list[str]:
    """Refuse a workdir whose started stages were trained with a different config; returns the folders
    that ``retrain_from`` will delete (the stages', and the demo tokenizer's when no stage-1 stage is kept).

    For each stage of the run's families with a record (``<workdir>/<stage>/config.json``, or
    ``<workdir>/config.json`` for older workdirs), the fields that define it (:func:`defining_fields`)
    must equal the current config's. Stages in ``retrain_from`` and those trained from them are not
    compared: they are to be deleted and trained again.

    Raises:
      ConfigError: ``retrain_from`` names a stage this run does not have or does not train.
      WorkdirConfigError: the differing fields (dotted paths, old -> new) and the ways out; or stages of a
        family the config does not train (its config.json would no longer describe them).
    """
    families = run_families(config)
    known = [s for f in families for s in family_stages(f)]
    for stage in retrain_from:
        if stage not in known:
            raise ConfigError(f"--retrain_from {stage}: not a stage of this run; expected one of {', '.join(known)}")
        if stage not in tuple(config.stages):
            raise ConfigError(f"--retrain_from {stage}: this run does not train {stage} (config.stages = "
                              f"{tuple(config.stages)}); it would only be deleted")
    reset = [s for s in known if any(s in _dependents(r, families) for r in retrain_from)]
    if not os.path.isdir(workdir):
        return []

    others = [s for f in FAMILIES if f not in families for s in family_stages(f)
              if _started(os.path.join(workdir, s))]
    if others:
        raise WorkdirConfigError(
            f"{workdir} holds stage(s) {', '.join(others)}, which this {config.family!r} config does not train; "
            f"rewriting {os.path.join(workdir, 'config.json')} would no longer describe them: use a new --workdir")

    drift: dict[str, list[str]] = {}          # "config.x: old -> new" -> the stages it concerns
    drifted: list[str] = []
    for family in families:
        order = family_stages(family)
        current = stage_record(config, family)
        for stage in order:
            if stage in reset:
                continue
            old = _recorded(workdir, stage, family)
            if old is None:
                continue
            a, b = defining_fields(old, stage, order), defining_fields(current, stage, order)
            for k in sorted(set(a) | set(b)):
                if a.get(k, _ABSENT) != b.get(k, _ABSENT):
                    line = f"{_user_path(config, family, k)}: {_fmt(a.get(k, _ABSENT))} -> {_fmt(b.get(k, _ABSENT))}"
                    drift.setdefault(line, []).append(stage)
                    if stage not in drifted:
                        drifted.append(stage)
    if drift:
        roots = [s for s in drifted if not any(s != r and s in _dependents(r, families) for r in drifted)]
        lines = [f"{line} ({', '.join(stages)})" for line, stages in drift.items()]
        shown = "; ".join(lines[:10]) + (f"; and {len(lines) - 10} more" if len(lines) > 10 else "")
        deleted = [os.path.join(workdir, s) for s in known
                   if any(s in _dependents(r, families) for r in roots) and os.path.exists(os.path.join(workdir, s))]
        unplanned = [r for r in roots if r not in tuple(config.stages)]
        note = (f" with a config that trains {', '.join(unplanned)} (this one trains only "
                f"{', '.join(config.stages)})" if unplanned else "")
        raise WorkdirConfigError(
            f"{workdir}: stage(s) {', '.join(drifted)} were trained with a different config: {shown}. Either "
            f"train into a new --workdir, or rerun{note} with --retrain_from {','.join(roots)} to delete "
            f"{', '.join(deleted)} and train again (python: train_and_evaluate(..., retrain_from={roots!r}))")
    folders = [os.path.join(workdir, s) for s in reset if os.path.exists(os.path.join(workdir, s))]
    # the demo's word-level tokenizer (<workdir>/tokenizer) is built by the instruct family's first stage
    # from the training data: it goes with the last instruct stage that used it
    tokenizer = os.path.join(workdir, "tokenizer")
    if "instruct" in families and os.path.isdir(tokenizer) and any(s in reset for s in family_stages("instruct")) \
            and not any(s not in reset and _started(os.path.join(workdir, s)) for s in family_stages("instruct")):
        folders.append(tokenizer)
    return folders


def _delete(folders: Sequence[str], workdir: str, retrain_from: Sequence[str]) -> None:
    """Delete the stage folders that ``retrain_from`` resets (process 0; the others wait)."""
    if folders:
        logging.warning("--retrain_from %s: deleting %s (and %s) to train them again", ",".join(retrain_from),
                        ", ".join(folders), os.path.join(workdir, "final_metrics.json"))
        if jax.process_index() == 0:
            for folder in folders:
                shutil.rmtree(folder)
            stale = os.path.join(workdir, "final_metrics.json")
            if os.path.exists(stale):
                os.remove(stale)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("avi_jax.retrain_from")


def record_stage_config(config: Any, family: str, workdir: str, stage: str) -> None:
    """Write ``<workdir>/<stage>/config.json`` (process 0) unless the stage has one and has trained
    something (:func:`_started`; its record is then the config it was trained with)."""
    stage_dir = os.path.join(workdir, stage)
    path = os.path.join(stage_dir, STAGE_CONFIG)
    if jax.process_index() != 0 or (os.path.isfile(path) and _started(stage_dir)):
        return
    os.makedirs(stage_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(stage_record(config, family), f, indent=2)
    os.replace(path + ".tmp", path)


def _normalise_retrain(retrain_from: str | Iterable[str] | None) -> list[str]:
    if not retrain_from:
        return []
    if isinstance(retrain_from, str):
        retrain_from = retrain_from.split(",")
    return [s.strip() for s in retrain_from if s and s.strip()]


def train_and_evaluate(config: Any, workdir: str, retrain_from: str | Sequence[str] | None = None
                       ) -> dict[str, Any]:
    """Train and evaluate every stage in ``config.stages``; returns the merged final metrics.

    Before any work: the config's values (``validation.validate``) and the workdir (:func:`check_workdir`)
    are checked; ``retrain_from`` (stage names, or one comma-separated string) deletes those stages'
    folders and those of the stages trained from them, so they are trained again.

    Raises:
      ConfigError: an invalid config value (the field's dotted path and what it accepts), an unknown stage.
      WorkdirConfigError: the workdir's stages were trained with a different config.
    """
    validate(config)
    retrain_from = _normalise_retrain(retrain_from)
    plan = stage_plan(config, workdir)
    folders = check_workdir(config, workdir, retrain_from)
    if retrain_from:
        _delete(folders, workdir, retrain_from)
    save_config(config, workdir)
    merged: dict[str, Any] = {"stages": {}}
    setups: dict[Any, Any] = {}
    stage_family = {s: f for f in run_families(config) for s in family_stages(f)}
    for name, stage_cls, setup_cls, family in plan:
        logging.info("=== stage %s ===", name)
        if setup_cls not in setups:      # built when its family's first stage starts (it may need the last)
            setups[setup_cls] = setup_cls(family, workdir)
        record_stage_config(config, stage_family[name], workdir, name)
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
