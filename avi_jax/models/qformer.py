"""Q-Former: learnable queries that read speech features through cross-attention (stage 1).

AVI-Talking (arXiv:2402.16124) Sec. III-C bridges the frozen speech encoder (HuBERT) and the LLM with
BLIP-2's Querying Transformer: ``Q`` learnable query embeddings pass through a BERT-style post-LN
transformer whose self-attention runs over the queries only and whose cross-attention (every
``cross_attention_freq``-th layer, starting with layer 0) lets the queries attend to the audio
features. Stage 1a trains it contrastively against the frozen text encoder's [CLS] embedding of the
visual instruction (paper Eq. 6; BLIP-2's image-text contrastive loss, ITC), with

- an *audio projection head* (BLIP-2 ``vision_proj``): query outputs -> ``embed_dim``, L2-normalised,
- a *text projection head* (BLIP-2 ``text_proj``): text [CLS] feature -> ``embed_dim``, L2-normalised,
- a learnable temperature (BLIP-2 ``temp``, init 0.07, clamped to [0.001, 0.5] by the loss).

Sources: BLIP-2 (Li et al., 2023), LAVIS ``blip2_qformer.py`` / ``Qformer.py`` and transformers
``Blip2QFormerModel`` (the query-only path: embedding LayerNorm + dropout on the query embeddings,
layer ``i`` has cross-attention iff ``i % cross_attention_freq == 0``, the query feed-forward
``intermediate_query``/``output_query``). Like LAVIS' ``ln_vision``, an optional LayerNorm is applied
to the frozen encoder's features before cross-attention (``audio_layer_norm``).

Submodule names (for checkpoint conversion): ``query_tokens`` (Q, H); ``embed_norm`` (HF
``layernorm``); ``audio_norm`` (LAVIS ``ln_vision``); ``layers_{i}`` with ``self_attn``
(``attention.attention``; its ``out`` = ``attention.output.dense``), ``self_attn_norm``
(``attention.output.LayerNorm``), ``cross_attn`` / ``cross_attn_norm`` (``crossattention.*``),
``mlp_in`` (``intermediate_query.dense``), ``mlp_out`` / ``mlp_norm`` (``output_query.dense`` /
``.LayerNorm``); ``audio_proj``, ``text_proj``, ``temp``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Q-Former hyper-parameters (defaults: the paper / BLIP-2 scale, BERT-base-sized layers).

    Attributes:
      num_queries: number of learnable queries Q (BLIP-2: 32).
      hidden_size: query width H (BERT-base: 768).
      num_layers: transformer layers (12).
      num_heads: attention heads (12); ``hidden_size`` must be divisible by it.
      intermediate_size: feed-forward width (3072).
      cross_attention_freq: a cross-attention block on layers ``0, f, 2f, ...`` (BLIP-2: 2).
      embed_dim: width of the shared contrastive space (BLIP-2: 256).
      layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
      dropout: hidden dropout on the query embeddings, after each attention output projection and
        after the feed-forward (BERT ``hidden_dropout_prob``); attention probabilities are not dropped.
      hidden_act: feed-forward activation, a Hugging Face name (``layers.activation``).
      temperature_init: initial contrastive temperature (BLIP-2: 0.07).
      audio_layer_norm: LayerNorm the audio features before cross-attention (LAVIS ``ln_vision``).
      remat: rematerialise each layer's activations in the backward pass (``nn.remat``).
    """
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    embed_dim: int = 256
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    hidden_act: str = "gelu"
    temperature_init: float = 0.07
    audio_layer_norm: bool = True
    remat: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"QFormerConfig.hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ConfigError(f"QFormerConfig.cross_attention_freq must be >= 1, got "
                              f"{self.cross_attention_freq}")
        for name in ("num_queries", "num_layers", "intermediate_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"QFormerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"QFormerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.temperature_init <= 0:
            raise ConfigError(f"QFormerConfig.temperature_init must be > 0, got {self.temperature_init}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has a cross-attention block (BLIP-2 rule)."""
        return layer % self.cross_attention_freq == 0

    @property
    def num_cross_attention_layers(self) -> int:
        return sum(self.has_cross_attention(i) for i in range(self.num_layers))

    @classmethod
    def paper(cls, **overrides) -> "QFormerConfig":
        """BLIP-2 / AVI-Talking scale: 32 queries, 12 BERT-base layers, cross-attention every 2nd."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "QFormerConfig":
        """A few-thousand-parameter configuration for tests (no dropout)."""
        kw = dict(num_queries=4, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                  cross_attention_freq=2, embed_dim=16, dropout=0.0)
        kw.update(overrides)
        return cls(**kw)


class QFormerLayer(nn.Module):
    """One post-LN BERT layer over the queries: self-attn, [cross-attn to audio], feed-forward.

    ``__call__(x (B, Q, H), audio (B, T, E) | None, audio_attn_mask (B, 1, 1, T) bool | None,
    deterministic) -> (B, Q, H)``. Source: transformers ``Blip2QFormerLayer`` (query path).
    """
    config: QFormerConfig
    has_cross_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, audio: jax.Array | None, audio_attn_mask: jax.Array | None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout)

        def attention(name: str) -> layers.MultiHeadAttention:
            return layers.MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                             out_features=cfg.hidden_size, dtype=self.dtype, name=name)

        h = attention("self_attn")(x, deterministic=deterministic)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="self_attn_norm")(
            x + drop(h, deterministic=deterministic))
        if self.has_cross_attention:
            if audio is None:
                raise InputError("Q-Former cross-attention layer needs audio features, got None")
            h = attention("cross_attn")(x, audio, mask=audio_attn_mask, deterministic=deterministic)
            x = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="cross_attn_norm")(
                x + drop(h, deterministic=deterministic))
        h = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="mlp_in")(x)
        h = layers.activation(cfg.hidden_act)(h)
        h = layers.Dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="mlp_out")(h)
        return layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="mlp_norm")(
            x + drop(h, deterministic=deterministic))


class QFormer(nn.Module):
    """BLIP-2 Q-Former with the stage-1a contrastive heads (paper Sec. III-C, Eq. 6).

    Methods (all parameters are created by one ``init`` with ``method=QFormer.init_all``)::

      variables = model.init(rng, audio, mask, text, method=QFormer.init_all)
      tokens = model.apply(variables, audio, mask)                               # (B, Q, H)
      a = model.apply(variables, audio, mask, method=QFormer.embed_audio)        # (B, Q, D)
      t = model.apply(variables, text, method=QFormer.embed_text)                # (B, D)
      temp = model.apply(variables, method=QFormer.temperature)                  # ()

    Attributes:
      config: ``QFormerConfig``.
      dtype: computation dtype of the dense/attention layers (parameters are float32; softmax and
        the L2-normalised embeddings are float32). BLIP-2 keeps the Q-Former in float32.
    """
    config: QFormerConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.query_tokens = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("queries", "embed")),
            (cfg.num_queries, cfg.hidden_size), jnp.float32)
        self.embed_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.audio_layer_norm:
            self.audio_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype)
        layer_cls = nn.remat(QFormerLayer, static_argnums=(4,)) if cfg.remat else QFormerLayer
        self.layers = [layer_cls(cfg, has_cross_attention=cfg.has_cross_attention(i), dtype=self.dtype)
                       for i in range(cfg.num_layers)]
        self.audio_proj = layers.Dense(cfg.embed_dim, ("embed", None), dtype=self.dtype)
        self.text_proj = layers.Dense(cfg.embed_dim, ("embed", None), dtype=self.dtype)
        self.temp = self.param(
            "temp", nn.with_logical_partitioning(nn.initializers.constant(cfg.temperature_init), ()),
            (), jnp.float32)

    def __call__(self, audio_features: jax.Array, audio_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """Query outputs (the "audio tokens").

        Args:
          audio_features: (B, T, E) float, frozen speech-encoder features (HuBERT: 50 Hz, E = 1024
            for HuBERT-large); E may differ from ``hidden_size``.
          audio_mask: (B, T) bool, True for real frames, False for padding (None: all real). Padded
            frames are masked out of every cross-attention (``layers.key_padding_mask``), so their
            values never affect the output. An all-padding row gives meaningless outputs.
          deterministic: False enables dropout (needs a ``'dropout'`` rng).

        Returns:
          (B, Q, H) in ``dtype``.

        Raises:
          InputError: ``audio_features`` is not 3-D or ``audio_mask`` is not (B, T).
        """
        if audio_features.ndim != 3:
            raise InputError(f"Q-Former audio_features must be (B, T, E), got shape {audio_features.shape}")
        b, t, _ = audio_features.shape
        if audio_mask is not None and tuple(audio_mask.shape) != (b, t):
            raise InputError(f"Q-Former audio_mask must be (B, T) = {(b, t)}, got {audio_mask.shape}")
        audio = audio_features.astype(self.dtype)
        if self.config.audio_layer_norm:
            audio = self.audio_norm(audio)
        attn_mask = layers.key_padding_mask(audio_mask)
        x = jnp.broadcast_to(self.query_tokens.astype(self.dtype)[None],
                             (b,) + self.query_tokens.shape)
        x = self.embed_dropout(self.embed_norm(x), deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, audio, attn_mask, deterministic)
        return x

    def embed_audio(self, audio_features: jax.Array, audio_mask: jax.Array | None = None,
                    deterministic: bool = True) -> jax.Array:
        """(B, T, E), (B, T) bool -> (B, Q, embed_dim) float32, unit L2 norm per query.

        BLIP-2 ``image_feats = F.normalize(vision_proj(query_output), dim=-1)``.
        """
        return layers.l2_normalize(self.audio_proj(self(audio_features, audio_mask, deterministic)))

    def embed_text(self, text_features: jax.Array) -> jax.Array:
        """(B, W) frozen text-encoder [CLS] feature -> (B, embed_dim) float32, unit L2 norm.

        BLIP-2 ``text_feat = F.normalize(text_proj(text_output[:, 0, :]), dim=-1)``; here the text
        encoder is a separate frozen model of width W.

        Raises:
          InputError: ``text_features`` is not 2-D.
        """
        if text_features.ndim != 2:
            raise InputError(f"Q-Former text_features must be (B, W) [CLS] features, got shape "
                             f"{text_features.shape}")
        return layers.l2_normalize(self.text_proj(text_features.astype(self.dtype)))

    def temperature(self) -> jax.Array:
        """The learnable scalar temperature () float32, unclamped (``losses.info_nce`` clamps it)."""
        return self.temp

    def init_all(self, audio_features: jax.Array, audio_mask: jax.Array | None,
                 text_features: jax.Array, deterministic: bool = True
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Touches every parameter: returns ``(embed_audio(...), embed_text(...), temperature())``.

        Use as ``model.init(rng, audio (B,T,E), mask (B,T), text (B,W), method=QFormer.init_all)``
        (also usable as the stage-1a forward pass).
        """
        return (self.embed_audio(audio_features, audio_mask, deterministic),
                self.embed_text(text_features), self.temperature())
