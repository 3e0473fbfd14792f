"""Image similarity metrics against reference images: PSNR, SSIM, and latent-space errors.

Images are ``uint8 [B, H, W, C]`` or floats in [0, 1]; metrics are computed per image in
float32 and averaged, as deepcompressor's evaluation does (``data_range = 1``;
``docs/quantization.md``, "deepcompressor's recipe", evaluation).

Metrics that need pretrained networks (LPIPS, FID, CLIP score, ImageReward) are not computed
here: their weights come from a hub that this project does not assume.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _to_unit(images) -> Array:
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _check_pair(a: Array, b: Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"images to compare have different shapes {a.shape} and {b.shape}")
  if a.ndim != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {a.shape}")


@jax.jit
def _psnr(a: Array, b: Array) -> Array:
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def psnr(images, references) -> Array:
  """Per-image PSNR in dB with data range 1 (identical images: 100 dB cap). Returns ``[B]``."""
  a, b = _to_unit(images), _to_unit(references)
  _check_pair(a, b)
  return _psnr(a, b)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(x ** 2) / (2 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def _blur(x: Array, window: Array) -> Array:
  """Separable 'valid' Gaussian filter over H and W of ``[B, H, W, C]``."""
  k = window.shape[0]
  h = sum(window[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
  return sum(window[i] * h[:, :, i:h.shape[2] - k + 1 + i] for i in range(k))


@jax.jit
def _ssim(a: Array, b: Array) -> Array:
  w = jnp.asarray(_gaussian_window())
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = _blur(a, w), _blur(b, w)
  s_aa = _blur(a * a, w) - mu_a ** 2
  s_bb = _blur(b * b, w) - mu_b ** 2
  s_ab = _blur(a * b, w) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def ssim(images, references) -> Array:
  """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  data range 1, 'valid' windows only, averaged over pixels and channels. Returns ``[B]``.
  """
  a, b = _to_unit(images), _to_unit(references)
  _check_pair(a, b)
  if min(a.shape[1:3]) < 11:
    raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[1]}x{a.shape[2]}")
  return _ssim(a, b)


def relative_error(x, reference) -> float:
  """``||x - ref||_F / ||ref||_F`` in float64 on host."""
  x = np.asarray(x, np.float64)
  r = np.asarray(reference, np.float64)
  if x.shape != r.shape:
    raise ValueError(f"shapes differ: {x.shape} vs {r.shape}")
  return float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30))
