"""Stage-2b assembly (paper Sec. III-D, Eq. 7-8): the text encoder, the instruction aligner and the x0
diffusion prior built from a config, the frozen style encoder of a finished motion run, the style-space
statistics, and sampling of style embeddings from instructions (``StyleSetup.sample``). Used by the style
training stage and by inference.
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
from avi_jax.assembly.common import INIT
from avi_jax.assembly.motion import load_motion_workdir, motion_params_path, target_motion
from avi_jax.checkpoints.exported import load_exported
from avi_jax.data import builder, demo, pipeline, schema
from avi_jax.data.tokenizer import load_tokenizer, train_word_tokenizer
from avi_jax.errors import ConfigError
from avi_jax.models import style_prior as prior_lib
from avi_jax.models import text_encoder as text_lib
from avi_jax.models.motion import MotionPrior

_TEXT_HINT = ("a local Hugging Face text encoder folder: CLIP (e.g. openai/clip-vit-large-patch14, the "
              "authors' choice) or BERT (config.json + model.safetensors + tokenizer files)")
MOTION_COMPONENTS = ("style_encoder", "normalizer")
STAGE = "style"   # the stage name: <workdir>/style/params.safetensors


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
        placeholders of its shapes without ``with_statistics``)."""
        k_text, k_motion, k_align, k_prior = jax.random.split(rng, 4)
        cfg = self.prior_config
        b = batch["text_ids"].shape[0]
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
        Hugging Face text encoder from its folder, ``style_encoder`` and ``normalizer`` from the motion run.

        Raises ``CheckpointError`` naming the file when it or a tensor is missing.
        """
        n = int(self.config.data.max_text_tokens)
        spec = jax.ShapeDtypeStruct
        batch = {"text_ids": spec((1, n), jnp.int32), "text_mask": spec((1, n), bool),
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
        """INIT, 'hf' (text encoder) or 'motion' (the motion run's components); one stage, ``style``."""
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
        """
        n, chunk = len(texts), 8
        pad = (-n) % chunk
        ids, mask = self.tokenize(list(texts) + [texts[0]] * pad)
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, 0)]) if pad else keys
        if self._sample_fn is None:
            def one(p, feature, key, k):
                return self.sample_features(p, feature[None], key, k)[0]
            self._sample_fn = jax.jit(lambda p, i, m, ks, k: jax.vmap(one, (None, 0, 0, None))(
                p, self.text_features(p["text_encoder"], i, m), ks, k), static_argnums=4)
        out = [np.asarray(self._sample_fn(params, ids[s:s + chunk], mask[s:s + chunk], keys[s:s + chunk],
                                          int(num_samples))) for s in range(0, n + pad, chunk)]
        return np.concatenate(out)[:n]

    def sample_features(self, params: dict, text: jax.Array, rng: jax.Array, num_samples: int = 1) -> jax.Array:
        """``style_prior.sample_style`` with ``config.sampler``: (B, text_dim) -> (B, K, D) raw styles."""
        s = self.config.sampler
        return prior_lib.sample_style(self.prior_config, params, text, rng, method=s.method,
                                      num_steps=int(s.num_steps), eta=float(s.eta),
                                      guidance_scale=float(s.guidance_scale), num_samples=int(num_samples))
