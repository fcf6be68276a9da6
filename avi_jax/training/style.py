"""Stage 2b training (paper Sec. III-D, Eq. 7-8): the instruction aligner and the diffusion prior,
``stage=style``.

Components and where they come from:

* ``text_encoder`` (frozen): a Hugging Face CLIP-text or BERT folder (``model.text_encoder.source='hf'``;
  the paper: CLIP ViT-L/14 text) or seeded init (demo: a tiny BERT over the demo word tokenizer, as in
  stage 1; exported with this stage's parameters so inference can rebuild it).
* ``style_encoder``, ``normalizer`` (frozen): the motion run named by ``config.motion_workdir``
  (``<motion_workdir>/motion/params.safetensors``; its ``config.json`` gives the model config).
* ``style_norm`` (frozen, computed): mean (D,) and scale () of the training clips' style embeddings; the
  prior and the contrastive loss work on ``z = (style - mean) / scale`` (see ``models/style_prior.py``).
* ``aligner``, ``prior`` (trained; no ``prior`` with ``no_diffusion``).

Loss per batch (clip crop -> style embedding of its frames, one random instruction of the clip):
``InfoNCE(aligner(text), z)`` (Eq. 7; ``losses.info_nce``, learnable temperature, positives = identical
texts and, with ``style.label_positives``, the same emotion/intensity label) ``+ lambda * MSE(x0_hat, z)``
(Eq. 8, lambda = ``style.x0_weight`` = 30), where ``x0_hat = prior(q_sample(z, t, eps), t, aligner(text))``
with t uniform over the 100 steps and the condition replaced by the null embedding with probability 0.2.
With ``no_diffusion`` the MSE is taken on the aligner output itself (it *is* the style embedding then).

Evaluation on the held-out split (``data.eval_split``), metrics:

* ``retrieval_top1`` / ``retrieval_top5``: instruction -> style retrieval. Queries are *all* instructions
  of the held-out clips; the query embedding is one style embedding sampled by the prior for it
  (``config.sampler``: DDPM, guidance 3.5, seeded) or, with ``no_diffusion``, the aligner output.
  Candidates are the held-out *style classes* (emotion x intensity; neutral's levels are one class, and a
  clip without labels is its own class), each represented by the mean normalised style embedding of its
  held-out clips (the frozen style encoder over the clip's frames); a query is correct when the candidate
  with the highest cosine similarity is its clip's class. ``retrieval_chance`` = 1 / (number of classes).
* ``aligner_retrieval_top1``: the same with the aligner output as query (diffusion or not).
* ``style_cosine``: mean cosine between each query's embedding and its own clip's style embedding.
* ``diversity``: the paper's Diversity score (``avi_jax.metrics.diversity``): ``eval.diversity_samples``
  (10) styles sampled per distinct held-out instruction, mean pairwise L2 distance in the raw style space,
  averaged over instructions (exactly 0 with ``no_diffusion``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.data import builder, pipeline, schema
from avi_jax.data.tokenizer import load_tokenizer, train_word_tokenizer
from avi_jax.errors import ConfigError
from avi_jax.metrics.diversity import diversity
from avi_jax.models import diffusion
from avi_jax.models import style_prior as prior_lib
from avi_jax.models import text_encoder as text_lib
from avi_jax.models.motion import MotionPrior
from avi_jax.training import checkpointing, common, losses, mesh as mesh_lib
from avi_jax.training.loop import INIT, Stage
from avi_jax.training.motion import MotionStage, load_motion_workdir, target_motion

_TEXT_HINT = ("a local Hugging Face text encoder folder: CLIP (e.g. openai/clip-vit-large-patch14, the "
              "authors' choice) or BERT (config.json + model.safetensors + tokenizer files)")
MOTION_COMPONENTS = ("style_encoder", "normalizer")
_NEUTRAL = schema.EMOTIONS.index("neutral")


def motion_params_path(motion_workdir: str) -> str:
    """``<motion_workdir>/motion/params.safetensors``, the motion stage's exported parameters."""
    return os.path.join(motion_workdir, MotionStage.name, "params.safetensors")


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


def style_class(emotion: int, intensity: int, index: int) -> tuple[int, int]:
    """The style class of a clip for retrieval: (emotion, intensity); neutral's levels are one class
    (0), and a clip with unknown emotion (-1) is its own class (-1 - index, 0)."""
    if emotion < 0:
        return (-1 - int(index), 0)
    return (int(emotion), 0 if emotion == _NEUTRAL else int(intensity))


def label_positives(emotion: jax.Array, intensity: jax.Array) -> jax.Array:
    """(B, B) bool: both clips labelled and of the same ``style_class``."""
    known = emotion >= 0
    level = jnp.where(emotion == _NEUTRAL, 0, intensity)
    return (known[:, None] & known[None, :] & (emotion[:, None] == emotion[None, :])
            & (level[:, None] == level[None, :]))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D) x (M, D) -> (N, M) cosine similarities (float64)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


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
        self._text_fn = jax.jit(self.text_features)

    # ---- construction helpers --------------------------------------------------------------
    def _dataset_path(self) -> str:
        c = self.config
        if c.data.source == "demo" and not c.data.dir:
            d = c.data.demo     # the motion run's demo corpus (prepare_demo is idempotent per parameters)
            return builder.prepare_demo(os.path.join(self.motion_workdir, "data"), seed=int(d.seed),
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

    def init_params(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict:
        """Boxed parameters of every component (``style_norm`` from :meth:`style_statistics`)."""
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
        with jax.ensure_compile_time_eval():
            mean, scale = self.style_statistics()
        out["style_norm"] = prior_lib.style_norm_params(mean, scale)
        return out

    def source_of(self, component: str) -> str:
        """INIT, 'hf' (text encoder) or 'motion' (the motion run's components)."""
        if component == "text_encoder":
            return self.config.model.text_encoder.source
        if component in MOTION_COMPONENTS:
            return "motion"
        if component in ("aligner", "prior", "style_norm"):
            return INIT
        raise ConfigError(f"unknown style component {component!r}")

    def load(self, component: str, source: str, abstract: Any, shardings: Any) -> Any:
        if source == "motion":
            return checkpointing.load_exported(motion_params_path(self.motion_workdir), abstract, shardings,
                                               prefix=f"{component}/")
        if source == "hf" and component == "text_encoder":
            from avi_jax.checkpoints.text_encoder import load_text_encoder
            _, params = load_text_encoder(self.config.model.text_encoder.hf_path, shardings=shardings,
                                          dtype=np.float32)
            return params["params"] if set(params) == {"params"} else params
        raise ConfigError(f"component {component!r}: unknown source {source!r}")

    def sample(self, params: dict, texts: list[str], rng: jax.Array, *, num_samples: int = 1,
               batch_size: int = 64) -> np.ndarray:
        """Style embeddings (N, K, D) float32 (raw style space, for the talking generator) for N
        instruction texts, K = ``num_samples`` each, with ``config.sampler`` (seeded by ``rng``).
        ``params``: ``text_encoder``, ``aligner``, ``prior`` (unless no_diffusion), ``style_norm``."""
        ids, mask = self.tokenize(list(texts))
        out = []
        for start in range(0, len(texts), batch_size):
            sl = slice(start, start + batch_size)
            feats = self._text_fn(params["text_encoder"], ids[sl], mask[sl])
            out.append(np.asarray(self.sample_features(params, feats, jax.random.fold_in(rng, start),
                                                       num_samples)))
        return np.concatenate(out)

    def sample_features(self, params: dict, text: jax.Array, rng: jax.Array, num_samples: int = 1) -> jax.Array:
        """``style_prior.sample_style`` with ``config.sampler``: (B, text_dim) -> (B, K, D) raw styles."""
        s = self.config.sampler
        return prior_lib.sample_style(self.prior_config, params, text, rng, method=s.method,
                                      num_steps=int(s.num_steps), eta=float(s.eta),
                                      guidance_scale=float(s.guidance_scale), num_samples=int(num_samples))


def _drop_audio(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("audio", "audio_mask")}


class StyleStage(Stage):
    """Stage 2b: the instruction aligner and the x0 diffusion prior (see the module docstring)."""
    name = "style"

    def __init__(self, setup: StyleSetup):
        super().__init__(setup.config, setup.workdir)
        self.setup = setup
        self.prior_config = setup.prior_config
        self._eval_fns = None

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("aligner",) if self.prior_config.no_diffusion else ("aligner", "prior")

    def source(self, component: str) -> str:
        return self.setup.source_of(component)

    def load_component(self, component, abstract, shardings):
        return self.setup.load(component, self.source(component), abstract, shardings)

    def train_dataset(self):
        self.setup.style_statistics()      # before model_init (needs concrete computation)
        ds = common.clip_dataset(self.config, self.setup.data_path, self.config.data.train_split,
                                 batch_size=int(self.config.style.batch_size), train=True,
                                 tokenizers={"text": self.setup.tokenizer},
                                 max_text_tokens=int(self.config.data.max_text_tokens))
        return ds.map(_drop_audio)       # the style stage never reads the audio

    def model_init(self, rng, batch):
        return self.setup.init_params(rng, batch)

    def loss(self, params, batch, rng):
        cfg, sc = self.prior_config, self.config.style
        k_drop, k_t, k_noise, k_keep, k_pdrop = jax.random.split(rng, 5)
        valid = batch["valid"].astype(bool)
        text = jax.lax.stop_gradient(self.setup.text_features(params["text_encoder"], batch["text_ids"],
                                                              batch["text_mask"]))
        motion, mask = target_motion(batch)
        style = jax.lax.stop_gradient(self.setup.styles(params, motion, mask))
        z = prior_lib.normalize_style(params["style_norm"], style)
        aligner = prior_lib.InstructionAligner(cfg)
        aligned = aligner.apply({"params": params["aligner"]}, text, False, rngs={"dropout": k_drop})
        temp = aligner.apply({"params": params["aligner"]}, method=prior_lib.InstructionAligner.temperature)
        positives = losses.identical_sequences(batch["text_ids"], batch["text_mask"])
        if bool(sc.label_positives):
            positives = positives | label_positives(batch["emotion"], batch["intensity"])
        nce, metrics = losses.info_nce(aligned, z, temp, valid=valid, targets_equal=positives)
        if cfg.no_diffusion:
            mse = diffusion.x0_mse(aligned, z, valid)
        else:
            b = z.shape[0]
            t = diffusion.sample_timesteps(k_t, b, cfg.num_timesteps)
            noise = jax.random.normal(k_noise, z.shape, z.dtype)
            keep = jax.random.bernoulli(k_keep, 1.0 - cfg.cond_drop_prob, (b,))
            prior = prior_lib.DiffusionPrior(cfg)

            def denoise(args, x_t, t_):
                return prior.apply({"params": args}, x_t, t_, aligned, keep, False, rngs={"dropout": k_pdrop})

            mse = diffusion.x0_loss(denoise, params["prior"], cfg.noise_schedule, z, t, noise, valid)
        loss = nce + float(sc.x0_weight) * mse
        return loss, {"info_nce": nce, "x0_mse": mse, "acc_t2s": metrics["acc_a2t"],
                      "acc_s2t": metrics["acc_t2a"], "temperature": metrics["temperature"]}

    # ---- evaluation ----------------------------------------------------------------------------
    def _functions(self, mesh):
        repl = mesh_lib.replicated(mesh)
        setup = self.setup
        style_fn = jax.jit(lambda p, m, k: prior_lib.normalize_style(p["style_norm"], setup.styles(p, m, k)),
                           out_shardings=repl)

        def embed(p, ids, mask, rng, num_samples):
            text = setup.text_features(p["text_encoder"], ids, mask)
            aligned = prior_lib.InstructionAligner(self.prior_config).apply({"params": p["aligner"]}, text)
            return aligned, setup.sample_features(p, text, rng, num_samples)

        embed_fn = jax.jit(embed, static_argnums=(4,), out_shardings=repl)
        return style_fn, embed_fn

    def evaluate(self, params, mesh):
        """Held-out retrieval, style cosine and Diversity (see the module docstring)."""
        if self._eval_fns is None:
            self._eval_fns = self._functions(mesh)
        style_fn, embed_fn = self._eval_fns
        c, setup = self.config, self.setup
        bs = int(c.style.eval_batch_size)
        source = builder.open_split(setup.data_path, c.data.eval_split)
        if int(c.data.max_eval_clips):
            source = common.HeadSource(source, int(c.data.max_eval_clips))
        ds = pipeline.make_dataset(source, batch_size=bs, seed=0, shuffle=False, num_epochs=1,
                                   max_audio_samples=common.max_audio_samples(c), max_text_tokens=2,
                                   tokenizers={}, shard_index=0, shard_count=1, drop_remainder=False)
        z_clip, classes, records = [], [], []
        for batch in ds:
            motion, mask = target_motion({k: batch[k] for k in ("expression", "jaw_pose", "coeff_mask", "valid")})
            z = np.asarray(jax.device_get(style_fn(params, motion, mask)))
            for row in np.nonzero(np.asarray(mask).any(-1))[0]:
                z_clip.append(z[row])
                classes.append(style_class(int(batch["emotion"][row]), int(batch["intensity"][row]),
                                           int(batch["index"][row])))
                records.append(int(batch["index"][row]))
        if not z_clip:
            raise ConfigError(f"split {c.data.eval_split!r} has no clip with coefficients to evaluate on")
        z_clip = np.stack(z_clip)
        # queries: every instruction of every held-out clip
        q_texts, q_clip = [], []
        for i, rec in enumerate(records):
            for t in source[rec]["instructions"]:
                q_texts.append(builder.text(t))
                q_clip.append(i)
        q_clip = np.asarray(q_clip)
        seed = jax.random.key(int(c.sampler.seed))
        aligned, sampled = self._embed_texts(embed_fn, params, q_texts, jax.random.fold_in(seed, 0), 1, bs)
        norm = jax.device_get(params["style_norm"])
        sampled_z = (sampled[:, 0] - np.asarray(norm["mean"])) / np.asarray(norm["scale"])
        query = aligned if self.prior_config.no_diffusion else sampled_z

        unique = sorted(set(classes))
        members = np.array([[cl == u for u in unique] for cl in classes])             # (clips, classes)
        centroids = (members.T.astype(np.float64) @ z_clip) / members.sum(0)[:, None]
        positives = members[q_clip]
        out = {}
        for prefix, emb in (("", query), ("aligner_", aligned)):
            m = jax.device_get(losses.retrieval_metrics(jnp.asarray(cosine_matrix(emb, centroids)),
                                                        jnp.asarray(positives)))
            out[f"{prefix}retrieval_top1"] = float(m["top1"])
            if not prefix:
                out["retrieval_top5"] = float(m["top5"])
                out["retrieval_chance"] = float(m["retrieval_chance"])
                out["retrieval_queries"] = float(m["num_queries"])
        own = cosine_matrix(query, z_clip)[np.arange(len(q_clip)), q_clip]
        out["style_cosine"] = float(np.mean(own))

        distinct = sorted(set(q_texts))
        n_div = int(c.eval.diversity_instructions)
        if n_div:
            distinct = distinct[:n_div]
        k = int(c.eval.diversity_samples)
        _, samples = self._embed_texts(embed_fn, params, distinct, jax.random.fold_in(seed, 1), k, bs)
        out["diversity"] = diversity(samples)
        out["num_eval_clips"] = float(len(records))
        return out

    def _embed_texts(self, embed_fn, params, texts, rng, num_samples, bs):
        """(aligned (N, D) normalised, sampled (N, K, D) raw) in fixed-size batches (padded)."""
        ids, mask = self.setup.tokenize(texts)
        n = ids.shape[0]
        pad = (-n) % bs
        ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        aligned, sampled = [], []
        for i, start in enumerate(range(0, ids.shape[0], bs)):
            a, s = jax.device_get(embed_fn(params, ids[start:start + bs], mask[start:start + bs],
                                           jax.random.fold_in(rng, i), num_samples))
            aligned.append(np.asarray(a)), sampled.append(np.asarray(s))
        return np.concatenate(aligned)[:n], np.concatenate(sampled)[:n]


STAGES = {"style": StyleStage}
