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
Ablations (paper Tables 1 and 4): ``no_contrastive`` drops the InfoNCE term (the loss is ``lambda * MSE``);
``condition='audio'`` replaces ``text`` by the frozen Q-Former's aligned audio embedding of the clip crop
(``assembly.style.AudioCondition``; InfoNCE positives then: the same clip and, with label_positives, the
same label).

Evaluation on the held-out split (``data.eval_split``), metrics:

* ``retrieval_top1`` / ``retrieval_top5``: instruction -> style retrieval. Queries are *all* instructions
  of the held-out clips (audio condition: each held-out clip's audio); the query embedding is one style embedding sampled by the prior for it
  (``config.sampler``: DDPM, guidance 3.5, seeded) or, with ``no_diffusion``, the aligner output.
  Candidates are the held-out *style classes* (emotion x intensity; neutral's levels are one class, and a
  clip without labels is its own class), each represented by the mean normalised style embedding of its
  held-out clips (the frozen style encoder over the clip's frames); a query is correct when the candidate
  with the highest cosine similarity is its clip's class. ``retrieval_chance`` = 1 / (number of classes).
* ``aligner_retrieval_top1``: the same with the aligner output as query (diffusion or not).
* ``style_cosine``: mean cosine between each query's embedding and its own clip's style embedding.
* ``diversity``: the paper's Diversity score (``avi_jax.metrics.diversity``): ``eval.diversity_samples``
  (10) styles sampled per distinct held-out instruction (audio condition: per held-out clip), mean pairwise
  L2 distance in the raw style space, averaged over instructions (exactly 0 with ``no_diffusion``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax import sharding as mesh_lib
from avi_jax.assembly import common
from avi_jax.assembly.motion import target_motion
from avi_jax.assembly.style import STAGE, StyleSetup
from avi_jax.data import builder, schema
from avi_jax.errors import ConfigError
from avi_jax.metrics.diversity import diversity
from avi_jax.metrics.retrieval import retrieval_metrics
from avi_jax.models import diffusion
from avi_jax.models import style_prior as prior_lib
from avi_jax.models.layers import l2_normalize
from avi_jax.training import losses
from avi_jax.training.stage import Stage

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
    """(N, D) x (M, D) -> (N, M) cosine similarities (float64 products of float32 unit vectors)."""
    a, b = (np.asarray(l2_normalize(jnp.asarray(x, jnp.float32)), np.float64) for x in (a, b))
    return a @ b.T


def _drop_audio(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("audio", "audio_mask")}


class StyleStage(Stage):
    """Stage 2b: the instruction aligner and the x0 diffusion prior (see the module docstring)."""
    name = STAGE

    def __init__(self, setup: StyleSetup):
        super().__init__(setup)
        self.prior_config = setup.prior_config
        self._eval_fns = None

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("aligner",) if self.prior_config.no_diffusion else ("aligner", "prior")

    def train_dataset(self):
        self.setup.style_statistics()      # before model_init (needs concrete computation)
        audio = self.setup.audio is not None
        ds = common.clip_dataset(self.config, self.setup.data_path, self.config.data.train_split,
                                 batch_size=int(self.config.style.batch_size), train=True,
                                 tokenizers={} if audio else {"text": self.setup.tokenizer},
                                 max_text_tokens=int(self.config.data.max_text_tokens))
        return ds if audio else ds.map(_drop_audio)   # the audio is read by the audio condition only

    def eval_dataset(self):
        """The held-out clips' motion and labels (instructions are read from the records by index)."""
        ds = common.clip_dataset(self.config, self.setup.data_path, self.config.data.eval_split,
                                 batch_size=int(self.config.style.eval_batch_size), train=False)
        return ds if self.setup.audio is not None else ds.map(_drop_audio)

    def model_init(self, rng, batch):
        return self.setup.init_params(rng, batch)

    def loss(self, params, batch, rng):
        cfg, sc = self.prior_config, self.config.style
        k_drop, k_t, k_noise, k_keep, k_pdrop = jax.random.split(rng, 5)
        valid = batch["valid"].astype(bool)
        text = jax.lax.stop_gradient(self.setup.condition_features(params, *self.setup.condition_inputs(batch)))
        motion, mask = target_motion(batch)
        style = jax.lax.stop_gradient(self.setup.styles(params, motion, mask))
        z = prior_lib.normalize_style(params["style_norm"], style)
        aligner = prior_lib.InstructionAligner(cfg)
        aligned = aligner.apply({"params": params["aligner"]}, text, False, rngs={"dropout": k_drop})
        out = {}
        if not cfg.no_contrastive:
            temp = aligner.apply({"params": params["aligner"]}, method=prior_lib.InstructionAligner.temperature)
            positives = jnp.eye(valid.shape[0], dtype=bool) if self.setup.audio is not None else \
                losses.identical_sequences(batch["text_ids"], batch["text_mask"])
            if bool(sc.label_positives):
                positives = positives | label_positives(batch["emotion"], batch["intensity"])
            nce, metrics = losses.info_nce(aligned, z, temp, valid=valid, targets_equal=positives)
            out = {"info_nce": nce, "acc_t2s": metrics["acc_a2t"], "acc_s2t": metrics["acc_t2a"],
                   "temperature": metrics["temperature"]}
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
        loss = float(sc.x0_weight) * mse
        if not cfg.no_contrastive:
            loss = loss + out["info_nce"]
        return loss, {**out, "x0_mse": mse}

    # ---- evaluation ----------------------------------------------------------------------------
    def _functions(self, mesh):
        repl = mesh_lib.replicated(mesh)
        setup = self.setup

        def clip_styles(p, batch):
            motion, mask = target_motion(batch)
            return prior_lib.normalize_style(p["style_norm"], setup.styles(p, motion, mask))

        def embed(p, first, second, rng, num_samples):
            text = setup.condition_features(p, first, second)
            aligned = prior_lib.InstructionAligner(self.prior_config).apply({"params": p["aligner"]}, text)
            return aligned, setup.sample_features(p, text, rng, num_samples)

        return (jax.jit(clip_styles, out_shardings=repl),
                jax.jit(embed, static_argnums=(4,), out_shardings=repl))

    def _clip_styles(self, style_fn, params, mesh) -> tuple[np.ndarray, list, list[int], list]:
        """The normalised style (N, D) of each held-out clip with coefficients, its ``style_class``, its
        record index in the eval split and (audio condition) its (audio, audio_mask) rows."""
        z_clip, classes, records, audio = [], [], [], []
        for host, batch in self.eval_batches(mesh):
            z = mesh_lib.to_host(style_fn(params, batch))
            keep = (host["coeff_mask"].astype(bool) & host["valid"].astype(bool)[:, None]).any(-1)
            for row in np.nonzero(keep)[0]:
                z_clip.append(z[row])
                classes.append(style_class(int(host["emotion"][row]), int(host["intensity"][row]),
                                           int(host["index"][row])))
                records.append(int(host["index"][row]))
                if self.setup.audio is not None:
                    audio.append((host["audio"][row], host["audio_mask"][row]))
        if not z_clip:
            raise ConfigError(f"split {self.config.data.eval_split!r} has no clip with coefficients to "
                              f"evaluate on")
        return np.stack(z_clip), classes, records, audio

    def evaluate(self, params, mesh):
        """Held-out retrieval, style cosine and Diversity (see the module docstring)."""
        if self._eval_fns is None:
            self._eval_fns = self._functions(mesh)
        style_fn, embed_fn = self._eval_fns
        c, setup = self.config, self.setup
        bs = int(c.style.eval_batch_size)
        z_clip, classes, records, clip_audio = self._clip_styles(style_fn, params, mesh)
        if setup.audio is not None:
            # queries (audio condition): every held-out clip's audio; Diversity over the first clips
            queries = tuple(np.stack([a[j] for a in clip_audio]) for j in (0, 1))
            q_clip = np.arange(len(records))
            n_div = int(c.eval.diversity_instructions) or len(records)
            distinct = tuple(x[:n_div] for x in queries)
        else:
            # queries: every instruction of every held-out clip; Diversity over the distinct ones
            source = builder.open_split(setup.data_path, c.data.eval_split)
            q_texts, q_clip = [], []
            for i, rec in enumerate(records):
                for t in source[rec]["instructions"]:
                    q_texts.append(builder.text(t))
                    q_clip.append(i)
            q_clip = np.asarray(q_clip)
            queries = setup.tokenize(q_texts)
            texts = sorted(set(q_texts))
            if int(c.eval.diversity_instructions):
                texts = texts[:int(c.eval.diversity_instructions)]
            distinct = setup.tokenize(texts)
        seed = jax.random.key(int(c.sampler.seed))
        aligned, sampled = self._embed(embed_fn, params, queries, jax.random.fold_in(seed, 0), 1, bs, mesh)
        norm = jax.device_get(params["style_norm"])
        sampled_z = (sampled[:, 0] - np.asarray(norm["mean"])) / np.asarray(norm["scale"])
        query = aligned if self.prior_config.no_diffusion else sampled_z

        unique = sorted(set(classes))
        members = np.array([[cl == u for u in unique] for cl in classes])             # (clips, classes)
        centroids = (members.T.astype(np.float64) @ z_clip) / members.sum(0)[:, None]
        positives = members[q_clip]
        out = {}
        for prefix, emb in (("", query), ("aligner_", aligned)):
            m = jax.device_get(retrieval_metrics(cosine_matrix(emb, centroids), positives))
            out[f"{prefix}retrieval_top1"] = float(m["top1"])
            if not prefix:
                out["retrieval_top5"] = float(m["top5"])
                out["retrieval_chance"] = float(m["retrieval_chance"])
                out["retrieval_queries"] = float(m["num_queries"])
        own = cosine_matrix(query, z_clip)[np.arange(len(q_clip)), q_clip]
        out["style_cosine"] = float(np.mean(own))

        k = int(c.eval.diversity_samples)
        _, samples = self._embed(embed_fn, params, distinct, jax.random.fold_in(seed, 1), k, bs, mesh)
        out["diversity"] = diversity(samples)
        out["num_eval_clips"] = float(len(records))
        return out

    def _embed(self, embed_fn, params, inputs, rng, num_samples, bs, mesh):
        """(aligned (N, D) normalised, sampled (N, K, D) raw) of N conditions (``inputs``: token ids and
        mask, or audio and mask, N rows each) in fixed-size batches (padded), each batch split over the
        mesh's batch axes like the clip batches."""
        rows = mesh_lib.batch_sharding(mesh)
        ids, mask = inputs
        n = ids.shape[0]
        pad = (-n) % bs
        ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
        aligned, sampled = [], []
        for i, start in enumerate(range(0, ids.shape[0], bs)):
            a, s = mesh_lib.to_host(embed_fn(params, mesh_lib.place(ids[start:start + bs], rows),
                                             mesh_lib.place(mask[start:start + bs], rows),
                                             jax.random.fold_in(rng, i), num_samples))
            aligned.append(np.asarray(a)), sampled.append(np.asarray(s))
        return np.concatenate(aligned)[:n], np.concatenate(sampled)[:n]


STAGES = {"style": StyleStage}
