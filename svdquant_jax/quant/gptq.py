"""GPTQ on the SVDQuant residual, with static groups and act-order (``docs/quantization.md``, "GPTQ").

In our ``[K, N]`` orientation GPTQ walks the input channels (rows of the kernel; PyTorch's
columns). As deepcompressor's ``gptq_quantize`` with ``svdquant/gptq.yaml``:

  * Hessian ``H = Σ (2 / T) x̃ᵀ x̃`` of the inputs of the quantized path ``x̃ = (x + δ) / λ``
    (δ: the fc2 shift, else 0), accumulated over chunks
    of ``block_rows`` rows (T = number of rows; deepcompressor divides by the number of samples:
    a constant factor, which GPTQ is invariant to, damping being relative);
  * dead channels (``H_kk = 0``): ``H_kk = 1`` and the weight row is zeroed;
  * act-order: rows permuted by decreasing ``diag(H)`` (stable sort);
  * damping ``0.01 · mean(diag H)`` added to the diagonal, +0.1 % of the mean per failed inversion,
    up to 250 attempts (a ``lax.while_loop``; failure = NaN/Inf in the Cholesky factors);
  * ``U = chol(H⁻¹)`` upper; block size 128: inside a block each row is quantized and its error
    ``(w - q) / U_jj`` is spread over the following rows with ``U_j,:``; after the block the
    accumulated errors update all later rows at once;
  * **static groups**: the group scales (INT4 g64 ``absmax / 7``; NVFP4 g16 two-level) are computed
    from the full residual before GPTQ and kept, so the result is codes + those scales in
    :class:`~svdquant_jax.formats.quantizers.QuantizedWeight` (dequantized by the same function as RTN).

If the Hessian never becomes invertible, the rows are quantized with U = I (RTN with the static
scales) and ``stable`` is False; :func:`~svdquant_jax.quant.svdquant.quantize_linear_group` turns
that into an error naming the layer (deepcompressor asserts).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from svdquant_jax.formats.quantizers import (
    QuantFormat, QuantizationError, QuantizedWeight, decode_codes, effective_scales, encode_scaled, true_divide,
    weight_group_size, weight_scales)
from svdquant_jax.quant.weights import PRECISION
from svdquant_jax.utils import linalg

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("block_rows", "precision", "shift"))
def hessian_from_inputs(x: Array, smooth: Array | None = None, block_rows: int = 512,
                        precision: Any = PRECISION, shift: float = 0.0) -> Array:
  """``H = Σ (2 / T) x̃ᵀ x̃`` ``[K, K]`` float32 over the rows of ``x [..., K]``
  (``x̃ = (x + shift) / smooth``, the input of the quantized path).

  The rows are processed ``block_rows`` at a time (a ``lax.scan``; the last chunk is padded with
  zero rows, which add nothing).
  """
  k = x.shape[-1]
  rows = x.reshape(-1, k)
  t = rows.shape[0]
  chunks = -(-t // block_rows)
  pad = chunks * block_rows - t
  smooth = jnp.ones((k,), jnp.float32) if smooth is None else smooth.astype(jnp.float32)
  rows = rows.astype(jnp.float32) + jnp.float32(shift) if shift else rows
  rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(chunks, block_rows, k)  # zero rows (after the shift) add nothing

  def add(h, chunk):
    c = true_divide(chunk.astype(jnp.float32), smooth)
    return h + jnp.dot(c.T, c, precision=precision), None

  h, _ = jax.lax.scan(add, jnp.zeros((k, k), jnp.float32), rows)
  return h * (2.0 / t)


@dataclasses.dataclass(frozen=True, eq=False)
class GPTQResult:
  """Result of :func:`gptq_quantize` (a pytree).

  Attributes:
    qweight: codes ``[K, N]`` in the original row order, static scales, tensor scale.
    inv_tries: ``int32 []`` Cholesky attempts made (1 = the first damping sufficed).
    stable: ``bool []`` whether an attempt succeeded.
  """
  qweight: QuantizedWeight
  inv_tries: Array
  stable: Array


jax.tree_util.register_dataclass(GPTQResult, data_fields=["qweight", "inv_tries", "stable"], meta_fields=[])


def _upper_inverse_cholesky(h: Array) -> Array:
  """``U`` upper triangular with ``H⁻¹ = Uᵀ U`` (NaN when H is not positive definite)."""
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  lower = linalg.cholesky(h)
  h_inv = linalg.cho_solve_lower(lower, eye)
  return linalg.cholesky((h_inv + h_inv.T) / 2).T


def gptq_quantize(residual: Array, hessian: Array, fmt: QuantFormat, *, block_size: int = 128,
                  damp: float = 0.01, max_inv_tries: int = 250, precision: Any = PRECISION) -> GPTQResult:
  """GPTQ of a kernel ``[K, N]`` given the Hessian ``[K, K]`` of its (smoothed) inputs.

  Args:
    residual: the kernel to quantize (the SVDQuant residual R).
    hessian: ``[K, K]`` from :func:`hessian_from_inputs`.
    fmt: weight format (INT4 g64, NVFP4 g16; INT8 and NF4 work the same way).
    block_size: rows per lazy-update block (128).
    damp: relative damping (0.01).
    max_inv_tries: Cholesky attempts (250).

  Returns:
    :class:`GPTQResult`.
  """
  k, n = residual.shape
  if hessian.shape != (k, k):
    raise QuantizationError(f"gptq_quantize: hessian shape {hessian.shape} does not match K={k}")
  fmt.check_k(k, f"gptq_quantize kernel of shape {residual.shape}")
  if block_size < 1 or max_inv_tries < 1:
    raise QuantizationError(f"gptq_quantize: block_size and max_inv_tries must be >= 1, got {block_size} and "
                            f"{max_inv_tries}")
  return _gptq(residual, hessian, fmt=fmt, block_size=block_size, damp=damp, max_inv_tries=max_inv_tries,
               precision=precision)


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "damp", "max_inv_tries", "precision"))
def _gptq(residual, hessian, *, fmt, block_size, damp, max_inv_tries, precision) -> GPTQResult:
  k, n = residual.shape
  w = residual.astype(jnp.float32)
  scales, tensor_scale = weight_scales(w, fmt)
  eff = effective_scales(scales, tensor_scale)
  group = weight_group_size(fmt, k)

  h = hessian.astype(jnp.float32)
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  perm = jnp.argsort(-jnp.diagonal(h), stable=True)
  h = h[perm][:, perm]
  w = w[perm]
  row_scales = eff[perm // group]  # [K, N]: the static scale of each permuted row

  eye = jnp.eye(k, dtype=jnp.float32)
  mean_diag = jnp.mean(jnp.diagonal(h))
  h = h + damp * mean_diag * eye

  def finite(u):
    return jnp.all(jnp.isfinite(u))

  u0 = _upper_inverse_cholesky(h)

  def retry(c):
    tries, h, _, _ = c
    h = h + 0.1 * damp * mean_diag * eye
    u = _upper_inverse_cholesky(h)
    return tries + 1, h, u, finite(u)

  tries, _, u, stable = jax.lax.while_loop(lambda c: ~c[3] & (c[0] < max_inv_tries), retry,
                                           (jnp.asarray(1, jnp.int32), h, u0, finite(u0)))
  u = jnp.where(stable, u, eye)

  # Pad K to whole blocks with inert rows (zero weight, unit scale, identity U).
  kp = -(-k // block_size) * block_size
  pad = kp - k
  w = jnp.pad(w, ((0, pad), (0, 0)))
  row_scales = jnp.pad(row_scales, ((0, pad), (0, 0)), constant_values=1.0)
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.pad(jnp.zeros((k,), jnp.float32), (0, pad),
                                                          constant_values=1.0))
  code_dtype = encode_scaled(jnp.zeros((1,), jnp.float32), fmt).dtype
  positions = jnp.arange(kp)

  def block(bi, carry):
    w, codes = carry
    start = bi * block_size
    wb = jax.lax.dynamic_slice(w, (start, 0), (block_size, n))
    sb = jax.lax.dynamic_slice(row_scales, (start, 0), (block_size, n))
    ub = jax.lax.dynamic_slice(u, (start, start), (block_size, block_size))

    def row(j, c):
      wb, errs, cb = c
      scale = sb[j]
      zero = scale == 0
      code = encode_scaled(jnp.where(zero, 0.0, true_divide(wb[j], jnp.where(zero, 1.0, scale))), fmt)
      err = (wb[j] - decode_codes(code, fmt) * scale) / ub[j, j]
      # U is upper triangular: ub[j, :j] = 0, so only rows j.. of the block move.
      wb = wb - ub[j][:, None] * err[None, :]
      return wb, errs.at[j].set(err), cb.at[j].set(code)

    _, errs, cb = jax.lax.fori_loop(
        0, block_size, row, (wb, jnp.zeros((block_size, n), jnp.float32), jnp.zeros((block_size, n), code_dtype)))
    codes = jax.lax.dynamic_update_slice(codes, cb, (start, 0))
    coupling = jax.lax.dynamic_slice(u, (start, 0), (block_size, kp))
    coupling = jnp.where(positions[None, :] >= start + block_size, coupling, 0.0)
    return w - jnp.dot(coupling.T, errs, precision=precision), codes

  _, codes = jax.lax.fori_loop(0, kp // block_size, block, (w, jnp.zeros((kp, n), code_dtype)))
  codes = codes[:k][jnp.argsort(perm)]
  return GPTQResult(QuantizedWeight(codes, scales, tensor_scale), tries, stable)


__all__ = ["hessian_from_inputs", "GPTQResult", "gptq_quantize"]
