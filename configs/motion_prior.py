"""Stage 2a of AVI-Talking (paper Sec. III-D): the motion prior, ``stage=motion``.

Variants (``--config configs/motion_prior.py:VARIANT``):

* ``paper`` (default): frozen Wav2Vec2-base (set ``--config.model.audio_encoder.hf_path`` to a local
  Hugging Face folder such as wav2vec2-base-960h) -> content encoder; StyleTalk-style style encoder
  (3 x 256, 8 heads, 128-d style); 6 x 256 talking generator; a prepared dataset with FLAME coefficients
  (``--config.data.dir``, from ``python -m avi_jax.data.prepare``). With
  ``--config.flame.model_path`` (and ``masks_path``), a vertex loss with extra lip weight and LVE.
* ``demo``: the synthetic demo corpus and a small model from scratch (a frozen random tiny Wav2Vec2);
  runs on 2 CPU cores in a few minutes.
* ``tiny``: the demo at toy size, for tests.

Style distillation (paper Sec. IV-A-2): ``motion.distill.weight`` (1.0; 0 in the demo; 0 disables),
``motion.distill.teacher_path`` (a trained styling teacher; '' = trained in this stage); see
``avi_jax/training/motion.py``.

Outputs: ``<workdir>/motion/params.safetensors`` (every component, incl. the ``normalizer`` statistics
that the style stage and inference need) and ``final_metrics.json`` (jaw_correlation, coeff_mse,
mean_pose_mse, ...).
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c, arg = common.base_config(arg, "motion", ("motion",), demo_speakers=12)
    small = c.variant != "paper"
    # max_audio_seconds is the crop length: F = 25 * seconds frames (<= 256)
    c.data.stats_max_clips = 0 if small else 2000   # clips for the motion mean/std (0 = all)

    # ---- models -------------------------------------------------------------------------------
    m = c.model = ml_collections.ConfigDict()
    m.audio_encoder = ml_collections.ConfigDict({
        "preset": "tiny" if small else "wav2vec2_base", "hf_path": "",
        "source": "init" if small else "hf",
        "feature_layer": -1,
        "finetune": False,                # True: Wav2Vec2 is trained too
        "overrides": ml_collections.ConfigDict(
            {"model_type": "wav2vec2", "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "conv_dim": (32,) * 7} if small else {}),
    })
    m.motion = ml_collections.ConfigDict({
        "preset": "demo" if small else "paper",
        "overrides": ml_collections.ConfigDict({}),
    })

    # ---- FLAME (optional: vertex loss and LVE) ---------------------------------------------------
    c.flame = ml_collections.ConfigDict({"model_path": "", "masks_path": "", "lip_region": "lips"})

    # ---- loss ---------------------------------------------------------------------------------
    c.loss = ml_collections.ConfigDict({
        "kind": "l1",                 # 'l1' or 'mse', on motion normalised by the training std
        "exp_weight": 1.0, "jaw_weight": 1.0,
        "velocity_weight": 0.5,
        "vertex_weight": 1.0,         # used only with flame.model_path (mm^2)
        "lip_weight": 2.0,            # extra weight of the lip-region vertex term
    })

    # ---- stage --------------------------------------------------------------------------------
    c.motion = ml_collections.ConfigDict({
        "total_steps": 800 if small else 100_000, "batch_size": 16 if small else 32,
        "eval_batch_size": 16 if small else 32, "log_every": 50 if small else 100,
        "eval_every": 0 if small else 5000,
        "optimizer": common.optimizer_config(2e-3 if small else 1e-4, 100 if small else 2000,
                                             weight_decay=0.01),
        "target_fraction": 0.5,       # share of a clip's frames predicted per step (see training/motion.py)
        "exclusion_margin": 2,        # frames around the target also hidden from the style encoder
        # Style distillation (paper Sec. IV-A-2): the style encoder's embedding is pulled towards that of
        # EMOTE-style linear styling teacher (one-hot emotion ++ intensity -> style), trained jointly here or
        # loaded frozen from teacher_path (a safetensors file with style_teacher/linear/{kernel,bias}).
        # weight 0 disables it (no teacher). The paper gives no weight; 1.0 weighs the distillation MSE
        # (in style-embedding units) like the unit-weighted reconstruction term. Off in the demo: its
        # speakers have individual expression offsets that an emotion/intensity code cannot carry (measured:
        # coeff_mse 0.0078 without, 0.0115 at weight 0.1, 0.0142 at 1.0; jaw correlation unchanged).
        "distill": ml_collections.ConfigDict({"weight": 0.0 if arg.variant == "demo" else 1.0,
                                              "teacher_path": ""}),
    })

    if arg.variant == "tiny":
        common.tiny_overrides(c, ("motion",))
        c.model.audio_encoder.overrides.update(
            {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "conv_dim": (8,) * 7,
             "num_conv_pos_embedding_groups": 2})
        c.model.motion.preset = "tiny"
    return c
