"""Stage-2b assembly (paper Sec. III-D, Eq. 7-8): the text encoder, the instruction aligner and the x0
diffusion prior built from a config, the frozen style encoder of a finished motion run, the style-space
statistics, and sampling of style embeddings from instructions (``StyleSetup.sample``). Used by the style
training stage and by inference.

With ``model.prior.overrides.condition='audio'`` (paper Table 1, "AVI-Talking (w/o LLM)") the aligner's
input is not an instruction's text embedding but the Q-Former's aligned audio embedding of stage 1a
(:class:`AudioCondition`: HuBERT -> Q-Former -> ``audio_proj``, the space the align stage's InfoNCE made
comparable with the text embeddings); no text encoder or tokenizer is built, and styles are sampled from
speech (``StyleSetup.sample_audio``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.assembly import common
from avi_jax.assembly.common import INIT, family_config, load_workdir_config
from avi_jax.assembly.motion import load_motion_workdir, motion_params_path, target_motion
from avi_jax.checkpoints.exported import load_exported
from avi_jax.data import builder, demo, pipeline, schema
from avi_jax.data.tokenizer import load_tokenizer, train_word_tokenizer
from avi_jax.errors import ConfigError
from avi_jax.models import style_prior as prior_lib
from avi_jax.models import text_encoder as text_lib
from avi_jax.models.layers import l2_normalize
from avi_jax.models.motion import MotionPrior

_TEXT_HINT = ("a local Hugging Face text encoder folder: CLIP (e.g. openai/clip-vit-large-patch14, the "
              "authors' choice) or BERT (config.json + model.safetensors + tokenizer files)")
MOTION_COMPONENTS = ("style_encoder", "normalizer")
STAGE = "style"   # the stage name: <workdir>/style/params.safetensors
AUDIO = "audio"   # model.prior.overrides.condition of the "w/o LLM" system


def _aligned_audio(instructor: Any, audio: jax.Array, audio_mask: jax.Array) -> jax.Array:
    """``Instructor`` method: the Q-Former's aligned audio embedding (B, Q, D) (unit norm per query)."""
    feats, mask = instructor.audio_features(audio, audio_mask)
    return instructor.qformer.embed_audio(feats, mask)


class AudioCondition:
    """The frozen stage-1a audio path of a finished ``align`` stage as the style prior's condition (paper
    Table 1, "AVI-Talking (w/o LLM)"): 16 kHz audio (B, N) + mask -> the mean of the Q-Former's unit-norm
    aligned query embeddings, L2-normalised, (B, D) float32 (D = ``qformer.embed_dim``; the align stage's
    InfoNCE compares each query with the instruction's embedding in this space).

    ``config.instruct_workdir`` ('' = the style run's own workdir, i.e. the whole-system run) must hold a
    finished ``align`` stage; its ``config.json`` rebuilds the model. Components (frozen, loaded from
    ``<instruct_workdir>/align/params.safetensors`` or their Hugging Face folder as the tune stage would):
    ``audio_encoder``, ``qformer``.

    Raises:
      ConfigError: no finished align stage there.
    """
    COMPONENTS = ("audio_encoder", "qformer")

    def __init__(self, config: Any, workdir: str):
        from avi_jax.assembly.instruct import InstructSetup
        self.workdir = config.get("instruct_workdir", "") or workdir
        align = os.path.join(self.workdir, "align", "params.safetensors")
        if not os.path.isfile(align):
            raise ConfigError(f"{align} not found: model.prior.overrides.condition='audio' conditions the style "
                              f"prior on the Q-Former of a finished stage-1 align run; set "
                              f"--config.instruct_workdir to one (a configs/instruct.py or avi_talking.py run)")
        cfg = family_config(load_workdir_config(self.workdir), "instruct", self.workdir)
        self.setup = InstructSetup(cfg, self.workdir, data=False)
        self.dim = int(self.setup.model_config.qformer.embed_dim)

    def features(self, params: dict, audio: jax.Array, audio_mask: jax.Array) -> jax.Array:
        """(B, N) float32 waveform + (B, N) bool -> (B, D) float32 (see the class docstring)."""
        per_query = self.setup.model.apply({"params": {c: params[c] for c in self.COMPONENTS}}, audio,
                                           audio_mask, method=_aligned_audio)
        return l2_normalize(per_query.mean(axis=1))

    def init(self, rng: jax.Array, audio: jax.Array, audio_mask: jax.Array) -> dict:
        """Boxed ``audio_encoder`` and ``qformer`` trees (shapes for loading)."""
        return dict(self.setup.model.init(rng, audio, audio_mask, method=_aligned_audio)["params"])

    def load(self, component: str, abstract: Any, shardings: Any) -> Any:
        return self.setup.load(component, self.setup.source_of(component, "tune"), abstract, shardings)


def check_motion_workdir(config: Any) -> str:
    """``config.motion_workdir`` if it holds a finished motion run, else a ``ConfigError`` saying what
    to run."""
    wd = config.get("motion_workdir", "")
    how = ("train one first: python -m avi_jax.train --config configs/motion_prior.py:demo --workdir "
           "runs/motion, then pass --config.motion_workdir=runs/motion")
    if not wd:
        raise ConfigError(f"config.motion_workdir is empty: the style stage takes its frozen style encoder "
                          f"from a finished motion run; {how}")
    for path in (os.path.join(wd, "config.json"), motion_params_path(wd)):
        if not os.path.isfile(path):
            raise ConfigError(f"config.motion_workdir={wd!r}: {path} not found (not a finished motion "
                              f"run); {how}")
    return wd


class StyleSetup:
    """Data, tokenizer, text encoder, the motion run's style encoder and the prior config.

    Shared by the stage and inference (``data=False``: no dataset is opened; the demo tokenizer is read
    from ``<workdir>/tokenizer``).

    Raises:
      ConfigError: no finished motion run at ``config.motion_workdir``, missing HF folders/data.
    """

    def __init__(self, config: Any, workdir: str, *, data: bool = True):
        self.config = config
        self.workdir = workdir
        self.motion_workdir = check_motion_workdir(config)
        self.motion_setup, self._motion_host = load_motion_workdir(self.motion_workdir, MOTION_COMPONENTS)
        self.motion_config = self.motion_setup.model_config
        self.motion_model = MotionPrior(self.motion_config)
        self.data_path = self._dataset_path() if data else None
        self.condition = str(config.model.prior.overrides.get("condition", "instruction"))
        if self.condition not in prior_lib.CONDITIONS:
            raise ConfigError(f"config.model.prior.overrides.condition must be one of {prior_lib.CONDITIONS}, "
                              f"got {self.condition!r}")
        if self.condition == AUDIO:
            self.audio = AudioCondition(config, workdir)
            self.tokenizer = self.text_config = self.text_model = None
            text_dim = self.audio.dim
        else:
            self.audio = None
            self.tokenizer = self._tokenizer()
            self.text_config = self._text_config()
            self.text_model = text_lib.text_encoder_for(self.text_config)
            text_dim = (self.text_config.hidden_size if isinstance(self.text_config, text_lib.BertConfig)
                        else (self.text_config.projection_dim or self.text_config.hidden_size))
        self.prior_config = common.preset(prior_lib, config.model.prior, text_dim=int(text_dim),
                                          style_dim=int(self.motion_config.style_embed_dim))
        self.max_frames = common.max_audio_samples(config) // schema.SAMPLES_PER_FRAME
        if self.max_frames > self.motion_config.max_style_frames:
            raise ConfigError(f"config.data.max_audio_seconds gives {self.max_frames} reference frames; the "
                              f"style encoder takes at most {self.motion_config.max_style_frames}")
        self._stats = None
        self._sample_fn = None

    # ---- construction helpers --------------------------------------------------------------
    def _dataset_path(self) -> str:
        c = self.config
        if c.data.source == "demo" and not c.data.dir:
            d = c.data.demo     # the motion run's demo corpus (prepare_demo is idempotent per parameters)
            return demo.prepare_demo(os.path.join(self.motion_workdir, "data"), seed=int(d.seed),
                                     num_speakers=int(d.num_speakers), clip_seconds=float(d.clip_seconds))
        return common.dataset_path(c, self.workdir)

    def _tokenizer(self):
        c, te = self.config, self.config.model.text_encoder
        if c.tokenizer.text_path:
            return load_tokenizer(c.tokenizer.text_path)
        if te.source == "hf":
            return load_tokenizer(common.require_path(te.hf_path, "model.text_encoder.hf_path", _TEXT_HINT))
        folder = os.path.join(self.workdir, "tokenizer")
        if os.path.isdir(folder):
            return load_tokenizer(folder)
        if self.data_path is None:
            raise ConfigError(f"{folder}: no tokenizer (the demo tokenizer is written there by training)")
        texts = common.instruction_texts(builder.open_split(self.data_path, c.data.train_split))
        return train_word_tokenizer(texts, folder)

    def _text_config(self):
        te = self.config.model.text_encoder
        if te.source == "hf":
            from avi_jax.checkpoints import text_encoder as ct
            from avi_jax.checkpoints.hf_folder import read_config
            folder = common.require_path(te.hf_path, "model.text_encoder.hf_path", _TEXT_HINT)
            kind = read_config(folder).get("model_type")
            return ct.bert_config(folder) if kind == "bert" else ct.clip_text_config(folder)
        if te.source != INIT:
            raise ConfigError(f"config.model.text_encoder.source must be 'init' or 'hf', got {te.source!r}")
        # Rounded up to a multiple of 64 so the embedding table shards over any mesh (extra rows unused).
        kw = {"vocab_size": common.padded_vocab_size(len(self.tokenizer))}
        if te.preset.startswith("clip"):
            kw["eos_token_id"] = self.tokenizer.eos_token_id
        return common.preset(text_lib, te, **kw)

    # ---- model pieces ------------------------------------------------------------------------
    def text_features(self, text_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Frozen sentence embeddings (B, text_dim) of token ids (B, L) + mask (B, L)."""
        kw = {"pooling": self.config.model.text_encoder.pooling} \
            if isinstance(self.text_config, text_lib.BertConfig) else {}
        return self.text_model.apply({"params": text_params}, ids, mask,
                                     method=type(self.text_model).sentence_embedding, **kw)

    def condition_features(self, params: dict, first: jax.Array, second: jax.Array) -> jax.Array:
        """The aligner's input (B, text_dim): the frozen text encoder's sentence embedding of token ids
        (B, L) + mask, or with the audio condition the aligned audio embedding of audio (B, N) + mask."""
        if self.audio is not None:
            return self.audio.features(params, first, second)
        return self.text_features(params["text_encoder"], first, second)

    def condition_inputs(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """The batch entries :meth:`condition_features` reads: (text_ids, text_mask) or (audio, audio_mask)."""
        return (batch["audio"], batch["audio_mask"]) if self.audio is not None else \
            (batch["text_ids"], batch["text_mask"])

    def styles(self, params: dict, motion: jax.Array, mask: jax.Array) -> jax.Array:
        """Raw style embeddings (B, D) of reference motion (B, S, 53) + mask (B, S) by the frozen encoder;
        ``params`` holds ``style_encoder`` and ``normalizer``."""
        return self.motion_model.apply({"params": {c: params[c] for c in MOTION_COMPONENTS}}, motion, mask,
                                       method=MotionPrior.style)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Instruction texts -> ids (N, L) int32 and mask (N, L) bool (``data.max_text_tokens``)."""
        enc = pipeline.TextEncoder(self.tokenizer, int(self.config.data.max_text_tokens), "encoder")
        pairs = [enc(t) for t in texts]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def style_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and scale () float32 of the raw style embeddings of the training clips (first
        ``data.stats_max_clips``, 0 = all; every process computes the same values from the same clips).
        ``scale`` is the root of the mean per-dimension variance (floored at 1e-6)."""
        if self._stats is None:
            source = builder.open_split(self.data_path, self.config.data.train_split)
            n = int(self.config.data.get("stats_max_clips", 0))
            if n:
                source = common.HeadSource(source, n)
            ds = pipeline.make_dataset(
                source, batch_size=int(self.config.style.eval_batch_size), seed=0, shuffle=False, num_epochs=1,
                max_audio_samples=common.max_audio_samples(self.config), max_text_tokens=2, tokenizers={},
                shard_index=0, shard_count=1, drop_remainder=False)
            fn = jax.jit(self.styles)
            out = []
            for batch in ds:
                motion, mask = target_motion({k: batch[k] for k in ("expression", "jaw_pose", "coeff_mask",
                                                                   "valid")})
                s = np.asarray(fn(self._motion_host, motion, mask))
                out.append(s[np.asarray(mask).any(-1)])
            styles = np.concatenate(out).astype(np.float64)
            if styles.shape[0] < 2:
                raise ConfigError("the training split needs at least 2 clips with coefficients for the style "
                                  "statistics")
            mean = styles.mean(0)
            scale = max(float(np.sqrt(styles.var(0).mean())), 1e-6)
            self._stats = (mean.astype(np.float32), np.float32(scale))
            logging.info("style space: %d clips, mean norm %.4f, scale %.4f", styles.shape[0],
                         float(np.linalg.norm(mean)), scale)
        return self._stats

    def init_params(self, rng: jax.Array, batch: dict[str, jax.Array], *, with_statistics: bool = True
                    ) -> dict:
        """Boxed parameters of every component (``style_norm`` from :meth:`style_statistics`, or
        placeholders of its shapes without ``with_statistics``); ``text_encoder``, or with the audio
        condition ``audio_encoder`` and ``qformer``."""
        k_text, k_motion, k_align, k_prior = jax.random.split(rng, 4)
        cfg = self.prior_config
        b = batch["valid"].shape[0] if "valid" in batch else batch["coeff_mask"].shape[0]
        if self.audio is not None:
            out = self.audio.init(k_text, batch["audio"], batch["audio_mask"])
        else:
            kw = {"pooling": self.config.model.text_encoder.pooling} \
                if isinstance(self.text_config, text_lib.BertConfig) else {}
            out = {"text_encoder": self.text_model.init(k_text, batch["text_ids"], batch["text_mask"],
                                                        method=type(self.text_model).sentence_embedding,
                                                        **kw)["params"]}
        motion, mask = target_motion(batch)
        out.update(self.motion_model.init(k_motion, motion, mask, method=MotionPrior.style)["params"])
        out["aligner"] = prior_lib.InstructionAligner(cfg).init(k_align, jnp.zeros((b, cfg.text_dim)))["params"]
        if not cfg.no_diffusion:
            z = jnp.zeros((b, cfg.style_dim))
            out["prior"] = prior_lib.DiffusionPrior(cfg).init(k_prior, z, jnp.zeros((b,), jnp.int32), z)["params"]
        if with_statistics:
            with jax.ensure_compile_time_eval():
                mean, scale = self.style_statistics()
        else:
            mean, scale = np.zeros((cfg.style_dim,), np.float32), np.float32(1.0)
        out["style_norm"] = prior_lib.style_norm_params(mean, scale)
        return out

    def load_trained(self) -> dict:
        """Every component of a finished style stage: ``aligner``, ``prior`` (unless no_diffusion),
        ``style_norm`` and a seeded-init ``text_encoder`` from ``<workdir>/style/params.safetensors``, a
        Hugging Face text encoder from its folder, ``style_encoder`` and ``normalizer`` from the motion run
        (with the audio condition: ``audio_encoder`` and ``qformer`` of the align run, no text encoder).

        Raises ``CheckpointError`` naming the file when it or a tensor is missing.
        """
        n, spf = int(self.config.data.max_text_tokens), schema.SAMPLES_PER_FRAME
        spec = jax.ShapeDtypeStruct
        batch = {"text_ids": spec((1, n), jnp.int32), "text_mask": spec((1, n), bool),
                 "audio": spec((1, 4 * spf), jnp.float32), "audio_mask": spec((1, 4 * spf), bool),
                 "expression": spec((1, 4, schema.N_EXPRESSION), jnp.float32),
                 "jaw_pose": spec((1, 4, schema.N_JAW), jnp.float32), "coeff_mask": spec((1, 4), bool)}
        abstract = nn.meta.unbox(jax.eval_shape(
            lambda r, b: self.init_params(r, b, with_statistics=False), jax.random.key(0), batch))
        path = os.path.join(self.workdir, STAGE, "params.safetensors")
        out = {}
        for component, tree in abstract.items():
            source = self.source_of(component)
            out[component] = (load_exported(path, tree, prefix=f"{component}/") if source == INIT
                              else self.load(component, source, tree, None))
        return out

    def source_of(self, component: str, stage: str = STAGE) -> str:
        """INIT, 'hf' (text encoder), 'motion' (the motion run's components) or 'instruct' (the align run's
        ``audio_encoder``/``qformer`` of the audio condition); one stage, ``style``."""
        if component in AudioCondition.COMPONENTS:
            return "instruct"
        if component == "text_encoder":
            return self.config.model.text_encoder.source
        if component in MOTION_COMPONENTS:
            return "motion"
        if component in ("aligner", "prior", "style_norm"):
            return INIT
        raise ConfigError(f"unknown style component {component!r}")

    def load(self, component: str, source: str, abstract: Any, shardings: Any) -> Any:
        if source == "motion":
            return load_exported(motion_params_path(self.motion_workdir), abstract, shardings,
                                               prefix=f"{component}/")
        if source == "instruct" and self.audio is not None:
            return self.audio.load(component, abstract, shardings)
        if source == "hf" and component == "text_encoder":
            from avi_jax.checkpoints.text_encoder import load_text_encoder
            _, params = load_text_encoder(self.config.model.text_encoder.hf_path, shardings=shardings,
                                          dtype=np.float32)
            return params
        raise ConfigError(f"component {component!r}: unknown source {source!r}")

    def sample(self, params: dict, texts: list[str], keys: jax.Array, *, num_samples: int = 1) -> np.ndarray:
        """Style embeddings (N, K, D) float32 (raw style space, for the talking generator) for N
        instruction texts, K = ``num_samples`` each, with ``config.sampler``.

        ``keys``: (N,) PRNG keys, one per text: a text's samples depend only on it and its key, never on
        the other texts of the call. Texts are sampled 8 at a time (padded: one compilation).
        ``params``: ``text_encoder``, ``aligner``, ``prior`` (unless no_diffusion), ``style_norm``.
        Raises ``ConfigError`` with the audio condition (use :meth:`sample_audio`).
        """
        if self.audio is not None:
            raise ConfigError(f"{self.workdir}: this style prior is conditioned on audio "
                              f"(model.prior.overrides.condition='audio'), not on instructions")
        return self._sample_rows(params, self.tokenize(list(texts)), keys, num_samples)

    def sample_audio(self, params: dict, audio: np.ndarray, mask: np.ndarray, keys: jax.Array, *,
                     num_samples: int = 1) -> np.ndarray:
        """With the audio condition: style embeddings (N, K, D) float32 for N 16 kHz waveforms (N, S) +
        masks (N, S) bool, as :meth:`sample` (a row's samples depend only on it and its key).
        ``params``: ``audio_encoder``, ``qformer``, ``aligner``, ``prior`` (unless no_diffusion),
        ``style_norm``."""
        if self.audio is None:
            raise ConfigError(f"{self.workdir}: this style prior is conditioned on instructions, not on audio")
        return self._sample_rows(params, (np.asarray(audio, np.float32), np.asarray(mask, bool)), keys,
                                 num_samples)

    def _sample_rows(self, params: dict, inputs: tuple[np.ndarray, np.ndarray], keys: jax.Array,
                     num_samples: int) -> np.ndarray:
        """:meth:`sample_features` of :meth:`condition_features` (``inputs``: its two arrays, N rows), 8
        rows at a time (padded with the first row: one compilation per input shape)."""
        n, chunk = inputs[0].shape[0], 8
        pad = (-n) % chunk
        inputs = tuple(np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in inputs)
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, 0)]) if pad else keys
        if self._sample_fn is None:
            def one(p, feature, key, k):
                return self.sample_features(p, feature[None], key, k)[0]
            self._sample_fn = jax.jit(lambda p, a, b, ks, k: jax.vmap(one, (None, 0, 0, None))(
                p, self.condition_features(p, a, b), ks, k), static_argnums=4)
        out = [np.asarray(self._sample_fn(params, inputs[0][s:s + chunk], inputs[1][s:s + chunk],
                                          keys[s:s + chunk], int(num_samples))) for s in range(0, n + pad, chunk)]
        return np.concatenate(out)[:n]

    def sample_features(self, params: dict, text: jax.Array, rng: jax.Array, num_samples: int = 1) -> jax.Array:
        """``style_prior.sample_style`` with ``config.sampler``: (B, text_dim) -> (B, K, D) raw styles."""
        s = self.config.sampler
        return prior_lib.sample_style(self.prior_config, params, text, rng, method=s.method,
                                      num_steps=int(s.num_steps), eta=float(s.eta),
                                      guidance_scale=float(s.guidance_scale), num_samples=int(num_samples))
