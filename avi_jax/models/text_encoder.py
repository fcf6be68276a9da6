"""Text encoders for instruction embeddings: BERT-family sentence encoders and the CLIP text tower.

The instruction text (e.g. "A fairly happy man speaks with lip corner strongly pulled.") is embedded by
a frozen pretrained text encoder: its [CLS] state is the InfoNCE target of stage 1a (the Q-Former audio
tokens are aligned to it) and its sentence embedding feeds the instruction aligner of stage 2b
(paper Sec. III-C, III-D).

* ``BertEncoder`` follows transformers ``BertModel`` (post-LN, absolute positions, token types,
  optional tanh pooler) and sentence-transformers' masked mean pooling, so BERT-base and
  sentence-transformers checkpoints (e.g. all-MiniLM-L6-v2) load with
  ``avi_jax.checkpoints.text_encoder.load_bert``.
* ``ClipTextEncoder`` follows transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
  (pre-LN, causal, quick-GELU, final LayerNorm, pooled state at the EOS token, optional linear
  projection); weights load with ``load_clip_text``.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``length``, ``norm``).
Parameters are float32; ``dtype`` sets the computation dtype (attention logits/softmax stay float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers

Dtype = Any

_POOLINGS = ("cls", "mean")


def _embed(num: int, features: int, axes: tuple[str | None, str | None], name: str,
           dtype: Dtype) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype,
                    embedding_init=nn.with_logical_partitioning(layers.default_kernel_init, axes),
                    name=name)


def mean_pool(hidden: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Masked mean over the sequence (sentence-transformers ``Pooling(pooling_mode_mean_tokens)``).

    Args:
      hidden: (B, L, H) token states.
      mask: (B, L) attention mask (1/True = real token, 0/False = padding) or None (all real).

    Returns:
      (B, H) float: sum of the real tokens' states divided by max(count, 1e-9), in ``hidden``'s dtype.
    """
    if mask is None:
        return jnp.mean(hidden, axis=1)
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return (total / count).astype(hidden.dtype)


def _check_ids(input_ids: jax.Array, max_positions: int, what: str) -> None:
    if input_ids.ndim != 2:
        raise InputError(f"{what}: input_ids must be (batch, length), got shape {input_ids.shape}")
    if input_ids.shape[1] > max_positions:
        raise InputError(f"{what}: sequence length {input_ids.shape[1]} exceeds the model's "
                         f"{max_positions} position embeddings; truncate the tokens")


def _check_mask(mask: jax.Array | None, input_ids: jax.Array, what: str) -> None:
    if mask is not None and mask.shape != input_ids.shape:
        raise InputError(f"{what}: attention_mask shape {mask.shape} != input_ids shape "
                         f"{input_ids.shape}")


# ----------------------------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (fields of transformers ``BertConfig``).

    ``add_pooler``: whether the tanh pooler (``pooler.dense``) exists. ``pooling``/``normalize`` are the
    defaults of ``BertEncoder.sentence_embedding`` ('cls' or 'mean'; L2-normalize or not).
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    add_pooler: bool = True
    pooling: str = "cls"
    normalize: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.pooling not in _POOLINGS:
            raise ConfigError(f"BertConfig: pooling {self.pooling!r} not in {_POOLINGS}")
        layers.activation(self.hidden_act)   # raises on an unknown activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "BertConfig":
        """From a transformers ``config.json`` dict (model_type 'bert'; also MiniLM/sentence-transformers).

        Raises:
          ConfigError: a relative position embedding type or a decoder config (not supported).
        """
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"BertConfig: position_embedding_type {pos!r} is not supported "
                              "(only 'absolute')")
        if cfg.get("is_decoder", False):
            raise ConfigError("BertConfig: is_decoder=True (causal BERT) is not supported")
        try:
            kw = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
                attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
                pad_token_id=int(cfg.get("pad_token_id") or 0),
            )
        except KeyError as e:
            raise ConfigError(f"BertConfig: config.json lacks field {e}") from e
        kw.update(overrides)
        return cls(**kw)


def bert_base(**overrides) -> BertConfig:
    """BERT-base uncased (bert-base-uncased): 12 layers, 768 wide, 12 heads, 109.48 M parameters."""
    return BertConfig(**overrides)


def tiny(**overrides) -> BertConfig:
    """A 2-layer, 32-wide BERT for tests."""
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


@flax.struct.dataclass
class BertOutput:
    """``last_hidden_state`` (B, L, H); ``hidden_states`` tuple of num_hidden_layers + 1 (B, L, H) arrays
    (embeddings first, as transformers) or None; ``cls`` (B, H) final [CLS] state; ``pooler_output``
    (B, H) tanh pooler output or None when the model has no pooler."""
    last_hidden_state: jax.Array
    cls: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooler_output: jax.Array | None = None


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout
    (transformers ``BertEmbeddings``). input_ids/token_type_ids (B, L) int -> (B, L, H)."""
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None,
                 deterministic: bool) -> jax.Array:
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "word_embeddings",
                   self.dtype)(input_ids)
        x = x + _embed(c.type_vocab_size, c.hidden_size, (None, "embed"), "token_type_embeddings",
                       self.dtype)(token_type_ids)
        x = x + _embed(c.max_position_embeddings, c.hidden_size, ("length", "embed"),
                       "position_embeddings", self.dtype)(jnp.arange(input_ids.shape[1]))[None]
        x = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
        return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class BertLayer(nn.Module):
    """One post-LN BERT layer (transformers ``BertLayer``): x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        c = self.config
        h = layers.MultiHeadAttention(c.num_attention_heads, c.head_dim,
                                      dropout_rate=c.attention_dropout, dtype=self.dtype,
                                      name="attention")(
            x, mask=mask, deterministic=deterministic)
        h = nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)
        x = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="attention_norm")(x + h)
        h = layers.Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                         name="intermediate")(x)
        h = layers.activation(c.hidden_act)(h)
        h = layers.Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="output")(h)
        h = nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)
        return layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="output_norm")(x + h)


class BertEncoder(nn.Module):
    """BERT encoder (transformers ``BertModel``) with [CLS], pooler and mean-pooled sentence embeddings.

    Parameter tree: ``embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}``,
    ``layer_{i}/{attention/{query,key,value,out},attention_norm,intermediate,output,output_norm}``,
    ``pooler`` (when ``config.add_pooler``).

    Dropout: embedding and hidden dropout as transformers; attention dropout is applied to the attention
    output (before the output projection) rather than to the attention probabilities.
    """
    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> BertOutput:
        """Encode token ids.

        Args:
          input_ids: (B, L) int32 WordPiece ids, L <= max_position_embeddings.
          attention_mask: (B, L) 1/True for real tokens, 0/False for padding; None = all real.
          token_type_ids: (B, L) int32 segment ids; None = all zeros.
          deterministic: disables dropout when True (dropout needs the 'dropout' rng otherwise).
          output_hidden_states: also return every layer's output.

        Returns:
          ``BertOutput``. Padded positions hold values that must be ignored.

        Raises:
          InputError: wrong rank, a too long sequence, or a mask of another shape.
        """
        c = self.config
        _check_ids(input_ids, c.max_position_embeddings, "BertEncoder")
        _check_mask(attention_mask, input_ids, "BertEncoder")
        x = BertEmbeddings(c, dtype=self.dtype, name="embeddings")(input_ids, token_type_ids,
                                                                  deterministic)
        mask = layers.key_padding_mask(attention_mask)
        hidden = [x]
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, dtype=self.dtype, name=f"layer_{i}")(x, mask, deterministic)
            hidden.append(x)
        cls = x[:, 0]
        pooled = None
        if c.add_pooler:
            pooled = jnp.tanh(layers.Dense(c.hidden_size, ("embed", None), dtype=self.dtype,
                                           name="pooler")(cls))
        return BertOutput(last_hidden_state=x, cls=cls,
                          hidden_states=tuple(hidden) if output_hidden_states else None,
                          pooler_output=pooled)

    def sentence_embedding(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                           token_type_ids: jax.Array | None = None, *, pooling: str | None = None,
                           normalize: bool | None = None, deterministic: bool = True) -> jax.Array:
        """(B, H) sentence embedding: the [CLS] state ('cls') or the masked token mean ('mean', as
        sentence-transformers), L2-normalized when ``normalize``. ``pooling``/``normalize`` default to
        the config's. Use as ``model.apply(params, ids, mask, method=BertEncoder.sentence_embedding)``.

        Raises:
          ConfigError: unknown pooling.
        """
        pooling = self.config.pooling if pooling is None else pooling
        normalize = self.config.normalize if normalize is None else normalize
        if pooling not in _POOLINGS:
            raise ConfigError(f"BertEncoder.sentence_embedding: pooling {pooling!r} not in {_POOLINGS}")
        out = self(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        emb = out.cls if pooling == "cls" else mean_pool(out.last_hidden_state, attention_mask)
        return layers.l2_normalize(emb).astype(emb.dtype) if normalize else emb


# ----------------------------------------------------------------------------------------------------
# CLIP text tower
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """Hyper-parameters of the CLIP text tower (fields of transformers ``CLIPTextConfig``).

    ``projection_dim`` None means no ``text_projection`` (``CLIPTextModel``). ``eos_token_id`` selects
    the pooled position: 2 is transformers' legacy value meaning "the largest token id"
    (``argmax(input_ids)``), any other value means "the first position holding eos_token_id".
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "quick_gelu"
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    eos_token_id: int = 49407
    projection_dim: int | None = 512
    normalize: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"ClipTextConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "ClipTextConfig":
        """From a transformers ``config.json`` dict: a full ``CLIPConfig`` (model_type 'clip', uses its
        ``text_config`` and top-level ``projection_dim``) or a ``CLIPTextConfig`` ('clip_text_model').
        Missing fields take transformers' ``CLIPTextConfig`` defaults."""
        if "text_config" in cfg:     # CLIPConfig: the projection width is a top-level field
            text = dict(cfg.get("text_config") or {})
            proj = cfg.get("projection_dim", text.get("projection_dim", 512))
        else:
            text = dict(cfg)
            proj = text.get("projection_dim", 512)
        kw = dict(
            vocab_size=int(text.get("vocab_size", 49408)),
            hidden_size=int(text.get("hidden_size", 512)),
            num_hidden_layers=int(text.get("num_hidden_layers", 12)),
            num_attention_heads=int(text.get("num_attention_heads", 8)),
            intermediate_size=int(text.get("intermediate_size", 2048)),
            hidden_act=str(text.get("hidden_act", "quick_gelu")),
            max_position_embeddings=int(text.get("max_position_embeddings", 77)),
            layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
            attention_dropout=float(text.get("attention_dropout", 0.0)),
            eos_token_id=int(text.get("eos_token_id", 49407)),
            projection_dim=None if proj is None else int(proj),
        )
        kw.update(overrides)
        return cls(**kw)


def clip_vit_l14(**overrides) -> ClipTextConfig:
    """Text tower of openai/clip-vit-large-patch14: 768 wide, 12 layers, 12 heads, 77 tokens,
    projection 768 (its config.json keeps the legacy eos_token_id 2: pool at argmax(input_ids))."""
    kw = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              projection_dim=768, eos_token_id=2)
    kw.update(overrides)
    return ClipTextConfig(**kw)


def clip_tiny(**overrides) -> ClipTextConfig:
    """A 2-layer, 32-wide CLIP text tower for tests."""
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=16, projection_dim=24, eos_token_id=99)
    kw.update(overrides)
    return ClipTextConfig(**kw)


@flax.struct.dataclass
class ClipTextOutput:
    """``last_hidden_state`` (B, L, H) after the final LayerNorm; ``pooler_output`` (B, H) the state at
    the EOS token; ``text_embeds`` (B, P) projected pooled state (None without projection);
    ``hidden_states`` embeddings + every layer's output (before the final LayerNorm) or None."""
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) int32 pooled position per row, transformers 5 ``CLIPTextModel`` rule: ``argmax(input_ids)``
    when ``eos_token_id == 2`` (legacy configs), else the first position equal to ``eos_token_id``
    (0 when a row has none, as argmax of all-False)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class ClipTextLayer(nn.Module):
    """Pre-LN CLIP layer (transformers ``CLIPEncoderLayer``): x += Attn(LN1(x)); x += MLP(LN2(x))."""
    config: ClipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        h = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + layers.MultiHeadAttention(c.num_attention_heads, c.head_dim,
                                          dropout_rate=c.attention_dropout, dtype=self.dtype,
                                          name="self_attn")(
            h, mask=mask, deterministic=deterministic)
        h = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        h = layers.Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
        h = layers.activation(c.hidden_act)(h)
        return x + layers.Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class ClipTextEncoder(nn.Module):
    """CLIP text tower (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

    Parameter tree: ``token_embedding``, ``position_embedding``, ``layer_{i}/{layer_norm1,self_attn/
    {query,key,value,out},layer_norm2,fc1,fc2}``, ``final_layer_norm``, ``text_projection`` (when
    ``config.projection_dim``).
    """
    config: ClipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True, output_hidden_states: bool = False) -> ClipTextOutput:
        """Encode BPE token ids.

        Args:
          input_ids: (B, L) int32 ids (BOS ... EOS, then padding), L <= max_position_embeddings. Every
            row must contain the EOS token (the tokenizer adds it).
          attention_mask: (B, L) 1/True real, 0/False padding; None = all real. Combined with the
            causal mask.
          deterministic: disables dropout when True.
          output_hidden_states: also return every layer's output.

        Returns:
          ``ClipTextOutput``.

        Raises:
          InputError: wrong rank, a too long sequence, or a mask of another shape.
        """
        c = self.config
        _check_ids(input_ids, c.max_position_embeddings, "ClipTextEncoder")
        _check_mask(attention_mask, input_ids, "ClipTextEncoder")
        b, length = input_ids.shape
        x = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "token_embedding",
                   self.dtype)(input_ids)
        x = x + _embed(c.max_position_embeddings, c.hidden_size, ("length", "embed"),
                       "position_embedding", self.dtype)(jnp.arange(length))[None]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & layers.key_padding_mask(attention_mask)
        hidden = [x]
        for i in range(c.num_hidden_layers):
            x = ClipTextLayer(c, dtype=self.dtype, name=f"layer_{i}")(x, mask, deterministic)
            hidden.append(x)
        x = layers.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        pooled = x[jnp.arange(b), eos_positions(input_ids, c.eos_token_id)]
        embeds = None
        if c.projection_dim:
            embeds = layers.Dense(c.projection_dim, ("embed", None), use_bias=False, dtype=self.dtype,
                                  name="text_projection")(pooled)
        return ClipTextOutput(last_hidden_state=x, pooler_output=pooled, text_embeds=embeds,
                              hidden_states=tuple(hidden) if output_hidden_states else None)

    def sentence_embedding(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                           *, normalize: bool | None = None, deterministic: bool = True) -> jax.Array:
        """(B, P) projected EOS embedding (B, H pooled state without projection), L2-normalized when
        ``normalize`` (default ``config.normalize``), as CLIP's ``get_text_features`` + normalization."""
        normalize = self.config.normalize if normalize is None else normalize
        out = self(input_ids, attention_mask, deterministic=deterministic)
        emb = out.pooler_output if out.text_embeds is None else out.text_embeds
        return layers.l2_normalize(emb).astype(emb.dtype) if normalize else emb


def text_encoder_for(config: BertConfig | ClipTextConfig, dtype: Dtype = jnp.float32) -> nn.Module:
    """The module for a config: ``BertEncoder`` or ``ClipTextEncoder``.

    Raises:
      ConfigError: any other config type.
    """
    if isinstance(config, BertConfig):
        return BertEncoder(config, dtype=dtype)
    if isinstance(config, ClipTextConfig):
        return ClipTextEncoder(config, dtype=dtype)
    raise ConfigError(f"text_encoder_for: unsupported config type {type(config).__name__}")
