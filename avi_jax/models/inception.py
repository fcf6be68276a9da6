"""The FID InceptionV3: the network behind FID and KID, returning the 2048-d pool3 features.

This is the Inception of TensorFlow's original FID code (``inception-2015-12-05``) as pytorch-fid ports it
(``pytorch_fid/inception.py``: torchvision's ``Inception3`` with the blocks ``FIDInceptionA``, ``FIDInceptionC``,
``FIDInceptionE_1`` and ``FIDInceptionE_2``), so that the weights file ``pt_inception-2015-12-05-6726825d.pth``
loads by name (:mod:`avi_jax.checkpoints.inception`) and the features match the published FID numbers' features.
The differences from torchvision's ImageNet Inception, all kept here:

* the average pools inside the A, C and first E blocks exclude the zero padding from the mean
  (TensorFlow's ``count_include_pad=False``);
* the second E block (``Mixed_7c``) pools its branch with a 3x3 *max* pool (stride 1, padding 1);
* the input is resized to 299x299 with bilinear interpolation (half-pixel centres, no antialiasing: torch's
  ``F.interpolate(mode='bilinear', align_corners=False)``) and scaled from [0, 1] to [-1, 1];
* the output is the global average pool after ``Mixed_7c`` (pytorch-fid's block 3, "pool3"), no classifier.

Every convolution is torchvision's ``BasicConv2d``: conv without bias, BatchNorm (eps 1e-3, running
statistics in the ``batch_stats`` collection), ReLU. Layout is NHWC; module names follow the PyTorch state dict
(``Mixed_6b/branch7x7_2/conv``), so the converter is a name-for-name map. All parameters are small (24 M) and
replicated: kernels carry the logical axis ``conv`` (replicated by ``configs/common.py``'s rules).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (inference statistics) + ReLU; torchvision's ``BasicConv2d``.

    ``padding`` is (pad_h, pad_w), symmetric, as in ``nn.Conv2d(padding=...)``.
    """
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, strides=self.stride, use_bias=False, dtype=self.dtype,
                    padding=tuple((p, p) for p in self.padding),
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, None, "conv")),
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, the padding excluded from the mean (TensorFlow's pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


def _chain(x: jax.Array, specs: Sequence[tuple], prefix: str, dtype: Any) -> jax.Array:
    """Apply ``BasicConv`` layers named ``{prefix}_{i}`` in order; each spec is (features, kernel, stride,
    padding)."""
    for i, (features, kernel, stride, padding) in enumerate(specs, start=1):
        x = BasicConv(features, kernel, stride, padding, dtype, name=f"{prefix}_{i}")(x)
    return x


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b..d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool (padding excluded)-1x1."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dtype
        b1 = BasicConv(64, (1, 1), dtype=d, name="branch1x1")(x)
        b5 = _chain(x, [(48, (1, 1), 1, (0, 0)), (64, (5, 5), 1, (2, 2))], "branch5x5", d)
        b3 = _chain(x, [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 1, (1, 1))],
                    "branch3x3dbl", d)
        bp = BasicConv(self.pool_features, (1, 1), dtype=d, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dtype
        b3 = BasicConv(384, (3, 3), 2, dtype=d, name="branch3x3")(x)
        bd = _chain(x, [(64, (1, 1), 1, (0, 0)), (96, (3, 3), 1, (1, 1)), (96, (3, 3), 2, (0, 0))],
                    "branch3x3dbl", d)
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (``Mixed_6b..e``) with factorised 7x7 convolutions; avg pool excludes the padding."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, c7 = self.dtype, self.channels_7x7
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        b1 = BasicConv(192, (1, 1), dtype=d, name="branch1x1")(x)
        b7 = _chain(x, [(c7, (1, 1), 1, (0, 0)), (c7, *row), (192, *col)], "branch7x7", d)
        bd = _chain(x, [(c7, (1, 1), 1, (0, 0)), (c7, *col), (c7, *row), (c7, *col), (192, *row)],
                    "branch7x7dbl", d)
        bp = BasicConv(192, (1, 1), dtype=d, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dtype
        b3 = _chain(x, [(192, (1, 1), 1, (0, 0)), (320, (3, 3), 2, (0, 0))], "branch3x3", d)
        b7 = _chain(x, [(192, (1, 1), 1, (0, 0)), (192, (1, 7), 1, (0, 3)), (192, (7, 1), 1, (3, 0)),
                        (192, (3, 3), 2, (0, 0))], "branch7x7x3", d)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (``Mixed_7b``, ``Mixed_7c``) with split 1x3 / 3x1 branches. ``max_pool``: the pool branch
    uses pytorch-fid's ``FIDInceptionE_2`` max pool (``Mixed_7c``) instead of the padding-excluding average
    (``FIDInceptionE_1``, ``Mixed_7b``)."""
    max_pool: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dtype
        row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
        b1 = BasicConv(320, (1, 1), dtype=d, name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), dtype=d, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, *row, d, name="branch3x3_2a")(b3),
                              BasicConv(384, *col, d, name="branch3x3_2b")(b3)], axis=-1)
        bd = _chain(x, [(448, (1, 1), 1, (0, 0)), (384, (3, 3), 1, (1, 1))], "branch3x3dbl", d)
        bd = jnp.concatenate([BasicConv(384, *row, d, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, *col, d, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
        bp = BasicConv(192, (1, 1), dtype=d, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C): bilinear with half-pixel centres and no antialiasing, edge pixels
    repeated (torch ``F.interpolate(mode='bilinear', align_corners=False)``, as pytorch-fid resizes)."""
    b, _, _, c = images.shape
    return jax.image.resize(images, (b, size, size, c), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images -> 2048-d pool3 features of the FID Inception (pytorch-fid ``InceptionV3([3])``).

    Call with ``images`` (B, H, W, 3) float in [0, 1] (RGB; H, W >= 75 without resizing); returns (B, 2048)
    float32. Variables: ``params`` and ``batch_stats`` (from :func:`avi_jax.checkpoints.inception.load_inception`).
    ``resize_input=False`` skips the 299x299 resize (pytorch-fid's ``resize_input``).
    """
    resize_input: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        d = self.dtype
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x)
        x = (2.0 * x - 1.0).astype(d)
        x = BasicConv(32, (3, 3), 2, dtype=d, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), dtype=d, name="Conv2d_2b_3x3")(x)
        x = _max_pool_reduce(x)
        x = BasicConv(80, (1, 1), dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
        x = _max_pool_reduce(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, d, name=name)(x)
        x = InceptionB(d, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, d, name=name)(x)
        x = InceptionD(d, name="Mixed_7a")(x)
        x = InceptionE(False, d, name="Mixed_7b")(x)
        x = InceptionE(True, d, name="Mixed_7c")(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
