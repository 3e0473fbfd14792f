"""Seeded randomized Hadamard rotation of a linear layer's input space: the math and the fast transform.

A linear group ``y_i = x W_i`` (kernels ``[K, N_i]``, the project's ``x @ kernel`` convention) is
rewritten with an orthogonal ``Q [K, K]`` as ``y_i = (x Q)(Qᵀ W_i)``: exact in real arithmetic, and
the quantizers then see the rotated input ``x' = x Q`` and kernels ``W'_i = Qᵀ W_i``. A Hadamard
``Q`` spreads a few large activation channels over all channels of its block, which is what the
rotation papers (QuaRot, SpinQuant) use it for; smoothing and the low-rank branch then act in the
rotated space (the rotation comes first).

``Q = diag(s) · blockdiag(H_b, ..., H_b)``: ``s`` a seeded ±1 vector ``[K]`` and ``H_b`` the
normalized Walsh-Hadamard matrix of size ``b`` (Sylvester order, ``H_b Hᵀ_b = I``, symmetric).
``b`` is a power of two dividing ``K``: by default the largest one (FLUX ``K = 3072``: b = 1024;
``12288``: 4096; PixArt ``1152``: 128; ``4608``: 512). A width with no power-of-two block of at
least ``min_block`` dividing it (odd K, ``K = 27``) is refused with an error: such a block would
barely mix channels.

``x Q`` is computed by a fast Walsh-Hadamard transform (``log2 b`` butterfly stages of ``K`` adds
each per token; :func:`online_flops` compares it with a dense matmul), never by forming ``Q``.

The rotation is part of a deployed layer's input format (a rotated ``QuantizedLinear`` reads
``x Q``; ``SVDQuantDense`` applies :func:`rotate_online` before the fused op), hence this layer;
the PTQ side (rotating a calibration group) is ``svdquant_jax.quant.rotation``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats.quantizers import QuantizationError

Array = jax.Array
MIN_BLOCK = 16


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def largest_power_of_two_divisor(k: int) -> int:
  """The largest power of two dividing ``k`` (``k >= 1``)."""
  return k & -k


@dataclasses.dataclass(frozen=True)
class HadamardRotation:
  """``Q = diag(s) · blockdiag(H_b)`` on ``K`` input channels (hashable: usable as a static argument).

  Attributes:
    k: input width K.
    block: Hadamard block size b (a power of two dividing K).
    seed: seed of the sign vector ``s``.
  """
  k: int
  block: int
  seed: int = 0

  def __post_init__(self):
    if not _is_power_of_two(self.block) or self.k % self.block:
      raise QuantizationError(f"rotation block {self.block} must be a power of two dividing K={self.k}")

  def signs(self) -> np.ndarray:
    """``s [K]`` float32, ±1, drawn from ``seed``."""
    rng = np.random.default_rng(self.seed)
    return np.where(rng.random(self.k) < 0.5, -1.0, 1.0).astype(np.float32)

  def matrix(self) -> np.ndarray:
    """``Q [K, K]`` float64 (for tests and small layers; the transforms never form it)."""
    h = walsh_hadamard(self.block)
    q = np.kron(np.eye(self.k // self.block), h)
    return self.signs().astype(np.float64)[:, None] * q


def walsh_hadamard(n: int) -> np.ndarray:
  """The normalized Walsh-Hadamard matrix ``[n, n]`` float64 (Sylvester order; orthogonal, symmetric)."""
  if not _is_power_of_two(n):
    raise QuantizationError(f"Walsh-Hadamard size must be a power of two, got {n}")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / math.sqrt(n)


def make_rotation(k: int, seed: int = 0, block: int | None = None, min_block: int = MIN_BLOCK,
                  name: str = "linear") -> HadamardRotation:
  """The rotation of a ``K``-wide input.

  Args:
    k: input width.
    seed: sign seed.
    block: Hadamard block size (default: the largest power of two dividing ``k``).
    min_block: smallest accepted block.
    name: layer name for error messages.

  Raises:
    QuantizationError: ``k`` not positive, ``block`` not a power of two dividing ``k``, or a block
      below ``min_block`` (naming the layer, K and the block).
  """
  if int(k) != k or k < 1:
    raise QuantizationError(f"{name}: rotation width K must be a positive integer, got {k!r}")
  k = int(k)
  b = largest_power_of_two_divisor(k) if block is None else int(block)
  if not _is_power_of_two(b) or k % b:
    raise QuantizationError(f"{name}: rotation block {b} must be a power of two dividing K={k}")
  if b < min_block:
    raise QuantizationError(f"{name}: K={k} has no power-of-two Hadamard block >= {min_block} dividing it "
                            f"(largest: {b}); keep this layer 16-bit (quant.skips) or lower the smallest accepted "
                            f"block (quant.rotation.min_block)")
  return HadamardRotation(k, b, int(seed))


@functools.partial(jax.jit, static_argnums=1)
def _fwht(x: Array, block: int) -> Array:
  """``x [..., K] @ blockdiag(H_b)`` by butterflies (float32; ``log2 b`` stages of K adds / subs)."""
  lead, k = x.shape[:-1], x.shape[-1]
  y = x.reshape(lead + (k // block, block))
  h = 1
  while h < block:
    y = y.reshape(lead + (k // block, block // (2 * h), 2, h))
    a, c = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + c, a - c], axis=-2)
    h *= 2
  return y.reshape(lead + (k,)) * (1.0 / math.sqrt(block))


def _check_width(arr: Array, k: int, what: str, axis: int) -> None:
  if arr.shape[axis] != k:
    raise QuantizationError(f"{what} has shape {tuple(arr.shape)}, but the rotation is for K={k} (axis {axis})")


def rotate_inputs(x: Array, rot: HadamardRotation) -> Array:
  """``x' = x Q``: ``x [..., K]`` -> ``[..., K]`` float32."""
  x = jnp.asarray(x, jnp.float32)
  _check_width(x, rot.k, "rotate_inputs: x", -1)
  return _fwht(x * jnp.asarray(rot.signs()), rot.block)


def rotate_kernel(kernel: Array, rot: HadamardRotation) -> Array:
  """``W' = Qᵀ W``: ``kernel [K, N]`` -> ``[K, N]`` float32 (``(Wᵀ Q)ᵀ``, the same transform)."""
  kernel = jnp.asarray(kernel, jnp.float32)
  if kernel.ndim != 2:
    raise QuantizationError(f"rotate_kernel: kernel must be [K, N], got shape {tuple(kernel.shape)}")
  _check_width(kernel, rot.k, "rotate_kernel: kernel", 0)
  return rotate_inputs(kernel.T, rot).T


def unrotate_inputs(x_rot: Array, rot: HadamardRotation) -> Array:
  """``x = x' Qᵀ`` (the inverse of :func:`rotate_inputs`)."""
  x_rot = jnp.asarray(x_rot, jnp.float32)
  _check_width(x_rot, rot.k, "unrotate_inputs: x", -1)
  return _fwht(x_rot, rot.block) * jnp.asarray(rot.signs())


def rotate_online(x: Array, block: int, seed: int) -> Array:
  """The deployed layer's online rotation: ``x [..., K]`` (any float dtype) -> ``x Q`` computed in
  float32 and cast back to ``x.dtype``; ``block == 0``: ``x`` unchanged."""
  if not block:
    return x
  return rotate_inputs(x, HadamardRotation(int(x.shape[-1]), int(block), int(seed))).astype(x.dtype)


def online_flops(k: int, block: int) -> dict[str, int]:
  """Per-token cost of rotating a ``K``-wide input online.

  ``fwht``: ``K log2 b`` adds/subs (plus ``K`` sign flips and ``K`` scalings by ``1/sqrt(b)``,
  which fold into the sign vector); ``dense_block``: a block-diagonal matmul, ``2 K b``;
  ``dense_full``: a dense ``K x K`` matmul, ``2 K²``.
  """
  if not _is_power_of_two(block) or k % block:
    raise QuantizationError(f"rotation block {block} must be a power of two dividing K={k}")
  return {"fwht": k * int(math.log2(block)), "scale": k, "dense_block": 2 * k * block, "dense_full": 2 * k * k}


__all__ = ["MIN_BLOCK", "HadamardRotation", "walsh_hadamard", "largest_power_of_two_divisor", "make_rotation",
           "rotate_inputs", "rotate_kernel", "unrotate_inputs", "rotate_online", "online_flops"]
