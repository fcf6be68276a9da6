"""Stage-2a assembly (paper Sec. III-D): the ``MotionPrior`` (Wav2Vec2 content encoder, style encoder,
talking generator) built from a config, the training-set motion statistics, FLAME when configured, and
the parameters of a finished motion stage. Used by the motion and style training stages and by inference.
"""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.assembly import common
from avi_jax.assembly.common import INIT
from avi_jax.checkpoints.audio_encoder import audio_config
from avi_jax.checkpoints.exported import load_exported
from avi_jax.data import builder, schema
from avi_jax.errors import ConfigError
from avi_jax.models import audio_encoder as audio_lib
from avi_jax.models import motion as motion_lib
from avi_jax.models.motion import MotionConfig, MotionPrior

STAGE = "motion"   # the stage name: <workdir>/motion/params.safetensors
TEACHER = "style_teacher"   # the styling teacher component (style distillation)
NUM_INTENSITIES = 4         # intensity levels of the records: 0 (unknown), 1..3
_HF_AUDIO = "a local Hugging Face Wav2Vec2 folder (e.g. wav2vec2-base-960h: config.json + model.safetensors)"
_FLAME_HINT = "the FLAME model (generic_model.pkl from https://flame.is.tue.mpg.de)"


def motion_params_path(workdir: str) -> str:
    """``<workdir>/motion/params.safetensors``, the motion stage's exported parameters."""
    return os.path.join(workdir, STAGE, "params.safetensors")


def target_motion(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Ground-truth motion (B, F, 53) = expression ++ jaw_pose, and mask (B, F) bool = coeff_mask & valid."""
    motion = jnp.concatenate([batch["expression"], batch["jaw_pose"]], axis=-1)
    mask = batch["coeff_mask"].astype(bool)
    if "valid" in batch:
        mask = mask & batch["valid"].astype(bool)[:, None]
    return motion, mask


def motion_model_config(config: Any) -> MotionConfig:
    """``MotionConfig`` from ``config.model``: the audio encoder from its HF ``config.json`` (source
    'hf') or a preset (+ overrides), the rest from ``config.model.motion`` (preset + overrides)."""
    m = config.model
    if m.audio_encoder.source == "hf":
        audio = audio_config(common.require_path(m.audio_encoder.hf_path, "model.audio_encoder.hf_path",
                                                 _HF_AUDIO))
    else:
        audio = common.preset(audio_lib.AudioEncoderConfig, m.audio_encoder)
    return common.preset(MotionConfig, m.motion, audio=audio,
                         feature_layer=int(m.audio_encoder.feature_layer),
                         style_teacher=distill_weight(config) > 0, num_emotions=len(schema.EMOTIONS),
                         num_intensities=NUM_INTENSITIES)


def distill_weight(config: Any) -> float:
    """``config.motion.distill.weight`` (0 when the config has no such field, e.g. an older run's)."""
    stage = config.get(STAGE, None)
    distill = stage.get("distill", None) if stage is not None else None
    return float(distill.get("weight", 0.0)) if distill is not None else 0.0


def teacher_path(config: Any) -> str:
    """``config.motion.distill.teacher_path``: a user's trained styling teacher ('' = train it here)."""
    return str(config[STAGE].distill.get("teacher_path", "")) if distill_weight(config) > 0 else ""


def motion_statistics(source: Any, max_clips: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (53,) float32 of the motion over all frames of the first
    ``max_clips`` clips with coefficients (0 = all). The standard deviation is floored at 1e-4.

    Raises ``ConfigError`` when no clip has coefficients.
    """
    total = np.zeros(motion_lib.MOTION_DIM)
    total_sq = np.zeros(motion_lib.MOTION_DIM)
    count = 0
    n = len(source) if not max_clips else min(len(source), int(max_clips))
    for i in range(n):
        rec = source[i]
        if not bool(rec.get("has_coefficients", True)):
            continue
        x = np.concatenate([np.asarray(rec["expression"], np.float64),
                            np.asarray(rec["jaw_pose"], np.float64)], axis=-1)
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise ConfigError("the training split has no FLAME coefficients: the motion stage needs them")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-4).astype(np.float32)


class MotionSetup:
    """Data, statistics, model and FLAME for the motion stage (and the style stage / inference).

    Args:
      config: a ``configs/motion_prior.py`` config (or any with the same ``data``, ``model`` and
        ``flame`` fields).
      workdir: the run's work directory.
      data: prepare/open the dataset (False for inference from a workdir).
    """

    def __init__(self, config: Any, workdir: str, *, data: bool = True):
        self.config = config
        self.workdir = workdir
        self.data_path = common.dataset_path(config, workdir) if data else None
        self.model_config = motion_model_config(config)
        self.model = MotionPrior(self.model_config)
        self.flame = None
        self.lip_indices = None
        fc = config.get("flame", None)
        if fc is not None and fc.model_path:
            from avi_jax.checkpoints.flame import load_flame_model
            common.require_path(fc.model_path, "flame.model_path", _FLAME_HINT)
            self.flame = load_flame_model(fc.model_path, fc.masks_path or None,
                                          n_exp=schema.N_EXPRESSION)
            if fc.masks_path:
                self.lip_indices = self.flame.mask(fc.lip_region)
        self._stats = None

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Training-set motion (mean, std), computed once (``config.data.stats_max_clips`` clips)."""
        if self._stats is None:
            source = builder.open_split(self.data_path, self.config.data.train_split)
            self._stats = motion_statistics(source, int(self.config.data.get("stats_max_clips", 0)))
        return self._stats

    def dataset(self, split: str, *, batch_size: int, train: bool):
        """The batch stream of ``split`` (``common.clip_dataset``; no tokenizers)."""
        return common.clip_dataset(self.config, self.data_path, split, batch_size=batch_size, train=train)

    def source_of(self, component: str, stage: str = STAGE) -> str:
        """INIT, 'hf' (the Wav2Vec2 of ``config.model.audio_encoder.source``) or 'file' (a styling teacher
        from ``motion.distill.teacher_path``); one stage, ``motion``."""
        if component == "audio_encoder":
            return self.config.model.audio_encoder.source
        if component == TEACHER:
            return "file" if teacher_path(self.config) else INIT
        if component in ("content_encoder", "style_encoder", "generator", "normalizer"):
            return INIT
        raise ConfigError(f"unknown motion component {component!r}")

    def load(self, component: str, source: str, abstract: Any, shardings: Any) -> Any:
        """Load a non-INIT component: 'hf' = the Wav2Vec2 of ``config.model.audio_encoder.hf_path``
        (placed on ``shardings`` as converted), 'file' = the styling teacher of ``motion.distill.teacher_path``
        (a safetensors file with ``style_teacher/linear/kernel`` (num_emotions + 4, style_embed_dim) and
        ``style_teacher/linear/bias``, e.g. another run's ``motion/params.safetensors``). Raises
        ``ConfigError`` for anything else, ``CheckpointError`` for a missing file or tensor."""
        if component == TEACHER and source == "file":
            path = common.require_path(teacher_path(self.config), "motion.distill.teacher_path",
                                       "a safetensors file with the style_teacher/linear tensors")
            return load_exported(path, abstract, shardings, prefix=f"{TEACHER}/")
        if component == "audio_encoder" and source == "hf":
            from avi_jax.checkpoints.audio_encoder import load_audio_encoder
            _, params = load_audio_encoder(self.config.model.audio_encoder.hf_path, shardings=shardings,
                                           dtype=np.float32)
            return params
        raise ConfigError(f"component {component!r}: unknown source {source!r}")

    def init_params(self, rng: jax.Array, batch: dict[str, jax.Array], *, with_statistics: bool = True
                    ) -> dict:
        """Boxed parameters of every component; ``normalizer`` holds the training statistics."""
        motion, mask = target_motion(batch)
        params = dict(self.model.init(rng, batch["audio"], batch["audio_mask"], motion, mask)["params"])
        if self.model_config.style_teacher:
            labels = jnp.zeros(mask.shape[:1], jnp.int32)
            params[TEACHER] = self.model.init(rng, labels, labels, method=MotionPrior.teacher_style)[
                "params"][TEACHER]
        if with_statistics:
            mean, std = self.statistics()
            params["normalizer"] = {"mean": jnp.asarray(mean), "scale": jnp.asarray(std)}
        return params

    def abstract_params(self, num_samples: int, batch_size: int = 1) -> dict:
        """Unboxed ShapeDtypeStructs of all components for audio of ``num_samples`` samples."""
        b, f = batch_size, num_samples // schema.SAMPLES_PER_FRAME
        spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
        batch = {"audio": spec((b, num_samples)), "audio_mask": spec((b, num_samples), bool),
                 "expression": spec((b, f, schema.N_EXPRESSION)), "jaw_pose": spec((b, f, schema.N_JAW)),
                 "coeff_mask": spec((b, f), bool)}
        boxed = jax.eval_shape(lambda r, x: self.init_params(r, x, with_statistics=False),
                               jax.random.key(0), batch)
        return nn.meta.unbox(boxed)

    def load_trained(self, components: tuple[str, ...] | None = None, shardings: Any | None = None) -> dict:
        """Parameters of a finished motion stage: ``<workdir>/motion/params.safetensors``, except a frozen
        Wav2Vec2 loaded from a Hugging Face folder, which is read from ``model.audio_encoder.hf_path`` again
        (the stage does not export it).

        ``components``: e.g. ``('style_encoder', 'normalizer')`` for the style stage; default all but the
        styling teacher (a training aid of style distillation).
        Raises ``CheckpointError`` if the file or a tensor is missing.
        """
        abstract = self.abstract_params(schema.SAMPLES_PER_FRAME * 4)
        components = tuple(c for c in abstract if c != TEACHER) if components is None else components
        path = motion_params_path(self.workdir)
        out = {}
        for c in components:
            sh = None if shardings is None else shardings[c]
            a = self.config.model.audio_encoder
            if c == "audio_encoder" and self.source_of(c) == "hf" and not a.finetune:
                out[c] = self.load(c, "hf", abstract[c], sh)
            else:
                out[c] = load_exported(path, abstract[c], sh, prefix=f"{c}/")
        return out


def load_motion_workdir(workdir: str, components: tuple[str, ...] | None = None
                        ) -> tuple[MotionSetup, dict]:
    """Rebuild the motion model of a finished run from its workdir alone (``config.json`` +
    ``motion/params.safetensors``); returns (setup, params). Used by the style stage and inference.

    Raises ``ConfigError`` when ``<workdir>/config.json`` is missing or holds no motion config,
    ``CheckpointError`` for the params.
    """
    config = common.family_config(common.load_workdir_config(workdir, "a motion run's workdir"), "motion",
                                  workdir)
    setup = MotionSetup(config, workdir, data=False)
    return setup, setup.load_trained(components)
