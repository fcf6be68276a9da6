"""The whole AVI-Talking system (paper Fig. 2) in one run: ``python -m avi_jax.train --config
configs/avi_talking.py:demo --workdir runs/demo``.

Trains every stage into one workdir, in order: stage 1 (``configs/instruct.py``: ``lm`` (demo/tiny only),
``align``, ``tune``), then stage 2 (``configs/motion_prior.py``: ``motion``; ``configs/style_prior.py``:
``style``, whose frozen style encoder is this run's own ``motion`` stage). The three stage-family configs
are reused as they are, under ``config.instruct``, ``config.motion`` and ``config.style`` (override a field
as ``--config.motion.motion.total_steps=400``); ``seed`` and ``mesh`` are set once here for all of them,
and every family reads the same dataset (the demo corpus of ``config.instruct.data.demo``). ``python -m
avi_jax.infer --workdir RUN`` then turns speech into instructions, FLAME coefficients and a video.

Variants: ``paper`` (default; needs the local Hugging Face folders and prepared dataset each family's
config names), ``demo`` (runs on 2 CPU cores; see README.md), ``tiny`` (tests).
``:variant=demo,stage=motion`` restricts a run to one stage (the others it needs come from the workdir).
``:demo,ablation=NAME`` is one of the paper's ablated systems (Tables 1, 3, 4; :data:`ABLATIONS`):
``python -m avi_jax.ablate`` trains and compares them all.
"""
from __future__ import annotations

import ml_collections

from configs import common, instruct, motion_prior, style_prior

# The paper's ablated systems (Sec. IV-D): name -> the fields it sets (dotted paths under this config).
ABLATIONS = {
    # Tables 3 and 4 "w/o Aug.": no text augmentation in either stage (Sec. IV-A-2)
    "no_aug": {"instruct.data.augment.enabled": False, "style.data.augment.enabled": False},
    # Table 3 "w/o LLaMA": the Q-Former generates the instruction itself (BLIP-2; avi_jax/models/qformer_lm.py)
    "no_llama": {"instruct.model.decoder": "qformer"},
    # Table 3 "w/o Q-Former": no contrastive pre-alignment (no align stage, no InfoNCE)
    "no_qformer_align": {"instruct.model.contrastive_align": False},
    # Table 4 "w/o Cont Align": no instruction-style InfoNCE (Eq. 7)
    "no_cont_align": {"style.model.prior.overrides.no_contrastive": True},
    # Table 4 "w/o Diffusion": the aligner's output is the style embedding (no prior)
    "no_diffusion": {"style.model.prior.overrides.no_diffusion": True},
    # Table 1 "AVI-Talking (w/o LLM)": the style prior is conditioned on the Q-Former's aligned audio embedding
    "no_llm": {"style.model.prior.overrides.condition": "audio"},
}


def apply_ablation(c: ml_collections.ConfigDict, name: str) -> None:
    """Set the fields of ablation ``name`` (:data:`ABLATIONS`) in the system config ``c`` and record it as
    ``c.ablation``. Raises ``ValueError`` for an unknown name or a field this version does not have."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; expected one of {', '.join(ABLATIONS)} (or '' for the "
                         f"full system)")
    for path, value in ABLATIONS[name].items():
        *parents, leaf = path.split(".")
        node = c
        for key in parents:
            node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not path.startswith(
                "style.model.prior.overrides.")):      # preset overrides: any keyword of the preset
            raise ValueError(f"ablation {name!r}: config field {path} does not exist")
        node[leaf] = value
    c.ablation = name


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, variant="paper", stage="", ablation="")
    families = {"instruct": instruct.get_config(arg.variant), "motion": motion_prior.get_config(arg.variant),
                "style": style_prior.get_config(arg.variant)}
    c = ml_collections.ConfigDict()
    c.variant = arg.variant
    c.family = "system"
    c.seed = 0
    c.mesh = common.mesh_config()
    first = families["instruct"]
    for name, sub in families.items():
        # one seed, one mesh and one dataset for every family
        sub.seed = c.get_ref("seed")
        for axis in ("data", "fsdp", "tensor"):
            sub.mesh[axis] = c.mesh.get_ref(axis)
        if name != "instruct":
            sub.data.source = first.data.get_ref("source")
            sub.data.dir = first.data.get_ref("dir")
            for key in ("seed", "num_speakers", "clip_seconds"):
                sub.data.demo[key] = first.data.demo.get_ref(key)
        c[name] = sub
    c.ablation = ""
    if arg.ablation:
        apply_ablation(c, arg.ablation)
        first.stages = instruct.default_stages(first)
    c.stages = tuple(first.stages) + ("motion", "style")
    if arg.stage:
        if arg.stage not in c.stages:
            raise ValueError(f"unknown stage {arg.stage!r}; expected one of {', '.join(c.stages)}")
        c.stages = (arg.stage,)

    # FLAME for inference (vertices, renders): '' = the demo's procedural stand-in head for demo/tiny
    # (avi_jax/data/demo_head.py); the paper variant needs the official generic_model.pkl
    # (https://flame.is.tue.mpg.de) here or through `infer --flame-model`.
    c.flame = ml_collections.ConfigDict({"model_path": "", "masks_path": ""})
    # Inference: audio is processed in windows of at most `window_seconds` that overlap by
    # `overlap_seconds` (motion cross-faded there); each window has its own instruction and style.
    c.inference = ml_collections.ConfigDict({
        "window_seconds": 10.0, "overlap_seconds": 1.0,
        "bucket_seconds": (1.0, 2.0, 4.0, 6.0, 8.0, 10.0),   # padded lengths (one compilation each)
        "batch_size": 8,                                       # windows per model call
        "render_size": 512,
    })
    if arg.variant == "tiny":
        c.inference.update({"window_seconds": 2.0, "overlap_seconds": 0.4, "bucket_seconds": (1.0, 2.0),
                            "render_size": 96})
    return c
