"""Stage 1 of AVI-Talking: the audio-visual instructor (paper Sec. III-C, Fig. 2).

speech (16 kHz) -> HuBERT (frozen) -> features (50 Hz) -> Q-Former (q_a learnable queries) -> audio tokens

* stage ``align`` (1a): the Q-Former's audio embeddings are aligned with the frozen text encoder's
  sentence feature of the instruction by symmetric InfoNCE (Eq. 6) — ``Instructor.align``.
* stage ``tune`` (1b): a linear projection maps the audio tokens into the frozen LLaMA's embedding
  space as a soft prompt; prompt = BOS + audio tokens + an instruction template, and the LLM is trained
  (through the projection only) to continue with the instruction — ``Instructor.soft_prompt``, then
  ``Instructor.prompt`` (BOS + soft prompt + template, left-packed) and
  ``Instructor.continuation_logits`` (teacher forcing).

Parameters are a dict of components ``audio_encoder``, ``qformer``, ``text_encoder``, ``llm_proj`` and
``llm``; a method creates only the components it touches, so each stage initialises just what it uses.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.models import layers
from avi_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from avi_jax.models.llama import Llama, LlamaConfig
from avi_jax.models.qformer import QFormer, QFormerConfig
from avi_jax.models.text_encoder import BertConfig, BertEncoder


@dataclasses.dataclass(frozen=True)
class InstructorConfig:
    """audio: HuBERT/Wav2Vec2; qformer; text: BERT-family (stage align); llm: LLaMA (stage tune).

    feature_layer: which hidden state of the audio encoder feeds the Q-Former (-1 = last).
    text_pooling: 'cls' (the paper's [CLS] feature) or 'mean'.
    """
    audio: AudioEncoderConfig
    qformer: QFormerConfig
    text: BertConfig | None = None
    llm: LlamaConfig | None = None
    feature_layer: int = -1
    text_pooling: str = "cls"


def left_pack(embeds: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each row's valid positions to the right end, keeping their order (left padding).

    Args:
      embeds: (B, L, E); mask: (B, L) bool.
    Returns:
      (embeds, mask) of the same shapes, padding first. Used to build prompts whose template part
      has a per-example length, so generation continues right after every row's last real token.
    """
    order = jnp.argsort(mask, axis=1, stable=True)       # False (padding) first, order kept
    return (jnp.take_along_axis(embeds, order[..., None], axis=1),
            jnp.take_along_axis(mask, order, axis=1))


class Instructor(nn.Module):
    """The stage-1 composite; see the module docstring for the data flow."""
    config: InstructorConfig

    def setup(self):
        cfg = self.config
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.qformer = QFormer(cfg.qformer)
        if cfg.text is not None:
            self.text_encoder = BertEncoder(cfg.text)
        if cfg.llm is not None:
            # Q-Former width -> the LLM's embedding width: the output is sharded like the LLM's ``embed``.
            self.llm_proj = layers.Dense(cfg.llm.hidden_size, (None, "embed"), name="llm_proj")
            self.llm = Llama(cfg.llm)

    def audio_features(self, audio: jax.Array, audio_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, N) float32 16 kHz waveform + (B, N) bool -> features (B, T, H) at 50 Hz, mask (B, T)."""
        return self.audio_encoder.features(audio, audio_mask, self.config.feature_layer)

    def audio_tokens(self, audio: jax.Array, audio_mask: jax.Array, deterministic: bool = True
                     ) -> jax.Array:
        """Q-Former outputs (B, Q, H_q) for a waveform batch."""
        feats, mask = self.audio_features(audio, audio_mask)
        return self.qformer(feats, mask, deterministic)

    def text_feature(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
        """Frozen text-encoder sentence feature (B, W) of tokenized instructions (B, L)."""
        return self.text_encoder.sentence_embedding(
            text_ids, text_mask, pooling=self.config.text_pooling, normalize=False)

    def align(self, audio: jax.Array, audio_mask: jax.Array, text_ids: jax.Array,
              text_mask: jax.Array, deterministic: bool = True, text_feature: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Stage 1a: audio embeddings (B, Q, D), text embeddings (B, D) (unit norm), temperature ().

        ``text_feature``: the frozen text encoder's (B, W) output for these texts when precomputed
        (then ``text_ids``/``text_mask`` are not encoded again)."""
        feats, mask = self.audio_features(audio, audio_mask)
        if text_feature is None:
            text_feature = self.text_feature(text_ids, text_mask)
        return self.qformer.init_all(feats, mask, text_feature, deterministic)

    def soft_prompt(self, audio: jax.Array, audio_mask: jax.Array, deterministic: bool = True
                    ) -> jax.Array:
        """Stage 1b: audio tokens projected into the LLM embedding space, (B, Q, E_llm)."""
        return self.llm_proj(self.audio_tokens(audio, audio_mask, deterministic)).astype(
            jnp.dtype(self.config.llm.dtype))

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """LLM token embeddings (B, L, E_llm)."""
        return self.llm.embed(ids)

    def lm(self, inputs_embeds: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """LLM logits (B, L, V) float32 for embedded inputs."""
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    def prompt(self, soft: jax.Array | None, template_ids: jax.Array, template_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
        """BOS + soft prompt (B, Q, E) (None: no audio, the text-only LM stage) + template ids (B, T),
        left-packed: returns embeds (B, 1 + Q + T, E) and mask (B, 1 + Q + T)."""
        b = template_ids.shape[0]
        bos = jnp.full((b, 1), self.config.llm.bos_token_id, jnp.int32)
        parts = [self.embed_tokens(bos)]
        masks = [jnp.ones((b, 1), bool)]
        if soft is not None:
            parts.append(soft.astype(parts[0].dtype))
            masks.append(jnp.ones(soft.shape[:2], bool))
        parts.append(self.embed_tokens(template_ids))
        masks.append(template_mask.astype(bool))
        return left_pack(jnp.concatenate(parts, 1), jnp.concatenate(masks, 1))

    def continuation_logits(self, prompt_embeds: jax.Array, prompt_mask: jax.Array,
                            target_ids: jax.Array, target_mask: jax.Array) -> jax.Array:
        """Teacher-forced logits (B, L, V) predicting ``target_ids`` (B, L) after a left-packed prompt."""
        p = prompt_embeds.shape[1]
        embeds = jnp.concatenate([prompt_embeds, self.embed_tokens(target_ids)], 1)
        mask = jnp.concatenate([prompt_mask, target_mask.astype(bool)], 1)
        logits = self.lm(embeds, mask)
        return logits[:, p - 1: p - 1 + target_ids.shape[1]]

    def init_tune(self, audio, audio_mask, template_ids, template_mask, target_ids, target_mask):
        """Touches every stage-1b parameter (audio encoder, Q-Former, projection, LLM)."""
        prompt = self.prompt(self.soft_prompt(audio, audio_mask), template_ids, template_mask)
        return self.continuation_logits(*prompt, target_ids, target_mask)

    def init_lm(self, template_ids, template_mask, target_ids, target_mask):
        """Touches the LLM only (the demo's text-only LM stage)."""
        prompt = self.prompt(None, template_ids, template_mask)
        return self.continuation_logits(*prompt, target_ids, target_mask)
