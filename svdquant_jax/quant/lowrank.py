"""The low-rank branch: an accurate rank-r SVD in float32, and the alternating refinement.

SVD (:func:`svd_lowrank`). deepcompressor runs ``torch.linalg.svd`` in float64 on the full
matrix; a full SVD per candidate (39 smoothing candidates and up to 100 refinement iterations per
layer, K = 3072 and N up to 12288 for FLUX) would dominate the whole PTQ, and JAX runs with x64
off. We compute the top-r subspace by block subspace iteration in float32 with HIGHEST matmul
precision, on the smaller side of W (``W Wᵀ Q`` when K <= N, else ``Wᵀ W Q``, each step as two
products with W and a shifted Cholesky-QR after each: the Gram matrix is never formed and no
orthonormalisation sees more than the range σ_1 / σ_m, so the small directions are not lost to
float32 when a few singular values dominate), then a Householder QR and a Rayleigh-Ritz step on W
(SVD of the small ``[m, max(K, N)]`` projection):

  * m = r + oversample basis vectors (default oversample = r), ``svd_iters`` steps (default 40)
    from a fixed random start (key 0: deterministic);
  * the truncation error ``||W - A B||_F`` is what the quantizer sees; it is stationary in the
    subspace error, so float32 reaches float64's value to ~1e-6 relative even where the spectrum
    is flat around r or dominated by a few singular values up to ~5e4x the bulk (smoothed
    weights);
    tests/test_transforms.py bounds it at 1e-5 against a float64 numpy SVD;
  * the cost per SVD is ``svd_iters`` x ``4 K N m`` flops of matmuls plus 6 shifted Cholesky-QR
    passes (``[K, m]`` / ``[N, m]`` Gram products, m x m factorizations) per step, instead of a full
    bidiagonalisation: few, large kernels on a GPU;
  * the alternating loop warm-starts each SVD from the previous iteration's basis.

Factors: ``A = U_r`` (orthonormal columns, deepcompressor's ``lora_down`` ``a = Vh[:r]``
transposed to our ``[K, N]`` orientation) and ``B = S_r V_rᵀ`` (``lora_up`` ``b = U S``).

Alternating refinement (:func:`alternating_lowrank`, spec §1.3): iteration 1 is plain SVDQuant
(``L = SVD_r(Ŵ)``, ``Q = quant(Ŵ - L)``); iteration t takes ``L = SVD_r(Ŵ - Q_{t-1})``,
``Q = quant(Ŵ - L)``. Each iteration's candidate is scored by the caller's loss, the best is kept
(ties go to the later iteration, as deepcompressor's ``<=``), and with ``early_stop`` the loop ends
at the first iteration whose loss exceeds the best. One ``lax.while_loop``: compiled once.

Shared branch (deepcompressor's ``exclusive: false``): layers that read one input (q, k, v kept as
separate kernels) can share one down-projection. The refinement then runs on the concatenation
``Ŵ = [Ŵ_1 | ... | Ŵ_n]`` along N with ``column_splits = (N_1, ..., N_n)``: one ``A [K, r]`` and
``B = [B_1 | ... | B_n]``, while each layer's residual is quantized as its own tensor (NVFP4's
per-tensor scale is per layer) and :func:`split_columns` gives the per-layer candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError, fake_quant_weight
from svdquant_jax.quant.weights import PRECISION, SVDQuantWeights, as_traceable_loss
from svdquant_jax.utils import linalg

Array = jax.Array
DEFAULT_SVD_ITERS = 40


def basis_size(shape: tuple[int, int], rank: int, oversample: int | None = None) -> int:
  """Subspace size m = min(rank + oversample, min(K, N)); oversample defaults to ``rank``."""
  oversample = rank if oversample is None else oversample
  return min(rank + oversample, min(shape))


def initial_basis(shape: tuple[int, int], rank: int, oversample: int | None = None) -> Array:
  """The fixed random start ``[min(K, N), m]`` (float32, key 0)."""
  d = min(shape)
  return jax.random.normal(jax.random.key(0), (d, basis_size(shape, rank, oversample)), jnp.float32)


def _cholesky_qr(y: Array, relative_shift: Array, precision: Any) -> Array:
  """``y R⁻¹`` with ``RᵀR = yᵀy + shift I`` (same span as ``y``; near-orthonormal columns)."""
  gram = jnp.dot(y.T, y, precision=precision)
  m = gram.shape[0]
  shift = relative_shift * jnp.trace(gram) + jnp.finfo(jnp.float32).tiny
  lower = linalg.cholesky(gram + shift * jnp.eye(m, dtype=gram.dtype))
  return linalg.solve_lower_triangular(lower, y.T).T


def _orthonormalize(y: Array, precision: Any) -> Array:
  """A near-orthonormal basis of span(y) by shifted CholeskyQR3 (Fukaya et al. 2020): matmuls and
  m x m Cholesky factorizations (few kernel launches on a GPU, unlike Householder QR).

  The first pass is shifted by ``11 (d m + m (m + 1)) eps trace(yᵀy)``, which keeps it positive
  definite for any cond(y); the two following passes (shifted by eps·trace only, for exactly
  rank-deficient y) restore orthonormality. With the half steps of :func:`subspace_svd`
  (cond(y) ~ σ_1 / σ_m) the SVD keeps float32 accuracy up to σ_1 / σ_m ~ 5e4, as a float32
  Householder QR does (two passes only reach ~7e3). Only the span matters between iterations.
  """
  d, m = y.shape
  eps = float(jnp.finfo(jnp.float32).eps)
  y = _cholesky_qr(y, 11.0 * (d * m + m * (m + 1)) * eps, precision)
  y = _cholesky_qr(y, eps, precision)
  return _cholesky_qr(y, eps, precision)


def subspace_svd(w: Array, rank: int, basis: Array, iters: int = DEFAULT_SVD_ITERS,
                 precision: Any = PRECISION) -> tuple[Array, Array, Array]:
  """Rank-r SVD factors of ``w`` by subspace iteration from ``basis``.

  Args:
    w: ``[K, N]``.
    rank: r >= 1.
    basis: ``[min(K, N), m]`` start on the smaller side (any full-rank matrix; m >= r).
    iters: subspace iteration steps (skipped when m = min(K, N): the basis then spans everything).
    precision: matmul precision.

  Returns:
    ``(A [K, r], B [r, N], basis [min(K, N), m])``: ``A`` with orthonormal columns, ``B = S Vᵀ``,
    and the Ritz basis (sorted by decreasing singular value) to warm-start a related SVD.
  """
  w = w.astype(jnp.float32)
  k, n = w.shape
  # The basis lives on the smaller side; each step applies W Wᵀ (K <= N) or Wᵀ W as two products
  # with W, re-orthonormalising after each half step so that one pass sees a dynamic range of
  # σ_1 / σ_m rather than its square.
  wt = w if k <= n else w.T
  d, m = basis.shape

  def step(_, q):
    z = _orthonormalize(jnp.dot(wt.T, q, precision=precision), precision)
    return _orthonormalize(jnp.dot(wt, z, precision=precision), precision)

  q = basis.astype(jnp.float32)
  if m < d and iters > 0:
    q = jax.lax.fori_loop(0, iters, step, _orthonormalize(q, precision))
  q = linalg.qr_q(q)  # exactly orthonormal (Householder) for the Rayleigh-Ritz step
  # Rayleigh-Ritz on W itself (an m x max(K, N) SVD), not on the Gram: no squared condition number.
  u, s, vt = linalg.svd_reduced(jnp.dot(q.T, wt, precision=precision))
  ritz = jnp.dot(q, u, precision=precision)
  if k <= n:
    return ritz[:, :rank], s[:rank, None] * vt[:rank], ritz
  return vt[:rank].T, s[:rank, None] * ritz[:, :rank].T, ritz


@functools.partial(jax.jit, static_argnames=("rank", "iters", "oversample", "precision"))
def svd_lowrank(w: Array, rank: int, iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None,
                precision: Any = PRECISION) -> tuple[Array, Array]:
  """The rank-r truncated SVD ``w ≈ A B`` (float32; see the module docstring for the method).

  Args:
    w: ``[K, N]``.
    rank: r (0 gives empty factors).
    iters: subspace iteration steps.
    oversample: extra basis vectors (default r).

  Returns:
    ``(A [K, r], B [r, N])`` float32, ``A = U_r`` (orthonormal columns), ``B = S_r V_rᵀ``.
  """
  k, n = w.shape
  if rank < 0 or rank > min(k, n):
    raise QuantizationError(f"svd_lowrank: rank {rank} must be in [0, min(K, N)] for a kernel of shape {w.shape}")
  if rank == 0:
    return jnp.zeros((k, 0), jnp.float32), jnp.zeros((0, n), jnp.float32)
  a, b, _ = subspace_svd(w, rank, initial_basis((k, n), rank, oversample), iters, precision)
  return a, b


def split_columns(w: SVDQuantWeights, sizes: Sequence[int]) -> list[SVDQuantWeights]:
  """Splits a layer over concatenated kernels ``[K, N_1 + ... + N_n]`` into its n layers.

  Every part keeps λ and the shared ``lora_a`` and takes its columns of ``residual``, ``lora_b`` and
  ``bias``: the layers of a shared low-rank branch.

  Raises:
    QuantizationError: ``sizes`` do not add up to N, or ``w`` already holds quantized codes
      (quantize each part instead: the NVFP4 per-tensor scale does not split).
  """
  sizes = tuple(int(s) for s in sizes)
  if sum(sizes) != w.out_features or any(s < 1 for s in sizes):
    raise QuantizationError(f"split_columns: column sizes {sizes} do not split N={w.out_features}")
  if w.residual_q is not None:
    raise QuantizationError("split_columns: split the float layer before quantizing its residual")
  parts, start = [], 0
  for size in sizes:
    cols = slice(start, start + size)
    parts.append(SVDQuantWeights(w.smooth, w.residual[:, cols], w.lora_a, w.lora_b[:, cols], w.bias[cols]))
    start += size
  return parts


def quantize_columns(residual: Array, fmt: QuantFormat, sizes: Sequence[int] | None = None) -> Array:
  """``Qw`` of ``residual [K, N]``, each block of ``sizes`` columns quantized as its own tensor
  (``None``: the whole tensor)."""
  if sizes is None or len(sizes) == 1:
    return fake_quant_weight(residual, fmt)
  bounds = itertools.accumulate((int(s) for s in sizes), initial=0)
  return jnp.concatenate([fake_quant_weight(residual[:, a:b], fmt) for a, b in itertools.pairwise(bounds)], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class LowRankResult:
  """Result of :func:`alternating_lowrank` (a pytree).

  Attributes:
    lora_a: ``[K, r]`` of the best iteration.
    lora_b: ``[r, N]``.
    residual: ``Ŵ - A B [K, N]``.
    losses: ``[num_iters]`` loss per iteration; NaN for iterations not run.
    best_iter: ``int32 []`` index of the kept iteration (0 = plain SVDQuant).
    iters_run: ``int32 []`` iterations evaluated.
  """
  lora_a: Array
  lora_b: Array
  residual: Array
  losses: Array
  best_iter: Array
  iters_run: Array


jax.tree_util.register_dataclass(
    LowRankResult, data_fields=["lora_a", "lora_b", "residual", "losses", "best_iter", "iters_run"],
    meta_fields=[])


def alternating_lowrank(w_hat: Array, rank: int, fmt: QuantFormat, loss_fn: Callable, num_iters: int = 100,
                        early_stop: bool = True, *, smooth: Array | None = None, bias: Array | None = None,
                        svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None,
                        column_splits: Sequence[int] | None = None, precision: Any = PRECISION) -> LowRankResult:
  """Low-rank branch of one smoothed kernel by alternating SVD / quantization (spec §1.3).

  Args:
    w_hat: smoothed kernel ``Ŵ = diag(λ) W`` ``[K, N]``.
    rank: r >= 1.
    fmt: format of the residual (and of the activations, inside ``loss_fn``).
    loss_fn: ``loss_fn(candidate: SVDQuantWeights) -> scalar``: output error of the enclosing
      module with this layer replaced by the candidate (a pytree callable, see
      :func:`~svdquant_jax.quant.svdquant.as_traceable_loss`).
    num_iters: maximum iterations (1 = one-shot SVDQuant).
    early_stop: stop at the first iteration whose loss exceeds the best so far.
    smooth: λ ``[K]`` put in the candidates (default ones).
    bias: ``[N]`` put in the candidates (default zeros).
    svd_iters, oversample: SVD settings (each SVD after the first is warm-started).
    column_splits: for a branch shared by several layers, ``w_hat`` is their concatenation along N
      and these are the layers' column counts: each layer's residual is quantized as its own tensor
      (``loss_fn`` receives the concatenated candidate; split it with :func:`split_columns`).
      ``None``: one layer.

  Returns:
    :class:`LowRankResult` of the best iteration.
  """
  if rank < 1 or num_iters < 1 or rank > min(w_hat.shape):
    raise QuantizationError(f"alternating_lowrank needs 1 <= rank <= min(K, N) and num_iters >= 1, got rank "
                            f"{rank}, num_iters {num_iters} for a kernel of shape {w_hat.shape}")
  if column_splits is not None:
    column_splits = tuple(int(s) for s in column_splits)
    if sum(column_splits) != w_hat.shape[1] or any(s < 1 for s in column_splits):
      raise QuantizationError(f"alternating_lowrank: column_splits {column_splits} do not split N={w_hat.shape[1]}")
    if len(column_splits) == 1:
      column_splits = None
  return _alternating_lowrank(w_hat, as_traceable_loss(loss_fn), smooth, bias, rank=rank, fmt=fmt,
                              num_iters=num_iters, early_stop=early_stop, svd_iters=svd_iters,
                              oversample=oversample, column_splits=column_splits, precision=precision)


@functools.partial(jax.jit, static_argnames=("rank", "fmt", "num_iters", "early_stop", "svd_iters",
                                             "oversample", "column_splits", "precision"))
def _alternating_lowrank(w_hat, loss_fn, smooth, bias, *, rank, fmt, num_iters, early_stop, svd_iters,
                         oversample, column_splits, precision) -> LowRankResult:
  k, n = w_hat.shape
  w_hat = w_hat.astype(jnp.float32)
  smooth = jnp.ones((k,), jnp.float32) if smooth is None else smooth.astype(jnp.float32)
  bias = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)

  def evaluate(target, basis):
    a, b, basis = subspace_svd(target, rank, basis, svd_iters, precision)
    residual = w_hat - jnp.dot(a, b, precision=precision)
    loss = loss_fn(SVDQuantWeights(smooth, residual, a, b, bias)).astype(jnp.float32)
    return a, b, basis, residual, loss

  a0, b0, basis0, residual0, loss0 = evaluate(w_hat, initial_basis((k, n), rank, oversample))
  losses0 = jnp.full((num_iters,), jnp.nan, jnp.float32).at[0].set(loss0)
  # carry: (t, Q_{t-1}, basis, best_a, best_b, best_loss, best_iter, stopped, losses)
  init = (jnp.asarray(1, jnp.int32), quantize_columns(residual0, fmt, column_splits), basis0, a0, b0, loss0,
          jnp.asarray(0, jnp.int32), jnp.asarray(False), losses0)

  def cond(c):
    t, *_, stopped, _ = c
    return (t < num_iters) & ~stopped

  def body(c):
    t, q_prev, basis, best_a, best_b, best_loss, best_iter, _, losses = c
    a, b, basis, residual, loss = evaluate(w_hat - q_prev, basis)
    better = loss <= best_loss
    return (t + 1, quantize_columns(residual, fmt, column_splits), basis, jnp.where(better, a, best_a),
            jnp.where(better, b, best_b), jnp.where(better, loss, best_loss), jnp.where(better, t, best_iter),
            early_stop & ~better, losses.at[t].set(loss))

  t, _, _, a, b, _, best_iter, _, losses = jax.lax.while_loop(cond, body, init)
  residual = w_hat - jnp.dot(a, b, precision=precision)
  return LowRankResult(a, b, residual, losses, best_iter, t)


__all__ = ["DEFAULT_SVD_ITERS", "basis_size", "initial_basis", "subspace_svd", "svd_lowrank", "split_columns",
           "quantize_columns", "LowRankResult", "alternating_lowrank"]
