"""LLaMA causal language model (Vicuna-7B in the paper's stage 1) in Flax Linen.

Architecture as in Touvron et al. 2023 ("LLaMA: Open and Efficient Foundation Language Models") and the
reference implementation ``transformers`` ``LlamaForCausalLM``: pre-norm decoder blocks with RMSNorm,
rotary position embeddings (RoPE, "rotate-half" layout), grouped-query attention (GQA), a SwiGLU MLP and
a tied or untied LM head.

Entry points: token ids or ``inputs_embeds`` (soft prompts: the stage-1 Instructor prepends projected
audio tokens to template embeddings), a boolean attention mask with left or right padding, and an
explicit key/value cache (``KVCache``) for incremental decoding. Parameter names follow Hugging Face
(``embed_tokens``, ``layers_{i}/self_attn/q_proj``, ``mlp/gate_proj``, ``norm``, ``lm_head``) so the
checkpoint table in ``avi_jax/checkpoints/llama.py`` is a plain rename + transpose.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers


def _dtype_name(d: Any) -> str:
    return jnp.dtype(d).name


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA decoder (names as in Hugging Face ``LlamaConfig``).

    ``dtype`` is the compute dtype (activations, KV cache), ``param_dtype`` the storage dtype of the
    weights; both are stored as dtype names (e.g. ``"float32"``, ``"bfloat16"``) so the config is
    hashable and JSON-friendly. ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads`` (multi-head attention) when left as 0.
    ``remat`` recomputes each decoder block in the backward pass (``nn.remat``), trading compute for
    activation memory when gradients flow through a frozen 7B model (stage 1b). ``scan`` runs the blocks
    as one ``nn.scan`` over stacked weights (``layers/...`` with a leading (num_hidden_layers,) axis,
    logical name ``layers``), so XLA compiles one block instead of ``num_hidden_layers`` copies: compile
    time and program size stop growing with depth (7B on 8 fake CPU devices: README "Memory plan").

    Raises:
      ConfigError: inconsistent sizes.
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan: bool = False

    def __post_init__(self):
        if not self.num_key_value_heads:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                                  f"num_attention_heads {self.num_attention_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        layers.activation(self.hidden_act)   # validates the name

    @classmethod
    def from_hf(cls, cfg: dict, **overrides) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict (``LlamaConfig.to_dict()``).

        Reads ``rope_theta`` from either the legacy top-level field or transformers>=5
        ``rope_parameters``. ``overrides`` (e.g. ``dtype="bfloat16"``) replace fields afterwards.

        Raises:
          ConfigError: ``model_type`` is not ``llama``, or RoPE scaling (``rope_scaling`` or a
            non-default ``rope_parameters.rope_type``: linear/dynamic/yarn/llama3) is requested, which
            this implementation does not support.
        """
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"config.json has model_type {model_type!r}; expected 'llama'")
        if cfg.get("rope_scaling"):
            raise ConfigError(f"rope_scaling={cfg['rope_scaling']!r} is not supported (only plain RoPE)")
        rope_params = cfg.get("rope_parameters") or {}
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
        rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        kwargs = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count from the architecture formula (no allocation)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        mlp = 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        block = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else h * v
        return v * h + self.num_hidden_layers * block + h + head


def llama_7b(**overrides) -> LlamaConfig:
    """LLaMA-7B / Vicuna-7B: 32 layers, width 4096, 32 heads, SwiGLU 11008, vocab 32000, untied
    (6,738,415,616 parameters). Vicuna v1.1+ uses rms_norm_eps 1e-6 (LLaMA-2 based v1.5: 1e-5; the
    value in a checkpoint's config.json wins when loading)."""
    return LlamaConfig(**{**dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                 rms_norm_eps=1e-6, max_position_embeddings=2048,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0), **overrides})


def tiny(**overrides) -> LlamaConfig:
    """A tiny random-init config for tests and the demo (vocab 256, width 64, 2 layers, GQA 4/2)."""
    return LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0), **overrides})


@flax.struct.dataclass
class KVCache:
    """Key/value cache for incremental decoding (a pytree; every field is an array).

    Attributes:
      key, value: per layer, (B, K, S_max, D) in the compute dtype (a tuple of ``num_hidden_layers``
        arrays; with ``config.scan`` one stacked (num_hidden_layers, B, K, S_max, D) array that the layer
        scan reads and writes in place); keys are stored after RoPE. Heads
        come before slots so that a decode step's attention reads the cache in place (with (B, S_max,
        K, D) XLA materialised a transposed copy of every layer's cache at every step, which made a
        decode step ~10-40% slower on CPU; see benchmarks/RESULTS.md).
      mask: (B, S_max) bool, True at filled slots holding real (non-padding) tokens.
      index: () int32, number of slots written so far (the next call writes at ``index``).
      position: (B,) int32, the RoPE position of the next real token (= real tokens seen so far).

    All shapes are fixed by (B, S_max), so a jitted step compiles once per shape; ``index`` and
    ``position`` are traced values.
    """
    key: tuple[jax.Array, ...] | jax.Array
    value: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array
    index: jax.Array
    position: jax.Array

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_length: int, dtype: Any = None) -> "KVCache":
        """An empty cache of ``max_length`` slots (dtype: default ``config.dtype``)."""
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch, config.num_key_value_heads, max_length, config.head_dim)
        if config.scan:
            key = value = jnp.zeros((config.num_hidden_layers,) + shape, dtype)
        else:
            key = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
            value = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(key=key, value=value,
                   mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32),
                   position=jnp.zeros((batch,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]


def positions_from_mask(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """RoPE positions (B, L) int32 from a (B, L) bool mask, as ``transformers`` generate does:
    ``start + cumsum(mask) - 1`` (left padding: the first real token gets position ``start``);
    padded slots get a clipped, irrelevant position."""
    m = attention_mask.astype(jnp.int32)
    pos = jnp.asarray(start, jnp.int32).reshape(-1, 1) + jnp.cumsum(m, axis=1) - 1
    return jnp.maximum(pos, 0)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables (B, L, D) float32 for integer ``positions`` (B, L): frequencies
    ``theta ** (-2i / D)`` for i < D/2, duplicated over both halves (the "rotate-half" layout)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (B, L, H, D) by the angles in cos/sin (B, L, D); computed in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm ``scale * x / sqrt(mean(x^2) + eps)`` (statistics in float32)."""
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def _dense(config: LlamaConfig, features: int, axes: tuple[str, str], use_bias: bool, name: str):
    return layers.Dense(features, axes, use_bias=use_bias, dtype=jnp.dtype(config.dtype),
                        param_dtype=jnp.dtype(config.param_dtype), name=name)


class LlamaAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query key/value heads (HF ``LlamaAttention``)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None):
        cfg = self.config
        b, l, _ = x.shape
        h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, h * d, ("embed", "heads"), cfg.attention_bias, "q_proj")(x).reshape(b, l, h, d)
        key = _dense(cfg, k * d, ("embed", "kv"), cfg.attention_bias, "k_proj")(x).reshape(b, l, k, d)
        value = _dense(cfg, k * d, ("embed", "kv"), cfg.attention_bias, "v_proj")(x).reshape(b, l, k, d)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        if kv is not None:
            cache_k, cache_v = kv
            start = (0, 0, index, 0)      # cache layout (B, K, S_max, D)
            cache_k = jax.lax.dynamic_update_slice(
                cache_k, key.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(
                cache_v, value.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
            kv = (cache_k, cache_v)
            key, value = cache_k.transpose(0, 2, 1, 3), cache_v.transpose(0, 2, 1, 3)
        out = layers.dot_product_attention(q, key.astype(q.dtype), value.astype(q.dtype), mask,
                                           scale=d ** -0.5)
        out = _dense(cfg, cfg.hidden_size, ("heads", "embed"), cfg.attention_bias, "o_proj")(
            out.reshape(b, l, h * d))
        return out, kv


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward ``down(act(gate(x)) * up(x))``."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = layers.activation(cfg.hidden_act)
        gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, "down_proj")(act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        y = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        y, kv = LlamaAttention(cfg, name="self_attn")(y, cos, sin, mask, kv, index)
        x = x + y
        y = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(cfg, name="mlp")(y)
        return x, kv


class Llama(nn.Module):
    """LLaMA causal LM (HF ``LlamaForCausalLM``).

    Params (Flax paths): ``embed_tokens/embedding`` (V, E) ('vocab','embed');
    ``layers_{i}/{input_layernorm,post_attention_layernorm}/scale``; ``layers_{i}/self_attn/{q,k,v,o}_proj``
    (kernels ('embed','heads'), ('embed','kv'), ('embed','kv'), ('heads','embed'));
    ``layers_{i}/mlp/{gate,up,down}_proj`` (('embed','mlp') / ('mlp','embed')); ``norm/scale``;
    ``lm_head/kernel`` (E, V) ('embed','vocab'), absent when embeddings are tied. With ``config.scan``
    the blocks' parameters are ``layers/...`` instead of ``layers_{i}/...``, each with a leading
    (num_hidden_layers,) axis named ``layers`` (``checkpoints.llama.stack_layers`` converts).
    """
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(layers.default_kernel_init, ("vocab", "embed")))
        block = nn.remat(LlamaDecoderLayer, prevent_cse=not cfg.scan) if cfg.remat else LlamaDecoderLayer
        if cfg.scan:
            # carry x; cos/sin/mask/index broadcast to every layer; the cache (k, v) scanned over layers
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), False, None)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings (B, L, E) in the compute dtype for ``input_ids`` (B, L) int.

        Use from outside as ``model.apply(params, ids, method=Llama.embed)`` to build soft prompts."""
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: KVCache | None = None, deterministic: bool = True):
        """Causal LM forward pass.

        Args:
          input_ids: (B, L) int token ids; exactly one of ``input_ids`` / ``inputs_embeds``.
          inputs_embeds: (B, L, E) embeddings (e.g. a soft prompt), cast to the compute dtype.
          attention_mask: (B, L) bool, True = real token (left or right padding); default all real.
            Padded keys are never attended; outputs at padded positions are meaningless.
          positions: (B, L) int RoPE positions; default from the mask (``cumsum(mask) - 1``, offset by
            ``cache.position`` when a cache is given), as ``transformers`` generate.
          cache: a ``KVCache``; the L new tokens are written at ``cache.index`` and attend to every
            filled real slot before them. The caller must keep ``cache.index + L <= S_max`` (inside jit
            an overflow cannot be detected; writes would be clamped).
          deterministic: unused (LLaMA has no dropout); kept for a uniform model interface.

        Returns:
          logits (B, L, V) float32, or ``(logits, new_cache)`` when ``cache`` is given.

        Raises:
          InputError: both or neither of input_ids / inputs_embeds, or mismatched shapes.
        """
        del deterministic
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("Llama: pass exactly one of input_ids (B, L) or inputs_embeds (B, L, E)")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise InputError(f"Llama: input_ids must be (B, L), got shape {input_ids.shape}")
            x = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise InputError(f"Llama: inputs_embeds must be (B, L, {cfg.hidden_size}), "
                                 f"got {inputs_embeds.shape}")
            x = inputs_embeds.astype(jnp.dtype(cfg.dtype))
        b, l = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, l), bool)
        elif attention_mask.shape != (b, l):
            raise InputError(f"Llama: attention_mask shape {attention_mask.shape} != (B, L) = {(b, l)}")
        attention_mask = attention_mask.astype(bool)

        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask)
            causal = jnp.tril(jnp.ones((l, l), bool))
            mask = causal[None, None] & attention_mask[:, None, None, :]
            index, kvs = None, None
        else:
            if cache.mask.shape[0] != b:
                raise InputError(f"Llama: cache batch {cache.mask.shape[0]} != input batch {b}")
            if l > cache.max_length:
                raise InputError(f"Llama: {l} new tokens do not fit a cache of {cache.max_length} slots")
            index = cache.index
            if positions is None:
                positions = positions_from_mask(attention_mask, cache.position)
            key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            q_slot = index + jnp.arange(l)
            k_slot = jnp.arange(cache.max_length)
            mask = (k_slot[None, :] <= q_slot[:, None])[None, None] & key_mask[:, None, None, :]
            kvs = (cache.key, cache.value)

        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if cfg.scan:
            x, kvs = self.layers(x, cos, sin, mask, kvs, index)
        else:
            new_kvs = []
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, cos, sin, mask, None if kvs is None else (kvs[0][i], kvs[1][i]), index)
                new_kvs.append(kv)
            kvs = None if kvs is None else (tuple(k for k, _ in new_kvs), tuple(v for _, v in new_kvs))
        x = self.norm(x)
        if cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        new_cache = KVCache(
            key=kvs[0], value=kvs[1], mask=key_mask,
            index=index + l,
            position=cache.position + attention_mask.sum(axis=1, dtype=jnp.int32))
        return logits, new_cache


def init_params(config: LlamaConfig, rng: jax.Array, *, unbox: bool = True) -> dict:
    """Random parameters (the bare tree, as ``load_llama`` returns) for ``Llama(config)``: normal(0.02)
    weights, unit norms. Use as ``Llama(config).apply({'params': params}, ...)``."""
    variables = jax.jit(Llama(config).init)(rng, jnp.zeros((1, 1), jnp.int32))
    return nn.meta.unbox(variables["params"]) if unbox else variables["params"]


def abstract_params(config: LlamaConfig) -> dict:
    """``jax.eval_shape`` of ``init_params(..., unbox=False)``: the bare params tree with boxed leaves
    (``nn.Partitioned`` carrying the logical axis names; use ``nn.get_partition_spec`` /
    ``nn.meta.unbox``). Nothing is allocated."""
    return jax.eval_shape(
        lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
