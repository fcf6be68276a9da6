"""SyncNet: the audio-visual synchronisation network used for the LSE-D / LSE-C lip-sync metrics.

Chung & Zisserman, "Out of time: automated lip sync in the wild" (ACCV 2016 workshops), as released in
syncnet_python (``SyncNetModel.py``, class ``S``, weights ``syncnet_v2.model``). Two streams map a short
window of audio and of video to embeddings in one 1024-d space, where the Euclidean distance is small
when the lips match the sound:

- audio: (N, 13, 20) MFCC windows (13 coefficients x 20 frames at 100 Hz = 0.2 s) -> 2-D conv stack
  ``netcnnaud`` -> (N, 512) -> MLP ``netfcaud`` -> (N, 1024);
- lips: (N, 5, 224, 224, 3) windows of 5 video frames (0.2 s at 25 fps) -> 3-D conv stack ``netcnnlip``
  (the first conv spans all 5 frames) -> (N, 512) -> MLP ``netfclip`` -> (N, 1024).

Layers follow the reference one for one, in the reference's order, so parameter ``<stack>/layers_<i>``
is the reference's ``<stack>.<i>`` (see ``avi_jax/checkpoints/syncnet.py``). BatchNorm runs in inference
mode (running statistics in the ``batch_stats`` collection, eps 1e-5), as ``SyncNetInstance`` evaluates
with ``S.eval()``. Max pooling pads with -inf like PyTorch's. Layout is channels-last (Flax), which is the
reference's NCHW / NCDHW transposed; results are identical.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avi_jax.errors import InputError
from avi_jax.models import layers

Dtype = Any

# Layer specs of the reference's nn.Sequential stacks, index for index:
# ("conv", features, kernel, stride, padding), ("bn",), ("relu",), ("pool", window, stride, padding).
AUDIO_CNN: tuple[tuple, ...] = (
    ("conv", 64, (3, 3), (1, 1), (1, 1)), ("bn",), ("relu",), ("pool", (1, 1), (1, 1), (0, 0)),
    ("conv", 192, (3, 3), (1, 1), (1, 1)), ("bn",), ("relu",), ("pool", (3, 3), (1, 2), (0, 0)),
    ("conv", 384, (3, 3), (1, 1), (1, 1)), ("bn",), ("relu",),
    ("conv", 256, (3, 3), (1, 1), (1, 1)), ("bn",), ("relu",),
    ("conv", 256, (3, 3), (1, 1), (1, 1)), ("bn",), ("relu",), ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 512, (5, 4), (1, 1), (0, 0)), ("bn",), ("relu",),
)
LIP_CNN: tuple[tuple, ...] = (
    ("conv", 96, (5, 7, 7), (1, 2, 2), (0, 0, 0)), ("bn",), ("relu",), ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("bn",), ("relu",),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("conv", 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn",), ("relu",),
    ("conv", 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn",), ("relu",),
    ("conv", 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn",), ("relu",), ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 512, (1, 6, 6), (1, 1, 1), (0, 0, 0)), ("bn",), ("relu",),
)
# netfcaud / netfclip: Linear(512, 512), BatchNorm1d(512), ReLU, Linear(512, embed_dim).
FC_HIDDEN = 512

MFCC_COEFFICIENTS = 13      # rows of an audio window (python_speech_features.mfcc's numcep)
AUDIO_WINDOW = 20           # MFCC frames (100 Hz) per window: 0.2 s
VIDEO_WINDOW = 5            # video frames (25 fps) per window: 0.2 s
CROP_SIZE = 224             # pixels, square face crop
BN_EPS = 1e-5               # torch.nn.BatchNorm default


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=True, axis=-1, epsilon=BN_EPS,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name)


class ConvStack(nn.Module):
    """A reference ``nn.Sequential`` of convs, BatchNorms, ReLUs and max pools (channels-last).

    Attributes:
      spec: layer specs (``AUDIO_CNN`` or ``LIP_CNN``); layer ``i`` is named ``layers_<i>``.
    """
    spec: Sequence[tuple]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (kind, *args) in enumerate(self.spec):
            if kind == "conv":
                features, kernel, stride, padding = args
                x = nn.Conv(
                    features, kernel, strides=stride, padding=[(p, p) for p in padding], dtype=self.dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("conv",) * len(kernel) + (None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                    name=f"layers_{i}")(x)
            elif kind == "bn":
                x = _batch_norm(f"layers_{i}")(x)
            elif kind == "relu":
                x = nn.relu(x)
            else:
                window, stride, padding = args
                x = nn.max_pool(x, window, strides=stride, padding=[(p, p) for p in padding])
        return x


class Head(nn.Module):
    """``netfcaud`` / ``netfclip``: Linear -> BatchNorm1d -> ReLU -> Linear; layers named as their
    reference indices (``layers_0``, ``layers_1``, ``layers_3``)."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.Dense(FC_HIDDEN, ("embed", "mlp"), dtype=self.dtype, name="layers_0")(x)
        x = nn.relu(_batch_norm("layers_1")(x))
        return layers.Dense(self.features, ("mlp", "embed"), dtype=self.dtype, name="layers_3")(x)


class SyncNet(nn.Module):
    """syncnet_python's ``S``: audio and lip embedding networks (inference mode).

    Attributes:
      embed_dim: embedding width (``num_layers_in_fc_layers``; 1024 for ``syncnet_v2.model``).

    Use ``apply(variables, mfcc, method=SyncNet.embed_audio)`` / ``method=SyncNet.embed_lips``;
    ``variables`` holds ``params`` and ``batch_stats``. ``__call__`` embeds both.
    """
    embed_dim: int = 1024
    dtype: Dtype = jnp.float32

    def setup(self):
        self.audio_cnn = ConvStack(AUDIO_CNN, self.dtype)
        self.audio_fc = Head(self.embed_dim, self.dtype)
        self.lip_cnn = ConvStack(LIP_CNN, self.dtype)
        self.lip_fc = Head(self.embed_dim, self.dtype)

    def embed_audio(self, mfcc: jax.Array) -> jax.Array:
        """(N, 13, 20) float MFCC windows (python_speech_features scale, coefficient x frame) ->
        (N, embed_dim) float32 (``S.forward_aud``)."""
        if mfcc.shape[1:] != (MFCC_COEFFICIENTS, AUDIO_WINDOW):
            raise InputError(f"SyncNet audio windows must be (N, {MFCC_COEFFICIENTS}, {AUDIO_WINDOW}), "
                             f"got {mfcc.shape}")
        x = self.audio_cnn(jnp.asarray(mfcc, self.dtype)[..., None])
        return self.audio_fc(x.reshape(x.shape[0], -1)).astype(jnp.float32)

    def embed_lips(self, frames: jax.Array) -> jax.Array:
        """(N, 5, 224, 224, 3) float face-crop windows, pixel values 0..255 in BGR channel order (cv2's,
        unnormalised, as ``SyncNetInstance.evaluate`` feeds them) -> (N, embed_dim) float32
        (``S.forward_lip``)."""
        if frames.shape[1:] != (VIDEO_WINDOW, CROP_SIZE, CROP_SIZE, 3):
            raise InputError(f"SyncNet lip windows must be (N, {VIDEO_WINDOW}, {CROP_SIZE}, {CROP_SIZE}, 3), "
                             f"got {frames.shape}")
        x = self.lip_cnn(jnp.asarray(frames, self.dtype))
        return self.lip_fc(x.reshape(x.shape[0], -1)).astype(jnp.float32)

    def __call__(self, mfcc: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Both embeddings: ``(embed_audio(mfcc), embed_lips(frames))``."""
        return self.embed_audio(mfcc), self.embed_lips(frames)


__all__ = ["SyncNet", "ConvStack", "Head", "AUDIO_CNN", "LIP_CNN", "MFCC_COEFFICIENTS", "AUDIO_WINDOW",
           "VIDEO_WINDOW", "CROP_SIZE"]
