"""Stage 1 training (paper Sec. III-C): the ``lm`` (demo only), ``align`` and ``tune`` stages.

``InstructSetup`` (``avi_jax.assembly.instruct``) gathers what the three stages share (prepared data,
tokenizers, instruction templates, the ``Instructor`` model); each stage then only states its components,
loss and evaluation and hands itself to the shared loop (``avi_jax.training.loop.run_stage``).
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax import sharding as mesh_lib
from avi_jax.assembly import common
from avi_jax.assembly.instruct import InstructSetup, tune_trainable
from avi_jax.data import builder, instructions, pipeline, schema
from avi_jax.metrics.retrieval import retrieval_metrics
from avi_jax.models.instructor import Instructor
from avi_jax.models.qformer_lm import QFormerInstructor
from avi_jax.training import losses
from avi_jax.training.stage import Stage


class _InstructStage(Stage):
    tokenizers: tuple[str, ...] = ()

    def __init__(self, setup: InstructSetup):
        super().__init__(setup)
        self.model = setup.model
        self._cache = {}

    def _dataset(self, split: str, train: bool):
        return self.setup.dataset(split, train=train, batch_size=int(self.config[self.name].batch_size),
                                  tokenizers=self.tokenizers)

    def train_dataset(self):
        return self._dataset(self.config.data.train_split, train=True)

    def eval_dataset(self):
        return self._dataset(self.config.data.eval_split, train=False)

    def cached(self, key: str, make):
        """A jitted function built once per stage (evaluation runs several times)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def apply(self, params, *args, method):
        return self.model.apply({"params": params}, *args, method=method)


def _lm_loss(stage: _InstructStage, params, batch, soft, template_ids, template_mask):
    prompt = stage.apply(params, soft, template_ids, template_mask, method=Instructor.prompt)
    logits = stage.apply(params, *prompt, batch["llm_ids"], batch["llm_mask"],
                         method=Instructor.continuation_logits)
    weights = batch["llm_mask"] & batch["valid"][:, None]
    return losses.lm_cross_entropy(logits, batch["llm_ids"], weights)


class LmStage(_InstructStage):
    """Demo only: train the small LLaMA on the instruction texts (the stand-in for Vicuna)."""
    name = "lm"
    trainable = ("llm",)
    tokenizers = ("llm",)

    def model_init(self, rng, batch):
        t_ids, t_mask = self.setup.fixed_templates(batch["llm_ids"].shape[0])
        return self.model.init(rng, t_ids, t_mask, jnp.zeros(batch["llm_ids"].shape, jnp.int32),
                               jnp.ones(batch["llm_mask"].shape, bool), method=Instructor.init_lm)["params"]

    def loss(self, params, batch, rng):
        t_ids, t_mask = self.setup.random_templates(rng, batch["llm_ids"].shape[0])
        return _lm_loss(self, params, batch, None, t_ids, t_mask)

    def evaluate(self, params, mesh):
        step = self.cached("eval", lambda: jax.jit(lambda p, b: _lm_loss(
            self, p, b, None, *self.setup.fixed_templates(b["llm_ids"].shape[0]))))
        totals = np.zeros(2)
        for _, batch in self.eval_batches(mesh):
            _, m = step(params, batch)
            totals += [float(m["loss"]) * float(m["num_tokens"]), float(m["num_tokens"])]
        return {"lm_loss": totals[0] / max(totals[1], 1)}


class AlignStage(_InstructStage):
    """Stage 1a: Q-Former audio embeddings vs frozen text-encoder features, symmetric InfoNCE (Eq. 6)."""
    name = "align"
    tokenizers = ("text",)

    @property
    def trainable(self):
        m = self.config.model
        return ("qformer",) + tuple(c for c in ("audio_encoder", "text_encoder") if m[c].train_in_align)

    def model_init(self, rng, batch):
        return self.model.init(rng, batch["audio"], batch["audio_mask"], batch["text_ids"],
                               batch["text_mask"], method=Instructor.align)["params"]

    def prepare(self, frozen, mesh):
        """A frozen text encoder's features of every training instruction, computed once (they are
        constants of the stage; encoding them again each step would cost a forward pass of the text
        encoder per step: ~half the demo's align step with MiniLM on CPU)."""
        self._text_cache = None
        if "text_encoder" in self.trainable:
            return
        self._text_params = {"text_encoder": frozen["text_encoder"]}
        encode = pipeline.TextEncoder(self.setup.tokenizers["text"], int(self.config.data.max_text_tokens),
                                      "encoder")     # the tokenization of the training pipeline
        texts = sorted(set(common.instruction_texts(
            builder.open_split(self.setup.data_path, self.config.data.train_split))))
        encoded = [encode(t) for t in texts]
        self._text_cache = {tuple(i[m]): f for (i, m), f in zip(encoded, self._text_features(encoded))}
        logging.info("align: precomputed frozen text-encoder features of %d instructions", len(texts))

    def _text_features(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Frozen text-encoder features (float32) of encoded texts ``(ids, mask)``, in fixed-size chunks."""
        fn = self.cached("text_feature", lambda: jax.jit(lambda p, i, m: self.apply(
            p, i, m, method=Instructor.text_feature)))
        chunk = int(self.config.align.batch_size)
        out = []
        for start in range(0, len(encoded), chunk):
            part = encoded[start:start + chunk]
            ids = np.stack([e[0] for e in part] + [part[0][0]] * (chunk - len(part)))   # fixed shape
            mask = np.stack([e[1] for e in part] + [part[0][1]] * (chunk - len(part)))
            out += list(mesh_lib.to_host(fn(self._text_params, ids, mask))[:len(part)].astype(np.float32))
        return out

    def host_batch(self, batch):
        """Adds ``text_feature``: the precomputed features of the training instructions; a text outside that
        set (an augmented one, ``data.augment``) is encoded for this batch only and not kept, so the cache
        stays the size of the training set."""
        if self._text_cache is None:
            return batch
        keys = [tuple(i[m]) for i, m in zip(batch["text_ids"], batch["text_mask"])]
        missing = {k: (i, m) for k, i, m in zip(keys, batch["text_ids"], batch["text_mask"])
                   if k not in self._text_cache}
        extra = dict(zip(missing, self._text_features(list(missing.values())))) if missing else {}
        return {**batch, "text_feature": np.stack([self._text_cache.get(k, extra.get(k)) for k in keys])}

    def loss(self, params, batch, rng):
        audio_emb, text_emb, temp = self.model.apply(
            {"params": params}, batch["audio"], batch["audio_mask"], batch["text_ids"],
            batch["text_mask"], False, batch.get("text_feature"), method=Instructor.align,
            rngs={"dropout": rng})
        positives = losses.identical_sequences(batch["text_ids"], batch["text_mask"])
        return losses.info_nce(audio_emb, text_emb, temp, valid=batch["valid"], targets_equal=positives)

    def evaluate(self, params, mesh):
        embed = self.cached("eval", lambda: jax.jit(lambda p, b: self.apply(
            p, b["audio"], b["audio_mask"], b["text_ids"], b["text_mask"], method=Instructor.align)[:2]))
        audio, text, texts = [], [], []
        for host, batch in self.eval_batches(mesh):
            a, t = mesh_lib.to_host(embed(params, batch))
            keep = host["valid"]
            audio.append(a[keep]), text.append(t[keep])
            texts += [tuple(r[m]) for r, m in zip(host["text_ids"][keep], host["text_mask"][keep])]
        audio, text = np.concatenate(audio), np.concatenate(text)
        # Candidates are the distinct instructions of the split (so 1/M is an honest chance level);
        # each clip's positive is its own (first) instruction.
        unique = sorted(set(texts))
        first = [texts.index(u) for u in unique]
        sim = np.einsum("iqd,jd->ijq", audio, text[first]).max(-1)
        positives = np.array([[t == u for u in unique] for t in texts])
        m = retrieval_metrics(sim, positives)
        return {"retrieval_top1": m["top1"], "retrieval_top5": m["top5"],
                "retrieval_chance": m["retrieval_chance"], "retrieval_queries": m["num_queries"]}


def _caption_loss(stage: _InstructStage, params, batch, rng=None):
    """Stage 1 "w/o LLaMA": the Q-Former's audio-grounded text generation loss (BLIP-2 ITG, LAVIS
    ``loss_lm``): next-token cross-entropy over the text after its start token ([CLS] ... [SEP]); unlike
    LAVIS (label smoothing 0.1) without smoothing, like the LLM path's loss."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    logits = stage.model.apply({"params": params}, batch["audio"], batch["audio_mask"], ids, mask,
                               rng is None, method=QFormerInstructor.caption_logits,
                               rngs={"dropout": rng} if rng is not None else {})
    weights = mask[:, 1:] & batch["valid"][:, None]
    return losses.lm_cross_entropy(logits[:, :-1], ids[:, 1:], weights)


class TuneStage(_InstructStage):
    """Stage 1b: train the projection that turns audio tokens into a soft prompt for the frozen LLM; with
    ``model.decoder='qformer'`` ("w/o LLaMA"), the Q-Former's own text generation instead."""
    name = "tune"

    @property
    def tokenizers(self):
        return ("text",) if self.setup.decoder == "qformer" else ("llm",)

    @property
    def trainable(self):
        return tune_trainable(self.config)

    def model_init(self, rng, batch):
        key = "text_ids" if self.setup.decoder == "qformer" else "llm_ids"
        return self.setup.init_tune(rng, batch["audio"], batch["audio_mask"], batch[key].shape[1])["params"]

    def _loss(self, params, batch, templates, rng=None):
        if self.setup.decoder == "qformer":
            return _caption_loss(self, params, batch, rng)
        soft = self.apply(params, batch["audio"], batch["audio_mask"], method=Instructor.soft_prompt)
        return _lm_loss(self, params, batch, soft, *templates)

    def loss(self, params, batch, rng):
        return self._loss(params, batch, self.setup.random_templates(rng, batch["audio"].shape[0]),
                          jax.random.fold_in(rng, 1))

    def evaluate(self, params, mesh):
        gen = self.config.generation
        kind = self.tokenizers[0]                   # the targets' tokenizer: 'llm', or 'text' (w/o LLaMA)
        tok = self.setup.tokenizers[kind]
        loss_fn = self.cached("eval", lambda: jax.jit(
            lambda p, b: self._loss(p, b, self.setup.fixed_templates(b["audio"].shape[0]))[1]))
        totals = np.zeros(3)
        samples = []
        for host, batch in self.eval_batches(mesh):
            m = loss_fn(params, batch)
            n = float(m["num_tokens"])
            totals += [float(m["loss"]) * n, float(m["accuracy"]) * n, n]
            texts = self.setup.describe(params, batch["audio"], batch["audio_mask"])
            for text, emo, ok, ids, mask in zip(texts, host["emotion"], host["valid"], host[f"{kind}_ids"],
                                                host[f"{kind}_mask"]):
                if ok:
                    samples.append({"generated": text,   # emotion -1 = unknown (manifest clips)
                                    "emotion": schema.EMOTIONS[int(emo)] if emo >= 0 else None,
                                    "reference": tok.decode(ids[mask], skip_special_tokens=True)})
        correct = [instructions.emotion_from_text(s["generated"]) == s["emotion"] for s in samples
                   if s["emotion"] is not None]
        if jax.process_index() == 0:
            with open(os.path.join(self.stage_dir, "samples.jsonl"), "w") as f:
                for s in samples:
                    f.write(json.dumps(s) + "\n")
            for s in samples[: int(gen.num_samples_logged)]:
                logging.info("[%s] %s  | ref: %s", s["emotion"], s["generated"], s["reference"])
        return {"tune_loss": totals[0] / max(totals[2], 1),
                "tune_token_accuracy": totals[1] / max(totals[2], 1),
                "emotion_accuracy": float(np.mean(correct)) if correct else 0.0,
                "num_eval_clips": float(len(samples))}


STAGES = {"lm": LmStage, "align": AlignStage, "tune": TuneStage}
