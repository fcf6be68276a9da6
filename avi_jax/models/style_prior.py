"""Stage 2b of AVI-Talking: instruction -> style embedding (paper Sec. III-D, Eq. 7-8; DALL-E 2's prior).

A frozen text encoder embeds the visual instruction (B, text_dim). The **instruction aligner** (a residual
MLP) maps it into the style space of the motion prior's style encoder (B, style_dim; 128 in the paper)
and is trained contrastively against the style embeddings of the clips (Eq. 7). The **diffusion prior**,
a non-causal transformer over the four tokens

    [aligned instruction feature, timestep embedding, noised style embedding x_t, learned query]

predicts the clean style embedding x0 (not the noise) from the output at the query token (Eq. 8). The
instruction token is replaced by a learned null embedding with probability ``cond_drop_prob`` during
training (0.2), which makes classifier-free guidance possible at sampling time
(``x0 = u + s (c - u)``, s = 3.5). With ``no_diffusion`` (the paper's Table 4 ablation) the aligner
output *is* the style embedding and there is no prior.

The prior works in a **normalised style space** ``z = (style - mean) / scale`` (``mean`` (D,), ``scale``
() the root mean per-dimension variance, both training-set statistics stored in the frozen ``style_norm``
component), so the diffusion's unit-variance noise matches the data scale whatever the style encoder's
output scale; :func:`sample_style` returns raw style embeddings, ready for the talking generator.

Parameter components (each its own tree): ``aligner`` (``InstructionAligner``), ``prior``
(``DiffusionPrior``), ``style_norm`` ({'mean': (D,), 'scale': ()}).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import diffusion, layers


CONDITIONS = ("instruction", "audio")


@dataclasses.dataclass(frozen=True)
class StylePriorConfig:
    """Hyper-parameters of the instruction aligner and the diffusion prior (defaults: paper scale).

    Attributes:
      text_dim: width of the text encoder's sentence embedding (CLIP ViT-L/14 text: 768).
      style_dim: width of the style space (the motion prior's ``style_embed_dim``, 128).
      aligner_hidden, aligner_blocks: residual MLP width and number of residual blocks
        (``h + Dense(GELU(Dense(LN(h))))``); the MLP inside a block is ``2 * aligner_hidden`` wide.
      aligner_dropout: dropout inside the aligner's residual blocks (training only).
      width, depth, num_heads, head_dim, mlp_dim: the prior transformer (paper: 128, 6, 8, 64; the
        attention is ``num_heads * head_dim`` wide, projected back to ``width``; MLP 4 x width).
      dropout: dropout on the prior's attention/MLP outputs (training only).
      cond_drop_prob: probability of replacing the instruction token by the null embedding (0.2).
      num_timesteps, schedule: diffusion steps (100) and noise schedule ('cosine' or 'linear').
      temperature_init: initial InfoNCE temperature of Eq. 7 (learnable; BLIP-2 style 0.07).
      no_diffusion: the ablation without prior: the aligner output is the style embedding.
      no_contrastive: the "w/o Cont Align" ablation (Table 4): no InfoNCE of Eq. 7, so no temperature
        parameter; the aligner is trained through the diffusion loss alone.
      condition: what the aligner embeds: 'instruction' (the text encoder's sentence embedding, the paper's
        system) or 'audio' (Table 1's "w/o LLM": the Q-Former's aligned audio embedding of stage 1a,
        ``text_dim`` = its width).
      layer_norm_eps: LayerNorm epsilon.
    """
    text_dim: int = 768
    style_dim: int = 128
    aligner_hidden: int = 512
    aligner_blocks: int = 2
    aligner_dropout: float = 0.0
    width: int = 128
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 512
    dropout: float = 0.0
    cond_drop_prob: float = 0.2
    num_timesteps: int = 100
    schedule: str = "cosine"
    temperature_init: float = 0.07
    no_diffusion: bool = False
    no_contrastive: bool = False
    condition: str = "instruction"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("text_dim", "style_dim", "aligner_hidden", "width", "num_heads", "head_dim", "mlp_dim",
                     "num_timesteps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"StylePriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.aligner_blocks < 0 or self.depth < 0:
            raise ConfigError("StylePriorConfig: aligner_blocks and depth must be >= 0")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"StylePriorConfig.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ConfigError(f"StylePriorConfig.schedule {self.schedule!r} not in {diffusion.SCHEDULES}")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"StylePriorConfig.condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.temperature_init <= 0:
            raise ConfigError(f"StylePriorConfig.temperature_init must be > 0, got {self.temperature_init}")

    @property
    def noise_schedule(self) -> diffusion.NoiseSchedule:
        return _schedule(self.schedule, self.num_timesteps)


@functools.lru_cache(maxsize=None)
def _schedule(kind: str, steps: int) -> diffusion.NoiseSchedule:
    return diffusion.make_schedule(kind, steps)


def paper(**overrides: Any) -> StylePriorConfig:
    """Paper scale: 768-d CLIP text -> 128-d style; prior dim 128, depth 6, 8 heads x 64, 100 steps."""
    return StylePriorConfig(**overrides)


def demo(**overrides: Any) -> StylePriorConfig:
    """CPU demo scale (``text_dim``/``style_dim`` usually come from the text encoder / motion run)."""
    kw = dict(text_dim=64, style_dim=32, aligner_hidden=128, aligner_blocks=2, width=64, depth=2,
              num_heads=4, head_dim=16, mlp_dim=128)
    kw.update(overrides)
    return StylePriorConfig(**kw)


def tiny(**overrides: Any) -> StylePriorConfig:
    """Toy size for tests."""
    kw = dict(text_dim=16, style_dim=8, aligner_hidden=16, aligner_blocks=1, width=16, depth=1,
              num_heads=2, head_dim=8, mlp_dim=32, num_timesteps=10)
    kw.update(overrides)
    return StylePriorConfig(**kw)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim) float32 (DDPM / Transformer style:
    cos on the first half of the channels, sin on the second; frequencies 1 .. 1/max_period)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class InstructionAligner(nn.Module):
    """Residual MLP from the text embedding (B, text_dim) to the style space (B, style_dim) (paper Eq. 7).

    ``in_proj`` (text_dim -> aligner_hidden), ``aligner_blocks`` residual blocks ``blocks_{i}``
    (``h + Dropout(Dense(GELU(Dense(LN(h)))))``), then ``out_norm`` + ``out`` (-> style_dim). Also owns the
    learnable InfoNCE temperature ``temp`` (read with ``method=InstructionAligner.temperature``), except
    with ``no_contrastive``.
    """
    config: StylePriorConfig

    @nn.compact
    def __call__(self, text: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        if text.ndim != 2 or text.shape[-1] != c.text_dim:
            raise InputError(f"InstructionAligner expects text features (B, {c.text_dim}), got {text.shape}")
        if not c.no_contrastive:
            self.param("temp", nn.with_logical_partitioning(
                nn.initializers.constant(c.temperature_init), ()), ())
        h = layers.Dense(c.aligner_hidden, (None, "embed"), name="in_proj")(text.astype(jnp.float32))
        for i in range(c.aligner_blocks):
            y = layers.LayerNorm(c.layer_norm_eps, name=f"blocks_{i}_norm")(h)
            y = layers.Dense(2 * c.aligner_hidden, ("embed", "mlp"), name=f"blocks_{i}_mlp_in")(y)
            y = layers.activation("gelu")(y)
            y = layers.Dense(c.aligner_hidden, ("mlp", "embed"), name=f"blocks_{i}_mlp_out")(y)
            h = h + nn.Dropout(c.aligner_dropout)(y, deterministic=deterministic)
        h = layers.LayerNorm(c.layer_norm_eps, name="out_norm")(h)
        return layers.Dense(c.style_dim, ("embed", None), name="out")(h)

    def temperature(self) -> jax.Array:
        """The InfoNCE temperature () float32 (clipped to [0.001, 0.5] by ``losses.info_nce``); use as
        ``apply(params, method=InstructionAligner.temperature)``."""
        return jnp.asarray(nn.meta.unbox(self.get_variable("params", "temp")), jnp.float32)


class DiffusionPrior(nn.Module):
    """x0-predicting diffusion prior over the style space (paper Eq. 8; DALL-E 2's prior transformer).

    Tokens (each projected to ``width``, plus a learned position embedding ``positions`` (4, width)):
    ``cond_in(condition or null)``, ``time_mlp(sinusoid(t))``, ``x_in(x_t)``, the learned ``query``.
    ``depth`` non-causal ``layers.TransformerBlock`` s, ``out_norm``, then ``out`` reads the query token
    -> x0 (B, D).
    Rows with ``keep = False`` see the learned ``null_condition`` (D,) instead of their condition.
    """
    config: StylePriorConfig

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, condition: jax.Array, keep: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """x_t (B, D) noised normalised style, t (B,) int timesteps in [0, T), condition (B, D) aligned
        instruction feature, keep (B,) bool (default all True). Returns x0_hat (B, D) float32.

        Raises:
          InputError: inconsistent shapes.
        """
        c = self.config
        b = x_t.shape[0]
        if x_t.shape != (b, c.style_dim) or condition.shape != (b, c.style_dim) or t.shape != (b,):
            raise InputError(f"DiffusionPrior expects x_t and condition (B, {c.style_dim}) and t (B,), got "
                             f"{x_t.shape}, {condition.shape}, {t.shape}")
        keep = jnp.ones((b,), bool) if keep is None else keep.astype(bool)
        null = self.param("null_condition", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), (None,)), (c.style_dim,))
        cond = jnp.where(keep[:, None], condition.astype(jnp.float32), null[None, :])
        tokens = [
            layers.Dense(c.width, (None, "embed"), name="cond_in")(cond),
            layers.Dense(c.width, (None, "embed"), name="time_mlp_out")(nn.silu(
                layers.Dense(c.mlp_dim, (None, "mlp"), name="time_mlp_in")(timestep_embedding(t, c.width)))),
            layers.Dense(c.width, (None, "embed"), name="x_in")(x_t.astype(jnp.float32)),
        ]
        query = self.param("query", nn.with_logical_partitioning(layers.default_kernel_init, ("embed",)),
                           (c.width,))
        tokens.append(jnp.broadcast_to(query[None, :], (b, c.width)))
        x = jnp.stack(tokens, axis=1)                                       # (B, 4, width)
        pos = self.param("positions", nn.with_logical_partitioning(layers.default_kernel_init,
                                                                   (None, "embed")), (4, c.width))
        x = x + pos[None]
        for i in range(c.depth):
            x = layers.TransformerBlock(c.num_heads, c.head_dim, c.mlp_dim, c.dropout, c.layer_norm_eps,
                                        name=f"layers_{i}")(x, None, deterministic)
        x = layers.LayerNorm(c.layer_norm_eps, name="out_norm")(x[:, -1])
        return layers.Dense(c.style_dim, ("embed", None), name="out")(x)


def style_norm_params(mean: Any, scale: Any) -> dict:
    """The ``style_norm`` component from statistics: mean (D,) and scale () float32, logically boxed
    (replicated) for the training loop; ``nn.meta.unbox`` gives plain arrays."""
    return {"mean": nn.LogicallyPartitioned(jnp.asarray(mean, jnp.float32), (None,)),
            "scale": nn.LogicallyPartitioned(jnp.asarray(scale, jnp.float32), ())}


def normalize_style(norm: dict, style: jax.Array) -> jax.Array:
    """Raw style (B, D) -> normalised ``(style - mean) / scale``."""
    return (style - norm["mean"]) / norm["scale"]


def denormalize_style(norm: dict, z: jax.Array) -> jax.Array:
    """Normalised style (B, D) -> raw ``z * scale + mean``."""
    return z * norm["scale"] + norm["mean"]


@dataclasses.dataclass(frozen=True)
class _PriorModel:
    """``(params, condition, x_t, t, keep) -> x0`` for ``diffusion.Guided`` (hashable via the config)."""
    config: StylePriorConfig

    def __call__(self, params, condition, x_t, t, keep):
        return DiffusionPrior(self.config).apply({"params": params}, x_t, t, condition, keep)


@functools.lru_cache(maxsize=None)
def guided_denoiser(config: StylePriorConfig) -> diffusion.Guided:
    """The classifier-free-guided denoiser of ``config``'s prior, for ``diffusion.ddpm_sample`` /
    ``ddim_sample``: called as ``denoiser((prior_params, condition (B, D), scale), x_t, t)``."""
    return diffusion.Guided(_PriorModel(config))


@functools.partial(jax.jit, static_argnames=("config", "method", "num_steps", "num_samples"))
def sample_style(config: StylePriorConfig, params: dict, text: jax.Array, rng: jax.Array, *,
                 method: str = "ddpm", num_steps: int | None = None, eta: float | jax.Array = 0.0,
                 guidance_scale: float | jax.Array = 3.5, num_samples: int = 1) -> jax.Array:
    """Instruction text embeddings -> style embeddings (raw style space), jit-compiled end to end.

    Args:
      config: the prior config (static).
      params: ``{'aligner', 'prior' (absent with no_diffusion), 'style_norm'}``.
      text: (B, text_dim) float32 sentence embeddings of the instructions (frozen text encoder).
      rng: PRNG key; the same key gives the same samples.
      method: 'ddpm' (all ``num_timesteps`` steps; the paper's) or 'ddim' (``num_steps`` steps, ``eta``).
      guidance_scale: classifier-free guidance scale s (paper 3.5; 1 = the conditional model).
      num_samples: K samples per instruction with independent noise.

    Returns:
      (B, K, style_dim) float32 style embeddings (with ``no_diffusion``: the aligner output, repeated).
    """
    aligned = InstructionAligner(config).apply({"params": params["aligner"]}, text)        # (B, D)
    b, d = aligned.shape
    if config.no_diffusion:
        z = jnp.broadcast_to(aligned[:, None, :], (b, num_samples, d))
    else:
        cond = jnp.repeat(aligned, num_samples, axis=0)                                   # (B*K, D)
        z = diffusion.sample(guided_denoiser(config), (params["prior"], cond, jnp.asarray(guidance_scale)),
                             rng, (b * num_samples, d), schedule=config.noise_schedule, method=method,
                             num_steps=num_steps, eta=eta).reshape(b, num_samples, d)
    norm = params["style_norm"]
    return denormalize_style(norm, z)


__all__ = ["CONDITIONS", "StylePriorConfig", "paper", "demo", "tiny", "timestep_embedding", "InstructionAligner",
           "DiffusionPrior", "style_norm_params", "normalize_style", "denormalize_style",
           "guided_denoiser", "sample_style"]
