"""Stage 2a of AVI-Talking: the disentangled motion prior (paper Sec. III-D, Fig. 3).

speech (16 kHz) -> Wav2Vec2 (frozen by default) -> features (50 Hz) -> ``ContentEncoder``: pairs of
frames merged to 25 fps (reshape (B, F, 2H) + Dense) -> residual temporal convolutions -> speech-content
features (B, F, D_c).

reference motion (B, S, 53) + mask -> ``StyleEncoder`` (StyleTalk-style: Dense -> sinusoidal positions ->
3 pre-LN transformer layers, d 256, 8 heads, key padding mask -> attention pooling over valid frames ->
Dense) -> style embedding (B, 128).

content + style -> ``TalkingGenerator`` (non-causal transformer, d 256; the projected style embedding is
added to every frame token) -> motion (B, F, 53) = 50 FLAME expression + 3 jaw pose (radians), 25 fps.

Normalisation: the ``normalizer`` component holds the training-set mean and standard deviation of the
53-d motion (set by the training stage from data, frozen, exported with the other parameters). The style
encoder reads normalised motion; the generator predicts normalised motion (its output layer is
zero-initialised, so an untrained model predicts the mean motion).

Masked reference frames have no effect: they are zeroed before the input projection, are never attended
to as keys, and get zero pooling weight, so ``StyleEncoder`` output is *exactly* independent of their
values (``tests/test_motion.py`` checks it). The training stage uses this to keep the frames being
predicted out of the style encoder (see ``avi_jax.training.motion.split_target``).

Style distillation (paper Sec. IV-A-2: "leverage the linear styling network from EMOTE as a teacher network
for knowledge distillation"): with ``style_teacher`` the model also holds ``StylingTeacher``, EMOTE's linear
styling network (one-hot emotion ++ one-hot intensity -> Dense -> style embedding), whose embedding the
style encoder's is pulled towards (``avi_jax.training.motion``).

Parameters are a dict of components ``audio_encoder``, ``content_encoder``, ``style_encoder``,
``generator``, ``normalizer`` (and ``style_teacher``); the authors' released stage-2 code is
StyleTalk/EMOTE-like and is the model for the layout (our own implementation).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avi_jax.errors import ConfigError, InputError
from avi_jax.models import layers
from avi_jax.models.audio_encoder import AudioEncoder, AudioEncoderConfig

# The motion vector per 25 fps frame of 16 kHz speech: the clip records' layout (``avi_jax.data.schema``,
# which models do not import; tests/test_motion.py checks that the two agree).
N_EXPRESSION = 50                  # FLAME expression coefficients
N_JAW = 3                          # jaw pose, axis-angle (radians)
MOTION_DIM = N_EXPRESSION + N_JAW  # 53
JAW_OPEN = N_EXPRESSION            # index of jaw_pose[..., 0] (opening) in the motion vector
SAMPLES_PER_FRAME = 640            # 16 kHz audio samples per 25 fps frame


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """Hyper-parameters of the motion prior.

    Attributes:
      audio: the Wav2Vec2 (or HuBERT) config; its features are 50 Hz (2 per 25 fps frame).
      feature_layer: which audio hidden state feeds the content encoder (-1 = last; k = output of layer k,
        0 = the transformer input).
      motion_dim: 53 (50 expression + 3 jaw).
      content_dim, content_conv_layers, content_kernel: content encoder width, number of residual
        temporal conv blocks and their kernel size (frames).
      style_dim, style_layers, style_heads, style_mlp: style transformer (StyleTalk: 256, 3, 8, 1024).
      style_embed_dim: the style embedding width (128, the style space of stage 2b).
      max_style_frames: the most reference frames S the style encoder accepts (256).
      gen_dim, gen_layers, gen_heads, gen_mlp: talking generator transformer.
      dropout: dropout rate in the trainable transformers and conv blocks (train mode only).
      style_teacher: add the ``StylingTeacher`` component (style distillation).
      num_emotions, num_intensities: the teacher's one-hot sizes (the records' emotion indices 0..8 and
        intensity levels 0 (unknown)..3; ``avi_jax.data.schema``).
    """
    audio: AudioEncoderConfig
    feature_layer: int = -1
    motion_dim: int = MOTION_DIM
    content_dim: int = 256
    content_conv_layers: int = 2
    content_kernel: int = 5
    style_dim: int = 256
    style_layers: int = 3
    style_heads: int = 8
    style_mlp: int = 1024
    style_embed_dim: int = 128
    max_style_frames: int = 256
    gen_dim: int = 256
    gen_layers: int = 6
    gen_heads: int = 8
    gen_mlp: int = 1024
    dropout: float = 0.1
    style_teacher: bool = False
    num_emotions: int = 9
    num_intensities: int = 4

    def __post_init__(self):
        for name, dim, heads in (("style", self.style_dim, self.style_heads),
                                 ("gen", self.gen_dim, self.gen_heads)):
            if dim % heads:
                raise ConfigError(f"{name}_dim {dim} is not a multiple of {name}_heads {heads}")
        if self.content_kernel < 1 or self.content_kernel % 2 == 0:
            raise ConfigError(f"content_kernel must be odd and >= 1, got {self.content_kernel}")
        if self.audio.downsample * 2 != SAMPLES_PER_FRAME:
            raise ConfigError(
                f"the audio encoder gives one feature per {self.audio.downsample} samples; the content "
                f"encoder needs 2 per 25 fps frame (one per {SAMPLES_PER_FRAME // 2} samples)")

    @classmethod
    def paper(cls, audio: AudioEncoderConfig | None = None, **overrides: Any) -> MotionConfig:
        """Paper scale: Wav2Vec2-base, StyleTalk style encoder (3 x 256, 8 heads), 6 x 256 generator."""
        return cls(audio=audio or AudioEncoderConfig.wav2vec2_base(), **overrides)

    @classmethod
    def demo(cls, audio: AudioEncoderConfig | None = None, **overrides: Any) -> MotionConfig:
        """CPU demo scale (a tiny random Wav2Vec2 unless ``audio`` is given)."""
        return cls(**{**dict(
            audio=audio or AudioEncoderConfig.tiny(model_type="wav2vec2"), content_dim=64,
            style_dim=64, style_layers=2, style_heads=4, style_mlp=128, style_embed_dim=32,
            gen_dim=64, gen_layers=2, gen_heads=4, gen_mlp=128, dropout=0.0), **overrides})

    @classmethod
    def tiny(cls, audio: AudioEncoderConfig | None = None, **overrides: Any) -> MotionConfig:
        """Toy size for tests."""
        return cls(**{**dict(
            audio=audio or AudioEncoderConfig.tiny(model_type="wav2vec2", hidden_size=16,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   conv_dim=(8,) * 7, num_conv_pos_embedding_groups=2),
            content_dim=16, content_conv_layers=1, content_kernel=3, style_dim=16, style_layers=1,
            style_heads=2, style_mlp=32, style_embed_dim=8, gen_dim=16, gen_layers=1, gen_heads=2,
            gen_mlp=32, dropout=0.0), **overrides})


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """(length, dim) float32 sinusoidal position encoding (Vaswani et al. 2017, Sec. 3.5): sin on the
    first half of the channels, cos on the second, wavelengths 2π .. 10000·2π."""
    half = dim // 2
    freq = np.exp(-np.log(10000.0) * np.arange(half) / max(half, 1))
    angle = np.arange(length)[:, None] * freq[None, :]
    pe = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
    if dim % 2:
        pe = np.concatenate([pe, np.zeros((length, 1))], axis=1)
    return jnp.asarray(pe, jnp.float32)


def frame_mask_from_audio(audio_mask: jax.Array, num_frames: int) -> jax.Array:
    """(B, N) bool sample mask -> (B, F) bool: frame f is real when sample ``640 f`` is (right padding)."""
    n = jnp.sum(audio_mask.astype(jnp.int32), axis=-1)
    return jnp.arange(num_frames)[None, :] * SAMPLES_PER_FRAME < n[:, None]


class ContentEncoder(nn.Module):
    """Speech-content features at 25 fps from 50 Hz audio features.

    (B, T, H) features + (B, F) frame mask -> (B, F, content_dim). Features are zero-padded (or cropped)
    to 2F, frames 2f and 2f+1 are concatenated (B, F, 2H) and projected, then ``content_conv_layers``
    residual blocks ``x + Dropout(GELU(Conv1D_k(LN(x))))``; padded frames are zeroed before each
    convolution so padding never leaks into real frames.
    """
    config: MotionConfig

    @nn.compact
    def __call__(self, features: jax.Array, frame_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        b, t, h = features.shape
        f = frame_mask.shape[1]
        if t < 2 * f:
            features = jnp.pad(features, ((0, 0), (0, 2 * f - t), (0, 0)))
        x = features[:, :2 * f].reshape(b, f, 2 * h)
        keep = frame_mask[..., None]
        x = layers.Dense(cfg.content_dim, (None, "embed"), name="merge")(x)
        for i in range(cfg.content_conv_layers):
            y = layers.LayerNorm(1e-5, name=f"conv_norm_{i}")(x)
            y = jnp.where(keep, y, 0.0)
            y = nn.Conv(cfg.content_dim, (cfg.content_kernel,), padding="SAME", name=f"conv_{i}",
                        kernel_init=nn.with_logical_partitioning(layers.default_kernel_init,
                                                                 ("conv", None, "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(y)
            y = nn.Dropout(cfg.dropout)(layers.activation("gelu")(y), deterministic=deterministic)
            x = x + y
        x = layers.LayerNorm(1e-5, name="out_norm")(x)
        return jnp.where(keep, x, 0.0)


class StyleEncoder(nn.Module):
    """StyleTalk-style encoder: reference motion -> style embedding (paper Sec. III-D, "content-irrelevant
    space"; StyleTalk, Ma et al. AAAI 2023, Sec. 3.2).

    Input: ``motion`` (B, S, motion_dim) float32 **normalised** motion and ``mask`` (B, S) bool (True =
    reference frame). Masked frames are zeroed, excluded as attention keys and from the pooling, so the
    output does not depend on them at all. A row with no reference frame gives a constant (meaningless)
    embedding. Output (B, style_embed_dim) float32.

    Raises ``InputError`` when S > ``max_style_frames``.
    """
    config: MotionConfig

    @nn.compact
    def __call__(self, motion: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        b, s, _ = motion.shape
        if s > cfg.max_style_frames:
            raise InputError(f"style reference has {s} frames; the style encoder takes at most "
                             f"{cfg.max_style_frames} (crop the reference clip)")
        mask = mask.astype(bool)
        x = jnp.where(mask[..., None], motion, 0.0)
        x = layers.Dense(cfg.style_dim, (None, "embed"), name="input")(x)
        x = x + sinusoidal_positions(s, cfg.style_dim)[None]
        attn_mask = layers.key_padding_mask(mask)
        for i in range(cfg.style_layers):
            x = layers.TransformerBlock(cfg.style_heads, cfg.style_dim // cfg.style_heads, cfg.style_mlp,
                                        cfg.dropout, name=f"layers_{i}")(x, attn_mask, deterministic)
        x = layers.LayerNorm(1e-5, name="norm")(x)
        # Attention pooling: softmax over the valid frames of a learned score.
        score = layers.Dense(1, ("embed", None), name="pool_score")(
            jnp.tanh(layers.Dense(cfg.style_dim, ("embed", "mlp"), name="pool_hidden")(x)))[..., 0]
        score = jnp.where(mask, score, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(score, axis=-1)
        weights = jnp.where(mask, weights, 0.0)
        pooled = jnp.einsum("bs,bsd->bd", weights, jnp.where(mask[..., None], x, 0.0))
        return layers.Dense(cfg.style_embed_dim, ("embed", None), name="out")(pooled)


class StylingTeacher(nn.Module):
    """EMOTE's linear styling network (Danecek et al., SIGGRAPH Asia 2023, Sec. 3.3: the style code is a
    linear layer over one-hot condition vectors) as the style encoder's teacher (paper Sec. IV-A-2):
    ``Dense(one_hot(emotion, num_emotions) ++ one_hot(intensity, num_intensities))`` -> (B,
    style_embed_dim) float32. ``emotion`` (B,) int (-1 = unknown gives an all-zero emotion part: such rows
    must be masked out by the caller), ``intensity`` (B,) int (0 = unknown)."""
    config: MotionConfig

    @nn.compact
    def __call__(self, emotion: jax.Array, intensity: jax.Array) -> jax.Array:
        cfg = self.config
        code = jnp.concatenate([jax.nn.one_hot(emotion, cfg.num_emotions, dtype=jnp.float32),
                                jax.nn.one_hot(intensity, cfg.num_intensities, dtype=jnp.float32)], -1)
        return layers.Dense(cfg.style_embed_dim, (None, "embed"), name="linear")(code)


class TalkingGenerator(nn.Module):
    """Content (B, F, content_dim) + style (B, style_embed_dim) + frame mask (B, F) -> normalised motion
    (B, F, motion_dim). Non-causal transformer over the frames; the style embedding, projected to the
    model width, is added to every frame token. Padded frames are masked as keys."""
    config: MotionConfig

    @nn.compact
    def __call__(self, content: jax.Array, style: jax.Array, frame_mask: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        f = content.shape[1]
        x = layers.Dense(cfg.gen_dim, (None, "embed"), name="content_in")(content)
        x = x + layers.Dense(cfg.gen_dim, (None, "embed"), name="style_in")(style)[:, None, :]
        x = x + sinusoidal_positions(f, cfg.gen_dim)[None]
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        attn_mask = layers.key_padding_mask(frame_mask)
        for i in range(cfg.gen_layers):
            x = layers.TransformerBlock(cfg.gen_heads, cfg.gen_dim // cfg.gen_heads, cfg.gen_mlp,
                                        cfg.dropout, name=f"layers_{i}")(x, attn_mask, deterministic)
        x = layers.LayerNorm(1e-5, name="norm")(x)
        return layers.Dense(cfg.motion_dim, ("embed", None), kernel_init=nn.initializers.zeros_init(),
                            name="out")(x)


class Normalizer(nn.Module):
    """Motion normalisation statistics: ``mean`` and ``scale`` (motion_dim,) float32 (training-set mean
    and standard deviation; placeholders 0 / 1 at init, the training stage sets them from data)."""
    motion_dim: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        mean = self.param("mean", nn.initializers.zeros_init(), (self.motion_dim,))
        scale = self.param("scale", nn.initializers.ones_init(), (self.motion_dim,))
        return mean, scale


class MotionPrior(nn.Module):
    """The stage-2a composite; see the module docstring for the data flow.

    Methods (all ``deterministic=True`` by default; False enables dropout and needs a 'dropout' rng):
      ``__call__(audio, audio_mask, ref_motion, ref_mask)`` -> motion (B, F, 53), raw units.
      ``content(audio, audio_mask)`` -> content (B, F, content_dim), frame_mask (B, F).
      ``style(ref_motion, ref_mask)`` -> (B, style_embed_dim).
      ``generate(content, frame_mask, style)`` -> motion (B, F, 53), raw units.
      ``teacher_style(emotion, intensity)`` -> (B, style_embed_dim) (with ``style_teacher``).
    """
    config: MotionConfig

    def setup(self):
        cfg = self.config
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.content_encoder = ContentEncoder(cfg)
        self.style_encoder = StyleEncoder(cfg)
        self.generator = TalkingGenerator(cfg)
        self.normalizer = Normalizer(cfg.motion_dim)
        if cfg.style_teacher:
            self.style_teacher = StylingTeacher(cfg)

    def audio_features(self, audio: jax.Array, audio_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, N) float32 16 kHz waveform + (B, N) bool -> features (B, T, H) at 50 Hz, mask (B, T).

        Each clip is normalised first when ``config.audio.do_normalize`` (the checkpoint's feature extractor).
        """
        return self.audio_encoder.features(audio, audio_mask, self.config.feature_layer)

    def content(self, audio: jax.Array, audio_mask: jax.Array, deterministic: bool = True
                ) -> tuple[jax.Array, jax.Array]:
        """Content features (B, F, content_dim) and frame mask (B, F) with F = N // 640 (25 fps).

        Raises ``InputError`` when N < 640 (no whole frame).
        """
        f = audio.shape[1] // SAMPLES_PER_FRAME
        if f < 1:
            raise InputError(f"audio of {audio.shape[1]} samples is shorter than one 25 fps frame "
                             f"({SAMPLES_PER_FRAME} samples)")
        # padded features are zero (``AudioEncoder.features``): a clip's frames equal those of the clip
        # alone, whose missing last feature (an odd feature count) the content encoder pads with zeros
        feats, _ = self.audio_features(audio, audio_mask)
        frame_mask = frame_mask_from_audio(audio_mask, f)
        return self.content_encoder(feats, frame_mask, deterministic), frame_mask

    def normalize(self, motion: jax.Array) -> jax.Array:
        mean, scale = self.normalizer()
        return (motion - mean) / scale

    def denormalize(self, motion: jax.Array) -> jax.Array:
        mean, scale = self.normalizer()
        return motion * scale + mean

    def style(self, ref_motion: jax.Array, ref_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Style embedding (B, style_embed_dim) of reference motion (B, S, 53) raw units, mask (B, S)."""
        return self.style_encoder(self.normalize(ref_motion), ref_mask, deterministic)

    def teacher_style(self, emotion: jax.Array, intensity: jax.Array) -> jax.Array:
        """The styling teacher's embedding (B, style_embed_dim) of labels (B,) (needs ``style_teacher``)."""
        return self.style_teacher(emotion, intensity)

    def generate(self, content: jax.Array, frame_mask: jax.Array, style: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """Motion (B, F, 53) in raw units (expression, jaw radians) from content + style embedding."""
        return self.denormalize(self.generator(content, style, frame_mask, deterministic))

    def __call__(self, audio: jax.Array, audio_mask: jax.Array, ref_motion: jax.Array,
                 ref_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Speech (B, N) + mask, reference motion (B, S, 53) + mask (B, S) -> motion (B, F, 53)."""
        content, frame_mask = self.content(audio, audio_mask, deterministic)
        return self.generate(content, frame_mask, self.style(ref_motion, ref_mask, deterministic),
                             deterministic)
