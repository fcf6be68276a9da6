"""The trained system of paper Fig. 2, loaded from its workdir(s), as jitted batched model calls.

``TalkingFace.load`` rebuilds every model from ``config.json`` and the stages' ``params.safetensors``
alone: stage 1 (HuBERT -> Q-Former -> soft prompt -> LLaMA), the instruction-to-style prior (text
encoder -> aligner -> x0 diffusion prior) and the motion prior (Wav2Vec2 content -> talking generator),
plus the FLAME model that turns motion into vertices. It imports neither the training package nor
TensorFlow.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.assembly.common import family_config, load_workdir_config
from avi_jax.errors import ConfigError, InputError
from avi_jax.data import schema

_FLAME_HINT = ("pass --flame-model PATH to the official FLAME generic_model.pkl (https://flame.is.tue.mpg.de), "
               "or --no-render to write the coefficients only")


def resolve_workdirs(workdir: str | None, instruct_workdir: str | None = None,
                     style_workdir: str | None = None) -> tuple[Any, str, Any, str]:
    """(instruct config, its workdir, style config, its workdir) from a whole-system workdir
    (``configs/avi_talking.py``) or separate stage-1 and style workdirs (the style run names its motion
    run in ``motion_workdir``). Raises ``ConfigError`` naming what is missing."""
    if workdir:
        config = load_workdir_config(workdir, "the --workdir of `python -m avi_jax.train --config "
                                              "configs/avi_talking.py...`")
        if config.get("family") != "system":
            raise ConfigError(f"{workdir}: a {config.get('family')!r} run, not the whole system; train "
                              f"configs/avi_talking.py, or pass --instruct-workdir and --style-workdir")
        return (family_config(config, "instruct", workdir), workdir,
                family_config(config, "style", workdir), workdir)
    if not (instruct_workdir and style_workdir):
        raise ConfigError("give --workdir (a configs/avi_talking.py run), or both --instruct-workdir and "
                          "--style-workdir")
    return (family_config(load_workdir_config(instruct_workdir), "instruct", instruct_workdir),
            instruct_workdir,
            family_config(load_workdir_config(style_workdir), "style", style_workdir), style_workdir)


def flame_path(flame_model: str | None, workdir: str | None, variant: str, config_path: str = "",
               demo_seed: int = 0) -> str | None:
    """The FLAME model file to use: ``--flame-model``, else the config's ``flame.model_path``, else (demo
    and tiny runs) the demo's procedural stand-in head (its expression basis is that of the demo corpus of
    ``demo_seed``), written once under ``<workdir>/demo_head``.
    None for the paper variant without a FLAME model."""
    if flame_model:
        if not os.path.isfile(flame_model) and not os.path.isdir(flame_model):
            raise ConfigError(f"--flame-model {flame_model}: not found; {_FLAME_HINT}")
        return flame_model
    if config_path:
        return config_path
    if variant in ("demo", "tiny") and workdir:
        from avi_jax.data.demo_head import write_demo_head
        return write_demo_head(os.path.join(workdir, "demo_head"), seed=demo_seed)
    return None


class TalkingFace:
    """The trained models, with jitted, batched calls:

    * ``instructions(audio (B, N), mask (B, N))`` -> B visual instructions (``InstructSetup.describe``: greedy
      LLM decoding, or the Q-Former's own decoder in the "w/o LLaMA" ablation, ``model.decoder='qformer'``);
    * ``styles(texts, keys, k)`` -> (len(texts), k, D) style embeddings (aligner + diffusion prior);
    * ``audio_styles(audio (B, N), mask (B, N), keys, k)`` -> (B, k, D) for a style prior conditioned on the
      audio (``audio_conditioned``: paper Table 1's "w/o LLM" system; stage 1's LLM is never loaded);
    * ``reference_style(motion (S, 53))`` -> (D,) style of a reference clip (the motion prior's encoder);
    * ``motion(audio (B, N), mask (B, N), style (B, D))`` -> (B, N // 640, 53) expression ++ jaw_pose.

    A row's outputs depend only on that row (masked statistics and attention, per-row PRNG keys).
    """

    def __init__(self, instruct_config: Any, instruct_workdir: str, style_config: Any, style_workdir: str):
        from avi_jax.assembly.motion import load_motion_workdir
        from avi_jax.assembly.style import StyleSetup
        from avi_jax.models.motion import MotionPrior

        self._instruct_args = (instruct_config, instruct_workdir)
        self._instruct = None            # stage 1 loads on first use (not at all with --instruction)
        self.style = StyleSetup(style_config, style_workdir, data=False)
        self.style_params = self.style.load_trained()
        self.motion_setup, self.motion_params = load_motion_workdir(self.style.motion_workdir)
        model = self.motion_setup.model

        def motion_fn(params, audio, mask, style):
            v = {"params": params}
            content, frame_mask = model.apply(v, audio, mask, method=MotionPrior.content)
            return model.apply(v, content, frame_mask, style, method=MotionPrior.generate)

        self._motion_fn = jax.jit(motion_fn)
        self._style_fn = jax.jit(lambda p, m, k: model.apply({"params": p}, m, k, method=MotionPrior.style))
        self.style_dim = int(self.motion_setup.model_config.style_embed_dim)
        self.max_style_frames = int(self.motion_setup.model_config.max_style_frames)

    @classmethod
    def load(cls, workdir: str | None = None, *, instruct_workdir: str | None = None,
             style_workdir: str | None = None) -> "TalkingFace":
        """Load from a whole-system workdir, or from separate stage-1 and style workdirs."""
        return cls(*resolve_workdirs(workdir, instruct_workdir, style_workdir))

    @property
    def instruct(self):
        """The stage-1 ``InstructSetup`` (loaded with its parameters on first use)."""
        return self._stage1()[0]

    def _stage1(self):
        if self._instruct is None:
            from avi_jax.assembly.instruct import InstructSetup
            setup = InstructSetup(*self._instruct_args, data=False)
            self._instruct = (setup, setup.load_trained())
        return self._instruct

    def instructions(self, audio: np.ndarray, mask: np.ndarray) -> list[str]:
        setup, params = self._stage1()
        return setup.describe(params, audio, mask)

    def styles(self, texts: list[str], keys: jax.Array, num_samples: int) -> np.ndarray:
        return self.style.sample(self.style_params, texts, keys, num_samples=num_samples)

    @property
    def audio_conditioned(self) -> bool:
        """Whether the style prior takes the audio (``condition='audio'``, no LLM) instead of instructions."""
        return self.style.audio is not None

    def audio_styles(self, audio: np.ndarray, mask: np.ndarray, keys: jax.Array, num_samples: int) -> np.ndarray:
        return self.style.sample_audio(self.style_params, audio, mask, keys, num_samples=num_samples)

    def reference_style(self, motion: np.ndarray, source: str = "reference") -> np.ndarray:
        """Style embedding (D,) float32 of reference motion (S, 53) (its first ``max_style_frames``)."""
        motion = np.asarray(motion, np.float32)[: self.max_style_frames]
        if motion.ndim != 2 or motion.shape[1] != schema.N_EXPRESSION + schema.N_JAW or not len(motion):
            raise InputError(f"{source}: reference motion must be (frames, 53), got {motion.shape}")
        mask = np.ones(motion.shape[:1], bool)
        return np.asarray(self._style_fn(self.motion_params, motion[None], mask[None]))[0]

    def motion(self, audio: np.ndarray, mask: np.ndarray, style: np.ndarray) -> np.ndarray:
        return np.asarray(self._motion_fn(self.motion_params, jnp.asarray(audio), jnp.asarray(mask),
                                          jnp.asarray(style)))
