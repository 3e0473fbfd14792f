"""The Inception-v3 of FID (TensorFlow graph of 2015-12-05, without the classifier) as a Flax module.

This is the network that clean-fid, StyleGAN's metrics and the original TTUR FID code use: the
``pool_3`` output of the ``inception-2015-12-05`` graph (2048 features per image). It differs from
``torchvision``'s Inception-v3 in small ways that change FID, all read off the TorchScript export
of that graph (``launch/convert_inception.py``):

* every convolution has no bias and is followed by BatchNorm without scale (``gamma = 1``;
  ``beta``, moving ``mean``/``var``), eps ``1e-3``, then ReLU;
* the stem's max pools and the grid reductions (``mixed_3``, ``mixed_8``) use 3x3 stride-2
  VALID max pooling;
* the pool branch of ``mixed``..``mixed_7`` and ``mixed_9`` is a 3x3 stride-1 average pool with
  padding 1 that does not count the padding (``count_include_pad=False``), while ``mixed_10``'s
  pool branch is a 3x3 stride-1 *max* pool with padding 1 (a quirk of the 2015 graph);
* in ``mixed_9`` / ``mixed_10`` the 1x3 and 3x1 convolutions both read the same input (the
  branches are split, not chained), concatenated as
  ``[conv, tower 1x3, tower 3x1, tower_1 1x3, tower_1 3x1, tower_2]``;
* features are the 8x8 average pool of ``mixed_10`` (2048 channels), no dropout, no logits.

Layout: NHWC activations; parameters ``<block>/<tower>/<conv>/{kernel, beta, mean, var}`` with
kernels HWIO in float32 (names follow the 2015 graph: ``mixed_4/tower_1/conv_3``). The module
takes images already resized to 299x299 with values in [0, 255] and normalizes them to
``(x - 128) / 128`` itself, as clean-fid does before calling the network.

Convolutions run at ``Precision.HIGHEST`` by default: on GPUs with TF32, the default float32
precision would move the features by ~1e-3 relative, more than FID comparisons across
implementations tolerate.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

Conv = tuple[str, int, tuple[int, int], int, tuple[int, int]]  # name, features, kernel, stride, padding


def _conv(name: str, features: int, kernel: tuple[int, int] = (1, 1), stride: int = 1,
          padding: tuple[int, int] = (0, 0)) -> Conv:
  return (name, features, kernel, stride, padding)


class ConvBN(nn.Module):
  """Bias-free convolution, BatchNorm without scale (inference statistics, eps 1e-3), ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - mean) * lax.rsqrt(var + BN_EPS) + beta
    return nn.relu(y)


class Tower(nn.Module):
  """A chain of :class:`ConvBN` (named as in the graph), optionally after a pool."""
  convs: Sequence[Conv]
  pool: str | None = None  # "avg": 3x3/1 average pool, padding 1, padding not counted
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool == "avg":
      x = _avg_pool_3x3(x)
    for name, features, kernel, stride, padding in self.convs:
      x = ConvBN(features, kernel, stride, padding, self.precision, name=name)(x)
    return x


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
  return nn.max_pool(x, (3, 3), (stride, stride), padding)


class InceptionA(nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
  pool_features: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, precision=p, name="conv")(x),
        Tower([_conv("conv", 48), _conv("conv_1", 64, (5, 5), 1, (2, 2))], precision=p, name="tower")(x),
        Tower([_conv("conv", 64), _conv("conv_1", 96, (3, 3), 1, (1, 1)), _conv("conv_2", 96, (3, 3), 1, (1, 1))],
              precision=p, name="tower_1")(x),
        Tower([_conv("conv", self.pool_features)], pool="avg", precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionB(nn.Module):  # mixed_3: 35x35 -> 17x17
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, precision=p, name="conv")(x),
        Tower([_conv("conv", 64), _conv("conv_1", 96, (3, 3), 1, (1, 1)), _conv("conv_2", 96, (3, 3), 2)],
              precision=p, name="tower")(x),
        _max_pool_3x3(x, 2),
    ], axis=-1)


class InceptionC(nn.Module):  # mixed_4 .. mixed_7 (17x17, factorized 7x7)
  channels_7x7: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p, c = self.precision, self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1
    return jnp.concatenate([
        ConvBN(192, precision=p, name="conv")(x),
        Tower([_conv("conv", c), _conv("conv_1", c, row[0], 1, row[1]), _conv("conv_2", 192, col[0], 1, col[1])],
              precision=p, name="tower")(x),
        Tower([_conv("conv", c), _conv("conv_1", c, col[0], 1, col[1]), _conv("conv_2", c, row[0], 1, row[1]),
               _conv("conv_3", c, col[0], 1, col[1]), _conv("conv_4", 192, row[0], 1, row[1])],
              precision=p, name="tower_1")(x),
        Tower([_conv("conv", 192)], pool="avg", precision=p, name="tower_2")(x),
    ], axis=-1)


class InceptionD(nn.Module):  # mixed_8: 17x17 -> 8x8
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    return jnp.concatenate([
        Tower([_conv("conv", 192), _conv("conv_1", 320, (3, 3), 2)], precision=p, name="tower")(x),
        Tower([_conv("conv", 192), _conv("conv_1", 192, (1, 7), 1, (0, 3)), _conv("conv_2", 192, (7, 1), 1, (3, 0)),
               _conv("conv_3", 192, (3, 3), 2)], precision=p, name="tower_1")(x),
        _max_pool_3x3(x, 2),
    ], axis=-1)


class InceptionE(nn.Module):  # mixed_9 (pool "avg"), mixed_10 (pool "max") at 8x8
  pool: str
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision

    def conv(name, features, kernel=(1, 1), padding=(0, 0)):
      return ConvBN(features, kernel, 1, padding, p, name=name)

    a = conv("tower_conv", 384)(x)
    b = conv("tower_1_conv_1", 384, (3, 3), (1, 1))(conv("tower_1_conv", 448)(x))
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
    return jnp.concatenate([
        conv("conv", 320)(x),
        conv("tower_mixed_conv", 384, (1, 3), (0, 1))(a),
        conv("tower_mixed_conv_1", 384, (3, 1), (1, 0))(a),
        conv("tower_1_mixed_conv", 384, (1, 3), (0, 1))(b),
        conv("tower_1_mixed_conv_1", 384, (3, 1), (1, 0))(b),
        conv("tower_2_conv", 192)(pooled),
    ], axis=-1)


class InceptionV3FID(nn.Module):
  """Images ``[B, 299, 299, 3]`` in [0, 255] (float) -> pool_3 features ``[B, 2048]`` (float32)."""
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"images must be [B, {INPUT_SIZE}, {INPUT_SIZE}, 3], got shape {images.shape}")
    p = self.precision
    x = (images.astype(jnp.float32) - 128.0) / 128.0
    x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)                  # 149
    x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)                   # 147
    x = ConvBN(64, (3, 3), 1, (1, 1), precision=p, name="conv_2")(x)        # 147
    x = _max_pool_3x3(x, 2)                                                 # 73
    x = ConvBN(80, precision=p, name="conv_3")(x)                           # 73
    x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)                  # 71
    x = _max_pool_3x3(x, 2)                                                 # 35
    x = InceptionA(32, p, name="mixed")(x)                                  # 35x35x256
    x = InceptionA(64, p, name="mixed_1")(x)                                # 288
    x = InceptionA(64, p, name="mixed_2")(x)                                # 288
    x = InceptionB(p, name="mixed_3")(x)                                    # 17x17x768
    for i, c in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(c, p, name=f"mixed_{i}")(x)                            # 768
    x = InceptionD(p, name="mixed_8")(x)                                    # 8x8x1280
    x = InceptionE("avg", p, name="mixed_9")(x)                             # 2048
    x = InceptionE("max", p, name="mixed_10")(x)                            # 2048
    return jnp.mean(x, axis=(1, 2))                                         # pool_3: 8x8 average
