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

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax import sharding as mesh_lib
from avi_jax.assembly import common
from avi_jax.assembly.motion import target_motion
from avi_jax.assembly.style import StyleSetup
from avi_jax.data import builder, pipeline, schema
from avi_jax.errors import ConfigError
from avi_jax.metrics.diversity import diversity
from avi_jax.models import diffusion
from avi_jax.models import style_prior as prior_lib
from avi_jax.training import losses
from avi_jax.training.loop import Stage
_NEUTRAL = schema.EMOTIONS.index("neutral")


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
