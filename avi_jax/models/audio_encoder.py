"""HuBERT and Wav2Vec2 speech encoders (one conv feature encoder + transformer family).

Raw 16 kHz audio -> conv feature encoder (7 strided 1-D convs, 320x downsampling: 50 Hz frames, i.e. 2
frames per 25 fps video frame) -> feature projection -> convolutional relative positional embedding ->
transformer encoder. Reference implementations: transformers ``HubertModel`` and ``Wav2Vec2Model``
(Hsu et al. 2021, "HuBERT"; Baevski et al. 2020, "wav2vec 2.0"). The two families share every block;
they differ only in the feature projection (Wav2Vec2 always has a LayerNorm there, HuBERT has one when
``feat_proj_layer_norm``), which ``AudioEncoderConfig.feat_proj_layer_norm`` captures.

Parameter tree (Flax names; ``checkpoints/audio_encoder.py`` maps the HF keys onto them)::

  feature_extractor/conv_layers_{i}/conv/{kernel (k, in, out), bias?}
  feature_extractor/conv_layers_{i}/layer_norm/{scale, bias}   # layer 0 only for 'group' (a GroupNorm)
  feature_projection/layer_norm/{scale, bias}?, feature_projection/projection/{kernel, bias}
  encoder/pos_conv_embed/{weight_g (K, 1, 1), weight_v (K, H/G, H), bias (H,)}
  encoder/layer_norm/{scale, bias}
  encoder/layers_{l}/{attention/{query,key,value,out}, layer_norm, feed_forward/{intermediate_dense,
      output_dense}, final_layer_norm}

Weight norm of the positional conv: HF wraps the conv in ``torch.nn.utils.parametrizations.weight_norm``
with ``dim=2`` (one magnitude per kernel tap). We keep both parameters, ``weight_g`` (magnitude) and
``weight_v`` (direction), and form the kernel ``w = g * v / ||v||`` (norm over the in/out channel axes)
inside the module, so fine-tuning follows the same parametrisation as PyTorch.

Padding: with an ``attention_mask`` a clip's valid frames do not depend on its right padding or its
batch mates (a file's outputs must not depend on its batch): the group-norm conv layer takes masked
statistics, unlike transformers, whose GroupNorm normalises over the padded length (see
``AudioEncoder.__call__``).

Not implemented (eval-time no-ops): SpecAugment time/feature masking, LayerDrop, and dropout on the
attention probabilities (``attention_dropout``; ``layers.dot_product_attention`` has no dropout).
Hidden/activation/feature-projection dropouts apply when ``deterministic=False``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers

Dtype = Any

_TORCH_NORM_EPS = 1e-5   # torch nn.LayerNorm / nn.GroupNorm default, used by the conv feature encoder


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """Hyper-parameters of a HuBERT / Wav2Vec2 encoder (field names follow ``HubertConfig``).

    Attributes:
      model_type: 'hubert' or 'wav2vec2' (selects the HF key prefix and the feature projection).
      hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer sizes.
      hidden_act: feed-forward activation (HF name, see ``layers.activation``).
      layer_norm_eps: epsilon of the transformer and feature-projection LayerNorms.
      feat_extract_norm: 'group' (GroupNorm with one group per channel on the first conv layer only) or
        'layer' (LayerNorm over channels after every conv layer).
      feat_extract_activation: activation of the conv feature encoder.
      conv_dim, conv_kernel, conv_stride: per conv layer output channels, kernel and stride (samples).
      conv_bias: whether the feature-encoder convs have a bias.
      num_conv_pos_embeddings: kernel size K of the positional conv (even K drops the last output frame).
      num_conv_pos_embedding_groups: groups G of the positional conv.
      do_stable_layer_norm: True: pre-LN layers with a final LayerNorm (HuBERT/Wav2Vec2 large);
        False: post-LN layers with a LayerNorm before the first layer (base models).
      feat_proj_layer_norm: LayerNorm on the conv features before the projection.
      hidden_dropout, activation_dropout, attention_dropout, feat_proj_dropout: dropout rates, used only
        when the module is called with ``deterministic=False`` (``attention_dropout`` is not applied).
      do_normalize: normalise each waveform to zero mean / unit variance over its real samples before
        the conv encoder, as the checkpoint's ``Wav2Vec2FeatureExtractor`` does (``do_normalize`` of
        ``preprocessor_config.json``; True for hubert-large-ll60k and wav2vec2-base-960h). Not a field
        of the HF model config: :func:`avi_jax.checkpoints.audio_encoder.audio_config` reads it.
    """
    model_type: str = "hubert"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    feat_proj_layer_norm: bool = True
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    do_normalize: bool = False

    def __post_init__(self):
        for name in ("conv_dim", "conv_kernel", "conv_stride"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.model_type not in ("hubert", "wav2vec2"):
            raise ConfigError(f"model_type={self.model_type!r}: expected 'hubert' or 'wav2vec2'")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ConfigError(f"feat_extract_norm={self.feat_extract_norm!r}: expected 'group' or 'layer'")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) > 0):
            raise ConfigError(
                f"conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride "
                f"{self.conv_stride} must be non-empty and of equal length")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                              f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
        if self.model_type == "wav2vec2" and not self.feat_proj_layer_norm:
            raise ConfigError("wav2vec2 always has a feature-projection LayerNorm (feat_proj_layer_norm)")
        layers.activation(self.hidden_act)
        layers.activation(self.feat_extract_activation)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def downsample(self) -> int:
        """Samples per output frame (product of the conv strides; 320 = 20 ms at 16 kHz)."""
        return int(np.prod(self.conv_stride))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, cfg: dict, preprocessor: dict | None = None) -> AudioEncoderConfig:
        """Build from a Hugging Face ``HubertConfig`` / ``Wav2Vec2Config`` dict (``config.json``) and
        optionally its feature extractor's dict (``preprocessor_config.json``, for ``do_normalize``).

        Missing fields take the transformers defaults. Raises ``ConfigError`` for another
        ``model_type`` or for features this implementation does not have (adapters, batch-norm
        positional conv).
        """
        model_type = cfg.get("model_type")
        if model_type not in ("hubert", "wav2vec2"):
            raise ConfigError(f"config.json model_type={model_type!r}: expected 'hubert' or 'wav2vec2'")
        if cfg.get("conv_pos_batch_norm", False):
            raise ConfigError("conv_pos_batch_norm=True (batch-norm positional conv) is not supported")
        if cfg.get("add_adapter", False):
            raise ConfigError("add_adapter=True (Wav2Vec2 output adapter) is not supported")
        if cfg.get("adapter_attn_dim") is not None:
            raise ConfigError("adapter_attn_dim (attention adapters) is not supported")
        default = cls()
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in ("model_type", "do_normalize"):
                continue
            kwargs[field.name] = cfg.get(field.name, getattr(default, field.name))
        kwargs["do_normalize"] = bool((preprocessor or {}).get("do_normalize", False))
        if model_type == "wav2vec2":
            kwargs["feat_proj_layer_norm"] = True
        n = cfg.get("num_feat_extract_layers")
        if n is not None and n != len(kwargs["conv_dim"]):
            raise ConfigError(
                f"num_feat_extract_layers={n} but conv_dim has {len(kwargs['conv_dim'])} entries")
        return cls(model_type=model_type, **kwargs)

    def to_hf(self) -> dict:
        """The matching Hugging Face config dict (``HubertConfig(**d)`` / ``Wav2Vec2Config(**d)``)."""
        d = dataclasses.asdict(self)
        d["conv_dim"], d["conv_kernel"], d["conv_stride"] = (
            list(self.conv_dim), list(self.conv_kernel), list(self.conv_stride))
        d["num_feat_extract_layers"] = len(self.conv_dim)
        del d["do_normalize"]        # a feature-extractor setting, not a model-config field
        if self.model_type == "wav2vec2":
            del d["feat_proj_layer_norm"]
        return d

    @classmethod
    def hubert_large(cls, **overrides: Any) -> AudioEncoderConfig:
        """HuBERT-large (facebook/hubert-large-ll60k, -ls960-ft): 24 x 1024, layer-norm conv encoder."""
        return cls(**{**dict(
            model_type="hubert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, feat_extract_norm="layer", conv_bias=True,
            do_stable_layer_norm=True, feat_proj_layer_norm=True), **overrides})

    @classmethod
    def hubert_base(cls, **overrides: Any) -> AudioEncoderConfig:
        """HuBERT-base (facebook/hubert-base-ls960): 12 x 768, group-norm conv encoder, post-LN."""
        return cls(**{**dict(model_type="hubert"), **overrides})

    @classmethod
    def wav2vec2_base(cls, **overrides: Any) -> AudioEncoderConfig:
        """Wav2Vec2-base (facebook/wav2vec2-base-960h): 12 x 768, group-norm conv encoder, post-LN."""
        return cls(**{**dict(model_type="wav2vec2"), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> AudioEncoderConfig:
        """A tiny random-init config for tests and the demo; keeps the real strides (50 Hz frames)."""
        return cls(**{**dict(
            model_type="hubert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4), **overrides})


def feature_lengths(config: AudioEncoderConfig, num_samples: Any) -> Any:
    """Number of encoder frames for ``num_samples`` input samples (the conv output-length formula).

    ``L <- floor((L - kernel) / stride) + 1`` per conv layer, as transformers
    ``_get_feat_extract_output_lengths``, clamped at 0. Works on Python ints (returns an int) and on
    integer numpy / JAX arrays of any shape (returns the same kind). 16 kHz audio gives ~50 frames/s:
    ``feature_lengths(cfg, 16000) == 49``.
    """
    length = num_samples
    for k, s in zip(config.conv_kernel, config.conv_stride):
        length = (length - k) // s + 1
    if isinstance(length, (int, np.integer)):
        return max(int(length), 0)
    if isinstance(length, np.ndarray):
        return np.maximum(length, 0)
    return jnp.maximum(length, 0)


def normalize_waveform(input_values: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Zero-mean, unit-variance waveforms over their real samples; padded samples set to 0.

    ``(x - mean) / sqrt(var + 1e-7)`` per row (population variance over the first ``sum(mask)``
    samples), as transformers ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``.

    Args:
      input_values: (B, N) float waveforms.   attention_mask: optional (B, N), 1 at real samples.
    Returns:
      (B, N) float32.
    """
    x = input_values.astype(jnp.float32)
    m = (jnp.ones_like(x) if attention_mask is None else attention_mask.astype(jnp.float32))
    n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    mean = jnp.sum(x * m, axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.square(x - mean) * m, axis=-1, keepdims=True) / n
    return (x - mean) * jax.lax.rsqrt(var + 1e-7) * m


def receptive_field(config: AudioEncoderConfig) -> int:
    """Samples needed for one output frame (400 = 25 ms for the standard conv stack)."""
    field = 1
    for k, s in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        field = (field - 1) * s + k
    return field


@flax.struct.dataclass
class AudioEncoderOutput:
    """Encoder outputs.

    Attributes:
      last_hidden_state: (B, T, H) in the module dtype.
      hidden_states: None, or a tuple of L + 1 arrays (B, T, H) as transformers 5 returns them: the
        input of the first layer, then each layer's output (for ``do_stable_layer_norm`` the last one is
        before the final LayerNorm, i.e. differs from ``last_hidden_state``).
      feature_mask: (B, T) bool, True at frames computed from real (unpadded) samples.
    """
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None
    feature_mask: jax.Array


def _conv_kernel_init(fan_in_axes: Sequence[int] = (0, 1)):
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=fan_in_axes, out_axis=-1)


class _ChannelGroupNorm(nn.Module):
    """``torch.nn.GroupNorm(C, C)`` on (B, T, C): each channel normalised over time (biased variance).

    With ``valid`` (B, T) bool the mean and variance of each example are taken over its valid frames
    only (frames computed from real samples), so right padding does not change the statistics: the
    valid frames come out exactly as for the unpadded clip alone. Without it (or with an all-True
    ``valid``) this is torch's GroupNorm over the whole time axis. Transformers' GroupNorm layer has no
    mask and normalises over the padded length; see :class:`AudioEncoder` for this deliberate deviation.
    """
    eps: float = _TORCH_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
        scale = self.param("scale", ones, (c,))
        bias = self.param("bias", zeros, (c,))
        xf = x.astype(jnp.float32)
        if valid is None:
            mean = xf.mean(axis=1, keepdims=True)
            var = jnp.square(xf - mean).mean(axis=1, keepdims=True)
        else:
            m = valid[:, :, None]
            n = jnp.maximum(jnp.sum(m, axis=1, keepdims=True, dtype=jnp.float32), 1.0)
            mean = jnp.sum(jnp.where(m, xf, 0.0), axis=1, keepdims=True) / n
            var = jnp.sum(jnp.where(m, jnp.square(xf - mean), 0.0), axis=1, keepdims=True) / n
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


class _ConvLayer(nn.Module):
    """One feature-encoder layer: VALID strided conv -> optional Group/LayerNorm -> activation.

    ``HubertGroupNormConvLayer`` / ``HubertLayerNormConvLayer`` / ``HubertNoLayerNormConvLayer``.
    """
    features: int
    kernel_size: int
    stride: int
    use_bias: bool
    norm: str | None   # 'group', 'layer' or None
    act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """(B, N, C_in) -> (B, T, features); ``valid`` (B, T) bool: output frames computed from real
        samples only (used by the GroupNorm's statistics)."""
        x = nn.Conv(
            self.features, (self.kernel_size,), strides=(self.stride,), padding="VALID",
            use_bias=self.use_bias, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(_conv_kernel_init(), ("conv", None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="conv")(x)
        if self.norm == "group":
            x = _ChannelGroupNorm(name="layer_norm")(x, valid)
        elif self.norm == "layer":
            x = layers.LayerNorm(_TORCH_NORM_EPS, dtype=self.dtype, name="layer_norm")(x)
        return layers.activation(self.act)(x)


class FeatureEncoder(nn.Module):
    """Strided conv stack on the waveform (``HubertFeatureEncoder``).

    (B, N) float samples -> (B, T, conv_dim[-1]) with ``T = feature_lengths(config, N)``.

    ``num_samples`` (B,) int, optional: real (unpadded) samples per row. Each layer's VALID conv reads
    only earlier frames, and its frame ``t`` is computed from real samples iff
    ``t < (L - kernel) // stride + 1`` for the ``L`` real input frames, so the real frames of every
    layer never read a padded one; only the first layer's GroupNorm (``feat_extract_norm='group'``)
    mixes frames, and it takes its statistics over the real frames only. Frames past the real ones
    are left as computed (the caller masks them).
    """
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array, num_samples: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        x = input_values[..., None].astype(self.dtype)      # (B, N, 1): NWC
        lengths = num_samples
        for i, (dim, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            if cfg.feat_extract_norm == "layer":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            valid = None
            if lengths is not None:
                lengths = jnp.maximum((lengths - k) // s + 1, 0)
                t = (x.shape[1] - k) // s + 1
                valid = jnp.arange(t)[None, :] < lengths[:, None]
            x = _ConvLayer(dim, k, s, cfg.conv_bias, norm, cfg.feat_extract_activation,
                           dtype=self.dtype, name=f"conv_layers_{i}")(x, valid)
        return x


class FeatureProjection(nn.Module):
    """Optional LayerNorm, then Linear conv_dim[-1] -> hidden_size, then dropout."""
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        if cfg.feat_proj_layer_norm:
            x = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        x = layers.Dense(cfg.hidden_size, (None, "embed"), dtype=self.dtype, name="projection")(x)
        return nn.Dropout(cfg.feat_proj_dropout)(x, deterministic=deterministic)


class PositionalConvEmbedding(nn.Module):
    """Grouped, weight-normalised conv over time (``HubertPositionalConvEmbedding``).

    (B, T, H) -> (B, T, H): conv with kernel K, G groups and 'same' padding (for even K the last output
    frame is dropped, HF ``SamePadLayer``), then ``feat_extract_activation``. The kernel is
    ``weight_g * weight_v / ||weight_v||`` with the norm over the (in, out) channel axes per tap, i.e.
    ``torch.nn.utils.parametrizations.weight_norm(conv, dim=2)``.
    """
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        k, g, h = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.hidden_size
        v = self.param("weight_v", nn.with_logical_partitioning(
            _conv_kernel_init(), ("conv", None, "embed")), (k, h // g, h))
        g_param = self.param("weight_g", nn.with_logical_partitioning(
            lambda rng, shape: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True)),
            ("conv", None, None)), (k, 1, 1))
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("embed",)), (h,))
        norm = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=(1, 2), keepdims=True))
        kernel = (g_param.astype(jnp.float32) * v.astype(jnp.float32) / norm).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, window_strides=(1,), padding=[(k // 2, (k - 1) // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=g)
        y = y + bias.astype(self.dtype)
        return layers.activation(cfg.feat_extract_activation)(y)


class FeedForward(nn.Module):
    """Linear H -> intermediate, activation, dropout, Linear -> H, dropout (``HubertFeedForward``)."""
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        x = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                         name="intermediate_dense")(x)
        x = layers.activation(cfg.hidden_act)(x)
        x = nn.Dropout(cfg.activation_dropout)(x, deterministic=deterministic)
        x = layers.Dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="output_dense")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
    """Transformer layer: post-LN (``HubertEncoderLayer``) or pre-LN (``...StableLayerNorm``)."""
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        attention = layers.MultiHeadAttention(cfg.num_attention_heads, cfg.head_dim, dtype=self.dtype,
                                              name="attention")
        layer_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")
        final_layer_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")
        feed_forward = FeedForward(cfg, dtype=self.dtype, name="feed_forward")
        dropout = nn.Dropout(cfg.hidden_dropout)
        if cfg.do_stable_layer_norm:
            h = attention(layer_norm(x), mask=mask, deterministic=deterministic)
            x = x + dropout(h, deterministic=deterministic)
            return x + feed_forward(final_layer_norm(x), deterministic=deterministic)
        h = attention(x, mask=mask, deterministic=deterministic)
        x = layer_norm(x + dropout(h, deterministic=deterministic))
        return final_layer_norm(x + feed_forward(x, deterministic=deterministic))


class Encoder(nn.Module):
    """Positional conv embedding + transformer layers (``HubertEncoder`` / ``...StableLayerNorm``).

    Returns (last_hidden_state, hidden_states tuple of L + 1 arrays).
    """
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None, deterministic: bool = True
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        cfg = self.config
        mask = None
        if valid is not None:
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))   # HF zeroes padded frames
            mask = layers.key_padding_mask(valid)
        x = x + PositionalConvEmbedding(cfg, dtype=self.dtype, name="pos_conv_embed")(x)
        layer_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")
        if not cfg.do_stable_layer_norm:
            x = layer_norm(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
        hidden_states = [x]
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, dtype=self.dtype, name=f"layers_{i}")(x, mask, deterministic)
            hidden_states.append(x)
        if cfg.do_stable_layer_norm:
            x = layer_norm(x)
        return x, tuple(hidden_states)


class AudioEncoder(nn.Module):
    """HuBERT / Wav2Vec2 encoder, numerically equal to transformers ``HubertModel`` / ``Wav2Vec2Model``.

    Attributes:
      config: ``AudioEncoderConfig``.
      dtype: computation dtype (params stay float32; LayerNorm statistics and softmax run in float32).
      remat: rematerialise each transformer layer in the backward pass (saves activation memory).
    """
    config: AudioEncoderConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True, output_hidden_states: bool = False) -> AudioEncoderOutput:
        """Encode a batch of waveforms.

        Args:
          input_values: (B, N) float, 16 kHz mono samples in [-1, 1]; with ``config.do_normalize`` they
            are normalised here (:func:`normalize_waveform`), as the checkpoint's feature extractor does.
          attention_mask: optional (B, N) bool or int, 1 at real samples; right padding assumed (only
            the per-row count of real samples is used, as in HF). When given, a row's valid frames
            (``feature_mask``) equal those of its clip run alone without padding, whatever the batch
            and the padding hold: padded samples are zeroed (and left out of ``do_normalize``'s
            statistics), the group-norm conv layer takes its statistics over the real frames only,
            frames past the real ones are zeroed before the positional conv (as the unpadded clip's
            'same' zero padding sees them) and masked as attention keys.

            Deliberate deviation from transformers for ``feat_extract_norm='group'`` (HuBERT-base,
            Wav2Vec2-base): HF's first-layer GroupNorm has no mask and normalises over the whole padded
            length, so there a padded clip's features depend on the padding (HF's docs say to feed such
            models unpadded, without attention mask). We make padding harmless instead: with a mask our
            outputs match HF run on each clip unpadded; without a mask (or with no padding) they match
            HF exactly. The layer-norm conv variant matches HF with or without padding.
          deterministic: False enables dropout (needs a 'dropout' rng).
          output_hidden_states: also return the L + 1 per-layer hidden states.

        Returns:
          ``AudioEncoderOutput`` with T = ``feature_lengths(config, N)`` frames (50 Hz for the
          standard strides).

        Raises:
          InputError: input not 2-D, shorter than ``receptive_field(config)`` samples, or a mask of
            another shape.
        """
        cfg = self.config
        if input_values.ndim != 2:
            raise InputError(f"input_values must be (batch, samples), got shape {input_values.shape}")
        if feature_lengths(cfg, input_values.shape[1]) < 1:
            raise InputError(
                f"input of {input_values.shape[1]} samples is shorter than the encoder's receptive field "
                f"({receptive_field(cfg)} samples, {receptive_field(cfg) / 16:.0f} ms at 16 kHz)")
        if attention_mask is not None and attention_mask.shape != input_values.shape:
            raise InputError(f"attention_mask shape {attention_mask.shape} differs from input_values "
                             f"shape {input_values.shape}")
        num_samples = None
        if attention_mask is not None:
            num_samples = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
            real = jnp.arange(input_values.shape[1])[None, :] < num_samples[:, None]
            input_values = jnp.where(real, input_values, jnp.zeros((), input_values.dtype))
            attention_mask = real
        if cfg.do_normalize:
            input_values = normalize_waveform(input_values, attention_mask)
        features = FeatureEncoder(cfg, dtype=self.dtype, name="feature_extractor")(
            input_values, num_samples)
        b, t = features.shape[:2]
        if attention_mask is not None:
            lengths = feature_lengths(cfg, num_samples)
            valid = jnp.arange(t)[None, :] < lengths[:, None]
        else:
            valid = None
        x = FeatureProjection(cfg, dtype=self.dtype, name="feature_projection")(
            features, deterministic=deterministic)
        last, hidden_states = Encoder(cfg, dtype=self.dtype, remat=self.remat, name="encoder")(
            x, valid, deterministic=deterministic)
        feature_mask = valid if valid is not None else jnp.ones((b, t), bool)
        return AudioEncoderOutput(
            last_hidden_state=last,
            hidden_states=hidden_states if output_hidden_states else None,
            feature_mask=feature_mask)

    def features(self, input_values: jax.Array, attention_mask: jax.Array, feature_layer: int = -1
                 ) -> tuple[jax.Array, jax.Array]:
        """The speech features a downstream model reads: hidden state ``feature_layer`` (-1 = the last; k =
        the output of layer k, 0 = the transformer input) (B, T, H) at 50 Hz, zero at padded frames, and
        the frame mask (B, T) bool. Frozen use (deterministic). Used by the stage-1 instructor (HuBERT ->
        Q-Former) and the motion prior (Wav2Vec2 -> content encoder)."""
        out = self(input_values, attention_mask.astype(bool), deterministic=True,
                   output_hidden_states=feature_layer != -1)
        feats = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
        return jnp.where(out.feature_mask[..., None], feats, 0.0), out.feature_mask
