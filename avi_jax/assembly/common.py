"""Helpers shared by the stage families (instruct, motion, style) in training and inference: config
presets, required paths, component sources, a workdir's config, the prepared dataset and its batch streams.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax

from avi_jax.data import augment, builder, demo, pipeline, schema
from avi_jax.errors import ConfigError

DATA_DIR_HINT = ("a dataset prepared by `python -m avi_jax.data.prepare ...` (ArrayRecord folder)")
INIT = "init"   # component source: seeded random initialisation
FAMILIES = ("instruct", "motion", "style")   # stage families; configs/avi_talking.py holds all three


def load_workdir_config(workdir: str, what: str = "a training run's --workdir") -> Any:
    """The resolved config a training run wrote to ``<workdir>/config.json`` (a ConfigDict).

    Raises ``ConfigError`` naming the file when it is missing or not JSON.
    """
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; expected {what} (`python -m avi_jax.train --config ... "
                          f"--workdir {workdir}`)")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable config ({e})") from None


def family_config(config: Any, family: str, workdir: str = "") -> Any:
    """The ``family`` ('instruct' | 'motion' | 'style') config of a run: the config itself for a
    single-family run, a resolved copy of ``config[family]`` for the whole system
    (``configs/avi_talking.py``), where the style family's frozen style encoder is the same run's
    ``motion`` stage (``motion_workdir`` = ``workdir`` unless set).

    Raises ``ConfigError`` when the run has no such family.
    """
    if config.get("family") == family:
        return config
    if config.get("family") == "system" and family in config:
        sub = config[family].copy_and_resolve_references()
        if family == "style" and not sub.get("motion_workdir"):
            sub.motion_workdir = workdir
        return sub
    where = os.path.join(workdir, "config.json") if workdir else "config"
    raise ConfigError(f"{where}: a {config.get('family')!r} run has no {family!r} stages")


def require_path(value: str, field: str, description: str) -> str:
    """Return ``value`` if it names an existing path, else raise ``ConfigError``.

    ``field`` is the config field (e.g. ``model.audio_encoder.hf_path``) and ``description`` says what
    the path must hold; both appear in the message, with the command-line flag that sets the field.
    """
    if not value:
        raise ConfigError(f"config.{field} is empty: set --config.{field}=PATH to {description}")
    if not os.path.exists(value):
        raise ConfigError(f"config.{field}={value!r} does not exist; it must be {description}")
    return value


def preset(module_or_cls: Any, spec: Any, **extra) -> Any:
    """A model config from ``spec.preset`` (a module-level function or classmethod of ``module_or_cls``)
    called with ``spec.overrides`` (lists become tuples) and ``extra`` keyword arguments.

    Raises ``ConfigError`` for an unknown preset name.
    """
    factory = getattr(module_or_cls, spec.preset, None)
    if factory is None:
        owner = getattr(module_or_cls, "__name__", module_or_cls)
        raise ConfigError(f"unknown preset {spec.preset!r} for {owner}")
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in spec.overrides.items()}
    return factory(**{**overrides, **extra})


def dataset_path(config: Any, workdir: str) -> str:
    """The prepared dataset folder: the demo corpus (built on first use) or ``config.data.dir``.

    ``config.data.source``: 'demo' (``config.data.demo.{seed, num_speakers, clip_seconds}``; stored in
    ``config.data.dir`` or ``<workdir>/data``) or 'prepared'. Raises ``ConfigError`` otherwise or when the
    prepared folder is missing.
    """
    if config.data.source == "demo":
        out = config.data.dir or os.path.join(workdir, "data")
        d = config.data.demo
        return demo.prepare_demo(out, seed=int(d.seed), num_speakers=int(d.num_speakers),
                                 clip_seconds=float(d.clip_seconds))
    if config.data.source != "prepared":
        raise ConfigError(f"config.data.source must be 'demo' or 'prepared', got {config.data.source!r}")
    return require_path(config.data.dir, "data.dir", DATA_DIR_HINT)


class HeadSource:
    """The first ``n`` records of a random-access source (``len`` and ``[i]``)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def max_audio_samples(config: Any) -> int:
    """``config.data.max_audio_seconds`` in 16 kHz samples."""
    return int(round(float(config.data.max_audio_seconds) * schema.SAMPLE_RATE))


def clip_dataset(config: Any, data_path: str, split: str, *, batch_size: int, train: bool,
                 tokenizers: Mapping[str, Any] | None = None, max_text_tokens: int = 2):
    """The batch stream of one split (see ``pipeline.make_dataset`` for the batch keys and shapes).

    train: shuffled, random frame-aligned crops, random instruction (augmented per ``config.data.augment``),
    repeats forever, full batches;
    otherwise one pass in record order (the first ``config.data.max_eval_clips`` clips when > 0), padded
    to whole batches with ``valid = False`` rows. ``batch_size`` is global (divided by the process count).
    """
    d = config.data
    source = builder.open_split(data_path, split)
    if not train and int(d.get("max_eval_clips", 0)):
        source = HeadSource(source, int(d.max_eval_clips))
    return pipeline.make_dataset(
        source, batch_size=batch_size // jax.process_count(), seed=int(config.seed),
        shuffle=train, num_epochs=None if train else 1, max_audio_samples=max_audio_samples(config),
        max_text_tokens=max_text_tokens, tokenizers=dict(tokenizers or {}),
        instruction_choice="random" if train else "first", drop_remainder=train,
        augment=augment.from_config(d.get("augment")) if train else None)


def instruction_texts(source: Any) -> list[str]:
    """Every instruction string of a random-access clip source (e.g. to train the demo tokenizer)."""
    out = []
    for i in range(len(source)):
        for t in source[i]["instructions"]:
            out.append(t.decode() if isinstance(t, bytes) else str(t))
    return out


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """Vocabulary size for a model initialised from scratch: ``num_tokens`` rounded up to a multiple
    of 64, so the vocab axis divides any tensor-parallel mesh size (extra rows are never used)."""
    return -(-int(num_tokens) // multiple) * multiple
