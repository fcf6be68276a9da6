"""The Q-Former as its own instruction generator: stage 1 "w/o LLaMA" (paper Sec. IV-D, Table 3).

Without the LLM, the paper follows BLIP-2's paradigm: the Q-Former generates the instruction itself with
its image-grounded (here *audio-grounded*) text generation loss (BLIP-2 Sec. 3.2 ITG; LAVIS
``Blip2Qformer.forward``'s ``loss_lm`` through ``BertLMHeadModel``). The text tokens run through the *same*
transformer layers as the queries; in every layer's self-attention a multimodal causal mask lets

* the queries attend to the queries only (so the query outputs are exactly the Q-Former's), and
* each text token attend to all queries and to the text tokens up to itself (causal),

so the audio reaches the text through the queries alone (text tokens have no cross-attention). The text
path owns only its embeddings, one feed-forward per layer (LAVIS ``intermediate``/``output``, the text
twin of ``intermediate_query``/``output_query``) and the LM head (BERT ``cls.predictions``: dense, act,
LayerNorm, then the word embeddings transposed plus a bias); self-attention, its LayerNorm and the
embedding LayerNorm are the Q-Former's own weights. Here the shared layers are *the* Q-Former's
(``models/qformer.py``; its parameters stay in the ``qformer`` component, e.g. as trained by ``align``),
and the text path is a separate component ``qformer_lm``.

Decoding starts from the text tokenizer's ``[CLS]`` (BLIP-2 replaces it with an added ``[DEC]`` token; a
frozen tokenizer has none) and stops at ``[SEP]``; greedy or temperature/top-p sampling
(``avi_jax.models.generate.sample_token``), with the whole prefix recomputed each step (the decoder is
small: a KV cache would save little).
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers
from avi_jax.models.generate import sample_token
from avi_jax.models.instructor import Instructor
from avi_jax.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class QFormerLMConfig:
    """The text path of the Q-Former (its widths are the Q-Former's).

    Attributes:
      vocab_size: V, the text tokenizer's vocabulary (padded).
      max_positions: learned absolute positions P (BERT: 512); text longer than P is an ``InputError``.
      start_token_id: the first token of every sequence ([CLS]; BLIP-2's [DEC]).
      end_token_id: the token that ends generation ([SEP]).
      pad_token_id: filler after the end token.
    """
    vocab_size: int
    start_token_id: int
    end_token_id: int
    pad_token_id: int = 0
    max_positions: int = 512

    def __post_init__(self):
        if self.vocab_size < 2 or self.max_positions < 2:
            raise ConfigError(f"QFormerLMConfig: vocab_size and max_positions must be >= 2, got "
                              f"{self.vocab_size}, {self.max_positions}")
        for name in ("start_token_id", "end_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"QFormerLMConfig.{name}={getattr(self, name)} outside the vocabulary "
                                  f"[0, {self.vocab_size})")


class TextFeedForward(nn.Module):
    """The text tokens' feed-forward of one Q-Former layer (LAVIS ``intermediate``/``output``): post-LN."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="mlp_in")(x)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="mlp_out")(layers.activation(cfg.hidden_act)(h))
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return layers.LayerNorm(cfg.layer_norm_eps, name="mlp_norm")(x + h)


def multimodal_causal_mask(num_queries: int, text_mask: jax.Array) -> jax.Array:
    """(B, 1, L, Q + L) bool: text row l may attend to every query and to valid text tokens <= l.

    ``text_mask``: (B, L) bool. The query rows of BLIP-2's mask (queries see queries only) are not built:
    the query path runs the Q-Former's own layers. Source: LAVIS ``BertModel.get_extended_attention_mask``
    (``is_decoder=True``, ``has_query=True``).
    """
    b, l = text_mask.shape
    causal = jnp.tril(jnp.ones((l, l), bool))[None] & text_mask[:, None, :].astype(bool)
    queries = jnp.ones((b, l, num_queries), bool)
    return jnp.concatenate([queries, causal], -1)[:, None]


class QFormerTextDecoder(nn.Module):
    """The Q-Former's causal text path; ``qformer`` is the shared (bound) Q-Former.

    ``__call__(audio_features (B, T, E), audio_mask (B, T) bool, text_ids (B, L) int, text_mask (B, L)
    bool, deterministic) -> logits (B, L, V) float32``, position ``l`` predicting token ``l + 1``. The text
    path computes in float32 (BLIP-2 keeps the Q-Former in float32). Raises ``InputError`` for text longer
    than ``max_positions``.
    """
    config: QFormerLMConfig
    qformer: QFormer

    def setup(self):
        q, cfg = self.qformer.config, self.config
        init = nn.initializers.normal(stddev=0.02)
        self.word_embeddings = self.param(
            "word_embeddings", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (cfg.vocab_size, q.hidden_size), jnp.float32)
        self.position_embeddings = self.param(
            "position_embeddings", nn.with_logical_partitioning(init, (None, "embed")),
            (cfg.max_positions, q.hidden_size), jnp.float32)
        self.text_layers = [TextFeedForward(q) for _ in range(q.num_layers)]
        self.head_dense = layers.Dense(q.hidden_size, ("embed", "mlp"))
        self.head_norm = layers.LayerNorm(q.layer_norm_eps, axis_name="mlp")
        self.head_bias = self.param("head_bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("vocab",)), (cfg.vocab_size,), jnp.float32)
        self.dropout = nn.Dropout(q.dropout)

    def __call__(self, audio_features: jax.Array, audio_mask: jax.Array | None, text_ids: jax.Array,
                 text_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        qf, q = self.qformer, self.qformer.config
        b, l = text_ids.shape
        if l > self.config.max_positions:
            raise InputError(f"Q-Former decoder: {l} text tokens exceed max_positions="
                             f"{self.config.max_positions}")
        audio = audio_features.astype(jnp.float32)
        if q.audio_layer_norm:
            audio = qf.audio_norm(audio)
        audio_attn = layers.key_padding_mask(audio_mask)
        x = jnp.broadcast_to(qf.query_tokens[None], (b,) + qf.query_tokens.shape)
        x = qf.embed_dropout(qf.embed_norm(x), deterministic=deterministic)
        t = jnp.take(self.word_embeddings, text_ids, axis=0) + self.position_embeddings[None, :l]
        t = self.dropout(qf.embed_norm(t), deterministic=deterministic)
        mask = multimodal_causal_mask(q.num_queries, text_mask)
        # the Q-Former's self-attention and its LayerNorm, applied to the text rows with the layer's weights
        attn = layers.MultiHeadAttention(num_heads=q.num_heads, head_dim=q.head_dim, out_features=q.hidden_size,
                                         parent=None)
        norm = nn.LayerNorm(epsilon=q.layer_norm_eps, parent=None)
        for layer, text_ffn in zip(qf.layers, self.text_layers):
            x_next = layer(x, audio, audio_attn, deterministic)       # the queries: the Q-Former itself
            shared = layer.variables["params"]
            h = attn.apply({"params": shared["self_attn"]}, t, jnp.concatenate([x, t], 1), mask)
            t = norm.apply({"params": shared["self_attn_norm"]}, t + self.dropout(h, deterministic=deterministic))
            t = text_ffn(t, deterministic)
            x = x_next
        h = self.head_norm(layers.activation(q.hidden_act)(self.head_dense(t)))
        return jnp.einsum("blh,vh->blv", h, self.word_embeddings,
                          preferred_element_type=jnp.float32) + self.head_bias


class QFormerInstructor(Instructor):
    """``Instructor`` (audio encoder, Q-Former, text encoder; no LLM) plus the Q-Former's text decoder
    (component ``qformer_lm``): the stage-1 "w/o LLaMA" system."""
    decoder: QFormerLMConfig | None = None

    def setup(self):
        super().setup()
        if self.decoder is None:
            raise ConfigError("QFormerInstructor needs a QFormerLMConfig (decoder=...)")
        self.qformer_lm = QFormerTextDecoder(self.decoder, self.qformer)

    def caption_logits(self, audio: jax.Array, audio_mask: jax.Array, text_ids: jax.Array,
                       text_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits (B, L, V) for 16 kHz waveforms (B, N) and text (B, L) starting with
        the start token; ``logits[:, l]`` predicts ``text_ids[:, l + 1]``."""
        feats, mask = self.audio_features(audio, audio_mask)
        return self.qformer_lm(feats, mask, text_ids, text_mask, deterministic)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _decode(model: QFormerInstructor, params, audio, audio_mask, rng, temperature, top_p, *,
            max_new_tokens: int, greedy: bool):
    cfg = model.decoder
    b = audio.shape[0]
    feats, feat_mask = model.apply({"params": params}, audio, audio_mask, method=Instructor.audio_features)
    ids = jnp.full((b, max_new_tokens + 1), cfg.pad_token_id, jnp.int32).at[:, 0].set(cfg.start_token_id)

    def body(i, state):
        ids, done, rng = state
        text_mask = jnp.arange(max_new_tokens + 1)[None] <= i
        logits = model.apply({"params": params}, feats, feat_mask, ids, jnp.broadcast_to(text_mask, ids.shape),
                             method=lambda m, *a: m.qformer_lm(*a))[:, i]
        rng, sub = jax.random.split(rng)
        tok = (jnp.argmax(logits, -1).astype(jnp.int32) if greedy
               else sample_token(logits, sub, temperature=temperature, top_p=top_p))
        tok = jnp.where(done, cfg.pad_token_id, tok)
        return ids.at[:, i + 1].set(tok), done | (tok == cfg.end_token_id), rng

    ids, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (ids, jnp.zeros((b,), bool), rng))
    return ids[:, 1:]


def generate_instructions(model: QFormerInstructor, params: dict, audio: jax.Array, audio_mask: jax.Array, *,
                          max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0,
                          top_p: float = 1.0) -> jax.Array:
    """Decode instructions from 16 kHz waveforms (B, N) float32 + masks (B, N) bool.

    Returns (B, max_new_tokens) int32 tokens of the text tokenizer: the end token is included and every
    later slot is the pad id. ``temperature`` 0 = greedy, else sampling (needs ``rng``) with top-p.
    Raises ``InputError`` for a bad ``max_new_tokens``/``temperature``/``top_p``.
    """
    if int(max_new_tokens) < 1 or int(max_new_tokens) >= model.decoder.max_positions:
        raise InputError(f"max_new_tokens must be in [1, {model.decoder.max_positions}), got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise InputError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if rng is None:
        if temperature > 0:
            raise InputError("sampling (temperature > 0) needs an rng key")
        rng = jax.random.key(0)
    return _decode(model, params, audio, audio_mask, rng, jnp.float32(max(temperature, 1e-6)),
                   jnp.float32(top_p), max_new_tokens=int(max_new_tokens), greedy=temperature == 0)
