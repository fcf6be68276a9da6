"""Building blocks shared by every model: logically partitioned dense/norm layers, attention, the pre-LN
transformer block and L2 normalisation.

Every parameter carries logical axis names (``nn.with_logical_partitioning``); the mapping of logical
names to mesh axes lives in ``configs/common.py`` (``logical_axis_rules``). Logical names used here:
``embed`` (model width), ``mlp`` (feed-forward width), ``heads`` (flattened heads x head_dim),
``kv`` (flattened key/value heads x head_dim), ``vocab``, ``queries``, ``conv``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def Dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Initializer = default_kernel_init, name: str | None = None) -> nn.Dense:
    """``nn.Dense`` whose kernel (in, out) carries logical ``axes`` and whose bias carries ``axes[1]``.

    The kernel is stored (in_features, out_features): a PyTorch ``nn.Linear.weight`` (out, in) maps to
    it transposed.
    """
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name)


def LayerNorm(eps: float, *, axis_name: str | None = "embed", dtype: Dtype = jnp.float32,
              use_bias: bool = True, use_scale: bool = True, name: str | None = None) -> nn.LayerNorm:
    """``nn.LayerNorm`` over the last axis with logically named scale/bias (PyTorch weight -> scale)."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, use_bias=use_bias, use_scale=use_scale,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
        name=name)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None, *, scale: float | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped-query support.

    Args:
      query: (B, T, H, D).
      key, value: (B, S, K, D) with ``H % K == 0`` (K < H is grouped-query attention: each group of
        H // K query heads shares one key/value head, as in LLaMA-2/3).
      mask: boolean, broadcastable to (B, H, T, S); True where attention is allowed. A row with no
        allowed position yields a uniform average (its output is meaningless and must be masked by
        the caller, as in the reference implementations).
      scale: logit scale, default ``D ** -0.5``.

    Returns:
      (B, T, H, D) in the dtype of ``query``. Logits and softmax are computed in float32.
    """
    b, t, h, d = query.shape
    s, k_heads = key.shape[1], key.shape[2]
    if h % k_heads:
        raise ValueError(f"{h} query heads are not a multiple of {k_heads} key/value heads")
    g = h // k_heads
    scale = d ** -0.5 if scale is None else scale
    # Heads-major layout: (B, K, G*T, D) queries against (B, K, S, D) keys/values, so both matmuls are plain
    # batched matmuls over leading (B, K) axes. Contracting the (B, T, H, D) arrays directly made XLA:CPU
    # pick a slow batched-dot layout (~3x slower self-attention at T = 500; see benchmarks/RESULTS.md).
    q = query.reshape(b, t, k_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, g * t, d)
    k = key.transpose(0, 2, 1, 3)
    v = value.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, t, s)).reshape(b, k_heads, g * t, s)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", weights, v)
    return out.reshape(b, k_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def key_padding_mask(key_valid: jax.Array | None) -> jax.Array | None:
    """Attention mask (B, 1, 1, S) from key validity (B, S) (True = real, False = padding).

    Only keys are masked; padded queries still attend (their outputs are ignored by the caller), as
    in the reference models. None (all keys valid) passes through.
    """
    if key_valid is None:
        return None
    return key_valid[:, None, None, :].astype(bool)


class MultiHeadAttention(nn.Module):
    """Multi-head (optionally grouped-query) attention with separate q/k/v/out projections.

    Submodules ``query``, ``key``, ``value``, ``out`` map one-to-one onto the q/k/v/o ``nn.Linear``
    layers of BERT, HuBERT/Wav2Vec2 and the Q-Former.

    Attributes:
      num_heads: query heads H.
      head_dim: D.
      num_kv_heads: K (default H).
      out_features: output width (default: the input width of ``inputs_q``).
    """
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    use_bias: bool = True
    out_features: int | None = None
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
                 mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """inputs_q (B, T, E), inputs_kv (B, S, E') (default inputs_q), mask bool (B, 1|H, T, S)."""
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        kv_heads = self.num_kv_heads or self.num_heads
        b, t, _ = inputs_q.shape
        s = inputs_kv.shape[1]
        q = Dense(self.num_heads * self.head_dim, ("embed", "heads"), use_bias=self.use_bias,
                  dtype=self.dtype, name="query")(inputs_q)
        k = Dense(kv_heads * self.head_dim, ("embed", "kv"), use_bias=self.use_bias,
                  dtype=self.dtype, name="key")(inputs_kv)
        v = Dense(kv_heads * self.head_dim, ("embed", "kv"), use_bias=self.use_bias,
                  dtype=self.dtype, name="value")(inputs_kv)
        out = dot_product_attention(
            q.reshape(b, t, self.num_heads, self.head_dim), k.reshape(b, s, kv_heads, self.head_dim),
            v.reshape(b, s, kv_heads, self.head_dim), mask)
        out = out.reshape(b, t, self.num_heads * self.head_dim)
        if self.dropout_rate > 0:
            out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
        return Dense(self.out_features or inputs_q.shape[-1], ("heads", "embed"),
                     use_bias=self.use_bias, dtype=self.dtype, name="out")(out)


def _gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU ``x * (1 + erf(x / sqrt(2))) / 2``, the formula of torch ``nn.GELU()``.

    ``jax.nn.gelu(approximate=False)`` uses ``erfc``, which XLA:CPU evaluates ~5x slower than ``erf``; the
    two differ by float32 rounding (absolute error ~1e-7 |x|).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Hugging Face ``hidden_act`` names -> JAX functions (exact erf GELU for "gelu")."""
    table = {
        "gelu": _gelu_erf,
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(table)}")
    return table[name]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` over the last axis (PyTorch ``F.normalize``), computed and returned in
    float32; shape kept. The rsqrt of the clamped squared norm keeps gradients finite for an all-zero
    vector (whose output is zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TransformerBlock(nn.Module):
    """Pre-LN, non-causal transformer encoder block (GPT-2 / ViT layout) of the motion prior's style
    encoder and talking generator and of the diffusion prior:
    ``x + Dropout(MHA(LN(x)))``, then ``x + Dropout(Dense(GELU(Dense(LN(x)))))``.

    Submodules ``attention_norm``, ``attention`` (``MultiHeadAttention``, ``num_heads * head_dim`` wide,
    projected back to the input width), ``mlp_norm``, ``mlp_in`` (-> ``mlp_dim``, logical ``mlp``),
    ``mlp_out``. Exact (erf) GELU.

    Attributes:
      num_heads, head_dim: attention heads and their width.
      mlp_dim: feed-forward hidden width.
      dropout: rate on the attention and MLP outputs (only when ``deterministic=False``).
      layer_norm_eps: LayerNorm epsilon.
    """
    num_heads: int
    head_dim: int
    mlp_dim: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """x (B, T, E) -> (B, T, E); mask bool broadcastable to (B, H, T, T), True = may attend (None:
        all)."""
        width = x.shape[-1]
        drop = nn.Dropout(self.dropout)
        h = LayerNorm(self.layer_norm_eps, name="attention_norm")(x)
        h = MultiHeadAttention(self.num_heads, self.head_dim, out_features=width,
                               name="attention")(h, mask=mask)
        x = x + drop(h, deterministic=deterministic)
        h = LayerNorm(self.layer_norm_eps, name="mlp_norm")(x)
        h = Dense(self.mlp_dim, ("embed", "mlp"), name="mlp_in")(h)
        h = activation("gelu")(h)
        h = Dense(width, ("mlp", "embed"), name="mlp_out")(h)
        return x + drop(h, deterministic=deterministic)
