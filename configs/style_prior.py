"""Stage 2b of AVI-Talking (paper Sec. III-D, Eq. 7-8): instruction -> style embedding, ``stage=style``.

The frozen style encoder (and the motion normalisation statistics) come from a finished motion run:
set ``--config.motion_workdir=RUN`` (``RUN/config.json`` + ``RUN/motion/params.safetensors``, written by
``python -m avi_jax.train --config configs/motion_prior.py:... --workdir RUN``). The style space width
(128 at paper scale) is the motion run's ``style_embed_dim``.

Variants (``--config configs/style_prior.py:VARIANT``):

* ``paper`` (default): frozen CLIP ViT-L/14 text tower (the authors' released stage-2 code; 768-d,
  77 tokens; set ``--config.model.text_encoder.hf_path`` to a local Hugging Face CLIP folder, e.g.
  openai/clip-vit-large-patch14; a BERT folder works too) -> residual MLP aligner -> 128-d style space;
  x0-predicting diffusion prior (dim 128, depth 6, 8 heads x 64, 100 cosine steps, condition dropout 0.2);
  loss InfoNCE + 30 x MSE; DDPM sampling with guidance 3.5; batch 256; a prepared dataset
  (``--config.data.dir``).
* ``demo``: the synthetic demo corpus (by default the one the motion run prepared in
  ``<motion_workdir>/data``), a frozen seeded-init tiny BERT over the demo word tokenizer, a small prior;
  runs on 2 CPU cores in a few minutes.
* ``tiny``: toy size, for tests.

Ablations (paper Tables 1 and 4), one field each:

* ``--config.model.prior.overrides.no_diffusion=True``: "w/o Diffusion" (the aligner output is the style
  embedding; no prior).
* ``--config.model.prior.overrides.no_contrastive=True``: "w/o Cont Align" (no InfoNCE of Eq. 7, no
  temperature; the aligner learns through the diffusion loss alone).
* ``--config.model.prior.overrides.condition=audio``: "AVI-Talking (w/o LLM)" (Table 1): the aligner embeds
  the Q-Former's aligned audio embedding of a finished stage-1 ``align`` run (``instruct_workdir``; '' = this
  workdir, as in a whole-system run) instead of the instruction's text embedding; no text encoder, and
  inference runs no LLM.
* ``--config.data.augment.enabled=False``: "w/o Aug." (no text augmentation of the instructions).
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c, arg = common.base_config(arg, "style", ("style",), demo_speakers=12)
    small = c.variant != "paper"
    c.motion_workdir = ""                 # a finished motion run (required)
    c.instruct_workdir = ""               # condition 'audio' only: a run with a finished stage-1 'align'
    # data.dir '' + demo: <motion_workdir>/data, shared with the motion run. max_audio_seconds is the
    # clip crop; its F = 25 * seconds frames are the style reference (<= the style encoder's 256).
    c.data.max_text_tokens = 40 if small else 77
    c.data.augment = common.augment_config()   # text augmentation of the style instructions (Sec. IV-A-2)
    c.data.stats_max_clips = 0 if small else 4000   # clips for the style-space mean/scale (0 = all)

    # ---- tokenizer (paper: the text encoder's own; demo: a word tokenizer trained on the texts) ---
    c.tokenizer = ml_collections.ConfigDict({"text_path": ""})

    # ---- models -------------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.text_encoder = ml_collections.ConfigDict({
        "preset": "tiny" if small else "clip_vit_l14",   # used with source 'init' (avi_jax.models.text_encoder)
        "hf_path": "",                                     # source 'hf': a BERT or CLIP folder
        "source": "init" if small else "hf",
        "pooling": "mean",                                 # BERT only ('cls' or 'mean'); CLIP pools at EOS
        "overrides": ml_collections.ConfigDict(
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "max_position_embeddings": 64} if small else {}),
    })
    m.prior = ml_collections.ConfigDict({
        "preset": "demo" if small else "paper",          # avi_jax.models.style_prior presets
        "overrides": ml_collections.ConfigDict({"no_diffusion": False, "no_contrastive": False,
                                                "condition": "instruction"}),
    })

    # ---- stage --------------------------------------------------------------------------------
    c.style = ml_collections.ConfigDict({
        "total_steps": 1500 if small else 100_000, "batch_size": 64 if small else 256,
        "eval_batch_size": 64 if small else 256, "log_every": 100 if small else 100,
        "eval_every": 0 if small else 5000,
        "optimizer": common.optimizer_config(1e-3 if small else 1e-4, 100 if small else 2000,
                                             weight_decay=0.01),
        "x0_weight": 30.0,           # lambda of Eq. 8
        # InfoNCE positives: identical instruction texts always; with label_positives also clips with the
        # same (emotion, intensity) label (MEAD's style classes; neutral's levels count as one).
        "label_positives": True,
    })

    # ---- sampling (evaluation and inference) ----------------------------------------------------
    c.sampler = ml_collections.ConfigDict({
        "method": "ddpm",            # 'ddpm' (100 steps, the paper's) or 'ddim'
        "num_steps": 10,             # DDIM steps
        "eta": 0.0,                  # DDIM eta (0 = deterministic given the starting noise)
        "guidance_scale": 3.5,
        "seed": 0,
    })
    c.eval = ml_collections.ConfigDict({
        "diversity_samples": 10,     # samples per instruction for the Diversity score
        "diversity_instructions": 0 if small else 200,   # distinct eval instructions used (0 = all)
    })

    if arg.variant == "tiny":
        common.tiny_overrides(c, ("style",))
        c.model.text_encoder.overrides.update(
            {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32})
        c.model.prior.preset = "tiny"
        c.eval.diversity_samples = 4
        c.eval.diversity_instructions = 6
    return c
